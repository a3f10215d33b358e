"""Continuous batching (transformers' serving path) on a patched model: a PRE-RoPE paged KV cache.

Continuous batching (``model.generate_batch``, ``model.init_continuous_batching``,
``model.continuous_batching_context_manager``, ``generate(cache_implementation="paged")`` and ``transformers serve
--continuous-batching``) flattens every scheduled request into one row ``[1, T]`` and keeps the keys in a
``PagedAttentionCache``. On a patched model the rotary module is the identity, so that cache stores PRE-RoPE keys by
construction; this module places them:

- :func:`paged_plan` (the base model's forward pre-hook, once per forward): where every request sits in the row,
  read from the forward's ``position_ids``, ``cu_seq_lens_q`` and ``cu_seq_lens_k`` in ONE host copy. Request i's
  queries are at positions ``past_i .. past_i + q_i - 1`` and the ``k_i`` keys the cache returns for it are the
  newest ones: positions ``past_i + q_i - k_i .. past_i + q_i - 1`` (0..k_i-1 for full attention; the last window for
  sliding attention, as transformers' sliding allocator reads them).
- :func:`paged_tables` (once per forward, in the forward's plan): the table (``rule="hf"``: one for the whole
  flattened batch, long iff max(position_ids) + 1 > L0, as the stock rotary decides it; ``rule="position"``: each
  query by its own position).
- :func:`paged_attention` (each attention layer) runs them, per request: no past -> the fused varlen
  ``rope_attention``; a past whose keys start at 0 and whose own length picks that table -> the fused
  ``rope_decode`` (requests grouped by query length, so chunked prefills and decodes mix): on a kernel backend
  (Triton, CUDA) and a full-attention layer, on the paged cache itself ``[num_pages, page, Hk, D]`` through a block
  table made on the device once per forward and layer type (:func:`_block_table`: each request's ``read_index`` slots
  at offsets 0, page, 2 page, ... divided by the page size, or the fast path's own block table); on the torch backend
  (which would gather anyway) and for the sliding allocator (a ring buffer, not whole pages from position 0), on the
  request's keys gathered into a padded ``[B, Hk, max_len, D]`` cache; anything else (a table that differs from the
  one rope_decode picks from the length, a sliding window that binds) -> q and keys rotated at their positions, then
  causal bottom-right attention per request. All exact, in every mix.
- the decode fast path (``block_table`` with flash attention on CUDA/XPU, where transformers leaves the cache write
  to the kernel): the new keys are written into the paged cache here; a kernel backend's ``rope_decode`` then reads
  them through that block table, the other routes read them back by it.

Every key is rotated with the table of the current forward (no key keeps the table it was written with, which is
what the PRE-RoPE cache is for): token for token equal to stock continuous batching whenever the stock table does not
change during a request's life (default RoPE always; LongRoPE while the flattened batches stay on one side of L0).
Where it changes, stock keeps keys rotated with the old table and the patched model does not: a warning says
so when it happens.

Refused, loudly: forwards captured in a CUDA graph (the plan reads lengths on the host: set
``ContinuousBatchingConfig(use_cuda_graph=False)``), positions that do not continue each request's cache, and any
other cache that is not a transformers ``Cache`` (:func:`check_cache`).
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
import weakref
from typing import Any

import torch

from lr2kernels.ops import dispatch, rope_attention, rope_decode, rotary
from lr2kernels.tables import RopeTable

_PAGED_CACHE = ("transformers.generation.continuous_batching.cache", "PagedAttentionCache")


def is_paged_cache(cache: Any) -> bool:
    """Whether ``cache`` is transformers' continuous-batching ``PagedAttentionCache`` (found by class, no import)."""
    return any((c.__module__, c.__name__) == _PAGED_CACHE for c in type(cache).__mro__)


def _cache_base_class() -> type | None:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - every supported transformers has it
        return None
    return Cache


def check_cache(model: Any, cache: Any) -> None:
    """Raise unless ``cache`` is None, a transformers ``Cache`` (DynamicCache, StaticCache, ...) or the paged cache of
    continuous batching: a patched model knows where the keys of those sit, and of no other."""
    if cache is None or is_paged_cache(cache):
        return
    base = _cache_base_class()
    if base is None or isinstance(cache, base):
        return
    raise NotImplementedError(
        f"{type(model).__name__}.forward: got a {type(cache).__name__} as the KV cache, expected a transformers Cache "
        f"(DynamicCache, StaticCache, ...), continuous batching's PagedAttentionCache or None. This model is patched "
        f"by lr2kernels.patch(), which rotates every key at its own position, known only in those caches; call "
        f"lr2kernels.unpatch(model) to run with this cache."
    )


@dataclasses.dataclass
class PagedPlan:
    """Where every request of a continuous-batching forward sits in its flattened row (host values).

    Attributes:
        num_tokens: query rows ``T`` of the forward (padding rows included: they belong to no request).
        q_starts: ``cu_seq_lens_q`` (request i's queries are rows ``q_starts[i] .. q_starts[i + 1] - 1``).
        past: request i's first query position (its cached tokens before this forward).
        key_lengths: per layer type (``"full_attention"``, ``"sliding_attention"``): request i's key count
            (``cu_seq_lens_k`` differences).
        cache: the paged cache (a weak reference).
        previous_max_position: the max query position of the model's previous continuous-batching forward.
        memo: index tensors shared by every layer of one type in this forward.
    """

    num_tokens: int
    q_starts: list[int]
    past: list[int]
    key_lengths: dict[str, list[int]]
    cache: Any
    memo: dict = dataclasses.field(default_factory=dict)
    previous_max_position: int | None = None  # of the model's previous paged forward (None: the first)

    @property
    def num_requests(self) -> int:
        return len(self.past)

    def q_length(self, i: int) -> int:
        return self.q_starts[i + 1] - self.q_starts[i]


def paged_plan(
    cache: Any, arguments: dict, length: int, device: torch.device
) -> tuple[PagedPlan, torch.Tensor, int, int]:
    """The :class:`PagedPlan` of a continuous-batching forward, its ``[1, T]`` query positions and their max and min.

    ``arguments``: the base model's forward arguments (``position_ids``, ``cu_seq_lens_q``, ``cu_seq_lens_k``).
    """
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise NotImplementedError(
            "lr2kernels: a patched model's continuous-batching forward reads the batch's lengths on the host, which a "
            "CUDA graph capture cannot do: pass ContinuousBatchingConfig(use_cuda_graph=False)"
        )
    position_ids, cu_q, cu_k = (arguments.get(name) for name in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k"))
    if position_ids is None or cu_q is None or not isinstance(cu_k, dict) or not cu_k:
        raise ValueError(
            "lr2kernels: a forward on a PagedAttentionCache needs position_ids, cu_seq_lens_q and cu_seq_lens_k "
            "(a dict per layer type), as transformers' continuous batching passes them; got "
            f"{[name for name in ('position_ids', 'cu_seq_lens_q', 'cu_seq_lens_k') if arguments.get(name) is None]} "
            "missing"
        )
    queries = position_ids.reshape(1, -1).to(device)
    if queries.shape[1] != length:
        raise ValueError(f"position_ids: expected {length} positions (one per token), got {queries.shape[1]}")
    types = list(cu_k)
    parts = [queries.reshape(-1), cu_q.reshape(-1)] + [cu_k[t].reshape(-1) for t in types]
    flat = torch.cat([p.to(device=device, dtype=torch.long) for p in parts]).tolist()  # the one host read
    positions, flat = flat[:length], flat[length:]
    q_starts, flat = flat[: cu_q.numel()], flat[cu_q.numel() :]
    key_starts = {}
    for t in types:
        key_starts[t], flat = flat[: cu_k[t].numel()], flat[cu_k[t].numel() :]
    past = []
    for i in range(len(q_starts) - 1):
        start, stop = q_starts[i], q_starts[i + 1]
        first = positions[start] if stop > start else 0
        if positions[start:stop] != list(range(first, first + stop - start)):
            raise NotImplementedError(
                f"lr2kernels: request {i} of a continuous-batching forward has query positions "
                f"{positions[start:stop][:8]}..., expected consecutive positions continuing its cache"
            )
        past.append(first)
    key_lengths = {t: [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)] for t, starts in key_starts.items()}
    for t, lengths in key_lengths.items():
        for i, k in enumerate(lengths):
            q = q_starts[i + 1] - q_starts[i]
            if q and not q <= k <= past[i] + q:
                raise NotImplementedError(
                    f"lr2kernels: request {i} of a continuous-batching forward gets {k} {t} keys for {q} queries at "
                    f"positions {past[i]}..{past[i] + q - 1}; expected between {q} and {past[i] + q} (its newest keys)"
                )
    real = [p for i, p in enumerate(past) if q_starts[i + 1] > q_starts[i]]
    ends = [p + q_starts[i + 1] - q_starts[i] - 1 for i, p in enumerate(past) if q_starts[i + 1] > q_starts[i]]
    max_position, min_position = (max(ends), min(real)) if real else (0, 0)
    plan = PagedPlan(length, q_starts, past, key_lengths, weakref.ref(cache))
    return plan, queries, max_position, min_position


def _rotate(x: torch.Tensor, table: RopeTable, positions: torch.Tensor, long: bool) -> torch.Tensor:
    """x ``[1, H, L, D]`` rotated at positions ``[1, L]`` with one table."""
    cos, sin = rotary.token_cos_sin(table, positions, long, x.dtype)  # [1, L, rotary_dim]
    return rotary.rotate(x, cos[:, None], sin[:, None])


def _ranges(starts: list[int], lengths: list[int], device: torch.device) -> torch.Tensor:
    """int64 ``[sum(lengths)]``: start_j .. start_j + length_j - 1 for every j, concatenated."""
    flat = [s + j for s, n in zip(starts, lengths, strict=True) for j in range(n)]
    return torch.tensor(flat, dtype=torch.long, device=device)


@dataclasses.dataclass
class _Routes:
    """Index tensors of one layer type and table: which requests go through which op (built once per forward)."""

    prefill: tuple | None  # (q rows, key slots, cu_seqlens, max_seqlen)
    decode: list[tuple]  # (q rows [B, n], key slots [B, max_len], cache_seqlens [B], requests (host tuple))
    rest: tuple | None  # (q rows, key slots, q positions, key positions, mask [nq, nk])


def _routes(plan: PagedPlan, layer_type: str, window: int | None, table: RopeTable, long: bool, requests: list[int],
            device: torch.device) -> _Routes:  # fmt: skip
    key = ("routes", layer_type, long, tuple(requests), str(device))
    found = plan.memo.get(key)
    if found is not None:
        return found
    key_lengths = plan.key_lengths[layer_type]
    key_starts = [0, *itertools.accumulate(key_lengths)]
    prefill, decode, rest = [], {}, []
    for i in requests:
        q, k, past = plan.q_length(i), key_lengths[i], plan.past[i]
        window_binds = window is not None and k > window  # some query would see a key more than window-1 back
        if past == 0 and k == q and not window_binds:
            prefill.append(i)
        elif k == past + q and table.use_long(k) == long and not window_binds:  # rope_decode's own table is ours
            decode.setdefault(q, []).append(i)
        else:
            rest.append(i)
    routes = _Routes(None, [], None)
    if prefill:
        lengths = [plan.q_length(i) for i in prefill]
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
        routes.prefill = (
            _ranges([plan.q_starts[i] for i in prefill], lengths, device),
            _ranges([key_starts[i] for i in prefill], lengths, device),
            cu,
            max(lengths),
        )
    for n, group in sorted(decode.items()):
        longest = max(key_lengths[i] for i in group)
        rows = torch.tensor([[plan.q_starts[i] + j for j in range(n)] for i in group], device=device)
        slots = torch.tensor(  # past the request's keys: its last key again (never read: beyond cache_seqlens)
            [[key_starts[i] + min(j, key_lengths[i] - 1) for j in range(longest)] for i in group], device=device
        )
        seqlens = torch.tensor([key_lengths[i] for i in group], dtype=torch.int32, device=device)
        routes.decode.append((rows, slots, seqlens, tuple(group)))
    if rest:
        q_lengths = [plan.q_length(i) for i in rest]
        k_lengths = [key_lengths[i] for i in rest]
        rows = _ranges([plan.q_starts[i] for i in rest], q_lengths, device)
        slots = _ranges([key_starts[i] for i in rest], k_lengths, device)
        q_pos = _ranges([plan.past[i] for i in rest], q_lengths, device)
        k_pos = _ranges([plan.past[i] + q - k for i, q, k in zip(rest, q_lengths, k_lengths, strict=True)], k_lengths,
                        device)  # fmt: skip
        owner = torch.arange(len(rest), device=device)
        q_owner = owner.repeat_interleave(torch.tensor(q_lengths, device=device))
        k_owner = owner.repeat_interleave(torch.tensor(k_lengths, device=device))
        distance = q_pos[:, None] - k_pos[None, :]  # [nq, nk]
        mask = (q_owner[:, None] == k_owner[None, :]) & (distance >= 0)  # each request causal, bottom-right
        if window is not None:
            mask &= distance < window
        routes.rest = (rows, slots, q_pos[None], k_pos[None], mask)
    plan.memo[key] = routes
    return routes


def _attend(settings, query, key, value, scaling, plan: PagedPlan, layer_type: str, window: int | None, pages,
            long: bool, requests: list[int]) -> torch.Tensor:  # fmt: skip
    """``[T, Hq, D]`` attention rows of ``requests`` with table ``long`` (rows of other requests are zero).
    query ``[T, Hq, D]``, key/value ``[Tk, Hk, D]`` (request i's keys at its ``cu_seq_lens_k`` slots); ``pages``:
    the layer's paged cache for ``rope_decode`` (:func:`_pages`) or None (cached requests read a padded copy)."""
    table: RopeTable = settings.table
    backend = settings.backend
    routes = _routes(plan, layer_type, window, table, long, requests, query.device)
    out = query.new_zeros(query.shape)
    if routes.prefill is not None:
        rows, slots, cu, longest = routes.prefill
        got = rope_attention(query[rows], key[slots], value[slots], table, cu_seqlens=cu, max_seqlen=longest, long=long,
                             softmax_scale=scaling, backend=backend)  # fmt: skip
        out.index_copy_(0, rows, got)
    for rows, slots, seqlens, group in routes.decode:
        q = query[rows].permute(0, 2, 1, 3)  # [B, n, Hq, D] -> [B, Hq, n, D]
        if pages is not None:  # the kernel reads the request's keys in the pages themselves, by its block table
            k_pages, v_pages, _ = pages
            got = rope_decode(q, k_pages, v_pages, table, cache_seqlens=seqlens, block_table=_block_table(
                plan, layer_type, pages, group, query.device), softmax_scale=scaling, backend=backend)  # fmt: skip
        else:
            k, v = (x[slots].permute(0, 2, 1, 3) for x in (key, value))  # [B, Hk, max_len, D]
            got = rope_decode(q, k, v, table, cache_seqlens=seqlens, softmax_scale=scaling, backend=backend)
        out.index_copy_(0, rows.flatten(), got.permute(0, 2, 1, 3).flatten(0, 1))
    if routes.rest is not None:
        rows, slots, q_pos, k_pos, mask = routes.rest
        q = _rotate(query[rows].transpose(0, 1)[None], table, q_pos, long)  # [1, Hq, nq, D]
        k = _rotate(key[slots].transpose(0, 1)[None], table, k_pos, long)  # [1, Hk, nk, D]
        v = value[slots].transpose(0, 1)[None]
        got = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scaling, enable_gqa=q.shape[1] != k.shape[1]
        )  # fmt: skip
        out.index_copy_(0, rows, got[0].transpose(0, 1))
    return out


def _pages(settings, allocator, layer_idx: int, query: torch.Tensor, kwargs) -> tuple | None:
    """The layer's paged cache for the fused ``rope_decode``: ``(k_pages, v_pages, source)`` with the pages
    ``[num_pages, page, Hk, D]`` and ``source`` the forward's block table ``[B, max_blocks]`` (the decode fast path) or
    this layer group's ``read_index`` ``[Tk]`` (slots ``page * page_size + offset``, in ``cu_seq_lens_k`` order); None
    where the cached requests read a padded copy instead: the torch backend (it would gather the pages anyway), and
    every allocator whose slots are not whole pages in order from position 0 (the sliding allocator's ring buffer,
    MLA's latents)."""
    if type(allocator).__name__ != "FullAttentionCacheAllocator" or allocator.layer_type != "full_attention":
        return None
    name = dispatch.backend_name("rope_decode", query.device, query.dtype, query.shape[-1], settings.backend)
    if name == "torch":
        return None
    if kwargs.get("block_table") is not None:
        return kwargs["k_cache"], kwargs["v_cache"], kwargs["block_table"]
    read_index = kwargs.get("read_index")
    if read_index is None:
        return None
    k_pages, v_pages = allocator.get_cache_for_block_table(layer_idx)
    return k_pages, v_pages, read_index[allocator.index]


def _block_table(plan: PagedPlan, layer_type: str, pages: tuple, group: tuple, device: torch.device) -> torch.Tensor:
    """``[B, max_blocks]`` the pages of the requests ``group`` (their keys from position 0), made on the device once
    per forward and layer type: the decode fast path's rows, or each request's slots at offsets 0, page, 2 page, ...
    of ``read_index`` divided by the page size (every layer of one type reads the same slots in a forward)."""
    k_pages, _, source = pages
    page = k_pages.shape[1]
    memo = ("pages", layer_type, group, page, str(device))
    found = plan.memo.get(memo)
    if found is None:
        if source.dim() == 2:  # the fast path's block table: row i is request i's
            found = source[torch.tensor(group, device=source.device)]
        else:
            lengths = plan.key_lengths[layer_type]
            starts = [0, *itertools.accumulate(lengths)]
            blocks = max(-(-lengths[i] // page) for i in group)
            first = torch.tensor(  # past a request's last block: its last key's block again (never read)
                [[starts[i] + min(c * page, lengths[i] - 1) for c in range(blocks)] for i in group], device=device
            )
            found = source[first] // page
        plan.memo[memo] = found
    return found


def _keys_from_block_table(plan: PagedPlan, layer_type: str, key, value, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode fast path (``block_table``: transformers leaves the cache write to a flash kernel): write the new
    keys and values ``[1, Hk, T, D]`` into the layer's pages, then read every request's keys back, flattened
    ``[Tk, Hk, D]`` in ``cu_seq_lens_k`` order."""
    table, k_pages, v_pages = kwargs["block_table"], kwargs["k_cache"], kwargs["v_cache"]  # [B, blocks], [N, P, Hk, D]
    page = k_pages.shape[1]
    requests = [i for i in range(plan.num_requests) if plan.q_length(i)]
    lengths = plan.key_lengths[layer_type]
    for i in requests:
        if lengths[i] != plan.past[i] + plan.q_length(i):
            raise NotImplementedError(f"lr2kernels: a block table for {layer_type} layers (keys not from position 0)")
    memo = ("block table", layer_type, str(key.device))
    found = plan.memo.get(memo)
    if found is None:
        rows = _ranges([plan.q_starts[i] for i in requests], [plan.q_length(i) for i in requests], key.device)
        new_pos = _ranges([plan.past[i] for i in requests], [plan.q_length(i) for i in requests], key.device)
        new_req = torch.tensor([i for i in requests for _ in range(plan.q_length(i))], device=key.device)
        all_req = torch.tensor([i for i in requests for _ in range(lengths[i])], device=key.device)
        all_pos = _ranges([0] * len(requests), [lengths[i] for i in requests], key.device)
        found = plan.memo[memo] = (rows, new_req, new_pos, all_req, all_pos)
    rows, new_req, new_pos, all_req, all_pos = found
    new_slots = table[new_req, new_pos // page].long() * page + new_pos % page
    all_slots = table[all_req, all_pos // page].long() * page + all_pos % page
    flat_k, flat_v = (p.view(-1, *p.shape[2:]) for p in (k_pages, v_pages))  # [N * P, Hk, D]
    flat_k.index_copy_(0, new_slots, key[0].transpose(0, 1)[rows])
    flat_v.index_copy_(0, new_slots, value[0].transpose(0, 1)[rows])
    return flat_k[all_slots], flat_v[all_slots]


def _warn_if_table_switched(plan: PagedPlan, table: RopeTable, long: bool) -> None:
    """Warn (once per process, Python's default filter) where this forward's batch-wide table differs from the
    previous forward's while requests carry cached keys: stock keeps those keys rotated with the table of the forward
    that wrote them, a patched model rotates every key with the current table, so tokens may differ from stock."""
    previous = plan.previous_max_position
    if previous is None or table.use_long(previous + 1) == long or not any(plan.past):
        return
    warnings.warn(
        "lr2kernels: continuous batching switched the RoPE table between the short and the long factors (the "
        f"flattened batch's longest position crossed L0={table.original_max_position}) while requests hold cached "
        "keys. Stock transformers keeps those keys rotated with the table they were written with, a patched model "
        "rotates every key with the current one, so its tokens may differ from stock's from here on. "
        "patch(model, rule='position') gives each token its own position's table (no switch).",
        UserWarning,
        stacklevel=3,
    )


def paged_tables(
    plan: PagedPlan, table: RopeTable, rule: str, max_position: int, queries: torch.Tensor
) -> tuple[list[tuple[bool, list[int]]], torch.Tensor | None]:
    """The table(s) of a continuous-batching forward, decided once per forward (the layers run them): ``[(long,
    requests), ...]``, and the ``[T]`` rows that take the second pass's output where there are two.

    ``rule="hf"``: one table for the flattened batch, as the stock rotary picks it (long iff ``max_position + 1 >
    L0``). ``rule="position"``: each query by its own position: requests whose queries all sit below L0 run the short
    table, the others the long one, and a request on both sides of L0 runs both (its rows then split by position).
    """
    requests = [i for i in range(plan.num_requests) if plan.q_length(i)]
    if rule == "hf":
        long = table.use_long(max_position + 1)
        _warn_if_table_switched(plan, table, long)
        return [(long, requests)], None
    L0 = table.original_max_position
    short = [i for i in requests if plan.past[i] + 1 <= L0]
    long = [i for i in requests if plan.past[i] + plan.q_length(i) > L0]
    if not long or not short:
        return [(bool(long), requests)], None
    return [(False, short), (True, long)], queries[0] + 1 > L0  # [T]


def paged_attention(settings, module, query, key, value, scaling, facts, kwargs) -> tuple[torch.Tensor, None]:
    """A patched layer's attention in a continuous-batching forward: runs the table(s) of ``settings`` (the forward's
    :class:`lr2kernels.hf.plan.ForwardPlan`: ``paged_passes``, ``split`` from :func:`paged_tables`; its table and
    backend) on this layer's keys. query ``[1, Hq, T, D]`` (PRE-RoPE, every
    request's queries in one row), key/value ``[1, Hk, Tk, D]`` (what ``PagedAttentionCache.update`` returned: every
    request's keys, or with a block table only the new ones). Returns ``([1, T, Hq, D], None)``."""
    plan: PagedPlan = facts.paged
    cache = plan.cache()
    allocator = cache.layer_to_allocator[module.layer_idx]
    layer_type = allocator.layer_type
    window = getattr(allocator, "sliding_window", None) if layer_type == "sliding_attention" else None
    if kwargs.get("block_table") is not None:
        flat_k, flat_v = _keys_from_block_table(plan, layer_type, key, value, kwargs)
    else:
        flat_k, flat_v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [Tk, Hk, D]
    flat_q = query[0].transpose(0, 1)  # [T, Hq, D]
    pages = _pages(settings, allocator, module.layer_idx, query, kwargs)
    args = (settings, flat_q, flat_k, flat_v, scaling, plan, layer_type, window, pages)
    outs = [_attend(*args, long, requests) for long, requests in settings.paged_passes]
    out = outs[0] if settings.split is None else torch.where(settings.split[:, None, None], outs[1], outs[0])
    return out[None], None
