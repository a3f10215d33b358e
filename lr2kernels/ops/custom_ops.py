"""The fused kernels as ``torch.library`` custom ops: ``torch.ops.lr2kernels.*``.

Registered once for every kernel backend (triton now, cuda next): each op takes only tensors and primitives, plus
the backend's name, and runs that backend's launcher (:class:`Launchers`). Fake implementations give
``torch.compile`` / FSDP the output shapes without running a kernel, and autograd is registered on the ops
themselves, so no Python object rides on an autograd context and CUDA graphs can capture a call.

Table arguments, prepared by :mod:`lr2kernels.ops.fused`: ``inv_freq`` ``[2, rotary_dim // 2]`` fp32 (row 0 short,
row 1 long), ``is_long`` ``[num_seqs]`` int32 flags, ``attention_short`` / ``attention_long`` the two attention
factors; ``position_ids`` integer or None, ``cu_seqlens`` int32/int64 or None (dense), ``max_seqlen`` the dense
length or the longest varlen sequence.
"""

# No `from __future__ import annotations`: torch.library reads the annotations to infer each op's schema.
import functools
import inspect
from typing import Protocol

import torch

from lr2kernels.ops import dispatch

Tensor = torch.Tensor


class Launchers(Protocol):
    """A kernel backend's launchers: tensors and primitives in, new tensors out; no host reads of device data."""

    def rope_attention_fwd(self, q, k, v, inv_freq, is_long, position_ids, cu_seqlens, max_seqlen, causal,
                           softmax_scale, attention_short, attention_long) -> tuple[Tensor, Tensor]: ...  # fmt: skip

    def rope_attention_bwd(self, grad_out, q, k, v, out, lse, inv_freq, is_long, position_ids, cu_seqlens,
                           max_seqlen, causal, softmax_scale, attention_short, attention_long
                           ) -> tuple[Tensor, Tensor, Tensor]: ...  # fmt: skip

    def apply_rope(self, q, k, inv_freq, is_long, position_ids, cu_seqlens, max_seqlen, attention_short,
                   attention_long, transposed) -> tuple[Tensor, Tensor]: ...  # fmt: skip

    def rerotate(self, k, inv_freq, position_ids, from_long, to_long, scale, transposed) -> Tensor: ...

    # block_table: paged caches [num_blocks, block_size, Hk, D] read through block_table [B, max_blocks]; passed
    # (by keyword) only for a paged call, and only to a launcher that has the parameter (fused.py checks), so a
    # launcher without paging keeps working for dense calls.
    def rope_decode(self, q, k_cache, v_cache, cache_seqlens, inv_freq, original_max_position, attention_short,
                    attention_long, softmax_scale, *, block_table=None) -> Tensor: ...  # fmt: skip


def _launchers(backend: str) -> Launchers:
    return dispatch.get_backend(backend).launchers()


@functools.cache
def _takes_block_table(launcher) -> bool:
    """Whether a backend's ``rope_decode`` launcher reads paged caches (has a ``block_table`` parameter)."""
    return "block_table" in inspect.signature(launcher).parameters


def _lse_shape(q: Tensor, varlen: bool) -> tuple[int, ...]:
    # dense q [B, H, L, D] -> [B, H, L]; varlen q [T, H, D] -> [H, T]
    return (q.shape[1], q.shape[0]) if varlen else tuple(q.shape[:3])


# ----------------------------------------------------------------------------------------------- rope_attention
@torch.library.custom_op("lr2kernels::rope_attention_fwd", mutates_args=())
def rope_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, inv_freq: Tensor, is_long: Tensor, position_ids: Tensor | None,
    cu_seqlens: Tensor | None, max_seqlen: int, causal: bool, softmax_scale: float, attention_short: float,
    attention_long: float, backend: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(out like q, lse fp32 ``[B, Hq, L]`` or ``[Hq, T]``)."""
    return _launchers(backend).rope_attention_fwd(
        q, k, v, inv_freq, is_long, position_ids, cu_seqlens, max_seqlen, causal, softmax_scale, attention_short,
        attention_long,
    )  # fmt: skip


@rope_attention_fwd.register_fake
def _(q, k, v, inv_freq, is_long, position_ids, cu_seqlens, max_seqlen, causal, softmax_scale, attention_short,
      attention_long, backend):  # fmt: skip
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens is not None), dtype=torch.float32)


@torch.library.custom_op("lr2kernels::rope_attention_bwd", mutates_args=())
def rope_attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, inv_freq: Tensor, is_long: Tensor,
    position_ids: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int, causal: bool,
    softmax_scale: float, attention_short: float, attention_long: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients w.r.t. the PRE-RoPE q, k and v."""
    return _launchers(backend).rope_attention_bwd(
        grad_out, q, k, v, out, lse, inv_freq, is_long, position_ids, cu_seqlens, max_seqlen, causal, softmax_scale,
        attention_short, attention_long,
    )  # fmt: skip


@rope_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, inv_freq, is_long, position_ids, cu_seqlens, max_seqlen, causal, softmax_scale,
      attention_short, attention_long, backend):  # fmt: skip
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, inv_freq, is_long, position_ids, cu_seqlens, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, inv_freq, is_long, position_ids, cu_seqlens)
    ctx.options = tuple(options)  # max_seqlen, causal, softmax_scale, attention_short, attention_long, backend
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, inv_freq, is_long, position_ids, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = torch.ops.lr2kernels.rope_attention_bwd(
        grad_out, q, k, v, out, lse, inv_freq, is_long, position_ids, cu_seqlens, *ctx.options
    )
    return (dq, dk, dv) + (None,) * 10


rope_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


# ----------------------------------------------------------------------------------------------- apply_rope
@torch.library.custom_op("lr2kernels::apply_rope", mutates_args=())
def apply_rope(
    q: Tensor, k: Tensor, inv_freq: Tensor, is_long: Tensor, position_ids: Tensor | None,
    cu_seqlens: Tensor | None, max_seqlen: int, attention_short: float, attention_long: float, transposed: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(q, k) rotated; ``transposed`` applies the transposed rotation (the gradient w.r.t. the pre-RoPE input)."""
    return _launchers(backend).apply_rope(
        q, k, inv_freq, is_long, position_ids, cu_seqlens, max_seqlen, attention_short, attention_long, transposed
    )


@apply_rope.register_fake
def _(q, k, inv_freq, is_long, position_ids, cu_seqlens, max_seqlen, attention_short, attention_long, transposed,
      backend):  # fmt: skip
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup_context(ctx, inputs, output):
    _, _, inv_freq, is_long, position_ids, cu_seqlens, *options = inputs
    ctx.save_for_backward(inv_freq, is_long, position_ids, cu_seqlens)
    ctx.options = tuple(options)  # max_seqlen, attention_short, attention_long, transposed, backend
    ctx.input_specs = tuple((x.shape, x.dtype, x.device) for x in inputs[:2])  # zero grads of an unused output


def _rope_backward(ctx, grad_q, grad_k):
    # d(pre-RoPE x) = R^T d(rotated x): the transposed rotation of the incoming gradient, same angles and scale.
    inv_freq, is_long, position_ids, cu_seqlens = ctx.saved_tensors
    max_seqlen, attention_short, attention_long, transposed, backend = ctx.options
    (q_shape, q_dtype, device), (k_shape, k_dtype, _) = ctx.input_specs
    grad_q = torch.zeros(q_shape, dtype=q_dtype, device=device) if grad_q is None else grad_q
    grad_k = torch.zeros(k_shape, dtype=k_dtype, device=device) if grad_k is None else grad_k
    dq, dk = torch.ops.lr2kernels.apply_rope(
        grad_q, grad_k, inv_freq, is_long, position_ids, cu_seqlens, max_seqlen, attention_short, attention_long,
        not transposed, backend,
    )  # fmt: skip
    return (dq, dk) + (None,) * 9


apply_rope.register_autograd(_rope_backward, setup_context=_rope_setup_context)


# ----------------------------------------------------------------------------------------------- rerotate
@torch.library.custom_op("lr2kernels::rerotate", mutates_args=())
def rerotate(
    k: Tensor, inv_freq: Tensor, position_ids: Tensor, from_long: bool, to_long: bool, scale: float,
    transposed: bool, backend: str,
) -> Tensor:  # fmt: skip
    """POST-RoPE keys moved from one table to the other (a rotation by the angle difference, scaled)."""
    return _launchers(backend).rerotate(k, inv_freq, position_ids, from_long, to_long, scale, transposed)


@rerotate.register_fake
def _(k, inv_freq, position_ids, from_long, to_long, scale, transposed, backend):
    return k.new_empty(k.shape)


def _rerotate_setup_context(ctx, inputs, output):
    _, inv_freq, position_ids, *options = inputs
    ctx.save_for_backward(inv_freq, position_ids)
    ctx.options = tuple(options)  # from_long, to_long, scale, transposed, backend


def _rerotate_backward(ctx, grad):
    inv_freq, position_ids = ctx.saved_tensors
    from_long, to_long, scale, transposed, backend = ctx.options
    # Linear in k: its gradient is the transposed rotation, same angles and scale.
    dk = torch.ops.lr2kernels.rerotate(grad, inv_freq, position_ids, from_long, to_long, scale, not transposed, backend)
    return (dk,) + (None,) * 7


rerotate.register_autograd(_rerotate_backward, setup_context=_rerotate_setup_context)


# ----------------------------------------------------------------------------------------------- rope_decode
@torch.library.custom_op("lr2kernels::rope_decode", mutates_args=())
def rope_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, inv_freq: Tensor, original_max_position: int,
    attention_short: float, attention_long: float, softmax_scale: float, backend: str,
    block_table: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Decode attention on a PRE-RoPE cache (inference only: no autograd); dense caches ``[B, Hk, max_len, D]``, or
    paged ``[num_blocks, block_size, Hk, D]`` read through ``block_table [B, max_blocks]``."""
    launcher = _launchers(backend).rope_decode
    paged = {}
    if block_table is not None:
        # Never run a paged call as a dense one: a launcher without paging would read the blocks as sequences.
        # (Checked here, when the op runs, not while torch.compile traces the backend.)
        if not _takes_block_table(launcher):
            raise NotImplementedError(
                f"rope_decode: the {backend} backend has no paged decode kernel yet (block_table given); use "
                f"backend='triton' or backend='torch' for paged caches"
            )
        paged["block_table"] = block_table
    return launcher(
        q, k_cache, v_cache, cache_seqlens, inv_freq, original_max_position, attention_short, attention_long,
        softmax_scale, **paged,
    )  # fmt: skip


@rope_decode.register_fake
def _(q, k_cache, v_cache, cache_seqlens, inv_freq, original_max_position, attention_short, attention_long,
      softmax_scale, backend, block_table=None):  # fmt: skip
    return q.new_empty(q.shape)
