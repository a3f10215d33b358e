"""Host-side helpers shared by the Triton launchers: layouts, strides, tile sizes, the device's SM count.

Nothing here reads device data (no ``.item()``): the launchers run inside ``torch.library`` custom ops, so sizes
come from shapes and from the Python arguments the caller resolved.
"""

from __future__ import annotations

import os

import torch
import triton

# Re-exported: the launchers' tensor arguments are shared with the CUDA backend.
from lr2kernels.ops.kernel_args import (  # noqa: F401
    bht_strides,
    contiguous_last,
    int32,
    new_like,
    position_batch_stride,
    sm_count,
)

LOG2E = 1.4426950408889634  # softmax in exp2: scores * scale * log2(e)


def triton_interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run in numpy on the CPU: small tiles, few programs)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


MAX_GRID_YZ = 65_535  # CUDA's limit on grid axes 1 and 2


def sequence_grid(token_blocks: int, per_sequence: int, sequences: int) -> tuple[int, int, int]:
    """The grid ``(token blocks, heads or chunks of heads, sequences)`` of the per-sequence kernels.

    Heads and sequences get an axis each: CUDA caps axes 1 and 2 at 65,535, which their product (e.g. 2,048
    sequences x 32 heads) would exceed on one axis.
    """
    if per_sequence > MAX_GRID_YZ or sequences > MAX_GRID_YZ:
        raise ValueError(
            f"q: at most {MAX_GRID_YZ} sequences and {MAX_GRID_YZ} heads per call (a CUDA grid limit), got "
            f"{sequences} sequences and {per_sequence} heads; split the batch"
        )
    return token_blocks, per_sequence, sequences


MIN_DOT_WIDTH = 16  # tl.dot's smallest operand dimension


def one_tile_widths(channels: int) -> tuple[int, int]:
    """``(A, B)`` of a segment held in one power-of-two tile (>= 16): A = next_pow2(channels); B unused."""
    return max(MIN_DOT_WIDTH, triton.next_power_of_2(max(channels, 1))), MIN_DOT_WIDTH


def tile_widths(channels: int) -> tuple[int, int]:
    """The two power-of-two tile widths ``(A, B)`` (each >= 16, tl.dot's minimum) that hold ``channels`` channels:
    the first A channels, then the rest padded to B. B is used only where ``channels > A``; where one tile is as
    narrow as two, it is one tile of ``next_pow2(channels)`` (and B = 16 is unused).

    Triton tiles are powers of two, so one tile per segment would contract 48-channel halves over 64: D96 and
    Phi-4-mini's 96-of-128 (halves of 48) as 128 and 160 channels. Two tiles of 32 + 16 make them 96 and 128.
    """
    whole, _ = one_tile_widths(channels)
    first = max(MIN_DOT_WIDTH, whole // 2)
    rest = max(MIN_DOT_WIDTH, triton.next_power_of_2(max(channels - first, 1)))
    if channels <= first or first + rest >= whole:
        return whole, MIN_DOT_WIDTH
    return first, rest


def segment_tiles(channels: int, first: int, second: int) -> list[int]:
    """The widths of the tiles the kernels hold a segment of ``channels`` channels in, given its constexprs
    ``(A, B)`` (from :func:`tile_widths` or :func:`one_tile_widths`): none, ``[A]`` or ``[A, B]``."""
    return [] if channels == 0 else [first] if channels <= first else [first, second]


def split_sizes(head_dim: int, rotary_dim: int, one_tile: bool = False) -> dict[str, int]:
    """Constexpr sizes of the split layout for a head: each NeoX half (HALF channels) and the pass-through (PASS,
    possibly 0) in tiles of :func:`tile_widths`.

    ``one_tile``: one tile per segment, the layout of the gradients the backward accumulates in registers (dq and
    dk). A 16-channel second tile of an accumulator is narrower than 8 warps' MMA tiles cover, so it is replicated
    across warps, and the dq and dk/dv kernels then spilled in every tile at 80 and 96 channels on sm_80 (ptxas,
    benchmarks/compile_report.py --all-configs), where one 64-channel tile per half spills in none of the 64 x 32,
    32 x 32, 32 x 16 and 16 x 32 tiles.
    """
    half = rotary_dim // 2
    passthrough = head_dim - rotary_dim
    widths = one_tile_widths if one_tile else tile_widths
    half_a, half_b = widths(half)
    pass_a, pass_b = widths(passthrough)
    return {"HALF": half, "HALF_A": half_a, "HALF_B": half_b, "PASS": passthrough, "PASS_A": pass_a, "PASS_B": pass_b}


def rotary_dim_of(inv_freq: torch.Tensor) -> int:
    """rotary_dim of a prepared ``[2, rotary_dim // 2]`` inverse-frequency table (row 0 short, row 1 long)."""
    return 2 * inv_freq.shape[-1]


def head_sizes(head_dim: int, one_tile: bool = False) -> dict[str, int]:
    """Constexpr sizes of a whole head (v, dO, outputs): HEAD_DIM in the tiles of :func:`tile_widths`, or in one
    (``one_tile``: decode, whose 16-row tiles for one new token would spread a 16-channel tile over 8 warps with
    replication: at 80 channels 1,765 SASS instructions per key tile and 88 MMAs against 1,434 and 14 in one tile)."""
    head_a, head_b = (one_tile_widths if one_tile else tile_widths)(head_dim)
    return {"HEAD_DIM": head_dim, "HEAD_A": head_a, "HEAD_B": head_b}


def dot_precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input_precision: fp32 stays fp32 ("ieee", not tf32); None (the default) for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else None


def sequences(x: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int) -> tuple[int, int]:
    """(number of sequences, tokens per sequence at most) of a dense ``[B, H, L, D]`` or varlen ``[T, H, D]`` x."""
    if cu_seqlens is not None:
        return cu_seqlens.shape[0] - 1, max_seqlen
    return x.shape[0], x.shape[2]


def sequence_args(
    is_long: torch.Tensor, position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(is_long, cu_seqlens, positions, positions' batch stride) as the sequence-aware kernels take them: int32,
    contiguous; an unused pointer (no cu_seqlens, no positions) gets is_long, any valid pointer."""
    is_long = int32(is_long)
    cu_ptr = int32(cu_seqlens) if cu_seqlens is not None else is_long
    position_ids = int32(position_ids)
    pos_ptr = position_ids if position_ids is not None else is_long
    return is_long, cu_ptr, pos_ptr, position_batch_stride(position_ids)


def tma_aligned(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors can address these tensors' rows: a 16-byte aligned base and every stride but the
    last (contiguous) one a multiple of 16 bytes, so the base of every (sequence, head) is aligned too."""
    return all(
        x.data_ptr() % 16 == 0 and all(s * x.element_size() % 16 == 0 for s in x.stride()[:-1]) for x in tensors
    )


def tma_capable(device: torch.device) -> bool:
    """Whether kernels on ``device`` load through TMA descriptors: Hopper and newer GPUs; the CPU interpreter, which
    emulates them (so the tests run that path). On Ampere, Triton would lower them to plain loads, which the
    kernels' own pointer path does better."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device)[0] >= 9


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_scratch_allocator() -> None:
    """Kernels that build TMA descriptors on the device take 128 bytes of global scratch per descriptor and program
    from Triton's allocator: give Triton a torch-backed one (the caching allocator, stream-ordered) unless the
    caller set their own."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)
