"""RoPE on its own (rotate q and k with the rescaled table) and the re-rotation of post-RoPE keys between tables.

``apply_rope`` rotates q and k in ONE launch: grid axis 0 is blocks of tokens, axis 1 is sequences x chunks of the
``Hq + Hk`` heads (q heads first, then k heads). A program computes the cos/sin of its tokens once, with its
sequence's table (short or long, from :func:`lr2kernels.ops.triton.sequence_is_long`), and rotates every head of its
chunk with them; chunks are as large as the grid allows, so sin/cos are not recomputed per head where that can be
avoided. The backward is the same kernel with TRANSPOSED: the gradient w.r.t. the pre-RoPE input is the transposed
rotation of the incoming gradient (rotation by -angle, same attention factor); pass-through channels copy through.

``rerotate`` moves POST-RoPE keys from one table to the other in one pass: a rotation by ``theta_to - theta_from``
scaled by ``a_to / a_from``, from both tables' fp32 sin/cos computed in the kernel (as the torch backend's formula).
It is linear in k, so it is differentiable too (its transpose is the same kernel with TRANSPOSED).

Layouts: dense ``[B, H, L, D]`` (any strides, last dim contiguous) or varlen ``[T, H, D]`` with ``cu_seqlens``;
``rerotate`` takes ``[T, H, D]`` as one sequence of T tokens. Math in fp32 (fp64 inputs too), output in the input
dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from lr2kernels.ops.triton import sequence_is_long
from lr2kernels.ops.triton._rope import (
    _angles,
    _load_split,
    _rotate,
    _rotate_transposed,
    _sequence_table,
    _store_split,
    split_sizes,
)
from lr2kernels.ops.triton.attention import _positions, _seq_bounds, inv_freq_pair, triton_interpreting

__all__ = ["apply_rope", "rerotate"]


@triton.jit
def _rotate_heads(
    X, Y, x_base, y_base, stride_xh, stride_xt, stride_yh, stride_yt,
    head_lo, head_hi, rows, row_mask, cos, sin,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
    TRANSPOSED: tl.constexpr,
):  # fmt: skip
    """Rotate rows ``[BLOCK]`` of heads ``head_lo .. head_hi - 1`` of X into Y, all with the same cos/sin."""
    for head in range(head_lo, head_hi):
        x_ptr = X + x_base + tl.cast(head, tl.int64) * stride_xh
        x1, x2, xp = _load_split(x_ptr, rows, stride_xt, row_mask, HALF, HALF_PAD, PASS, PASS_PAD)  # [BLOCK, *]
        if TRANSPOSED:
            y1, y2 = _rotate_transposed(x1, x2, cos, sin)
        else:
            y1, y2 = _rotate(x1, x2, cos, sin)
        y_ptr = Y + y_base + tl.cast(head, tl.int64) * stride_yh
        _store_split(y_ptr, rows, stride_yt, row_mask, y1, y2, xp, HALF, HALF_PAD, PASS, PASS_PAD)


@triton.jit
def _rope_kernel(
    Q, K, Q_OUT, K_OUT, INV_FREQ, CU_SEQLENS, POS, IS_LONG,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_qob, stride_qoh, stride_qot,
    stride_kob, stride_koh, stride_kot,
    stride_pos_b, seq_len_dense, num_q_heads, num_k_heads, heads_per_program, num_chunks,
    attention_short, attention_long,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
    BLOCK: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_POS: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_sc = tl.program_id(1)
    seq = pid_sc // num_chunks
    chunk = pid_sc % num_chunks
    start, seq_len = _seq_bounds(CU_SEQLENS, seq, seq_len_dense, IS_VARLEN)
    if pid_t * BLOCK >= seq_len:
        return
    is_long, attention = _sequence_table(IS_LONG, seq, attention_short, attention_long)

    rows = pid_t * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] token index within the sequence
    row_mask = rows < seq_len
    pos = _positions(POS, seq, stride_pos_b, start, rows, row_mask, HAS_POS)
    cos, sin = _angles(pos, INV_FREQ, is_long, attention, HALF, HALF_PAD)  # [BLOCK, HALF_PAD]

    # This chunk's heads in the concatenated list [q heads, k heads].
    head_lo = chunk * heads_per_program
    head_hi = tl.minimum(head_lo + heads_per_program, num_q_heads + num_k_heads)
    seq64, start64 = seq.to(tl.int64), start.to(tl.int64)
    _rotate_heads(
        Q, Q_OUT, seq64 * stride_qb + start64 * stride_qt, seq64 * stride_qob + start64 * stride_qot,
        stride_qh, stride_qt, stride_qoh, stride_qot,
        head_lo, tl.minimum(head_hi, num_q_heads), rows, row_mask, cos, sin,
        HALF, HALF_PAD, PASS, PASS_PAD, TRANSPOSED,
    )  # fmt: skip
    _rotate_heads(
        K, K_OUT, seq64 * stride_kb + start64 * stride_kt, seq64 * stride_kob + start64 * stride_kot,
        stride_kh, stride_kt, stride_koh, stride_kot,
        tl.maximum(head_lo, num_q_heads) - num_q_heads, head_hi - num_q_heads, rows, row_mask, cos, sin,
        HALF, HALF_PAD, PASS, PASS_PAD, TRANSPOSED,
    )  # fmt: skip


@triton.jit
def _rerotate_kernel(
    K, K_OUT, INV_FREQ, POS,
    stride_kb, stride_kh, stride_kt,
    stride_ob, stride_oh, stride_ot,
    stride_pos_b, seq_len, num_heads, heads_per_program, num_chunks, from_long, to_long, scale,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
    BLOCK: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_sc = tl.program_id(1)
    seq = pid_sc // num_chunks
    chunk = pid_sc % num_chunks
    if pid_t * BLOCK >= seq_len:
        return
    rows = pid_t * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    row_mask = rows < seq_len
    pos = tl.load(POS + seq.to(tl.int64) * stride_pos_b + rows, mask=row_mask, other=0)
    # Keys carry a_f R(theta_f); a_t R(theta_t) = (a_t / a_f) R(theta_t - theta_f) a_f R(theta_f), and
    # cos(t - f) = cos t cos f + sin t sin f, sin(t - f) = sin t cos f - cos t sin f.
    cos_f, sin_f = _angles(pos, INV_FREQ, from_long, 1.0, HALF, HALF_PAD)  # [BLOCK, HALF_PAD]
    cos_t, sin_t = _angles(pos, INV_FREQ, to_long, scale, HALF, HALF_PAD)  # scale = a_t / a_f
    cos = cos_t * cos_f + sin_t * sin_f
    sin = sin_t * cos_f - cos_t * sin_f

    head_lo = chunk * heads_per_program
    head_hi = tl.minimum(head_lo + heads_per_program, num_heads)
    seq64 = seq.to(tl.int64)
    _rotate_heads(
        K, K_OUT, seq64 * stride_kb, seq64 * stride_ob, stride_kh, stride_kt, stride_oh, stride_ot,
        head_lo, head_hi, rows, row_mask, cos, sin, HALF, HALF_PAD, PASS, PASS_PAD, TRANSPOSED,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ host side
def _block_size(head_dim: int) -> int:
    if triton_interpreting():
        return 16  # the interpreter runs every lane in numpy: small tiles
    return max(16, 4096 // triton.next_power_of_2(head_dim))  # ~4K elements per head tile


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _heads_per_program(total_heads: int, token_programs: int, device: torch.device) -> int:
    """As many heads per program as keep the grid >= ~4 programs per SM (sin/cos are computed once per program)."""
    if total_heads == 0:
        return 1
    if triton_interpreting():
        # Interpreter: two chunks, so that one chunk holds both q and k heads when Hq + Hk is not split evenly.
        return max(1, triton.cdiv(total_heads, 2))
    index = device.index if device.index is not None else torch.cuda.current_device()
    chunks = min(total_heads, max(1, triton.cdiv(4 * _sm_count(index), max(token_programs, 1))))
    return triton.cdiv(total_heads, chunks)


def _contiguous_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _RopeLaunch:
    """Everything of one apply_rope call the forward and the backward launch share."""

    def __init__(self, q, table, position_ids, long, cu_seqlens):
        self.varlen = cu_seqlens is not None
        if self.varlen:
            self.cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
            self.batch = self.cu_seqlens.numel() - 1
            lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
            self.seq_len = int(lengths.max()) if self.batch > 0 else 0  # grid size: one host sync
        else:
            self.batch, self.seq_len = q.shape[0], q.shape[2]
        self.head_dim = q.shape[-1]
        self.sizes = split_sizes(self.head_dim, table.rotary_dim)
        self.block = _block_size(self.head_dim)
        self.attention = (table.attention_factor_for(False), table.attention_factor_for(True))
        self.inv_freq = inv_freq_pair(table, q.device)
        if position_ids is not None:
            position_ids = position_ids.to(torch.int32).contiguous()
        self.position_ids = position_ids
        self.is_long = sequence_is_long(
            table, self.batch, self.seq_len, position_ids, cu_seqlens, long, q.device
        ).contiguous()
        if not self.varlen:
            self.cu_seqlens = self.is_long  # any valid pointer when unused
        dense_batched = position_ids is not None and position_ids.dim() == 2 and position_ids.shape[0] > 1
        self.stride_pos_b = position_ids.stride(0) if dense_batched and not self.varlen else 0

    def strides(self, x: torch.Tensor) -> tuple[int, int, int]:
        """(batch, head, token) strides; varlen tensors have no batch stride (sequences are row ranges)."""
        if self.varlen:
            return 0, x.stride(1), x.stride(0)
        return x.stride(0), x.stride(1), x.stride(2)

    def run(self, q, k, transposed: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Rotate q and k (either may be None: nothing to do for it) in one launch; returns new tensors."""
        q = _contiguous_last(q) if q is not None else None
        k = _contiguous_last(k) if k is not None else None
        q_out = torch.empty_like(q) if q is not None else None
        k_out = torch.empty_like(k) if k is not None else None
        present = [x for x in (q, k) if x is not None]
        if not present or present[0].numel() == 0:
            return q_out, k_out
        # A missing tensor gets 0 heads; the other one's pointers stand in for it.
        q_in, q_dst = (q, q_out) if q is not None else (k, k_out)
        k_in, k_dst = (k, k_out) if k is not None else (q, q_out)
        num_q_heads = q.shape[1] if q is not None else 0
        num_k_heads = k.shape[1] if k is not None else 0
        token_blocks = triton.cdiv(self.seq_len, self.block)
        total_heads = num_q_heads + num_k_heads
        per_program = _heads_per_program(total_heads, token_blocks * self.batch, q_in.device)
        num_chunks = triton.cdiv(total_heads, per_program)
        pos = self.position_ids if self.position_ids is not None else self.is_long
        grid = (token_blocks, self.batch * num_chunks)
        _rope_kernel[grid](
            q_in, k_in, q_dst, k_dst, self.inv_freq, self.cu_seqlens, pos, self.is_long,
            *self.strides(q_in), *self.strides(k_in), *self.strides(q_dst), *self.strides(k_dst),
            self.stride_pos_b, self.seq_len, num_q_heads, num_k_heads, per_program, num_chunks, *self.attention,
            BLOCK=self.block, IS_VARLEN=self.varlen, HAS_POS=self.position_ids is not None, TRANSPOSED=transposed,
            **self.sizes,
        )  # fmt: skip
        return q_out, k_out


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, launch: _RopeLaunch):
        ctx.launch = launch
        ctx.set_materialize_grads(False)
        return launch.run(q, k, transposed=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q, grad_k):
        # d(pre-RoPE x) = R^T d(rotated x): the transposed rotation of the incoming gradient, same angles and scale.
        grad_q = grad_q if ctx.needs_input_grad[0] else None
        grad_k = grad_k if ctx.needs_input_grad[1] else None
        dq, dk = ctx.launch.run(grad_q, grad_k, transposed=True)
        return dq, dk, None


def apply_rope(q, k, table, position_ids, long, cu_seqlens):
    """Rotated ``(q, k)`` (differentiable), in q's and k's dtypes.

    Args:
        q: ``[B, Hq, L, D]``, or ``[T, Hq, D]`` with ``cu_seqlens``; any strides, last dim contiguous is fastest.
        k: ``[B, Hk, L, D]``, or ``[T, Hk, D]``.
        table: the RoPE table.
        position_ids: ``[B, L]`` / ``[1, L]`` / ``[L]`` (dense) or ``[T]`` (varlen); None: 0..len-1 per sequence.
        long: force a table; None: HF's batch rule (dense) or each sequence by its own positions (varlen).
        cu_seqlens: ``[num_seqs + 1]`` offsets for the varlen layout.
    """
    launch = _RopeLaunch(q, table, position_ids, long, cu_seqlens)
    return RopeFunction.apply(q, k, launch)


class _RerotateLaunch:
    def __init__(self, k, table, position_ids, from_long: bool, to_long: bool):
        if k.dim() == 4:  # [B, H, L, D], positions [B, L] / [1, L] / [L]
            self.batch, self.num_heads, self.seq_len = k.shape[0], k.shape[1], k.shape[2]
        else:  # [T, H, D], positions [T]: one sequence of T tokens
            self.batch, self.num_heads, self.seq_len = 1, k.shape[1], k.shape[0]
        self.sizes = split_sizes(k.shape[-1], table.rotary_dim)
        self.block = _block_size(k.shape[-1])
        self.inv_freq = inv_freq_pair(table, k.device)
        self.position_ids = position_ids.to(torch.int32).contiguous()
        batched = self.position_ids.dim() == 2 and self.position_ids.shape[0] > 1
        self.stride_pos_b = self.position_ids.stride(0) if batched else 0
        self.flags = (int(from_long), int(to_long))
        self.scale = table.attention_factor_for(to_long) / table.attention_factor_for(from_long)

    @staticmethod
    def strides(x: torch.Tensor) -> tuple[int, int, int]:
        if x.dim() == 4:
            return x.stride(0), x.stride(1), x.stride(2)
        return 0, x.stride(1), x.stride(0)

    def run(self, k: torch.Tensor, transposed: bool) -> torch.Tensor:
        k = _contiguous_last(k)
        out = torch.empty_like(k)
        if k.numel() == 0:
            return out
        token_blocks = triton.cdiv(self.seq_len, self.block)
        per_program = _heads_per_program(self.num_heads, token_blocks * self.batch, k.device)
        num_chunks = triton.cdiv(self.num_heads, per_program)
        grid = (token_blocks, self.batch * num_chunks)
        _rerotate_kernel[grid](
            k, out, self.inv_freq, self.position_ids, *self.strides(k), *self.strides(out),
            self.stride_pos_b, self.seq_len, self.num_heads, per_program, num_chunks, *self.flags, self.scale,
            BLOCK=self.block, TRANSPOSED=transposed, **self.sizes,
        )  # fmt: skip
        return out


class RerotateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, launch: _RerotateLaunch):
        ctx.launch = launch
        return launch.run(k, transposed=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return ctx.launch.run(grad, transposed=True), None


def rerotate(k, table, position_ids, from_long: bool, to_long: bool):
    """POST-RoPE keys moved from the ``from_long`` table to the ``to_long`` one in one pass (differentiable).

    Args:
        k: ``[B, H, L, D]`` with position_ids ``[B, L]`` / ``[1, L]`` / ``[L]``; or ``[T, H, D]`` with ``[T]``.
        table: the table the keys were rotated with.
        position_ids: the keys' positions.
        from_long, to_long: the table the keys carry now, and the one they should carry.
    """
    if from_long == to_long:
        return k.clone()  # same table: nothing to move
    return RerotateFunction.apply(k, _RerotateLaunch(k, table, position_ids, from_long, to_long))
