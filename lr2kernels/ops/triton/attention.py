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

import torch
import triton
import triton.language as tl
from torch import Tensor

from lr2kernels.ops.triton._host import (
    LOG2E,
    bht_strides,
    contiguous_last,
    dot_precision,
    head_sizes,
    new_like,
    rotary_dim_of,
    sequence_args,
    sequence_grid,
    sequences,
    sm_count,
    split_sizes,
    triton_interpreting,
)
from lr2kernels.ops.triton._jit import (
    _attend_finish,
    _attend_tile,
    _dot_acc,
    _head_offset,
    _load_rotated,
    _load_rows,
    _load_split_native,
    _positions,
    _qk_scores,
    _rotate_transposed,
    _row_dot,
    _scale,
    _sequence_program,
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
    tiles = [(64, 64), (64, 32), (32, 64)] if backward else [(128, 64), (128, 32), (64, 64), (64, 32)]
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
    kind = "dkdv" if "DK" in named_args else "dq" if "DQ" in named_args else "fwd"
    head_dim, partial = kwargs.get("HEAD_DIM", 128), kwargs.get("PASS", 0) > 0
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
    # With the loop operand staged (rotated once, loaded as stored), Triton pipelines those loads through shared
    # memory, and 128 x 64 tiles then spill on sm_80: they are out (checked with Triton 3.9 and 3.6).
    ("fwd", 64, False): _tiles([(128, 64, 8), (128, 32, 4), (128, 32, 8), (64, 64, 8), (64, 32, 4), (64, 32, 8)]),
    # 80 and 96 channels: the halves in 32 + 16 channel tiles in the forward, in one 64-channel tile in the backward.
    ("fwd", 80, False): _tiles([(128, 64, 8), (128, 32, 8), (64, 64, 8), (64, 32, 8), (64, 32, 4)]),
    ("fwd", 96, False): _tiles([(128, 32, 8), (64, 32, 8), (64, 32, 4)]),
    ("fwd", 128, False): _tiles([(128, 32, 8), (64, 32, 8), (64, 32, 4)]),  # 64 x 64: 12 B spilled (3.6, sm_90)
    ("fwd", 128, True): _tiles([(128, 32, 8), (64, 64, 8), (64, 32, 8), (64, 32, 4)]),
    ("fwd", 256, False): {(64, 32, 8, 2)},
    ("dq", 64, False): _tiles([(64, 64, 4), (64, 64, 8), (64, 32, 4), (64, 32, 8), (32, 64, 4), (32, 64, 8)]),
    ("dq", 80, False): _tiles([(32, 64, 8), (32, 32, 8), (32, 16, 8)]),
    ("dq", 96, False): _tiles([(32, 64, 8), (32, 32, 8), (32, 16, 8)]),
    ("dq", 128, False): _tiles([(32, 64, 8)]),
    ("dq", 128, True): _tiles([(16, 32, 8)]),
    ("dq", 256, False): _tiles([(32, 32, 8)]),
    # dk/dv: no tile is spill-free on both archs at 64 channels, nor the 64 x 32 one on sm_90 at 128: per arch.
    ("dkdv", 64, False): {80: _tiles([(16, 32, 8)]), 90: _tiles([(32, 64, 8), (64, 64, 8)])},
    ("dkdv", 80, False): _tiles([(64, 32, 8), (32, 32, 8), (32, 16, 8), (16, 32, 8)]),
    ("dkdv", 96, False): _tiles([(64, 32, 8), (32, 32, 8), (32, 16, 8), (16, 32, 8)]),
    ("dkdv", 128, False): {80: _tiles([(64, 32, 8), (32, 32, 8)]), 90: _tiles([(32, 32, 8), (32, 16, 8)])},
    ("dkdv", 128, True): _tiles([(32, 16, 8)]),
    ("dkdv", 256, False): _tiles([(32, 16, 8)]),
}


# Keyed on the length's bucket (len_bucket, an argument the kernels never read), not the length itself: the best
# tile at 128K is not the best at 1K, but varlen batches change their longest length every step, and a retune per
# length would dominate.
_TUNE_KEY = ["HEAD_DIM", "HALF", "PASS", "IS_CAUSAL", "IS_VARLEN", "PRECISION", "STAGED", "len_bucket"]


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
def _load_token_tile(
    x_base, y_base, stride_xt, stride_yt, first, seq_len, pos_base, INV_FREQ, is_long, attention, dtype,
    BLOCK: tl.constexpr, HAS_POS: tl.constexpr, SPLIT: tl.constexpr, ROW: tl.constexpr,
):  # fmt: skip
    """:func:`_load_rotated_tile` of x (q, or k) and the same tokens' whole rows of y (dO, or v) ``[BLOCK, *]``,
    loaded right after: (rows, row mask, x1, x2, xp, cos, sin, y)."""
    rows, row_mask, x1, x2, xp, cos, sin = _load_rotated_tile(
        x_base, stride_xt, first, seq_len, pos_base, INV_FREQ, is_long, attention, dtype, BLOCK, HAS_POS, SPLIT,
    )  # fmt: skip
    y = _load_rows(y_base, rows, stride_yt, row_mask, ROW)
    return rows, row_mask, x1, x2, xp, cos, sin, y


@triton.jit
def _probs(a1, a2, ap, b1, b2, bp, lse, visible, sm_scale, PRECISION: tl.constexpr):
    """Softmax probabilities of one tile, in either orientation: ``exp(a b^T scale - lse)`` where visible, else 0
    (lse broadcast by the caller). dq passes (q, k) and gets ``[BLOCK_M, BLOCK_N]``; dk/dv pass (k, q) and get the
    transposed ``[BLOCK_N, BLOCK_M]``."""
    scores = _qk_scores(a1, a2, ap, b1, b2, bp, PRECISION) * sm_scale
    return tl.where(visible, tl.exp(scores - lse), 0.0)


@triton.jit
def _score_grads(p, x, y, delta, dtype, PRECISION: tl.constexpr):
    """Gradients of the scores of a tile of probabilities p: ``p (x y^T - delta)`` in ``dtype`` (delta broadcast by
    the caller; x, y row segments). dq passes (dO, v); dk/dv pass (v, dO) for the transposed tile."""
    dp = tl.dot(x[0], tl.trans(y[0]), input_precision=PRECISION)
    for i in tl.static_range(1, len(x)):
        dp += tl.dot(x[i], tl.trans(y[i]), input_precision=PRECISION)
    return (p * (dp - delta)).to(dtype)


@triton.jit
def _dot_split_acc(acc1, acc2, accp, ds, x1, x2, xp, PRECISION: tl.constexpr):
    """(acc1, acc2, accp) += ds @ (x1, x2, xp): a gradient accumulated in the split layout."""
    return _dot_acc(acc1, ds, x1, PRECISION), _dot_acc(acc2, ds, x2, PRECISION), _dot_acc(accp, ds, xp, PRECISION)


@triton.jit
def _store_pre_rope_grad(
    ptr, rows, row_stride, row_mask, g1, g2, gp, cos, sin, scale, SPLIT: tl.constexpr,
):  # fmt: skip
    """Store ``scale * g``, a gradient w.r.t. the ROTATED input, as the gradient w.r.t. the pre-RoPE input: the
    transposed rotation (by -angle, same attention factor); pass-through channels unchanged."""
    g1, g2 = _rotate_transposed(_scale(g1, scale), _scale(g2, scale), cos, sin)
    _store_split(ptr, rows, row_stride, row_mask, g1, g2, _scale(gp, scale), SPLIT)


@triton.jit
def _row_stats(lse_ptr, delta_ptr, rows, row_mask):
    """The forward's lse (natural log; -inf of a row that saw nothing -> 0) and delta = rowsum(dO * O) of rows."""
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    return lse, tl.load(delta_ptr + rows, mask=row_mask, other=0.0)


@triton.autotune(
    configs=_configs(backward=False), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs}
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
    STAGED: tl.constexpr,
):  # fmt: skip
    """Output and lse of one block of queries of one q head: loop over the key tiles of its kv head."""
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
    dtype = Q.dtype.element_ty

    offs_m, m_mask, q1, q2, qp, cos_q, sin_q = _load_rotated_tile(  # q [BLOCK_M, *] rotated
        q_base, stride_qt, first, seq_len, pos_base, INV_FREQ, is_long, attention, dtype, BLOCK_M, HAS_POS,
        SPLIT,
    )  # fmt: skip

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = _zeros_fp32(BLOCK_M, ROW)  # [BLOCK_M, *] row tiles
    hi = tl.minimum(seq_len, first + BLOCK_M) if IS_CAUSAL else seq_len
    for n_start in range(0, hi, BLOCK_N):
        offs_n, n_mask, k1, k2, kp = _load_loop_tile(  # k [BLOCK_N, *] rotated
            k_base, stride_kt, n_start, seq_len, pos_base, INV_FREQ, is_long, attention, dtype, BLOCK_N, HAS_POS,
            SPLIT, STAGED,
        )  # fmt: skip
        visible = n_mask[None, :]
        if IS_CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q1, q2, qp, k1, k2, kp, visible, sm_scale_log2, v_base, offs_n, stride_vt, n_mask,
            ROW, PRECISION,
        )  # fmt: skip

    out, lse_log2 = _attend_finish(acc, m_i, l_i)  # [BLOCK_M, *] row tiles, [BLOCK_M]
    o_base = O + _head_offset(seq, head, start, stride_ob, stride_oh, stride_ot)
    _store_rows(o_base, offs_m, stride_ot, m_mask, out, ROW)
    lse_base = LSE + _head_offset(seq, head, start, stride_lse_b, stride_lse_h, 1)
    tl.store(lse_base + offs_m, lse_log2 / 1.4426950408889634, mask=m_mask)  # natural log


@triton.autotune(
    configs=_configs(backward=True), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs}
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
    seq_len_dense, num_q_heads, group, sm_scale, attention_short, attention_long,
    len_bucket,  # the autotune key's length bucket; not read
    HALF: tl.constexpr, HALF_A: tl.constexpr, HALF_B: tl.constexpr,
    PASS: tl.constexpr, PASS_A: tl.constexpr, PASS_B: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_A: tl.constexpr, HEAD_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
    STAGED: tl.constexpr,
):  # fmt: skip
    """dq for one block of queries: loop over key tiles; rotated with the same angles as the forward."""
    SPLIT: tl.constexpr = (HALF, HALF_A, HALF_B, PASS, PASS_A, PASS_B)
    ROW: tl.constexpr = (HEAD_DIM, HEAD_A, HEAD_B)
    first, seq, head, start, seq_len, is_long, attention, pos_base = _sequence_program(  # dq rows of q head `head`
        num_q_heads, CU_SEQLENS, IS_LONG, POS, stride_pos_b, seq_len_dense, attention_short, attention_long,
        BLOCK_M, IS_VARLEN,
    )  # fmt: skip
    if first >= seq_len:
        return
    dtype = Q.dtype.element_ty
    q_base = Q + _head_offset(seq, head, start, stride_qb, stride_qh, stride_qt)
    do_base = DO + _head_offset(seq, head, start, stride_dob, stride_doh, stride_dot)
    offs_m, m_mask, q1, q2, qp, cos, sin, do = _load_token_tile(  # q [BLOCK_M, *] rotated, dO [BLOCK_M, *]
        q_base, do_base, stride_qt, stride_dot, first, seq_len, pos_base, INV_FREQ, is_long, attention, dtype,
        BLOCK_M, HAS_POS, SPLIT, ROW,
    )  # fmt: skip
    row_base = _head_offset(seq, head, start, stride_lse_b, stride_lse_h, 1)
    lse, delta = _row_stats(LSE + row_base, DELTA + row_base, offs_m, m_mask)  # [BLOCK_M]
    k_base = K + _head_offset(seq, head // group, start, stride_kb, stride_kh, stride_kt)
    v_base = V + _head_offset(seq, head // group, start, stride_vb, stride_vh, stride_vt)

    HALVES: tl.constexpr = (HALF, HALF_A, HALF_B)
    dq1 = _zeros_fp32(BLOCK_M, HALVES)  # [BLOCK_M, *] each, the split layout
    dq2 = _zeros_fp32(BLOCK_M, HALVES)
    dqp = _zeros_fp32(BLOCK_M, (PASS, PASS_A, PASS_B))
    hi = tl.minimum(seq_len, first + BLOCK_M) if IS_CAUSAL else seq_len
    for n_start in range(0, hi, BLOCK_N):
        offs_n, n_mask, k1, k2, kp = _load_loop_tile(  # k [BLOCK_N, *] rotated
            k_base, stride_kt, n_start, seq_len, pos_base, INV_FREQ, is_long, attention, dtype, BLOCK_N, HAS_POS,
            SPLIT, STAGED,
        )  # fmt: skip
        v = _load_rows(v_base, offs_n, stride_vt, n_mask, ROW)  # [BLOCK_N, *]
        visible = n_mask[None, :] & m_mask[:, None]
        if IS_CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        p = _probs(q1, q2, qp, k1, k2, kp, lse[:, None], visible, sm_scale, PRECISION)  # [BLOCK_M, BLOCK_N]
        ds = _score_grads(p, do, v, delta[:, None], dtype, PRECISION)
        dq1, dq2, dqp = _dot_split_acc(dq1, dq2, dqp, ds, k1, k2, kp, PRECISION)
    # dq of the rotated q -> dq of the pre-RoPE q: the transposed rotation (rotation by -angle, same scale).
    dq_base = DQ + _head_offset(seq, head, start, stride_dqb, stride_dqh, stride_dqt)
    _store_pre_rope_grad(dq_base, offs_m, stride_dqt, m_mask, dq1, dq2, dqp, cos, sin, sm_scale, SPLIT)  # fmt: skip


@triton.autotune(
    configs=_configs(backward=True), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs}
)
@triton.jit
def _rope_attention_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, INV_FREQ, CU_SEQLENS, POS, IS_LONG,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    stride_lse_b, stride_lse_h, stride_pos_b,  # lse and delta share a layout
    seq_len_dense, num_kv_heads, group, group_splits, sm_scale, attention_short, attention_long,
    len_bucket,  # the autotune key's length bucket; not read
    HALF: tl.constexpr, HALF_A: tl.constexpr, HALF_B: tl.constexpr,
    PASS: tl.constexpr, PASS_A: tl.constexpr, PASS_B: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_A: tl.constexpr, HEAD_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
    STAGED: tl.constexpr,
):  # fmt: skip
    """dk, dv for one key tile of one kv head, summed over the q heads of its GQA group, or over one of
    ``group_splits`` equal parts of it: programs per sequence are Hk x group_splits, and program ``slot`` writes the
    partial sums of its part to head ``slot`` of DK/DV (the launcher adds the parts; with 1 part, DK/DV are dk/dv)."""
    SPLIT: tl.constexpr = (HALF, HALF_A, HALF_B, PASS, PASS_A, PASS_B)
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
    HALVES: tl.constexpr = (HALF, HALF_A, HALF_B)
    dk1 = _zeros_fp32(BLOCK_N, HALVES)  # [BLOCK_N, *] each, the split layout
    dk2 = _zeros_fp32(BLOCK_N, HALVES)
    dkp = _zeros_fp32(BLOCK_N, (PASS, PASS_A, PASS_B))
    dv = _zeros_fp32(BLOCK_N, ROW)
    dtype = Q.dtype.element_ty
    offs_n, n_mask, k1, k2, kp, cos_k, sin_k, v = _load_token_tile(  # k [BLOCK_N, *] rotated, v [BLOCK_N, *]
        K + _head_offset(seq, kv_head, start, stride_kb, stride_kh, stride_kt),
        V + _head_offset(seq, kv_head, start, stride_vb, stride_vh, stride_vt),
        stride_kt, stride_vt, first, seq_len, pos_base, INV_FREQ, is_long, attention, dtype,
        BLOCK_N, HAS_POS, SPLIT, ROW,
    )  # fmt: skip
    lo = (first // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0
    for g in range(0, heads_per_program):
        head = first_head + g
        q_base = Q + _head_offset(seq, head, start, stride_qb, stride_qh, stride_qt)
        do_base = DO + _head_offset(seq, head, start, stride_dob, stride_doh, stride_dot)
        row_base = _head_offset(seq, head, start, stride_lse_b, stride_lse_h, 1)
        for m_start in range(lo, seq_len, BLOCK_M):
            # q [BLOCK_M, *] rotated, dO [BLOCK_M, *], lse and delta [BLOCK_M]
            offs_m, m_mask, q1, q2, qp = _load_loop_tile(
                q_base, stride_qt, m_start, seq_len, pos_base, INV_FREQ, is_long, attention, dtype, BLOCK_M,
                HAS_POS, SPLIT, STAGED,
            )  # fmt: skip
            do = _load_rows(do_base, offs_m, stride_dot, m_mask, ROW)
            lse, delta = _row_stats(LSE + row_base, DELTA + row_base, offs_m, m_mask)
            visible = n_mask[:, None] & m_mask[None, :]
            if IS_CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :])
            p_t = _probs(k1, k2, kp, q1, q2, qp, lse[None, :], visible, sm_scale, PRECISION)  # [BLOCK_N, BLOCK_M]
            dv = _dot_acc(dv, p_t.to(dtype), do, PRECISION)
            ds_t = _score_grads(p_t, v, do, delta[None, :], dtype, PRECISION)
            dk1, dk2, dkp = _dot_split_acc(dk1, dk2, dkp, ds_t, q1, q2, qp, PRECISION)
    dk_base = DK + _head_offset(seq, slot, start, stride_dkb, stride_dkh, stride_dkt)
    _store_pre_rope_grad(dk_base, offs_n, stride_dkt, n_mask, dk1, dk2, dkp, cos_k, sin_k, sm_scale, SPLIT)  # fmt: skip
    dv_base = DV + _head_offset(seq, slot, start, stride_dvb, stride_dvh, stride_dvt)
    _store_rows(dv_base, offs_n, stride_dvt, n_mask, dv, ROW)


@triton.jit
def _delta_kernel(
    O, DO, DELTA, num_rows, stride_o, stride_do,
    HEAD_DIM: tl.constexpr, HEAD_A: tl.constexpr, HEAD_B: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(O * dO) in fp32 for BLOCK rows: the backward's preprocessing, read straight from the inputs'
    dtype (no fp32 copies of O and dO in memory)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < num_rows
    ROW: tl.constexpr = (HEAD_DIM, HEAD_A, HEAD_B)
    o = _load_rows(O, rows, stride_o, row_mask, ROW)  # [BLOCK, *] row tiles
    do = _load_rows(DO, rows, stride_do, row_mask, ROW)
    tl.store(DELTA + rows, _row_dot(o, do), mask=row_mask)


def delta_block(head_dim: int) -> int:
    """Rows per program of :func:`_delta_kernel`: about 4K elements per tile (16 in the interpreter)."""
    return 16 if triton_interpreting() else max(16, 4096 // triton.next_power_of_2(head_dim))


def _delta(out: Tensor, grad_out: Tensor, varlen: bool) -> Tensor:
    """rowsum(out * grad_out) fp32 in the lse's layout: dense ``[B, H, L]``, varlen ``[H, T]``."""
    head_dim = out.shape[-1]
    o_rows, do_rows = out.reshape(-1, head_dim), grad_out.reshape(-1, head_dim)  # views where rows are dense
    delta = torch.empty(out.shape[:-1], dtype=torch.float32, device=out.device)  # [B, H, L] or [T, H]
    num_rows = o_rows.shape[0]
    block = delta_block(head_dim)
    _delta_kernel[(triton.cdiv(num_rows, block),)](
        o_rows, do_rows, delta, num_rows, o_rows.stride(0), do_rows.stride(0), **head_sizes(head_dim), BLOCK=block,
    )  # fmt: skip
    return delta.transpose(0, 1).contiguous() if varlen else delta


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
    causal: bool, softmax_scale: float, attention_short: float, attention_long: float, staged: bool = True,
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
    is_long, cu_ptr, pos_ptr, stride_pos_b = sequence_args(is_long, position_ids, cu_seqlens)
    grid = lambda meta: sequence_grid(triton.cdiv(seq_len, meta["BLOCK_M"]), num_q_heads, batch)
    _rope_attention_fwd_kernel[grid](
        q, k, v, out, lse, inv_freq, cu_ptr, pos_ptr, is_long,
        *bht_strides(q, varlen), *bht_strides(k, varlen), *bht_strides(v, varlen), *bht_strides(out, varlen),
        *_lse_strides(lse, varlen), stride_pos_b,
        seq_len, num_q_heads, num_q_heads // k.shape[1], softmax_scale * LOG2E, attention_short, attention_long,
        length_bucket(seq_len), **_constexprs(q, inv_freq, causal, varlen, position_ids is not None, staged, False),
    )  # fmt: skip
    return out, lse


def rope_attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    inv_freq: Tensor, is_long: Tensor, position_ids: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int,
    causal: bool, softmax_scale: float, attention_short: float, attention_long: float, staged: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients (dq, dk, dv) w.r.t. the PRE-RoPE q, k and v, shaped like them (contiguous).

    ``out`` and ``lse`` are :func:`rope_attention_fwd`'s; the other arguments are the forward's. ``staged``: rotate
    q and k once (one launch, scratch buffers of their sizes) for the loops of the dq (keys) and dk/dv (queries)
    kernels.
    """
    grad_out, q, k, v = (contiguous_last(x) for x in (grad_out, q, k, v))
    varlen = cu_seqlens is not None
    batch, seq_len = sequences(q, cu_seqlens, max_seqlen)
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    dq, dk, dv = new_like(q), new_like(k), new_like(v)
    if q.numel() == 0 or batch == 0 or seq_len == 0:
        return dq, dk, dv
    lse = lse.contiguous()
    delta = _delta(contiguous_last(out), grad_out, varlen)  # lse's layout: [B, H, L] or [H, T]
    # The loops' operands: dq loops over keys, dk/dv over queries; each rotated once when staged.
    q_loop, k_loop = q, k
    if staged:
        q_loop, k_loop = apply_rope(q, k, inv_freq, is_long, position_ids, cu_seqlens, max_seqlen, attention_short,
                                    attention_long, transposed=False)  # fmt: skip
    is_long, cu_ptr, pos_ptr, stride_pos_b = sequence_args(is_long, position_ids, cu_seqlens)
    constexprs = _constexprs(q, inv_freq, causal, varlen, position_ids is not None, staged, backward=True)
    table_args = (inv_freq, cu_ptr, pos_ptr, is_long)
    v_do_strides = (*bht_strides(v, varlen), *bht_strides(grad_out, varlen))
    grid_q = lambda meta: sequence_grid(triton.cdiv(seq_len, meta["BLOCK_M"]), num_q_heads, batch)
    _rope_attention_bwd_dq_kernel[grid_q](
        q, k_loop, v, grad_out, dq, lse, delta, *table_args,
        *bht_strides(q, varlen), *bht_strides(k_loop, varlen), *v_do_strides, *bht_strides(dq, varlen),
        *_lse_strides(lse, varlen), stride_pos_b, seq_len, num_q_heads, num_q_heads // num_kv_heads,
        softmax_scale, attention_short, attention_long, length_bucket(seq_len), **constexprs,
    )  # fmt: skip
    del k_loop  # the scratch buffer goes before the dk/dv kernel runs
    group = num_q_heads // num_kv_heads
    largest_block_n = max(c.kwargs["BLOCK_N"] for c in _configs(backward=True))  # the fewest programs any config has
    splits = dkdv_group_splits(batch * num_kv_heads * triton.cdiv(seq_len, largest_block_n), group, q.device)
    dk_out, dv_out = dk, dv
    if splits > 1:  # fp32 partial sums, heads kv_head * splits + part: [B, Hk * splits, L, D] or [T, Hk * splits, D]
        dk_out, dv_out = (_partials(x, splits) for x in (k, v))
    grid_kv = lambda meta: sequence_grid(triton.cdiv(seq_len, meta["BLOCK_N"]), num_kv_heads * splits, batch)
    _rope_attention_bwd_dkdv_kernel[grid_kv](
        q_loop, k, v, grad_out, dk_out, dv_out, lse, delta, *table_args,
        *bht_strides(q_loop, varlen), *bht_strides(k, varlen), *v_do_strides,
        *bht_strides(dk_out, varlen), *bht_strides(dv_out, varlen),
        *_lse_strides(lse, varlen), stride_pos_b, seq_len, num_kv_heads, group, splits,
        softmax_scale, attention_short, attention_long, length_bucket(seq_len), **constexprs,
    )  # fmt: skip
    if splits > 1:
        for out, parts in ((dk, dk_out), (dv, dv_out)):
            out.copy_(_sum_partials(parts, splits))
    return dq, dk, dv


# Tests set this to split the GQA group of the dk/dv kernel where no GPU decides it (None: by the device).
FORCE_DKDV_GROUP_SPLITS: int | None = None


def dkdv_group_splits(programs: int, group: int, device: torch.device) -> int:
    """Into how many parts the dk/dv kernel splits each GQA group: 1 when its ``programs`` (one per kv head and key
    tile) already give every SM two, else the smallest divisor of ``group`` that does (at most ``group``).

    At short lengths with GQA, one program per kv head and key tile under-fills the GPU (8 kv heads x 16 tiles of a
    1K sequence = 128 programs for 132 SMs), while each program loops over all the q heads of its group. Split, each
    part writes fp32 partial sums that the launcher adds: memory of ``parts`` x dk and dv in fp32, small exactly
    when the grid is small.
    """
    if FORCE_DKDV_GROUP_SPLITS is not None:
        if group % FORCE_DKDV_GROUP_SPLITS:
            raise ValueError(f"FORCE_DKDV_GROUP_SPLITS: expected a divisor of the GQA group {group}")
        return FORCE_DKDV_GROUP_SPLITS
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
