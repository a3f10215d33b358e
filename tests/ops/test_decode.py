"""rope_decode on a PRE-RoPE cache: equals the last rows of a full forward over each whole sequence."""

from __future__ import annotations

import pytest
import torch

import lr2kernels as lr2
from lr2kernels import reference
from tests.ops.conftest import TOLERANCES, hf_rope_attention, make_table


def _cache(batch, hk, max_len, head_dim, fill=float("nan")):
    # Slots past each sequence's length hold garbage on purpose: they must never be read.
    k_cache = torch.full((batch, hk, max_len, head_dim), fill)
    v_cache = torch.full((batch, hk, max_len, head_dim), fill)
    return k_cache, v_cache


@pytest.mark.parametrize("n_new", [1, 3], ids=lambda n: f"new{n}")
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)], ids=lambda h: f"H{h[0]}kv{h[1]}")
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 96)], ids=["D64", "D128rot96"])
def test_decode_equals_full_forward(n_new, heads, head_dim, rotary_dim):
    table = make_table(head_dim, rotary_dim=rotary_dim)
    hq, hk = heads
    lengths = [3, 64, 65, 120]  # both sides of L0 = 64, and exactly at it
    max_len = 128
    k_cache, v_cache = _cache(len(lengths), hk, max_len, head_dim)
    q = torch.randn(len(lengths), hq, n_new, head_dim)
    expected_rows = []
    for b, length in enumerate(lengths):
        # The whole sequence, pre-RoPE; the last n_new tokens are the new queries.
        q_full = torch.randn(1, hq, length, head_dim)
        q_full[0, :, -n_new:] = q[b]
        k_full, v_full = torch.randn(1, hk, length, head_dim), torch.randn(1, hk, length, head_dim)
        k_cache[b, :, :length], v_cache[b, :, :length] = k_full[0], v_full[0]
        full = hf_rope_attention(q_full.double(), k_full.double(), v_full.double(), table)  # HF rule on length
        expected_rows.append(full[0, :, -n_new:])
    expected = torch.stack(expected_rows)
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    out = lr2.rope_decode(q, k_cache, v_cache, cache_seqlens, table)
    assert out.shape == q.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32])
    ref = reference.rope_decode(q.double(), k_cache.double(), v_cache.double(), cache_seqlens, table)
    torch.testing.assert_close(ref, expected, **TOLERANCES[torch.float64])


def test_decode_across_the_boundary_needs_no_cache_rewrite():
    # Sequence at length L0, then one more token: the same pre-RoPE cache serves both steps.
    table = make_table(64)
    k_cache, v_cache = _cache(1, 2, 80, 64, fill=0.0)
    k_cache[0, :, :65], v_cache[0, :, :65] = torch.randn(2, 65, 64), torch.randn(2, 65, 64)
    q_step = torch.randn(1, 4, 1, 64)
    before = lr2.rope_decode(q_step, k_cache, v_cache, torch.tensor([64]), table)
    after = lr2.rope_decode(q_step, k_cache, v_cache, torch.tensor([65]), table)
    q_full = torch.randn(1, 4, 65, 64)
    q_full[0, :, 64] = q_step[0, :, 0]
    full = hf_rope_attention(q_full.double(), k_cache[:, :, :65].double(), v_cache[:, :, :65].double(), table)
    torch.testing.assert_close(after[0, :, 0].double(), full[0, :, 64], **TOLERANCES[torch.float32])
    assert (before - after).abs().max() > 1e-3


def test_decode_gradients_flow_to_q_and_cache():
    table = make_table(8, original_max_position=4)
    q = torch.randn(2, 2, 2, 8, dtype=torch.float64, requires_grad=True)
    k_cache = torch.randn(2, 1, 7, 8, dtype=torch.float64, requires_grad=True)
    v_cache = torch.randn(2, 1, 7, 8, dtype=torch.float64, requires_grad=True)
    cache_seqlens = torch.tensor([3, 7])
    assert torch.autograd.gradcheck(
        lambda q, k, v: lr2.rope_decode(q, k, v, cache_seqlens, table), (q, k_cache, v_cache)
    )
