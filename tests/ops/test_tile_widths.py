"""How the Triton kernels cut a head into power-of-two tiles (``_host.tile_widths``): every channel is covered,
each tile is a power of two tl.dot accepts, and the head sizes of real LongRoPE models contract over the channels
they have, not the next power of two (D96: 96, not 128; Phi-4-mini's 96-of-128: 128, not 160)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from lr2kernels.ops.triton._host import (  # noqa: E402
    MIN_DOT_WIDTH,
    head_sizes,
    segment_tiles,
    split_sizes,
    tile_widths,
)


def _used(channels: int) -> list[int]:
    """The widths of the tiles a segment of ``channels`` channels is held in (none when it has no channel)."""
    return segment_tiles(channels, *tile_widths(channels))


def _next_pow2(n: int) -> int:
    return max(MIN_DOT_WIDTH, 1 << (n - 1).bit_length())


def test_tiles_cover_the_channels_in_powers_of_two():
    for channels in range(0, 520):
        tiles = _used(channels)
        assert sum(tiles) >= channels, channels
        assert all(t >= MIN_DOT_WIDTH and t & (t - 1) == 0 for t in tiles), (channels, tiles)
        if channels:
            assert sum(tiles) <= _next_pow2(channels), channels  # never wider than one padded tile
            assert len(tiles) == 1 or sum(tiles) < _next_pow2(channels), channels  # two only where narrower
            assert len(tiles) == 1 or tiles[0] < channels, channels  # the first of two holds no padding
    assert _used(0) == [] and _used(48) == [32, 16] and _used(64) == [64]


def _contracted(head_dim: int, rotary_dim: int, one_tile: bool = False) -> int:
    """The channels q k^T is contracted over: the tiles of both halves and of the pass-through."""
    split = split_sizes(head_dim, rotary_dim, one_tile)
    halves = segment_tiles(split["HALF"], split["HALF_A"], split["HALF_B"])
    return 2 * sum(halves) + sum(segment_tiles(split["PASS"], split["PASS_A"], split["PASS_B"]))


@pytest.mark.parametrize(
    "head_dim,rotary_dim,contracted,backward,rows",
    [
        (64, 64, 64, 64, 64),  # SmolLM2, Llama-3.2-1B
        (96, 96, 96, 128, 96),  # Phi-3-mini: halves 32 + 16, rows 64 + 32 (was 128, 128)
        (128, 96, 128, 160, 128),  # Phi-4-mini: halves 32 + 16, pass-through 32 (was 160)
        (128, 128, 128, 128, 128),  # Llama-3, Qwen2.5
        (80, 80, 96, 128, 80),  # halves of 40 padded to 32 + 16 (was 128, 128)
        (80, 32, 80, 96, 80),  # Phi-2: halves 16, pass-through 32 + 16 (was 96, 128)
        (256, 256, 256, 256, 256),
    ],
)
def test_real_head_sizes_contract_over_their_channels(head_dim, rotary_dim, contracted, backward, rows):
    """Forward and decode contract over the two-tile widths; the backward's dq / dk accumulators keep one tile per
    segment (narrow accumulator tiles spill); v and output rows are two tiles but in decode (16-row tiles)."""
    assert _contracted(head_dim, rotary_dim) == contracted
    assert _contracted(head_dim, rotary_dim, one_tile=True) == backward
    sizes = head_sizes(head_dim)
    assert sum(_used(sizes["HEAD_DIM"])) == rows
    assert head_sizes(head_dim, one_tile=True)["HEAD_A"] >= head_dim
