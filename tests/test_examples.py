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
    assert len(errors) == 4, result.stdout
    ours, stock, varlen, decode = errors
    # fp32 attention's error depends on the machine's kernels. Ours must be within 1e-4 of the reference, or no worse
    # than twice stock SDPA's on the same rotated inputs on the same machine. (The 5.3e-4 once seen here, in CI and
    # in about a third of local runs, was the first cos of the process computed by a low-accuracy MKL kernel,
    # pytorch/pytorch#188792; lr2kernels.tables.resolve_cpu_trig prevents it.)
    assert ours < max(1e-4, 2 * stock), result.stdout
    assert max(varlen, decode) < 1e-4, result.stdout
    assert "['short', 'long', 'short']" in result.stdout
    assert result.stdout.rstrip().endswith("all checks passed")


def test_quickstart_exits_non_zero_on_an_error_above_its_tolerance():
    # A tolerance no fp32 computation meets: the same run must now fail, and say which checks and why.
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--device", "cpu", "--tolerance", "1e-30"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: " in result.stdout and "varlen rope_attention: error" in result.stdout
    assert "above the tolerance 1.00e-30" in result.stdout
    assert '"rope_type": "longrope"' in result.stdout
