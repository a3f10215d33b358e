"""Backend choice: the torch backend is always there; unbuilt or unknown backends fail with the reason."""

from __future__ import annotations

import subprocess
import sys
import types
import warnings

import pytest
import torch

import lr2kernels as lr2
from lr2kernels.ops import dispatch
from tests.ops.conftest import make_table


def test_torch_is_always_available():
    assert "torch" in lr2.available_backends()
    assert dispatch.resolve(None, torch.device("cpu")).NAME == "torch"


def test_cpu_default_does_not_warn():
    table = make_table(64)
    q = torch.randn(1, 2, 4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lr2.apply_rope(q, q, table)


def test_unknown_backend_lists_the_known_ones():
    q = torch.randn(1, 2, 4, 64)
    with pytest.raises(ValueError, match=r"backend: expected one of \['torch', 'triton', 'cuda'\] or None, got 'tpu'"):
        lr2.apply_rope(q, q, make_table(64), backend="tpu")


def test_unavailable_backend_says_why(monkeypatch):
    fake = types.ModuleType("fake_backend")
    fake.is_available = lambda device=None: (False, "needs a CUDA device")
    monkeypatch.setitem(dispatch._BACKEND_MODULES, "triton", "fake_backend")
    monkeypatch.setitem(sys.modules, "fake_backend", fake)
    assert "triton" not in lr2.available_backends()
    q = torch.randn(1, 2, 4, 64)
    with pytest.raises(ValueError, match="backend: 'triton' is not available for cpu tensors: needs a CUDA device"):
        lr2.apply_rope(q, q, make_table(64), backend="triton")


def test_unbuilt_backend_says_so(monkeypatch):
    monkeypatch.setitem(dispatch._BACKEND_MODULES, "cuda", None)
    q = torch.randn(1, 2, 4, 64)
    with pytest.raises(ValueError, match="backend: 'cuda' is not available for cpu tensors: not part of this version"):
        lr2.apply_rope(q, q, make_table(64), backend="cuda")


def test_import_is_cheap():
    # No transformers, no triton compilation, no CUDA probing at import time.
    code = (
        "import sys, lr2kernels; "
        "bad = [m for m in ('transformers', 'triton', 'lr2kernels.ops.torch_backend') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cuda_tensors_get_the_fused_backend_by_default():
    # No GPU is needed to check the choice itself: the triton backend accepts any CUDA device when triton is there.
    ok, reason = dispatch.backend_status("triton", torch.device("cuda"))
    assert ok, f"triton is a dependency of the package on Linux x86_64: {reason}"
    assert dispatch.resolve(None, torch.device("cuda")).NAME == "triton"
    assert dispatch.resolve(None, torch.device("cpu")).NAME == "torch"
