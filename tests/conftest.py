"""Test-session setup: without a GPU, the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is created, so it is set here, at collection start.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests that load the real model (SmolLM2-135M, ~15 s to load, most of the suite's time): the "slow" tier.
REAL_MODEL_FIXTURES = {"smollm2", "fresh_smollm2", "quick_demo"}


def pytest_collection_modifyitems(items):
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
