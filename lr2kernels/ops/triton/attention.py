"""Fused rescaled-RoPE flash attention (FlashAttention-2 style) forward and backward, dense and varlen.

q and k arrive PRE-RoPE; each tile is rotated in registers right after it is loaded (q once per program, k once
per key tile), with the table of its sequence (short or long), so rotated q/k never reach memory, in training
either: the backward recomputes the rotation and returns gradients w.r.t. the pre-RoPE q and k.

Dense ``[B, H, L, D]`` and varlen ``[T, H, D]`` share one kernel body: varlen is a batch whose sequence bounds
come from ``cu_seqlens`` (IS_VARLEN). GQA maps q head h to kv head ``h // (Hq // Hk)``; the dk/dv program of a kv
head loops over its q heads, so no atomics are needed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lr2kernels.ops.triton._rope import (
    _angles,
    _load_rows,
    _load_split,
    _online_softmax_step,
    _rotate,
    _rotate_transposed,
    _sequence_table,
    _store_split,
    split_sizes,
)

LOG2E = 1.4426950408889634


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(backward: bool) -> list[triton.Config]:
    """Autotune space: Ampere/Hopper tiles on a GPU; one small tile in the interpreter (numpy runs every lane)."""
    if triton_interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    tiles = [(64, 64), (64, 32), (32, 64)] if backward else [(128, 64), (128, 32), (64, 64), (64, 32)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n in tiles
        for w in (4, 8)
        for s in ((2, 3) if not backward else (2,))
    ]


# Not keyed on the length: varlen batches change it every step, and a retune per length would dominate.
_TUNE_KEY = ["HEAD_DIM", "HALF", "PASS", "IS_CAUSAL", "IS_VARLEN", "PRECISION"]


@triton.jit
def _seq_bounds(cu_seqlens_ptr, seq, seq_len_dense, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        start = tl.load(cu_seqlens_ptr + seq)
        seq_len = tl.load(cu_seqlens_ptr + seq + 1) - start
    else:
        start = 0
        seq_len = seq_len_dense
    return start, seq_len


@triton.jit
def _positions(pos_ptr, seq, stride_pos_b, start, rows, row_mask, HAS_POS: tl.constexpr):
    if HAS_POS:
        return tl.load(pos_ptr + seq * stride_pos_b + start + rows, mask=row_mask, other=0)
    return rows


@triton.jit
def _qk_scores(q1, q2, qp, k1, k2, kp, PASS: tl.constexpr, PRECISION: tl.constexpr):
    """q k^T over the split layout: ``[BLOCK_M, BLOCK_N]`` fp32."""
    scores = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
    scores += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
    if PASS > 0:
        scores += tl.dot(qp, tl.trans(kp), input_precision=PRECISION)
    return scores


@triton.autotune(configs=_configs(backward=False), key=_TUNE_KEY)
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, INV_FREQ, CU_SEQLENS, POS, IS_LONG,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_lse_b, stride_lse_h, stride_pos_b,
    seq_len_dense, num_q_heads, group, sm_scale_log2, attention_short, attention_long,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seq = pid_bh // num_q_heads
    head = pid_bh % num_q_heads
    kv_head = head // group
    start, seq_len = _seq_bounds(CU_SEQLENS, seq, seq_len_dense, IS_VARLEN)
    if pid_m * BLOCK_M >= seq_len:
        return
    is_long, attention = _sequence_table(IS_LONG, seq, attention_short, attention_long)
    dtype = Q.dtype.element_ty

    q_base = Q + seq.to(tl.int64) * stride_qb + head * stride_qh + start.to(tl.int64) * stride_qt
    k_base = K + seq.to(tl.int64) * stride_kb + kv_head * stride_kh + start.to(tl.int64) * stride_kt
    v_base = V + seq.to(tl.int64) * stride_vb + kv_head * stride_vh + start.to(tl.int64) * stride_vt

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seq_len
    q1, q2, qp = _load_split(q_base, offs_m, stride_qt, m_mask, HALF, HALF_PAD, PASS, PASS_PAD)  # [BLOCK_M, *]
    cos, sin = _angles(_positions(POS, seq, stride_pos_b, start, offs_m, m_mask, HAS_POS), INV_FREQ, is_long,
                       attention, HALF, HALF_PAD)  # fmt: skip
    q1, q2 = _rotate(q1, q2, cos, sin)
    q1, q2, qp = q1.to(dtype), q2.to(dtype), qp.to(dtype)

    d_cols = tl.arange(0, HEAD_DIM_PAD)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    hi = tl.minimum(seq_len, (pid_m + 1) * BLOCK_M) if IS_CAUSAL else seq_len
    for n_start in range(0, hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_len
        k1, k2, kp = _load_split(k_base, offs_n, stride_kt, n_mask, HALF, HALF_PAD, PASS, PASS_PAD)  # [BLOCK_N, *]
        cos_k, sin_k = _angles(_positions(POS, seq, stride_pos_b, start, offs_n, n_mask, HAS_POS), INV_FREQ,
                               is_long, attention, HALF, HALF_PAD)  # fmt: skip
        k1, k2 = _rotate(k1, k2, cos_k, sin_k)
        scores = _qk_scores(q1, q2, qp, k1.to(dtype), k2.to(dtype), kp.to(dtype), PASS, PRECISION) * sm_scale_log2
        visible = n_mask[None, :]
        if IS_CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        scores = tl.where(visible, scores, float("-inf"))  # [BLOCK_M, BLOCK_N], log2 units
        p, alpha, m_i, l_i = _online_softmax_step(scores, m_i, l_i)
        v = _load_rows(v_base, offs_n, stride_vt, n_mask, HEAD_DIM, HEAD_DIM_PAD)  # [BLOCK_N, HEAD_DIM_PAD]
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision=PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # fully masked rows give 0, not NaN
    out = acc / l_safe[:, None]
    o_base = O + seq.to(tl.int64) * stride_ob + head * stride_oh + start.to(tl.int64) * stride_ot
    tl.store(
        o_base + offs_m.to(tl.int64)[:, None] * stride_ot + d_cols[None, :],
        out.to(O.dtype.element_ty),
        mask=m_mask[:, None] & (d_cols < HEAD_DIM)[None, :],
    )
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)  # natural log
    tl.store(LSE + seq.to(tl.int64) * stride_lse_b + head * stride_lse_h + start + offs_m, lse, mask=m_mask)


@triton.autotune(configs=_configs(backward=True), key=_TUNE_KEY)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, INV_FREQ, CU_SEQLENS, POS, IS_LONG,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_lse_b, stride_lse_h, stride_pos_b,
    seq_len_dense, num_q_heads, group, sm_scale, attention_short, attention_long,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dq for one block of queries: loop over key tiles; rotated with the same angles as the forward."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seq = pid_bh // num_q_heads
    head = pid_bh % num_q_heads
    kv_head = head // group
    start, seq_len = _seq_bounds(CU_SEQLENS, seq, seq_len_dense, IS_VARLEN)
    if pid_m * BLOCK_M >= seq_len:
        return
    is_long, attention = _sequence_table(IS_LONG, seq, attention_short, attention_long)
    dtype = Q.dtype.element_ty
    # q, do and dq share one layout (dq is allocated like q, do is made contiguous like q).
    q_base = Q + seq.to(tl.int64) * stride_qb + head * stride_qh + start.to(tl.int64) * stride_qt
    do_base = DO + seq.to(tl.int64) * stride_dob + head * stride_doh + start.to(tl.int64) * stride_dot
    dq_base = DQ + seq.to(tl.int64) * stride_qb + head * stride_qh + start.to(tl.int64) * stride_qt
    k_base = K + seq.to(tl.int64) * stride_kb + kv_head * stride_kh + start.to(tl.int64) * stride_kt
    v_base = V + seq.to(tl.int64) * stride_vb + kv_head * stride_vh + start.to(tl.int64) * stride_vt
    row_base = seq.to(tl.int64) * stride_lse_b + head * stride_lse_h + start

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seq_len
    q1, q2, qp = _load_split(q_base, offs_m, stride_qt, m_mask, HALF, HALF_PAD, PASS, PASS_PAD)
    cos, sin = _angles(_positions(POS, seq, stride_pos_b, start, offs_m, m_mask, HAS_POS), INV_FREQ, is_long,
                       attention, HALF, HALF_PAD)  # fmt: skip
    q1, q2 = _rotate(q1, q2, cos, sin)
    q1, q2, qp = q1.to(dtype), q2.to(dtype), qp.to(dtype)
    do = _load_rows(do_base, offs_m, stride_dot, m_mask, HEAD_DIM, HEAD_DIM_PAD)
    lse = tl.load(LSE + row_base + offs_m, mask=m_mask, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)

    dq1 = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    dqp = tl.zeros([BLOCK_M, PASS_PAD], dtype=tl.float32)
    hi = tl.minimum(seq_len, (pid_m + 1) * BLOCK_M) if IS_CAUSAL else seq_len
    for n_start in range(0, hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_len
        k1, k2, kp = _load_split(k_base, offs_n, stride_kt, n_mask, HALF, HALF_PAD, PASS, PASS_PAD)
        cos_k, sin_k = _angles(_positions(POS, seq, stride_pos_b, start, offs_n, n_mask, HAS_POS), INV_FREQ,
                               is_long, attention, HALF, HALF_PAD)  # fmt: skip
        k1, k2 = _rotate(k1, k2, cos_k, sin_k)
        k1, k2, kp = k1.to(dtype), k2.to(dtype), kp.to(dtype)
        scores = _qk_scores(q1, q2, qp, k1, k2, kp, PASS, PRECISION) * sm_scale
        visible = n_mask[None, :] & m_mask[:, None]
        if IS_CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(visible, tl.exp(scores - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
        v = _load_rows(v_base, offs_n, stride_vt, n_mask, HEAD_DIM, HEAD_DIM_PAD)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(dtype)
        dq1 += tl.dot(ds, k1, input_precision=PRECISION)
        dq2 += tl.dot(ds, k2, input_precision=PRECISION)
        if PASS > 0:
            dqp += tl.dot(ds, kp, input_precision=PRECISION)
    # dq of the rotated q -> dq of the pre-RoPE q: the transposed rotation (rotation by -angle, same scale).
    dq1, dq2 = _rotate_transposed(dq1 * sm_scale, dq2 * sm_scale, cos, sin)
    _store_split(dq_base, offs_m, stride_qt, m_mask, dq1, dq2, dqp * sm_scale, HALF, HALF_PAD, PASS, PASS_PAD)


@triton.autotune(configs=_configs(backward=True), key=_TUNE_KEY)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, INV_FREQ, CU_SEQLENS, POS, IS_LONG,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_lse_b, stride_lse_h, stride_pos_b,
    seq_len_dense, num_kv_heads, group, sm_scale, attention_short, attention_long,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dk, dv for one key tile of one kv head, summed over the q heads of its GQA group."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seq = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads
    start, seq_len = _seq_bounds(CU_SEQLENS, seq, seq_len_dense, IS_VARLEN)
    if pid_n * BLOCK_N >= seq_len:
        return
    is_long, attention = _sequence_table(IS_LONG, seq, attention_short, attention_long)
    dtype = Q.dtype.element_ty
    # k, dk share a layout; v, dv share a layout.
    k_base = K + seq.to(tl.int64) * stride_kb + kv_head * stride_kh + start.to(tl.int64) * stride_kt
    v_base = V + seq.to(tl.int64) * stride_vb + kv_head * stride_vh + start.to(tl.int64) * stride_vt
    dk_base = DK + seq.to(tl.int64) * stride_kb + kv_head * stride_kh + start.to(tl.int64) * stride_kt
    dv_base = DV + seq.to(tl.int64) * stride_vb + kv_head * stride_vh + start.to(tl.int64) * stride_vt

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < seq_len
    d_cols = tl.arange(0, HEAD_DIM_PAD)
    k1, k2, kp = _load_split(k_base, offs_n, stride_kt, n_mask, HALF, HALF_PAD, PASS, PASS_PAD)
    cos_k, sin_k = _angles(_positions(POS, seq, stride_pos_b, start, offs_n, n_mask, HAS_POS), INV_FREQ, is_long,
                           attention, HALF, HALF_PAD)  # fmt: skip
    k1, k2 = _rotate(k1, k2, cos_k, sin_k)
    k1, k2, kp = k1.to(dtype), k2.to(dtype), kp.to(dtype)
    v = _load_rows(v_base, offs_n, stride_vt, n_mask, HEAD_DIM, HEAD_DIM_PAD)

    dk1 = tl.zeros([BLOCK_N, HALF_PAD], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF_PAD], dtype=tl.float32)
    dkp = tl.zeros([BLOCK_N, PASS_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0
    for g in range(0, group):
        head = kv_head * group + g
        q_base = Q + seq.to(tl.int64) * stride_qb + head * stride_qh + start.to(tl.int64) * stride_qt
        do_base = DO + seq.to(tl.int64) * stride_dob + head * stride_doh + start.to(tl.int64) * stride_dot
        row_base = seq.to(tl.int64) * stride_lse_b + head * stride_lse_h + start
        for m_start in range(lo, seq_len, BLOCK_M):
            offs_m = m_start + tl.arange(0, BLOCK_M)
            m_mask = offs_m < seq_len
            q1, q2, qp = _load_split(q_base, offs_m, stride_qt, m_mask, HALF, HALF_PAD, PASS, PASS_PAD)
            cos, sin = _angles(_positions(POS, seq, stride_pos_b, start, offs_m, m_mask, HAS_POS), INV_FREQ,
                               is_long, attention, HALF, HALF_PAD)  # fmt: skip
            q1, q2 = _rotate(q1, q2, cos, sin)
            q1, q2, qp = q1.to(dtype), q2.to(dtype), qp.to(dtype)
            do = _load_rows(do_base, offs_m, stride_dot, m_mask, HEAD_DIM, HEAD_DIM_PAD)
            lse = tl.load(LSE + row_base + offs_m, mask=m_mask, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)
            scores_t = _qk_scores(k1, k2, kp, q1, q2, qp, PASS, PRECISION) * sm_scale  # [BLOCK_N, BLOCK_M]
            visible = n_mask[:, None] & m_mask[None, :]
            if IS_CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :])
            p_t = tl.where(visible, tl.exp(scores_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = (p_t * (dp_t - delta[None, :])).to(dtype)
            dk1 += tl.dot(ds_t, q1, input_precision=PRECISION)
            dk2 += tl.dot(ds_t, q2, input_precision=PRECISION)
            if PASS > 0:
                dkp += tl.dot(ds_t, qp, input_precision=PRECISION)
    dk1, dk2 = _rotate_transposed(dk1 * sm_scale, dk2 * sm_scale, cos_k, sin_k)
    _store_split(dk_base, offs_n, stride_kt, n_mask, dk1, dk2, dkp * sm_scale, HALF, HALF_PAD, PASS, PASS_PAD)
    tl.store(dv_base + offs_n.to(tl.int64)[:, None] * stride_vt + d_cols[None, :], dv.to(DV.dtype.element_ty),
             mask=n_mask[:, None] & (d_cols < HEAD_DIM)[None, :])  # fmt: skip


# ------------------------------------------------------------------------------------------------ host side
class _Launch:
    """Strides and flags of one call, shared by the forward and the two backward kernels."""

    def __init__(self, q, k, v, table, position_ids, cu_seqlens, max_seqlen, is_long, causal, softmax_scale):
        self.varlen = cu_seqlens is not None
        if self.varlen:
            self.batch = cu_seqlens.numel() - 1
            self.seq_len = max_seqlen
            self.num_q_heads, self.num_kv_heads = q.shape[1], k.shape[1]
        else:
            self.batch, self.num_q_heads, self.seq_len = q.shape[0], q.shape[1], q.shape[2]
            self.num_kv_heads = k.shape[1]
        self.head_dim = q.shape[-1]
        self.group = self.num_q_heads // self.num_kv_heads
        self.sizes = split_sizes(self.head_dim, table.rotary_dim)
        self.head_dim_pad = max(16, triton.next_power_of_2(self.head_dim))
        self.causal = causal
        self.sm_scale = softmax_scale if softmax_scale is not None else self.head_dim**-0.5
        self.attention = (table.attention_factor_for(False), table.attention_factor_for(True))
        self.inv_freq = inv_freq_pair(table, q.device)
        self.is_long = is_long
        self.cu_seqlens = cu_seqlens if self.varlen else is_long  # any valid pointer when unused
        self.position_ids = position_ids
        if position_ids is not None and not self.varlen and position_ids.dim() == 2 and position_ids.shape[0] > 1:
            self.stride_pos_b = position_ids.stride(0)
        else:
            self.stride_pos_b = 0
        self.precision = "ieee" if q.dtype == torch.float32 else None  # fp32 stays fp32, not tf32

    def strides(self, x: torch.Tensor) -> tuple[int, int, int]:
        """(batch, head, token) strides; varlen tensors have no batch stride (sequences are row ranges)."""
        if self.varlen:
            return 0, x.stride(1), x.stride(0)
        return x.stride(0), x.stride(1), x.stride(2)

    def lse_strides(self, lse: torch.Tensor) -> tuple[int, int]:
        # dense lse [B, H, L]; varlen lse [H, T]
        return (0, lse.stride(0)) if self.varlen else (lse.stride(0), lse.stride(1))

    def constexprs(self) -> dict:
        return dict(
            **self.sizes,
            HEAD_DIM=self.head_dim,
            HEAD_DIM_PAD=self.head_dim_pad,
            IS_CAUSAL=self.causal,
            IS_VARLEN=self.varlen,
            HAS_POS=self.position_ids is not None,
            PRECISION=self.precision,
        )

    def scalars(self) -> tuple:
        pos = self.position_ids if self.position_ids is not None else self.is_long
        return pos, self.stride_pos_b


def inv_freq_pair(table, device: torch.device) -> torch.Tensor:
    """``[2 * rotary_dim // 2]`` fp32: the short table's inverse frequencies, then the long table's."""
    return torch.cat([table._inv_freq(False, device), table._inv_freq(True, device)]).contiguous()


def attention_forward(launch: _Launch, q, k, v):
    out = torch.empty_like(q)
    if launch.varlen:
        lse = torch.empty((launch.num_q_heads, q.shape[0]), dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty((launch.batch, launch.num_q_heads, launch.seq_len), dtype=torch.float32, device=q.device)
    pos, stride_pos_b = launch.scalars()
    grid = lambda meta: (triton.cdiv(launch.seq_len, meta["BLOCK_M"]), launch.batch * launch.num_q_heads)
    _fwd_kernel[grid](
        q, k, v, out, lse, launch.inv_freq, launch.cu_seqlens, pos, launch.is_long,
        *launch.strides(q), *launch.strides(k), *launch.strides(v), *launch.strides(out),
        *launch.lse_strides(lse), stride_pos_b,
        launch.seq_len, launch.num_q_heads, launch.group, launch.sm_scale * LOG2E, *launch.attention,
        **launch.constexprs(),
    )  # fmt: skip
    return out, lse


def attention_backward(launch: _Launch, q, k, v, out, lse, grad_out):
    grad_out = grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out
    delta = (out.float() * grad_out.float()).sum(-1)  # [B, H, L] or [T, H]
    delta = delta if not launch.varlen else delta.transpose(0, 1).contiguous()  # varlen: [H, T] like lse
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    pos, stride_pos_b = launch.scalars()
    common = launch.constexprs()
    grid_q = lambda meta: (triton.cdiv(launch.seq_len, meta["BLOCK_M"]), launch.batch * launch.num_q_heads)
    _bwd_dq_kernel[grid_q](
        q, k, v, grad_out, dq, lse, delta, launch.inv_freq, launch.cu_seqlens, pos, launch.is_long,
        *launch.strides(q), *launch.strides(k), *launch.strides(v), *launch.strides(grad_out),
        *launch.lse_strides(lse), stride_pos_b,
        launch.seq_len, launch.num_q_heads, launch.group, launch.sm_scale, *launch.attention, **common,
    )  # fmt: skip
    grid_kv = lambda meta: (triton.cdiv(launch.seq_len, meta["BLOCK_N"]), launch.batch * launch.num_kv_heads)
    _bwd_dkdv_kernel[grid_kv](
        q, k, v, grad_out, dk, dv, lse, delta, launch.inv_freq, launch.cu_seqlens, pos, launch.is_long,
        *launch.strides(q), *launch.strides(k), *launch.strides(v), *launch.strides(grad_out),
        *launch.lse_strides(lse), stride_pos_b,
        launch.seq_len, launch.num_kv_heads, launch.group, launch.sm_scale, *launch.attention, **common,
    )  # fmt: skip
    return dq, dk, dv


class RopeAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, launch: _Launch):
        out, lse = attention_forward(launch, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.launch = launch
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(ctx.launch, q, k, v, out, lse, grad_out)
        return dq, dk, dv, None
