"""Split-KV (flash-decoding) attention of n new PRE-RoPE queries against a cache of PRE-RoPE keys.

One program per (sequence, kv head, KV split): the GQA group's q heads times the n new tokens are packed into the
M rows of one tile (row ``g * n + t`` is q head ``kv_head * group + g``, token t), so every key tile is loaded and
rotated once for the whole group. Each sequence picks its table (long iff ``cache_seqlens[b] > L0``) inside the
kernel from the loaded length: no host sync, and a sequence crossing L0 only changes which table the next call
reads. Slots past ``cache_seqlens[b]`` are masked on load, so garbage there (even NaN) never reaches the result.
The cache's capacity (``k_cache.shape[2]``) travels with the launch: a length outside ``[n, capacity]`` (which only
unchecked device values can carry, see :mod:`lr2kernels.ops.validation`) is clamped into it for the reads, so no key
past the cache is ever read, and that sequence's output rows are written as NaN: loud, never plausibly wrong.

With more than one split, each program writes a partial output and its log-sum-exp, and the last of a (sequence, kv
head) row block's splits to finish merges them (log-sum-exp rule), counted by an int32 arrival counter per row block
(:func:`_arrival_counters`: a workspace per device and stream that every launch leaves at 0): one launch, no
second kernel's launch gap. The keys turn only by their angle's offset from their tile's first key (a
``[BLOCK_N, HALF]`` cos/sin table of the in-tile offsets, made once per frequencies' tensor on the host and loaded by
each program, corrected to HF's fp32 angle rounding), and q
turns the other way by that first key's angle, once per tile: ``<q, R(a + o) k> = <R(-a) q, R(o) k>``.

Paged caches (``block_table``, FlashAttention's / vLLM's ``[num_blocks, block_size, Hk, D]``) are a constexpr
specialization of the same kernel (``PAGE`` = the block size; the dense kernel's machine code is unchanged): the key
tiles stay ``BLOCK_N`` keys at logical positions (so the angles, splits and merge are the dense kernel's), and each
tile's rows are found through the table (:func:`_paged_rows`): one block id per tile when the block size is a
multiple of ``BLOCK_N`` (a per-tile base, the dense loop's in-tile rows), one per block broadcast to its keys when it
divides ``BLOCK_N``, else one per key; any block size works; 32-bit per-key offsets where the cache allows. The k/v
rows still arrive by 16-byte ``cp.async`` (their offsets are multiples of the 16-divisible strides), two tiles ahead;
the block ids are loaded a trip ahead or in the trip (:func:`_ids_ahead`); fp32 takes 16-key tiles. A block id
outside ``[0, num_blocks)`` among those a sequence reads is never read through (its whole tile is masked off), and
that sequence's output rows are NaN, as for a bad length.

The launcher :func:`rope_decode` takes tensors and Python scalars only: the prepared ``[2, rotary_dim // 2]`` fp32
inverse frequencies (short row, long row), L0 and the tables' attention factors. Its offsets' cos/sin table is
cached per frequencies' tensor (:func:`_step_tables`): pass the same tensor at every call, as the package does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from lr2kernels.ops.triton._host import (
    LOG2E,
    contiguous_last,
    dot_precision,
    head_sizes,
    int32,
    new_like,
    rotary_dim_of,
    sm_count,
    split_sizes,
    triton_interpreting,
)
from lr2kernels.ops.triton._jit import (
    _angles_of,
    _attend_finish,
    _attend_tile,
    _cast,
    _head_offset,
    _inv_freq,
    _load_split,
    _rotate_cast,
    _scale,
    _sincos_if,
    _store_rows,
    _zeros_fp32,
)

__all__ = ["rope_decode"]


@triton.jit
def _fast_sincos_end(inv_freq):
    """The first tile start whose base angles ``float32(start * w)`` may leave :func:`_sincos`'s range: 105615
    (libdevice's fast-path bound) over the largest frequency, with a margin for the product's rounding."""
    top = tl.max(inv_freq[0], axis=0)
    for i in tl.static_range(1, len(inv_freq)):
        top = tl.maximum(top, tl.max(inv_freq[i], axis=0))
    return 105000.0 / top  # +inf when every frequency is 0


@triton.jit
def _step_table(STEP, is_long, STEP_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    """cos/sin ``[BLOCK_N, *]``, tiled like a half, of the in-tile offsets' angles ``float32(t * inv_freq)``,
    t < BLOCK_N: the first ``BLOCK_N`` rows of table ``is_long``'s part of ``STEP`` (:func:`_step_tables`, made once
    per frequencies' tensor on the host, in float64 rounded once). Loaded, not computed: 16 sincos a thread at 128
    channels were ~340 of the program's ~1,214 SASS before its loop (sm_90, Triton 3.9). Padding columns: cos 1,
    sin 0 (a zero frequency's)."""
    rows = tl.arange(0, BLOCK_N)
    table = STEP + is_long * (2 * STEP_ROWS * SPLIT[0])  # [2 (cos, sin), STEP_ROWS, HALF] of this table
    cos = ()
    sin = ()
    for i in tl.static_range(1 + (SPLIT[0] > SPLIT[1])):  # the tiles of a half, as _inv_freq's
        cols = i * SPLIT[1] + tl.arange(0, SPLIT[1] + i * (SPLIT[2] - SPLIT[1]))
        offsets = rows[:, None] * SPLIT[0] + cols[None, :]
        inside = (cols < SPLIT[0])[None, :]
        cos = cos + (tl.load(table + offsets, mask=inside, other=1.0),)
        sin = sin + (tl.load(table + STEP_ROWS * SPLIT[0] + offsets, mask=inside, other=0.0),)
    return cos, sin


@triton.jit
def _offset_angles(start, inv_freq, cos_step, sin_step, BLOCK_N: tl.constexpr, ORDER: tl.constexpr = 3):
    """cos/sin ``[BLOCK_N, *]`` (one tile of a half: inv_freq ``[*]`` and the step table's tile) of the keys' angles
    relative to the tile's first key, ``float32(p * inv_freq) - float32(start * inv_freq)``, p = start + t, exactly
    as HF rounds the angles, and that base angle ``[*]``.

    HF rounds each angle once, so ``float32(p w) != float32(p0 w) + float32(t w)``; the difference ``delta`` is
    computed exactly (the subtractions are of floats within a factor 2 of each other when start is a multiple of
    BLOCK_N: Sterbenz) and applied to the step table's entry as a small rotation (|delta| <= ~1 ulp of the angle,
    < 0.008 rad below 131072 positions: the cubic terms suffice). The kernel must be compiled without FMA contraction so
    that the products are rounded as in HF; the rest is written in explicit FMAs (tl.fma is exempt).

    ``ORDER`` 1 (16-bit caches, whose rotated keys are rounded to 16 bits next): the small rotation to first order,
    ``cos - delta sin`` and ``sin + delta cos``, 2 operations per entry instead of 8. delta is HF's rounding of
    ``p w`` less that of ``p0 w`` (and of ``t w``, far smaller): at most ~1 ulp of the angle, 0.0078 rad below
    131072 positions (angles < 2^17), so the dropped terms are <= delta^2 / 2 = 3.1e-5, 1.6% of a bf16 half-ulp
    (2^-9) and 13% of fp16's (2^-12); HF itself rounds its cos/sin to 16 bits, 64x (bf16) and 8x (fp16) that.
    ``ORDER`` 3 (fp32 caches): through the cubic terms, HF's fp32 cos/sin to ~1e-7.
    """
    base = start * inv_freq  # [*] float32(p0 w): the int promotes to fp32 exactly (< 2^24)
    offs = tl.arange(0, BLOCK_N)
    angle = (start + offs).to(tl.float32)[:, None] * inv_freq[None, :]  # [BLOCK_N, *] HF's angles
    step = offs.to(tl.float32)[:, None] * inv_freq[None, :]  # the step table's angles
    delta = (angle - base[None, :]) - step
    if ORDER == 1:
        cos_off = tl.fma(-sin_step, delta, cos_step)  # cos(angle - base)
        sin_off = tl.fma(cos_step, delta, sin_step)
    else:
        delta_sq = delta * delta
        cos_delta = tl.fma(delta_sq, -0.5, 1.0)
        sin_delta = delta * tl.fma(delta_sq, -1.0 / 6.0, 1.0)
        cos_off = tl.fma(-sin_step, sin_delta, cos_step * cos_delta)  # cos(angle - base)
        sin_off = tl.fma(sin_step, cos_delta, cos_step * sin_delta)
    return base, cos_off, sin_off


@triton.jit
def _tile_angles(start, inv_freq, cos_step, sin_step, attention, BLOCK_N: tl.constexpr, ORDER: tl.constexpr = 3):
    """Scaled cos/sin ``[BLOCK_N, *]`` of HF's fp32 angles ``float32(p * inv_freq)``, p = start + t: the tile's
    base angle (one sincos per frequency) composed with :func:`_offset_angles`. The kernel itself never composes
    them (it turns q by -base instead, :func:`_query_in_tile_frame`); this is their precision, tested."""
    base, cos_off, sin_off = _offset_angles(start, inv_freq, cos_step, sin_step, BLOCK_N, ORDER)
    cos_base = tl.cos(base) * attention
    sin_base = tl.sin(base) * attention
    cos = tl.fma(-sin_base[None, :], sin_off, cos_base[None, :] * cos_off)
    sin = tl.fma(sin_base[None, :], cos_off, cos_base[None, :] * sin_off)
    return cos, sin


@triton.jit
def _key_offsets(start, inv_freq, cos_step, sin_step, BLOCK_N: tl.constexpr, ORDER: tl.constexpr):
    """:func:`_offset_angles` of keys ``start .. start + BLOCK_N - 1`` for each tile of a half: (base, cos, sin)
    tiled like it."""
    base = ()
    cos = ()
    sin = ()
    for i in tl.static_range(len(inv_freq)):
        base_i, cos_i, sin_i = _offset_angles(start, inv_freq[i], cos_step[i], sin_step[i], BLOCK_N, ORDER)
        base = base + (base_i,)
        cos = cos + (cos_i,)
        sin = sin + (sin_i,)
    return base, cos, sin


@triton.jit
def _spread_sincos(angle, fast):
    """(cos, sin) of a ``[W]`` vector of angles in its own 1D layout (one angle per thread), held there by a
    one-element sum: in q's layout a thread holds several columns and would run a precise sincos (~35 SASS) for each
    of them, 8 a trip at 128 channels, where the layout change costs a few shared-memory accesses. ``fast``: every
    angle is below 105615, :func:`_sincos`'s range (one range reduction for both); else libdevice's."""
    cos, sin = _sincos_if(angle, fast)
    return tl.sum(cos[:, None], axis=1), tl.sum(sin[:, None], axis=1)


@triton.jit
def _query_rotated(q_base, q_rows, m_mask, q_pos, inv_freq, fast, attention, SPLIT: tl.constexpr):
    """q's rows ``[BLOCK_M, *]`` turned to their positions (HF's fp32 angles ``float32(pos) * inv_freq``, scaled by
    the attention factor), fp32: as ``_load_rotated``, but where ``fast`` (every angle in :func:`_sincos`'s range)
    one range reduction for each angle's cos and sin, not one apiece with a slow-path branch each: 16 rows x 64
    angles at 128 channels are 4 a thread, ~50 SASS each through ``tl.cos`` and ``tl.sin``."""
    q1, q2, qp = _load_split(q_base, q_rows, 1, m_mask, SPLIT)  # [BLOCK_M, *] fp32
    cos, sin = _angles_of(q_pos, inv_freq, attention, fast)
    return _rotate_cast(q1, q2, qp, cos, sin, tl.float32, False)


@triton.jit
def _query_in_tile_frame(q1, q2, base, fast, scale, dtype):
    """The rotated q turned by the key tile's base angle the other way, scaled, cast: ``R(-base) q scale``.

    ``<q, R(base + o) k> = <R(-base) q, R(o) k>`` (rotations are orthogonal), so the keys turn only by their offset
    in the tile (:func:`_offset_angles`) and the per-tile sincos is applied to the ``BLOCK_M`` rows of q instead of
    the ``BLOCK_N`` keys: 4 fewer operations per (key, frequency). ``scale`` carries the key's attention factor
    and the softmax scale (log2 units), so the scores need no multiply."""
    y1 = ()
    y2 = ()
    for i in tl.static_range(len(q1)):
        cos, sin = _spread_sincos(base[i], fast)
        cos = (cos * scale)[None, :]
        sin = (sin * scale)[None, :]
        y1 = y1 + (tl.fma(q1[i], cos, q2[i] * sin).to(dtype),)
        y2 = y2 + (tl.fma(-q1[i], sin, q2[i] * cos).to(dtype),)
    return y1, y2


@triton.jit
def _rotate_keys(k1, k2, kp, cos, sin, dtype):
    """The key tiles' RoPE in explicit FMAs (2 operations per output where the shared unfused rotation takes 3), cast
    to ``dtype``: (k1 cos - k2 sin, k2 cos + k1 sin, kp)."""
    y1 = ()
    y2 = ()
    for i in tl.static_range(len(k1)):
        y1 = y1 + (tl.fma(-k2[i], sin[i], k1[i] * cos[i]).to(dtype),)
        y2 = y2 + (tl.fma(k2[i], cos[i], k1[i] * sin[i]).to(dtype),)
    return y1, y2, _cast(kp, dtype)


@triton.jit
def _sequence_splits(seq_len, num_splits, min_split_keys):
    """KV splits of a sequence of ``seq_len`` keys: as many as the grid has (``num_splits``), but none shorter than
    ``min_split_keys``. From the loaded length, so the grid (sized from the capacity) needs no host sync: the
    programs of the splits a sequence does not use exit at once (nor count themselves), and the merge reads only the
    splits used."""
    return tl.maximum(tl.minimum(num_splits, tl.cdiv(seq_len, min_split_keys)), 1)


@triton.jit
def _valid_length(SEQLENS, seq, n_new, capacity):
    """(length, invalid) of sequence ``seq``: ``cache_seqlens[seq]`` clamped into ``[n_new, capacity]``, and whether
    it had to be. Keys are read only below the clamped length, so a bad length never reads past the cache; the
    kernels write NaN to an invalid sequence's output rows, so its result cannot pass for a right one."""
    given = tl.load(SEQLENS + seq)
    seq_len = tl.minimum(tl.maximum(given, n_new), capacity)
    return seq_len, seq_len != given


@triton.jit
def _row_offsets(rows, n_new, stride_h, stride_t):
    """Offset of packed row ``g * n_new + t`` (q head g of the group, new token t) in a [heads, n, D] block."""
    return (rows // n_new).to(tl.int64) * stride_h + (rows % n_new).to(tl.int64) * stride_t


@triton.jit
def _part_rows(pid_bh, pid_m, split, num_splits, local_rows, MERGE_M: tl.constexpr):
    """Rows ``local_rows`` (of the row block ``pid_m``) of split ``split`` of program ``pid_bh`` in the partials
    ``[B * Hk, m_blocks, num_splits, MERGE_M, *]``: a row block's splits ``MERGE_M`` rows apart, a constant, so
    that the merge reaches each split by an immediate offset (no address arithmetic a split)."""
    block = tl.cast(pid_bh, tl.int64) * tl.num_programs(2) + pid_m
    return (block * num_splits + split) * MERGE_M + local_rows


@triton.jit
def _paged_ids(table_row, n_start, hi, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, AHEAD: tl.constexpr):
    """The block ids of the key tile starting at ``n_start`` (those below ``hi`` only; 0 elsewhere): ``[1]`` when
    the block holds the whole tile, ``[BLOCK_N // PAGE]`` when whole blocks make up the tile, else 0 (the ids are
    loaded per key in :func:`_paged_rows`). Loaded a trip ahead by the key loop, so that the k/v addresses do not
    wait on them and the pipeliner gives them no stages of their own."""
    if PAGE % BLOCK_N == 0:
        if AHEAD:  # past the split's end: its last block's (hi >= 1)
            return tl.load(table_row + tl.minimum(n_start // PAGE, (hi - 1) // PAGE))
        return tl.load(table_row + n_start // PAGE)  # n_start < hi in the trip
    elif BLOCK_N % PAGE == 0:
        # [NB] the tile's blocks, clamped to the split's last (no mask: its keys are masked off anyway)
        first = tl.minimum(n_start // PAGE + tl.arange(0, BLOCK_N // PAGE), (hi - 1) // PAGE)
        return tl.load(table_row + first)
    else:
        return 0


@triton.jit
def _paged_rows(
    ids, k_base, v_base, table_row, n_start, n_mask, hi, num_blocks, stride_kb, stride_kt, stride_vb, stride_vt,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SAME_KV_STRIDES: tl.constexpr, INT32_ROWS: tl.constexpr,
    ALIGNED_ROWS: tl.constexpr,
):  # fmt: skip
    """Where the key tile starting at ``n_start`` (a multiple of BLOCK_N) of a paged sequence lies: (k tile base, v
    tile base, k rows, v rows, k row stride, v row stride, load mask, keys whose block id is bad); key i of the tile
    is at ``k tile base + k rows[i] * k row stride``.

    Key j sits in slot ``j % PAGE`` of block ``table_row[j // PAGE]``. A block of a multiple of BLOCK_N keys holds
    the whole tile: one block id per tile, a scalar tile base, and the in-tile rows are the loop's invariant
    ``0..BLOCK_N-1`` (the dense loop's addressing). BLOCK_N / PAGE whole blocks: their ids are loaded once each
    (``[BLOCK_N // PAGE]``), turned into one offset per block and broadcast to the block's keys, whose in-block
    offsets are the loop's invariant. Other block sizes (not dividing BLOCK_N nor a multiple of it): one id per key.
    ``INT32_ROWS``: every offset in the cache fits int32 (checked by the launcher), so the per-key offsets stay
    32-bit; ``ALIGNED_ROWS``: the strides are multiples of 16 (the launcher's check), so are the offsets (Triton 3.6
    loses that through the reshape, and with it the 16-byte ``cp.async``). ``ids``: the tile's ids from
    :func:`_paged_ids` (blocks of keys below the split's end ``hi`` only; all inside the table: the length is
    clamped to its capacity), unused with an id a key. An id outside ``[0, num_blocks)`` is not read through (its
    whole tile is masked off, its keys with an id a key: a masked lane's address is never accessed) and reported.
    ``SAME_KV_STRIDES``: v's rows are at k's offsets, computed once.
    """
    ROWS: tl.constexpr = tl.int32 if INT32_ROWS else tl.int64
    if PAGE % BLOCK_N == 0:
        block = ids  # the tile's block: n_start < the split's end
        inside = block.to(tl.uint32) < num_blocks  # one unsigned compare: a negative id wraps past num_blocks
        block = block.to(tl.int64)
        slot = tl.cast(n_start % PAGE, tl.int64)
        k_offset = block * stride_kb + slot * stride_kt
        k_tile = k_base + k_offset
        v_tile = v_base + (k_offset if SAME_KV_STRIDES else block * stride_vb + slot * stride_vt)
        k_rows = tl.arange(0, BLOCK_N)  # [BLOCK_N], the same in every tile
        v_rows = k_rows
        k_stride, v_stride = stride_kt, stride_vt
    elif BLOCK_N % PAGE == 0:  # BLOCK_N / PAGE whole blocks, one id each
        block = ids  # [BLOCK_N // PAGE], loaded by _paged_ids
        inside = block.to(tl.uint32) < num_blocks
        block = block.to(ROWS)
        slot = tl.arange(0, PAGE).to(ROWS)  # [PAGE], the same in every tile
        k_rows = tl.reshape(block[:, None] * stride_kb + slot[None, :] * stride_kt, [BLOCK_N])
        if SAME_KV_STRIDES:
            v_rows = k_rows
        else:
            v_rows = tl.reshape(block[:, None] * stride_vb + slot[None, :] * stride_vt, [BLOCK_N])
        if ALIGNED_ROWS:  # [BLOCK_N] multiples of 16: Triton 3.6's reshape forgets the strides' divisibility
            k_rows = tl.multiple_of(k_rows, 16)
            v_rows = tl.multiple_of(v_rows, 16)
        inside = tl.min(inside.to(tl.int32), axis=0) != 0  # the whole tile: one bad id masks it all
        k_tile, v_tile, k_stride, v_stride = k_base, v_base, 1, 1
    else:
        offs_n = n_start + tl.arange(0, BLOCK_N)
        block = tl.load(table_row + offs_n // PAGE, mask=n_mask, other=0)  # [BLOCK_N]
        inside = block.to(tl.uint32) < num_blocks
        block = block.to(ROWS)
        slot = (offs_n % PAGE).to(ROWS)
        k_rows = block * stride_kb + slot * stride_kt
        v_rows = k_rows if SAME_KV_STRIDES else block * stride_vb + slot * stride_vt
        k_tile, v_tile, k_stride, v_stride = k_base, v_base, 1, 1
    # tl.where, not &: Triton 3.9's interpreter refuses a mask from a vector & a scalar (its dtype comes out int8).
    load_mask = tl.where(inside, n_mask, False)
    bad = tl.where(inside, False, n_mask)
    return k_tile, v_tile, k_rows, v_rows, k_stride, v_stride, load_mask, bad


@triton.jit
def _rope_decode_kernel(
    Q, K, V, O, O_PART, LSE_PART, SEQLENS, INV_FREQ, STEP,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    num_kv_heads, group, n_new, capacity, num_splits, min_split_keys, original_max_position,
    sm_scale_log2, attention_short, attention_long,
    BLOCK_TABLE, stride_table, num_blocks, COUNTERS,
    HALF: tl.constexpr, HALF_A: tl.constexpr, HALF_B: tl.constexpr,
    PASS: tl.constexpr, PASS_A: tl.constexpr, PASS_B: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_A: tl.constexpr, HEAD_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    PAGE: tl.constexpr, SAME_KV_STRIDES: tl.constexpr, INT32_ROWS: tl.constexpr, ALIGNED_ROWS: tl.constexpr,
    IDS_AHEAD: tl.constexpr, MERGE_M: tl.constexpr, MERGE_S: tl.constexpr, MERGE_UNROLLED: tl.constexpr,
    ANGLE_ORDER: tl.constexpr, STEP_ROWS: tl.constexpr,
):  # fmt: skip
    """One (sequence, kv head) x KV split x block of packed rows: its output, or its partial output and lse.

    ``PAGE`` 0: dense caches ``[B, Hk, capacity, D]`` (strides b, h, t). ``PAGE`` > 0: paged caches ``[num_blocks,
    PAGE, Hk, D]`` read through ``BLOCK_TABLE [B, capacity / PAGE]`` (the b stride is the block's, t the slot's)."""
    SPLIT: tl.constexpr = (HALF, HALF_A, HALF_B, PASS, PASS_A, PASS_B)
    ROW: tl.constexpr = (HEAD_DIM, HEAD_A, HEAD_B)
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    seq = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads
    seq_len, invalid = _valid_length(SEQLENS, seq, n_new, capacity)
    splits = _sequence_splits(seq_len, num_splits, min_split_keys)
    if split >= splits:  # a split this sequence is too short to use
        return
    is_long = (seq_len > original_max_position).to(tl.int32)  # the table of this sequence, decided here
    attention = tl.where(is_long != 0, attention_long, attention_short)
    dtype = Q.dtype.element_ty
    num_rows = group * n_new

    # Packed rows: [BLOCK_M] = (q head of the group, new token); token t sits at position seq_len - n_new + t.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < num_rows
    q_pos = seq_len - n_new + offs_m % n_new
    q_base = Q + _head_offset(seq, kv_head * group, 0, stride_qb, stride_qh, 0)
    q_rows = _row_offsets(offs_m, n_new, stride_qh, stride_qt)
    inv_freq = _inv_freq(INV_FREQ, is_long, SPLIT)  # [*] tiled like a half
    fast_sincos_end = _fast_sincos_end(inv_freq)
    q1, q2, qp = _query_rotated(
        q_base, q_rows, m_mask, q_pos, inv_freq, seq_len <= fast_sincos_end, attention, SPLIT
    )  # [BLOCK_M, *] fp32, turned into each key tile's frame in the loop
    qp = _cast(_scale(qp, sm_scale_log2), dtype)  # the pass-through channels do not turn
    key_scale = attention * sm_scale_log2  # the keys' attention factor and the softmax scale, carried by q

    # This split's key range: the sequence's length shared evenly among its splits, in whole key tiles.
    chunk = tl.cdiv(tl.cdiv(seq_len, splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    cos_step, sin_step = _step_table(STEP, is_long, STEP_ROWS, BLOCK_N, SPLIT)  # [BLOCK_N, *], once per program
    if PAGE == 0:
        k_base = K + _head_offset(seq, kv_head, 0, stride_kb, stride_kh, 0)
        v_base = V + _head_offset(seq, kv_head, 0, stride_vb, stride_vh, 0)
    else:  # the sequence's blocks come per key tile from its row of the table
        k_base = K + _head_offset(0, kv_head, 0, 0, stride_kh, 0)
        v_base = V + _head_offset(0, kv_head, 0, 0, stride_vh, 0)
        table_row = BLOCK_TABLE + tl.cast(seq, tl.int64) * stride_table
        bad_block = tl.zeros([BLOCK_N], dtype=tl.int1)  # keys of this split whose block id is out of range
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = _zeros_fp32(BLOCK_M, ROW)  # [BLOCK_M, *] row tiles
    # Ids a trip ahead: the first tile's here, each trip loads the next's.
    ids = _paged_ids(table_row, lo, hi, PAGE, BLOCK_N, True) if PAGE != 0 and IDS_AHEAD else 0
    for n_start in range(lo, hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        if PAGE == 0:
            k_tile, v_tile, k_stride, v_stride = k_base, v_base, stride_kt, stride_vt
            k_rows, v_rows, kv_mask = offs_n, offs_n, n_mask
        else:
            tile_ids = ids if IDS_AHEAD else _paged_ids(table_row, n_start, hi, PAGE, BLOCK_N, False)
            k_tile, v_tile, k_rows, v_rows, k_stride, v_stride, kv_mask, bad = _paged_rows(
                tile_ids, k_base, v_base, table_row, n_start, n_mask, hi, num_blocks, stride_kb, stride_kt, stride_vb,
                stride_vt, PAGE, BLOCK_N, SAME_KV_STRIDES, INT32_ROWS, ALIGNED_ROWS,
            )  # fmt: skip
            bad_block = bad_block | bad
            if IDS_AHEAD:
                ids = _paged_ids(table_row, n_start + BLOCK_N, hi, PAGE, BLOCK_N, True)
        # The keys turn by their offsets in the tile (the angle-addition table), q by minus the tile's base angle.
        k1, k2, kp = _load_split(k_tile, k_rows, k_stride, kv_mask, SPLIT)  # [BLOCK_N, *]
        base, cos_k, sin_k = _key_offsets(n_start, inv_freq, cos_step, sin_step, BLOCK_N, ANGLE_ORDER)
        k1, k2, kp = _rotate_keys(k1, k2, kp, cos_k, sin_k, dtype)
        fast = n_start < fast_sincos_end  # every base angle of this tile in _sincos's range
        q1_t, q2_t = _query_in_tile_frame(q1, q2, base, fast, key_scale, dtype)  # [BLOCK_M, *]
        visible = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])  # causal among the new tokens
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q1_t, q2_t, qp, k1, k2, kp, visible, 1.0, v_tile, v_rows, v_stride, kv_mask,
            ROW, PRECISION,
        )  # fmt: skip

    # A row that sees nothing in this split: output 0, lse -inf.
    out, lse = _attend_finish(acc, m_i, l_i)  # [BLOCK_M, *] row tiles, [BLOCK_M] log2 units
    if PAGE != 0:
        # A block id outside [0, num_blocks) was never read through (its keys loaded as 0); its sequence's rows are
        # poisoned: here, and through the merge by a NaN partial of lse +inf (2^(inf - inf) = NaN there).
        poisoned = tl.max(bad_block.to(tl.int32), axis=0) != 0
        invalid = invalid | poisoned
        if IS_SPLIT:
            out = _scale(out, tl.where(poisoned, float("nan"), 1.0))
            lse = tl.where(poisoned, float("inf"), lse)
    if IS_SPLIT:
        # Partials [B * Hk, m_blocks, num_splits, MERGE_M, HEAD_DIM] fp32 and their lse (the same, less HEAD_DIM).
        # A row block's real rows are among its first MERGE_M (MERGE_M >= min(BLOCK_M, num_rows)). All MERGE_M are
        # stored (a padding row's q is 0: finite), so that the merge reads them unmasked and nothing unwritten.
        local_m = tl.arange(0, BLOCK_M)
        part_rows = _part_rows(pid_bh, pid_m, split, num_splits, local_m, MERGE_M)
        _store_rows(O_PART, part_rows, HEAD_DIM, local_m < MERGE_M, out, ROW)
        tl.store(LSE_PART + part_rows, lse, mask=local_m < MERGE_M)
        # The last of this row block's splits to finish merges them all (no second launch). The barrier puts
        # every thread's partial stores before the counter's release; the acquire puts the others' before the
        # merge's loads. The merger resets the counter, so it is 0 again for the next launch.
        tl.debug_barrier()
        counter = COUNTERS + pid_bh * tl.num_programs(2) + pid_m
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == splits - 1:
            tl.store(counter, 0)
            o_base = O + _head_offset(seq, kv_head * group, 0, stride_ob, stride_oh, 0)
            _merge_splits(
                O_PART, LSE_PART, o_base, pid_bh, pid_m, num_splits, splits, num_rows, n_new, stride_oh, stride_ot,
                invalid, BLOCK_M, HEAD_DIM, HEAD_A, MERGE_M, MERGE_S, MERGE_UNROLLED,
            )  # fmt: skip
    else:
        o_base = O + _head_offset(seq, kv_head * group, 0, stride_ob, stride_oh, 0)
        o_rows = _row_offsets(offs_m, n_new, stride_oh, stride_ot)
        _store_rows(o_base, o_rows, 1, m_mask, _scale(out, tl.where(invalid, float("nan"), 1.0)), ROW)


@triton.jit
def _merge_splits(
    O_PART, LSE_PART, o_base, pid_bh, pid_m, num_splits, splits, num_rows, n_new, stride_oh, stride_ot, invalid,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_A: tl.constexpr, MERGE_M: tl.constexpr,
    MERGE_S: tl.constexpr, MERGE_UNROLLED: tl.constexpr,
):  # fmt: skip
    """Combine the ``splits`` partials of one (sequence, kv head) row block into its output rows: out = sum_s
    2^(lse_s - max) o_s / sum_s 2^(lse_s - max), NaN rows for an invalid length.

    ``MERGE_S`` splits at a time as one ``[MERGE_S, MERGE_M, HEAD_A]`` load: one round trip to L2 a chunk, where a
    loop over the splits would wait for each. ``MERGE_M`` rows: the row block's first rows, a power of two (1 for
    MHA with one new token, not BLOCK_M's 16); a split's rows are ``MERGE_M`` apart in the partials
    (:func:`_part_rows`), every one of them written by the split (padding rows too), so the rows load unmasked;
    only the real ones are stored. Loads bypass L1 (``.cg``): the partials were written by other SMs.

    ``MERGE_UNROLLED``: the chunk's splits as ``MERGE_S`` loads of ``[MERGE_M, HEAD_A]``, unrolled, added element
    by element (:func:`_merge_chunk`): where a split's rows give each thread 4 or more elements (the 3D tile's
    reduction over the splits crosses lanes and warps)."""
    rows = pid_m * BLOCK_M + tl.arange(0, MERGE_M)  # [MERGE_M] packed rows
    row_mask = rows < num_rows
    cols = tl.arange(0, HEAD_A)
    tl.static_assert(HEAD_A >= HEAD_DIM)  # the decode holds a head in one tile (head_sizes(one_tile=True))
    first = _part_rows(pid_bh, pid_m, 0, num_splits, 0, MERGE_M)  # this row block's split 0, row 0
    part_first = O_PART + first * HEAD_DIM
    lse_first = LSE_PART + first
    # The running max and weight sum: [MERGE_M] rows unrolled, [MERGE_M, 1] beside the 3D tile (its layout).
    if MERGE_UNROLLED:
        m_i = tl.full([MERGE_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([MERGE_M], dtype=tl.float32)
    else:
        m_i = tl.full([MERGE_M, 1], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([MERGE_M, 1], dtype=tl.float32)
    acc = tl.zeros([MERGE_M, HEAD_A], dtype=tl.float32)
    whole = splits // MERGE_S * MERGE_S  # the chunks that are whole take no mask; the last, if partial, does
    for s0 in range(0, whole, MERGE_S):
        m_i, l_i, acc = _merge_any(part_first, lse_first, s0, splits, m_i, l_i, acc, False, MERGE_UNROLLED,
                                   HEAD_DIM, HEAD_A, MERGE_M, MERGE_S)  # fmt: skip
    if whole < splits:
        m_i, l_i, acc = _merge_any(part_first, lse_first, whole, splits, m_i, l_i, acc, True, MERGE_UNROLLED,
                                   HEAD_DIM, HEAD_A, MERGE_M, MERGE_S)  # fmt: skip
    if MERGE_UNROLLED:
        l_i = l_i[:, None]
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)
    out = out * tl.where(invalid, float("nan"), 1.0)
    o_rows = _row_offsets(rows, n_new, stride_oh, stride_ot)
    tl.store(o_base + o_rows[:, None] + cols[None, :], out.to(o_base.dtype.element_ty),
             mask=row_mask[:, None] & (cols < HEAD_DIM)[None, :])  # fmt: skip


@triton.jit
def _merge_tile3d(
    part_first, lse_first, s0, splits, m_i, l_i, acc, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_A: tl.constexpr, MERGE_M: tl.constexpr, MERGE_S: tl.constexpr,
):  # fmt: skip
    """Splits ``s0 .. s0 + MERGE_S`` (``MASKED``: those below ``splits``) into the running (m_i, l_i ``[MERGE_M,
    1]``, acc ``[MERGE_M, HEAD_A]``) as one ``[MERGE_S, MERGE_M, HEAD_A]`` load and a reduction over the splits."""
    s = s0 + tl.arange(0, MERGE_S)
    idx = (s[:, None] * MERGE_M + tl.arange(0, MERGE_M)[None, :])[:, :, None]  # [MERGE_S, MERGE_M, 1] partial rows
    cols = tl.arange(0, HEAD_A)[None, None, :]
    if MASKED:
        mask = (s < splits)[:, None, None]
        lse = tl.load(lse_first + idx, mask=mask, other=float("-inf"), cache_modifier=".cg")  # log2 units
        if HEAD_A > HEAD_DIM:
            mask = mask & (cols < HEAD_DIM)
        part = tl.load(part_first + idx * HEAD_DIM + cols, mask=mask, other=0.0, cache_modifier=".cg")
    else:
        lse = tl.load(lse_first + idx, cache_modifier=".cg")
        if HEAD_A > HEAD_DIM:
            part = tl.load(part_first + idx * HEAD_DIM + cols, mask=cols < HEAD_DIM, other=0.0, cache_modifier=".cg")
        else:
            part = tl.load(part_first + idx * HEAD_DIM + cols, cache_modifier=".cg")  # [MERGE_S, MERGE_M, HEAD_A]
    m_new = tl.maximum(m_i, tl.max(lse, axis=0))  # [MERGE_M, 1]
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    weight = tl.exp2(lse - m_safe[None, :, :])  # 0 for a split that saw no key of this row; NaN if poisoned
    acc = acc * alpha + tl.sum(weight * part, axis=0)
    l_i = l_i * alpha + tl.sum(weight, axis=0)
    return m_new, l_i, acc


@triton.jit
def _merge_any(
    part_first, lse_first, s0, splits, m_i, l_i, acc, MASKED: tl.constexpr, UNROLLED: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_A: tl.constexpr, MERGE_M: tl.constexpr, MERGE_S: tl.constexpr,
):  # fmt: skip
    """One chunk of the merge, unrolled (:func:`_merge_chunk`) or as a 3D tile (:func:`_merge_tile3d`)."""
    if UNROLLED:
        return _merge_chunk(part_first, lse_first, s0, splits, m_i, l_i, acc, MASKED, HEAD_DIM, HEAD_A, MERGE_M,
                            MERGE_S)  # fmt: skip
    else:
        return _merge_tile3d(part_first, lse_first, s0, splits, m_i, l_i, acc, MASKED, HEAD_DIM, HEAD_A, MERGE_M,
                             MERGE_S)  # fmt: skip


@triton.jit
def _merge_chunk(
    part_first, lse_first, s0, splits, m_i, l_i, acc, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_A: tl.constexpr, MERGE_M: tl.constexpr, MERGE_S: tl.constexpr,
):  # fmt: skip
    """Splits ``s0 .. s0 + MERGE_S`` (``MASKED``: those below ``splits``) into the running (m_i, l_i, acc).

    The running max and the weights come from per-split lse loads, the weights' sum from the chunk's lse as one
    ``[MERGE_S, MERGE_M]`` load (a reduction over the splits). Summed a split at a time, the sum's chain was kept
    in another layout than the accumulator's rows, and with it a second copy of every lse load, max and exp2
    (881 SASS a chunk of 32 splits x 8 rows at 128 channels, sm_90, Triton 3.9; 411 so on 3.9 and 410 on 3.6).
    Max and sum both from the 2D load is 360 on 3.9 but 457 on 3.6, whose weights then change layout a split
    through shared memory (72 barriers a chunk)."""
    offs_s = tl.arange(0, MERGE_S)
    local = tl.arange(0, MERGE_M)
    cols = tl.arange(0, HEAD_A)
    lse_chunk = lse_first + s0 * MERGE_M
    part_chunk = part_first + (s0 * MERGE_M) * HEAD_DIM
    lse_all_ptrs = lse_chunk + offs_s[:, None] * MERGE_M + local[None, :]  # [MERGE_S, MERGE_M]
    if MASKED:
        lse_all = tl.load(lse_all_ptrs, mask=(s0 + offs_s < splits)[:, None], other=float("-inf"), cache_modifier=".cg")
    else:
        lse_all = tl.load(lse_all_ptrs, cache_modifier=".cg")  # log2 units
    lse = ()
    part = ()
    m_new = m_i
    for j in tl.static_range(MERGE_S):
        lse_ptrs = lse_chunk + j * MERGE_M + local  # [MERGE_M]
        part_ptrs = part_chunk + (j * MERGE_M) * HEAD_DIM + local[:, None] * HEAD_DIM + cols[None, :]
        if MASKED:
            valid = (s0 + j + local * 0) < splits  # [MERGE_M], a vector: see _paged_rows
            lse_j = tl.load(lse_ptrs, mask=valid, other=float("-inf"), cache_modifier=".cg")
            mask = valid[:, None] & (cols < HEAD_DIM)[None, :]
            part_j = tl.load(part_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        else:
            lse_j = tl.load(lse_ptrs, cache_modifier=".cg")
            if HEAD_A > HEAD_DIM:
                part_j = tl.load(part_ptrs, mask=(cols < HEAD_DIM)[None, :], other=0.0, cache_modifier=".cg")
            else:
                part_j = tl.load(part_ptrs, cache_modifier=".cg")  # [MERGE_M, HEAD_A]
        lse = lse + (lse_j,)
        part = part + (part_j,)
        m_new = tl.maximum(m_new, lse_j)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    acc = acc * alpha[:, None]
    l_i = l_i * alpha + tl.sum(tl.exp2(lse_all - m_safe[None, :]), axis=0)
    for j in tl.static_range(MERGE_S):
        weight = tl.exp2(lse[j] - m_safe)  # 0 for a split that saw no key of this row; NaN if poisoned
        acc = tl.fma(part[j], weight[:, None], acc)
    return m_new, l_i, acc


# ------------------------------------------------------------------------------------------------ host side
_MAX_SPLITS = 256
_STEP_ROWS = 128  # the angle-addition table's rows: the largest key tile (_block_sizes)
_STEP_TABLES = WeakTensorKeyDictionary()  # inv_freq tensor -> (its version, its step tables)
_MIN_SPLIT_TILES = 4  # a split's prologue (q and its sincos, the step table's load) is worth about one key tile
_NUM_STAGES = 3  # software pipeline: the k and v tiles of the next two trips load (cp.async) during this one
# Paged with a block id per key (a block size neither dividing BLOCK_N nor a multiple of it): the ids are a load in
# the loop that the k/v addresses depend on; Triton's pipeliner gives that chain its own stages, and only 5 keep two
# k/v tiles in flight as the dense kernel does. Other block sizes load their ids a trip ahead (_paged_ids): 3.
_NUM_STAGES_PAGED = 5
_INT32_ROWS_LIMIT = 2**31  # paged: 32-bit per-key offsets while every k/v offset from a head's base is below
# The in-kernel merge's chunk of partials, [MERGE_S, MERGE_M, HEAD_A] fp32, per thread: each chunk is an L2 round
# trip, so more splits a chunk, fewer trips. 128 (64 before): SmolLM2's 88 splits in 2 chunks, not 3 (H200 32K,
# 50% -> 51% on Triton 3.9, 47% -> 49% on 3.6); 128 splits of one kv head at head 128 in 4, not 8 (merge 9.8 ->
# 8.1 us); 203-216 -> 216-244 registers, 0 spills as launched (sm_80, sm_90; 256 spills 480-700 B).
_MERGE_ELEMENTS_PER_THREAD = 128
_COUNTERS: dict[tuple[str, int], Tensor] = {}  # (device, stream) -> int32 arrival counters, all 0 between launches


def _arrival_counters(device: torch.device, count: int) -> Tensor:
    """``count`` int32 counters, each 0, for the split programs of one launch to count their arrivals
    (the last merges and resets its counter to 0, so they are 0 again after every launch: no memset per step).

    One workspace per (device, stream): launches on one stream are ordered, so they never share counters at
    once; two streams get two. Grown (a new zeroed tensor) when a launch needs more; a CUDA graph captures the
    workspace it saw, which its launches leave at 0 as well."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        if device.type != "meta":
            _COUNTERS[key] = counters
    return counters


def _refuse_capture(device: torch.device) -> None:
    """A table made inside a CUDA graph capture would only be recorded: cached, it would hold nothing for a call
    outside the graph until the graph replays. Refused, with what to do."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "rope_decode: the RoPE step table for these frequencies would be made inside a CUDA graph capture, "
            "where it is only recorded; run one decode step before capturing (a warm-up step, as CUDA-graph "
            "runners do), and the capture reuses the table made then"
        )


def _step_tables(inv_freq: Tensor) -> Tensor:
    """``[2, 2, _STEP_ROWS, HALF]`` fp32 (table: short, long; cos, sin; in-tile offset t; frequency) of the angles
    ``float32(t) * inv_freq`` rounded in fp32 as HF's (and as the kernel's were), their cos/sin in float64 rounded
    once: the kernel's angle-addition table (:func:`_step_table`), the same for every program and every call.

    Cached per ``inv_freq`` tensor (weakly: it goes with the tensor) and its version (an in-place change makes a new
    one). The package's calls pass one cached tensor per (table, device) (:func:`rotary.inv_freq_pair`), so the table
    is made once; a caller passing a new tensor at every call gets a new table at every call (a few small ops)."""
    # An inference tensor has no version counter: no cache (it could change in place unseen).
    version = None if inv_freq.is_inference() else inv_freq._version
    cached = _STEP_TABLES.get(inv_freq) if version is not None else None
    if cached is not None and cached[0] == version:
        return cached[1]
    _refuse_capture(inv_freq.device)
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, whatever the caller's mode
        offsets = torch.arange(_STEP_ROWS, device=inv_freq.device, dtype=torch.float32)
        angles = (offsets[:, None] * inv_freq[:, None, :]).double()  # [2, _STEP_ROWS, HALF]: fp32 products
        step = torch.stack([angles.cos(), angles.sin()], dim=1).float().contiguous()
    if version is not None:
        _STEP_TABLES[inv_freq] = (version, step)
    return step


def _merge_tile(num_rows: int, block_m: int, num_splits: int, head_dim: int, num_warps: int) -> tuple[int, int, bool]:
    """(MERGE_M, MERGE_S, MERGE_UNROLLED) of the in-kernel merge (:func:`_merge_splits`): its rows (a row block's
    real rows, a power of two), its splits per chunk (``_MERGE_ELEMENTS_PER_THREAD`` fp32 of partials a thread, so
    that most merges take one or two loads), and whether the chunk's splits are unrolled (a split's rows give each
    thread 4 fp32 or more)."""
    merge_m = min(block_m, triton.next_power_of_2(num_rows))
    per_split = merge_m * triton.next_power_of_2(head_dim)
    threads = 32 * num_warps
    budget = _MERGE_ELEMENTS_PER_THREAD * threads
    merge_s = min(triton.next_power_of_2(num_splits), max(1, triton.next_power_of_2(budget // per_split + 1) // 2))
    return merge_m, merge_s, per_split >= 4 * threads


# Auto splits may drop to a whole number of merge chunks when that keeps at least this share of them: 66 -> 64
# (GQA 16/2 at head 128, 32 splits a chunk), 132 -> 128 (MQA 8/1).
_WHOLE_CHUNK_KEEP = 0.9


def _whole_merge_chunks(num_splits: int, chunk: int) -> int:
    """``num_splits`` less the few that would take the merge one more chunk of ``chunk`` splits: each chunk is an
    L2 round trip and a trip of the merge's loop on the one SM that merges (1.9 us at head 128 and 8 rows on H200 in
    the model), where a split less costs the loop a 1/splits share of one SM. Kept as they are when dropping them
    would lose more than 10% (SmolLM2's 88 splits in chunks of 64 stay 88)."""
    whole = num_splits // chunk * chunk
    return whole if whole >= 1 and whole >= _WHOLE_CHUNK_KEEP * num_splits else num_splits


def _angle_order(dtype: torch.dtype) -> int:
    """The order of the keys' angle correction (:func:`_offset_angles`): 1 for 16-bit caches (the keys are rounded
    to 16 bits after it; 96 fewer SASS a trip at head 128, of ~665), 3 for fp32 (HF's fp32 cos/sin to ~1e-7)."""
    return 3 if dtype == torch.float32 else 1


def _ids_ahead(page: int, block_n: int, block_m: int = 16) -> bool:
    """Paged: whether the key loop loads the next tile's block ids a trip ahead (:func:`_paged_ids`; 3 stages, the
    dense kernel's) rather than this tile's in the trip (the pipeliner then gives their chain stages of its own:
    ``_NUM_STAGES_PAGED``). Where it is the shorter trip as compiled (sm_90, head 128, docs/decode_bandwidth.md):
    Triton 3.6 with blocks dividing BLOCK_N (16 keys: 742 -> 703 SASS a trip), Triton 3.9 with blocks a multiple
    of it, BLOCK_N included (256 keys: 672 -> 666). Per-key ids (other block sizes) are always loaded in the trip.
    32-row tiles on Triton 3.6 load them ahead with blocks a multiple of BLOCK_N too: in the trip, with its 5
    stages, the unsplit 32 x 64 tile at head 128 (96 of them turning) spills 12 B on sm_80 (255 registers; ahead:
    255, 0 B)."""
    if page == 0 or (page % block_n and block_n % page):
        return False
    old_triton = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7)
    if page % block_n == 0:
        return not old_triton or block_m > 16
    return old_triton


def _block_sizes(num_rows: int, head_dim: int, dtype: torch.dtype, paged: bool = False) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N); BLOCK_M >= 16 keeps tl.dot legal for a single new token.

    At most 32 rows (more rows take more programs): as launched, 64-row tiles spill in the unsplit store path (8 B
    at head 64 on sm_80, Triton 3.9), and at 128 they sit at 255 registers. Above 128 channels 16 rows and 16-key
    tiles (32 x 256 tiles spill 16-20 B unsplit; 32-key fp32 tiles need 180 KB of shared memory, over sm_80's
    163 KB). See docs/decode_bandwidth.md.
    """
    block_m = max(16, min(32, triton.next_power_of_2(num_rows)))
    if triton_interpreting():
        return block_m, 32  # few, small tiles: the interpreter runs every lane in numpy
    if head_dim > 128:
        return 16, 16
    if dtype == torch.float32:
        # Paged fp32 in 16-key tiles: the 32-key tiles' per-key block offsets spill (8-52 B on Triton 3.6).
        return block_m, 16 if paged else 32
    if 64 < head_dim <= 96 and block_m == 16:
        # 128-key tiles at 80-96 channels (one new token of MHA or GQA <= 16): a trip's fixed work (q turned by the
        # tile's base angle, the softmax's row statistics) spreads over twice the keys: 604 -> ~1,010 SASS for
        # twice the bytes at 96 channels (sm_90, Triton 3.9), 64-66% -> 76-79% of H200's bandwidth predicted
        # (paged: 59-61% -> 69-73%); 139-142 KB of shared memory, under sm_80's 163 KB; 0 spills, as launched.
        return block_m, 128
    return block_m, 64


def _num_warps(head_dim: int, block_m: int = 16) -> int:
    """Warps of the decode kernel: 8 above 64 channels (4 warps spill registers on sm_80 at 128) or
    above 16 rows (64-row tiles spilled 56 B in 4 warps at head 64 on sm_80, as launched)."""
    return 8 if (head_dim > 64 or block_m > 16) and not triton_interpreting() else 4


def _programs_per_sm(head_dim: int) -> int:
    """Decode programs one SM holds at once, as compiled (docs/decode_bandwidth.md): above 64 channels 8 warps of
    ~190-230 registers, one; at 64 and below 4 warps of ~200, two."""
    return 1 if head_dim > 64 else 2


def _num_splits(programs: int, max_len: int, block_n: int, device: torch.device, head_dim: int = 128) -> int:
    """The grid's splits per (sequence, kv head): one wave of programs when every sequence fills the cache (as many
    as the SMs hold at once, :func:`_programs_per_sm`, rounded down so that they spread evenly), each >=
    ``_MIN_SPLIT_TILES`` key tiles. A second wave would pay its programs' prologue (q and its sincos, ~1.5 key
    tiles) with no load in flight on that SM: at batch 1, 32K and 8 kv heads, 33 splits in two waves were predicted
    at 66% of H200's bandwidth, 16 in one at 72% (before the step table was loaded).

    Decided from the cache's capacity (no host sync); each sequence then uses as many of them as its own length
    fills (:func:`_sequence_splits`), so a short sequence in a long cache costs a few idle programs, not splits of
    a tile each.
    """
    tiles = triton.cdiv(max_len, block_n)
    if triton_interpreting() or device.type != "cuda":
        return 2 if tiles >= 2 * _MIN_SPLIT_TILES else 1
    slots = sm_count(device) * _programs_per_sm(head_dim)
    if programs >= slots:
        return 1
    return max(1, min(slots // programs, tiles // _MIN_SPLIT_TILES, _MAX_SPLITS))


def _auto_splits(
    programs: int, max_len: int, block_n: int, device: torch.device, head_dim: int, num_rows: int, block_m: int,
    num_warps: int,
) -> int:
    """The launcher's splits per (sequence, kv head) when the caller gives none: one wave
    (:func:`_num_splits`), less the few that would take the merge one more chunk (:func:`_whole_merge_chunks`)."""
    num_splits = _num_splits(programs, max_len, block_n, device, head_dim)
    chunk = _merge_tile(num_rows, block_m, num_splits, head_dim, num_warps)[1]
    return _whole_merge_chunks(num_splits, chunk)


def rope_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, inv_freq: Tensor, original_max_position: int,
    attention_short: float, attention_long: float, softmax_scale: float, num_splits: int | None = None,
    min_split_keys: int | None = None, block_table: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Decode attention of n new PRE-RoPE queries on a PRE-RoPE cache, dense or paged.

    Args:
        q: ``[B, Hq, n, D]``, the n newest tokens; k_cache, v_cache: ``[B, Hk, max_len, D]``, new tokens included,
            or paged ``[num_blocks, block_size, Hk, D]`` with ``block_table``.
        cache_seqlens: ``[B]`` valid positions per sequence (new tokens included; made int32 contiguous).
        inv_freq: ``[2, rotary_dim // 2]`` fp32, the short table's inverse frequencies then the long table's.
        original_max_position: L0; a sequence uses the long table iff its length is > L0.
        attention_short, attention_long: the tables' attention factors; softmax_scale: the resolved scale.
        num_splits: the grid's KV splits per (sequence, kv head), the most any sequence uses; None picks from the
            cache's capacity and the GPU's SM count.
        min_split_keys: the fewest keys per split: a sequence of length L uses ``min(num_splits,
            ceil(L / min_split_keys))`` splits; None: ``_MIN_SPLIT_TILES`` key tiles.

    Returns:
        ``[B, Hq, n, D]`` in q's dtype, contiguous.
    """
    if isinstance(num_splits, bool) or not (num_splits is None or (isinstance(num_splits, int) and num_splits >= 1)):
        raise ValueError(f"num_splits: expected an int >= 1 or None, got {num_splits!r}")
    if isinstance(min_split_keys, bool) or not (
        min_split_keys is None or (isinstance(min_split_keys, int) and min_split_keys >= 1)
    ):
        raise ValueError(f"min_split_keys: expected an int >= 1 or None, got {min_split_keys!r}")
    q, k_cache, v_cache = (contiguous_last(x) for x in (q, k_cache, v_cache))
    out = new_like(q)
    if q.numel() == 0:
        return out
    batch, num_q_heads, n_new, head_dim = q.shape
    if block_table is None:
        num_kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
        # (batch, head, token) strides
        k_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
        v_strides = (v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
        table, table_args, page, int32_rows, aligned_rows = None, (0, 0), 0, False, False
    else:
        num_blocks, page, num_kv_heads = k_cache.shape[:3]
        max_len = block_table.shape[1] * page  # the capacity
        # (block, head, slot) strides: the kernel's "batch" stride is the block's
        k_strides = (k_cache.stride(0), k_cache.stride(2), k_cache.stride(1))
        v_strides = (v_cache.stride(0), v_cache.stride(2), v_cache.stride(1))
        table = int32(block_table)
        table_args = (table.stride(0), num_blocks)
        # The largest k/v offset from a head's base (block, slot): 32-bit per-key offsets when it fits.
        aligned_rows = all(x % 16 == 0 for x in (*k_strides, *v_strides))
        int32_rows = all(
            (num_blocks - 1) * s[0] + (page - 1) * s[2] < _INT32_ROWS_LIMIT for s in (k_strides, v_strides)
        )
    group = num_q_heads // num_kv_heads
    num_rows = group * n_new
    block_m, block_n = _block_sizes(num_rows, head_dim, q.dtype, paged=page != 0)
    ids_ahead = _ids_ahead(page, block_n, block_m)
    m_blocks = triton.cdiv(num_rows, block_m)
    num_warps = _num_warps(head_dim, block_m)
    if num_splits is None:
        programs = batch * num_kv_heads * m_blocks
        num_splits = _auto_splits(programs, max_len, block_n, q.device, head_dim, num_rows, block_m, num_warps)
    if min_split_keys is None:
        min_split_keys = _MIN_SPLIT_TILES * block_n

    is_split = num_splits > 1
    merge = _merge_tile(num_rows, block_m, num_splits, head_dim, num_warps) if is_split else (1, 1, False)
    if is_split:
        # A row block's splits MERGE_M rows apart (_part_rows): [B * Hk, m_blocks, num_splits, MERGE_M, *]
        parts = (batch * num_kv_heads, m_blocks, num_splits, merge[0])
        o_part = torch.empty((*parts, head_dim), dtype=torch.float32, device=q.device)
        lse_part = torch.empty(parts, dtype=torch.float32, device=q.device)
        counters = _arrival_counters(q.device, batch * num_kv_heads * m_blocks)
    else:
        o_part = lse_part = out  # unused
        counters = None
    sizes = head_sizes(head_dim, one_tile=True)  # 16-row tiles: a 16-channel tile would be replicated
    out_strides = (out.stride(0), out.stride(1), out.stride(2))
    seqlens = int32(cache_seqlens)
    if counters is None:
        counters = seqlens  # unused: any int32 pointer
    assert block_n <= _STEP_ROWS, (block_n, _STEP_ROWS)
    _rope_decode_kernel[(batch * num_kv_heads, num_splits, m_blocks)](
        q, k_cache, v_cache, out, o_part, lse_part, seqlens, inv_freq, _step_tables(inv_freq),
        q.stride(0), q.stride(1), q.stride(2), *k_strides, *v_strides,
        *out_strides, num_kv_heads, group, n_new, max_len, num_splits, min_split_keys, original_max_position,
        softmax_scale * LOG2E, attention_short, attention_long, table, *table_args, counters,
        **split_sizes(head_dim, rotary_dim_of(inv_freq)), **sizes,
        BLOCK_M=block_m, BLOCK_N=block_n, IS_SPLIT=is_split, PRECISION=dot_precision(q.dtype), PAGE=page,
        SAME_KV_STRIDES=page != 0 and k_strides == v_strides, INT32_ROWS=int32_rows,
        ALIGNED_ROWS=aligned_rows,
        MERGE_M=merge[0], MERGE_S=merge[1], MERGE_UNROLLED=merge[2],
        IDS_AHEAD=ids_ahead, ANGLE_ORDER=_angle_order(q.dtype), STEP_ROWS=_STEP_ROWS, num_warps=num_warps,
        num_stages=_NUM_STAGES_PAGED if page and not ids_ahead else _NUM_STAGES,
        maxnreg=255,  # else ptxas caps itself at 128 and spills as launched (16 B at 96 channels on sm_80)
        enable_fp_fusion=False,  # the angle products must round as HF's do (see _tile_angles)
    )  # fmt: skip
    return out
