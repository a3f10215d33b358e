"""The attention function a patched model runs: RoPE applied at attention time, on PRE-RoPE q and keys.

It is registered in transformers' ``AttentionInterface`` under :data:`ATTENTION_NAME`. A patched model's rotary
module returns the identity rotation (cos 1, sin 0), so its attention layers hand this function PRE-RoPE queries and
store PRE-RoPE keys in the KV cache; this function rotates both, each at its own position (known from
:mod:`lr2kernels.hf.positions`, never inferred), with the table the sequence needs now.

Which table: by default HF's rule, for the whole batch: long iff max(position_ids) + 1 > L0, i.e. what a full
forward over the sequence so far uses; or, with ``patch(model, rule="position")``, each token by its own position
(see :func:`rope_attention_forward`). Packed rows (positions restarting at 0 inside a row, no mask) use one table
per sequence, by that sequence's length, as each sequence run alone would.

Paths: no mask, keys at 0..T-1 -> the fused ``rope_attention`` (prefill, training) or ``rope_decode`` (cached
steps; where that would run on the torch backend, i.e. on the CPU, the layer's rotated-key copy of
:mod:`lr2kernels.hf.rotated_keys` instead, so a step rotates only its new keys); packed rows -> the fused varlen
``rope_attention``; attention maps requested from a model whose implementation is eager -> rotate, then
transformers' eager attention (which returns the maps); anything else (padding, masks with holes, static and
sliding caches, dropout) -> rotate, then transformers' SDPA with its mask. Continuous batching (a flattened batch on
a PRE-RoPE ``PagedAttentionCache``) -> :func:`lr2kernels.hf.serving.paged_attention`, which routes each request to
the fused varlen ``rope_attention`` (no past) or ``rope_decode`` (a past).
"""

from __future__ import annotations

import sys

import torch

from lr2kernels.hf import rotated_keys, serving
from lr2kernels.hf.positions import ForwardFacts
from lr2kernels.ops import dispatch, rope_attention, rope_decode, rotary
from lr2kernels.ops.torch_backend import one_query_attention
from lr2kernels.tables import RopeTable

ATTENTION_NAME = "lr2kernels"


def _rotate(x: torch.Tensor, table: RopeTable, positions: torch.Tensor, long) -> torch.Tensor:
    """x ``[B, H, L, D]`` rotated at positions ``[B, L]``; ``long``: a bool, or ``[B, L]`` bools per token."""
    cos, sin = rotary.token_cos_sin(table, positions, long, x.dtype)  # [B, L, rotary_dim]
    return rotary.rotate(x, cos[:, None], sin[:, None])


def _maps_requested() -> bool:
    """Whether the running forward collects attention maps (``output_attentions=True``)."""
    global _ACTIVE_COLLECTOR
    if _ACTIVE_COLLECTOR is None:
        try:
            from transformers.utils.output_capturing import _active_collector as _ACTIVE_COLLECTOR
        except ImportError:  # pragma: no cover - older layouts: maps are then never computed here
            return False
    collected = _ACTIVE_COLLECTOR.get()
    return bool(collected) and "attentions" in collected


_ACTIVE_COLLECTOR = None  # transformers' context variable of the outputs a forward collects (imported on first use)


def _eager_attention(module):
    """The eager attention of the module's own modeling file (it returns the maps), or transformers' generic one."""
    found = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if found is None:  # pragma: no cover - every supported architecture defines one
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as found
    return found


def _attend(state, module, query, key, value, attention_mask, scaling, dropout, sliding_window, facts, long, kwargs):
    """Attention with queries and keys rotated at their positions with table ``long`` (a bool, or per token)."""
    table: RopeTable = state.table
    backend: str | None = state.backend
    batch, _, num_queries, _ = query.shape
    num_keys = key.shape[2]
    queries = facts.queries
    wants_maps = _maps_requested() and state.config._attn_implementation == "eager"
    fusable = (
        not wants_maps
        and (dropout == 0.0 or not module.training)
        and getattr(module, "is_causal", True)
        and isinstance(long, bool) == (facts.segments is None)
    )
    if fusable and facts.segments is not None and (sliding_window is None or sliding_window >= facts.max_segment):
        # Packed rows: [B, H, L, D] -> [B*L, H, D] tokens, one table per sequence (by its length).
        flat = [t.transpose(1, 2).reshape(batch * num_queries, t.shape[1], t.shape[3]) for t in (query, key, value)]
        out = rope_attention(
            *flat, table, cu_seqlens=facts.segments, max_seqlen=facts.max_segment, softmax_scale=scaling,
            backend=backend,
        )  # fmt: skip
        return out.view(batch, num_queries, *out.shape[1:]), None
    plain = (
        fusable
        and attention_mask is None
        and (sliding_window is None or sliding_window >= num_keys)
        and facts.keys_at_arange
        and num_keys == facts.total
    )
    if plain and num_queries == num_keys:
        layer = _layer_with_rotated_keys(state, module, "rope_attention", query, key, facts)
        if layer is not None:  # a prefill into a cache: its rotated keys become the layer's copy
            return _attend_on_rotated_keys(layer, query, key, value, table, long, scaling, facts)
        out = rope_attention(
            query, key, value, table, position_ids=queries, softmax_scale=scaling, long=long, backend=backend
        )
        return out.transpose(1, 2), None
    if plain and long == table.use_long(num_keys):  # rope_decode picks the table from the length itself
        layer = _layer_with_rotated_keys(state, module, "rope_decode", query, key, facts)
        if layer is not None:
            return _attend_on_rotated_keys(layer, query, key, value, table, long, scaling, facts)
        cache_seqlens = torch.full((batch,), num_keys, dtype=torch.int32, device=query.device)
        out = rope_decode(query, key, value, table, cache_seqlens=cache_seqlens, softmax_scale=scaling, backend=backend)
        return out.transpose(1, 2), None

    query = _rotate(query, table, queries, long)
    key = _rotate(key, table, facts.key_positions(num_keys), long)  # packed rows: keys are the queries
    if wants_maps:
        return _eager_attention(module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, sliding_window=sliding_window,
        **kwargs,
    )  # fmt: skip


def _layer_with_rotated_keys(state, module, op: str, query: torch.Tensor, key: torch.Tensor, facts: ForwardFacts):
    """The cache layer to keep rotated keys for (see :mod:`lr2kernels.hf.rotated_keys`), or None: only where ``op``
    (``"rope_attention"`` for a prefill, ``"rope_decode"`` for a step) would run on the torch backend (the fused
    kernels rotate in registers) and the patch allows it."""
    if not state.rotated_key_cache or query.requires_grad:
        return None
    if dispatch.backend_name(op, query.device, query.dtype, query.shape[-1], state.backend) != "torch":
        return None
    return rotated_keys.usable_layer(facts.cache, getattr(module, "layer_idx", None), key)


def _attend_on_rotated_keys(
    layer, query, key, value, table: RopeTable, long: bool, scaling, facts: ForwardFacts
) -> tuple[torch.Tensor, None]:
    """What the torch backend's ``rope_decode`` (or, for a prefill, n = T, its ``rope_attention``) computes for n
    new queries at the end of keys at 0..T-1 (the same numbers), with the cached keys' rotation kept from step to
    step. query ``[B, Hq, n, D]``, key/value ``[B, Hk, T, D]``; returns ``([B, n, Hq, D], None)``."""
    num_new, num_keys = query.shape[2], key.shape[2]
    memo_key = ("decode rows", id(table), long, query.dtype, num_new, num_keys)
    new_rows = facts.memo.get(memo_key)
    if new_rows is None:  # once per forward: every layer rotates the same positions
        cos, sin = (c[num_keys - num_new :].to(query.dtype) for c in table._cos_sin_prefix(long, num_keys, key.device))
        full_width = cos.shape[-1] == query.shape[-1]
        new_rows = facts.memo[memo_key] = (cos, sin, rotary.signed_sin(sin) if full_width else None)
    query, keys = rotated_keys.rotate_for_decode(layer, query, key, table, long, new_rows)  # [B,Hq,n,D], [B,Hk,T,D]
    if num_new == 1:
        return one_query_attention(query, keys, value, scaling).transpose(1, 2), None
    gqa = query.shape[1] != keys.shape[1]
    if num_new == num_keys:  # a prefill: plain causal attention, as the torch backend's rope_attention runs it
        out = torch.nn.functional.scaled_dot_product_attention(query, keys, value, is_causal=True, scale=scaling,
                                                               enable_gqa=gqa)  # fmt: skip
        return out.transpose(1, 2), None
    mask = torch.ones(num_new, num_keys, dtype=torch.bool, device=query.device).tril(num_keys - num_new)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, keys, value, attn_mask=mask, scale=scaling, enable_gqa=gqa
    )  # fmt: skip  causal among the new queries: query i sees keys 0..T-n+i
    return out.transpose(1, 2), None


def _unpatched(module, query, key, value, attention_mask, **kwargs):
    """A module that was not patched reached this function: it was built from a config that names it (a patched
    model's private attention config). Its rotary module is stock, so q and k are rotated: run SDPA as stock."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention-interface signature. query ``[B, Hq, L, D]``, key/value ``[B, Hk, T, D]`` (pre-RoPE,
    T key slots: cached + new, a static buffer, or a sliding window). Returns ``([B, L, Hq, D], maps or None)``.

    The table follows the patch's rule: ``"hf"``: one table for the whole batch, long iff max(position) + 1 > L0;
    ``"position"``: each query token uses the table of its own position (long iff position + 1 > L0), with every
    key it sees rotated the same way, so a full forward computes each token exactly as incremental decoding does.
    """
    state = getattr(module, "_lr2_patch", None)  # the model's PatchedModel (lr2kernels.hf.patch)
    facts: ForwardFacts | None = None if state is None else state.tracker.facts
    if state is None or facts is None or facts.queries.shape != query.shape[::2]:
        if state is not None:
            raise RuntimeError(
                "lr2kernels: a patched attention layer ran outside its model's forward (positions unknown); call the "
                "model, not its layers"
            )
        return _unpatched(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    kwargs.pop("position_ids", None)
    if facts.paged is not None:  # continuous batching: a flattened batch on a PRE-RoPE paged cache
        return serving.paged_attention(state, module, query, key, value, scaling, facts, kwargs)
    table: RopeTable = state.table
    args = (state, module, query, key, value, attention_mask, scaling, dropout, sliding_window, facts)
    if facts.segments is not None and state.rule == "hf":
        is_long = facts.segment_length_of_token() > table.original_max_position  # [B, L]: each sequence its own
        return _attend(*args, is_long, kwargs)
    if state.rule == "hf":
        return _attend(*args, table.use_long(facts.max_position + 1), kwargs)
    if table.use_long(facts.min_position + 1) or not table.use_long(facts.max_position + 1):
        return _attend(*args, table.use_long(facts.max_position + 1), kwargs)  # one table for every query
    # Queries on both sides of L0 (a prefill or chunk that crosses it): both tables, then each row its own.
    row_is_long = facts.queries + 1 > table.original_max_position  # [B, L]
    (short, short_maps), (long, long_maps) = _attend(*args, False, kwargs), _attend(*args, True, kwargs)
    out = torch.where(row_is_long[:, :, None, None], long, short)  # [B, L, Hq, D]
    maps = None if short_maps is None else torch.where(row_is_long[:, None, :, None], long_maps, short_maps)
    return out, maps
