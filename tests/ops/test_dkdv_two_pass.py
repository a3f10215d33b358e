"""The Triton backward's two-pass dk/dv above 128 channels (``attention.dkdv_two_pass``): a dv pass and a dk pass
of the dk/dv kernel over each key tile, each holding one fp32 accumulator, where the fused kernel holds both.

Both passes must give exactly what the fused kernel gives (the same p and dS, summed in the same order: equal bit
for bit in the interpreter), and dk and dv must match the fp64 reference, at 256 channels with GQA, dense with
explicit positions and varlen, causal and not, positions past L0 (the long table), with the GQA group split into
partial sums or not.
"""

from __future__ import annotations

import pytest
import torch

import lr2kernels as lr2
from tests.ops.helpers import DEVICE, cu_seqlens_of, make_table, randn, tolerance
from tests.ops.test_rope_attention import _assert_like_reference, _qkv, _reference, _triton_launchers

pytestmark = pytest.mark.usefixtures("nan_empty")


@pytest.fixture(autouse=True)
def _triton_available():
    if "triton" not in lr2.available_backends():
        pytest.skip("the triton backend is not available here")


def _inputs(layout: str, dtype: torch.dtype) -> tuple:
    """(q, k, v, table, launcher kwargs) at 256 channels, GQA 4:2, tokens past L0 = 64."""
    table = make_table(256)
    if layout == "varlen":
        lengths = [20, 70, 9]  # one sequence on the long table, one shorter than a key tile
        q, k, v = _qkv((sum(lengths), 4, 256), (sum(lengths), 2, 256), dtype=dtype)
        return q, k, v, table, {"cu_seqlens": cu_seqlens_of(lengths), "max_seqlen": 70}
    q, k, v = _qkv((1, 4, 70, 256), (1, 2, 70, 256), dtype=dtype)
    return q, k, v, table, {"position_ids": torch.arange(30, 100, device=DEVICE)[None]}  # crosses L0


def _launched_dkdv(monkeypatch) -> list[str]:
    """The dk/dv kernels the launcher runs from now on, by name, in order."""
    from lr2kernels.ops.triton import attention

    launched = []
    for name in ("_rope_attention_bwd_dkdv_kernel", "_rope_attention_bwd_dv_kernel", "_rope_attention_bwd_dk_kernel"):
        kernel = getattr(attention, name)

        def run(*args, _name=name, _run=kernel.run, **kwargs):
            launched.append(_name)
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return launched


@pytest.mark.parametrize("splits", [1, 2], ids=lambda s: f"parts{s}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", ["dense_positions", "varlen"])
def test_two_pass_dkdv_equals_the_fused_kernel_and_the_reference(layout, causal, splits, monkeypatch):
    from lr2kernels.ops.triton import attention

    assert attention.dkdv_two_pass(256) and not attention.dkdv_two_pass(128)
    q, k, v, table, kwargs = _inputs(layout, torch.float32)
    grad_out = randn(*q.shape)
    launched = _launched_dkdv(monkeypatch)
    two_pass = _triton_launchers(q, k, v, table, grad_out, causal=causal, group_splits=splits, **kwargs)
    assert launched == ["_rope_attention_bwd_dv_kernel", "_rope_attention_bwd_dk_kernel"]
    launched.clear()
    monkeypatch.setattr(attention, "dkdv_two_pass", lambda head_dim: False)
    fused = _triton_launchers(q, k, v, table, grad_out, causal=causal, group_splits=splits, **kwargs)
    assert launched == ["_rope_attention_bwd_dkdv_kernel"]
    for name, got, want in zip(["out", "dq", "dk", "dv"], two_pass, fused, strict=True):
        assert torch.equal(got, want), name
    _assert_like_reference("triton", torch.float32, two_pass,
                           _reference(q, k, v, table, grad_out, causal=causal, **kwargs))  # fmt: skip


def test_two_pass_dkdv_rotating_per_tile(monkeypatch):
    """``staged=False``: each pass rotates its key tile and every query tile it loads itself."""
    from lr2kernels.ops.triton import attention

    q, k, v, table, kwargs = _inputs("varlen", torch.float32)
    grad_out = randn(*q.shape)
    two_pass = _triton_launchers(q, k, v, table, grad_out, staged=False, **kwargs)
    monkeypatch.setattr(attention, "dkdv_two_pass", lambda head_dim: False)
    fused = _triton_launchers(q, k, v, table, grad_out, staged=False, **kwargs)
    for name, got, want in zip(["dk", "dv"], two_pass[2:], fused[2:], strict=True):
        assert torch.equal(got, want), name
    _assert_like_reference("triton", torch.float32, two_pass, _reference(q, k, v, table, grad_out, **kwargs))


def test_two_pass_dkdv_in_fp16(monkeypatch):
    """fp16 inputs: the passes cast p and dS to fp16 for their dots as the fused kernel does, bit for bit; dk and
    dv err from the fp64 reference at most twice as much as the reference itself run in fp16 (FlashAttention's
    rule, as test_low_precision_error_within_twice_plain_hf)."""
    from lr2kernels import reference
    from lr2kernels.ops.triton import attention

    q, k, v, table, kwargs = _inputs("varlen", torch.float16)
    grad_out = randn(*q.shape, dtype=torch.float16)
    two_pass = _triton_launchers(q, k, v, table, grad_out, **kwargs)
    monkeypatch.setattr(attention, "dkdv_two_pass", lambda head_dim: False)
    fused = _triton_launchers(q, k, v, table, grad_out, **kwargs)
    exact = _reference(q, k, v, table, grad_out, **kwargs)
    ql, kl, vl = (x.detach().clone().requires_grad_() for x in (q, k, v))
    plain = torch.autograd.grad(reference.rope_attention(ql, kl, vl, table, **kwargs), (kl, vl), grad_out)
    slack = tolerance("triton", torch.float16)["atol"] / 3
    for name, got, want, low, ref in zip(["dk", "dv"], two_pass[2:], fused[2:], plain, exact[2:], strict=True):
        assert got.dtype == torch.float16 and torch.isfinite(got).all(), name
        assert torch.equal(got, want), name
        our_err, plain_err = ((x.double() - ref).abs().max().item() for x in (got, low))
        assert our_err <= 2 * plain_err + slack, (name, our_err, plain_err)
