"""The @triton.jit helpers shared by the kernels of attention.py, rope.py and decode.py: program prologue,
split-half layout, angles and rotation, loads/stores, online-softmax tiles. (Helpers used by one op file only stay
in that file.)

A head of ``D`` channels is handled as three tiles: ``x1 = x[:, :HALF]`` and ``x2 = x[:, HALF:2*HALF]`` (the NeoX
pairs: channel j rotates with j + HALF) and the pass-through ``xp = x[:, 2*HALF:]`` (partial rotary). The rotation
is then elementwise between x1 and x2. Every kernel rotates through the same chain, so none can disagree about
pairing, angles or scaling: :func:`_load_split` -> cos/sin -> :func:`_rotate_cast`. :func:`_load_rotated` is that
chain with the angles of given positions (:func:`_angles`), used for every q and k tile of attention and for
decode's queries; apply_rope / rerotate compute cos/sin once per program and reuse them for all its heads; decode's
keys take theirs from an angle-addition table. Each tile is padded to a power of two (``*_PAD``) and masked.

Pointer offsets: every ``index * stride`` product is formed in int64 (:func:`_head_offset`, :func:`_split_ptrs`,
:func:`_load_rows`), so tensors past 2^31 elements address correctly.
"""

from __future__ import annotations

import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------------- program prologue
@triton.jit
def _seq_bounds(cu_seqlens_ptr, seq, seq_len_dense, IS_VARLEN: tl.constexpr):
    """(first token, length) of sequence ``seq``: from ``cu_seqlens`` (varlen) or ``[0, seq_len_dense)`` (dense)."""
    if IS_VARLEN:
        start = tl.load(cu_seqlens_ptr + seq)
        seq_len = tl.load(cu_seqlens_ptr + seq + 1) - start
    else:
        start = 0
        seq_len = seq_len_dense
    return start, seq_len


@triton.jit
def _sequence_table(is_long_ptr, seq, attention_short, attention_long):
    """(is_long, attention factor) of one sequence: 1 and the long factor iff its flag is set."""
    is_long = tl.load(is_long_ptr + seq)
    return is_long, tl.where(is_long != 0, attention_long, attention_short)


@triton.jit
def _sequence_program(
    per_seq, cu_seqlens_ptr, is_long_ptr, pos_ptr, stride_pos_b, seq_len_dense, attention_short, attention_long,
    BLOCK: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """Prologue of a program of the grid ``(token blocks of BLOCK, per_seq, sequences)`` (per_seq: heads, or
    chunks of heads; :func:`lr2kernels.ops.triton._host.sequence_grid`): where it is and which table it uses.

    Heads and sequences take axes 1 and 2 (CUDA caps each at 65,535) rather than one axis of their product, which
    thousands of sequences at 32 heads would overflow.

    Returns ``(first token of the block, seq, index within the sequence, first token of the sequence, its length,
    is_long, attention factor, the sequence's position row)``. The caller exits early when the block starts past the
    length (a jit helper cannot end the kernel).
    """
    pid = tl.program_id(2) * per_seq + tl.program_id(1)
    seq = pid // per_seq
    start, seq_len = _seq_bounds(cu_seqlens_ptr, seq, seq_len_dense, IS_VARLEN)
    is_long, attention = _sequence_table(is_long_ptr, seq, attention_short, attention_long)
    pos_base = pos_ptr + _head_offset(seq, 0, start, stride_pos_b, 0, 1)
    return tl.program_id(0) * BLOCK, seq, pid % per_seq, start, seq_len, is_long, attention, pos_base


@triton.jit
def _head_offset(seq, head, token, stride_b, stride_h, stride_t):
    """int64 element offset of ``[seq, head, token]`` (varlen tensors pass stride_b = 0 and the absolute token)."""
    return tl.cast(seq, tl.int64) * stride_b + tl.cast(head, tl.int64) * stride_h + tl.cast(token, tl.int64) * stride_t


@triton.jit
def _positions(pos_ptr, rows, row_mask, HAS_POS: tl.constexpr):
    """Positions ``[BLOCK]`` of the rows of a sequence: loaded from its position row (HAS_POS) or the rows."""
    if HAS_POS:
        return tl.load(pos_ptr + rows, mask=row_mask, other=0)
    return rows


# ---------------------------------------------------------------------------------------------- angles, rotation
@triton.jit
def _inv_freq(inv_freq_ptr, is_long, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """The ``[HALF_PAD]`` fp32 inverse frequencies of a table: row ``is_long`` of the ``[2, HALF]`` pair."""
    cols = tl.arange(0, HALF_PAD)
    return tl.load(inv_freq_ptr + is_long * HALF + cols, mask=cols < HALF, other=0.0)


@triton.jit
def _angles(pos, inv_freq_ptr, is_long, attention, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Scaled cos/sin ``[BLOCK, HALF_PAD]`` for integer positions ``[BLOCK]``.

    The angle is HF's: ``float32(pos) * inv_freq`` rounded once in fp32; ``inv_freq_ptr`` holds the short table's
    ``HALF`` frequencies followed by the long table's.
    """
    inv_freq = _inv_freq(inv_freq_ptr, is_long, HALF, HALF_PAD)  # [HALF_PAD]
    angle = pos.to(tl.float32)[:, None] * inv_freq[None, :]  # [BLOCK, HALF_PAD]
    return tl.cos(angle) * attention, tl.sin(angle) * attention


@triton.jit
def _rotate(x1, x2, cos, sin):
    """RoPE on the pairs (x1, x2): (x1 cos - x2 sin, x2 cos + x1 sin)."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rotate_transposed(g1, g2, cos, sin):
    """The transpose of :func:`_rotate` (gradients w.r.t. the pre-RoPE input): rotation by -angle."""
    return g1 * cos + g2 * sin, g2 * cos - g1 * sin


# ---------------------------------------------------------------------------------------------- loads and stores
@triton.jit
def _split_ptrs(
    ptr, rows, row_stride, row_mask,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
):  # fmt: skip
    """Pointers and masks of the split tiles of rows ``[BLOCK]``: (x1 ptrs, x2 ptrs, half mask, xp ptrs, pass mask)."""
    half_cols = tl.arange(0, HALF_PAD)
    pass_cols = tl.arange(0, PASS_PAD)
    base = ptr + rows.to(tl.int64)[:, None] * row_stride  # [BLOCK, 1]
    half_mask = row_mask[:, None] & (half_cols < HALF)[None, :]  # [BLOCK, HALF_PAD]
    pass_mask = row_mask[:, None] & (pass_cols < PASS)[None, :]  # [BLOCK, PASS_PAD]
    x1_ptrs = base + half_cols[None, :]
    x2_ptrs = base + HALF + half_cols[None, :]
    xp_ptrs = base + 2 * HALF + pass_cols[None, :]
    return x1_ptrs, x2_ptrs, half_mask, xp_ptrs, pass_mask


@triton.jit
def _load_split(
    ptr, rows, row_stride, row_mask,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
):  # fmt: skip
    """Load ``[BLOCK, D]`` rows as fp32 tiles (x1, x2, xp); xp is a dummy zero tile when PASS == 0."""
    p1, p2, half_mask, pp, pass_mask = _split_ptrs(ptr, rows, row_stride, row_mask, HALF, HALF_PAD, PASS, PASS_PAD)
    x1 = tl.load(p1, mask=half_mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=half_mask, other=0.0).to(tl.float32)
    xp = tl.load(pp, mask=pass_mask, other=0.0).to(tl.float32)
    return x1, x2, xp


@triton.jit
def _load_split_native(
    ptr, rows, row_stride, row_mask,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
):  # fmt: skip
    """:func:`_load_split` in the tensor's own dtype: tiles that feed ``tl.dot`` as stored (operands rotated already),
    so they can go to shared memory as loaded instead of through fp32 registers."""
    p1, p2, half_mask, pp, pass_mask = _split_ptrs(ptr, rows, row_stride, row_mask, HALF, HALF_PAD, PASS, PASS_PAD)
    x1 = tl.load(p1, mask=half_mask, other=0.0)
    x2 = tl.load(p2, mask=half_mask, other=0.0)
    xp = tl.load(pp, mask=pass_mask, other=0.0)
    return x1, x2, xp


@triton.jit
def _store_split(
    ptr, rows, row_stride, row_mask, x1, x2, xp,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
):  # fmt: skip
    """Store the split tiles (x1, x2, xp) as ``[BLOCK, D]`` rows of ptr's dtype."""
    p1, p2, half_mask, pp, pass_mask = _split_ptrs(ptr, rows, row_stride, row_mask, HALF, HALF_PAD, PASS, PASS_PAD)
    out_ty = ptr.dtype.element_ty
    tl.store(p1, x1.to(out_ty), mask=half_mask)
    tl.store(p2, x2.to(out_ty), mask=half_mask)
    if PASS > 0:
        tl.store(pp, xp.to(out_ty), mask=pass_mask)


@triton.jit
def _rotate_cast(x1, x2, xp, cos, sin, out_dtype, TRANSPOSED: tl.constexpr):
    """Rotate the fp32 split tiles by cos/sin (or the transpose) and cast them to ``out_dtype``: (x1, x2, xp)."""
    if TRANSPOSED:
        x1, x2 = _rotate_transposed(x1, x2, cos, sin)
    else:
        x1, x2 = _rotate(x1, x2, cos, sin)
    return x1.to(out_dtype), x2.to(out_dtype), xp.to(out_dtype)


@triton.jit
def _load_rotated(
    ptr, rows, row_stride, row_mask, pos, inv_freq_ptr, is_long, attention, out_dtype,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
):  # fmt: skip
    """Load -> angles of ``pos`` -> rotate -> cast: the RoPE'd rows (x1, x2, xp) in ``out_dtype``, and the scaled
    (cos, sin) ``[BLOCK, HALF_PAD]`` used (the backward rotates its gradients back with them)."""
    x1, x2, xp = _load_split(ptr, rows, row_stride, row_mask, HALF, HALF_PAD, PASS, PASS_PAD)  # [BLOCK, *] fp32
    cos, sin = _angles(pos, inv_freq_ptr, is_long, attention, HALF, HALF_PAD)  # [BLOCK, HALF_PAD]
    x1, x2, xp = _rotate_cast(x1, x2, xp, cos, sin, out_dtype, False)
    return x1, x2, xp, cos, sin


@triton.jit
def _load_rows(ptr, rows, row_stride, row_mask, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """Whole-head rows ``[BLOCK, HEAD_DIM_PAD]`` (v, dO, partial outputs), zero outside the mask."""
    cols = tl.arange(0, HEAD_DIM_PAD)
    return tl.load(
        ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :],
        mask=row_mask[:, None] & (cols < HEAD_DIM)[None, :],
        other=0.0,
    )


@triton.jit
def _store_rows(ptr, rows, row_stride, row_mask, x, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """Store whole-head rows ``[BLOCK, HEAD_DIM_PAD]`` (outputs, dv, partials) in ptr's dtype."""
    cols = tl.arange(0, HEAD_DIM_PAD)
    tl.store(
        ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :],
        x.to(ptr.dtype.element_ty),
        mask=row_mask[:, None] & (cols < HEAD_DIM)[None, :],
    )


# ---------------------------------------------------------------------------------------------- attention tiles
@triton.jit
def _qk_scores(q1, q2, qp, k1, k2, kp, PASS: tl.constexpr, PRECISION: tl.constexpr):
    """q k^T over the split layout: ``[BLOCK_M, BLOCK_N]`` fp32."""
    scores = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
    scores += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
    if PASS > 0:
        scores += tl.dot(qp, tl.trans(kp), input_precision=PRECISION)
    return scores


@triton.jit
def _online_softmax_step(scores, m_i, l_i):
    """One key tile of the online softmax, log2 units: (p, alpha, new max, new sum).

    Rows that have seen no visible key yet (max still -inf) use 0 as their max, so they stay at p = 0, not NaN.
    """
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q1, q2, qp, k1, k2, kp, visible, sm_scale_log2, v_ptr, rows, row_stride, row_mask,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PASS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold one key tile into the running output ``acc [BLOCK_M, HEAD_DIM_PAD]``, max ``m_i`` and sum ``l_i`` (log2
    units): scores of the rotated k ``[BLOCK_N, *]`` where ``visible [BLOCK_M, BLOCK_N]``, then the tile's v rows."""
    scores = _qk_scores(q1, q2, qp, k1, k2, kp, PASS, PRECISION) * sm_scale_log2
    scores = tl.where(visible, scores, float("-inf"))  # [BLOCK_M, BLOCK_N], log2 units
    p, alpha, m_i, l_i = _online_softmax_step(scores, m_i, l_i)
    v = _load_rows(v_ptr, rows, row_stride, row_mask, HEAD_DIM, HEAD_DIM_PAD)  # [BLOCK_N, HEAD_DIM_PAD]
    acc = acc * alpha[:, None] + tl.dot(p.to(q1.dtype), v, input_precision=PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attend_finish(acc, m_i, l_i):
    """(output ``[BLOCK_M, HEAD_DIM_PAD]`` fp32, log2-sum-exp ``[BLOCK_M]``); rows that saw no key: 0 and -inf."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # fully masked rows give 0, not NaN
    return acc / l_safe[:, None], tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
