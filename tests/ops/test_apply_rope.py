"""apply_rope on every backend: forward and gradients against autograd through the fp64 reference; the torch
backend also bit for bit against transformers' own rotation.

Floating outputs allocated with ``torch.empty``/``torch.empty_like`` start as NaN (the ``nan_empty`` fixture), so
a tile a kernel never writes fails loudly.
"""

from __future__ import annotations

import pytest
import torch

import lr2kernels as lr2
from lr2kernels import reference
from tests.ops.helpers import DEVICE, cu_seqlens_of, dtype_id, hf_rotate, make_table, randn, run, tolerance

pytestmark = pytest.mark.usefixtures("nan_empty")
DIMS = [(64, 64), (80, 80), (96, 96), (128, 96), (96, 64), (80, 32)]
DIM_IDS = ["D64", "D80", "D96", "D128rot96", "D96rot64", "D80rot32"]


def _check(backend, q, k, table, **kwargs):
    """Forward and gradients of ``backend``'s apply_rope vs autograd through the fp64 reference."""
    q_rot, k_rot = run(backend, lr2.apply_rope, q, k, table, **kwargs)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape and q_rot.dtype == q.dtype
    grad_q, grad_k = torch.randn_like(q_rot), torch.randn_like(k_rot)
    grads = torch.autograd.grad((q_rot, k_rot), (q, k), (grad_q, grad_k))
    q64, k64 = (x.detach().double().requires_grad_() for x in (q, k))
    expected = reference.apply_rope(q64, k64, table, kwargs.get("position_ids"), kwargs.get("long"),
                                    kwargs.get("cu_seqlens"))  # fmt: skip
    expected_grads = torch.autograd.grad(expected, (q64, k64), (grad_q.double(), grad_k.double()))
    tol = tolerance(backend, q.dtype, "rope")
    for name, got, want in zip(("q", "k", "dq", "dk"), (q_rot, k_rot, *grads), (*expected, *expected_grads)):
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("seq", [1, 63, 100], ids=lambda s: f"L{s}")
@pytest.mark.parametrize("head_dim,rotary_dim", DIMS, ids=DIM_IDS)
def test_dense_gqa_forward_and_gradients(backend, head_dim, rotary_dim, seq):
    table = make_table(head_dim, rotary_dim=rotary_dim)
    q, k = randn(2, 6, seq, head_dim, requires_grad=True), randn(2, 2, seq, head_dim, requires_grad=True)
    _check(backend, q, k, table)


def test_partial_rotary_passes_channels_through(backend):
    table = make_table(128, rotary_dim=96)
    q, k = randn(1, 2, 40, 128), randn(1, 2, 40, 128)
    q_rot, k_rot = run(backend, lr2.apply_rope, q, k, table)
    assert torch.equal(q_rot[..., 96:], q[..., 96:]) and torch.equal(k_rot[..., 96:], k[..., 96:])


def test_rotation_preserves_norm_times_attention_factor(backend):
    table = make_table(64)
    q, k = randn(1, 2, 100, 64, dtype=torch.float64), randn(1, 2, 100, 64, dtype=torch.float64)
    q_rot, _ = reference.apply_rope(q, k, table)  # the oracle itself
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1) * table.attention_factor, atol=1e-5, rtol=1e-5)
    q_rot, _ = run(backend, lr2.apply_rope, q.float(), k.float(), table)
    torch.testing.assert_close(
        q_rot.double().norm(dim=-1), q.norm(dim=-1) * table.attention_factor, atol=1e-5, rtol=1e-5
    )


def test_auto_table_is_the_forced_long_one_past_l0(backend):
    table = make_table(64)
    q, k = randn(1, 2, 70, 64), randn(1, 2, 70, 64)
    auto = run(backend, lr2.apply_rope, q, k, table)  # 70 > L0 = 64: long
    forced_long = run(backend, lr2.apply_rope, q, k, table, long=True)
    forced_short = run(backend, lr2.apply_rope, q, k, table, long=False)
    assert torch.equal(auto[0], forced_long[0]) and torch.equal(auto[1], forced_long[1])
    assert not torch.allclose(auto[0], forced_short[0])


def test_explicit_positions_batch_rule_and_chunks(backend):
    table = make_table(64)
    q, k = randn(2, 2, 20, 64, requires_grad=True), randn(2, 1, 20, 64, requires_grad=True)
    rows = torch.stack([torch.arange(5, 25), torch.arange(90, 110)]).to(DEVICE)  # max 109 > L0: long for both
    _check(backend, q, k, table, position_ids=rows)
    _check(backend, q, k, table, position_ids=rows[:1] + 20)  # [1, L], 25..44: short
    _check(backend, q, k, table, position_ids=torch.arange(50, 70, device=DEVICE))  # [L] crossing L0: long
    _check(backend, q, k, table, position_ids=torch.arange(10, 30, device=DEVICE))  # [L] below L0: short


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_long_override(backend, long):
    table = make_table(64)
    seq = 100 if not long else 30
    q, k = randn(1, 3, seq, 64, requires_grad=True), randn(1, 1, seq, 64, requires_grad=True)
    _check(backend, q, k, table, long=long)  # forced short past L0 / forced long below it


def test_varlen_each_sequence_its_own_table(backend):
    lengths = [1, 63, 100, 30, 64, 65]  # L0 = 64: short, short, long, short, short (exactly L0), long
    table = make_table(80)
    q, k = randn(sum(lengths), 6, 80, requires_grad=True), randn(sum(lengths), 2, 80, requires_grad=True)
    cu_seqlens = cu_seqlens_of(lengths)
    _check(backend, q, k, table, cu_seqlens=cu_seqlens)
    # Per sequence, not per batch: the short sequences keep the short table although the batch crosses L0.
    q_rot, _ = run(backend, lr2.apply_rope, q, k, table, cu_seqlens=cu_seqlens)
    short, _ = reference.apply_rope(
        q[1:64].double(), k[1:64].double(), table, long=False, cu_seqlens=cu_seqlens_of([63])
    )
    torch.testing.assert_close(q_rot[1:64].double(), short, **tolerance(backend, torch.float32, "rope"))


def test_varlen_explicit_positions_nonzero_starts(backend):
    # Packed chunks: sequences continue at 10, 50 (crossing L0 = 64) and 200.
    lengths = [20, 30, 17]
    table = make_table(128, rotary_dim=96)
    position_ids = torch.cat([torch.arange(10, 30), torch.arange(50, 80), torch.arange(200, 217)]).to(DEVICE)
    q, k = randn(sum(lengths), 4, 128, requires_grad=True), randn(sum(lengths), 2, 128, requires_grad=True)
    _check(backend, q, k, table, position_ids=position_ids, cu_seqlens=cu_seqlens_of(lengths))


def test_varlen_empty_sequence_and_long_override(backend):
    table = make_table(64)
    lengths = [5, 0, 70]
    q, k = randn(sum(lengths), 2, 64, requires_grad=True), randn(sum(lengths), 2, 64, requires_grad=True)
    _check(backend, q, k, table, cu_seqlens=cu_seqlens_of(lengths))
    _check(backend, q, k, table, cu_seqlens=cu_seqlens_of(lengths), long=True)


def test_non_contiguous_inputs_and_single_gradient(backend):
    # [B, L, H, D] storage viewed as [B, H, L, D], as the output of a q/k projection is.
    table = make_table(64)
    q = torch.randn(2, 30, 4, 64, device=DEVICE).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 30, 2, 64, device=DEVICE).transpose(1, 2).requires_grad_()
    _check(backend, q, k, table)
    q_rot, k_rot = run(backend, lr2.apply_rope, q, k, table)
    (grad_k,) = torch.autograd.grad(k_rot.sum(), k)  # q's gradient is never asked for
    k64 = k.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference.apply_rope(q.detach().double(), k64, table)[1].sum(), k64)
    torch.testing.assert_close(grad_k.double(), want, **tolerance(backend, torch.float32, "rope"))


def _hf_rotate_varlen(q, k, table, cu_seqlens):
    """HF's rotation in q's dtype of each sequence of a varlen batch, with HF's rule on its own length."""
    bounds, q_out, k_out = cu_seqlens.tolist(), [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        cos, sin = table.cos_sin(torch.arange(end - start, device=q.device)[None])
        q_rot, k_rot = hf_rotate(
            *(x[None, start:end].transpose(1, 2) for x in (q, k)), cos.to(q.dtype), sin.to(q.dtype)
        )
        q_out.append(q_rot[0].transpose(0, 1))
        k_out.append(k_rot[0].transpose(0, 1))
    return torch.cat(q_out), torch.cat(k_out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_low_precision_within_twice_the_hf_path(backend, varlen, dtype):
    # FlashAttention's rule: the error vs fp64 is at most twice that of HF's rotation in the same dtype.
    table = make_table(96, rotary_dim=64)
    shape_q, shape_k = ((150, 6, 96), (150, 2, 96)) if varlen else ((1, 6, 100, 96), (1, 2, 100, 96))
    kwargs = dict(cu_seqlens=cu_seqlens_of([50, 100])) if varlen else {}
    q, k = randn(*shape_q), randn(*shape_k)
    exact = reference.apply_rope(q.double(), k.double(), table, **kwargs)
    ql, kl = q.to(dtype), k.to(dtype)
    ours = run(backend, lr2.apply_rope, ql, kl, table, **kwargs)
    if varlen:
        plain = _hf_rotate_varlen(ql, kl, table, kwargs["cu_seqlens"])
    else:
        cos, sin = table.cos_sin(torch.arange(100, device=DEVICE)[None])
        plain = hf_rotate(ql, kl, cos.to(dtype), sin.to(dtype))
    for got, base, want in zip(ours, plain, exact):
        assert got.dtype == dtype
        our_err = (got.double() - want).abs().max().item()
        plain_err = (base.double() - want).abs().max().item()
        assert our_err <= 2 * plain_err, (our_err, plain_err)


def test_gradcheck_fp64(backend):
    table = make_table(8, rotary_dim=6, original_max_position=4)
    q = randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    k = randn(1, 1, 7, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: run(backend, lr2.apply_rope, q, k, table), (q, k))


# ------------------------------------------------------------------------- torch backend only: HF bit for bit
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (80, 80), (128, 96), (96, 32)], ids=lambda x: str(x))
@pytest.mark.parametrize("seq", [1, 63, 257], ids=lambda s: f"L{s}")
def test_torch_backend_equals_hf_rotation_bitwise(dtype, head_dim, rotary_dim, seq):
    table = make_table(head_dim, rotary_dim=rotary_dim)
    q, k = randn(2, 6, seq, head_dim, dtype=dtype), randn(2, 2, seq, head_dim, dtype=dtype)
    q_rot, k_rot = lr2.apply_rope(q, k, table, backend="torch")
    cos, sin = table.cos_sin(torch.arange(seq, device=DEVICE).expand(2, seq))  # HF casts cos/sin to x.dtype
    hf_q, hf_k = hf_rotate(q, k, cos.to(dtype), sin.to(dtype))
    assert torch.equal(q_rot, hf_q) and torch.equal(k_rot, hf_k)
    assert torch.equal(q_rot[..., rotary_dim:], q[..., rotary_dim:])  # pass-through channels untouched


def test_torch_backend_gradients_equal_hf_path():
    table = make_table(128, rotary_dim=96)
    q, k = randn(2, 4, 70, 128, requires_grad=True), randn(2, 2, 70, 128, requires_grad=True)
    grad_q, grad_k = randn(2, 4, 70, 128), randn(2, 2, 70, 128)
    grads = torch.autograd.grad(lr2.apply_rope(q, k, table, backend="torch"), (q, k), (grad_q, grad_k))
    cos, sin = table.cos_sin(torch.arange(70, device=DEVICE).expand(2, 70))
    expected = torch.autograd.grad(hf_rotate(q, k, cos, sin), (q, k), (grad_q, grad_k))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_torch_backend_varlen_and_positions_equal_hf_rotation_bitwise():
    table = make_table(64)
    lengths = [10, 100, 64, 65]  # L0 = 64: short, long, short (exactly L0), long
    cu_seqlens = cu_seqlens_of(lengths)
    q, k = randn(239, 4, 64), randn(239, 2, 64)
    q_rot, k_rot = lr2.apply_rope(q, k, table, cu_seqlens=cu_seqlens, backend="torch")
    bounds = cu_seqlens.tolist()
    for (start, end), length in zip(zip(bounds[:-1], bounds[1:]), lengths):
        cos, sin = table.cos_sin(torch.arange(length, device=DEVICE)[None], long=length > 64)
        hf_q, hf_k = hf_rotate(q[None, start:end].transpose(1, 2), k[None, start:end].transpose(1, 2), cos, sin)
        assert torch.equal(q_rot[start:end], hf_q[0].transpose(0, 1))
        assert torch.equal(k_rot[start:end], hf_k[0].transpose(0, 1))
    # Dense with explicit positions: max position 39 < L0, the short table.
    q, k = randn(1, 2, 30, 64), randn(1, 2, 30, 64)
    position_ids = torch.arange(10, 40, device=DEVICE)
    q_rot, _ = lr2.apply_rope(q, k, table, position_ids=position_ids, backend="torch")
    cos, sin = table.cos_sin(position_ids[None], long=False)
    assert torch.equal(q_rot, hf_rotate(q, k, cos, sin)[0])
