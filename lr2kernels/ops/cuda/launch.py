"""Launchers of the CUDA kernels (``lr2kernels._cuda``, built from ``csrc/``): tensors and Python scalars in, new
tensors out, no host reads of device data.

The extension takes raw pointers, sizes, strides and the CUDA stream as integers (no torch C++ ABI), so this module
does the tensor side: the last dim made contiguous, int32 positions/offsets, the output allocated, the stream of the
tensors' device. The extension is imported on the first launch (or availability probe), never at package import.
"""

from __future__ import annotations

import functools
import importlib
import os
import types

import torch
from torch import Tensor

from lr2kernels.ops.kernel_args import bht_strides, contiguous_last, int32, new_like, position_batch_stride, sm_count

__all__ = ["DECODE_HEAD_DIMS", "apply_rope", "device_count", "extension", "load_extension", "rerotate", "rope_decode"]

# Head sizes the rope_decode kernel is instantiated for (csrc/lr2_cuda.h: kDecodeHeadDims; the tests check they agree).
DECODE_HEAD_DIMS = (64, 96, 128, 256)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_LOG2E = 1.4426950408889634
# KV splits (csrc/rope_decode.cuh, csrc/README.md's model): the grid asks for about _BLOCKS_PER_SM resident blocks per
# SM (the decode kernel's registers allow 3 at 4 warps), each split at least _SPLIT_MIN_KEYS keys; each sequence then
# uses min(grid splits, ceil(its length / _SPLIT_MIN_KEYS)) of them on the device.
_BLOCKS_PER_SM = 3
_SPLIT_MIN_KEYS = 256
_MAX_SPLITS = 128
_BUILD_HINT = (
    "set LR2_CUDA_JIT=1 to build it on first use where nvcc is present, or reinstall there with LR2_BUILD_CUDA=1 "
    "(pip install --no-build-isolation -e .)"
)


@functools.cache
def load_extension() -> tuple[types.ModuleType | None, str]:
    """(the extension module, "") or (None, why it cannot be imported). Imported once.

    The installed extension first; else a build on first use from the cache (:mod:`lr2kernels.ops.cuda.jit`),
    compiled now only when ``LR2_CUDA_JIT=1``.
    """
    try:
        return importlib.import_module("lr2kernels._cuda"), ""
    except ImportError as error:
        missing = error
    from lr2kernels.ops.cuda import jit

    try:
        path = jit.cached_build()
        if path is None and os.environ.get("LR2_CUDA_JIT", "0") == "1":
            path = jit.build()
        if path is not None:
            return jit.load_built(path), ""
    except (RuntimeError, ImportError, OSError) as error:
        return None, f"the CUDA extension lr2kernels._cuda is not built ({missing}), and building it failed: {error}"
    return None, f"the CUDA extension lr2kernels._cuda is not built ({missing}); {_BUILD_HINT}"


def extension() -> types.ModuleType:
    """The extension module, or a RuntimeError that says how to build it."""
    module, reason = load_extension()
    if module is None:
        raise RuntimeError(reason)
    return module


@functools.cache
def device_count() -> tuple[int, str]:
    """(CUDA devices the extension's runtime sees, "" or the runtime's reason when it sees none)."""
    return tuple(extension().device_count())


def _dtype_code(x: Tensor) -> int:
    if x.dtype not in _DTYPE_CODES:
        raise ValueError(f"the CUDA kernels take float32, float16 or bfloat16 tensors, got {x.dtype}")
    return _DTYPE_CODES[x.dtype]


def _ptr(x: Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _num_splits(programs: int, capacity: int, device: torch.device) -> int:
    """The grid's KV splits per (sequence, kv head, row block): enough blocks for _BLOCKS_PER_SM per SM, from the
    cache's capacity (no host read of cache_seqlens). The kernel gives each sequence its own number of splits, at most
    this many, from its own length; the blocks beyond it exit at once."""
    target = _BLOCKS_PER_SM * sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(_cdiv(target, programs), _cdiv(capacity, _SPLIT_MIN_KEYS), _MAX_SPLITS))


def _rows_per_block(head_dim: int, rows: int) -> int:
    """Query rows a decode block packs (csrc/rope_decode.cuh: decode_rows_for): rows rounded up to 1, 2, 4 or the
    most the registers allow (8; 4 at head 256)."""
    for size in (1, 2, 4):
        if rows <= size:
            return size
    return 4 if head_dim >= 256 else 8


def _check_aligned_cache(name: str, x: Tensor) -> None:
    """The decode kernel reads k/v rows in 16-byte copies (cp.async): a misaligned cache is rejected, never copied."""
    step = 16 // x.element_size()
    offset = x.data_ptr() % 16
    strides = tuple(x.stride())
    if offset or any(stride % step for stride, size in zip(strides[:3], x.shape[:3]) if size > 1):
        raise ValueError(
            f"{name}: the CUDA rope_decode reads the cache in 16-byte copies, so it must start on a 16-byte boundary "
            f"and its batch, head and token strides must be multiples of {step} elements ({x.dtype}); got "
            f"data_ptr % 16 = {offset} and strides {strides}. A cache allocated whole (torch.empty/zeros) and sliced "
            f"along batch, head or token is aligned: pass {name}.contiguous() or use backend='triton'"
        )


def rope_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, inv_freq: Tensor, original_max_position: int,
    attention_short: float, attention_long: float, softmax_scale: float, num_splits: int | None = None,
) -> Tensor:  # fmt: skip
    """As :func:`lr2kernels.ops.triton.decode.rope_decode`: ``[B, Hq, n, D]`` in q's dtype, contiguous.

    The capacity ``k_cache.shape[2]`` travels with the launch: no key at or past it is read, and a sequence whose
    ``cache_seqlens`` lies outside ``[n, capacity]`` gets NaN in every element of its rows. ``k_cache``/``v_cache``
    must be 16-byte aligned (ValueError otherwise). ``num_splits`` is the grid's; each sequence uses at most that many.
    """
    ext = extension()
    q, k_cache, v_cache = (contiguous_last(x) for x in (q, k_cache, v_cache))
    _check_aligned_cache("k_cache", k_cache)
    _check_aligned_cache("v_cache", v_cache)
    out = new_like(q)
    if q.numel() == 0:
        return out
    batch, num_q_heads, n_new, head_dim = q.shape
    num_kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    num_rows = group * n_new
    rows_per_block = _rows_per_block(head_dim, num_rows)
    if num_splits is None:
        num_splits = _num_splits(batch * num_kv_heads * _cdiv(num_rows, rows_per_block), max_len, q.device)
    if num_splits > 1:
        o_part = torch.empty((batch * num_kv_heads, num_splits, num_rows, head_dim), dtype=torch.float32,
                             device=q.device)  # fmt: skip
        lse_part = torch.empty((batch * num_kv_heads, num_splits, num_rows), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = None
    # A length below the n_new tokens the call holds is as invalid as one past the capacity (the Triton and torch
    # backends' rule: NaN rows): mapped here, on the device, onto the kernel's past-the-capacity path. Testing it in
    # the kernel costs registers its 2-row tiles do not have on sm_80 (they spill 12 B).
    seqlens = torch.where(cache_seqlens >= n_new, int32(cache_seqlens), max_len + 1).to(torch.int32)
    inv_freq = inv_freq.to(torch.float32).contiguous()
    with torch.cuda.device(q.device):
        ext.rope_decode(
            _dtype_code(q), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), _ptr(o_part),
            _ptr(lse_part), seqlens.data_ptr(), inv_freq.data_ptr(),
            q.stride()[:3], k_cache.stride()[:3], v_cache.stride()[:3], out.stride()[:3],
            batch, num_kv_heads, group, n_new, inv_freq.shape[-1], head_dim, num_splits, _SPLIT_MIN_KEYS, max_len,
            original_max_position,
            softmax_scale * _LOG2E, attention_short, attention_long, _stream(q.device),
        )  # fmt: skip
    return out


def apply_rope(
    q: Tensor | None, k: Tensor | None,
    inv_freq: Tensor, is_long: Tensor, position_ids: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int,
    attention_short: float, attention_long: float, transposed: bool,
) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """As :func:`lr2kernels.ops.triton.rope.apply_rope`: rotated ``(q, k)`` in one launch (None stays None)."""
    ext = extension()
    q = contiguous_last(q) if q is not None else None
    k = contiguous_last(k) if k is not None else None
    q_out = new_like(q) if q is not None else None
    k_out = new_like(k) if k is not None else None
    present = [x for x in (q, k) if x is not None]
    if not present or all(x.numel() == 0 for x in present):
        return q_out, k_out
    varlen = cu_seqlens is not None
    first = present[0]
    batch = cu_seqlens.shape[0] - 1 if varlen else first.shape[0]
    seq_len = first.shape[0] if varlen else first.shape[2]  # varlen: total tokens
    if batch == 0 or seq_len == 0:
        return q_out, k_out
    # A missing tensor gets 0 heads; the other one's pointers stand in for it.
    q_in, q_dst = (q, q_out) if q is not None else (k, k_out)
    k_in, k_dst = (k, k_out) if k is not None else (q, q_out)
    is_long = int32(is_long)
    cu = int32(cu_seqlens)
    positions = int32(position_ids)
    inv_freq = inv_freq.to(torch.float32).contiguous()
    with torch.cuda.device(q_in.device):
        ext.rope_rotate(
            _dtype_code(q_in),
            q_in.data_ptr(), q_dst.data_ptr(), q.shape[1] if q is not None else 0,
            bht_strides(q_in, varlen), bht_strides(q_dst, varlen),
            k_in.data_ptr(), k_dst.data_ptr(), k.shape[1] if k is not None else 0,
            bht_strides(k_in, varlen), bht_strides(k_dst, varlen),
            inv_freq.data_ptr(), inv_freq.shape[-1], q_in.shape[-1], is_long.data_ptr(), _ptr(cu), _ptr(positions),
            position_batch_stride(positions), batch, seq_len, attention_short, attention_long, transposed,
            False, False, False, 1.0, _stream(q_in.device),
        )  # fmt: skip
    return q_out, k_out


def rerotate(
    k: Tensor, inv_freq: Tensor, position_ids: Tensor, from_long: bool, to_long: bool, scale: float, transposed: bool
) -> Tensor:
    """As :func:`lr2kernels.ops.triton.rope.rerotate`: POST-RoPE keys moved between the tables, a new tensor."""
    ext = extension()
    k = contiguous_last(k)
    out = new_like(k)
    if k.numel() == 0:
        return out
    if from_long == to_long and scale == 1.0:
        return out.copy_(k)
    dense = k.dim() == 4
    # [T, H, D] is one sequence of T tokens: batch 1, (0, head, token) strides.
    batch, num_heads, seq_len = (k.shape[0], k.shape[1], k.shape[2]) if dense else (1, k.shape[1], k.shape[0])
    positions = int32(position_ids)
    inv_freq = inv_freq.to(torch.float32).contiguous()
    k_strides, out_strides = bht_strides(k, not dense), bht_strides(out, not dense)
    with torch.cuda.device(k.device):
        ext.rope_rotate(
            _dtype_code(k), k.data_ptr(), out.data_ptr(), num_heads, k_strides, out_strides,
            k.data_ptr(), out.data_ptr(), 0, k_strides, out_strides,
            inv_freq.data_ptr(), inv_freq.shape[-1], k.shape[-1], 0, 0, positions.data_ptr(),
            position_batch_stride(positions), batch, seq_len, 1.0, 1.0, transposed,
            True, from_long, to_long, scale, _stream(k.device),
        )  # fmt: skip
    return out
