"""rerotate on every backend: POST-RoPE keys moved between tables equal the pre-RoPE keys rotated with the target
table (reference.apply_rope in fp64), and the gradient is autograd's through reference.rerotate.

Floating outputs allocated with ``torch.empty``/``torch.empty_like`` start as NaN (the ``nan_empty`` fixture).
"""

from __future__ import annotations

import pytest
import torch

import lr2kernels as lr2
from lr2kernels import reference
from tests.ops.helpers import DEVICE, cu_seqlens_of, dtype_id, make_table, requires_triton, run, tolerance

pytestmark = pytest.mark.usefixtures("nan_empty")
DIRECTIONS = [(False, True), (True, False), (True, True)]
DIRECTION_IDS = ["short2long", "long2short", "long2long"]


def _keys(k_pre, table, position_ids, long, cu_seqlens=None):
    """k_pre rotated with one table by the fp64 reference: POST-RoPE keys."""
    return reference.apply_rope(k_pre, k_pre, table, position_ids, long=long, cu_seqlens=cu_seqlens)[1]


@pytest.mark.parametrize("from_long,to_long", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 96)], ids=["D64", "D128rot96"])
def test_dense_rerotate_equals_rotating_pre_rope_keys(backend, from_long, to_long, head_dim, rotary_dim):
    table = make_table(head_dim, rotary_dim=rotary_dim)
    k_pre = torch.randn(2, 3, 100, head_dim, dtype=torch.float64, device=DEVICE)
    for position_ids in (torch.arange(100, device=DEVICE), torch.arange(200, device=DEVICE).view(2, 100)):
        k_from, k_to = _keys(k_pre, table, position_ids, from_long), _keys(k_pre, table, position_ids, to_long)
        moved = run(backend, lr2.rerotate, k_from.float(), table, position_ids=position_ids, from_long=from_long,
                    to_long=to_long)  # fmt: skip
        assert moved.dtype == torch.float32 and moved.shape == k_from.shape
        torch.testing.assert_close(moved.double(), k_to, **tolerance(backend, torch.float32, "rerotate"))
        torch.testing.assert_close(reference.rerotate(k_from, table, position_ids, from_long, to_long), k_to)


@pytest.mark.parametrize("from_long,to_long", DIRECTIONS[:2], ids=DIRECTION_IDS[:2])
def test_token_layout_and_gradient(backend, from_long, to_long):
    table = make_table(80)
    k_pre = torch.randn(57, 2, 80, dtype=torch.float64, device=DEVICE)
    position_ids = torch.cat([torch.arange(7, 27), torch.arange(90, 127)]).to(DEVICE)  # [T], nonzero starts
    one_seq = cu_seqlens_of([57])
    k_from = _keys(k_pre, table, position_ids, from_long, one_seq)
    k_to = _keys(k_pre, table, position_ids, to_long, one_seq)
    k_in = k_from.float().requires_grad_()
    moved = run(backend, lr2.rerotate, k_in, table, position_ids=position_ids, from_long=from_long, to_long=to_long)
    torch.testing.assert_close(moved.double(), k_to, **tolerance(backend, torch.float32, "rerotate"))
    grad = torch.randn_like(moved)
    (got,) = torch.autograd.grad(moved, k_in, grad)
    k64 = k_from.detach().requires_grad_()
    (want,) = torch.autograd.grad(reference.rerotate(k64, table, position_ids, from_long, to_long), k64, grad.double())
    torch.testing.assert_close(got.double(), want, **tolerance(backend, torch.float32, "rope"))


def test_fp64_varlen_layout_and_batched_positions(backend):
    table = make_table(64)
    k_pre = torch.randn(50, 2, 64, dtype=torch.float64, device=DEVICE)
    position_ids = torch.cat([torch.arange(20), torch.arange(100, 130)]).to(DEVICE)
    k_short = _keys(k_pre, table, position_ids, False, cu_seqlens_of([50]))
    k_long = _keys(k_pre, table, position_ids, True, cu_seqlens_of([50]))
    moved = run(backend, lr2.rerotate, k_short, table, position_ids=position_ids, from_long=False, to_long=True)
    # fp32 cos/sin lie on the circle only to ~1e-7: that bounds any one-pass rerotation.
    torch.testing.assert_close(moved, k_long, atol=4e-6, rtol=0)

    k_dense = torch.randn(2, 2, 10, 64, dtype=torch.float64, device=DEVICE)
    position_ids = torch.stack([torch.arange(10), torch.arange(70, 80)]).to(DEVICE)
    short, long = _keys(k_dense, table, position_ids, False), _keys(k_dense, table, position_ids, True)
    moved = run(backend, lr2.rerotate, short, table, position_ids=position_ids, from_long=False, to_long=True)
    torch.testing.assert_close(moved, long, atol=4e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_low_precision_one_rounding(backend, dtype):
    table = make_table(64)
    k_pre = torch.randn(1, 2, 200, 64, dtype=torch.float64, device=DEVICE)
    position_ids = torch.arange(200, device=DEVICE)
    k_short, k_long = _keys(k_pre, table, position_ids, False), _keys(k_pre, table, position_ids, True)
    moved = run(backend, lr2.rerotate, k_short.to(dtype), table, position_ids=position_ids, from_long=False,
                to_long=True)  # fmt: skip
    assert moved.dtype == dtype
    # Error: the input rounding, carried through a rotation, plus one output rounding.
    bound = 2 * torch.finfo(dtype).eps * k_long.abs().max().item()
    assert (moved.double() - k_long).abs().max().item() <= bound


# -------------------------------------------------------------------------------------------- triton only
@requires_triton
def test_triton_same_table_returns_the_keys_unchanged():
    table = make_table(64)
    k_pre = torch.randn(1, 2, 100, 64, dtype=torch.float64, device=DEVICE)
    position_ids = torch.arange(100, device=DEVICE)
    k_long = _keys(k_pre, table, position_ids, True).float()
    same = lr2.rerotate(k_long, table, position_ids=position_ids, from_long=True, to_long=True, backend="triton")
    assert torch.equal(same, k_long)
