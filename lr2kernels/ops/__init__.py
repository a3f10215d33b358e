"""Public ops: validate the inputs, choose a backend, call it.

Layouts: dense ``[batch, heads, seq, head_dim]`` (as SDPA) or varlen ``[total_tokens, heads, head_dim]`` with
``cu_seqlens`` (as FlashAttention's varlen API). q, k, v are PRE-RoPE; k/v may have fewer heads than q (GQA).
"""

from __future__ import annotations

import torch

from lr2kernels.ops import validation
from lr2kernels.ops.dispatch import available_backends, resolve
from lr2kernels.tables import RopeTable

__all__ = ["apply_rope", "available_backends", "rerotate", "rope_attention", "rope_decode"]


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    table: RopeTable,
    position_ids: torch.Tensor | None = None,
    long: bool | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k with the table (differentiable), for users who keep their own attention.

    Args:
        q: ``[B, Hq, L, D]``, or ``[T, Hq, D]`` with ``cu_seqlens``.
        k: ``[B, Hk, L, D]``, or ``[T, Hk, D]``.
        table: the RoPE factor table; ``D`` must equal ``table.head_dim``.
        position_ids: ``[B, L]`` or ``[L]`` (dense), ``[T]`` (varlen); default 0..L-1 per sequence.
        long: force the short (False) or long (True) table; None: long iff max(position)+1 > L0, decided for the
            whole batch (dense, as HF) or per sequence (varlen).
        cu_seqlens: ``[num_seqs + 1]`` int32/int64 offsets for the varlen layout.
        backend: "torch", "triton", "cuda" or None for the best available on the tensors' device.

    Returns:
        ``(q_rot, k_rot)``, same shapes and dtypes as q and k.
    """
    _, cu_seqlens, position_ids = validation.check_qk(q, k, table, cu_seqlens, position_ids)
    validation.check_long(long)
    return resolve(backend, q.device).apply_rope(q, k, table, position_ids, long, cu_seqlens)


def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: RopeTable,
    position_ids: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    long: bool | None = None,
    backend: str | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(rope(q) rope(k)^T * scale) v on PRE-RoPE q and k.

    Args:
        q: ``[B, Hq, L, D]``, or ``[T, Hq, D]`` with ``cu_seqlens``.
        k, v: ``[B, Hk, L, D]``, or ``[T, Hk, D]``; ``Hq`` must be a multiple of ``Hk``.
        table: the RoPE factor table; ``D`` must equal ``table.head_dim``.
        position_ids: as in :func:`apply_rope`.
        causal: lower-triangular mask within each sequence (query i sees keys 0..i).
        softmax_scale: default ``D ** -0.5``.
        cu_seqlens, max_seqlen: varlen layout; each sequence picks its own table.
        long: force a table for the whole call (see :func:`apply_rope`).
        backend: "torch", "triton", "cuda" or None for the best available.
        return_lse: also return the fp32 log-sum-exp of the scaled scores, ``[B, Hq, L]`` or ``[Hq, T]``.

    Returns:
        The output, shaped and typed like q (and the lse).
    """
    shape, cu_seqlens, position_ids = validation.check_qk(q, k, table, cu_seqlens, position_ids)
    v = validation.check_v(v, k)
    validation.check_softmax_scale(softmax_scale)
    validation.check_long(long)
    max_seqlen = validation.check_max_seqlen(max_seqlen, cu_seqlens)
    impl = resolve(backend, q.device)
    return impl.rope_attention(
        q, k, v, table, position_ids, bool(causal), softmax_scale, cu_seqlens, max_seqlen, long, bool(return_lse)
    )


def rope_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    table: RopeTable,
    backend: str | None = None,
    *,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention of the n newest PRE-RoPE queries against a cache of PRE-RoPE keys.

    Because the cache holds keys before RoPE, moving a sequence from the short to the long table costs nothing:
    each call rotates with the table that sequence needs now.

    Args:
        q: ``[B, Hq, n, D]``, the n newest tokens of each sequence (n >= 1).
        k_cache, v_cache: ``[B, Hk, max_len, D]``, already holding the new tokens' keys and values.
        cache_seqlens: ``[B]`` int32/int64: valid positions per sequence, new tokens included. The queries sit at
            positions ``cache_seqlens[b] - n .. cache_seqlens[b] - 1`` and are causal among themselves; sequence b
            uses the long table iff ``cache_seqlens[b] > L0``.
        table: the RoPE factor table.
        backend: "torch", "triton", "cuda" or None for the best available.
        softmax_scale: default ``D ** -0.5``.

    Returns:
        ``[B, Hq, n, D]`` in q's dtype.
    """
    cache_seqlens = validation.check_decode(q, k_cache, v_cache, cache_seqlens, table)
    validation.check_softmax_scale(softmax_scale)
    return resolve(backend, q.device).rope_decode(q, k_cache, v_cache, cache_seqlens, table, softmax_scale)


def rerotate(
    k: torch.Tensor,
    table: RopeTable,
    position_ids: torch.Tensor,
    from_long: bool,
    to_long: bool,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Move POST-RoPE keys from one table to the other in one O(L * D) pass (no re-prefill).

    Args:
        k: ``[B, H, L, D]`` with position_ids ``[B, L]`` or ``[L]``; or ``[T, H, D]`` with position_ids ``[T]``.
        table: the table the keys were rotated with.
        position_ids: the keys' positions (required).
        from_long, to_long: the table the keys carry now, and the one they should carry.
        backend: "torch", "triton", "cuda" or None for the best available.

    Returns:
        The keys as if rotated with the ``to_long`` table, same shape and dtype as k.
    """
    validation.check_table(table)
    k = validation.check_tensor("k", k)
    if k.dim() not in (3, 4):
        raise ValueError(f"k: expected [B, H, L, D] or [T, H, D], got shape {tuple(k.shape)}")
    validation.check_head_dim("k", k, table)
    if position_ids is None:
        raise ValueError("position_ids: expected the keys' positions, got None")
    varlen = k.dim() == 3
    shape = validation.AttentionShape(
        varlen, 1 if varlen else k.shape[0], k.shape[0] if varlen else k.shape[2], k.shape[1], k.shape[1], k.shape[-1]
    )
    validation.check_position_ids(position_ids, shape, k.device)
    for name, flag in (("from_long", from_long), ("to_long", to_long)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    return resolve(backend, k.device).rerotate(k, table, position_ids, from_long, to_long)
