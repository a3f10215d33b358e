"""The Triton apply_rope (forward and gradients) and rerotate against reference.py.

Runs on the CPU under TRITON_INTERPRET=1 (small shapes, fp32/fp16) and on a GPU as is. Every tensor the kernels
allocate with ``torch.empty_like`` is NaN-filled here, so a tile the kernel never writes fails loudly.
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
TOL = 2e-6  # fp32 kernel vs the fp64 reference (which rounds cos/sin to fp32 like the kernel)
_empty_like = torch.empty_like


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    def nan_empty_like(x, *args, **kwargs):
        out = _empty_like(x, *args, **kwargs)
        return out.fill_(float("nan")) if out.dtype.is_floating_point else out

    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


def _randn(*shape, dtype=torch.float32, requires_grad=True):
    return torch.randn(shape, device=DEVICE).to(dtype).requires_grad_(requires_grad)


def _check(q, k, table, tol=TOL, **kwargs):
    """Forward and gradients of the Triton apply_rope vs autograd through the fp64 reference."""
    q_rot, k_rot = lr2.apply_rope(q, k, table, backend="triton", **kwargs)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape and q_rot.dtype == q.dtype
    grad_q, grad_k = torch.randn_like(q_rot), torch.randn_like(k_rot)
    grads = torch.autograd.grad((q_rot, k_rot), (q, k), (grad_q, grad_k))
    q64, k64 = (x.detach().double().requires_grad_() for x in (q, k))
    expected = reference.apply_rope(q64, k64, table, kwargs.get("position_ids"), kwargs.get("long"),
                                    kwargs.get("cu_seqlens"))  # fmt: skip
    expected_grads = torch.autograd.grad(expected, (q64, k64), (grad_q.double(), grad_k.double()))
    for name, got, want in zip(("q", "k", "dq", "dk"), (q_rot, k_rot, *grads), (*expected, *expected_grads)):
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("seq", [1, 63, 100], ids=lambda s: f"L{s}")
@pytest.mark.parametrize(
    "head_dim,rotary_dim", [(64, 64), (80, 80), (96, 96), (128, 96)], ids=["D64", "D80", "D96", "D128rot96"]
)
def test_dense_gqa_forward_and_gradients(head_dim, rotary_dim, seq):
    table = make_table(head_dim, rotary_dim=rotary_dim)
    q, k = _randn(2, 6, seq, head_dim), _randn(2, 2, seq, head_dim)
    _check(q, k, table)


def test_partial_rotary_passes_channels_through():
    table = make_table(128, rotary_dim=96)
    q, k = _randn(1, 2, 40, 128, requires_grad=False), _randn(1, 2, 40, 128, requires_grad=False)
    q_rot, k_rot = lr2.apply_rope(q, k, table, backend="triton")
    assert torch.equal(q_rot[..., 96:], q[..., 96:]) and torch.equal(k_rot[..., 96:], k[..., 96:])


def test_explicit_positions_batch_rule_and_chunks():
    table = make_table(64)
    q, k = _randn(2, 2, 20, 64), _randn(2, 1, 20, 64)
    rows = torch.stack([torch.arange(5, 25), torch.arange(90, 110)]).to(DEVICE)  # max 109 > L0: long for both
    _check(q, k, table, position_ids=rows)
    _check(q, k, table, position_ids=rows[:1] + 20)  # [1, L], 25..44: short
    _check(q, k, table, position_ids=torch.arange(50, 70, device=DEVICE))  # [L] crossing L0: long


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_long_override(long):
    table = make_table(64)
    q, k = _randn(1, 3, 100 if not long else 30, 64), _randn(1, 1, 100 if not long else 30, 64)
    _check(q, k, table, long=long)  # forced short past L0 / forced long below it


def _cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def test_varlen_each_sequence_its_own_table():
    lengths = [1, 63, 100, 30, 65]  # L0 = 64: short, short, long, short, long
    table = make_table(80)
    q, k = _randn(sum(lengths), 6, 80), _randn(sum(lengths), 2, 80)
    cu_seqlens = _cu_seqlens(lengths)
    _check(q, k, table, cu_seqlens=cu_seqlens)
    # Per sequence, not per batch: the short sequences keep the short table although the batch crosses L0.
    q_rot, _ = lr2.apply_rope(q, k, table, cu_seqlens=cu_seqlens, backend="triton")
    short, _ = reference.apply_rope(q[1:64].double(), k[1:64].double(), table, long=False, cu_seqlens=_cu_seqlens([63]))
    torch.testing.assert_close(q_rot[1:64].double(), short, atol=TOL, rtol=TOL)


def test_varlen_explicit_positions_nonzero_starts():
    # Packed chunks: sequences continue at 10, 50 (crossing L0 = 64) and 200.
    lengths = [20, 30, 17]
    table = make_table(128, rotary_dim=96)
    position_ids = torch.cat([torch.arange(10, 30), torch.arange(50, 80), torch.arange(200, 217)]).to(DEVICE)
    q, k = _randn(sum(lengths), 4, 128), _randn(sum(lengths), 2, 128)
    _check(q, k, table, position_ids=position_ids, cu_seqlens=_cu_seqlens(lengths))


def test_varlen_empty_sequence_and_long_override():
    table = make_table(64)
    lengths = [5, 0, 70]
    q, k = _randn(sum(lengths), 2, 64), _randn(sum(lengths), 2, 64)
    _check(q, k, table, cu_seqlens=_cu_seqlens(lengths))
    _check(q, k, table, cu_seqlens=_cu_seqlens(lengths), long=True)


def test_non_contiguous_inputs_and_single_gradient():
    # [B, L, H, D] storage viewed as [B, H, L, D], as the output of a q/k projection is.
    table = make_table(64)
    q = torch.randn(2, 30, 4, 64, device=DEVICE).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 30, 2, 64, device=DEVICE).transpose(1, 2).requires_grad_()
    _check(q, k, table)
    q_rot, k_rot = lr2.apply_rope(q, k, table, backend="triton")
    (grad_k,) = torch.autograd.grad(k_rot.sum(), k)  # q's gradient is never asked for
    k64 = k.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference.apply_rope(q.detach().double(), k64, table)[1].sum(), k64)
    torch.testing.assert_close(grad_k.double(), want, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_fp16_within_twice_the_torch_backend(varlen):
    table = make_table(96, rotary_dim=64)
    shape_q, shape_k = ((150, 6, 96), (150, 2, 96)) if varlen else ((1, 6, 100, 96), (1, 2, 100, 96))
    kwargs = dict(cu_seqlens=_cu_seqlens([50, 100])) if varlen else {}
    q, k = _randn(*shape_q, requires_grad=False), _randn(*shape_k, requires_grad=False)
    exact = reference.apply_rope(q.double(), k.double(), table, **kwargs)
    q16, k16 = q.half(), k.half()
    ours = lr2.apply_rope(q16, k16, table, backend="triton", **kwargs)
    torch_out = lr2.apply_rope(q16, k16, table, backend="torch", **kwargs)
    for got, base, want in zip(ours, torch_out, exact):
        assert got.dtype == torch.float16
        our_err = (got.double() - want).abs().max().item()
        torch_err = (base.double() - want).abs().max().item()
        assert our_err <= 2 * torch_err, (our_err, torch_err)


# ------------------------------------------------------------------------------------------------ rerotate
@pytest.mark.parametrize("from_long,to_long", [(False, True), (True, False)], ids=["short2long", "long2short"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 96)], ids=["D64", "D128rot96"])
def test_rerotate_dense_equals_rotating_pre_rope_keys(from_long, to_long, head_dim, rotary_dim):
    table = make_table(head_dim, rotary_dim=rotary_dim)
    k_pre = torch.randn(2, 3, 100, head_dim, dtype=torch.float64, device=DEVICE)
    for position_ids in (torch.arange(100, device=DEVICE), torch.arange(200, device=DEVICE).view(2, 100)):
        _, k_from = reference.apply_rope(k_pre, k_pre, table, position_ids, long=from_long)
        _, k_to = reference.apply_rope(k_pre, k_pre, table, position_ids, long=to_long)
        moved = lr2.rerotate(k_from.float(), table, position_ids, from_long, to_long, backend="triton")
        assert moved.dtype == torch.float32
        # fp32 cos/sin lie on the circle only to ~1e-7: that bounds any one-pass rerotation.
        torch.testing.assert_close(moved.double(), k_to, atol=4e-6, rtol=0)


@pytest.mark.parametrize("from_long,to_long", [(False, True), (True, False)], ids=["short2long", "long2short"])
def test_rerotate_token_layout_and_gradient(from_long, to_long):
    table = make_table(80)
    k_pre = torch.randn(57, 2, 80, dtype=torch.float64, device=DEVICE)
    position_ids = torch.cat([torch.arange(7, 27), torch.arange(90, 127)]).to(DEVICE)  # [T], nonzero starts
    one_seq = _cu_seqlens([57])
    _, k_from = reference.apply_rope(k_pre, k_pre, table, position_ids, long=from_long, cu_seqlens=one_seq)
    _, k_to = reference.apply_rope(k_pre, k_pre, table, position_ids, long=to_long, cu_seqlens=one_seq)
    k_in = k_from.float().requires_grad_()
    moved = lr2.rerotate(k_in, table, position_ids, from_long, to_long, backend="triton")
    torch.testing.assert_close(moved.double(), k_to, atol=4e-6, rtol=0)
    grad = torch.randn_like(moved)
    (got,) = torch.autograd.grad(moved, k_in, grad)
    k64 = k_from.detach().requires_grad_()
    (want,) = torch.autograd.grad(reference.rerotate(k64, table, position_ids, from_long, to_long), k64, grad.double())
    torch.testing.assert_close(got.double(), want, atol=TOL, rtol=TOL)


def test_rerotate_fp16_and_same_table():
    table = make_table(64)
    k_pre = torch.randn(1, 2, 100, 64, dtype=torch.float64, device=DEVICE)
    position_ids = torch.arange(100, device=DEVICE)
    _, k_short = reference.apply_rope(k_pre, k_pre, table, position_ids, long=False)
    _, k_long = reference.apply_rope(k_pre, k_pre, table, position_ids, long=True)
    moved = lr2.rerotate(k_short.half(), table, position_ids, False, True, backend="triton")
    assert moved.dtype == torch.float16
    # Error: the input rounding, carried through a rotation, plus one output rounding.
    bound = 2 * torch.finfo(torch.float16).eps * k_long.abs().max().item()
    assert (moved.double() - k_long).abs().max().item() <= bound
    same = lr2.rerotate(k_long.float(), table, position_ids, True, True, backend="triton")
    assert torch.equal(same, k_long.float())
