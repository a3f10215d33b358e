"""Where every query and key of a patched forward sits, known rather than guessed.

A patched model keeps PRE-RoPE keys in its KV cache and rotates them at attention time, so the attention function
must know each cached key's position. transformers does not keep them (a stock cache holds keys already rotated),
so the package does: each forward's positions are recorded on the cache object it wrote to, as a :class:`Ledger`
indexed like the cache (cache index i = the i-th token the cache has seen). Cache operations that transformers runs
between forwards (``crop`` in assisted generation, ``reset``, ``batch_repeat_interleave`` for beams and returned
sequences, ``reorder_cache`` within a beam group) are reconciled against the cache's own length and batch size.

Once per forward the base model's forward pre-hook (:func:`begin_forward`) builds :class:`ForwardFacts`: the
queries' positions (``position_ids`` as given, or the cache's length onwards, as transformers computes them), the
positions of every token by cache index, the packed-row boundaries, and the few numbers the host needs (max and
min position, whether every row sits at 0..T-1), read from the device in ONE copy. Every attention layer of that
forward reads the same facts; how a layer's key slots map to cache indices depends only on how many keys it gets
(:meth:`ForwardFacts.key_positions`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
import weakref
from typing import Any

import torch

from lr2kernels.hf import rotated_keys
from lr2kernels.hf.serving import check_cache, is_paged_cache, paged_plan

LEDGER = "_lr2_ledger"


@dataclasses.dataclass
class Ledger:
    """The positions of the tokens a cache holds, by cache index. ``positions`` ``[B, length]``, or None when every
    row holds positions 0..length-1 (no tensor kept, nothing to read)."""

    positions: torch.Tensor | None
    length: int
    batch: int
    max_position: int


def ledger_of(cache: Any) -> Ledger | None:
    return getattr(cache, LEDGER, None) if cache is not None else None


def newest_cached_position(cache: Any) -> int | None:
    """The highest position among the tokens ``cache`` holds now (None: empty, or not written by a patched model).

    Reconciled with the cache's own length, since ``crop`` (assisted decoding) shortens a cache between forwards;
    read from the device only in that case and only when rows do not all start at 0.
    """
    ledger = ledger_of(cache)
    past = cache.get_seq_length() if ledger is not None else 0
    if ledger is None or past == 0 or ledger.length < past:
        return None
    if ledger.length == past:
        return ledger.max_position
    if ledger.positions is None:
        return past - 1
    return int(ledger.positions[:, :past].max())


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=4)


_WARNED: set[str] = set()


def _history(cache: Any, past: int, batch: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """``([B, past] positions of the cached tokens or None for 0..past-1, whether they are 0..past-1)``."""
    if past == 0:
        return None, True
    ledger = ledger_of(cache)
    if ledger is None or ledger.length < past:
        _warn_once(
            "no-ledger",
            "lr2kernels: a KV cache holds tokens that this patched model did not write (e.g. a cache filled by an "
            "unpatched model, or rebuilt from tensors); their positions are taken as 0..n-1. Let the patched model "
            "fill the cache it reads.",
        )
        known = None if ledger is None else ledger.positions
        if known is None:
            return None, True
        tail = torch.arange(ledger.length, past, device=known.device)[None].expand(known.shape[0], -1)
        ledger = Ledger(torch.cat([known, tail], dim=1), past, known.shape[0], past - 1)
    positions = ledger.positions
    if positions is None:
        return None, True
    positions = positions[:, :past]  # crop / reset between forwards
    if positions.shape[0] != batch:
        if batch % positions.shape[0]:
            raise ValueError(
                f"cache: it holds {positions.shape[0]} sequences but this forward has {batch}; expected a multiple"
            )
        positions = positions.repeat_interleave(batch // positions.shape[0], dim=0)  # beams / returned sequences
    return positions.to(device), False


def _segment_starts(queries: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: where a new sequence starts (row starts, and positions that do not continue the previous)."""
    starts = torch.ones_like(queries, dtype=torch.bool)
    starts[:, 1:] = queries[:, 1:] != queries[:, :-1] + 1
    return starts


class ForwardFacts:
    """Positions of one forward, shared by all its attention layers.

    Attributes:
        queries: ``[B, L]`` positions of this forward's tokens.
        positions: ``[B, total]`` positions of every token by cache index (cached + new), or None when each row is
            0..total-1.
        total: tokens by cache index after this forward (cached + new).
        max_position, min_position: of the queries (host ints).
        keys_at_arange: every row's tokens sit at positions 0..total-1 (no padding offsets, no restarts).
        segments: packed rows: ``cu_seqlens`` over the flattened ``[B * L]`` tokens (segments restart at 0);
            ``max_segment`` their longest length. None otherwise.
        user_mask: the caller passed an attention mask (padding, holes): the 4D mask is more than causal.
        cache: the KV cache object this forward reads and writes (a weak reference; None without one).
        paged: continuous batching (a ``PagedAttentionCache``): where each request sits in the flattened row
            (:class:`lr2kernels.hf.serving.PagedPlan`); None otherwise.
    """

    def __init__(self, queries, positions, total, max_position, min_position, keys_at_arange):
        self.queries = queries
        self.positions = positions
        self.total = total
        self.max_position, self.min_position = max_position, min_position
        self.keys_at_arange = keys_at_arange
        self.segments: torch.Tensor | None = None
        self.max_segment = 0
        self._segment_length_of_token: torch.Tensor | None = None
        self.user_mask = False
        self.paged = None  # continuous batching: the lr2kernels.hf.serving.PagedPlan of the flattened batch
        self._cache: weakref.ref | None = None
        self.memo: dict = {}  # what every attention layer of this forward would compute alike (cos/sin rows)

    @property
    def cache(self) -> Any:
        return None if self._cache is None else self._cache()

    def all_positions(self) -> torch.Tensor:
        if self.positions is not None:
            return self.positions
        return torch.arange(self.total, device=self.queries.device)[None].expand(self.queries.shape[0], -1)

    def key_positions(self, num_keys: int) -> torch.Tensor:
        """``[B, num_keys]`` positions of a layer's key slots.

        A layer gets either every token (dynamic cache: ``num_keys == total``), a preallocated buffer whose first
        ``total`` slots hold them (static cache: more; the rest are masked), or the newest ``num_keys`` (sliding
        window caches: fewer).
        """
        positions = self.all_positions()
        if num_keys == self.total:
            return positions
        if num_keys > self.total:
            return torch.nn.functional.pad(positions, (0, num_keys - self.total))
        return positions[:, self.total - num_keys :]

    def segment_length_of_token(self) -> torch.Tensor:
        """Packed rows: ``[B, L]`` the length of the sequence each token belongs to."""
        if self._segment_length_of_token is None:
            lengths = self.segments[1:] - self.segments[:-1]  # [S]
            per_token = lengths.repeat_interleave(lengths, output_size=self.queries.numel())
            self._segment_length_of_token = per_token.view(self.queries.shape)
        return self._segment_length_of_token

    def ledger(self) -> Ledger:
        return Ledger(self.positions, self.total, self.queries.shape[0], self.max_position)


class ForwardTracker:
    """One per patched model: the base model's hooks write the current forward's facts, attention layers read them."""

    def __init__(self) -> None:
        self.facts: ForwardFacts | None = None
        self._signatures: dict[type, inspect.Signature] = {}
        # continuous batching: the previous paged forward's max query position (stock's table choice then)
        self._paged_max_position: int | None = None

    def __getstate__(self) -> dict:
        # A forward's facts do not outlive it (nor can they travel: they hold a weak reference to the cache).
        return {**self.__dict__, "facts": None, "_signatures": {}}

    def arguments(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
        """The forward's arguments by name (read only)."""
        if not args:  # transformers passes everything by keyword: nothing to bind
            return kwargs
        signature = self._signatures.get(type(module))
        if signature is None:
            signature = self._signatures[type(module)] = inspect.signature(module.forward)
        bound = signature.bind_partial(*args, **kwargs).arguments
        bound.update(bound.pop("kwargs", {}) or {})
        return bound

    def begin_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the base model (``LlamaModel`` ...): this forward's :class:`ForwardFacts`."""
        arguments = self.arguments(module, args, kwargs)
        cache = arguments.get("cache", arguments.get("past_key_values"))
        check_cache(module, cache)  # a cache whose key positions are unknown: refused before any layer writes to it
        tokens = arguments.get("input_ids")
        if tokens is None:
            tokens = arguments.get("inputs_embeds")
        if tokens is None:
            self.facts = None
            return
        batch, length = tokens.shape[0], tokens.shape[1]
        device = tokens.device
        if is_paged_cache(cache):  # continuous batching: every request flattened into one row
            plan, queries, max_position, min_position = paged_plan(cache, arguments, length, device)
            plan.previous_max_position, self._paged_max_position = self._paged_max_position, max_position
            self.facts = ForwardFacts(queries, None, length, max_position, min_position, False)
            self.facts.paged = plan
            return
        self._paged_max_position = None
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        history, history_at_arange = _history(cache, past, batch, device)
        position_ids = arguments.get("position_ids")
        total = past + length
        if position_ids is None and history_at_arange:  # every row 0..total-1: known without reading the device
            queries = torch.arange(past, total, device=device)[None].expand(batch, -1)
            facts = ForwardFacts(queries, None, total, total - 1, past, True)
        else:
            facts = self._read_facts(arguments, position_ids, history, past, batch, length, device)
        facts.user_mask = arguments.get("attention_mask") is not None
        if cache is not None:
            with contextlib.suppress(TypeError):  # a cache class without weak references: no rotated-key copies
                facts._cache = weakref.ref(cache)
            rotated_keys.carry_over(cache)  # before any layer appends to it
        self.facts = facts

    @staticmethod
    def _read_facts(arguments, position_ids, history, past, batch, length, device) -> ForwardFacts:
        """Facts that need the device's values: one host read (two for packed rows: their boundaries)."""
        total = past + length
        if position_ids is None:
            queries = torch.arange(past, total, device=device)[None].expand(batch, -1)
        else:
            queries = position_ids.reshape(-1, length).to(device).expand(batch, -1)
        at_arange = (queries == torch.arange(past, total, device=device)).all()
        if history is not None:
            at_arange = at_arange & (history == torch.arange(past, device=device)).all()
        # Packed rows: no cache, no mask, and positions that restart at 0 inside a row (transformers' padding-free
        # format); each sequence then gets its own table through the varlen kernel.
        maybe_packed = past == 0 and length > 1 and arguments.get("attention_mask") is None
        starts = _segment_starts(queries) if maybe_packed else torch.ones_like(queries[:, :1], dtype=torch.bool)
        restarts_at_zero = torch.where(starts, queries, 0).abs().sum() == 0
        summary = torch.stack([queries.max(), queries.min(), at_arange.long(), starts.sum(), restarts_at_zero.long()])
        max_position, min_position, at_arange, num_segments, restarts_at_zero = summary.tolist()  # the one host read
        if history is None:
            history = torch.arange(past, device=device)[None].expand(batch, -1)
        full = torch.cat([history, queries], dim=1)
        facts = ForwardFacts(queries, None if at_arange else full, total, max_position, min_position, bool(at_arange))
        if maybe_packed and num_segments > batch and restarts_at_zero:
            given = arguments.get("cu_seq_lens_q")
            if given is not None and given.numel() == num_segments + 1:  # the collator gave the boundaries
                cu_seqlens = given.to(device=device, dtype=torch.int32)
            else:
                flat_starts = starts.flatten().nonzero().flatten().to(torch.int32)  # packed rows' second read
                cu_seqlens = torch.cat([flat_starts, flat_starts.new_tensor([batch * length])])
            facts.segments = cu_seqlens
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            given_max = arguments.get("max_length_q")
            facts.max_segment = int(given_max) if given_max is not None else int(lengths.max())
        return facts

    def end_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook of the base model: record this forward's positions on the cache it wrote to."""
        if self.facts is None or self.facts.paged is not None:  # the paged cache keeps its own positions
            return
        cache = None
        for name in ("cache", "past_key_values"):
            cache = cache if cache is not None else getattr(output, name, None)
        if cache is None:
            arguments = self.arguments(module, args, kwargs)
            cache = arguments.get("cache", arguments.get("past_key_values"))
        if cache is not None and hasattr(cache, "get_seq_length"):
            try:
                setattr(cache, LEDGER, self.facts.ledger())
            except AttributeError:  # a cache class with __slots__: positions cannot be kept, so say so
                _warn_once("slots", f"lr2kernels: cannot record key positions on a {type(cache).__name__}")
