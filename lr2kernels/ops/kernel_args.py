"""Tensor arguments of the kernel launchers, shared by the Triton and CUDA backends: layouts, strides, int32
lengths, the device's SM count.

Nothing here reads device data (no ``.item()``): the launchers run inside ``torch.library`` custom ops, so sizes
come from shapes and from the Python arguments the caller resolved. Neither triton nor the CUDA extension is
imported here.
"""

from __future__ import annotations

import functools

import torch


def contiguous_last(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous (the kernels' only layout requirement), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def new_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous, uninitialized tensor of x's shape, dtype and device (written by a kernel with ITS strides)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def bht_strides(x: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides of dense ``[B, H, L, D]`` or varlen ``[T, H, D]`` (no batch stride: sequences
    are row ranges of one tensor)."""
    if varlen:
        return 0, x.stride(1), x.stride(0)
    return x.stride(0), x.stride(1), x.stride(2)


def position_batch_stride(position_ids: torch.Tensor | None) -> int:
    """Stride between the sequences' position rows: only a ``[B, L]`` tensor with B > 1 has one; ``[L]``, ``[1, L]``
    (shared by the batch) and varlen ``[T]`` (indexed by the sequence's start) have none."""
    if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[0] > 1:
        return position_ids.stride(0)
    return 0


def int32(x: torch.Tensor | None) -> torch.Tensor | None:
    """x as a contiguous int32 tensor (itself when it already is one), None stays None."""
    return None if x is None else x.to(torch.int32).contiguous()
