"""The "torch" backend: plain PyTorch ops, differentiable by autograd, runs on every device.

RoPE uses HF's own arithmetic (fp32 cos/sin cast to the input dtype, rotation in the input dtype), so a model
patched onto this backend reproduces stock transformers; attention is ``scaled_dot_product_attention``. Nothing
here reads a device tensor's values on the host: where the data is on the host already (CPU tensors outside
``torch.compile``, see :func:`lr2kernels.ops.validation.reads_values`) faster shapes of the same math are chosen
from it, so the backend is CUDA-graph safe on a GPU and ``torch.compile(fullgraph=True)`` traces it on any device.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from lr2kernels.ops import rotary, validation
from lr2kernels.ops.calls import AttentionCall, CallSpec, DecodeCall, RerotateCall, RopeCall
from lr2kernels.tables import RopeTable

# Queries per block of the log-sum-exp attention: bounds its fp32 score block to [B, H, 1024, L].
_LSE_QUERY_BLOCK = 1024


def _token_is_long(
    table: RopeTable,
    position_ids: torch.Tensor,
    long: bool | None,
    cu_seqlens: torch.Tensor | None,
    num_sequences: int,
) -> bool | torch.Tensor:
    """The table of every token: a bool for the whole call, or a bool tensor broadcastable to ``position_ids``."""
    if long is not None:
        return long
    if cu_seqlens is None:  # HF's rule for the whole batch: long iff max(position) + 1 > L0
        if validation.reads_values(position_ids):
            return position_ids.numel() > 0 and table.use_long(int(position_ids.max()) + 1)
        return position_ids.max() + 1 > table.original_max_position
    flags = rotary.sequence_is_long(table, num_sequences, 0, position_ids, cu_seqlens, None, position_ids.device)
    return flags.bool()[rotary.sequence_of_token(cu_seqlens, position_ids.numel())]  # [T]: each sequence its own


def _rotate_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    table: RopeTable,
    position_ids: torch.Tensor | None,
    long: bool | None,
    cu_seqlens: torch.Tensor | None,
    num_sequences: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    varlen = cu_seqlens is not None
    if position_ids is None:
        position_ids = rotary.default_position_ids(q.shape[0] if varlen else q.shape[2], q.device, cu_seqlens)
    is_long = _token_is_long(table, position_ids, long, cu_seqlens, num_sequences)
    cos, sin = (_over_heads(c, varlen) for c in rotary.token_cos_sin(table, position_ids, is_long, q.dtype))
    return rotary.rotate(q, cos, sin), rotary.rotate(k, cos, sin)


def _over_heads(cos: torch.Tensor, varlen: bool) -> torch.Tensor:
    """cos or sin per token -> broadcastable over the heads: [T, r] -> [T, 1, r]; [L, r] -> [1, 1, L, r];
    [B, L, r] -> [B, 1, L, r]."""
    if varlen:
        return cos[:, None]
    return cos[None, None] if cos.dim() == 2 else cos[:, None]


def _sdpa(q, k, v, causal: bool, softmax_scale: float, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=causal, scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Attention of one query per head, q ``[B, Hq, 1, D]``, against every key of k, v ``[B, Hk, T, D]`` (no mask),
    as ``[B, Hq, 1, D]``.

    The query heads that share a kv head are stacked as that head's query rows (``[B, Hk, Hq / Hk, D]``, the
    ``pack_gqa`` of transformers' SDPA integration): one attention without GQA, which PyTorch's CPU kernels run about
    40% faster than ``enable_gqa`` at decode shapes.
    """
    batch, query_heads, _, head_dim = q.shape
    packed = q.reshape(batch, k.shape[1], query_heads // k.shape[1], head_dim)  # [B, Hk, Hq / Hk, D]
    out = F.scaled_dot_product_attention(packed, k, v, scale=softmax_scale)
    return out.view(batch, query_heads, 1, head_dim)  # the rows of kv head h are query heads h*g .. h*g+g-1


def _varlen_visibility(cu_seqlens: torch.Tensor, num_tokens: int, causal: bool) -> torch.Tensor:
    """``[T, T]`` bool: token i may attend to token j (same sequence, and j <= i when causal)."""
    sequence = rotary.sequence_of_token(cu_seqlens, num_tokens)
    visible = sequence[:, None] == sequence[None, :]
    if causal:
        visible = visible & torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=cu_seqlens.device).tril()
    return visible


def _attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its fp32 log-sum-exp on rotated ``[B, H, L, D]`` inputs, by blocks of queries.

    SDPA does not return the log-sum-exp, so the scores are formed here, at most ``_LSE_QUERY_BLOCK`` queries at a
    time. ``visible`` ``[L, L]`` replaces the causal mask when given. A query that sees no key gets 0 and -inf.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    groups = q.shape[1] // k.shape[1]
    k = k.to(compute).repeat_interleave(groups, dim=1)  # GQA: kv head h serves q heads h*g .. h*g+g-1
    v = v.to(compute).repeat_interleave(groups, dim=1)
    num_queries, num_keys = q.shape[2], k.shape[2]
    if visible is None and causal:
        visible = torch.ones(num_queries, num_keys, dtype=torch.bool, device=q.device).tril()
    outputs, lses = [], []
    for first in range(0, num_queries, _LSE_QUERY_BLOCK):
        block = slice(first, min(first + _LSE_QUERY_BLOCK, num_queries))
        scores = torch.einsum("bhqd,bhkd->bhqk", q[:, :, block].to(compute), k) * scale  # [B, H, block, L]
        if visible is not None:
            scores = scores.masked_fill(~visible[block], float("-inf"))
        lse = scores.logsumexp(dim=-1)  # [B, H, block]
        weights = (scores - lse.nan_to_num(neginf=0.0)[..., None]).exp()  # rows that see nothing stay 0
        outputs.append(torch.einsum("bhqk,bhkd->bhqd", weights, v))
        lses.append(lse)
    return torch.cat(outputs, dim=2).to(q.dtype), torch.cat(lses, dim=2).float()


def _gather_pages(call: DecodeCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A paged call's caches as dense ``[B, Hk, blocks * block_size, D]`` ones, and the sequences (``[B]`` bool, None
    when none) that read a block id outside ``[0, num_blocks)`` (possible only where values go unchecked): such an id
    is never read through (block 0 is read instead) and its sequence's output rows are made NaN.

    The blocks a sequence reads are its first ``ceil(length / block_size)``, length clamped into ``[n, capacity]``
    as the dense path clamps it; where values are on the host only the table's columns some sequence reads are
    gathered.
    """
    block_table, seqlens = call.block_table, call.cache_seqlens
    block_size, num_blocks = call.block_size, call.num_blocks
    lengths = seqlens.clamp(call.num_new, call.capacity)
    if validation.reads_values(seqlens) and validation.reads_values(block_table):
        used = -(-int(lengths.max()) // block_size) if call.batch else 0
        block_table = block_table[:, :used]
    ids = block_table.long()
    reads = torch.arange(ids.shape[1], device=ids.device)[None, :] < (lengths[:, None] + block_size - 1) // block_size
    outside = (ids < 0) | (ids >= num_blocks)
    bad = (outside & reads).any(dim=1)  # [B]
    ids = ids.masked_fill(outside, 0)
    if validation.reads_values(bad):
        bad = bad if bool(bad.any()) else None

    def gather(cache: torch.Tensor) -> torch.Tensor:
        # [num_blocks, bs, Hk, D] -> [B, blocks, bs, Hk, D] -> [B, blocks * bs, Hk, D] -> [B, Hk, blocks * bs, D]
        return cache[ids].flatten(1, 2).transpose(1, 2)

    return gather(call.k_cache), gather(call.v_cache), bad


class TorchBackend:
    NAME = "torch"

    def is_available(self, device: torch.device | None = None) -> tuple[bool, str]:
        return True, ""

    def supports(self, spec: CallSpec) -> tuple[bool, str]:
        return True, ""

    def apply_rope(self, call: RopeCall) -> tuple[torch.Tensor, torch.Tensor]:
        return _rotate_qk(call.q, call.k, call.table, call.position_ids, call.long, call.cu_seqlens, call.batch)

    def rope_attention(self, call: AttentionCall) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        q, k = _rotate_qk(call.q, call.k, call.table, call.position_ids, call.long, call.cu_seqlens, call.batch)
        v, causal, scale = call.v, call.causal, call.softmax_scale
        if call.cu_seqlens is None:
            if call.return_lse:
                return _attention_with_lse(q, k, v, None, causal, scale)
            return _sdpa(q, k, v, causal, scale)
        # Varlen [T, H, D]: one batch of T tokens, attention kept within each sequence.
        q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, T, D]
        num_tokens = q.shape[2]
        if call.return_lse:
            visible = _varlen_visibility(call.cu_seqlens, num_tokens, causal)
            out, lse = _attention_with_lse(q, k, v, visible, causal, scale)
            return out[0].transpose(0, 1), lse[0]  # [T, Hq, D], [Hq, T]
        if validation.reads_values(call.cu_seqlens):
            # Bounds known on the host: SDPA per sequence, O(len^2) memory per sequence instead of O(T^2).
            bounds = call.cu_seqlens.tolist()
            pieces = [
                _sdpa(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], causal, scale)
                for start, end in zip(bounds[:-1], bounds[1:])
            ]
            out = torch.cat(pieces, dim=2)
        else:
            visible = _varlen_visibility(call.cu_seqlens, num_tokens, causal)
            out = _sdpa(q, k, v, False, scale, attn_mask=visible)
        return out[0].transpose(0, 1)

    def rope_decode(self, call: DecodeCall) -> torch.Tensor:
        if call.paged:
            # Paged caches: gather each sequence's blocks into a dense cache, then the dense path.
            k_cache, v_cache, bad_blocks = _gather_pages(call)
            out = self.rope_decode(dataclasses.replace(call, k_cache=k_cache, v_cache=v_cache, block_table=None))
            if bad_blocks is None:
                return out
            return out.masked_fill(bad_blocks[:, None, None, None], float("nan"))
        table, q, seqlens = call.table, call.q, call.cache_seqlens
        k_cache, v_cache, n_new, capacity = call.k_cache, call.v_cache, call.num_new, call.capacity
        if call.batch == 0:
            return q.new_empty(q.shape)  # no sequence: nothing to attend
        # A length outside [n_new, capacity] (possible only where values go unchecked) is computed as if clamped
        # into it, never read past the cache, and its sequence's output rows are NaN (as the kernels do).
        if validation.reads_values(seqlens):
            given = seqlens.tolist()
            lengths = [min(max(n, n_new), capacity) for n in given]
            invalid = [n != m for n, m in zip(given, lengths)]
            if any(invalid):
                seqlens = torch.tensor(lengths, dtype=seqlens.dtype, device=seqlens.device)
            max_len = max(lengths)  # slots past every sequence's length are never read
            k_cache, v_cache = k_cache[:, :, :max_len], v_cache[:, :, :max_len]
            long_flags = [table.use_long(n) for n in lengths]
            if all(flag == long_flags[0] for flag in long_flags):  # one table: the shared cached prefix
                cos, sin = (c.to(q.dtype)[None] for c in table._cos_sin_prefix(long_flags[0], max_len, q.device))
            else:
                is_long = torch.tensor(long_flags, device=q.device)[:, None]  # [B, 1]
                cos, sin = rotary.token_cos_sin(table, torch.arange(max_len, device=q.device), is_long, q.dtype)
            every_slot_valid = all(n == max_len for n in lengths)
            invalid = torch.tensor(invalid, device=q.device) if any(invalid) else None
        else:
            max_len = capacity
            invalid = (seqlens < n_new) | (seqlens > capacity)  # [B]
            seqlens = seqlens.clamp(n_new, capacity)
            is_long = (seqlens > table.original_max_position)[:, None]  # [B, 1]: each sequence by its length
            cos, sin = rotary.token_cos_sin(table, torch.arange(max_len, device=q.device), is_long, q.dtype)
            every_slot_valid = False
        out = self._decode(q, k_cache, v_cache, seqlens, cos, sin, every_slot_valid, n_new, call.softmax_scale)
        if invalid is None:
            return out
        return out.masked_fill(invalid[:, None, None, None], float("nan"))

    @staticmethod
    def _decode(q, k_cache, v_cache, seqlens, cos, sin, every_slot_valid: bool, n_new: int, softmax_scale: float):
        """rope_decode on caches of ``max_len = cos.shape[1]`` slots and lengths in [n_new, max_len]; cos/sin:
        ``[1 or B, max_len, rotary_dim]``."""
        max_len = cos.shape[1]
        k_rot = rotary.rotate(k_cache, cos[:, None], sin[:, None])  # [B, Hk, max_len, D]
        q_positions = seqlens[:, None].long() - n_new + torch.arange(n_new, device=q.device)  # [B, n]
        gather_index = q_positions[..., None].expand(-1, -1, cos.shape[-1])  # [B, n, rotary_dim]
        cos_q = cos.expand(q.shape[0], -1, -1).gather(1, gather_index)[:, None]  # [B, 1, n, rotary_dim]
        sin_q = sin.expand(q.shape[0], -1, -1).gather(1, gather_index)[:, None]
        q_rot = rotary.rotate(q, cos_q, sin_q)  # [B, Hq, n, D]
        if every_slot_valid and n_new == 1:
            return one_query_attention(q_rot, k_rot, v_cache, softmax_scale)  # every key visible: no mask
        key_positions = torch.arange(max_len, device=q.device)
        visible = key_positions[None, None, :] <= q_positions[:, :, None]  # [B, n, max_len]
        if not every_slot_valid:
            # Unwritten cache slots may hold anything (torch.empty): zero them so that NaN garbage cannot leak
            # through the masked product (0 * NaN = NaN).
            valid = (key_positions[None, :] < seqlens[:, None])[:, None, :, None]  # [B, 1, max_len, 1]
            k_rot = torch.where(valid, k_rot, 0.0)
            v_cache = torch.where(valid, v_cache, 0.0)
        return _sdpa(q_rot, k_rot, v_cache, False, softmax_scale, attn_mask=visible[:, None])

    def rerotate(self, call: RerotateCall) -> torch.Tensor:
        # One rotation by (theta_to - theta_from) scaled by a_to / a_from, from the fp32 scaled cos/sin of both
        # tables: cos' = (C_t C_f + S_t S_f) / a_f^2, sin' = (S_t C_f - C_t S_f) / a_f^2.
        table, k = call.table, call.k
        compute = torch.float64 if k.dtype == torch.float64 else torch.float32
        cos_from, sin_from = rotary.token_cos_sin(table, call.position_ids, call.from_long, compute)
        cos_to, sin_to = rotary.token_cos_sin(table, call.position_ids, call.to_long, compute)
        inv_sq = 1.0 / table.attention_factor_for(call.from_long) ** 2
        cos = (cos_to * cos_from + sin_to * sin_from) * inv_sq
        sin = (sin_to * cos_from - cos_to * sin_from) * inv_sq
        cos, sin = _over_heads(cos, call.varlen), _over_heads(sin, call.varlen)
        return rotary.rotate(k.to(compute), cos, sin).to(k.dtype)


BACKEND = TorchBackend()
