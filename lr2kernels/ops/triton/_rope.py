"""Shared @triton.jit pieces: the split-half layout, the rotation and its transpose.

A head of ``D`` channels is handled as three tiles: ``x1 = x[:, :HALF]`` and ``x2 = x[:, HALF:2*HALF]`` (the NeoX
pairs: channel j rotates with j + HALF) and the pass-through ``xp = x[:, 2*HALF:]`` (partial rotary). The rotation
is then elementwise between x1 and x2, so forward, backward and decode rotate in registers with one helper and
can never disagree about pairing or scaling. Each tile is padded to a power of two (``*_PAD``) and masked.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _angles(pos, inv_freq_ptr, is_long, attention, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Scaled cos/sin ``[BLOCK, HALF_PAD]`` for integer positions ``[BLOCK]``.

    The angle is HF's: ``float32(pos) * inv_freq`` rounded once in fp32; ``inv_freq_ptr`` holds the short table's
    ``HALF`` frequencies followed by the long table's.
    """
    cols = tl.arange(0, HALF_PAD)
    inv_freq = tl.load(inv_freq_ptr + is_long * HALF + cols, mask=cols < HALF, other=0.0)  # [HALF_PAD]
    angle = pos.to(tl.float32)[:, None] * inv_freq[None, :]  # [BLOCK, HALF_PAD]
    return tl.cos(angle) * attention, tl.sin(angle) * attention


@triton.jit
def _sequence_table(is_long_ptr, seq, attention_short, attention_long):
    """(is_long, attention factor) of one sequence: 1 and the long factor iff its flag is set."""
    is_long = tl.load(is_long_ptr + seq)
    return is_long, tl.where(is_long != 0, attention_long, attention_short)


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
def _rotate(x1, x2, cos, sin):
    """RoPE on the pairs (x1, x2): (x1 cos - x2 sin, x2 cos + x1 sin)."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rotate_transposed(g1, g2, cos, sin):
    """The transpose of :func:`_rotate` (gradients w.r.t. the pre-RoPE input): rotation by -angle."""
    return g1 * cos + g2 * sin, g2 * cos - g1 * sin


@triton.jit
def _load_split(
    ptr,
    rows,
    row_stride,
    row_mask,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PASS: tl.constexpr,
    PASS_PAD: tl.constexpr,
):
    """Load ``[BLOCK, D]`` rows as fp32 tiles (x1, x2, xp); xp is a dummy zero tile when PASS == 0."""
    half_cols = tl.arange(0, HALF_PAD)
    base = ptr + rows.to(tl.int64)[:, None] * row_stride
    half_mask = row_mask[:, None] & (half_cols < HALF)[None, :]
    x1 = tl.load(base + half_cols[None, :], mask=half_mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + half_cols[None, :], mask=half_mask, other=0.0).to(tl.float32)
    pass_cols = tl.arange(0, PASS_PAD)
    pass_mask = row_mask[:, None] & (pass_cols < PASS)[None, :]
    xp = tl.load(base + 2 * HALF + pass_cols[None, :], mask=pass_mask, other=0.0).to(tl.float32)
    return x1, x2, xp


@triton.jit
def _store_split(
    ptr,
    rows,
    row_stride,
    row_mask,
    x1,
    x2,
    xp,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PASS: tl.constexpr,
    PASS_PAD: tl.constexpr,
):
    half_cols = tl.arange(0, HALF_PAD)
    base = ptr + rows.to(tl.int64)[:, None] * row_stride
    half_mask = row_mask[:, None] & (half_cols < HALF)[None, :]
    out_ty = ptr.dtype.element_ty
    tl.store(base + half_cols[None, :], x1.to(out_ty), mask=half_mask)
    tl.store(base + HALF + half_cols[None, :], x2.to(out_ty), mask=half_mask)
    if PASS > 0:
        pass_cols = tl.arange(0, PASS_PAD)
        pass_mask = row_mask[:, None] & (pass_cols < PASS)[None, :]
        tl.store(base + 2 * HALF + pass_cols[None, :], xp.to(out_ty), mask=pass_mask)


def split_sizes(head_dim: int, rotary_dim: int) -> dict[str, int]:
    """Constexpr sizes of the split layout for a head (PASS_PAD >= 16 keeps tl.dot legal when PASS is 0)."""
    half = rotary_dim // 2
    passthrough = head_dim - rotary_dim
    return {
        "HALF": half,
        "HALF_PAD": max(16, triton.next_power_of_2(half)),
        "PASS": passthrough,
        "PASS_PAD": max(16, triton.next_power_of_2(max(passthrough, 1))),
    }
