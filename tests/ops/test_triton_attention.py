"""The fused Triton rope_attention (forward and gradients) against reference.py.

Runs on the CPU under TRITON_INTERPRET=1 (small shapes, fp32/fp16) and on a GPU as is (bf16 too).
"""

from __future__ import annotations

import pytest
import torch

import lr2kernels as lr2
from lr2kernels import reference
from lr2kernels.ops.dispatch import backend_status
from tests.ops.conftest import make_table

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not backend_status("triton", DEVICE)[0], reason=f"triton backend: {backend_status('triton', DEVICE)[1]}"
)
GQA = [(2, 2), (3, 1), (8, 1)]
FWD_TOL = {torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _inputs(shape_q, shape_kv, dtype=torch.float32, requires_grad=True):
    q = torch.randn(shape_q, device=DEVICE).to(dtype)
    k = torch.randn(shape_kv, device=DEVICE).to(dtype)
    v = torch.randn(shape_kv, device=DEVICE).to(dtype)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def _reference_grads(q, k, v, grad_out, **kwargs):
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = reference.rope_attention(q64, k64, v64, **kwargs)
    return out, torch.autograd.grad(out, (q64, k64, v64), grad_out.double())


def _check(q, k, v, table, tol=3e-5, grad_tol=1e-4, **kwargs):
    out = lr2.rope_attention(q, k, v, table, backend="triton", **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected, expected_grads = _reference_grads(q, k, v, grad_out, table=table, **kwargs)
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    for name, got, want in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(got.double(), want, atol=grad_tol, rtol=grad_tol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seq", [1, 63, 100], ids=lambda s: f"L{s}")
@pytest.mark.parametrize("head_dim", [64, 80, 96], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"H{h[0]}kv{h[1]}")
def test_dense_forward_and_gradients(heads, head_dim, seq, causal):
    hq, hk = heads
    table = make_table(head_dim)
    q, k, v = _inputs((1, hq, seq, head_dim), (1, hk, seq, head_dim))
    _check(q, k, v, table, causal=causal)


@pytest.mark.parametrize(
    "head_dim,rotary_dim", [(128, 96), (64, 32), (256, 256)], ids=["D128rot96", "D64rot32", "D256"]
)
def test_partial_rotary_and_large_heads(head_dim, rotary_dim):
    table = make_table(head_dim, rotary_dim=rotary_dim)
    q, k, v = _inputs((1, 2, 70, head_dim), (1, 1, 70, head_dim))
    _check(q, k, v, table)


def test_batch_with_position_offsets_uses_batch_rule():
    table = make_table(64)
    q, k, v = _inputs((2, 2, 20, 64), (2, 1, 20, 64))
    position_ids = torch.stack([torch.arange(20), torch.arange(90, 110)]).to(DEVICE)  # max 109 > L0: long for both
    _check(q, k, v, table, position_ids=position_ids)
    chunk = torch.arange(30, 50, device=DEVICE)  # a chunk of a prefill, all below L0: short
    _check(q, k, v, table, position_ids=chunk, causal=False)


def test_long_override():
    table = make_table(64)
    q, k, v = _inputs((1, 2, 40, 64), (1, 2, 40, 64))
    _check(q, k, v, table, long=True)


def _varlen(lengths, hq, hk, head_dim, dtype=torch.float32):
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    total = sum(lengths)
    return (*_inputs((total, hq, head_dim), (total, hk, head_dim), dtype), cu_seqlens)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_varlen_each_sequence_its_own_table(causal):
    lengths = [1, 63, 100, 30, 65]  # L0 = 64: short, short, long, short, long
    table = make_table(80)
    q, k, v, cu_seqlens = _varlen(lengths, 6, 2, 80)
    _check(q, k, v, table, cu_seqlens=cu_seqlens, max_seqlen=max(lengths), causal=causal)


def test_varlen_explicit_positions_cross_l0():
    # Two chunks of packed prefill: the second sequence continues at position 50 and crosses L0 = 64.
    table = make_table(64)
    q, k, v, cu_seqlens = _varlen([20, 30], 2, 1, 64)
    position_ids = torch.cat([torch.arange(20), torch.arange(50, 80)]).to(DEVICE)
    _check(q, k, v, table, cu_seqlens=cu_seqlens, position_ids=position_ids)


def test_return_lse_dense_and_varlen():
    table = make_table(64)
    q, k, v = _inputs((1, 2, 50, 64), (1, 1, 50, 64), requires_grad=False)
    out, lse = lr2.rope_attention(q, k, v, table, backend="triton", return_lse=True)
    ref_out, ref_lse = reference.rope_attention(q.double(), k.double(), v.double(), table, return_lse=True)
    assert lse.shape == (1, 2, 50) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), ref_lse, atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(out.double(), ref_out, atol=3e-5, rtol=3e-5)
    qv, kv, vv, cu_seqlens = _varlen([10, 70], 2, 1, 64)
    _, lse_v = lr2.rope_attention(qv, kv, vv, table, cu_seqlens=cu_seqlens, backend="triton", return_lse=True)
    _, ref_lse_v = reference.rope_attention(
        qv.double(), kv.double(), vv.double(), table, cu_seqlens=cu_seqlens, return_lse=True
    )
    assert lse_v.shape == (2, 80)
    torch.testing.assert_close(lse_v.double(), ref_lse_v, atol=3e-5, rtol=3e-5)


def test_non_contiguous_inputs_and_softmax_scale():
    # [B, L, H, D] storage viewed as [B, H, L, D], as the output of a q/k/v projection is.
    table = make_table(64)
    q = torch.randn(1, 40, 4, 64, device=DEVICE).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 40, 2, 64, device=DEVICE).transpose(1, 2).requires_grad_()
    v = torch.randn(1, 40, 2, 64, device=DEVICE).transpose(1, 2).requires_grad_()
    _check(q, k, v, table, softmax_scale=0.07)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skipif(DEVICE.type != "cuda", reason="the interpreter's tl.dot is wrong for bf16"),
        ),
    ],
    ids=str,
)
def test_low_precision_within_twice_the_torch_backend(dtype):
    table = make_table(64)
    q, k, v = _inputs((1, 4, 100, 64), (1, 2, 100, 64), requires_grad=False)
    exact = reference.rope_attention(q.double(), k.double(), v.double(), table)
    ql, kl, vl = q.to(dtype), k.to(dtype), v.to(dtype)
    ours = lr2.rope_attention(ql, kl, vl, table, backend="triton")
    torch_err = (lr2.rope_attention(ql, kl, vl, table, backend="torch").double() - exact).abs().max().item()
    our_err = (ours.double() - exact).abs().max().item()
    assert ours.dtype == dtype
    assert our_err <= 2 * torch_err + FWD_TOL[dtype] / 3, (our_err, torch_err)


def test_positions_near_128k_keep_hf_precision():
    # The kernels take HF's fp32 angle (float32(pos) * inv_freq, one rounding) and a precise cos/sin, so at
    # positions up to 131071 they agree with the reference's cos/sin (HF's path) far inside the fp32 budget.
    table = make_table(128, rotary_dim=96, original_max_position=4096)
    assert table.max_position == 32768  # make_table: 8 x L0; positions past it are still well defined
    q, k, v = _inputs((1, 2, 32, 128), (1, 1, 32, 128))
    position_ids = torch.arange(131040, 131072, device=DEVICE)
    _check(q, k, v, table, position_ids=position_ids)
    q_rot, k_rot = lr2.apply_rope(q.detach(), k.detach(), table, position_ids=position_ids, backend="triton")
    ref_q, ref_k = reference.apply_rope(q.detach().double(), k.detach().double(), table, position_ids=position_ids)
    torch.testing.assert_close(q_rot.double(), ref_q, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(k_rot.double(), ref_k, atol=2e-6, rtol=2e-6)
