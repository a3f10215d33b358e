"""RoPE on its own (rotate q and k with the rescaled table) and the re-rotation of post-RoPE keys between tables.

``apply_rope`` rotates q and k in ONE launch: grid axis 0 is blocks of tokens, axis 1 is sequences x chunks of the
``Hq + Hk`` heads (q heads first, then k heads). A program computes the cos/sin of its tokens once, with its
sequence's table (short or long, from the caller's per-sequence ``is_long`` flags), and rotates every head of its
chunk with them; chunks are as large as the grid allows, so sin/cos are not recomputed per head where that can be
avoided. The backward is the same kernel with TRANSPOSED: the gradient w.r.t. the pre-RoPE input is the transposed
rotation of the incoming gradient (rotation by -angle, same attention factor); pass-through channels copy through.

``rerotate`` moves POST-RoPE keys from one table to the other in one pass: a rotation by ``theta_to - theta_from``
scaled by ``a_to / a_from``, from both tables' fp32 sin/cos computed in the kernel (as the torch backend's formula).
It is linear in k; its transpose (the backward) is the same kernel with TRANSPOSED.

Layouts: dense ``[B, H, L, D]`` (any strides, last dim contiguous) or varlen ``[T, H, D]`` with ``cu_seqlens``;
``rerotate`` takes ``[T, H, D]`` as one sequence of T tokens. Math in fp32 (fp64 inputs too), output in the input
dtype, contiguous. The launchers take prepared tensors and Python scalars only (see ``attention.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lr2kernels.ops.triton._host import (
    bht_strides,
    contiguous_last,
    int32,
    new_like,
    position_batch_stride,
    rotary_dim_of,
    sequence_args,
    sequence_grid,
    sequences,
    sm_count,
    split_sizes,
    triton_interpreting,
)
from lr2kernels.ops.triton._jit import (
    _angles,
    _head_offset,
    _load_split,
    _positions,
    _rotate_cast,
    _rotate_transposed,
    _sequence_program,
    _store_split,
)

__all__ = ["apply_rope", "rerotate"]


@triton.jit
def _rotate_heads(
    x_ptr, y_ptr, stride_xh, stride_xt, stride_yh, stride_yt,
    head_lo, head_hi, rows, row_mask, cos, sin, SPLIT: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    """Rotate rows ``[BLOCK]`` of heads ``head_lo .. head_hi - 1`` of x into y, all with the same cos/sin."""
    for head in range(head_lo, head_hi):
        x_head = x_ptr + tl.cast(head, tl.int64) * stride_xh
        x1, x2, xp = _load_split(x_head, rows, stride_xt, row_mask, SPLIT)  # [BLOCK, *] fp32
        y1, y2, yp = _rotate_cast(x1, x2, xp, cos, sin, y_ptr.dtype.element_ty, TRANSPOSED)
        y_head = y_ptr + tl.cast(head, tl.int64) * stride_yh
        _store_split(y_head, rows, stride_yt, row_mask, y1, y2, yp, SPLIT)


@triton.jit
def _apply_rope_kernel(
    Q, K, Q_OUT, K_OUT, INV_FREQ, CU_SEQLENS, POS, IS_LONG,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_qob, stride_qoh, stride_qot,
    stride_kob, stride_koh, stride_kot,
    stride_pos_b, seq_len_dense, num_q_heads, num_k_heads, heads_per_program, num_chunks,
    attention_short, attention_long,
    HALF: tl.constexpr, HALF_A: tl.constexpr, HALF_B: tl.constexpr,
    PASS: tl.constexpr, PASS_A: tl.constexpr, PASS_B: tl.constexpr,
    BLOCK: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_POS: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    first, seq, chunk, start, seq_len, is_long, attention, pos_base = _sequence_program(
        num_chunks, CU_SEQLENS, IS_LONG, POS, stride_pos_b, seq_len_dense, attention_short, attention_long,
        BLOCK, IS_VARLEN,
    )  # fmt: skip
    if first >= seq_len:
        return
    SPLIT: tl.constexpr = (HALF, HALF_A, HALF_B, PASS, PASS_A, PASS_B)
    rows = first + tl.arange(0, BLOCK)  # [BLOCK] token index within the sequence
    row_mask = rows < seq_len
    pos = _positions(pos_base, rows, row_mask, HAS_POS)
    cos, sin = _angles(pos, INV_FREQ, is_long, attention, SPLIT)  # [BLOCK, *] tiled like a half

    # This chunk's heads in the concatenated list [q heads, k heads].
    head_lo = chunk * heads_per_program
    head_hi = tl.minimum(head_lo + heads_per_program, num_q_heads + num_k_heads)
    _rotate_heads(
        Q + _head_offset(seq, 0, start, stride_qb, 0, stride_qt),
        Q_OUT + _head_offset(seq, 0, start, stride_qob, 0, stride_qot),
        stride_qh, stride_qt, stride_qoh, stride_qot,
        head_lo, tl.minimum(head_hi, num_q_heads), rows, row_mask, cos, sin,
        SPLIT, TRANSPOSED,
    )  # fmt: skip
    _rotate_heads(
        K + _head_offset(seq, 0, start, stride_kb, 0, stride_kt),
        K_OUT + _head_offset(seq, 0, start, stride_kob, 0, stride_kot),
        stride_kh, stride_kt, stride_koh, stride_kot,
        tl.maximum(head_lo, num_q_heads) - num_q_heads, head_hi - num_q_heads, rows, row_mask, cos, sin,
        SPLIT, TRANSPOSED,
    )  # fmt: skip


@triton.jit
def _rerotate_kernel(
    K, K_OUT, INV_FREQ, POS,
    stride_kb, stride_kh, stride_kt,
    stride_ob, stride_oh, stride_ot,
    stride_pos_b, seq_len, num_heads, heads_per_program, num_chunks, from_long, to_long, scale,
    HALF: tl.constexpr, HALF_A: tl.constexpr, HALF_B: tl.constexpr,
    PASS: tl.constexpr, PASS_A: tl.constexpr, PASS_B: tl.constexpr,
    BLOCK: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    seq = tl.program_id(2)  # the grid of sequence_grid: (token blocks, chunks, sequences)
    chunk = tl.program_id(1)
    if pid_t * BLOCK >= seq_len:
        return
    rows = pid_t * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    row_mask = rows < seq_len
    pos = _positions(POS + tl.cast(seq, tl.int64) * stride_pos_b, rows, row_mask, True)
    # Keys carry a_f R(theta_f); a_t R(theta_t) = (a_t / a_f) R(theta_t - theta_f) a_f R(theta_f), and
    # cos(t - f) = cos t cos f + sin t sin f, sin(t - f) = sin t cos f - cos t sin f.
    SPLIT: tl.constexpr = (HALF, HALF_A, HALF_B, PASS, PASS_A, PASS_B)
    cos_f, sin_f = _angles(pos, INV_FREQ, from_long, 1.0, SPLIT)  # [BLOCK, *] tiled like a half
    cos_t, sin_t = _angles(pos, INV_FREQ, to_long, scale, SPLIT)  # scale = a_t / a_f
    cos, sin = _rotate_transposed(cos_t, sin_t, cos_f, sin_f)  # the identities above, tile by tile

    head_lo = chunk * heads_per_program
    head_hi = tl.minimum(head_lo + heads_per_program, num_heads)
    _rotate_heads(
        K + tl.cast(seq, tl.int64) * stride_kb, K_OUT + tl.cast(seq, tl.int64) * stride_ob,
        stride_kh, stride_kt, stride_oh, stride_ot,
        head_lo, head_hi, rows, row_mask, cos, sin, SPLIT, TRANSPOSED,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ host side
# Launch options of the rotation kernels. Compiled as launched (to_long == 1 specialised to a constant), ptxas capped
# itself below what they need and spilled: rerotate 4-16 B at heads 64-128 (Triton 3.6), apply_rope 4 B at 256 (3.9,
# sm_90) and 8 B at 96 (3.6, sm_80). Allowing it every register (255) removes every spill; 8 warps instead made the
# cap lower still (64-80 registers, 4-16 B spilled).
ROPE_WARPS = 4
ROPE_MAX_REGISTERS = 255
def _grid(
    seq_len: int, batch: int, total_heads: int, head_dim: int, device: torch.device, small_block: bool = False
) -> tuple[int, int, int]:
    """(BLOCK, heads per program, chunks of heads per sequence) of a rotation launch.

    As many heads per program as keep the grid >= ~4 programs per SM (sin/cos are computed once per program).
    ``small_block``: 8-token blocks (apply_rope at 256 channels or with partial rotary spills registers on sm_80
    with larger ones; benchmarks/results/triton_compile.md).
    """
    if triton_interpreting():
        # The interpreter runs every lane in numpy: small tiles; two chunks, so that one chunk holds both q and k
        # heads when Hq + Hk is not split evenly.
        block = 16
        per_program = max(1, triton.cdiv(total_heads, 2))
    else:
        block = 8 if small_block else max(16, 4096 // triton.next_power_of_2(head_dim))  # ~4K elements per head tile
        token_programs = max(triton.cdiv(seq_len, block) * batch, 1)
        chunks = min(total_heads, max(1, triton.cdiv(4 * sm_count(device), token_programs)))
        per_program = triton.cdiv(total_heads, chunks)
    return block, per_program, triton.cdiv(total_heads, per_program)


def apply_rope(
    q: Tensor | None, k: Tensor | None,
    inv_freq: Tensor, is_long: Tensor, position_ids: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int,
    attention_short: float, attention_long: float, transposed: bool,
) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """Rotated ``(q, k)`` in one launch, new contiguous tensors in q's and k's dtypes (None stays None).

    Args:
        q: ``[B, Hq, L, D]``, or ``[T, Hq, D]`` with ``cu_seqlens``; k: ``[B, Hk, L, D]`` / ``[T, Hk, D]``.
        inv_freq, is_long, position_ids, cu_seqlens, max_seqlen, attention_short, attention_long: as
            :func:`lr2kernels.ops.triton.attention.rope_attention_fwd`'s.
        transposed: apply the transposed rotation (the backward: gradients w.r.t. the pre-RoPE inputs).
    """
    q = contiguous_last(q) if q is not None else None
    k = contiguous_last(k) if k is not None else None
    q_out = new_like(q) if q is not None else None
    k_out = new_like(k) if k is not None else None
    present = [x for x in (q, k) if x is not None]
    if not present:
        return q_out, k_out
    batch, seq_len = sequences(present[0], cu_seqlens, max_seqlen)
    if all(x.numel() == 0 for x in present) or batch == 0 or seq_len == 0:
        return q_out, k_out
    # A missing tensor gets 0 heads; the other one's pointers stand in for it.
    q_in, q_dst = (q, q_out) if q is not None else (k, k_out)
    k_in, k_dst = (k, k_out) if k is not None else (q, q_out)
    num_q_heads = q.shape[1] if q is not None else 0
    num_k_heads = k.shape[1] if k is not None else 0
    head_dim = q_in.shape[-1]
    small_block = head_dim > 128 or rotary_dim_of(inv_freq) < head_dim
    block, per_program, num_chunks = _grid(
        seq_len, batch, num_q_heads + num_k_heads, head_dim, q_in.device, small_block
    )
    varlen = cu_seqlens is not None
    is_long, cu_ptr, pos_ptr, stride_pos_b = sequence_args(is_long, position_ids, cu_seqlens)
    _apply_rope_kernel[sequence_grid(triton.cdiv(seq_len, block), num_chunks, batch)](
        q_in, k_in, q_dst, k_dst, inv_freq, cu_ptr, pos_ptr, is_long,
        *bht_strides(q_in, varlen), *bht_strides(k_in, varlen), *bht_strides(q_dst, varlen),
        *bht_strides(k_dst, varlen),
        stride_pos_b, seq_len, num_q_heads, num_k_heads, per_program, num_chunks, attention_short, attention_long,
        BLOCK=block, IS_VARLEN=varlen, HAS_POS=position_ids is not None, TRANSPOSED=transposed,
        **split_sizes(head_dim, rotary_dim_of(inv_freq)), num_warps=ROPE_WARPS, maxnreg=ROPE_MAX_REGISTERS,
    )  # fmt: skip
    return q_out, k_out


def rerotate(
    k: Tensor, inv_freq: Tensor, position_ids: Tensor, from_long: bool, to_long: bool, scale: float, transposed: bool
) -> Tensor:
    """POST-RoPE keys moved from the ``from_long`` table to the ``to_long`` one in one pass (a new contiguous tensor).

    Args:
        k: ``[B, H, L, D]`` with position_ids ``[B, L]`` / ``[1, L]`` / ``[L]``; or ``[T, H, D]`` with ``[T]``.
        inv_freq: ``[2, rotary_dim // 2]`` fp32 (short row, long row) of the table the keys were rotated with.
        position_ids: the keys' positions (any integer dtype; made int32 contiguous).
        from_long, to_long: the table the keys carry now, and the one they should carry.
        scale: ``a_to / a_from``, the ratio of the two tables' attention factors.
        transposed: apply the transposed map (the backward).
    """
    k = contiguous_last(k)
    out = new_like(k)
    if k.numel() == 0:
        return out
    if from_long == to_long and scale == 1.0:
        return out.copy_(k)  # same table: nothing to move
    dense = k.dim() == 4
    batch, num_heads, seq_len = (k.shape[0], k.shape[1], k.shape[2]) if dense else (1, k.shape[1], k.shape[0])
    position_ids = int32(position_ids)
    small_block = rotary_dim_of(inv_freq) < k.shape[-1]  # partial rotary spills on sm_80 otherwise (Triton 3.6)
    block, per_program, num_chunks = _grid(seq_len, batch, num_heads, k.shape[-1], k.device, small_block)
    _rerotate_kernel[sequence_grid(triton.cdiv(seq_len, block), num_chunks, batch)](
        k, out, inv_freq, position_ids, *bht_strides(k, not dense), *bht_strides(out, not dense),
        position_batch_stride(position_ids), seq_len, num_heads, per_program, num_chunks,
        int(from_long), int(to_long), scale,
        BLOCK=block, TRANSPOSED=transposed, **split_sizes(k.shape[-1], rotary_dim_of(inv_freq)),
        num_warps=ROPE_WARPS, maxnreg=ROPE_MAX_REGISTERS,
    )  # fmt: skip
    return out
