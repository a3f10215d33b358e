"""Test-session setup: without a GPU, the Triton kernels run in Triton's CPU interpreter; the hub is never reached.

TRITON_INTERPRET must be set before any @triton.jit function is created, so it is set here, at collection start.

Where things are: the models the tests run (the one tiny-model factory ``tiny_model``, token ids, the real SmolLM2)
in tests/models.py; each folder's shared helpers in a plain module (tests/ops/helpers.py, tests/hf/compare.py,
tests/search/helpers.py) and its fixtures in its conftest.py. Test modules import helper modules only, never another
test module or a conftest.
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (it reads this once): tiny random models or the installed SmolLM2 only.
os.environ["HF_HUB_OFFLINE"] = "1"

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


@pytest.fixture
def as_on_a_gpu():
    """The package reads no tensor's values on the host (``set_host_reads("never")``), as for GPU tensors: no host
    fast paths and no value checks, so a CPU run takes the code paths, and makes the device reads, a GPU run would."""
    from lr2kernels.ops import validation

    previous = validation.set_host_reads("never")
    yield
    validation.set_host_reads(previous)


def pytest_collection_modifyitems(items):
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
