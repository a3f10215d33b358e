"""Fixtures of the op tests (the helpers they share are in tests/ops/helpers.py).

- ``backend``: every op test that takes it runs once per backend of :func:`lr2kernels.available_backends`.
- ``nan_empty``: floating tensors from ``torch.empty`` / ``torch.empty_like`` start as NaN.
- every test starts from ``torch.manual_seed(0)``.
"""

from __future__ import annotations

import pytest
import torch

from tests.ops.helpers import BACKENDS


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
