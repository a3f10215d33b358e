"""The attention function a patched model runs: RoPE applied at attention time, on PRE-RoPE q and keys.

It is registered in transformers' ``AttentionInterface`` under :data:`ATTENTION_NAME`. A patched model's rotary
module returns the identity rotation (cos 1, sin 0), so its attention layers hand this function PRE-RoPE queries and
store PRE-RoPE keys in the KV cache; this function rotates both with the table the whole sequence needs now. That
is why crossing L0 during generation costs nothing: the next step simply rotates with the long table.

Which table: by default HF's rule, for the whole batch: long iff max(position_ids) + 1 > L0, i.e. what a full
forward over the sequence so far would use; or, with ``patch(model, rule="position")``, each token by its own
position (see :func:`rope_attention_forward`). Fast paths: no mask (causal, no padding) -> the fused
``rope_attention`` (prefill, training) or ``rope_decode`` (cached steps). Anything else (padding masks, sliding
windows, dropout, static caches) -> rotate with the table, then transformers' own SDPA attention with its mask.
"""

from __future__ import annotations

import torch

from lr2kernels.ops import rope_attention, rope_decode, rotary
from lr2kernels.tables import RopeTable

ATTENTION_NAME = "lr2kernels"


def _key_positions(position_ids: torch.Tensor, num_keys: int) -> torch.Tensor:
    """``[B, T]`` positions of the cached keys, from the queries' positions ``[B, L]``.

    The newest query sits at cache index T - 1; a row whose position there is lower (left padding) is shifted by
    the difference. Padding slots get negative positions, clamped to 0: the mask hides them anyway.
    """
    offset = (num_keys - 1) - position_ids[:, -1:]  # [B, 1]
    return (torch.arange(num_keys, device=position_ids.device)[None, :] - offset).clamp_min(0)


def _rotate(x: torch.Tensor, table: RopeTable, positions: torch.Tensor, long: bool) -> torch.Tensor:
    cos, sin = rotary.token_cos_sin(table, positions, long, x.dtype)  # [B, L, rotary_dim]
    return rotary.rotate(x, cos[:, None], sin[:, None])


class ForwardFacts:
    """What every layer of one forward needs to know about its positions, read from the device ONCE per forward.

    All attention layers of a forward receive the same ``position_ids`` tensor, so the first layer reads
    (max position, min position, whether every row's newest key sits at index T - 1) in one device-to-host copy
    and the other layers reuse it. A new tensor, or the same one modified in place, is a new forward.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._positions: torch.Tensor | None = None  # held so that its id cannot be reused while remembered
        self.max_position = self.min_position = 0
        self.keys_at_arange = False

    @classmethod
    def of_arange(cls, first: int, end: int) -> ForwardFacts:
        facts = cls()
        facts.min_position, facts.max_position, facts.keys_at_arange = first, end - 1, True
        return facts

    def update(self, position_ids: torch.Tensor, num_keys: int) -> ForwardFacts:
        key = (id(position_ids), position_ids._version, num_keys)
        if key != self._key or self._positions is not position_ids:
            newest_at_end = (position_ids[:, -1] == num_keys - 1).all()
            facts = torch.stack([position_ids.max(), position_ids.min(), newest_at_end.to(position_ids.dtype)])
            self.max_position, self.min_position, keys_at_arange = facts.tolist()  # the one host sync
            self.keys_at_arange = bool(keys_at_arange)
            self._key, self._positions = key, position_ids
        return self


def _attend(
    module, query, key, value, attention_mask, scaling, dropout, sliding_window, position_ids, facts, long, kwargs
):
    """Attention with every query and key rotated with one table (``long``): fused when the call allows it."""
    table: RopeTable = module._lr2_table
    backend: str | None = module._lr2_backend
    batch, _, num_queries, _ = query.shape
    num_keys = key.shape[2]
    plain = (
        attention_mask is None
        and (dropout == 0.0 or not module.training)
        and (sliding_window is None or sliding_window >= num_keys)
        and facts.keys_at_arange  # keys sit at 0..T-1
        and getattr(module, "is_causal", True)
    )
    if plain and num_queries == num_keys:
        out = rope_attention(
            query, key, value, table, position_ids=position_ids, softmax_scale=scaling, long=long, backend=backend
        )
        return out.transpose(1, 2)
    if plain and long == table.use_long(num_keys):  # rope_decode picks the table from the length itself
        cache_seqlens = torch.full((batch,), num_keys, dtype=torch.int32, device=query.device)
        out = rope_decode(query, key, value, table, cache_seqlens=cache_seqlens, softmax_scale=scaling, backend=backend)
        return out.transpose(1, 2)

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query = _rotate(query, table, position_ids, long)
    key = _rotate(key, table, _key_positions(position_ids, num_keys), long)
    out, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, sliding_window=sliding_window,
        position_ids=position_ids, **kwargs,
    )  # fmt: skip
    return out


def rope_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface signature. query ``[B, Hq, L, D]``, key/value ``[B, Hk, T, D]`` (pre-RoPE,
    T = cached + new). Returns ``([B, L, Hq, D], None)``.

    The table follows the patch's rule: ``"hf"``: one table for the whole batch, long iff max(position) + 1 > L0;
    ``"position"``: each query token uses the table of its own position (long iff position + 1 > L0), with every
    key it sees rotated the same way, so a full forward computes each token exactly as incremental decoding does.
    """
    table: RopeTable = module._lr2_table
    batch, _, num_queries, _ = query.shape
    num_keys = key.shape[2]
    position_ids = kwargs.pop("position_ids", None)
    if position_ids is None:  # the newest tokens, right after the cache: known without reading the device
        position_ids = torch.arange(num_keys - num_queries, num_keys, device=query.device)[None]
        facts = ForwardFacts.of_arange(num_keys - num_queries, num_keys)
    else:
        facts = module._lr2_forward_facts.update(position_ids, num_keys)
    position_ids = position_ids.expand(batch, num_queries)
    args = (module, query, key, value, attention_mask, scaling, dropout, sliding_window, position_ids, facts)
    if module._lr2_rule == "hf":
        return _attend(*args, table.use_long(facts.max_position + 1), kwargs), None
    if table.use_long(facts.min_position + 1) or not table.use_long(facts.max_position + 1):
        return _attend(*args, table.use_long(facts.max_position + 1), kwargs), None  # one table for every query
    # Queries on both sides of L0 (a prefill or chunk that crosses it): both tables, then each row its own.
    row_is_long = position_ids + 1 > table.original_max_position  # [B, L]
    short, long = _attend(*args, False, kwargs), _attend(*args, True, kwargs)  # [B, L, Hq, D]
    return torch.where(row_is_long[:, :, None, None], long, short), None
