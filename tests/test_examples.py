"""The README's main-job example runs and its printed errors are small."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_agrees_with_the_reference():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--device", "cpu"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    errors = [float(x) for x in re.findall(r"max (?:\|[^|]+\| = |error )([0-9.e+-]+)", result.stdout)]
    assert len(errors) == 3, result.stdout
    assert max(errors) < 1e-4, result.stdout
    assert "['short', 'long', 'short']" in result.stdout
    assert '"rope_type": "longrope"' in result.stdout
