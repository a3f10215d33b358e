"""Backend choice: the torch backend is always there; unbuilt, unknown or unavailable backends and unsupported calls
fail with the reason; backend=None falls back (with a warning) to the next backend that supports the call."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import types
import warnings

import pytest
import torch

import lr2kernels as lr2
from lr2kernels.ops import dispatch, validation
from tests.ops.helpers import DEVICE, make_table, requires_triton

TABLE = make_table(64)


def _attention_call(dtype=torch.float32, head_dim=64, device=None):
    """A validated rope_attention call on CPU tensors, its device optionally relabelled (``resolve`` and ``supports``
    look at the call's metadata, ``call.spec``, only: a CUDA call can be described without a GPU)."""
    table = TABLE if head_dim == 64 else make_table(head_dim)
    q = torch.randn(1, 2, 4, head_dim, dtype=dtype)
    call = validation.check_attention_call(q, q, q, table, None, None, None, None, True, None, False)
    return call if device is None else dataclasses.replace(call, device=torch.device(device))


def _rope_call(dtype=torch.float32):
    q = torch.randn(1, 2, 4, 64, dtype=dtype)
    return validation.check_rope_call(q, q, TABLE, None, None, None)


def test_torch_is_always_available():
    assert "torch" in lr2.available_backends()
    assert dispatch.resolve(None, _attention_call()).NAME == "torch"
    assert dispatch.resolve("torch", _attention_call(torch.float64)).NAME == "torch"
    assert dispatch.get_backend("torch").supports(_attention_call(torch.bfloat16, head_dim=512).spec) == (True, "")


def test_cpu_default_does_not_warn():
    q = torch.randn(1, 2, 4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lr2.apply_rope(q, q, TABLE)


def test_unknown_backend_lists_the_known_ones():
    q = torch.randn(1, 2, 4, 64)
    with pytest.raises(ValueError, match=r"backend: expected one of \['torch', 'triton', 'cuda'\] or None, got 'tpu'"):
        lr2.apply_rope(q, q, TABLE, backend="tpu")
    with pytest.raises(TypeError, match="backend: expected a backend name or None, got int"):
        lr2.apply_rope(q, q, TABLE, backend=1)


def test_unavailable_backend_says_why(monkeypatch):
    fake = types.ModuleType("fake_backend")
    fake.BACKEND = types.SimpleNamespace(
        NAME="triton", is_available=lambda device=None: (False, "needs a CUDA device"), supports=lambda spec: (True, "")
    )
    monkeypatch.setattr(dispatch, "_instances", dict(dispatch._instances))
    monkeypatch.setitem(dispatch._BACKENDS, "triton", "fake_backend:BACKEND")
    monkeypatch.setitem(sys.modules, "fake_backend", fake)
    assert "triton" not in lr2.available_backends()
    q = torch.randn(1, 2, 4, 64)
    with pytest.raises(ValueError, match="backend: 'triton' cannot run this apply_rope on cpu tensors: needs a CUDA"):
        lr2.apply_rope(q, q, TABLE, backend="triton")


def test_unbuilt_backend_says_so(monkeypatch):
    monkeypatch.setitem(dispatch._BACKENDS, "cuda", None)
    assert dispatch.get_backend("cuda") is None and "cuda" not in lr2.available_backends()
    q = torch.randn(1, 2, 4, 64)
    with pytest.raises(ValueError, match="backend: 'cuda' cannot run this apply_rope on cpu tensors: not part of this"):
        lr2.apply_rope(q, q, TABLE, backend="cuda")


def test_import_is_cheap():
    # No transformers, no triton compilation, no CUDA probing at import time.
    code = (
        "import sys, lr2kernels; "
        "bad = [m for m in ('transformers', 'triton', 'lr2kernels.ops.torch_backend') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------ supports(call.spec)
def test_triton_supports_the_kernels_dtypes_and_head_sizes():
    triton_backend = dispatch.get_backend("triton")
    assert triton_backend.supports(_attention_call(torch.float32).spec) == (True, "")
    assert triton_backend.supports(_attention_call(torch.float16).spec) == (True, "")
    assert triton_backend.supports(_attention_call(torch.float32, head_dim=256).spec) == (True, "")
    assert triton_backend.supports(_attention_call(torch.bfloat16, device="cuda").spec) == (True, "")
    assert triton_backend.supports(_rope_call(torch.bfloat16).spec) == (
        True,
        "",
    )  # elementwise: fine in the interpreter


@pytest.mark.parametrize(
    "call,reason",
    [
        (lambda: _attention_call(torch.float64), r"compute in fp32 and are not built for float64"),
        (lambda: _attention_call(torch.float64, device="cuda"), r"not built for float64"),
        (lambda: _rope_call(torch.float64), r"not built for float64"),
        (lambda: _attention_call(torch.bfloat16), r"interpreter computes bf16 tl.dot wrongly"),
        (lambda: _attention_call(torch.float32, head_dim=512), r"head_dim 512 is above the kernels' largest tile"),
    ],
    ids=["fp64", "fp64-cuda", "fp64-apply_rope", "bf16-attention-cpu", "head_dim512"],
)
def test_triton_declines_with_a_reason(call, reason):
    ok, why = dispatch.get_backend("triton").supports(call().spec)
    assert not ok
    assert re.search(reason, why), why


@requires_triton
def test_triton_named_on_an_unsupported_call_raises_the_reason():
    # On the device Triton runs on here (a GPU's; the CPU only in the interpreter), so the dtype is what it declines.
    q = torch.randn(1, 2, 4, 64, dtype=torch.float64, device=DEVICE)
    with pytest.raises(
        ValueError,
        match=rf"backend: 'triton' cannot run this rope_attention on {DEVICE.type} tensors: .*not built for float64",
    ):
        lr2.rope_attention(q, q, q, TABLE, backend="triton")
    k = torch.randn(1, 2, 4, 64, dtype=torch.float64, device=DEVICE)
    with pytest.raises(
        ValueError, match=rf"backend: 'triton' cannot run this rerotate on {DEVICE.type} tensors: .*float64"
    ):
        lr2.rerotate(k, TABLE, position_ids=torch.arange(4, device=DEVICE), from_long=False, to_long=True,
                     backend="triton")  # fmt: skip


# ------------------------------------------------------------------------------------ backend=None on CUDA
def test_cuda_tensors_get_the_fused_backend_by_default():
    # No GPU is needed to check the choice itself: the triton backend accepts any CUDA device when triton is there.
    ok, reason = dispatch.backend_status("triton", torch.device("cuda"))
    assert ok, f"triton is a dependency of the package on Linux x86_64: {reason}"
    assert dispatch.resolve(None, _attention_call(device="cuda")).NAME == "triton"
    assert dispatch.resolve(None, _attention_call(torch.bfloat16, device="cuda")).NAME == "triton"
    assert dispatch.resolve(None, _attention_call()).NAME == "torch"


def test_cuda_call_the_kernels_decline_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(UserWarning, match=r"runs on the 'torch' backend .*triton: .*not built for float64"):
        assert dispatch.resolve(None, _attention_call(torch.float64, device="cuda")).NAME == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per (op, device type)
        assert dispatch.resolve(None, _attention_call(torch.float64, device="cuda")).NAME == "torch"


def test_per_sequence_grids_put_heads_and_sequences_on_their_own_axes():
    # CUDA caps grid axes 1 and 2 at 65,535: 2,048 sequences x 32 heads must not share one axis.
    pytest.importorskip("triton")
    from lr2kernels.ops.triton._host import sequence_grid

    assert sequence_grid(7, 32, 2048) == (7, 32, 2048)
    with pytest.raises(ValueError, match=r"at most 65535 sequences .* got 70000 sequences"):
        sequence_grid(1, 8, 70_000)


def test_a_triton_interpreter_that_numpy_breaks_is_reported_not_run():
    """Triton 3.6's interpreter does int(array) on 1-element arrays, an error since NumPy 2.4: every kernel would
    fail at its first loop. The backend reports why instead; a fixed interpreter (3.9 squeezes) passes."""
    from lr2kernels.ops.triton import interpreter_problem

    broken = 'scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))'
    fixed = 'scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))'
    assert "numpy<2.4" in interpreter_problem("2.4.6", broken)
    assert interpreter_problem("2.3.5", broken) == ""
    assert interpreter_problem("2.4.6", fixed) == ""
    assert interpreter_problem("3.0.0", fixed) == ""


def test_the_triton_backend_runs_in_this_interpreter_when_it_can():
    """No silent loss of the Triton tests: where the installed interpreter has no NumPy problem, the backend is
    available on the CPU under TRITON_INTERPRET=1."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs triton and TRITON_INTERPRET=1 (the README's test command sets it)")
    from lr2kernels.ops.triton import _installed_interpreter_problem

    ok, reason = dispatch.backend_status("triton", torch.device("cpu"))
    assert ok == (not _installed_interpreter_problem()), reason
