"""Plain-torch ground truth for every public op: slow, obviously correct, fp32 or fp64.

Every backend is tested against these functions. They take the same arguments as the public ops in
``lr2kernels.ops`` (inputs are assumed valid: the public layer validates), compute in float32 (float64 when the
inputs are float64) and return results in the input dtype.

Layouts: dense ``[batch, heads, seq, head_dim]`` (as SDPA); varlen ``[total_tokens, heads, head_dim]`` with
``cu_seqlens [num_seqs + 1]`` (as FlashAttention's varlen API). q, k, v are PRE-RoPE.

Which table (short / long): dense inputs follow HF's rule for the whole batch (long iff max(position)+1 > L0);
varlen inputs and decode choose per sequence.
"""

from __future__ import annotations

import torch

from lr2kernels.tables import RopeTable

__all__ = [
    "apply_rope",
    "attention",
    "broadcast_dense",
    "default_position_ids",
    "inverse_rotate",
    "paged_sequence",
    "repeat_kv",
    "rerotate",
    "rope_attention",
    "rope_decode",
    "rotate",
    "sequence_long_flags",
    "token_cos_sin",
]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` (NeoX split-half pairing); the rest pass through.

    ``cos``/``sin`` (HF layout: both halves equal) already carry the attention factor and broadcast against
    ``x[..., :rotary_dim]``. Written literally as transformers does: ``x * cos + rotate_half(x) * sin``.
    """
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = x_rot.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)  # HF's rotate_half
    return torch.cat((x_rot * cos + rotated_half * sin, x_pass), dim=-1)


def inverse_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo :func:`rotate` for scaled ``cos = a cos(t)``, ``sin = a sin(t)``: rotate by -t and divide by a."""
    scale_sq = cos * cos + sin * sin  # a^2, per channel
    return rotate(x, cos / scale_sq, -sin / scale_sq)


def default_position_ids(seq_len: int, device: torch.device, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """0..L-1 (dense, ``[L]``), or 0..len_i-1 for each sequence of a varlen batch (``[total_tokens]``)."""
    if cu_seqlens is None:
        return torch.arange(seq_len, device=device)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    return torch.arange(int(cu_seqlens[-1]), device=device) - starts


def sequence_long_flags(table: RopeTable, position_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> list[bool]:
    """Per sequence of a varlen batch: long table iff the sequence's max position + 1 exceeds L0."""
    flags = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        flags.append(end > start and table.use_long(int(position_ids[start:end].max()) + 1))
    return flags


def token_cos_sin(
    table: RopeTable,
    position_ids: torch.Tensor,
    long: bool | None,
    cu_seqlens: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin per token: ``[..., L, rotary_dim]`` (dense) or ``[T, rotary_dim]`` (varlen), in ``dtype``."""
    if cu_seqlens is None or long is not None:
        cos, sin = table.cos_sin(position_ids, long=long)
        return cos.to(dtype), sin.to(dtype)
    cos_parts, sin_parts = [], []
    bounds = cu_seqlens.tolist()
    for (start, end), seq_long in zip(
        zip(bounds[:-1], bounds[1:]), sequence_long_flags(table, position_ids, cu_seqlens)
    ):
        cos, sin = table.cos_sin(position_ids[start:end], long=seq_long)
        cos_parts.append(cos)
        sin_parts.append(sin)
    return torch.cat(cos_parts).to(dtype), torch.cat(sin_parts).to(dtype)


def broadcast_dense(cos: torch.Tensor) -> torch.Tensor:
    # [L, r] -> [1, 1, L, r];  [B, L, r] -> [B, 1, L, r]
    return cos[None, None] if cos.dim() == 2 else cos[:, None]


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    table: RopeTable,
    position_ids: torch.Tensor | None = None,
    long: bool | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k), computed in fp32/fp64 and returned in the input dtype.

    Args:
        q: ``[B, Hq, L, D]`` or varlen ``[T, Hq, D]``.
        k: ``[B, Hk, L, D]`` or varlen ``[T, Hk, D]``.
        position_ids: ``[B, L]`` / ``[L]`` (dense) or ``[T]`` (varlen); default 0..L-1 per sequence.
        long: force a table; ``None`` = HF's batch rule (dense) or per sequence (varlen).
    """
    dtype = _compute_dtype(q)
    varlen = cu_seqlens is not None
    if position_ids is None:
        position_ids = default_position_ids(q.shape[0] if varlen else q.shape[-2], q.device, cu_seqlens)
    cos, sin = token_cos_sin(table, position_ids, long, cu_seqlens, dtype)
    cos, sin = (cos[:, None], sin[:, None]) if varlen else (broadcast_dense(cos), broadcast_dense(sin))
    q_rot = rotate(q.to(dtype), cos, sin)
    k_rot = rotate(k.to(dtype), cos, sin)
    return q_rot.to(q.dtype), k_rot.to(k.dtype)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float, query_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v for ``[B, H, Lq, D]`` with kv heads repeated already; query i sits at key index
    ``query_offset + i`` for the causal mask. Fully masked rows give 0 output and lse -inf."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * softmax_scale  # [B, H, Lq, Lk]
    if causal:
        lq, lk = scores.shape[-2:]
        rows = torch.arange(lq, device=q.device)[:, None] + query_offset
        cols = torch.arange(lk, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Lq]
    probs = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(scores.dtype).min))
    probs = torch.nan_to_num(probs, nan=0.0)
    return torch.matmul(probs, v), lse


def repeat_kv(x: torch.Tensor, num_q_heads: int, head_axis: int) -> torch.Tensor:
    # GQA: kv head h serves q heads h*g .. h*g+g-1 (as HF's repeat_kv).
    return x.repeat_interleave(num_q_heads // x.shape[head_axis], dim=head_axis)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Naive attention on already-rotated q, k. lse: ``[B, H, L]`` (dense) or ``[H, T]`` (varlen), fp32/fp64."""
    dtype = _compute_dtype(q)
    softmax_scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    k, v = repeat_kv(k, q.shape[1], 1), repeat_kv(v, q.shape[1], 1)
    if cu_seqlens is None:
        out, lse = _attend(q, k, v, causal, softmax_scale)
    else:
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=dtype, device=q.device)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end == start:
                continue
            # [L, H, D] -> [1, H, L, D]
            qs, ks, vs = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))
            o, l_ = _attend(qs, ks, vs, causal, softmax_scale)
            out[start:end] = o[0].transpose(0, 1)
            lse[:, start:end] = l_[0]
    return (out, lse) if return_lse else out


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
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention on PRE-RoPE q, k: rotate with the table (in fp32/fp64), then naive attention.

    Returns the output in v's dtype (and the fp32/fp64 lse when ``return_lse``).
    """
    dtype = _compute_dtype(q)
    q_rot, k_rot = apply_rope(q.to(dtype), k.to(dtype), table, position_ids, long, cu_seqlens)
    out, lse = attention(q_rot, k_rot, v.to(dtype), causal, softmax_scale, cu_seqlens, return_lse=True)
    return (out.to(v.dtype), lse) if return_lse else out.to(v.dtype)


def paged_sequence(cache: torch.Tensor, block_table: torch.Tensor, seq: int, length: int) -> torch.Tensor:
    """The first ``length`` slots of sequence ``seq`` of a paged cache as a dense ``[Hk, length, D]`` tensor.

    ``cache``: ``[num_blocks, block_size, Hk, D]``; token j of the sequence is
    ``cache[block_table[seq, j // block_size], j % block_size]``. Only the blocks the length reaches are read.
    """
    block_size = cache.shape[1]
    blocks = block_table[seq, : -(-length // block_size)].long()  # ceil(length / block_size) ids
    return cache[blocks].flatten(0, 1)[:length].transpose(0, 1)  # [n_blocks * bs, Hk, D] -> [Hk, length, D]


def rope_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    table: RopeTable,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of n new PRE-RoPE queries against a cache of PRE-RoPE keys.

    Args:
        q: ``[B, Hq, n, D]``: the n newest tokens of each sequence.
        k_cache, v_cache: ``[B, Hk, max_len, D]``, or paged ``[num_blocks, block_size, Hk, D]`` with
            ``block_table``; they already hold the new tokens' keys/values.
        cache_seqlens: ``[B]`` valid positions per sequence, the new tokens included. Queries sit at positions
            ``cache_seqlens[b] - n .. cache_seqlens[b] - 1`` and are causal among themselves; keys at 0..len-1.
            Each sequence uses the long table iff ``cache_seqlens[b] > L0``.
        block_table: ``[B, max_blocks]``: the paged caches' blocks of each sequence (see :func:`paged_sequence`);
            the sequence is gathered, then attended as a dense one.

    Returns:
        ``[B, Hq, n, D]`` in v's dtype (and lse ``[B, Hq, n]`` when ``return_lse``).
    """
    dtype = _compute_dtype(q)
    softmax_scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    batch, num_q_heads, n_new, _ = q.shape
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    lse = torch.full((batch, num_q_heads, n_new), float("-inf"), dtype=dtype, device=q.device)
    for b, seq_len in enumerate(cache_seqlens.tolist()):
        if block_table is None:
            k_seq, v_seq = k_cache[b, :, :seq_len], v_cache[b, :, :seq_len]  # [Hk, len, D]
        else:
            k_seq = paged_sequence(k_cache, block_table, b, seq_len)
            v_seq = paged_sequence(v_cache, block_table, b, seq_len)
        cos, sin = table.cos_sin(torch.arange(seq_len, device=q.device), long=table.use_long(seq_len))
        cos, sin = cos.to(dtype), sin.to(dtype)  # [len, rotary_dim], broadcast over heads
        q_b = rotate(q[b].to(dtype), cos[seq_len - n_new :], sin[seq_len - n_new :])  # [Hq, n, D]
        k_b = rotate(k_seq.to(dtype), cos, sin)  # [Hk, len, D]
        k_b = repeat_kv(k_b, num_q_heads, 0)
        v_b = repeat_kv(v_seq.to(dtype), num_q_heads, 0)
        o, l_ = _attend(q_b[None], k_b[None], v_b[None], True, softmax_scale, query_offset=seq_len - n_new)
        out[b], lse[b] = o[0], l_[0]
    return (out.to(v_cache.dtype), lse) if return_lse else out.to(v_cache.dtype)


def rerotate(
    k: torch.Tensor,
    table: RopeTable,
    position_ids: torch.Tensor,
    from_long: bool,
    to_long: bool,
) -> torch.Tensor:
    """Move POST-RoPE keys from one table to the other: undo the ``from`` rotation, apply the ``to`` one (fp64).

    Args:
        k: ``[B, H, L, D]`` with position_ids ``[B, L]`` / ``[L]``, or ``[T, H, D]`` with position_ids ``[T]``.
    """
    cos_from, sin_from = (c.double() for c in table.cos_sin(position_ids, long=from_long))
    cos_to, sin_to = (c.double() for c in table.cos_sin(position_ids, long=to_long))
    if k.dim() == 4:
        cos_from, sin_from, cos_to, sin_to = (broadcast_dense(c) for c in (cos_from, sin_from, cos_to, sin_to))
    else:
        cos_from, sin_from, cos_to, sin_to = (c[:, None] for c in (cos_from, sin_from, cos_to, sin_to))
    k_pre = inverse_rotate(k.double(), cos_from, sin_from)
    return rotate(k_pre, cos_to, sin_to).to(k.dtype)
