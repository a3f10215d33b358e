"""Test-session setup: without a GPU, the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is created, so it is set here, at collection start.
"""

from __future__ import annotations

import os

import pytest
import torch

from lr2kernels.tables import resolve_cpu_trig

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The stock models the tests compare against compute their own cos/sin: resolve the CPU trig kernels before any
# test runs (pytorch/pytorch#188792; see lr2kernels.tables.resolve_cpu_trig).
resolve_cpu_trig()

# Tests that load the real model (SmolLM2-135M, ~15 s to load, most of the suite's time): the "slow" tier.
REAL_MODEL_FIXTURES = {"smollm2", "fresh_smollm2", "quick_demo"}


def pytest_collection_modifyitems(items):
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
