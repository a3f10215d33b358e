"""Fused rescaled-RoPE flash attention (FlashAttention-2 style) forward and backward, dense and varlen.

q and k arrive PRE-RoPE and the gradients go back w.r.t. the pre-RoPE q and k. The tiles a program keeps (its own
block of queries in the forward and dq, its block of keys in dk/dv) are rotated in registers once, with the table of
their sequence (short or long). The tiles a program loops over (keys in the forward and dq, queries in dk/dv) would
be rotated again by every program that visits them: at 128K tokens, 1,000 query blocks x the GQA group each recompute
the sin/cos of every key, which dominated the instructions per key tile (benchmarks/results/triton_compile.md). So
by default (``staged=True``) the launcher rotates those once, in one :func:`lr2kernels.ops.triton.rope.apply_rope`
pass into a scratch buffer that lives for the launch only, and the loop loads them ready; ``staged=False`` keeps the
older per-tile rotation (same results; the compile report measures both).

Dense ``[B, H, L, D]`` and varlen ``[T, H, D]`` share one kernel body: varlen is a batch whose sequence bounds
come from ``cu_seqlens`` (IS_VARLEN). GQA maps q head h to kv head ``h // (Hq // Hk)``; the dk/dv program of a kv
head loops over its q heads, so no atomics are needed (where that grid would under-fill the GPU, the group is split
into parts whose fp32 partial sums the launcher adds: :func:`dkdv_group_splits`).

Launchers (:func:`rope_attention_fwd`, :func:`rope_attention_bwd`) take tensors and Python scalars only, prepared
by the caller (``lr2kernels.ops``): the ``[2, rotary_dim // 2]`` fp32 inverse frequencies (short row, long row),
an int32 long-table flag per sequence, int32 positions / ``cu_seqlens`` and a host-side ``max_seqlen``. They never
read device data on the host. Every output is allocated contiguous and written with its own strides.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

from lr2kernels.ops.triton._host import (
    LOG2E,
    bht_strides,
    contiguous_last,
    dot_precision,
    ensure_scratch_allocator,
    head_sizes,
    new_like,
    rotary_dim_of,
    sequence_args,
    sequence_grid,
    sequences,
    sm_count,
    split_sizes,
    tma_aligned,
    tma_capable,
    triton_interpreting,
)
from lr2kernels.ops.triton._jit import (
    _attend_finish,
    _dot_acc,
    _head_offset,
    _load_pairs_rotated,
    _load_rotated,
    _load_row_descriptors,
    _load_row_tiles,
    _load_rows,
    _load_split_native,
    _pair_angles,
    _pair_channels,
    _positions,
    _rotate_rows,
    _row_descriptor,
    _row_dot,
    _sequence_program,
    _store_pairs_transposed,
    _store_rows,
    _store_split,
    _zeros_fp32,
)
from lr2kernels.ops.triton.rope import apply_rope

__all__ = ["rope_attention_bwd", "rope_attention_fwd"]


def _configs(backward: bool) -> list[triton.Config]:
    """Autotune space: Ampere/Hopper tiles on a GPU; one small tile in the interpreter (numpy runs every lane)."""
    if triton_interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    tiles = [(64, 64), (64, 32), (32, 64)] if backward else [(128, 128), (128, 64), (128, 32), (64, 64), (64, 32)]
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n in tiles
        for w in (4, 8)
        for s in ((2, 3) if not backward else (2,))
    ]
    if backward:  # smaller tiles: the only spill-free ones at 256 channels and with partial rotary (_KEEP)
        configs += [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=8, num_stages=2)
                    for m, n in ((32, 32), (32, 16), (16, 32))]  # fmt: skip
    return configs


# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the backward kernels. The tile a program keeps sits on the MMA's row
# side, 64 or 128 rows (dq's BLOCK_M queries, dk/dv's BLOCK_N keys): wgmma on sm_90 takes 64 rows per warp group, so
# 128 rows take 8 warps and 64 rows 4 (64 rows over 8 warps repeat MMA work: 34 wgmma per trip where dq needs 18).
# The loop's tile divides it, so the causal diagonal starts and ends on a loop tile. dk/dv's 64 x 64 over 8 warps
# and the last, narrower tiles are for sm_80 and for 256 channels, whose fp32 dq or dk + dv alone take 128 registers
# a thread at 128 rows over 8 warps (the keep lists say where each is spill-free).
_BWD_TILES = {
    "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (128, 32, 8, 3), (128, 16, 8, 2), (64, 64, 4, 2),
           (64, 32, 4, 2), (64, 16, 4, 2), (64, 16, 8, 2), (32, 16, 8, 2)],
    "dkdv": [(64, 128, 8, 2), (32, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2),
             (16, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (16, 64, 4, 2), (16, 32, 8, 2)],
    # The two passes above 128 channels (dkdv_two_pass), one fp32 accumulator each: the tiles kept on one arch
    # or the other at 256 channels (_KEEP).
    "dv": [(32, 128, 8, 2), (16, 128, 8, 2), (16, 64, 4, 2), (64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)],
    "dk": [(32, 128, 8, 2), (16, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)],
}  # fmt: skip


def _bwd_configs(kind: str) -> list[triton.Config]:
    """Autotune space of the backward kernel ``kind`` ("dq", "dkdv", or a pass "dv" / "dk"): :data:`_BWD_TILES`;
    in the interpreter, one small config whose causal diagonal spans two loop tiles (numpy runs every lane)."""
    if triton_interpreting():
        m, n = (32, 16) if kind == "dq" else (16, 32)
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in _BWD_TILES[kind]]


def _device_arch() -> int:
    """The arch family the keep lists know: 90 (Hopper and newer) or 80 (Ampere, Ada)."""
    major, _ = torch.cuda.get_device_capability()
    return 90 if major >= 9 else 80


def _prune_configs(
    configs: list[triton.Config], named_args: dict, arch: int | None = None, **kwargs
) -> list[triton.Config]:
    """Drop the tiles that spill registers at this head size (ptxas, Triton 3.9 and 3.6) where a spill-free one is
    left (benchmarks/compile_report.py, benchmarks/results/triton_compile.md). Keyed on the kernel (by its argument
    names), the constexprs ``HEAD_DIM`` and ``PASS``, and, where the two archs need different tiles, the GPU's
    arch (``arch``: the compile report's target; else the current device's); head sizes not measured keep every
    tile."""
    if triton_interpreting():
        return configs
    kind = "dq" if "DQ" in named_args else "fwd"
    if "DK" in named_args:  # the dk/dv kernel, fused or one of its two passes
        kind = "dkdv" if kwargs["WITH_DK"] and kwargs["WITH_DV"] else "dk" if kwargs["WITH_DK"] else "dv"
    head_dim = kwargs.get("HEAD_DIM", 128)
    partial = 2 * kwargs.get("HALF", head_dim // 2) < head_dim  # a pass-through (the backward has no PASS)
    keep = _KEEP.get((kind, head_dim, partial))
    if isinstance(keep, dict):
        keep = keep[arch or _device_arch()]
    if keep is None:
        return configs
    kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]
    return kept or configs


def _tiles(tiles: list[tuple[int, int, int]], stages: tuple[int, ...] = (2, 3)) -> set[tuple[int, int, int, int]]:
    return {(m, n, w, s) for m, n, w in tiles for s in stages}


# (kernel, HEAD_DIM, partial rotary) -> the spill-free (BLOCK_M, BLOCK_N, num_warps, num_stages) on both archs.
_KEEP: dict[tuple[str, int, bool], set[tuple[int, int, int, int]] | dict[int, set[tuple[int, int, int, int]]]] = {
    # The forward holds its k/v tiles and its rotated q in shared memory; spill-free as launched (ptxas -v, Triton
    # 3.9 and 3.6): sm_90 with its k/v loaded by TMA, sm_80 by pointers (what the launcher picks on each). At 256
    # channels no tile is spill-free on sm_80 but 64 x 32 with 8 warps.
    ("fwd", 64, False): {80: _tiles([(64, 64, 4), (64, 32, 4)], (2,)),
                         90: _tiles([(128, 128, 4), (128, 128, 8), (128, 64, 8), (64, 64, 4)], (2,))},
    ("fwd", 80, False): {80: _tiles([(64, 32, 4)], (2,)), 90: _tiles([(128, 128, 8), (128, 64, 8)], (2,))},
    # 96 and 128 channels, and 128 with partial rotary (whole rows in the loop): the same tiles.
    **{
        ("fwd", d, partial): {
            80: _tiles([(64, 32, 4)], (2,)), 90: _tiles([(128, 128, 8), (128, 64, 8), (64, 64, 4)], (2,))
        }
        for d, partial in ((96, False), (128, False), (128, True))
    },
    ("fwd", 256, False): {80: _tiles([(64, 32, 8)], (2,)), 90: _tiles([(64, 64, 4)], (2,))},
    # The backward (benchmarks/compile_report.py as launched; _BWD_TILES), per arch: wgmma's 64+ row tiles on sm_90,
    # and on sm_80 the tiles whose mma.sync accumulators fit (at 128 channels, 128 x 64 dq and 32+ x 128 dk/dv spill).
    ("dq", 64, False): {90: {(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)},
                        80: {(128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)}},
    ("dq", 80, False): {90: {(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)},
                        80: {(128, 32, 8, 2), (64, 32, 4, 2)}},
    ("dq", 96, False): {90: {(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)},
                        80: {(128, 32, 8, 2), (64, 32, 4, 2)}},
    ("dq", 128, False): {90: {(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (128, 32, 8, 3), (64, 64, 4, 2),
                              (64, 32, 4, 2)},
                         80: {(128, 32, 8, 2), (128, 32, 8, 3), (128, 16, 8, 2), (64, 32, 4, 2)}},
    ("dq", 128, True): {90: {(128, 64, 8, 2), (128, 32, 8, 2)}, 80: {(128, 32, 8, 2)}},  # 64 x 32: 12 B (3.9)
    ("dq", 256, False): {90: {(128, 32, 8, 2), (64, 16, 4, 2)}, 80: {(64, 16, 4, 2)}},
    ("dkdv", 64, False): {90: {(64, 64, 4, 2), (32, 128, 8, 2), (16, 128, 8, 2), (16, 64, 4, 2)},
                          80: {(16, 128, 8, 2)}},  # as launched: 64 x 64 w8 spills 4 B, 16 x 64 w4 20-28 B
    ("dkdv", 80, False): {90: {(32, 128, 8, 2), (16, 128, 8, 2), (16, 64, 4, 2)},
                          80: {(16, 128, 8, 2), (16, 64, 4, 2)}},  # 64 x 64: 24-56 B spilled on sm_80
    ("dkdv", 96, False): {90: {(32, 128, 8, 2), (32, 64, 4, 2), (16, 128, 8, 2), (16, 64, 4, 2)},
                          80: {(16, 128, 8, 2), (16, 64, 4, 2)}},  # 64 x 64: 24-56 B spilled on sm_80
    ("dkdv", 128, False): {90: {(32, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 2), (16, 64, 4, 2)},
                           80: {(64, 64, 8, 2), (16, 128, 8, 2), (16, 64, 4, 2)}},
    ("dkdv", 128, True): {90: {(32, 128, 8, 2), (16, 128, 8, 2)}, 80: {(64, 64, 8, 2), (16, 128, 8, 2)}},
    # 256 channels: dk + dv alone take 128 registers a thread at 64 keys over 8 warps; on sm_90 only 32-key tiles
    # (mma.sync) are spill-free. dq's 64 rows over 4 warps (one warp group: wgmma issuing exactly the dots' work;
    # over 8 warps it repeated q k^T and dO v^T, 65 wgmma per trip for 33) are spill-free with its store rotating a
    # quarter of the pairs at a time; 64 x 32 still spills 48-80 B. On sm_90, 128 rows over 8 warps (two warp
    # groups, 64 rows and 128 fp32 dq registers a thread each, as at 64 x 16) are spill-free too, and 128 x 32
    # spreads each trip's fixed work (addressing, waits, lse/delta) over twice the scores: 818 warp-instructions
    # per 1K scores on Triton 3.9 and 531 on 3.6, where 64 x 16 issues 1,266 and 914 (128 x 32 with 3 stages
    # spills 60 B on 3.9; 128 x 16 issues more, and its 160 KB of shared memory hold the SM alone as 128 x 32's
    # 192 KB do). 64 x 16 stays for short sequences (twice the programs, 96 KB: two blocks an SM).
    # On sm_80 (mma.sync) 128-row tiles spill or overflow shared memory.
    ("dkdv", 256, False): {80: {(16, 64, 8, 2), (16, 32, 8, 2)}, 90: {(16, 32, 8, 2)}},  # not launched: dv, dk
    # The two passes at 256 channels, one fp32 accumulator each (128 registers a thread at 64 keys per warp group):
    # on sm_90 64 keys per warp group (wgmma, no MMA repeated) with 16 or 32 queries a trip, dk's store rotating a
    # quarter of the pairs at a time, are spill-free (32 queries x 64 keys over 4 warps: dk spills 64-148 B, dv
    # 44 B on 3.6; 64 x 64: 272-528 B); on sm_80 (mma.sync) 64 keys over 8 warps, or 32 x 64 over 4.
    ("dv", 256, False): {
        90: {(32, 128, 8, 2), (16, 128, 8, 2), (16, 64, 4, 2)},
        80: {(64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)},
    },
    ("dk", 256, False): {90: {(32, 128, 8, 2), (16, 128, 8, 2)}, 80: {(64, 64, 8, 2), (32, 64, 4, 2)}},
}


# Keyed on the length's bucket (len_bucket, an argument the kernels never read), not the length itself: the best
# tile at 128K is not the best at 1K, but varlen batches change their longest length every step, and a retune per
# length would dominate.
_TUNE_KEY = ["HEAD_DIM", "HALF", "PASS", "IS_CAUSAL", "IS_VARLEN", "PRECISION", "STAGED", "len_bucket"]
_FWD_TUNE_KEY = [*_TUNE_KEY, "USE_TMA"]  # the forward's k/v loads: TMA or pointers


def length_bucket(seq_len: int) -> int:
    """The autotune bucket of a (longest) sequence length: 1K, 4K, 16K, 64K or 256K, whichever is reached first."""
    bucket = 1024
    while bucket < seq_len and bucket < 262144:
        bucket *= 4
    return bucket


@triton.jit
def _load_rotated_tile(
    x_base, stride_xt, first, seq_len, pos_base, INV_FREQ, is_long, attention, dtype,
    BLOCK: tl.constexpr, HAS_POS: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """Tokens ``first .. first + BLOCK - 1`` of a sequence, rotated (q, or k) with the sequence's table.

    Returns (rows ``[BLOCK]``, row mask, x1, x2, xp in ``dtype``, cos, sin tiled like a half ``[BLOCK, *]``).
    """
    rows = first + tl.arange(0, BLOCK)
    row_mask = rows < seq_len
    pos = _positions(pos_base, rows, row_mask, HAS_POS)
    x1, x2, xp, cos, sin = _load_rotated(x_base, rows, stride_xt, row_mask, pos, INV_FREQ, is_long, attention,
                                         dtype, SPLIT)  # fmt: skip
    return rows, row_mask, x1, x2, xp, cos, sin


@triton.jit
def _load_loop_tile(
    x_base, stride_xt, first, seq_len, pos_base, INV_FREQ, is_long, attention, dtype,
    BLOCK: tl.constexpr, HAS_POS: tl.constexpr, SPLIT: tl.constexpr, STAGED: tl.constexpr,
):  # fmt: skip
    """A tile of the tokens a program loops over (keys in the forward and dq, queries in dk/dv), rotated: loaded
    ready from the staged buffer (STAGED), or rotated here. Returns (rows ``[BLOCK]``, row mask, x1, x2, xp)."""
    if STAGED:
        rows = first + tl.arange(0, BLOCK)
        row_mask = rows < seq_len
        x1, x2, xp = _load_split_native(x_base, rows, stride_xt, row_mask, SPLIT)  # the buffer is in dtype
        return rows, row_mask, x1, x2, xp
    rows, row_mask, x1, x2, xp, cos, sin = _load_rotated_tile(
        x_base, stride_xt, first, seq_len, pos_base, INV_FREQ, is_long, attention, dtype, BLOCK, HAS_POS, SPLIT,
    )  # fmt: skip
    return rows, row_mask, x1, x2, xp


@triton.jit
def _key_sources(
    base, seq_len, row_stride, BLOCK_N: tl.constexpr, ROW: tl.constexpr, USE_TMA: tl.constexpr,
    NARROW_BY_POINTER: tl.constexpr,
):  # fmt: skip
    """What the forward's loop reads the ``[seq_len, D]`` rows of one kv head (rotated keys, values) through:
    (TMA descriptors, the rows' base pointer). With USE_TMA, one descriptor per row tile, bounded by the sequence
    (a tile past its end arrives zero-filled, as masked loads give it), except that where NARROW_BY_POINTER and the
    row is two tiles (96 channels: 64 + 32; 80: 64 + 16), the narrow second tile has none and the loop loads it by
    pointer (cp.async). Each TMA load costs about 15 SASS instructions a trip in every thread (its elected thread's
    predicates, the descriptor's address moved into uniform registers, a barrier); a [128, 32] tile by pointer is
    two 16-byte copies a thread and fewer instructions: at 96 channels (v's 32-channel tile by pointer, sm_90,
    128 x 128 tiles, 8 warps, as launched) 525 SASS a trip with Triton 3.6 against 540 with four TMA loads. Pointer
    loads for both narrow tiles (k's and v's) gave 538."""
    descs = ()
    if USE_TMA:
        for i in tl.static_range(1 if NARROW_BY_POINTER else (ROW[0] > 0) + (ROW[0] > ROW[1])):
            descs = descs + (_row_descriptor(base + i * ROW[1], seq_len, ROW[0] - i * ROW[1], row_stride, BLOCK_N,
                                             ROW[1] + i * (ROW[2] - ROW[1])),)  # fmt: skip
    return descs, base


@triton.jit
def _key_rows(
    src, n_start, row_stride, seq_len, ROW: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    """Rows ``n_start .. n_start + BLOCK_N - 1`` of a :func:`_key_sources` source as row tiles ``[BLOCK_N, *]``, zero
    past the sequence: the tiles it has descriptors for by TMA, the others by pointer (predicated only in a MASKED
    tile)."""
    descs, base = src
    offs_n = n_start + tl.arange(0, BLOCK_N)
    tiles = _load_row_tiles(base, offs_n, row_stride, offs_n < seq_len, ROW, MASKED)  # unused loads are dropped
    if USE_TMA:
        tiles = _load_row_descriptors(descs, n_start) + tiles[len(descs) :]
    return tiles


@triton.jit
def _fwd_key_tile(
    acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, n_start, offs_m, seq_len, pos_base, INV_FREQ, is_long,
    attention, qk_scale, HALF: tl.constexpr, ROW: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_POS: tl.constexpr, STAGED: tl.constexpr, PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    """Fold keys ``n_start .. n_start + BLOCK_N - 1`` into the running output ``acc`` (a row segment
    ``[BLOCK_M, *]`` fp32), max ``m_i`` and sum ``l_i`` (log2 units, scaled by ``qk_scale``).

    Only a MASKED tile (the causal diagonal, the sequence's last partial tile) masks its scores; the others lie
    inside the sequence and left of the diagonal. No row's max is -inf after its first tile (key 0 is visible to
    every row and comes first), so the max needs no guard; the scale is folded into exp2's argument (one FMA per
    score), and the row sum is taken in fp32 before p is cast for the p v dot.
    """
    offs_n = n_start + tl.arange(0, BLOCK_N)
    if STAGED:  # k [BLOCK_N, *] row tiles, rotated by the launcher
        k = _key_rows(k_src, n_start, stride_kt, seq_len, ROW, BLOCK_N, MASKED, USE_TMA)
    else:
        n_mask = offs_n < seq_len
        pos = _positions(pos_base, offs_n, n_mask, HAS_POS)
        k = _rotate_rows(k_src[1], offs_n, stride_kt, n_mask, pos, INV_FREQ, is_long, attention, q[0].dtype, HALF,
                         ROW)  # fmt: skip
    # v's TMA loads share k's barrier, one wait a trip: at 96 channels 525 SASS a trip (Triton 3.6) and 557 (3.9)
    # against 529 and 575 with v loaded after the softmax (sm_90, 128 x 128, as launched).
    if USE_TMA:
        v = _key_rows(v_src, n_start, stride_vt, seq_len, ROW, BLOCK_N, MASKED, USE_TMA)  # [BLOCK_N, *]
    # One dot per row tile, chained through the accumulator. Triton (3.6, 3.9) still waits on each before the next:
    # a wgmma whose result the loop reads gets its own warp_group_dot_wait.
    scores = tl.dot(q[0], tl.trans(k[0]), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N] fp32, unscaled
    for i in tl.static_range(1, len(q)):
        scores = tl.dot(q[i], tl.trans(k[i]), scores, input_precision=PRECISION)
    if MASKED:
        visible = (offs_n < seq_len)[None, :]
        if IS_CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)  # qk_scale > 0: the max of the scaled scores
    p = tl.exp2(scores * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if not USE_TMA:  # sm_80: loaded before q k^T, v's tiles spilled 8 B at 96 channels (64 x 32, Triton 3.6)
        v = _key_rows(v_src, n_start, stride_vt, seq_len, ROW, BLOCK_N, MASKED, USE_TMA)
    p = p.to(q[0].dtype)
    rescaled = ()
    for i in tl.static_range(len(v)):
        rescaled = rescaled + (tl.dot(p, v[i], acc[i] * alpha[:, None], input_precision=PRECISION),)
    return rescaled, m_new, l_i


@triton.autotune(
    configs=_configs(backward=False), key=_FWD_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs}
)
@triton.jit
def _rope_attention_fwd_kernel(
    Q, K, V, O, LSE, INV_FREQ, CU_SEQLENS, POS, IS_LONG,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_lse_b, stride_lse_h, stride_pos_b,
    seq_len_dense, num_q_heads, group, sm_scale_log2, attention_short, attention_long,  # sm_scale * log2(e)
    len_bucket,  # the autotune key's length bucket; not read
    HALF: tl.constexpr, HALF_A: tl.constexpr, HALF_B: tl.constexpr,
    PASS: tl.constexpr, PASS_A: tl.constexpr, PASS_B: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_A: tl.constexpr, HEAD_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
    STAGED: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """Output and lse of one block of queries of one q head: loop over the key tiles of its kv head.

    The loop works on whole rows: the keys come rotated at full width (by the launcher where STAGED, else
    :func:`_rotate_rows` per tile) and so does q, so q k^T is one dot per row tile (one at 64, 128, 256 channels
    and at Phi-4-mini's 96-of-128) rather than one per half and pass-through tile. q is rotated once, in the split
    layout, and staged in this block's own output rows, which only this program writes: loaded back as stored, it
    feeds the dots from shared memory, where a rotated register tile would be re-read into registers every trip.

    The key tiles of a causal block are walked in two loops, as in FlashAttention: those left of the block's
    diagonal, which every query sees (no mask), then the diagonal ones; without causality, the whole tiles, then
    the sequence's last partial tile. With USE_TMA, k and v tiles arrive by TMA, but for v's narrow second tile at
    80 and 96 channels (:func:`_key_sources`).
    """
    tl.static_assert(BLOCK_M % BLOCK_N == 0)  # the diagonal starts on a key tile
    SPLIT: tl.constexpr = (HALF, HALF_A, HALF_B, PASS, PASS_A, PASS_B)
    ROW: tl.constexpr = (HEAD_DIM, HEAD_A, HEAD_B)
    first, seq, head, start, seq_len, is_long, attention, pos_base = _sequence_program(  # queries of q head `head`
        num_q_heads, CU_SEQLENS, IS_LONG, POS, stride_pos_b, seq_len_dense, attention_short, attention_long,
        BLOCK_M, IS_VARLEN,
    )  # fmt: skip
    if first >= seq_len:
        return
    q_base = Q + _head_offset(seq, head, start, stride_qb, stride_qh, stride_qt)
    k_base = K + _head_offset(seq, head // group, start, stride_kb, stride_kh, stride_kt)
    v_base = V + _head_offset(seq, head // group, start, stride_vb, stride_vh, stride_vt)
    o_base = O + _head_offset(seq, head, start, stride_ob, stride_oh, stride_ot)
    dtype = Q.dtype.element_ty

    # q rotated in chunks of at most 8K elements (fp32 x, its pair, cos, sin: at 128 x 256 they spill), staged in
    # the block's output rows, then loaded back whole.
    CHUNKS: tl.constexpr = 1 if BLOCK_M * HEAD_DIM <= 8192 else (2 if BLOCK_M * HEAD_DIM <= 16384 else 4)
    for c in tl.static_range(CHUNKS):
        rows = first + c * (BLOCK_M // CHUNKS) + tl.arange(0, BLOCK_M // CHUNKS)
        rows_mask = rows < seq_len
        pos = _positions(pos_base, rows, rows_mask, HAS_POS)
        q1, q2, qp, _, _ = _load_rotated(q_base, rows, stride_qt, rows_mask, pos, INV_FREQ, is_long, attention,
                                         dtype, SPLIT)  # fmt: skip
        _store_split(o_base, rows, stride_ot, rows_mask, q1, q2, qp, SPLIT)
    tl.debug_barrier()  # the block's stores are visible to all its threads
    offs_m = first + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seq_len
    q = _load_rows(o_base, offs_m, stride_ot, m_mask, ROW)  # [BLOCK_M, *] row tiles, rotated

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = _zeros_fp32(BLOCK_M, ROW)  # [BLOCK_M, *] row tiles
    k_src = _key_sources(k_base, seq_len, stride_kt, BLOCK_N, ROW, USE_TMA and STAGED, False)
    v_src = _key_sources(v_base, seq_len, stride_vt, BLOCK_N, ROW, USE_TMA, True)
    tile_args = (k_src, v_src, stride_kt, stride_vt)
    table_args = (pos_base, INV_FREQ, is_long, attention, sm_scale_log2)
    if IS_CAUSAL:
        for n_start in range(0, first, BLOCK_N):  # left of the diagonal: every query of the block sees every key
            acc, m_i, l_i = _fwd_key_tile(acc, m_i, l_i, q, *tile_args, n_start, offs_m, seq_len, *table_args,
                                          HALF, ROW, BLOCK_N, False, IS_CAUSAL, HAS_POS, STAGED, PRECISION,
                                          USE_TMA)  # fmt: skip
        for n_start in range(first, tl.minimum(first + BLOCK_M, seq_len), BLOCK_N):
            acc, m_i, l_i = _fwd_key_tile(acc, m_i, l_i, q, *tile_args, n_start, offs_m, seq_len, *table_args,
                                          HALF, ROW, BLOCK_N, True, IS_CAUSAL, HAS_POS, STAGED, PRECISION,
                                          USE_TMA)  # fmt: skip
    else:
        whole = seq_len - seq_len % BLOCK_N
        for n_start in range(0, whole, BLOCK_N):
            acc, m_i, l_i = _fwd_key_tile(acc, m_i, l_i, q, *tile_args, n_start, offs_m, seq_len, *table_args,
                                          HALF, ROW, BLOCK_N, False, IS_CAUSAL, HAS_POS, STAGED, PRECISION,
                                          USE_TMA)  # fmt: skip
        if whole < seq_len:
            acc, m_i, l_i = _fwd_key_tile(acc, m_i, l_i, q, *tile_args, whole, offs_m, seq_len, *table_args,
                                          HALF, ROW, BLOCK_N, True, IS_CAUSAL, HAS_POS, STAGED, PRECISION,
                                          USE_TMA)  # fmt: skip

    out, lse_log2 = _attend_finish(acc, m_i, l_i)  # [BLOCK_M, *] row tiles, [BLOCK_M]
    _store_rows(o_base, offs_m, stride_ot, m_mask, out, ROW)
    lse_base = LSE + _head_offset(seq, head, start, stride_lse_b, stride_lse_h, 1)
    tl.store(lse_base + offs_m, lse_log2 / 1.4426950408889634, mask=m_mask)  # natural log


_BWD_TUNE_KEY = [k for k in _TUNE_KEY if k != "PASS"]  # HEAD_DIM and HALF give the pass-through


@triton.jit
def _stage_rotated_kernel(
    Q, K, QS, KS, INV_FREQ, CU_SEQLENS, POS, IS_LONG,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_qsb, stride_qsh, stride_qst,
    stride_ksb, stride_ksh, stride_kst,
    stride_pos_b, seq_len_dense, num_q_heads, num_kv_heads, sm_scale_log2, attention_short, attention_long,
    HALF: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_A: tl.constexpr, HEAD_B: tl.constexpr, BLOCK: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_POS: tl.constexpr,
):  # fmt: skip
    """The backward's scratch copies of q and k for BLOCK tokens of one sequence, every head: rotated with the
    sequence's table, in pair order (_jit's pair-order section), and k times ``sm_scale * log2(e)`` so that the
    tiles' scores come out in log2 units. The sin/cos of the tokens are computed once for all their heads."""
    ROW: tl.constexpr = (HEAD_DIM, HEAD_A, HEAD_B)
    first, seq, _, start, seq_len, is_long, attention, pos_base = _sequence_program(
        1, CU_SEQLENS, IS_LONG, POS, stride_pos_b, seq_len_dense, attention_short, attention_long, BLOCK, IS_VARLEN,
    )  # fmt: skip
    if first >= seq_len:
        return
    rows = first + tl.arange(0, BLOCK)
    row_mask = rows < seq_len
    cos, sin = _pair_angles(_positions(pos_base, rows, row_mask, HAS_POS), INV_FREQ, is_long, attention, HALF, ROW)
    for head in range(0, num_q_heads):
        q = _load_pairs_rotated(Q + _head_offset(seq, head, start, stride_qb, stride_qh, stride_qt), rows, stride_qt,
                                row_mask, cos, sin, 1.0, QS.dtype.element_ty, HALF, ROW)  # fmt: skip
        _store_rows(QS + _head_offset(seq, head, start, stride_qsb, stride_qsh, stride_qst), rows, stride_qst, row_mask,
                    q, ROW)  # fmt: skip
    for head in range(0, num_kv_heads):
        k = _load_pairs_rotated(K + _head_offset(seq, head, start, stride_kb, stride_kh, stride_kt), rows, stride_kt,
                                row_mask, cos, sin, sm_scale_log2, KS.dtype.element_ty, HALF, ROW)  # fmt: skip
        _store_rows(KS + _head_offset(seq, head, start, stride_ksb, stride_ksh, stride_kst), rows, stride_kst, row_mask,
                    k, ROW)  # fmt: skip


@triton.jit
def _load_pair_tile(
    x_base, stride_xt, rows, tokens, row_mask, pos_base, INV_FREQ, is_long, attention, scale, dtype,
    HALF: tl.constexpr, ROW: tl.constexpr, HAS_POS: tl.constexpr, STAGED: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Rows ``rows`` of ``x_base`` (q or k; the sequence's tokens ``tokens``) rotated, times ``scale``, in pair order
    (whole-head tiles ``[BLOCK, *]``): loaded as the launcher staged them (STAGED: ``scale`` is in the buffer
    already), or rotated here with the angles of the tokens' positions."""
    if STAGED:
        return _load_row_tiles(x_base, rows, stride_xt, row_mask, ROW, MASKED)
    cos, sin = _pair_angles(_positions(pos_base, tokens, row_mask, HAS_POS), INV_FREQ, is_long, attention, HALF, ROW)
    return _load_pairs_rotated(x_base, rows, stride_xt, row_mask, cos, sin, scale, dtype, HALF, ROW)


@triton.jit
def _dots_t(a, b, PRECISION: tl.constexpr):
    """``a b^T`` over whole-head tiles (a ``[M, *]``, b ``[N, *]``, same widths): ``[M, N]`` fp32."""
    out = tl.dot(a[0], tl.trans(b[0]), input_precision=PRECISION)
    for i in tl.static_range(1, len(a)):
        out += tl.dot(a[i], tl.trans(b[i]), input_precision=PRECISION)
    return out


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, offs_m, k_base, v_base, stride_kt, stride_vt, lo, hi, seq_len,
    pos_base, INV_FREQ, is_long, attention, sm_scale_log2, dtype,
    HALF: tl.constexpr, ROW: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_POS: tl.constexpr,
    PRECISION: tl.constexpr, STAGED: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """dq (whole-head fp32 tiles ``[BLOCK_M, *]``, pair order, in units of the scaled k) += the key tiles from
    ``lo`` to ``hi``. MASKED: the tiles on the causal diagonal or past the sequence's end; the others load and
    compute without masks."""
    for n_start in range(lo, hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_len
        k = _load_pair_tile(k_base, stride_kt, offs_n, offs_n, n_mask, pos_base, INV_FREQ, is_long, attention,
                            sm_scale_log2, dtype, HALF, ROW, HAS_POS, STAGED, MASKED)  # fmt: skip
        v = _load_row_tiles(v_base, offs_n, stride_vt, n_mask, ROW, MASKED)  # [BLOCK_N, *]
        p = tl.exp2(_dots_t(q, k, PRECISION) - lse[:, None])  # [BLOCK_M, BLOCK_N]: scores in log2 units
        if MASKED:
            visible = n_mask[None, :]
            if IS_CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(visible, p, 0.0)
        ds = (p * (_dots_t(do, v, PRECISION) - delta[:, None])).to(dtype)
        dq = _dot_acc(dq, ds, k, PRECISION)
    return dq


@triton.autotune(
    configs=_bwd_configs("dq"), key=_BWD_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs}
)
@triton.jit
def _rope_attention_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, INV_FREQ, CU_SEQLENS, POS, IS_LONG,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    stride_lse_b, stride_lse_h, stride_pos_b,  # lse and delta share a layout
    seq_len_dense, num_q_heads, group, sm_scale_log2, attention_short, attention_long,
    len_bucket,  # the autotune key's length bucket; not read
    HALF: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_A: tl.constexpr, HEAD_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
    STAGED: tl.constexpr,
):  # fmt: skip
    """dq for one block of queries of one q head: loop over the key tiles of its kv head, the unmasked ones
    first. Q and K are the staged copies (pair order, k scaled; STAGED) or the pre-RoPE inputs; LSE is in log2
    units."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)  # the diagonal starts on a key tile
    ROW: tl.constexpr = (HEAD_DIM, HEAD_A, HEAD_B)
    first, seq, head, start, seq_len, is_long, attention, pos_base = _sequence_program(  # dq rows of q head `head`
        num_q_heads, CU_SEQLENS, IS_LONG, POS, stride_pos_b, seq_len_dense, attention_short, attention_long,
        BLOCK_M, IS_VARLEN,
    )  # fmt: skip
    if first >= seq_len:
        return
    dtype = DO.dtype.element_ty
    offs_m = first + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seq_len
    q = _load_pair_tile(Q + _head_offset(seq, head, start, stride_qb, stride_qh, stride_qt), stride_qt, offs_m,
                        offs_m, m_mask, pos_base, INV_FREQ, is_long, attention, 1.0, dtype, HALF, ROW, HAS_POS, STAGED,
                        True)  # fmt: skip
    do = _load_rows(DO + _head_offset(seq, head, start, stride_dob, stride_doh, stride_dot), offs_m, stride_dot,
                    m_mask, ROW)  # fmt: skip
    row_base = _head_offset(seq, head, start, stride_lse_b, stride_lse_h, 1)
    lse = tl.load(LSE + row_base + offs_m, mask=m_mask, other=0.0)  # [BLOCK_M]
    delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)
    k_base = K + _head_offset(seq, head // group, start, stride_kb, stride_kh, stride_kt)
    v_base = V + _head_offset(seq, head // group, start, stride_vb, stride_vh, stride_vt)
    dq = _zeros_fp32(BLOCK_M, ROW)  # [BLOCK_M, *] whole-head tiles, pair order
    # Key tiles wholly visible to every row: before the diagonal (causal), or every whole tile.
    full = first if IS_CAUSAL else (seq_len // BLOCK_N) * BLOCK_N
    hi = tl.minimum(seq_len, first + BLOCK_M) if IS_CAUSAL else seq_len
    dq = _dq_tiles(dq, q, do, lse, delta, offs_m, k_base, v_base, stride_kt, stride_vt, 0, full, seq_len, pos_base,
                   INV_FREQ, is_long, attention, sm_scale_log2, dtype, HALF, ROW, BLOCK_N, IS_CAUSAL, HAS_POS,
                   PRECISION, STAGED, False)  # fmt: skip
    dq = _dq_tiles(dq, q, do, lse, delta, offs_m, k_base, v_base, stride_kt, stride_vt, full, hi, seq_len, pos_base,
                   INV_FREQ, is_long, attention, sm_scale_log2, dtype, HALF, ROW, BLOCK_N, IS_CAUSAL, HAS_POS,
                   PRECISION, STAGED, True)  # fmt: skip
    # k carried sm_scale * log2(e), dq needs sm_scale: ln(2). Then the transposed rotation, to the pre-RoPE q.
    dq_base = DQ + _head_offset(seq, head, start, stride_dqb, stride_dqh, stride_dqt)
    positions = _positions(pos_base, offs_m, m_mask, HAS_POS)
    if HEAD_DIM >= 256:  # the 128 fp32 registers of 64 rows' dq leave no room for all the pairs' sin/cos at once
        _store_pairs_transposed_in_quarters(dq_base, offs_m, stride_dqt, m_mask, dq, positions, INV_FREQ, is_long,
                                            attention, 0.6931471805599453, HALF, ROW)  # fmt: skip
    else:
        cos, sin = _pair_angles(positions, INV_FREQ, is_long, attention, HALF, ROW)
        _store_pairs_transposed(dq_base, offs_m, stride_dqt, m_mask, dq, cos, sin, 0.6931471805599453, HALF, ROW)


@triton.jit
def _column_halves(x):
    """The first and second halves of the columns of ``x [BLOCK, W]``: two ``[BLOCK, W / 2]``."""
    return tl.split(tl.permute(tl.reshape(x, [x.shape[0], 2, x.shape[1] // 2]), (0, 2, 1)))


@triton.jit
def _store_pair_quarter(base, row_mask, ga, gb, first_pair, pos, inv_freq_ptr, is_long, attention, out_dtype,
                        HALF: tl.constexpr, ROW: tl.constexpr):  # fmt: skip
    """Store pairs ``first_pair ..`` of a gradient in pair order (their channels ``ga``, ``gb [BLOCK, C]``),
    rotated back as :func:`_store_pairs_transposed` does, with the angles of those pairs only (:func:`_pair_angles`'
    arithmetic)."""
    pairs = first_pair + tl.arange(0, ga.shape[1])
    rotary = pairs < HALF
    inv_freq = tl.load(inv_freq_ptr + is_long * HALF + pairs, mask=rotary, other=0.0)
    angle = pos.to(tl.float32)[:, None] * inv_freq[None, :]  # [BLOCK, C]
    cos = tl.where(rotary[None, :], tl.cos(angle) * attention, 1.0)
    sin = tl.where(rotary[None, :], tl.sin(angle) * attention, 0.0)
    a_col, b_col = _pair_channels(pairs, HALF)
    tl.store(base + a_col[None, :], (ga * cos + gb * sin).to(out_dtype),
             mask=row_mask[:, None] & (a_col < ROW[0])[None, :])  # fmt: skip
    tl.store(base + b_col[None, :], (gb * cos - ga * sin).to(out_dtype),
             mask=row_mask[:, None] & (b_col < ROW[0])[None, :])  # fmt: skip


@triton.jit
def _store_pairs_transposed_in_quarters(ptr, rows, row_stride, row_mask, g, pos, inv_freq_ptr, is_long, attention,
                                        scale, HALF: tl.constexpr, ROW: tl.constexpr):  # fmt: skip
    """:func:`_store_pairs_transposed` of one whole-head tile ``g[0] [BLOCK, D]``, a quarter of its pairs at a time,
    each with its own sin/cos (``[BLOCK, D / 8]`` each, not ``[BLOCK, D / 2]``): at 256 channels the whole tile's
    sin/cos and dq did not fit the registers (1.7 KB spilled by 64 x 16 dq tiles over 4 warps, Triton 3.6, sm_90;
    none in quarters)."""
    tl.static_assert(len(g) == 1)
    base = ptr + rows.to(tl.int64)[:, None] * row_stride  # [BLOCK, 1] int64 offsets
    out_dtype = ptr.dtype.element_ty
    quarter: tl.constexpr = ROW[1] // 8  # pairs per quarter
    ga, gb = tl.split(tl.reshape(g[0] * scale, [g[0].shape[0], ROW[1] // 2, 2]))  # [BLOCK, D / 2] each
    ga01, ga23 = _column_halves(ga)
    gb01, gb23 = _column_halves(gb)
    ga0, ga1 = _column_halves(ga01)
    ga2, ga3 = _column_halves(ga23)
    gb0, gb1 = _column_halves(gb01)
    gb2, gb3 = _column_halves(gb23)
    _store_pair_quarter(base, row_mask, ga0, gb0, 0, pos, inv_freq_ptr, is_long, attention, out_dtype, HALF, ROW)
    _store_pair_quarter(base, row_mask, ga1, gb1, quarter, pos, inv_freq_ptr, is_long, attention, out_dtype, HALF,
                        ROW)  # fmt: skip
    _store_pair_quarter(base, row_mask, ga2, gb2, 2 * quarter, pos, inv_freq_ptr, is_long, attention, out_dtype, HALF,
                        ROW)  # fmt: skip
    _store_pair_quarter(base, row_mask, ga3, gb3, 3 * quarter, pos, inv_freq_ptr, is_long, attention, out_dtype, HALF,
                        ROW)  # fmt: skip


@triton.jit
def _row_values(ptr, rows, row_mask, MASKED: tl.constexpr):
    """Per-row fp32 values (lse, delta) ``[BLOCK]``: 0 outside the mask where MASKED, unpredicated elsewhere."""
    if MASKED:
        return tl.load(ptr + rows, mask=row_mask, other=0.0)
    return tl.load(ptr + rows)


@triton.jit
def _query_tile_bases(Q, DO, seq, head, start, m_start, stride_qb, stride_qh, stride_qt, stride_dob, stride_doh,
                      stride_dot, stride_lse_b, stride_lse_h):  # fmt: skip
    """(q, dO row pointers, lse/delta element offset) of the query tile starting at token ``m_start`` of a head."""
    return (Q + _head_offset(seq, head, start + m_start, stride_qb, stride_qh, stride_qt),
            DO + _head_offset(seq, head, start + m_start, stride_dob, stride_doh, stride_dot),
            _head_offset(seq, head, start + m_start, stride_lse_b, stride_lse_h, 1))  # fmt: skip


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, offs_n, Q, DO, LSE, DELTA, seq, start, first_head, heads,
    stride_qb, stride_qh, stride_qt, stride_dob, stride_doh, stride_dot, stride_lse_b, stride_lse_h,
    a_start, a_end, b_start, b_end, seq_len, pos_base, INV_FREQ, is_long, attention, dtype,
    HALF: tl.constexpr, ROW: tl.constexpr, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_POS: tl.constexpr,
    PRECISION: tl.constexpr, STAGED: tl.constexpr, MASKED: tl.constexpr, WITH_DK: tl.constexpr,
    WITH_DV: tl.constexpr,
):  # fmt: skip
    """(dk, dv) (whole-head fp32 tiles ``[BLOCK_N, *]``; dk in pair order) += the query tiles ``a_start ..
    a_end`` then (MASKED) ``b_start .. b_end`` of each of ``heads`` q heads, in the transposed orientation (keys
    are the rows). MASKED: the tiles on the causal diagonal or past the sequence's end. Query rows past the end load
    as zeros (q, dO, lse, delta), so their p is finite and their dO and ds are 0: they add nothing. WITH_DK,
    WITH_DV: which of the two it accumulates (the other is returned as given; ``v`` is read only for dk).

    One loop over (head, tile) pairs, not a loop over heads around a loop over tiles: the nest held its bounds and
    the next loop's pipeline prologue in registers across heads, and 32 x 128 tiles spilled at 128 channels. The
    tile's pointers advance by one tile per trip; they are recomputed only where the walk jumps (next range, next
    head)."""
    tiles_a = tl.cdiv(tl.maximum(a_end - a_start, 0), BLOCK_M)
    per_head = tiles_a + (tl.cdiv(tl.maximum(b_end - b_start, 0), BLOCK_M) if MASKED else 0)  # b: past a short seq
    strides = (stride_qb, stride_qh, stride_qt, stride_dob, stride_doh, stride_dot, stride_lse_b, stride_lse_h)
    head = first_head
    tile = 0  # within the head
    m_start = a_start
    if MASKED:
        m_start = tl.where(tiles_a > 0, a_start, b_start)
    q_ptr, do_ptr, row_off = _query_tile_bases(Q, DO, seq, head, start, m_start, *strides)
    rows = tl.arange(0, BLOCK_M)  # [BLOCK_M] within the tile
    # From past a head's last tile to its next head's first: one head on, the head's tiles back.
    back = per_head * BLOCK_M
    q_jump = tl.cast(stride_qh, tl.int64) - tl.cast(back, tl.int64) * stride_qt
    do_jump = tl.cast(stride_doh, tl.int64) - tl.cast(back, tl.int64) * stride_dot
    row_jump = tl.cast(stride_lse_h, tl.int64) - back
    for _ in range(0, heads * per_head):
        offs_m = m_start + rows
        m_mask = offs_m < seq_len
        q = _load_pair_tile(q_ptr, stride_qt, rows, offs_m, m_mask, pos_base, INV_FREQ, is_long, attention, 1.0, dtype,
                            HALF, ROW, HAS_POS, STAGED, MASKED)  # fmt: skip
        lse = _row_values(LSE + row_off, rows, m_mask, MASKED)  # [BLOCK_M]
        p_t = tl.exp2(_dots_t(k, q, PRECISION) - lse[None, :])  # [BLOCK_N, BLOCK_M]: scores in log2 units
        if MASKED and IS_CAUSAL:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :], p_t, 0.0)
        do = _load_row_tiles(do_ptr, rows, stride_dot, m_mask, ROW, MASKED)  # [BLOCK_M, *]
        if WITH_DV:
            dv = _dot_acc(dv, p_t.to(dtype), do, PRECISION)
        if WITH_DK:
            delta = _row_values(DELTA + row_off, rows, m_mask, MASKED)
            ds_t = (p_t * (_dots_t(v, do, PRECISION) - delta[None, :])).to(dtype)
            dk = _dot_acc(dk, ds_t, q, PRECISION)
        tile += 1
        m_start += BLOCK_M
        if MASKED:  # few trips: jumps recompute the pointers
            if tile == per_head:  # the next head's first tile
                tile = 0
                head += 1
                m_start = a_start
            if tile == tiles_a:  # this head's second range
                m_start = b_start
            q_ptr, do_ptr, row_off = _query_tile_bases(Q, DO, seq, head, start, m_start, *strides)
        else:  # one tile on, or back to a_start in the next head: pointer arithmetic without a branch
            wrap = tile == per_head
            next_head = wrap.to(tl.int64)
            tile = tl.where(wrap, 0, tile)
            m_start = tl.where(wrap, a_start, m_start)  # read only by the per-tile rotation's positions
            q_ptr += BLOCK_M * stride_qt + next_head * q_jump
            do_ptr += BLOCK_M * stride_dot + next_head * do_jump
            row_off += BLOCK_M + next_head * row_jump
    return dk, dv


@triton.jit
def _rope_attention_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, INV_FREQ, CU_SEQLENS, POS, IS_LONG,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    stride_lse_b, stride_lse_h, stride_pos_b,  # lse and delta share a layout
    seq_len_dense, num_kv_heads, group, group_splits, sm_scale, sm_scale_log2, attention_short, attention_long,
    len_bucket,  # the autotune key's length bucket; not read
    HALF: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_A: tl.constexpr, HEAD_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
    STAGED: tl.constexpr, WITH_DK: tl.constexpr, WITH_DV: tl.constexpr,
):  # fmt: skip
    """dk, dv for one key tile of one kv head, summed over the q heads of its GQA group, or over one of
    ``group_splits`` equal parts of it: programs per sequence are Hk x group_splits, and program ``slot`` writes the
    partial sums of its part to head ``slot`` of DK/DV (the launcher adds the parts; with 1 part, DK/DV are dk/dv).
    Q, K as in the dq kernel. WITH_DK, WITH_DV: which gradients it computes and writes (both: the fused kernel; one:
    a pass of the two-pass backward, :func:`dkdv_two_pass`)."""
    tl.static_assert(BLOCK_N % BLOCK_M == 0)  # the diagonal ends on a query tile
    ROW: tl.constexpr = (HEAD_DIM, HEAD_A, HEAD_B)
    first, seq, slot, start, seq_len, is_long, attention, pos_base = _sequence_program(
        num_kv_heads * group_splits, CU_SEQLENS, IS_LONG, POS, stride_pos_b, seq_len_dense, attention_short,
        attention_long, BLOCK_N, IS_VARLEN,
    )  # fmt: skip
    if first >= seq_len:
        return
    kv_head = slot // group_splits
    heads_per_program = group // group_splits
    first_head = kv_head * group + (slot % group_splits) * heads_per_program
    dtype = DO.dtype.element_ty
    offs_n = first + tl.arange(0, BLOCK_N)
    n_mask = offs_n < seq_len
    k = _load_pair_tile(K + _head_offset(seq, kv_head, start, stride_kb, stride_kh, stride_kt), stride_kt, offs_n,
                        offs_n, n_mask, pos_base, INV_FREQ, is_long, attention, sm_scale_log2, dtype, HALF, ROW,
                        HAS_POS, STAGED, True)  # fmt: skip
    v = k  # dv alone never reads v
    if WITH_DK:
        v = _load_rows(V + _head_offset(seq, kv_head, start, stride_vb, stride_vh, stride_vt), offs_n, stride_vt,
                       n_mask, ROW)  # fmt: skip
    dk = _zeros_fp32(BLOCK_N, ROW)  # [BLOCK_N, *] whole-head tiles, pair order (unused in a dv pass: eliminated)
    dv = _zeros_fp32(BLOCK_N, ROW)
    # Query tiles: the diagonal (causal) and the sequence's partial last tile, masked; the whole tiles between.
    lo = first + BLOCK_N if IS_CAUSAL else 0
    diagonal = first if IS_CAUSAL else 0
    diagonal_end = tl.minimum(lo, seq_len) if IS_CAUSAL else 0
    full = lo + (tl.maximum(seq_len - lo, 0) // BLOCK_M) * BLOCK_M
    strides = (stride_qb, stride_qh, stride_qt, stride_dob, stride_doh, stride_dot, stride_lse_b, stride_lse_h)
    table_args = (pos_base, INV_FREQ, is_long, attention)
    dk, dv = _dkdv_tiles(dk, dv, k, v, offs_n, Q, DO, LSE, DELTA, seq, start, first_head, heads_per_program, *strides,
                         diagonal, diagonal_end, full, seq_len, seq_len, *table_args, dtype, HALF, ROW, BLOCK_M,
                         IS_CAUSAL, HAS_POS, PRECISION, STAGED, True, WITH_DK, WITH_DV)  # fmt: skip
    dk, dv = _dkdv_tiles(dk, dv, k, v, offs_n, Q, DO, LSE, DELTA, seq, start, first_head, heads_per_program, *strides,
                         lo, full, full, full, seq_len, *table_args, dtype, HALF, ROW, BLOCK_M, IS_CAUSAL, HAS_POS,
                         PRECISION, STAGED, False, WITH_DK, WITH_DV)  # fmt: skip
    # dv first: its registers are then free for the sin/cos of dk's rotation.
    if WITH_DV:
        _store_rows(DV + _head_offset(seq, slot, start, stride_dvb, stride_dvh, stride_dvt), offs_n, stride_dvt,
                    n_mask, dv, ROW)  # fmt: skip
    # dk of the rotated k (q carried no scale): times sm_scale, then the transposed rotation, to the pre-RoPE k.
    if WITH_DK:
        positions = _positions(pos_base, offs_n, n_mask, HAS_POS)
        if HEAD_DIM >= 256:  # as dq's: 64 keys' dk and all the pairs' sin/cos spilled 3 KB (dk pass, sm_90)
            _store_pairs_transposed_in_quarters(DK + _head_offset(seq, slot, start, stride_dkb, stride_dkh, stride_dkt),
                                                offs_n, stride_dkt, n_mask, dk, positions, INV_FREQ, is_long,
                                                attention, sm_scale, HALF, ROW)  # fmt: skip
        else:
            cos, sin = _pair_angles(positions, INV_FREQ, is_long, attention, HALF, ROW)
            _store_pairs_transposed(DK + _head_offset(seq, slot, start, stride_dkb, stride_dkh, stride_dkt), offs_n,
                                    stride_dkt, n_mask, dk, cos, sin, sm_scale, HALF, ROW)  # fmt: skip


def _dkdv_autotune(kind: str):
    # Each kind compiles under a name of its own (the fused kernel's, or _rope_attention_bwd_dv / _dk), so that a
    # profiler tells the two-pass backward's passes apart; the body is the same function.
    jit = _rope_attention_bwd_dkdv
    if kind != "dkdv":
        name = f"_rope_attention_bwd_{kind}"
        jit = triton.jit(_rope_attention_bwd_dkdv.fn, repr=lambda _: name)
    return triton.autotune(
        configs=_bwd_configs(kind), key=_BWD_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs}
    )(jit)


# One kernel body, three autotuned launches of it, each with its own tiles (_BWD_TILES, _KEEP) and name: dk and dv
# together (WITH_DK = WITH_DV = True), or the two passes of the two-pass backward, dv alone and dk alone
# (dkdv_two_pass).
_rope_attention_bwd_dkdv_kernel = _dkdv_autotune("dkdv")
_rope_attention_bwd_dv_kernel = _dkdv_autotune("dv")
_rope_attention_bwd_dk_kernel = _dkdv_autotune("dk")


@triton.jit
def _delta_kernel(
    O, DO, LSE, DELTA, LSE_LOG2, num_rows, stride_o, stride_do, heads, stride_lse_h,
    HEAD_DIM: tl.constexpr, HEAD_A: tl.constexpr, HEAD_B: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The backward's per-row inputs for BLOCK rows of O and dO: delta = rowsum(O * dO) in fp32, read straight from
    the inputs' dtype (no fp32 copies in memory), and the forward's lse in log2 units (a row that saw nothing: -inf
    -> 0), both written in the lse's layout. Row r of O is head ``r % heads`` of token ``r // heads`` (varlen
    ``[T, H, D]``; dense rows pass heads = 1): its lse is at ``(r % heads) * stride_lse_h + r // heads``."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < num_rows
    ROW: tl.constexpr = (HEAD_DIM, HEAD_A, HEAD_B)
    o = _load_rows(O, rows, stride_o, row_mask, ROW)  # [BLOCK, *] row tiles
    do = _load_rows(DO, rows, stride_do, row_mask, ROW)
    at = (rows % heads).to(tl.int64) * stride_lse_h + rows // heads
    tl.store(DELTA + at, _row_dot(o, do), mask=row_mask)
    lse = tl.load(LSE + at, mask=row_mask, other=0.0)
    tl.store(LSE_LOG2 + at, tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634), mask=row_mask)


# ------------------------------------------------------------------------------------------------ host side
def _constexprs(
    q: torch.Tensor, inv_freq: torch.Tensor, causal: bool, varlen: bool, has_pos: bool, staged: bool, backward: bool
) -> dict:
    return dict(
        **split_sizes(q.shape[-1], rotary_dim_of(inv_freq), one_tile=backward),
        **head_sizes(q.shape[-1]),
        IS_CAUSAL=causal,
        IS_VARLEN=varlen,
        HAS_POS=has_pos,
        PRECISION=dot_precision(q.dtype),
        STAGED=staged,
    )


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of the lse (and delta): dense ``[B, H, L]``, varlen ``[H, T]``; tokens contiguous."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def rope_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    inv_freq: Tensor, is_long: Tensor, position_ids: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int,
    causal: bool, softmax_scale: float, attention_short: float, attention_long: float, *, staged: bool = True,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Fused RoPE + attention forward on PRE-RoPE q, k.

    Args:
        q: ``[B, Hq, L, D]``, or ``[T, Hq, D]`` with ``cu_seqlens``; k, v: ``[B, Hk, L, D]`` / ``[T, Hk, D]``.
        inv_freq: ``[2, rotary_dim // 2]`` fp32, row 0 the short table's inverse frequencies, row 1 the long one's.
        is_long: ``[num_seqs]`` int32, 1 where a sequence uses the long table.
        position_ids: None (0..len-1 per sequence) or int32 ``[L]`` / ``[1, L]`` / ``[B, L]`` / varlen ``[T]``.
        cu_seqlens: None (dense) or int32 ``[num_seqs + 1]``; max_seqlen: L (dense), an upper bound (varlen).
        softmax_scale: the resolved scale; attention_short, attention_long: the tables' attention factors.
        staged: rotate the keys once into a scratch buffer (k's size) before the loop, instead of in every query
            block's program (the module docstring).

    Returns:
        (out ``q.shape`` contiguous in q's dtype, lse fp32 natural log: dense ``[B, Hq, L]``, varlen ``[Hq, T]``).
    """
    q, k, v = (contiguous_last(x) for x in (q, k, v))
    varlen = cu_seqlens is not None
    batch, seq_len = sequences(q, cu_seqlens, max_seqlen)
    num_q_heads = q.shape[1]
    out = new_like(q)
    lse_shape = (num_q_heads, q.shape[0]) if varlen else (batch, num_q_heads, seq_len)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if q.numel() == 0 or batch == 0 or seq_len == 0:
        return out, lse
    if staged:  # [B, Hk, L, D] / [T, Hk, D]: the keys rotated once, with each sequence's table
        k = apply_rope(None, k, inv_freq, is_long, position_ids, cu_seqlens, max_seqlen, attention_short,
                       attention_long, transposed=False)[1]  # fmt: skip
    use_tma = _use_tma(q.device, [k, v] if staged else [v])
    is_long, cu_ptr, pos_ptr, stride_pos_b = sequence_args(is_long, position_ids, cu_seqlens)
    grid = lambda meta: sequence_grid(triton.cdiv(seq_len, meta["BLOCK_M"]), num_q_heads, batch)
    _rope_attention_fwd_kernel[grid](
        q, k, v, out, lse, inv_freq, cu_ptr, pos_ptr, is_long,
        *bht_strides(q, varlen), *bht_strides(k, varlen), *bht_strides(v, varlen), *bht_strides(out, varlen),
        *_lse_strides(lse, varlen), stride_pos_b,
        seq_len, num_q_heads, num_q_heads // k.shape[1], softmax_scale * LOG2E, attention_short, attention_long,
        length_bucket(seq_len), **_constexprs(q, inv_freq, causal, varlen, position_ids is not None, staged, False),
        USE_TMA=use_tma,
    )  # fmt: skip
    return out, lse


_TMA_WARNED: set[str] = set()


def _use_tma(device: torch.device, tensors: list[Tensor]) -> bool:
    """Whether the forward loads its key tiles by TMA: where the device has it (:func:`tma_capable`) and the tensors
    allow it (:func:`tma_aligned`); on such a GPU, strides TMA cannot take are said once (the pointer loads cost
    more instructions per tile)."""
    if not tma_capable(device):
        return False
    if not tma_aligned(*tensors):
        if device.type == "cuda" and "fwd" not in _TMA_WARNED:
            _TMA_WARNED.add("fwd")
            warnings.warn(
                "lr2kernels: v's strides (or k's) are not multiples of 16 bytes; the Triton forward loads its key "
                "tiles without TMA (make v contiguous to avoid it)", UserWarning, stacklevel=3,
            )  # fmt: skip
        return False
    if device.type == "cuda":
        ensure_scratch_allocator()
    return True


def delta_block(head_dim: int) -> int:
    """Rows per program of :func:`_delta_kernel`: about 4K elements per tile (16 in the interpreter)."""
    return 16 if triton_interpreting() else max(16, 4096 // triton.next_power_of_2(head_dim))


def _delta(out: Tensor, grad_out: Tensor, lse: Tensor, varlen: bool) -> tuple[Tensor, Tensor]:
    """(rowsum(out * grad_out), lse in log2 units with -inf -> 0), fp32 in the lse's layout: dense ``[B, H, L]``,
    varlen ``[H, T]`` (``lse`` contiguous)."""
    head_dim = out.shape[-1]
    o_rows, do_rows = out.reshape(-1, head_dim), grad_out.reshape(-1, head_dim)  # views where rows are dense
    delta, lse_log2 = torch.empty_like(lse), torch.empty_like(lse)
    num_rows = o_rows.shape[0]
    block = delta_block(head_dim)
    heads, stride_lse_h = (out.shape[1], lse.stride(0)) if varlen else (1, 0)  # varlen rows: token-major [T, H]
    _delta_kernel[(triton.cdiv(num_rows, block),)](
        o_rows, do_rows, lse, delta, lse_log2, num_rows, o_rows.stride(0), do_rows.stride(0), heads, stride_lse_h,
        **head_sizes(head_dim), BLOCK=block,
    )  # fmt: skip
    return delta, lse_log2


def stage_block(head_dim: int) -> int:
    """Tokens per program of :func:`_stage_rotated_kernel` (16 in the interpreter): 64 up to 96 channels, else 32
    (the sin/cos of 64 tokens x 64 pairs, live across the heads, spilled at 96-of-128 on both archs), 16 above 128
    (32 tokens spilled 64 B at 256 channels on sm_90, Triton 3.6, as launched)."""
    return 16 if triton_interpreting() else 64 if head_dim <= 96 else 32 if head_dim <= 128 else 16


def _stage_rotated(
    q: Tensor, k: Tensor, inv_freq: Tensor, sequence: tuple, seq_len: int, batch: int, varlen: bool, has_pos: bool,
    sm_scale_log2: float, attention_short: float, attention_long: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The backward's scratch copies of q and k (their shapes, contiguous): rotated, in pair order, k scaled."""
    q_staged, k_staged = new_like(q), new_like(k)
    is_long, cu_ptr, pos_ptr, stride_pos_b = sequence
    block = stage_block(q.shape[-1])
    _stage_rotated_kernel[sequence_grid(triton.cdiv(seq_len, block), 1, batch)](
        q, k, q_staged, k_staged, inv_freq, cu_ptr, pos_ptr, is_long,
        *bht_strides(q, varlen), *bht_strides(k, varlen), *bht_strides(q_staged, varlen),
        *bht_strides(k_staged, varlen), stride_pos_b, seq_len, q.shape[1], k.shape[1], sm_scale_log2,
        attention_short, attention_long, HALF=rotary_dim_of(inv_freq) // 2, **head_sizes(q.shape[-1]), BLOCK=block,
        IS_VARLEN=varlen, HAS_POS=has_pos, maxnreg=255,  # ptxas' own cap spilled 4 B at 256 channels (3.9, sm_80)
    )  # fmt: skip
    return q_staged, k_staged


def _bwd_constexprs(q: Tensor, inv_freq: Tensor, causal: bool, varlen: bool, has_pos: bool, staged: bool) -> dict:
    return dict(
        HALF=rotary_dim_of(inv_freq) // 2,
        **head_sizes(q.shape[-1]),
        IS_CAUSAL=causal,
        IS_VARLEN=varlen,
        HAS_POS=has_pos,
        PRECISION=dot_precision(q.dtype),
        STAGED=staged,
    )


def rope_attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    inv_freq: Tensor, is_long: Tensor, position_ids: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int,
    causal: bool, softmax_scale: float, attention_short: float, attention_long: float, *, staged: bool = True,
    group_splits: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients (dq, dk, dv) w.r.t. the PRE-RoPE q, k and v, shaped like them (contiguous).

    ``out`` and ``lse`` are :func:`rope_attention_fwd`'s; the other arguments are the forward's. ``staged``: rotate
    q and k once (one launch, scratch buffers of their sizes, in pair order, k times ``softmax_scale * log2(e)``)
    for both kernels; else every tile is rotated where it is loaded. Either way the kernels are a flash backward on
    the rotated q and k, with the transposed rotation applied to dq and dk as they are stored. ``group_splits``:
    into how many parts the dk/dv kernel splits each GQA group (a divisor of ``Hq // Hk``); None chooses by the
    device (:func:`dkdv_group_splits`: 1 off a GPU).
    """
    grad_out, q, k, v = (contiguous_last(x) for x in (grad_out, q, k, v))
    varlen = cu_seqlens is not None
    batch, seq_len = sequences(q, cu_seqlens, max_seqlen)
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_q_heads // num_kv_heads
    if group_splits is not None and not (type(group_splits) is int and group_splits > 0 and group % group_splits == 0):
        raise ValueError(f"group_splits: expected None or a divisor of the GQA group {group}, got {group_splits!r}")
    dq, dk, dv = new_like(q), new_like(k), new_like(v)
    if q.numel() == 0 or batch == 0 or seq_len == 0:
        return dq, dk, dv
    delta, lse_log2 = _delta(contiguous_last(out), grad_out, lse.contiguous(), varlen)  # lse's layout
    sequence = sequence_args(is_long, position_ids, cu_seqlens)
    is_long, cu_ptr, pos_ptr, stride_pos_b = sequence
    has_pos = position_ids is not None
    sm_scale_log2 = softmax_scale * LOG2E
    q_in, k_in = q, k
    if staged:
        q_in, k_in = _stage_rotated(q, k, inv_freq, sequence, seq_len, batch, varlen, has_pos, sm_scale_log2,
                                    attention_short, attention_long)  # fmt: skip
    constexprs = _bwd_constexprs(q, inv_freq, causal, varlen, has_pos, staged)
    table_args = (inv_freq, cu_ptr, pos_ptr, is_long)
    v_do_strides = (*bht_strides(v, varlen), *bht_strides(grad_out, varlen))
    lse_strides = _lse_strides(lse_log2, varlen)
    grid_q = lambda meta: sequence_grid(triton.cdiv(seq_len, meta["BLOCK_M"]), num_q_heads, batch)
    _rope_attention_bwd_dq_kernel[grid_q](
        q_in, k_in, v, grad_out, dq, lse_log2, delta, *table_args,
        *bht_strides(q_in, varlen), *bht_strides(k_in, varlen), *v_do_strides, *bht_strides(dq, varlen),
        *lse_strides, stride_pos_b, seq_len, num_q_heads, num_q_heads // num_kv_heads,
        sm_scale_log2, attention_short, attention_long, length_bucket(seq_len), **constexprs,
    )  # fmt: skip
    two_pass = dkdv_two_pass(q.shape[-1])
    if group_splits is None:
        kinds = ("dv", "dk") if two_pass else ("dkdv",)  # the fewest programs any config has:
        largest_block_n = max(c.kwargs["BLOCK_N"] for kind in kinds for c in _bwd_configs(kind))
        splits = dkdv_group_splits(batch * num_kv_heads * triton.cdiv(seq_len, largest_block_n), group, q.device)
    else:
        splits = group_splits
    dk_out, dv_out = dk, dv
    if splits > 1:  # fp32 partial sums, heads kv_head * splits + part: [B, Hk * splits, L, D] or [T, Hk * splits, D]
        dk_out, dv_out = (_partials(x, splits) for x in (k, v))
    grid_kv = lambda meta: sequence_grid(triton.cdiv(seq_len, meta["BLOCK_N"]), num_kv_heads * splits, batch)
    passes = [(_rope_attention_bwd_dkdv_kernel, True, True)]  # (kernel, WITH_DK, WITH_DV)
    if two_pass:
        passes = [(_rope_attention_bwd_dv_kernel, False, True), (_rope_attention_bwd_dk_kernel, True, False)]
    for kernel, with_dk, with_dv in passes:
        kernel[grid_kv](
            q_in, k_in, v, grad_out, dk_out, dv_out, lse_log2, delta, *table_args,
            *bht_strides(q_in, varlen), *bht_strides(k_in, varlen), *v_do_strides,
            *bht_strides(dk_out, varlen), *bht_strides(dv_out, varlen),
            *lse_strides, stride_pos_b, seq_len, num_kv_heads, group, splits,
            softmax_scale, sm_scale_log2, attention_short, attention_long, length_bucket(seq_len), **constexprs,
            WITH_DK=with_dk, WITH_DV=with_dv,
        )  # fmt: skip
    if splits > 1:
        for out, parts in ((dk, dk_out), (dv, dv_out)):
            out.copy_(_sum_partials(parts, splits))
    return dq, dk, dv


def dkdv_two_pass(head_dim: int) -> bool:
    """Whether the backward computes dv and dk in two passes over each key tile (two launches of the dk/dv kernel,
    each holding one fp32 accumulator) rather than together: above 128 channels.

    dk and dv of 64 keys x 256 channels in fp32 take 256 registers a thread over one warp group (4 warps), the rows
    wgmma takes on sm_90; over 8 warps they spilled and repeated q k^T, so the fused kernel ran 16 x 32 mma.sync
    tiles at 2.5x its dots' MMA work. One accumulator takes 128 registers: each pass runs wgmma on 64 keys per warp
    group with no MMA repeated, and the pair does five dots where the fused kernel does four (q k^T in both
    passes), 1.25x its MMA work, and reads q and dO twice (benchmarks/compile_report.py; docs/backends.md).
    """
    return head_dim > 128


def dkdv_group_splits(programs: int, group: int, device: torch.device) -> int:
    """Into how many parts the dk/dv kernel splits each GQA group: 1 when its ``programs`` (one per kv head and key
    tile) already give every SM two, else the smallest divisor of ``group`` that does (at most ``group``).

    At short lengths with GQA, one program per kv head and key tile under-fills the GPU (8 kv heads x 16 tiles of a
    1K sequence = 128 programs for 132 SMs), while each program loops over all the q heads of its group. Split, each
    part writes fp32 partial sums that the launcher adds: memory of ``parts`` x dk and dv in fp32, small exactly
    when the grid is small.
    """
    if device.type != "cuda" or group == 1:
        return 1
    target = 2 * sm_count(device)
    for parts in range(1, group + 1):
        if group % parts == 0 and programs * parts >= target:
            return parts
    return group


def _partials(x: Tensor, splits: int) -> Tensor:
    """A zeroed fp32 buffer for ``splits`` partial sums per head of ``x`` (dense ``[B, H, L, D]``, varlen
    ``[T, H, D]``): the head axis ``H * splits`` long; key tiles past a sequence's end are never written."""
    shape = list(x.shape)
    shape[1] *= splits  # the head axis of both layouts
    return torch.zeros(shape, dtype=torch.float32, device=x.device)


def _sum_partials(parts: Tensor, splits: int) -> Tensor:
    """[B, H * splits, L, D] -> [B, H, L, D] (varlen: [T, H * splits, D] -> [T, H, D]), summed over the parts."""
    shape = list(parts.shape)
    heads = shape[1] // splits
    return parts.view(*shape[:1], heads, splits, *shape[2:]).sum(2)
