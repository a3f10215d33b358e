"""Public ops: validate the inputs into a call description, choose a backend that supports it, run it.

Layouts: dense ``[batch, heads, seq, head_dim]`` (as SDPA) or varlen ``[total_tokens, heads, head_dim]`` with
``cu_seqlens`` (as FlashAttention's varlen API). q, k, v are PRE-RoPE; k/v may have fewer heads than q (GQA).

Every op takes its tensors and the table positionally, in one order (queries, keys, values, table), and everything
else by keyword.
"""

from __future__ import annotations

import torch

from lr2kernels.ops import validation
from lr2kernels.ops.dispatch import available_backends, resolve
from lr2kernels.ops.validation import set_value_checks
from lr2kernels.tables import RopeTable

__all__ = ["apply_rope", "available_backends", "rerotate", "rope_attention", "rope_decode", "set_value_checks"]


# 0.1 took options positionally; 0.2 takes the tensors and the table positionally and everything else by keyword
# (and rope_decode's table moved before the lengths). A call in the old order must say so, not fail with Python's
# bare "takes 4 positional arguments".
_CALLS = {
    "apply_rope": "apply_rope(q, k, table, *, position_ids=None, long=None, cu_seqlens=None, backend=None)",
    "rope_attention": "rope_attention(q, k, v, table, *, position_ids=None, long=None, cu_seqlens=None, ...)",
    "rope_decode": (
        "rope_decode(q, k_cache, v_cache, table, *, cache_seqlens, block_table=None, softmax_scale=None, backend=None)"
    ),
    "rerotate": "rerotate(k, table, *, position_ids, from_long, to_long, backend=None)",
}


def _reject_extra_positional(op: str, tensors_and_table: int, extra: tuple) -> None:
    """Raise the TypeError a call with options passed positionally (0.1's calling convention) gets."""
    if not extra:
        return
    old = " (0.1's order: rope_decode(q, k, v, cache_seqlens, table))" if op == "rope_decode" else ""
    raise TypeError(
        f"{op}() takes {tensors_and_table} positional arguments but {tensors_and_table + len(extra)} were given: "
        f"since 0.2 every option is keyword-only{old}; call {_CALLS[op]}"
    )


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    table: RopeTable,
    *options_passed_positionally: object,
    position_ids: torch.Tensor | None = None,
    long: bool | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k with the table (differentiable), for users who keep their own attention.

    Args:
        q: ``[B, Hq, L, D]``, or ``[T, Hq, D]`` with ``cu_seqlens``.
        k: ``[B, Hk, L, D]``, or ``[T, Hk, D]``.
        table: the RoPE factor table; ``D`` must equal ``table.head_dim``.
        position_ids: ``[B, L]``, ``[1, L]`` or ``[L]`` (dense), ``[T]`` (varlen); default 0..L-1 per sequence.
        long: force the short (False) or long (True) table; None: long iff max(position)+1 > L0, decided for the
            whole batch (dense, as HF) or per sequence (varlen).
        cu_seqlens: ``[num_seqs + 1]`` int32/int64 offsets for the varlen layout.
        backend: "torch", "triton", "cuda" or None for the best available on the tensors' device.

    Returns:
        ``(q_rot, k_rot)``, same shapes and dtypes as q and k.
    """
    _reject_extra_positional("apply_rope", 3, options_passed_positionally)
    call = validation.check_rope_call(q, k, table, position_ids, long, cu_seqlens)
    return resolve(backend, call).apply_rope(call)


def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: RopeTable,
    *options_passed_positionally: object,
    position_ids: torch.Tensor | None = None,
    long: bool | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(rope(q) rope(k)^T * scale) v on PRE-RoPE q and k.

    Args:
        q: ``[B, Hq, L, D]``, or ``[T, Hq, D]`` with ``cu_seqlens``.
        k, v: ``[B, Hk, L, D]``, or ``[T, Hk, D]``; ``Hq`` must be a multiple of ``Hk``.
        table: the RoPE factor table; ``D`` must equal ``table.head_dim``.
        position_ids, long: as in :func:`apply_rope`.
        cu_seqlens: varlen layout; each sequence picks its own table.
        max_seqlen: varlen: the longest sequence (or more). Giving it saves the fused kernels a device-to-host read.
        causal: lower-triangular mask within each sequence (query i sees keys 0..i).
        softmax_scale: default ``D ** -0.5``.
        return_lse: also return the fp32 log-sum-exp of the scaled scores, ``[B, Hq, L]`` or ``[Hq, T]``.
        backend: "torch", "triton", "cuda" or None for the best available.

    Returns:
        The output, shaped and typed like q (and the lse).
    """
    _reject_extra_positional("rope_attention", 4, options_passed_positionally)
    call = validation.check_attention_call(
        q, k, v, table, position_ids, long, cu_seqlens, max_seqlen, causal, softmax_scale, return_lse
    )
    return resolve(backend, call).rope_attention(call)


def rope_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: RopeTable,
    *options_passed_positionally: object,
    cache_seqlens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of the n newest PRE-RoPE queries against a cache of PRE-RoPE keys, dense or paged.

    Because the cache holds keys before RoPE, moving a sequence from the short to the long table costs nothing:
    each call rotates with the table that sequence needs now.

    Args:
        q: ``[B, Hq, n, D]``, the n newest tokens of each sequence (n >= 1).
        k_cache, v_cache: already holding the new tokens' keys and values. Dense: ``[B, Hk, max_len, D]``. Paged
            (with ``block_table``): ``[num_blocks, block_size, Hk, D]``, FlashAttention's / vLLM's layout
            (transformers' ``PagedAttentionCache`` stores ``[num_blocks * block_size, Hk, D]``: pass
            ``.view(num_blocks, block_size, Hk, D)``).
        table: the RoPE factor table.
        cache_seqlens: ``[B]`` int32/int64: valid positions per sequence, new tokens included. The queries sit at
            positions ``cache_seqlens[b] - n .. cache_seqlens[b] - 1`` and are causal among themselves; sequence b
            uses the long table iff ``cache_seqlens[b] > L0``. Each must lie in ``[n, capacity]`` (capacity:
            ``max_len``, or ``max_blocks * block_size`` paged): a ValueError where values are checked (CPU tensors;
            GPU ones under ``set_value_checks("always")``); unchecked, an out-of-range length never reads past the
            cache and makes that sequence's output rows NaN.
        block_table: ``[B, max_blocks]`` int32 (int64 accepted; the fused kernels take a converted copy): the cache
            blocks of each sequence, in order: token j of sequence b sits at ``k_cache[block_table[b, j //
            block_size], j % block_size]``. Only the first ``ceil(cache_seqlens[b] / block_size)`` entries of a row
            are read (the rest may hold anything, e.g. -1); blocks may be shared between sequences. Each id read must
            lie in ``[0, num_blocks)``: a ValueError where values are checked; unchecked, an id outside it is never
            read through and makes that sequence's output rows NaN.
        softmax_scale: default ``D ** -0.5``.
        backend: "torch", "triton", "cuda" or None for the best available.

    Returns:
        ``[B, Hq, n, D]`` in q's dtype.
    """
    _reject_extra_positional("rope_decode", 4, options_passed_positionally)
    if cache_seqlens is None:  # required; a default only so that 0.1's positional order reaches the message above
        raise TypeError(f"rope_decode() missing the keyword argument cache_seqlens: call {_CALLS['rope_decode']}")
    call = validation.check_decode_call(q, k_cache, v_cache, table, cache_seqlens, softmax_scale, block_table)
    return resolve(backend, call).rope_decode(call)


def rerotate(
    k: torch.Tensor,
    table: RopeTable,
    *options_passed_positionally: object,
    position_ids: torch.Tensor | None = None,
    from_long: bool | None = None,
    to_long: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Move POST-RoPE keys from one table to the other in one O(L * D) pass (no re-prefill). Differentiable.

    Args:
        k: ``[B, H, L, D]`` with position_ids ``[B, L]``, ``[1, L]`` or ``[L]``; or ``[T, H, D]`` (one sequence)
            with position_ids ``[T]``.
        table: the table the keys were rotated with.
        position_ids: the keys' positions (required).
        from_long, to_long: the table the keys carry now, and the one they should carry.
        backend: "torch", "triton", "cuda" or None for the best available.

    Returns:
        The keys as if rotated with the ``to_long`` table, same shape and dtype as k.
    """
    _reject_extra_positional("rerotate", 2, options_passed_positionally)
    # Required (defaults only so that 0.1's positional order reaches the message above); named when missing.
    for name, value in (("from_long", from_long), ("to_long", to_long)):
        if value is None:
            raise TypeError(f"rerotate() missing the keyword argument {name}: call {_CALLS['rerotate']}")
    call = validation.check_rerotate_call(k, table, position_ids, from_long, to_long)
    return resolve(backend, call).rerotate(call)
