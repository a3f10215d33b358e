"""The attention function a patched model runs: RoPE applied at attention time, on PRE-RoPE q and keys.

It is registered in transformers' ``AttentionInterface`` under :data:`ATTENTION_NAME`. A patched model's rotary
module returns the identity rotation (cos 1, sin 0), so its attention layers hand this function PRE-RoPE queries and
store PRE-RoPE keys in the KV cache; this function rotates both, each at its own position (known from
:mod:`lr2kernels.hf.positions`, never inferred), with the table the sequence needs now.

Which table: by default HF's rule, for the whole batch: long iff max(position_ids) + 1 > L0, i.e. what a full
forward over the sequence so far uses; or, with ``patch(model, rule="position")``, each token by its own position
(see :func:`rope_attention_forward`). Packed rows (positions restarting at 0 inside a row, no mask) use one table
per sequence, by that sequence's length, as each sequence run alone would.

How: the base model's forward pre-hook made the forward's :class:`lr2kernels.hf.plan.ForwardPlan` (tables, and the
route of each kind of layer: fused ``rope_attention`` / ``rope_decode``, the CPU rotated-key copy, varlen packed
rows, rotate + eager for attention maps, rotate + SDPA for anything else; see :mod:`lr2kernels.hf.plan`); this
function runs it. Continuous batching (a flattened batch on a PRE-RoPE ``PagedAttentionCache``) ->
:func:`lr2kernels.hf.serving.paged_attention`, which routes each request to the fused varlen ``rope_attention`` (no
past) or ``rope_decode`` (a past).
"""

from __future__ import annotations

import sys

import torch

from lr2kernels.hf import rotated_keys, serving
from lr2kernels.hf.plan import ForwardPlan, Route
from lr2kernels.hf.positions import ForwardFacts
from lr2kernels.ops import rope_attention, rope_decode, rotary
from lr2kernels.ops.torch_backend import one_query_attention
from lr2kernels.tables import RopeTable

ATTENTION_NAME = "lr2kernels"


def _rotate(x: torch.Tensor, table: RopeTable, positions: torch.Tensor, long) -> torch.Tensor:
    """x ``[B, H, L, D]`` rotated at positions ``[B, L]``; ``long``: a bool, or ``[B, L]`` bools per token."""
    cos, sin = rotary.token_cos_sin(table, positions, long, x.dtype)  # [B, L, rotary_dim]
    return rotary.rotate(x, cos[:, None], sin[:, None])


def _eager_attention(module):
    """The eager attention of the module's own modeling file (it returns the maps), or transformers' generic one."""
    found = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if found is None:  # pragma: no cover - every supported architecture defines one
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as found
    return found


def _run(plan: ForwardPlan, which: int, module, query, key, value, attention_mask, scaling, dropout, sliding_window,
         kwargs):  # fmt: skip
    """Run the layer's route of ``plan`` with table ``plan.longs[which]`` (a bool, or per token)."""
    table, backend, facts, long = plan.table, plan.backend, plan.facts, plan.longs[which]
    batch, _, num_queries, _ = query.shape
    num_keys = key.shape[2]
    run = plan.route(module, query, num_keys, attention_mask, dropout, sliding_window, which)
    if run.route is Route.PACKED:
        # Packed rows: [B, H, L, D] -> [B*L, H, D] tokens, one table per sequence (by its length).
        flat = [t.transpose(1, 2).reshape(batch * num_queries, t.shape[1], t.shape[3]) for t in (query, key, value)]
        out = rope_attention(
            *flat, table, cu_seqlens=facts.segments, max_seqlen=facts.max_segment, softmax_scale=scaling,
            backend=backend,
        )  # fmt: skip
        return out.view(batch, num_queries, *out.shape[1:]), None
    if run.route is Route.PREFILL or run.route is Route.DECODE:
        # The rotated-key copy where the plan says so and this layer's cache layer can keep one (a prefill into a
        # cache: its rotated keys become the layer's copy).
        layer = rotated_keys.usable_layer(facts.cache, getattr(module, "layer_idx", None), key) if run.rotated else None
        if layer is not None:
            return _attend_on_rotated_keys(layer, query, key, value, table, long, scaling, facts)
        if run.route is Route.PREFILL:
            out = rope_attention(
                query, key, value, table, position_ids=facts.queries, softmax_scale=scaling, long=long, backend=backend
            )
            return out.transpose(1, 2), None
        cache_seqlens = torch.full((batch,), num_keys, dtype=torch.int32, device=query.device)
        out = rope_decode(query, key, value, table, cache_seqlens=cache_seqlens, softmax_scale=scaling, backend=backend)
        return out.transpose(1, 2), None

    query = _rotate(query, table, facts.queries, long)
    key = _rotate(key, table, facts.key_positions(num_keys), long)  # packed rows: keys are the queries
    if run.route is Route.EAGER:
        return _eager_attention(module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, sliding_window=sliding_window,
        **kwargs,
    )  # fmt: skip


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

    Runs the forward's :class:`lr2kernels.hf.plan.ForwardPlan`, which the model's forward pre-hook made: its table(s)
    (``rule="hf"``: one table for the whole batch, long iff max(position) + 1 > L0; ``rule="position"``: each query
    token the table of its own position, with every key it sees rotated the same way) and this kind of layer's route.
    """
    state = getattr(module, "_lr2_patch", None)  # the model's PatchedModel (lr2kernels.hf.patch)
    plan: ForwardPlan | None = None if state is None else state.plan
    if plan is None or plan.facts.queries.shape != query.shape[::2]:
        if state is not None:
            raise RuntimeError(
                "lr2kernels: a patched attention layer ran outside its model's forward (positions unknown); call the "
                "model, not its layers"
            )
        return _unpatched(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    kwargs.pop("position_ids", None)
    if plan.facts.paged is not None:  # continuous batching: a flattened batch on a PRE-RoPE paged cache
        return serving.paged_attention(plan, module, query, key, value, scaling, plan.facts, kwargs)
    args = (module, query, key, value, attention_mask, scaling, dropout, sliding_window, kwargs)
    if plan.split is None:
        return _run(plan, 0, *args)
    # Queries on both sides of L0: both tables, then each query row its own.
    (short, short_maps), (long, long_maps) = _run(plan, 0, *args), _run(plan, 1, *args)
    out = torch.where(plan.split[:, :, None, None], long, short)  # [B, L, Hq, D]
    maps = None if short_maps is None else torch.where(plan.split[:, None, :, None], long_maps, short_maps)
    return out, maps
