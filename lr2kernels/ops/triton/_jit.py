"""The @triton.jit helpers shared by the kernels of attention.py, rope.py and decode.py: program prologue,
split-half layout, angles and rotation, loads/stores, online-softmax tiles. (Helpers used by one op file only stay
in that file.)

A head of ``D`` channels is handled in three segments: ``x1 = x[:, :HALF]`` and ``x2 = x[:, HALF:2*HALF]`` (the
NeoX pairs: channel j rotates with j + HALF) and the pass-through ``xp = x[:, 2*HALF:]`` (partial rotary). The
rotation is then elementwise between x1 and x2. Every kernel rotates through the same chain, so none can disagree
about pairing, angles or scaling: :func:`_load_split` -> cos/sin -> :func:`_rotate_cast`. :func:`_load_rotated` is
that chain with the angles of given positions (:func:`_angles`), used for every q and k tile of attention and for
decode's queries; apply_rope / rerotate compute cos/sin once per program and reuse them for all its heads; decode's
keys take theirs from an angle-addition table. Whole rows (v, dO, outputs) are one segment of HEAD_DIM channels.

Tiles: a segment of n channels is a tuple of at most two power-of-two tiles (``_host.tile_widths``): the first
``*_A`` channels, then the rest padded to ``*_B`` and masked; none when n is 0 (no pass-through). So a 48-channel
half is 32 + 16 channels of tl.dot, not 64. The segment constexprs travel as tuples: a split layout ``SPLIT = (HALF,
HALF_A, HALF_B, PASS, PASS_A, PASS_B)``, a row ``ROW = (HEAD_DIM, HEAD_A, HEAD_B)``; a segment's ``(n, A, B)``.
Helpers loop over a segment's tiles with ``tl.static_range(len(seg))``, so absent tiles cost no code. The launchers
choose the widths: the backward's dq / dk accumulators and decode's rows get one tile per segment (``one_tile``).

Pointer offsets: every ``index * stride`` product is formed in int64 (:func:`_head_offset`, the row pointers of
the loads and stores), so tensors past 2^31 elements address correctly.
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


# ---------------------------------------------------------------------------------------------- segments
@triton.jit
def _load_segment(base, row_mask, OFFSET: tl.constexpr, SEG: tl.constexpr):
    """The tiles ``[BLOCK, A]`` (, ``[BLOCK, B]``) of channels ``OFFSET .. OFFSET + n - 1`` of rows whose pointers
    are ``base [BLOCK, 1]``, in the tensor's dtype, zero outside the mask. (Tile i starts at channel i * A and is
    A + i * (B - A) wide: written out rather than in a helper, as Triton's interpreter pays per nested call.)"""
    tiles = ()
    for i in tl.static_range((SEG[0] > 0) + (SEG[0] > SEG[1])):  # 0, 1 or 2 tiles
        cols = i * SEG[1] + tl.arange(0, SEG[1] + i * (SEG[2] - SEG[1]))
        mask = row_mask[:, None] & (cols < SEG[0])[None, :]
        tiles = tiles + (tl.load(base + OFFSET + cols[None, :], mask=mask, other=0.0),)
    return tiles


@triton.jit
def _store_segment(base, row_mask, x, OFFSET: tl.constexpr, SEG: tl.constexpr):
    """Store a segment's tiles ``x`` at channels ``OFFSET ..`` of rows ``base [BLOCK, 1]`` in the pointer's dtype."""
    for i in tl.static_range(len(x)):
        cols = i * SEG[1] + tl.arange(0, SEG[1] + i * (SEG[2] - SEG[1]))
        mask = row_mask[:, None] & (cols < SEG[0])[None, :]
        tl.store(base + OFFSET + cols[None, :], x[i].to(base.dtype.element_ty), mask=mask)


@triton.jit
def _cast(x, dtype):
    """A segment's tiles cast to ``dtype``."""
    out = ()
    for i in tl.static_range(len(x)):
        out = out + (x[i].to(dtype),)
    return out


@triton.jit
def _scale(x, factor):
    """A segment's tiles times ``factor`` (a scalar, or a ``[BLOCK, 1]`` column)."""
    out = ()
    for i in tl.static_range(len(x)):
        out = out + (x[i] * factor,)
    return out


@triton.jit
def _add(x, y):
    """Two segments' tiles added."""
    out = ()
    for i in tl.static_range(len(x)):
        out = out + (x[i] + y[i],)
    return out


@triton.jit
def _divide(x, divisor):
    """A segment's tiles divided by ``divisor`` (a ``[BLOCK, 1]`` column)."""
    out = ()
    for i in tl.static_range(len(x)):
        out = out + (x[i] / divisor,)
    return out


@triton.jit
def _zeros_fp32(BLOCK: tl.constexpr, SEG: tl.constexpr):
    """fp32 zero tiles ``[BLOCK, A]`` (, ``[BLOCK, B]``) of a segment: an accumulator."""
    tiles = ()
    for i in tl.static_range((SEG[0] > 0) + (SEG[0] > SEG[1])):  # as in _load_segment
        tiles = tiles + (tl.zeros([BLOCK, SEG[1] + i * (SEG[2] - SEG[1])], dtype=tl.float32),)
    return tiles


@triton.jit
def _dot_acc(acc, a, x, PRECISION: tl.constexpr):
    """``acc += a @ x`` tile by tile: a ``[M, K]``, x a segment ``[K, *]``, acc a segment ``[M, *]``."""
    out = ()
    for i in tl.static_range(len(x)):
        out = out + (acc[i] + tl.dot(a, x[i], input_precision=PRECISION),)
    return out


@triton.jit
def _row_dot(a, b):
    """Row sums of ``a * b`` over a segment: ``[BLOCK]`` fp32."""
    total = tl.sum(a[0].to(tl.float32) * b[0].to(tl.float32), 1)
    for i in tl.static_range(1, len(a)):
        total += tl.sum(a[i].to(tl.float32) * b[i].to(tl.float32), 1)
    return total


# ---------------------------------------------------------------------------------------------- angles, rotation
@triton.jit
def _inv_freq(inv_freq_ptr, is_long, SPLIT: tl.constexpr):
    """The fp32 inverse frequencies of a table, tiled like a half (``[A]`` (, ``[B]``), zero past HALF): row
    ``is_long`` of the ``[2, HALF]`` pair."""
    tiles = ()
    for i in tl.static_range(1 + (SPLIT[0] > SPLIT[1])):  # the tiles of a half (HALF >= 1)
        cols = i * SPLIT[1] + tl.arange(0, SPLIT[1] + i * (SPLIT[2] - SPLIT[1]))
        tiles = tiles + (tl.load(inv_freq_ptr + is_long * SPLIT[0] + cols, mask=cols < SPLIT[0], other=0.0),)
    return tiles


@triton.jit
def _sincos(x):
    """(cos, sin) of fp32 angles ``0 <= x < 105615`` with one range reduction for both: libdevice's ``cosf`` /
    ``sinf`` fast path (the same Cody-Waite constants and polynomials, so ~1 ulp as they are), which ``tl.cos`` and
    ``tl.sin`` each run on their own, with a slow-path branch apiece (decode's q angles and tile base angles).
    Needs FMA contraction off (as the decode kernel is compiled)."""
    shifted = x * 0.63661974668502807617 + 12582912.0  # 1.5 x 2^23: rounds x 2/pi to an integer, exactly
    j = shifted - 12582912.0
    r = tl.fma(j, -1.5707962512969970703, x)
    r = tl.fma(j, -7.5497894158615963534e-08, r)
    r = tl.fma(j, -5.3903029534742383927e-15, r)  # x - j pi/2, |r| <= pi/4
    quadrant = j.to(tl.int32)
    r2 = r * r
    cos_r = tl.fma(r2, 2.4279579520225525e-05, -0.0013887860113754869)  # Horner, libdevice's coefficients
    cos_r = tl.fma(r2, cos_r, 0.041666727513074875)
    cos_r = tl.fma(r2, cos_r, -0.4999999701976776)
    cos_r = tl.fma(r2, cos_r, 1.0)
    sin_r = tl.fma(r2, -0.00019574658654164523, 0.00833270326256752)
    sin_r = tl.fma(r2, sin_r, -0.16666662693023682)
    sin_r = tl.fma(r * r2, sin_r, r)
    odd = (quadrant & 1) != 0
    sin = tl.where(odd, cos_r, sin_r)
    cos = tl.where(odd, sin_r, cos_r)
    sin = tl.where((quadrant & 2) != 0, -sin, sin)
    cos = tl.where(((quadrant + 1) & 2) != 0, -cos, cos)
    return cos, sin


@triton.jit
def _sincos_if(angle, fast):
    """(cos, sin) of fp32 angles: :func:`_sincos` where ``fast`` (every angle below 105615, its range), else
    libdevice's ``cos`` and ``sin``, each with its own range reduction and slow path."""
    if fast:
        cos, sin = _sincos(angle)
    else:
        cos = tl.cos(angle)
        sin = tl.sin(angle)
    return cos, sin


@triton.jit
def _angles_of(pos, inv_freq, attention, fast):
    """Scaled (cos, sin), each tiled like a half ``[BLOCK, *]``, for integer positions ``[BLOCK]`` and the inverse
    frequencies' tiles ``inv_freq``: HF's angle ``float32(pos) * inv_freq`` rounded once in fp32. ``fast``: every
    angle is in :func:`_sincos`'s range (a run-time flag, decode's queries), else libdevice's ``cos`` and ``sin``
    (``False`` as a constant: no branch)."""
    cos = ()
    sin = ()
    for i in tl.static_range(len(inv_freq)):
        angle = pos.to(tl.float32)[:, None] * inv_freq[i][None, :]  # [BLOCK, A or B]
        cos_i, sin_i = _sincos_if(angle, fast)
        cos = cos + (cos_i * attention,)
        sin = sin + (sin_i * attention,)
    return cos, sin


@triton.jit
def _angles(pos, inv_freq_ptr, is_long, attention, SPLIT: tl.constexpr):
    """Scaled (cos, sin), each tiled like a half ``[BLOCK, *]``, for integer positions ``[BLOCK]``.

    The angle is HF's: ``float32(pos) * inv_freq`` rounded once in fp32; ``inv_freq_ptr`` holds the short table's
    ``HALF`` frequencies followed by the long table's.
    """
    return _angles_of(pos, _inv_freq(inv_freq_ptr, is_long, SPLIT), attention, False)


@triton.jit
def _rotate(x1, x2, cos, sin):
    """RoPE on the pairs (x1, x2), tile by tile: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    y1 = ()
    y2 = ()
    for i in tl.static_range(len(x1)):
        y1 = y1 + (x1[i] * cos[i] - x2[i] * sin[i],)
        y2 = y2 + (x2[i] * cos[i] + x1[i] * sin[i],)
    return y1, y2


@triton.jit
def _rotate_transposed(g1, g2, cos, sin):
    """The transpose of :func:`_rotate` (gradients w.r.t. the pre-RoPE input): rotation by -angle."""
    y1 = ()
    y2 = ()
    for i in tl.static_range(len(g1)):
        y1 = y1 + (g1[i] * cos[i] + g2[i] * sin[i],)
        y2 = y2 + (g2[i] * cos[i] - g1[i] * sin[i],)
    return y1, y2


# ---------------------------------------------------------------------------------------------- loads and stores
@triton.jit
def _load_split_native(ptr, rows, row_stride, row_mask, SPLIT: tl.constexpr):
    """Rows ``[BLOCK, D]`` as the split segments (x1, x2, xp) in the tensor's own dtype: tiles that feed ``tl.dot``
    as stored (operands rotated already) go to shared memory as loaded instead of through fp32 registers. xp is an
    empty tuple when PASS == 0."""
    base = ptr + rows.to(tl.int64)[:, None] * row_stride  # [BLOCK, 1] int64 offsets
    x1 = ()
    x2 = ()
    for i in tl.static_range(1 + (SPLIT[0] > SPLIT[1])):  # the tiles of a half: x1's and x2's share columns
        cols = i * SPLIT[1] + tl.arange(0, SPLIT[1] + i * (SPLIT[2] - SPLIT[1]))
        mask = row_mask[:, None] & (cols < SPLIT[0])[None, :]
        x1 = x1 + (tl.load(base + cols[None, :], mask=mask, other=0.0),)
        x2 = x2 + (tl.load(base + SPLIT[0] + cols[None, :], mask=mask, other=0.0),)
    xp = ()
    if SPLIT[3] > 0:
        xp = _load_segment(base, row_mask, 2 * SPLIT[0], (SPLIT[3], SPLIT[4], SPLIT[5]))
    return x1, x2, xp


@triton.jit
def _load_split(ptr, rows, row_stride, row_mask, SPLIT: tl.constexpr):
    """:func:`_load_split_native` in fp32 (for the rotation)."""
    x1, x2, xp = _load_split_native(ptr, rows, row_stride, row_mask, SPLIT)
    return _cast(x1, tl.float32), _cast(x2, tl.float32), _cast(xp, tl.float32)


@triton.jit
def _store_split(ptr, rows, row_stride, row_mask, x1, x2, xp, SPLIT: tl.constexpr):
    """Store the split segments (x1, x2, xp) as ``[BLOCK, D]`` rows of ptr's dtype."""
    base = ptr + rows.to(tl.int64)[:, None] * row_stride  # [BLOCK, 1] int64 offsets
    out_dtype = ptr.dtype.element_ty
    for i in tl.static_range(len(x1)):  # the tiles of a half: x1's and x2's share columns
        cols = i * SPLIT[1] + tl.arange(0, SPLIT[1] + i * (SPLIT[2] - SPLIT[1]))
        mask = row_mask[:, None] & (cols < SPLIT[0])[None, :]
        tl.store(base + cols[None, :], x1[i].to(out_dtype), mask=mask)
        tl.store(base + SPLIT[0] + cols[None, :], x2[i].to(out_dtype), mask=mask)
    if SPLIT[3] > 0:
        _store_segment(base, row_mask, xp, 2 * SPLIT[0], (SPLIT[3], SPLIT[4], SPLIT[5]))


@triton.jit
def _rotate_cast(x1, x2, xp, cos, sin, out_dtype, TRANSPOSED: tl.constexpr):
    """Rotate the fp32 split segments by cos/sin (or the transpose) and cast them to ``out_dtype``: (x1, x2, xp)."""
    if TRANSPOSED:
        x1, x2 = _rotate_transposed(x1, x2, cos, sin)
    else:
        x1, x2 = _rotate(x1, x2, cos, sin)
    return _cast(x1, out_dtype), _cast(x2, out_dtype), _cast(xp, out_dtype)


@triton.jit
def _load_rotated(ptr, rows, row_stride, row_mask, pos, inv_freq_ptr, is_long, attention, out_dtype,
                  SPLIT: tl.constexpr):  # fmt: skip
    """Load -> angles of ``pos`` -> rotate -> cast: the RoPE'd rows (x1, x2, xp) in ``out_dtype``, and the scaled
    (cos, sin) used, tiled like a half (the backward rotates its gradients back with them)."""
    x1, x2, xp = _load_split(ptr, rows, row_stride, row_mask, SPLIT)  # [BLOCK, *] fp32
    cos, sin = _angles(pos, inv_freq_ptr, is_long, attention, SPLIT)
    x1, x2, xp = _rotate_cast(x1, x2, xp, cos, sin, out_dtype, False)
    return x1, x2, xp, cos, sin


@triton.jit
def _load_rows(ptr, rows, row_stride, row_mask, ROW: tl.constexpr):
    """Whole-head rows (v, dO, partial outputs) as a segment of tiles ``[BLOCK, *]``, zero outside the mask."""
    return _load_segment(ptr + rows.to(tl.int64)[:, None] * row_stride, row_mask, 0, ROW)


@triton.jit
def _store_rows(ptr, rows, row_stride, row_mask, x, ROW: tl.constexpr):
    """Store whole-head rows (outputs, dv, partials), a segment of tiles, in ptr's dtype."""
    _store_segment(ptr + rows.to(tl.int64)[:, None] * row_stride, row_mask, x, 0, ROW)


@triton.jit
def _load_row_tiles(ptr, rows, row_stride, row_mask, ROW: tl.constexpr, MASKED: tl.constexpr):
    """:func:`_load_rows`, with the row mask only where ``MASKED``: the forward's key tiles that lie inside the
    sequence load unpredicated. Columns are masked only in a tile that holds padding."""
    base = ptr + rows.to(tl.int64)[:, None] * row_stride  # [BLOCK, 1] int64 offsets
    tiles = ()
    for i in tl.static_range((ROW[0] > 0) + (ROW[0] > ROW[1])):  # as in _load_segment
        cols = i * ROW[1] + tl.arange(0, ROW[1] + i * (ROW[2] - ROW[1]))
        if MASKED:
            tiles = tiles + (tl.load(base + cols[None, :], mask=row_mask[:, None] & (cols < ROW[0])[None, :],
                                     other=0.0),)  # fmt: skip
        elif (i + 1) * ROW[1] + i * (ROW[2] - ROW[1]) > ROW[0]:  # the tile holds padding channels
            tiles = tiles + (tl.load(base + cols[None, :], mask=(cols < ROW[0])[None, :], other=0.0),)
        else:
            tiles = tiles + (tl.load(base + cols[None, :]),)
    return tiles


@triton.jit
def _rotate_rows(ptr, rows, row_stride, row_mask, pos, inv_freq_ptr, is_long, attention, out_dtype,
                 HALF: tl.constexpr, ROW: tl.constexpr):  # fmt: skip
    """Rows ``[BLOCK, D]`` RoPE'd at full width, in ``out_dtype``, as a row segment (the tiles of v and outputs),
    so q k^T is one dot per row tile rather than one per half and pass-through tile.

    Each tile loads its channels and their NeoX partners (channel c < HALF pairs with c + HALF, and back): channel c
    of the first half becomes ``x cos - x' sin``, of the second ``x cos + x' sin`` (:func:`_rotate`'s y1 and y2,
    same fp32 angles as :func:`_angles`); pass-through channels (c >= 2 HALF) come through unscaled.
    """
    base = ptr + rows.to(tl.int64)[:, None] * row_stride  # [BLOCK, 1] int64 offsets
    tiles = ()
    for i in tl.static_range((ROW[0] > 0) + (ROW[0] > ROW[1])):  # as in _load_segment
        cols = i * ROW[1] + tl.arange(0, ROW[1] + i * (ROW[2] - ROW[1]))  # [W] channels
        first_half = cols < HALF
        rotary = cols < 2 * HALF
        mask = row_mask[:, None] & (cols < ROW[0])[None, :]
        x = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # [BLOCK, W]
        partner = tl.where(first_half, cols + HALF, cols - HALF)
        x_partner = tl.load(base + partner[None, :], mask=mask & rotary[None, :], other=0.0).to(tl.float32)
        freq = tl.load(inv_freq_ptr + is_long * HALF + tl.where(first_half, cols, cols - HALF), mask=rotary,
                       other=0.0)  # [W] fmt: skip
        angle = pos.to(tl.float32)[:, None] * freq[None, :]  # [BLOCK, W]
        cos = tl.where(rotary[None, :], tl.cos(angle) * attention, 1.0)
        sin = tl.sin(angle) * attention  # 0 on pass-through channels, whose partner is 0 too
        sin = tl.where(first_half[None, :], -sin, sin)
        tiles = tiles + ((x * cos + x_partner * sin).to(out_dtype),)
    return tiles


@triton.jit
def _row_descriptor(base, rows, cols, row_stride, BLOCK: tl.constexpr, WIDTH: tl.constexpr):
    """A TMA descriptor of ``[rows, cols]`` from ``base`` (rows ``row_stride`` apart), loading ``[BLOCK, WIDTH]``."""
    return tl.make_tensor_descriptor(base, shape=[rows, cols], strides=[row_stride, 1], block_shape=[BLOCK, WIDTH])


@triton.jit
def _row_descriptors(base, rows, row_stride, BLOCK: tl.constexpr, ROW: tl.constexpr):
    """TMA descriptors of ``rows`` rows from ``base`` (``row_stride`` apart), one per row tile of ROW, each loading
    ``[BLOCK, A]`` (, ``[BLOCK, B]``) blocks: rows and channels past the bounds arrive as zeros, so a tile at the end
    of a sequence needs no mask. The caller guarantees TMA's alignment (16-byte base and row stride:
    :func:`lr2kernels.ops.triton._host.tma_aligned`)."""
    descs = ()
    for i in tl.static_range((ROW[0] > 0) + (ROW[0] > ROW[1])):  # as in _load_segment
        descs = descs + (_row_descriptor(base + i * ROW[1], rows, ROW[0] - i * ROW[1], row_stride, BLOCK,
                                         ROW[1] + i * (ROW[2] - ROW[1])),)  # fmt: skip
    return descs


@triton.jit
def _load_row_descriptors(descs, first):
    """Rows ``first ..`` through :func:`_row_descriptors`: a row segment of tiles ``[BLOCK, *]``."""
    tiles = ()
    for i in tl.static_range(len(descs)):
        tiles = tiles + (descs[i].load([first, 0]),)
    return tiles


# ---------------------------------------------------------------------------------------------- attention tiles
@triton.jit
def _qk_scores(q1, q2, qp, k1, k2, kp, PRECISION: tl.constexpr):
    """q k^T over the split layout: ``[BLOCK_M, BLOCK_N]`` fp32."""
    scores = tl.dot(q1[0], tl.trans(k1[0]), input_precision=PRECISION)
    for i in tl.static_range(1, len(q1)):
        scores += tl.dot(q1[i], tl.trans(k1[i]), input_precision=PRECISION)
    for i in tl.static_range(len(q2)):
        scores += tl.dot(q2[i], tl.trans(k2[i]), input_precision=PRECISION)
    for i in tl.static_range(len(qp)):
        scores += tl.dot(qp[i], tl.trans(kp[i]), input_precision=PRECISION)
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
    ROW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold one key tile into the running output ``acc`` (a row segment ``[BLOCK_M, *]`` fp32), max ``m_i`` and sum
    ``l_i`` (log2 units): scores of the rotated k ``[BLOCK_N, *]`` where ``visible [BLOCK_M, BLOCK_N]``, then the
    tile's v rows."""
    scores = _qk_scores(q1, q2, qp, k1, k2, kp, PRECISION) * sm_scale_log2
    scores = tl.where(visible, scores, float("-inf"))  # [BLOCK_M, BLOCK_N], log2 units
    p, alpha, m_i, l_i = _online_softmax_step(scores, m_i, l_i)
    v = _load_rows(v_ptr, rows, row_stride, row_mask, ROW)  # [BLOCK_N, *]
    p = p.to(q1[0].dtype)
    rescaled = ()
    for i in tl.static_range(len(v)):
        rescaled = rescaled + (acc[i] * alpha[:, None] + tl.dot(p, v[i], input_precision=PRECISION),)
    return rescaled, m_i, l_i


@triton.jit
def _attend_finish(acc, m_i, l_i):
    """(output, a row segment ``[BLOCK_M, *]`` fp32, log2-sum-exp ``[BLOCK_M]``); rows that saw no key: 0, -inf."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # fully masked rows give 0, not NaN
    return _divide(acc, l_safe[:, None]), tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))


# ---------------------------------------------------------------------------------------------- pair order
# The backward's scratch copies of q and k hold each row rotated and in PAIR ORDER: channel pair j at columns 2j and
# 2j + 1, where pair j < HALF is the NeoX pair (j, j + HALF) and pair j >= HALF two neighbouring pass-through
# channels (2j, 2j + 1), which rotate by the identity. A dot product is the same in any channel order, so the
# attention tiles contract over whole-head tiles (``ROW``) instead of the split layout's three segments; and a
# gradient accumulated in that order holds each pair in neighbouring columns, so the transposed rotation of the
# store splits a whole-head tile into its pairs (a reshape) instead of keeping x1, x2, xp accumulators, whose
# narrow tiles replicated MMA work across warps.
@triton.jit
def _pair_channels(pairs, HALF: tl.constexpr):
    """The head channels (a, b) of pair indices ``pairs [W]``: (j, j + HALF) for rotary pairs, else (2j, 2j + 1)."""
    rotary = pairs < HALF
    first = tl.where(rotary, pairs, 2 * pairs)
    return first, tl.where(rotary, pairs + HALF, first + 1)


@triton.jit
def _pair_angles(pos, inv_freq_ptr, is_long, attention, HALF: tl.constexpr, ROW: tl.constexpr):
    """Scaled (cos, sin) of the pairs of each whole-head tile (tile i ``[BLOCK, width_i / 2]``) for positions
    ``[BLOCK]``: :func:`_angles`'s values on rotary pairs (HF's fp32 ``pos * inv_freq``), (1, 0) on pass-through
    pairs."""
    cos = ()
    sin = ()
    for i in tl.static_range((ROW[0] > 0) + (ROW[0] > ROW[1])):  # the tiles of _load_segment
        pairs = i * (ROW[1] // 2) + tl.arange(0, (ROW[1] + i * (ROW[2] - ROW[1])) // 2)
        rotary = pairs < HALF
        inv_freq = tl.load(inv_freq_ptr + is_long * HALF + pairs, mask=rotary, other=0.0)
        angle = pos.to(tl.float32)[:, None] * inv_freq[None, :]  # [BLOCK, width / 2]
        cos = cos + (tl.where(rotary[None, :], tl.cos(angle) * attention, 1.0),)
        sin = sin + (tl.where(rotary[None, :], tl.sin(angle) * attention, 0.0),)
    return cos, sin


@triton.jit
def _load_pairs_rotated(ptr, rows, row_stride, row_mask, cos, sin, scale, out_dtype, HALF: tl.constexpr,
                        ROW: tl.constexpr):  # fmt: skip
    """Rows of a pre-RoPE head, rotated by (cos, sin) of :func:`_pair_angles`, times ``scale``, in pair order: whole-
    head tiles ``[BLOCK, width]`` in ``out_dtype`` (zero outside the mask)."""
    base = ptr + rows.to(tl.int64)[:, None] * row_stride  # [BLOCK, 1] int64 offsets
    tiles = ()
    for i in tl.static_range(len(cos)):
        pairs = i * (ROW[1] // 2) + tl.arange(0, (ROW[1] + i * (ROW[2] - ROW[1])) // 2)
        a_col, b_col = _pair_channels(pairs, HALF)
        a = tl.load(base + a_col[None, :], mask=row_mask[:, None] & (a_col < ROW[0])[None, :], other=0.0)
        b = tl.load(base + b_col[None, :], mask=row_mask[:, None] & (b_col < ROW[0])[None, :], other=0.0)
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        rotated_a = (a * cos[i] - b * sin[i]) * scale  # [BLOCK, width / 2]: _rotate's arithmetic
        rotated_b = (b * cos[i] + a * sin[i]) * scale
        tiles = tiles + (tl.reshape(tl.join(rotated_a, rotated_b), [rotated_a.shape[0], 2 * rotated_a.shape[1]]).to(
            out_dtype),)
    return tiles


@triton.jit
def _store_pairs_transposed(ptr, rows, row_stride, row_mask, g, cos, sin, scale, HALF: tl.constexpr,
                            ROW: tl.constexpr):  # fmt: skip
    """Store ``scale * g``, whole-head fp32 tiles of a gradient w.r.t. the rotated rows in pair order, as the
    gradient w.r.t. the pre-RoPE rows in head order: the transposed rotation (by -angle, same attention factor) of
    each pair; pass-through pairs unchanged."""
    base = ptr + rows.to(tl.int64)[:, None] * row_stride  # [BLOCK, 1] int64 offsets
    out_dtype = ptr.dtype.element_ty
    for i in tl.static_range(len(g)):
        pairs = i * (ROW[1] // 2) + tl.arange(0, (ROW[1] + i * (ROW[2] - ROW[1])) // 2)
        ga, gb = tl.split(tl.reshape(g[i] * scale, [g[i].shape[0], g[i].shape[1] // 2, 2]))  # [BLOCK, width / 2]
        a_col, b_col = _pair_channels(pairs, HALF)
        tl.store(base + a_col[None, :], (ga * cos[i] + gb * sin[i]).to(out_dtype),
                 mask=row_mask[:, None] & (a_col < ROW[0])[None, :])  # fmt: skip
        tl.store(base + b_col[None, :], (gb * cos[i] - ga * sin[i]).to(out_dtype),
                 mask=row_mask[:, None] & (b_col < ROW[0])[None, :])  # fmt: skip

