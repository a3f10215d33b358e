"""Helpers of the CUDA backend's CPU-side tests: where csrc/ is, csrc/ptxas_report.py as a module, the host compiler.

A plain module that the tests import (no test module imports a conftest); pytest fixtures would go in a conftest.py."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"


def load_ptxas_report():
    """csrc/ptxas_report.py as a module (csrc/ is not a package)."""
    spec = importlib.util.spec_from_file_location("lr2_ptxas_report", CSRC / "ptxas_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def host_compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
