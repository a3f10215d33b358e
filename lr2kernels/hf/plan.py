"""The plan of one patched forward: made once, before any attention layer runs; the layers only run it.

As FlashInfer splits attention into ``plan`` (once per batch: where each request sits, which kernel, which lengths)
and ``run`` (per layer), a patched model's forward pre-hook (:meth:`lr2kernels.hf.patch.PatchedModel.begin_forward`)
makes a :class:`ForwardPlan` from the forward's facts (:mod:`lr2kernels.hf.positions`) and the patch's settings:

- the table(s): ``rule="hf"``: one for the whole batch (long iff max(position) + 1 > L0), or for packed rows one per
  sequence (a ``[B, L]`` long flag per token); ``rule="position"``: the table of every query's own position: one
  table where every query is on one side of L0, else both, each query row then taking its own (``split``);
- the settings the layers use: table, backend, rule, the rotated-key option (a snapshot, so that a patch that
  changes them between forwards never mixes two in one forward);
- the route of each kind of layer (:meth:`ForwardPlan.route`): what a layer gets (its mask, its key count, its
  sliding window) is the same for every layer of one kind in a forward, so the route is decided by the first layer
  of that kind and looked up by the others.

Routes: ``PACKED`` (packed rows: the fused varlen ``rope_attention``), ``PREFILL`` (no mask, keys at 0..T-1, as many
queries as keys: the fused ``rope_attention``), ``DECODE`` (the newest queries at the end of keys at 0..T-1, with the
table ``rope_decode`` picks from the length: the fused ``rope_decode``), each of those two ``rotated`` where it would
run on the torch backend and the patch keeps rotated-key copies (:mod:`lr2kernels.hf.rotated_keys`); ``EAGER``
(attention maps asked of an eager model: rotate, then transformers' eager attention) and ``SDPA`` (anything else:
rotate, then transformers' SDPA with its mask). Continuous batching (``facts.paged``) is planned by
:func:`lr2kernels.hf.serving.paged_plan` and run by :func:`lr2kernels.hf.serving.paged_attention`.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch

from lr2kernels.hf import serving
from lr2kernels.hf.positions import ForwardFacts
from lr2kernels.ops import dispatch
from lr2kernels.tables import RopeTable


class Route(enum.Enum):
    PACKED = "packed rows: varlen rope_attention"
    PREFILL = "rope_attention"
    DECODE = "rope_decode"
    EAGER = "rotate, then transformers' eager attention (maps)"
    SDPA = "rotate, then transformers' SDPA"


@dataclasses.dataclass(frozen=True)
class LayerRoute:
    """How one kind of layer runs in this forward: the route, and whether on the rotated-key copy."""

    route: Route
    rotated: bool = False


@dataclasses.dataclass(eq=False)
class ForwardPlan:
    """One patched forward's plan (see the module's docstring). ``longs``: the table(s) each layer runs, a bool or a
    ``[B, L]`` per-token flag; ``split``: ``[B, L]`` which query rows take the long table's output when ``longs`` is
    ``(False, True)`` (None otherwise). Continuous batching: ``paged_passes``, the table of each group of requests,
    and ``split`` ``[T]`` where a request straddles L0 (:func:`lr2kernels.hf.serving.paged_tables`)."""

    facts: ForwardFacts
    table: RopeTable
    backend: str | None
    rule: str
    rotated_key_cache: bool
    model_config: Any
    longs: tuple = ()
    split: torch.Tensor | None = None
    paged_passes: list = dataclasses.field(default_factory=list)  # continuous batching: [(long, requests), ...]
    _wants_maps: bool | None = None
    _routes: dict = dataclasses.field(default_factory=dict)

    def wants_maps(self) -> bool:
        """Whether this forward returns attention maps (``output_attentions=True`` on an eager model). Read at the
        first layer: transformers sets what a forward collects inside the base model's forward, after its hooks."""
        if self._wants_maps is None:
            self._wants_maps = _maps_requested() and self.model_config._attn_implementation == "eager"
        return self._wants_maps

    def route(self, module, query: torch.Tensor, num_keys: int, attention_mask, dropout: float,
              sliding_window: int | None, which: int) -> LayerRoute:  # fmt: skip
        """The route of a layer that gets ``query`` ``[B, Hq, L, D]`` and ``num_keys`` keys, for table
        ``longs[which]``: decided once per kind of layer and forward."""
        is_causal = getattr(module, "is_causal", True)
        dropping = dropout != 0.0 and module.training
        key = (which, num_keys, attention_mask is None, sliding_window, is_causal, dropping, query.requires_grad,
               query.dtype, query.device)  # fmt: skip
        found = self._routes.get(key)
        if found is None:
            found = self._routes[key] = self._decide(query, num_keys, attention_mask, sliding_window, is_causal,
                                                     dropping, which)  # fmt: skip
        return found

    def _decide(self, query, num_keys, attention_mask, sliding_window, is_causal, dropping, which) -> LayerRoute:
        facts, long = self.facts, self.longs[which]
        num_queries = query.shape[2]
        fusable = (
            not self.wants_maps() and not dropping and is_causal and isinstance(long, bool) == (facts.segments is None)
        )
        if fusable and facts.segments is not None and (sliding_window is None or sliding_window >= facts.max_segment):
            return LayerRoute(Route.PACKED)
        plain = (
            fusable
            and attention_mask is None
            and (sliding_window is None or sliding_window >= num_keys)
            and facts.keys_at_arange
            and num_keys == facts.total
        )
        if plain and num_queries == num_keys:
            return LayerRoute(Route.PREFILL, self._rotated("rope_attention", query))
        if plain and long == self.table.use_long(num_keys):  # rope_decode picks the table from the length itself
            return LayerRoute(Route.DECODE, self._rotated("rope_decode", query))
        return LayerRoute(Route.EAGER if self.wants_maps() else Route.SDPA)

    def _rotated(self, op: str, query: torch.Tensor) -> bool:
        """Whether ``op`` runs on the rotated-key copy: only where it would run on the torch backend (the fused
        kernels rotate in registers), the patch allows it, and no gradient flows through the keys."""
        if not self.rotated_key_cache or query.requires_grad:
            return False
        return dispatch.backend_name(op, query.device, query.dtype, query.shape[-1], self.backend) == "torch"


def make_plan(state: Any, facts: ForwardFacts) -> ForwardPlan:
    """The :class:`ForwardPlan` of a forward with ``facts``, under the settings of ``state`` (a
    :class:`lr2kernels.hf.patch.PatchedModel`): its table(s); routes are decided as the layers come."""
    table: RopeTable = state.table
    plan = ForwardPlan(facts, table, state.backend, state.rule, state.rotated_key_cache, state.config)
    if facts.paged is not None:  # continuous batching: lr2kernels.hf.serving plans per request
        plan.paged_passes, plan.split = serving.paged_tables(
            facts.paged, table, state.rule, facts.max_position, facts.queries
        )
        return plan
    max_long = table.use_long(facts.max_position + 1)
    if facts.segments is not None and state.rule == "hf":  # packed rows: each sequence by its own length
        plan.longs = (facts.segment_length_of_token() > table.original_max_position,)  # [B, L]
    elif state.rule == "hf" or table.use_long(facts.min_position + 1) or not max_long:
        plan.longs = (max_long,)  # one table for every query
    else:  # rule="position", queries on both sides of L0 (a prefill or chunk that crosses it): both tables
        plan.longs = (False, True)
        plan.split = facts.queries + 1 > table.original_max_position  # [B, L]
    return plan


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
