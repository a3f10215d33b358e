"""The "torch" backend: plain PyTorch ops, differentiable, runs everywhere.

RoPE uses HF's own arithmetic (fp32 cos/sin cast to the input dtype, rotation in the input dtype), so a model
patched onto this backend reproduces stock transformers; attention goes through
``torch.nn.functional.scaled_dot_product_attention``. Inputs are validated by ``lr2kernels.ops``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lr2kernels import reference
from lr2kernels.tables import RopeTable

NAME = "torch"


def is_available(device: torch.device | None = None) -> tuple[bool, str]:
    return True, ""


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    table: RopeTable,
    position_ids: torch.Tensor | None,
    long: bool | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    varlen = cu_seqlens is not None
    if position_ids is None:
        position_ids = reference.default_position_ids(q.shape[0] if varlen else q.shape[2], q.device, cu_seqlens)
    cos, sin = reference.token_cos_sin(table, position_ids, long, cu_seqlens, q.dtype)
    if varlen:
        cos, sin = cos[:, None], sin[:, None]  # [T, 1, rotary_dim]
    else:
        cos, sin = reference.broadcast_dense(cos), reference.broadcast_dense(sin)  # [B|1, 1, L, rotary_dim]
    return reference.rotate(q, cos, sin), reference.rotate(k, cos, sin)


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    softmax_scale: float | None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=causal, scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: RopeTable,
    position_ids: torch.Tensor | None,
    causal: bool,
    softmax_scale: float | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    long: bool | None,
    return_lse: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    q_rot, k_rot = apply_rope(q, k, table, position_ids, long, cu_seqlens)
    if return_lse:
        # SDPA does not return the log-sum-exp: materialise the fp32 scores instead (O(L^2) memory).
        out, lse = reference.attention(q_rot, k_rot, v, causal, softmax_scale, cu_seqlens, return_lse=True)
        return out.to(v.dtype), lse.float()
    if cu_seqlens is None:
        return _sdpa(q_rot, k_rot, v, causal, softmax_scale)
    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        # [L, H, D] -> [1, H, L, D] -> SDPA -> [L, H, D]
        qs, ks, vs = (x[start:end].transpose(0, 1)[None] for x in (q_rot, k_rot, v))
        outputs.append(_sdpa(qs, ks, vs, causal, softmax_scale)[0].transpose(0, 1))
    return torch.cat(outputs)


def rope_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    table: RopeTable,
    softmax_scale: float | None,
) -> torch.Tensor:
    n_new = q.shape[2]
    lengths = cache_seqlens.tolist()
    max_len = max(lengths)  # slots past every sequence's length are never read
    k_cache, v_cache = k_cache[:, :, :max_len], v_cache[:, :, :max_len]
    key_positions = torch.arange(max_len, device=q.device)
    long_flags = [table.use_long(n) for n in lengths]
    if all(f == long_flags[0] for f in long_flags):  # one table for the batch: no per-sequence select
        cos, sin = (c.to(q.dtype)[None] for c in table._cos_sin_prefix(long_flags[0], max_len, q.device))
    else:
        cos_short, sin_short = table._cos_sin_prefix(False, max_len, q.device)  # [max_len, rotary_dim]
        cos_long, sin_long = table._cos_sin_prefix(True, max_len, q.device)
        is_long = torch.tensor(long_flags, device=q.device)[:, None, None]  # [B, 1, 1]: table per sequence
        cos = torch.where(is_long, cos_long, cos_short).to(q.dtype)  # [B, max_len, rotary_dim]
        sin = torch.where(is_long, sin_long, sin_short).to(q.dtype)
    k_rot = reference.rotate(k_cache, cos[:, None], sin[:, None])  # [B, Hk, max_len, D]
    q_positions = cache_seqlens[:, None].long() - n_new + torch.arange(n_new, device=q.device)  # [B, n]
    gather_index = q_positions[..., None].expand(-1, -1, cos.shape[-1])
    cos_q = cos.expand(q.shape[0], -1, -1).gather(1, gather_index)[:, None]  # [B, 1, n, rotary_dim]
    sin_q = sin.expand(q.shape[0], -1, -1).gather(1, gather_index)[:, None]
    q_rot = reference.rotate(q, cos_q, sin_q)  # [B, Hq, n, D]
    if n_new == 1 and all(n == max_len for n in lengths):
        return _sdpa(q_rot, k_rot, v_cache, False, softmax_scale)  # every key visible: no mask to build
    visible = key_positions[None, None, :] <= q_positions[:, :, None]  # [B, n, max_len]
    if any(n < max_len for n in lengths):
        # Unwritten cache slots may hold anything (torch.empty): zero them so that NaN garbage cannot leak through
        # the masked product (0 * NaN = NaN).
        valid = (key_positions[None, :] < cache_seqlens[:, None])[:, None, :, None]  # [B, 1, max_len, 1]
        k_rot = torch.where(valid, k_rot, 0.0)
        v_cache = torch.where(valid, v_cache, 0.0)
    return _sdpa(q_rot, k_rot, v_cache, False, softmax_scale, attn_mask=visible[:, None])


def rerotate(
    k: torch.Tensor, table: RopeTable, position_ids: torch.Tensor, from_long: bool, to_long: bool
) -> torch.Tensor:
    # One rotation by (theta_to - theta_from) scaled by a_to / a_from, from the fp32 scaled cos/sin of both tables:
    # cos' = (C_t C_f + S_t S_f) / a_f^2, sin' = (S_t C_f - C_t S_f) / a_f^2.
    compute = torch.float64 if k.dtype == torch.float64 else torch.float32
    cos_from, sin_from = (c.to(compute) for c in table.cos_sin(position_ids, long=from_long))
    cos_to, sin_to = (c.to(compute) for c in table.cos_sin(position_ids, long=to_long))
    inv_sq = 1.0 / table.attention_factor_for(from_long) ** 2
    cos = (cos_to * cos_from + sin_to * sin_from) * inv_sq
    sin = (sin_to * cos_from - cos_to * sin_from) * inv_sq
    if k.dim() == 4:
        cos, sin = reference.broadcast_dense(cos), reference.broadcast_dense(sin)
    else:
        cos, sin = cos[:, None], sin[:, None]
    return reference.rotate(k.to(compute), cos, sin).to(k.dtype)
