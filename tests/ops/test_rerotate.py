"""rerotate: POST-RoPE keys moved between tables equal the pre-RoPE keys rotated with the target table."""

from __future__ import annotations

import pytest
import torch

import lr2kernels as lr2
from lr2kernels import reference
from tests.ops.conftest import make_table


@pytest.mark.parametrize("from_long,to_long", [(False, True), (True, False), (True, True)], ids=lambda x: str(x))
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 96)], ids=["D64", "D128rot96"])
def test_dense_rerotate_equals_rotating_pre_rope_keys(from_long, to_long, head_dim, rotary_dim):
    table = make_table(head_dim, rotary_dim=rotary_dim)
    k_pre = torch.randn(2, 3, 300, head_dim, dtype=torch.float64)
    position_ids = torch.arange(300)
    _, k_from = reference.apply_rope(k_pre, k_pre, table, position_ids, long=from_long)
    _, k_to = reference.apply_rope(k_pre, k_pre, table, position_ids, long=to_long)
    moved = lr2.rerotate(k_from.float(), table, position_ids, from_long, to_long)
    torch.testing.assert_close(moved.double(), k_to, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(reference.rerotate(k_from, table, position_ids, from_long, to_long), k_to)


def test_varlen_layout_and_batched_positions():
    table = make_table(64)
    k_pre = torch.randn(50, 2, 64, dtype=torch.float64)
    position_ids = torch.cat([torch.arange(20), torch.arange(100, 130)])
    _, k_short = reference.apply_rope(k_pre, k_pre, table, position_ids, long=False, cu_seqlens=torch.tensor([0, 50]))
    _, k_long = reference.apply_rope(k_pre, k_pre, table, position_ids, long=True, cu_seqlens=torch.tensor([0, 50]))
    # fp32 cos/sin lie on the circle only to ~1e-7: that bounds any one-pass rerotation.
    torch.testing.assert_close(lr2.rerotate(k_short, table, position_ids, False, True), k_long, atol=4e-6, rtol=0)

    k_dense = torch.randn(2, 2, 10, 64, dtype=torch.float64)
    position_ids = torch.stack([torch.arange(10), torch.arange(70, 80)])
    _, short = reference.apply_rope(k_dense, k_dense, table, position_ids, long=False)
    _, long = reference.apply_rope(k_dense, k_dense, table, position_ids, long=True)
    torch.testing.assert_close(lr2.rerotate(short, table, position_ids, False, True), long, atol=4e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_one_rounding(dtype):
    table = make_table(64)
    k_pre = torch.randn(1, 2, 200, 64, dtype=torch.float64)
    position_ids = torch.arange(200)
    _, k_short = reference.apply_rope(k_pre, k_pre, table, position_ids, long=False)
    _, k_long = reference.apply_rope(k_pre, k_pre, table, position_ids, long=True)
    moved = lr2.rerotate(k_short.to(dtype), table, position_ids, False, True)
    assert moved.dtype == dtype
    # Error: the input rounding, carried through a rotation, plus one output rounding.
    bound = 2 * torch.finfo(dtype).eps * k_long.abs().max().item()
    assert (moved.double() - k_long).abs().max().item() <= bound
