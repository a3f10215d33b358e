"""Shared helpers for the op tests: tables whose short and long halves differ, and an independent HF-based oracle."""

from __future__ import annotations

import math

import pytest
import torch

from lr2kernels.tables import RopeTable

L0 = 64  # small original length so that the odd test lengths (63, 100, 257) straddle it


def make_table(head_dim: int, rotary_dim: int | None = None, original_max_position: int = L0) -> RopeTable:
    """A LongRoPE table with a non-trivial long table and attention factor (short != long everywhere but dim 0)."""
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    half = rotary_dim // 2
    long_factor = [1.0 + 7.0 * (i / max(half - 1, 1)) ** 1.5 for i in range(half)]
    short_factor = [1.0 + 0.1 * i / half for i in range(half)]
    return RopeTable.longrope(
        head_dim=head_dim,
        base=10000.0,
        original_max_position=original_max_position,
        max_position=8 * original_max_position,
        short_factor=short_factor,
        long_factor=long_factor,
        rotary_dim=rotary_dim,
    )


def hf_rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' own rotation (Phi3's, which handles partial rotary); q, k ``[B, H, L, D]``, cos ``[B, L, r]``."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def naive_attention(q, k, v, causal: bool, scale: float | None = None, query_offset: int = 0):
    """softmax(q k^T * scale) v with HF's repeat_kv for GQA; ``[B, H, L, D]``; query i sits at key query_offset+i."""
    from transformers.models.llama.modeling_llama import repeat_kv

    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if causal:
        lq, lk = scores.shape[-2:]
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=query_offset)
        scores = scores.masked_fill(~mask, -math.inf)
    return torch.softmax(scores, dim=-1) @ v


def hf_rope_attention(q, k, v, table: RopeTable, position_ids=None, causal=True, long=None):
    """Oracle for dense rope_attention: HF cos/sin + HF rotation + naive attention, all in q's dtype."""
    batch, _, seq, _ = q.shape
    if position_ids is None:
        position_ids = torch.arange(seq)
    position_ids = position_ids.expand(batch, seq) if position_ids.dim() == 1 else position_ids
    cos, sin = table.cos_sin(position_ids, long=long)
    q_rot, k_rot = hf_rotate(q, k, cos.to(q.dtype), sin.to(q.dtype))
    return naive_attention(q_rot, k_rot, v, causal)


# Tolerances of the torch backend vs the fp64 oracle, by dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2.5e-2, rtol=2.5e-2),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
