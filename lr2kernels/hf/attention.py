"""The attention function a patched model runs: RoPE applied at attention time, on PRE-RoPE q and keys.

It is registered in transformers' ``AttentionInterface`` under :data:`ATTENTION_NAME`. A patched model's rotary
module returns the identity rotation (cos 1, sin 0), so its attention layers hand this function PRE-RoPE queries and
store PRE-RoPE keys in the KV cache; this function rotates both with the table the whole sequence needs now. That
is why crossing L0 during generation costs nothing: the next step simply rotates with the long table.

Which table: HF's rule, for the whole batch: long iff max(position_ids) + 1 > L0, i.e. what a full forward over
the sequence so far would use. Fast paths: no mask (causal, no padding) -> the fused ``rope_attention`` (prefill,
training) or ``rope_decode`` (cached steps). Anything else (padding masks, sliding windows, dropout, static caches)
-> rotate with the table, then transformers' own SDPA attention with its mask.
"""

from __future__ import annotations

import torch

from lr2kernels import reference
from lr2kernels.ops import rope_attention, rope_decode
from lr2kernels.tables import RopeTable

ATTENTION_NAME = "lr2kernels"


def _key_positions(position_ids: torch.Tensor, num_keys: int) -> torch.Tensor:
    """``[B, T]`` positions of the cached keys, from the queries' positions ``[B, L]``.

    The newest query sits at cache index T - 1; a row whose position there is lower (left padding) is shifted by
    the difference. Padding slots get negative positions, clamped to 0: the mask hides them anyway.
    """
    offset = (num_keys - 1) - position_ids[:, -1:]  # [B, 1]
    return (torch.arange(num_keys, device=position_ids.device)[None, :] - offset).clamp_min(0)


def _rotate(x: torch.Tensor, table: RopeTable, positions: torch.Tensor, long: bool) -> torch.Tensor:
    cos, sin = table.cos_sin(positions, long=long)  # [B, L, rotary_dim] fp32
    return reference.rotate(x, cos[:, None].to(x.dtype), sin[:, None].to(x.dtype))


def rope_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface signature. query ``[B, Hq, L, D]``, key/value ``[B, Hk, T, D]`` (pre-RoPE,
    T = cached + new). Returns ``([B, L, Hq, D], None)``."""
    table: RopeTable = module._lr2_table
    backend: str | None = module._lr2_backend
    batch, _, num_queries, _ = query.shape
    num_keys = key.shape[2]
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(num_keys - num_queries, num_keys, device=query.device)[None]
    position_ids = position_ids.expand(batch, num_queries)
    last_positions = position_ids[:, -1].tolist()
    long = table.use_long(max(last_positions) + 1)
    plain = (
        attention_mask is None
        and (dropout == 0.0 or not module.training)
        and (sliding_window is None or sliding_window >= num_keys)
        and all(p == num_keys - 1 for p in last_positions)  # keys sit at 0..T-1
        and getattr(module, "is_causal", True)
    )
    if plain and num_queries == num_keys:
        out = rope_attention(
            query, key, value, table, position_ids=position_ids, softmax_scale=scaling, long=long, backend=backend
        )
        return out.transpose(1, 2), None
    if plain:
        cache_seqlens = torch.full((batch,), num_keys, dtype=torch.int32, device=query.device)
        out = rope_decode(query, key, value, cache_seqlens, table, backend=backend, softmax_scale=scaling)
        return out.transpose(1, 2), None

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query = _rotate(query, table, position_ids, long)
    key = _rotate(key, table, _key_positions(position_ids, num_keys), long)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, sliding_window=sliding_window,
        **kwargs,
    )  # fmt: skip
