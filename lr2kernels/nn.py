"""``LongRopeAttention``: a drop-in multi-head attention module with LongRoPE applied inside the kernel."""

from __future__ import annotations

import torch
from torch import nn

from lr2kernels.ops import rope_attention
from lr2kernels.tables import RopeTable


class LongRopeAttention(nn.Module):
    """q/k/v projections, rescaled RoPE + causal attention (fused where a kernel backend exists), output projection.

    Args:
        hidden_size: model width.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA); must divide ``num_heads``. Default ``num_heads``.
        table: the RoPE table; ``table.head_dim`` is the head size.
        bias: bias on the q/k/v projections (as Qwen2); the output projection has none.
        backend: "torch", "triton", "cuda" or None for the best available.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        table: RopeTable,
        num_kv_heads: int | None = None,
        bias: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(table, RopeTable):
            raise TypeError(f"table: expected a lr2kernels.RopeTable, got {type(table).__name__}")
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: expected a divisor of num_heads = {num_heads}, got {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, table.head_dim
        self.table, self.backend = table, backend
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """``[B, L, hidden]`` -> ``[B, L, hidden]``; or packed ``[T, hidden]`` with ``cu_seqlens`` (each sequence
        its own table). ``position_ids``: ``[B, L]`` / ``[L]``, or ``[T]`` packed; default 0..len-1 per sequence."""
        if cu_seqlens is not None:
            tokens = hidden_states.shape[0]
            q = self.q_proj(hidden_states).view(tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
            k = self.k_proj(hidden_states).view(tokens, self.num_kv_heads, self.head_dim)
            v = self.v_proj(hidden_states).view(tokens, self.num_kv_heads, self.head_dim)
            out = rope_attention(
                q,
                k,
                v,
                self.table,
                position_ids=position_ids,
                cu_seqlens=cu_seqlens,
                max_seqlen=max_seqlen,
                backend=self.backend,
            )
            return self.o_proj(out.reshape(tokens, -1))
        batch, seq, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)  # [B, Hq, L, D]
        k = self.k_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = rope_attention(q, k, v, self.table, position_ids=position_ids, backend=self.backend)  # [B, Hq, L, D]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
