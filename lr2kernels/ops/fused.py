"""What every fused-kernel backend shares: turning a call into the custom ops' tensors and primitives.

A kernel backend (triton, cuda) subclasses :class:`FusedBackend` and provides ``launchers()`` (the
:class:`lr2kernels.ops.custom_ops.Launchers` of its kernels), ``is_available`` and ``supports``. The preparation
here runs on the device without host reads, except one documented case: a varlen call without ``max_seqlen`` whose
offsets live on a GPU reads the longest length once (the grid needs it).
"""

from __future__ import annotations

import torch

from lr2kernels.ops import custom_ops, rotary
from lr2kernels.ops.calls import AttentionCall, DecodeCall, RerotateCall, RopeCall
from lr2kernels.tables import RopeTable


def _max_seqlen(call: RopeCall | AttentionCall, given: int | None) -> int:
    """The dense length, or the longest varlen sequence (given, else read from cu_seqlens: a host read)."""
    if call.cu_seqlens is None:
        return call.seq_len
    if given is not None:
        return given
    if call.batch == 0:
        return 0
    return int((call.cu_seqlens[1:] - call.cu_seqlens[:-1]).max())


def _table_args(table: RopeTable, device: torch.device) -> tuple[torch.Tensor, float, float]:
    inv_freq = rotary.inv_freq_pair(table, device).contiguous()  # [2, rotary_dim // 2]
    return inv_freq, table.attention_factor_for(False), table.attention_factor_for(True)


class FusedBackend:
    """Base of the kernel backends: the four ops through ``torch.ops.lr2kernels`` with this backend's launchers."""

    NAME: str

    def launchers(self) -> custom_ops.Launchers:
        raise NotImplementedError

    def _sequence_args(self, call: RopeCall | AttentionCall, max_seqlen: int) -> tuple:
        # Positions and offsets go as given: the launchers take them to int32 themselves.
        is_long = rotary.sequence_is_long(
            call.table, call.batch, max_seqlen, call.position_ids, call.cu_seqlens, call.long, call.device
        )
        return is_long, call.position_ids, call.cu_seqlens

    def apply_rope(self, call: RopeCall) -> tuple[torch.Tensor, torch.Tensor]:
        max_seqlen = _max_seqlen(call, None)
        inv_freq, attention_short, attention_long = _table_args(call.table, call.device)
        is_long, position_ids, cu_seqlens = self._sequence_args(call, max_seqlen)
        return torch.ops.lr2kernels.apply_rope(
            call.q, call.k, inv_freq, is_long, position_ids, cu_seqlens, max_seqlen, attention_short, attention_long,
            False, self.NAME,
        )  # fmt: skip

    def rope_attention(self, call: AttentionCall) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        max_seqlen = _max_seqlen(call, call.max_seqlen)
        inv_freq, attention_short, attention_long = _table_args(call.table, call.device)
        is_long, position_ids, cu_seqlens = self._sequence_args(call, max_seqlen)
        out, lse = torch.ops.lr2kernels.rope_attention_fwd(
            call.q, call.k, call.v, inv_freq, is_long, position_ids, cu_seqlens, max_seqlen, call.causal,
            call.softmax_scale, attention_short, attention_long, self.NAME,
        )  # fmt: skip
        return (out, lse) if call.return_lse else out

    def rope_decode(self, call: DecodeCall) -> torch.Tensor:
        # A paged call's block_table goes to the custom op, which refuses it for a launcher without paging.
        inv_freq, attention_short, attention_long = _table_args(call.table, call.device)
        return torch.ops.lr2kernels.rope_decode(
            call.q, call.k_cache, call.v_cache, call.cache_seqlens, inv_freq, call.table.original_max_position,
            attention_short, attention_long, call.softmax_scale, self.NAME, call.block_table,
        )  # fmt: skip

    def rerotate(self, call: RerotateCall) -> torch.Tensor:
        inv_freq, attention_short, attention_long = _table_args(call.table, call.device)
        attention = {False: attention_short, True: attention_long}
        scale = attention[call.to_long] / attention[call.from_long]
        return torch.ops.lr2kernels.rerotate(
            call.k, inv_freq, call.position_ids, call.from_long, call.to_long, scale, False, self.NAME
        )
