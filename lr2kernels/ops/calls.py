"""Typed descriptions of one call of a public op, built by validation and handed to a backend.

A call carries the validated tensors and options plus what validation learned about them (layout, sizes, dtype,
device), so a backend can say whether it supports the call (:meth:`Backend.supports`) from metadata alone and run it
without re-deriving anything. Inputs are as the user gave them (any strides); ``softmax_scale`` is resolved.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from lr2kernels.tables import RopeTable


@dataclasses.dataclass(frozen=True)
class CallSpec:
    """The metadata a backend's ``supports`` decides from: hashable, no tensors (backend choice is cached on it)."""

    op: str  # "apply_rope", "rope_attention", "rope_decode" or "rerotate"
    device: torch.device
    dtype: torch.dtype
    head_dim: int
    varlen: bool


@dataclasses.dataclass(frozen=True)
class OpCall:
    """What every call has: the table, the layout and sizes, and the metadata of its :class:`CallSpec`."""

    op: ClassVar[str]
    table: RopeTable
    varlen: bool  # [T, H, D] + cu_seqlens, else dense [B, H, L, D]
    batch: int  # sequences (varlen: len(cu_seqlens) - 1)
    seq_len: int  # dense: L; varlen: total tokens T; decode: the cache's capacity
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def spec(self) -> CallSpec:
        return CallSpec(self.op, self.device, self.dtype, self.head_dim, self.varlen)


@dataclasses.dataclass(frozen=True)
class RopeCall(OpCall):
    """``apply_rope``: q ``[B, Hq, L, D]`` / ``[T, Hq, D]``, k likewise with Hk heads."""

    op: ClassVar[str] = "apply_rope"
    q: torch.Tensor
    k: torch.Tensor
    position_ids: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    long: bool | None


@dataclasses.dataclass(frozen=True)
class AttentionCall(OpCall):
    """``rope_attention``: q, k, v as in :class:`RopeCall`; ``max_seqlen`` only for varlen (None: not given)."""

    op: ClassVar[str] = "rope_attention"
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    position_ids: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    max_seqlen: int | None
    long: bool | None
    causal: bool
    softmax_scale: float
    return_lse: bool


@dataclasses.dataclass(frozen=True)
class DecodeCall(OpCall):
    """``rope_decode``: q ``[B, Hq, n, D]`` against caches of PRE-RoPE keys and values.

    Dense (``block_table`` None): caches ``[B, Hk, max_len, D]``. Paged: caches ``[num_blocks, block_size, Hk, D]``
    (FlashAttention's / vLLM's layout) and ``block_table [B, max_blocks]`` int32/int64: token j of sequence b sits at
    ``k_cache[block_table[b, j // block_size], j % block_size]``.
    """

    op: ClassVar[str] = "rope_decode"
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor
    softmax_scale: float
    block_table: torch.Tensor | None = None  # [B, max_blocks] (paged caches), None: dense caches

    @property
    def num_new(self) -> int:
        return self.q.shape[2]

    @property
    def paged(self) -> bool:
        """Whether the caches are paged (read through ``block_table``)."""
        return self.block_table is not None

    @property
    def block_size(self) -> int | None:
        """Tokens per cache block (``k_cache.shape[1]``) of a paged call; None for dense caches."""
        return self.k_cache.shape[1] if self.block_table is not None else None

    @property
    def num_blocks(self) -> int | None:
        """Blocks in the paged caches (``k_cache.shape[0]``): valid block ids are ``[0, num_blocks)``; None: dense."""
        return self.k_cache.shape[0] if self.block_table is not None else None

    @property
    def capacity(self) -> int:
        """Slots per sequence, which every launch bounds its key reads by: ``k_cache.shape[2]`` (dense), or
        ``block_table.shape[1] * block_size`` (paged)."""
        if self.block_table is not None:
            return self.block_table.shape[1] * self.k_cache.shape[1]
        return self.k_cache.shape[2]


@dataclasses.dataclass(frozen=True)
class RerotateCall(OpCall):
    """``rerotate``: POST-RoPE keys ``[B, H, L, D]`` or ``[T, H, D]`` (one sequence) moved between the tables."""

    op: ClassVar[str] = "rerotate"
    k: torch.Tensor
    position_ids: torch.Tensor
    from_long: bool
    to_long: bool
