"""The attention function a patched model runs: RoPE applied at attention time, on PRE-RoPE q and keys.

It is registered in transformers' ``AttentionInterface`` under :data:`ATTENTION_NAME`. A patched model's rotary
module returns the identity rotation (cos 1, sin 0), so its attention layers hand this function PRE-RoPE queries and
store PRE-RoPE keys in the KV cache; this function rotates both with the table the whole sequence needs now. That
is why crossing L0 during generation costs nothing: the next step simply rotates with the long table.

Which table: by default HF's rule, for the whole batch: long iff max(position_ids) + 1 > L0, i.e. what a full
forward over the sequence so far would use; or, with ``patch(model, rule="position")``, each token by its own
position (see :func:`rope_attention_forward`). Fast paths: no mask (causal, no padding) -> the fused
``rope_attention`` (prefill, training) or ``rope_decode`` (cached steps). Anything else (padding masks, sliding
windows, dropout, static caches) -> rotate with the table, then transformers' own SDPA attention with its mask.
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


def _attend(module, query, key, value, attention_mask, scaling, dropout, sliding_window, position_ids, long, kwargs):
    """Attention with every query and key rotated with one table (``long``): fused when the call allows it."""
    table: RopeTable = module._lr2_table
    backend: str | None = module._lr2_backend
    batch, _, num_queries, _ = query.shape
    num_keys = key.shape[2]
    plain = (
        attention_mask is None
        and (dropout == 0.0 or not module.training)
        and (sliding_window is None or sliding_window >= num_keys)
        and bool((position_ids[:, -1] == num_keys - 1).all())  # keys sit at 0..T-1
        and getattr(module, "is_causal", True)
    )
    if plain and num_queries == num_keys:
        out = rope_attention(
            query, key, value, table, position_ids=position_ids, softmax_scale=scaling, long=long, backend=backend
        )
        return out.transpose(1, 2)
    if plain and long == table.use_long(num_keys):  # rope_decode picks the table from the length itself
        cache_seqlens = torch.full((batch,), num_keys, dtype=torch.int32, device=query.device)
        out = rope_decode(query, key, value, cache_seqlens, table, backend=backend, softmax_scale=scaling)
        return out.transpose(1, 2)

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query = _rotate(query, table, position_ids, long)
    key = _rotate(key, table, _key_positions(position_ids, num_keys), long)
    out, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, sliding_window=sliding_window,
        position_ids=position_ids, **kwargs,
    )  # fmt: skip
    return out


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
    T = cached + new). Returns ``([B, L, Hq, D], None)``.

    The table follows the patch's rule: ``"hf"``: one table for the whole batch, long iff max(position) + 1 > L0;
    ``"position"``: each query token uses the table of its own position (long iff position + 1 > L0), with every
    key it sees rotated the same way, so a full forward computes each token exactly as incremental decoding does.
    """
    table: RopeTable = module._lr2_table
    batch, _, num_queries, _ = query.shape
    num_keys = key.shape[2]
    position_ids = kwargs.pop("position_ids", None)
    if position_ids is None:
        position_ids = torch.arange(num_keys - num_queries, num_keys, device=query.device)[None]
    position_ids = position_ids.expand(batch, num_queries)
    args = (module, query, key, value, attention_mask, scaling, dropout, sliding_window, position_ids)
    l0 = table.original_max_position
    if module._lr2_rule == "hf":
        return _attend(*args, table.use_long(int(position_ids.max()) + 1), kwargs), None
    row_is_long = position_ids + 1 > l0  # [B, L]
    if bool(row_is_long.all()) or not bool(row_is_long.any()):
        return _attend(*args, bool(row_is_long[0, 0]), kwargs), None
    # Queries on both sides of L0 (a prefill or chunk that crosses it): both tables, then each row its own.
    short, long = _attend(*args, False, kwargs), _attend(*args, True, kwargs)  # [B, L, Hq, D]
    return torch.where(row_is_long[:, :, None, None], long, short), None
