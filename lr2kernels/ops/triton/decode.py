"""Split-KV (flash-decoding) attention of n new PRE-RoPE queries against a cache of PRE-RoPE keys.

One program per (sequence, kv head, KV split): the GQA group's q heads times the n new tokens are packed into the
M rows of one tile (row ``g * n + t`` is q head ``kv_head * group + g``, token t), so every key tile is loaded and
rotated once for the whole group. Each sequence picks its table (long iff ``cache_seqlens[b] > L0``) inside the
kernel from the loaded length: no host sync, and a sequence crossing L0 only changes which table the next call
reads. Slots past ``cache_seqlens[b]`` are masked on load, so garbage there (even NaN) never reaches the result.

With more than one split, each program writes a partial output and its log-sum-exp, and a second kernel merges the
splits (log-sum-exp rule). The key angles come from one precise sincos per key tile plus a per-program
``[BLOCK_N, HALF]`` sincos table of the in-tile offsets (angle addition), corrected to HF's fp32 angle rounding.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lr2kernels.ops.triton._rope import _angles, _load_rows, _load_split, _online_softmax_step, _rotate, split_sizes
from lr2kernels.ops.triton.attention import _qk_scores, inv_freq_pair, triton_interpreting
from lr2kernels.tables import RopeTable

__all__ = ["rope_decode"]


@triton.jit
def _step_table(inv_freq, BLOCK_N: tl.constexpr):
    """cos/sin ``[BLOCK_N, HALF_PAD]`` of the in-tile offsets' angles ``float32(t * inv_freq)``, t < BLOCK_N."""
    step = tl.arange(0, BLOCK_N).to(tl.float32)[:, None] * inv_freq[None, :]
    return tl.cos(step), tl.sin(step)


@triton.jit
def _tile_angles(start, inv_freq, cos_step, sin_step, attention, BLOCK_N: tl.constexpr):
    """Scaled cos/sin ``[BLOCK_N, HALF_PAD]`` of HF's fp32 angles ``float32(p * inv_freq)``, p = start + t.

    One sincos per frequency at the tile start p0, then angle addition with the step table. HF rounds each angle
    once, so ``float32(p w) != float32(p0 w) + float32(t w)``; the difference ``delta`` is computed exactly (the
    subtractions are of floats within a factor 2 of each other when start is a multiple of BLOCK_N: Sterbenz) and
    applied as a small rotation (|delta| <= ~1 ulp of the angle, < 0.01 rad at 131K positions: the cubic terms
    suffice). The kernel must be compiled without FMA contraction so that the products are rounded as in HF.
    """
    base = start * inv_freq  # [HALF_PAD] float32(p0 w): the int promotes to fp32 exactly (< 2^24)
    cos_base = tl.cos(base) * attention
    sin_base = tl.sin(base) * attention
    offs = tl.arange(0, BLOCK_N)
    angle = (start + offs).to(tl.float32)[:, None] * inv_freq[None, :]  # [BLOCK_N, HALF_PAD] HF's angles
    step = offs.to(tl.float32)[:, None] * inv_freq[None, :]  # the step table's angles
    delta = (angle - base[None, :]) - step
    delta_sq = delta * delta
    cos_delta = 1.0 - 0.5 * delta_sq
    sin_delta = delta - delta * delta_sq * (1.0 / 6.0)
    cos_off = cos_step * cos_delta - sin_step * sin_delta  # cos(angle - base)
    sin_off = sin_step * cos_delta + cos_step * sin_delta
    cos = cos_base[None, :] * cos_off - sin_base[None, :] * sin_off
    sin = sin_base[None, :] * cos_off + cos_base[None, :] * sin_off
    return cos, sin


@triton.jit
def _row_offsets(rows, n_new, stride_h, stride_t):
    """Offset of packed row ``g * n_new + t`` (q head g of the group, new token t) in a [heads, n, D] block."""
    return (rows // n_new).to(tl.int64) * stride_h + (rows % n_new).to(tl.int64) * stride_t


@triton.jit
def _decode_kernel(
    Q, K, V, O, O_PART, LSE_PART, SEQLENS, INV_FREQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    num_kv_heads, group, n_new, num_splits, original_max_position,
    sm_scale_log2, attention_short, attention_long,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    seq = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = (pid_bh % num_kv_heads).to(tl.int64)
    seq_len = tl.load(SEQLENS + seq)
    is_long = (seq_len > original_max_position).to(tl.int32)  # the table of this sequence, decided here
    attention = tl.where(is_long != 0, attention_long, attention_short)
    dtype = Q.dtype.element_ty
    num_rows = group * n_new

    # Packed rows: [BLOCK_M] = (q head of the group, new token); token t sits at position seq_len - n_new + t.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < num_rows
    q_pos = seq_len - n_new + offs_m % n_new
    q_base = Q + seq * stride_qb + kv_head * group * stride_qh
    q_rows = _row_offsets(offs_m, n_new, stride_qh, stride_qt)
    q1, q2, qp = _load_split(q_base, q_rows, 1, m_mask, HALF, HALF_PAD, PASS, PASS_PAD)  # [BLOCK_M, *]
    cos_q, sin_q = _angles(q_pos, INV_FREQ, is_long, attention, HALF, HALF_PAD)
    q1, q2 = _rotate(q1, q2, cos_q, sin_q)
    q1, q2, qp = q1.to(dtype), q2.to(dtype), qp.to(dtype)

    # This split's key range: the sequence's length shared evenly, in whole key tiles.
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    cols = tl.arange(0, HALF_PAD)
    inv_freq = tl.load(INV_FREQ + is_long * HALF + cols, mask=cols < HALF, other=0.0)  # [HALF_PAD]
    cos_step, sin_step = _step_table(inv_freq, BLOCK_N)  # [BLOCK_N, HALF_PAD], once per program
    k_base = K + seq * stride_kb + kv_head * stride_kh
    v_base = V + seq * stride_vb + kv_head * stride_vh
    d_cols = tl.arange(0, HEAD_DIM_PAD)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for n_start in range(lo, hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        k1, k2, kp = _load_split(k_base, offs_n, stride_kt, n_mask, HALF, HALF_PAD, PASS, PASS_PAD)  # [BLOCK_N, *]
        cos_k, sin_k = _tile_angles(n_start, inv_freq, cos_step, sin_step, attention, BLOCK_N)
        k1, k2 = _rotate(k1, k2, cos_k, sin_k)
        scores = _qk_scores(q1, q2, qp, k1.to(dtype), k2.to(dtype), kp.to(dtype), PASS, PRECISION) * sm_scale_log2
        visible = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])  # causal among the new tokens
        scores = tl.where(visible, scores, float("-inf"))  # [BLOCK_M, BLOCK_N], log2 units
        p, alpha, m_i, l_i = _online_softmax_step(scores, m_i, l_i)
        v = _load_rows(v_base, offs_n, stride_vt, n_mask, HEAD_DIM, HEAD_DIM_PAD)  # [BLOCK_N, HEAD_DIM_PAD]
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision=PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row that sees nothing in this split: output 0, lse -inf
    out = acc / l_safe[:, None]
    out_mask = m_mask[:, None] & (d_cols < HEAD_DIM)[None, :]
    if IS_SPLIT:
        # Partials [B * Hk, num_splits, num_rows, HEAD_DIM] fp32 and their lse [B * Hk, num_splits, num_rows].
        part_rows = (pid_bh * num_splits + split).to(tl.int64) * num_rows + offs_m
        tl.store(O_PART + part_rows[:, None] * HEAD_DIM + d_cols[None, :], out, mask=out_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(LSE_PART + part_rows, lse, mask=m_mask)
    else:
        o_base = O + seq * stride_ob + kv_head * group * stride_oh
        o_rows = _row_offsets(offs_m, n_new, stride_oh, stride_ot)
        tl.store(o_base + o_rows[:, None] + d_cols[None, :], out.to(O.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_kernel(
    O, O_PART, LSE_PART,
    stride_ob, stride_oh, stride_ot,
    num_kv_heads, group, n_new, num_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Combine the splits of one (sequence, kv head) row block: out = sum_s 2^(lse_s - max) o_s / sum_s 2^(...)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    seq = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = (pid_bh % num_kv_heads).to(tl.int64)
    num_rows = group * n_new
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < num_rows
    d_cols = tl.arange(0, HEAD_DIM_PAD)
    mask = m_mask[:, None] & (d_cols < HEAD_DIM)[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for split in range(0, num_splits):
        part_rows = (pid_bh * num_splits + split).to(tl.int64) * num_rows + offs_m
        lse = tl.load(LSE_PART + part_rows, mask=m_mask, other=float("-inf"))  # [BLOCK_M], log2 units
        part = tl.load(O_PART + part_rows[:, None] * HEAD_DIM + d_cols[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m_i, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        weight = tl.exp2(lse - m_safe)  # 0 for a split that saw no key of this row
        acc = acc * alpha[:, None] + weight[:, None] * part
        l_i = l_i * alpha + weight
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_base = O + seq * stride_ob + kv_head * group * stride_oh
    o_rows = _row_offsets(offs_m, n_new, stride_oh, stride_ot)
    tl.store(o_base + o_rows[:, None] + d_cols[None, :], out.to(O.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ host side
LOG2E = 1.4426950408889634
_MAX_SPLITS = 64


def _block_sizes(num_rows: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N); BLOCK_M >= 16 keeps tl.dot legal for a single new token."""
    block_m = max(16, min(64, triton.next_power_of_2(num_rows)))
    if triton_interpreting():
        return block_m, 32  # few, small tiles: the interpreter runs every lane in numpy
    if head_dim > 128 or dtype == torch.float32:
        return block_m, 32
    return block_m, 64


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(programs: int, max_len: int, block_n: int, device: torch.device) -> int:
    """Splits per (sequence, kv head): enough programs for about two waves on the GPU, >= 4 key tiles each.

    Decided from the cache's capacity, not from ``cache_seqlens`` (no host sync); the kernel then shares each
    sequence's actual length evenly among the splits.
    """
    tiles = triton.cdiv(max_len, block_n)
    if triton_interpreting() or device.type != "cuda":
        return 2 if tiles >= 4 else 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), tiles // 4, _MAX_SPLITS))


def _contiguous_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rope_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    table: RopeTable,
    softmax_scale: float | None = None,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention on a PRE-RoPE cache (inputs validated by ``lr2kernels.ops.rope_decode``).

    Args:
        q: ``[B, Hq, n, D]`` PRE-RoPE queries of the n newest tokens.
        k_cache, v_cache: ``[B, Hk, max_len, D]`` PRE-RoPE keys and values, the new tokens included.
        cache_seqlens: ``[B]`` valid positions per sequence (new tokens included).
        table: the :class:`~lr2kernels.tables.RopeTable`.
        softmax_scale: default ``D ** -0.5``.
        num_splits: KV splits per (sequence, kv head); None picks from the cache size and the GPU's SM count.

    Returns:
        ``[B, Hq, n, D]`` in q's dtype.
    """
    q, k_cache, v_cache = (_contiguous_last(x) for x in (q, k_cache, v_cache))
    batch, num_q_heads, n_new, head_dim = q.shape
    num_kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    num_rows = group * n_new
    block_m, block_n = _block_sizes(num_rows, head_dim, q.dtype)
    m_blocks = triton.cdiv(num_rows, block_m)
    if num_splits is None:
        num_splits = _num_splits(batch * num_kv_heads * m_blocks, max_len, block_n, q.device)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits: expected an int >= 1 or None, got {num_splits!r}")

    seqlens = cache_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    is_split = num_splits > 1
    if is_split:
        o_part = torch.empty((batch * num_kv_heads, num_splits, num_rows, head_dim), dtype=torch.float32,
                             device=q.device)  # fmt: skip
        lse_part = torch.empty((batch * num_kv_heads, num_splits, num_rows), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = out  # unused
    sm_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    grid = (batch * num_kv_heads, num_splits, m_blocks)
    _decode_kernel[grid](
        q, k_cache, v_cache, out, o_part, lse_part, seqlens, inv_freq_pair(table, q.device),
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        num_kv_heads, group, n_new, num_splits, table.original_max_position,
        sm_scale * LOG2E, table.attention_factor_for(False), table.attention_factor_for(True),
        **split_sizes(head_dim, table.rotary_dim), HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_M=block_m, BLOCK_N=block_n, IS_SPLIT=is_split,
        PRECISION="ieee" if q.dtype == torch.float32 else None,
        enable_fp_fusion=False,  # the angle products must round as HF's do (see _tile_angles)
    )  # fmt: skip
    if is_split:
        _merge_kernel[(batch * num_kv_heads, m_blocks)](
            out, o_part, lse_part,
            out.stride(0), out.stride(1), out.stride(2),
            num_kv_heads, group, n_new, num_splits,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_M=block_m,
        )  # fmt: skip
    return out
