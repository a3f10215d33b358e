"""Fixtures of the op tests (the helpers they share are in tests/ops/helpers.py).

- ``backend``: every op test that takes it runs once per backend of :func:`lr2kernels.available_backends`.
- ``nan_empty``: floating tensors from ``torch.empty`` / ``torch.empty_like`` start as NaN.
- every test starts from ``torch.manual_seed(0)``.
"""

from __future__ import annotations

import pytest
import torch

# BACKENDS for the fixture; the other names are deprecated here: test modules import their helpers from
# tests.ops.helpers, and these stay only until the modules written before the move (tests/ops/test_paged_decode.py)
# do too.
from tests.ops.helpers import (  # noqa: F401
    BACKENDS,
    DEVICE,
    INTERPRETED,
    L0,
    TOLERANCES,
    build_call,
    cu_seqlens_of,
    dtype_id,
    hf_rope_attention,
    hf_rope_decode,
    hf_rotate,
    make_table,
    naive_attention,
    randn,
    requires_triton,
    run,
    skip_in_interpreter,
    skip_unless_supported,
    tolerance,
)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """The name of one available backend; test ids read ``test_x[torch-...]`` / ``test_x[triton-...]``."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def nan_empty(monkeypatch):
    """Floating tensors allocated with ``torch.empty`` / ``torch.empty_like`` start as NaN, so an output tile a
    kernel never writes fails loudly instead of passing on whatever the allocator left there."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_filled(out: torch.Tensor) -> torch.Tensor:
        return out.fill_(float("nan")) if out.dtype.is_floating_point else out

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: nan_filled(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: nan_filled(empty_like(*args, **kwargs)))
