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
import sys
import types

import torch
from torch import Tensor

from lr2kernels.ops.cuda import build as recipe
from lr2kernels.ops.kernel_args import bht_strides, contiguous_last, int32, new_like, position_batch_stride, sm_count

__all__ = [
    "BINDINGS_VERSION", "DECODE_HEAD_DIMS", "apply_rope", "decode_key_tile", "device_count", "extension",
    "load_extension", "rerotate", "rope_decode",
]  # fmt: skip

# The bindings' call signatures this module calls (csrc/lr2_cuda.h: kBindingsVersion); an extension without the
# attribute predates it (version 1).
BINDINGS_VERSION = 2
# Head sizes the rope_decode kernel is instantiated for (csrc/lr2_cuda.h: kDecodeHeadDims; the tests check they agree).
DECODE_HEAD_DIMS = (64, 96, 128, 256)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_LOG2E = 1.4426950408889634
# KV splits (csrc/rope_decode.cuh, csrc/README.md's model): the grid asks for about _BLOCKS_PER_SM resident blocks per
# SM (the decode kernel's registers allow 3 at 4 warps; 2 for the kernel whose shared memory allows 2:
# _grid_blocks_per_sm), each split at least _SPLIT_MIN_KEYS keys; each sequence then uses min(grid splits,
# ceil(its length / _SPLIT_MIN_KEYS)) of them on the device.
_BLOCKS_PER_SM = 3
_SPLIT_MIN_KEYS = 256
_MAX_SPLITS = 128
_BUILD_HINT = (
    "set LR2_CUDA_JIT=1 to build it on first use where nvcc is present, or reinstall there with LR2_BUILD_CUDA=1 "
    "(pip install --no-build-isolation -e .)"
)


def stale_reason(module: types.ModuleType) -> str:
    """The empty string when ``module`` (an imported lr2kernels._cuda) was built from these CUDA sources, else why.

    Its bindings' version must be :data:`BINDINGS_VERSION` (else a call would fail, or pass arguments in the wrong
    places), and the sources' digest it was built with (``SOURCES_DIGEST``, where the build recorded one) must be the
    digest of the sources present (``csrc/`` or ``lr2kernels/_csrc``): an in-tree build left from before a change of
    the kernels is not used.
    """
    version = getattr(module, "BINDINGS_VERSION", 1)
    if version != BINDINGS_VERSION:
        return f"its bindings are version {version}, and this lr2kernels calls version {BINDINGS_VERSION}"
    from lr2kernels.ops.cuda import jit

    built_from, sources = getattr(module, "SOURCES_DIGEST", ""), jit.sources_dir()
    if built_from and sources is not None and built_from != (current := recipe.sources_digest(sources)):
        return f"it was built from other CUDA sources than {sources} (digest {built_from}; theirs is {current})"
    return ""


@functools.cache
def load_extension() -> tuple[types.ModuleType | None, str]:
    """(the extension module, "") or (None, why it cannot be used). Imported once.

    The installed extension first, unless it is stale (:func:`stale_reason`: then it is not used, and the reason
    says so); else a build on first use from the cache (:mod:`lr2kernels.ops.cuda.jit`, keyed by the sources),
    compiled now only when ``LR2_CUDA_JIT=1``.
    """
    try:
        module = importlib.import_module("lr2kernels._cuda")
    except ImportError as error:
        problem = f"the CUDA extension lr2kernels._cuda is not built ({error})"
    else:
        why = stale_reason(module)
        if not why:
            return module, ""
        sys.modules.pop("lr2kernels._cuda", None)  # never used: a cached build may take the name
        problem = f"the CUDA extension {getattr(module, '__file__', 'lr2kernels._cuda')} is stale, not used: {why}"
    from lr2kernels.ops.cuda import jit

    try:
        path = jit.cached_build()
        if path is None and os.environ.get("LR2_CUDA_JIT", "0") == "1":
            path = jit.build()
        if path is not None:
            module = jit.load_built(path)
            why = stale_reason(module)
            if not why:
                return module, ""
            sys.modules.pop("lr2kernels._cuda", None)
            return None, f"{problem}; the cached build {path} is stale too: {why}"
    except (RuntimeError, ImportError, OSError) as error:
        return None, f"{problem}, and building it failed: {error}"
    return None, f"{problem}; {_BUILD_HINT}"


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


def _num_splits(programs: int, capacity: int, device: torch.device, blocks_per_sm: int = _BLOCKS_PER_SM) -> int:
    """The grid's KV splits per (sequence, kv head, row block): enough blocks for ``blocks_per_sm`` per SM, from the
    cache's capacity (no host read of cache_seqlens). The kernel gives each sequence its own number of splits, at most
    this many, from its own length; the blocks beyond it exit at once."""
    target = blocks_per_sm * sm_count(device)
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


def _dynamic_smem(dtype: torch.dtype, head_dim: int, rows_per_block: int) -> bool:
    """Whether the decode kernel keeps its stages in dynamic shared memory (csrc/rope_decode.cuh:
    ``DecodeShape::DYNAMIC_SMEM``, mirrored here and checked by tests/cuda/test_host_math.py): fp16/bf16 head 256 at
    4 rows a block, on tensor cores, 78 KB a block. Its launch opts the kernel in (``cudaFuncSetAttribute``) and
    raises a RuntimeError naming the bytes where the GPU's per-block opt-in limit is smaller (every sm_80+ GPU has
    >= 99 KB)."""
    return torch.empty((), dtype=dtype).element_size() == 2 and head_dim > 128 and rows_per_block >= 4


def _grid_blocks_per_sm(dtype: torch.dtype, head_dim: int, rows_per_block: int) -> int:
    """Blocks per SM the grid's splits aim at: 3 (the registers allow 3), 2 where the shared memory allows only 2
    (:func:`_dynamic_smem`): one wave, rather than a third block an SM that runs alone after the first two."""
    return 2 if _dynamic_smem(dtype, head_dim, rows_per_block) else _BLOCKS_PER_SM


def _check_aligned_cache(name: str, x: Tensor) -> None:
    """The decode kernel reads k/v rows in 16-byte copies (cp.async): a misaligned cache is rejected, never copied.
    (Dense ``[B, Hk, max_len, D]`` or paged ``[num_blocks, block_size, Hk, D]``: the first three strides.)"""
    step = 16 // x.element_size()
    offset = x.data_ptr() % 16
    strides = tuple(x.stride())
    if offset or any(stride % step for stride, size in zip(strides[:3], x.shape[:3]) if size > 1):
        raise ValueError(
            f"{name}: the CUDA rope_decode reads the cache in 16-byte copies, so it must start on a 16-byte boundary "
            f"and its first three strides (batch or block, head, token) must be multiples of {step} elements "
            f"({x.dtype}); got data_ptr % 16 = {offset} and strides {strides}. A cache allocated whole "
            f"(torch.empty/zeros) and sliced along its first three dims is aligned: pass {name}.contiguous() or use "
            "backend='triton'"
        )


def decode_key_tile(dtype: torch.dtype, head_dim: int, rows_per_block: int) -> int:
    """The keys one block-table lookup of the decode kernel serves for (dtype, head_dim, rows per block), 8 to 32: a
    paged cache's block_size must be a multiple of it. csrc/rope_decode.cuh's ``DecodeShape<T, D, ROWS>::PAGE_SPAN``
    (tests/cuda/test_host_math.py checks this mirror against it): the pipeline tile, or half of it.

    The tile is ``max(4 warps x keys a warp scores at once, the keys of ~8 KB of keys and values)``. A tile is read
    from one block of a paged cache, so its block_size must be a multiple of it; every multiple of 32 is. fp16/bf16
    at 4 and 8 rows per block (the tensor-core tiles of 32 keys) look each half tile's block up: 16; at head_dim
    256 each warp's 8 keys: 8 (``DecodeShape::PAGE_SPAN``).
    """
    element_size = torch.empty((), dtype=dtype).element_size()
    if element_size == 2 and rows_per_block >= 4:
        return 8 if head_dim > 128 else 16
    slots = head_dim // 2
    target = min(8, max(1, 16 // rows_per_block))  # slots per lane at most (registers)
    lanes = [n for n in (1, 2, 4, 8, 16, 32) if slots % n == 0]
    lanes_per_key = next((n for n in lanes if slots // n <= target), lanes[-1])
    keys_per_block = 4 * (32 // lanes_per_key)
    by_bytes = 1 << ((8192 // (2 * head_dim * element_size)).bit_length() - 1)  # floor to a power of two
    return max(keys_per_block, by_bytes)


def _check_block_size(block_size: int, dtype: torch.dtype, head_dim: int, rows_per_block: int) -> None:
    """A paged cache's block size must hold whole key tiles (the kernel reads a tile from one block)."""
    tile = decode_key_tile(dtype, head_dim, rows_per_block)
    if block_size % tile:
        raise ValueError(
            f"k_cache: the CUDA rope_decode reads tiles of {tile} keys from one cache block ({dtype}, head_dim "
            f"{head_dim}, {rows_per_block} rows per block: GQA group x new tokens), so the paged cache's block_size "
            f"must be a multiple of {tile}; got block_size {block_size}. Every multiple of 32 works (transformers' "
            "page_size 256, FlashAttention's multiples of 256); or use backend='triton'"
        )


def rope_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, inv_freq: Tensor, original_max_position: int,
    attention_short: float, attention_long: float, softmax_scale: float, num_splits: int | None = None, *,
    block_table: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """As :func:`lr2kernels.ops.triton.decode.rope_decode`: ``[B, Hq, n, D]`` in q's dtype, contiguous.

    Dense caches ``[B, Hk, max_len, D]`` (capacity ``max_len``), or paged ``[num_blocks, block_size, Hk, D]`` read
    through ``block_table [B, max_blocks]`` (capacity ``max_blocks * block_size``; ``block_size`` a multiple of
    :func:`decode_key_tile`, ValueError otherwise). The capacity travels with the launch: no key at or past it is
    read, and a sequence whose ``cache_seqlens`` lies outside ``[n, capacity]`` gets NaN in every element of its
    rows; so does one whose blocks (up to its length) include an id outside ``[0, num_blocks)``, which is never
    dereferenced. ``k_cache``/``v_cache`` must be 16-byte aligned (ValueError otherwise). ``num_splits`` is the
    grid's; each sequence uses at most that many.
    """
    ext = extension()
    q, k_cache, v_cache = (contiguous_last(x) for x in (q, k_cache, v_cache))
    _check_aligned_cache("k_cache", k_cache)
    _check_aligned_cache("v_cache", v_cache)
    out = new_like(q)
    if q.numel() == 0:
        return out
    batch, num_q_heads, n_new, head_dim = q.shape
    paged = block_table is not None
    if paged:
        # [num_blocks, block_size, Hk, D]: the kernel takes (block, head, token-in-block) strides.
        num_blocks, block_size, num_kv_heads = k_cache.shape[:3]
        max_len = block_table.shape[1] * block_size
        k_strides, v_strides = (tuple(x.stride()[i] for i in (0, 2, 1)) for x in (k_cache, v_cache))
        table = int32(block_table)
    else:
        num_blocks = block_size = 0
        num_kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
        k_strides, v_strides = k_cache.stride()[:3], v_cache.stride()[:3]
        table = None
    group = num_q_heads // num_kv_heads
    num_rows = group * n_new
    rows_per_block = _rows_per_block(head_dim, num_rows)
    if paged:
        _check_block_size(block_size, q.dtype, head_dim, rows_per_block)
    if num_splits is None:
        programs = batch * num_kv_heads * _cdiv(num_rows, rows_per_block)
        blocks_per_sm = _grid_blocks_per_sm(q.dtype, head_dim, rows_per_block)
        num_splits = _num_splits(programs, max_len, q.device, blocks_per_sm)
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
            q.stride()[:3], k_strides, v_strides, out.stride()[:3],
            batch, num_kv_heads, group, n_new, inv_freq.shape[-1], head_dim, num_splits, _SPLIT_MIN_KEYS, max_len,
            original_max_position, softmax_scale * _LOG2E, attention_short, attention_long,
            _ptr(table), table.stride(0) if paged else 0, block_size, num_blocks, _stream(q.device),
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
