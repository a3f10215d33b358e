"""A rotated copy of each cached layer's keys, so that a decode step on the torch backend rotates only its new keys.

A patched model caches PRE-RoPE keys. The fused GPU kernels rotate them in registers as they read them, which is
free in a memory-bound kernel; the torch backend (the CPU path) has no such kernel and would rotate the whole cache
again at every step: a full pass over the keys per layer per token, the largest cost of a CPU decode step. So, on
that path only, each ``DynamicLayer`` of the cache keeps a :class:`RotatedKeys`: the same keys rotated with the table
in use, extended by the new rows at every step. Its rows are computed by exactly the same elementwise ops as the
whole-cache rotation (the same fp32 cos/sin rows, cast the same way), so the attention is bit-identical.

A stale copy would be silently wrong, so it is trusted only while the layer's key tensor is provably the one it
mirrors. Between forwards, transformers and users change a cache by replacing its tensors (beam reorders, ``crop``,
``reset``, ``batch_repeat_interleave``) or by writing into them (``reset`` on some layers, user edits; any in-place
write, also through a view, bumps the tensor's version counter). :func:`carry_over` runs at the start of every
forward of a patched model, before any layer appends to the cache: a layer whose key tensor is not the very object,
at the very version, that its copy was last synchronised with loses the copy (it is rebuilt from the cache, one full
rotation). During the forward the layer's own ``DynamicLayer.update`` appends the new keys, and only those rows are
rotated. Tensors created under ``torch.inference_mode`` have no version counter, so they get no copy.

The cost is memory: the copy is one more key tensor per layer (+50% of the KV cache, plus up to 25% growth room).
``patch(model, rotated_key_cache=False)`` turns it off.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from lr2kernels.ops import rotary
from lr2kernels.tables import RopeTable

ATTRIBUTE = "_lr2_rotated_keys"
# Growth room when the copy's buffer is full: at least this many rows, or a quarter of the length.
_MIN_GROWTH_ROWS = 256


class RotatedKeys:
    """Rotated keys of one cache layer: ``buffer[:, :, :rows]`` ``[B, Hk, rows, D]`` are the layer's keys rows
    ``0..rows-1`` rotated with the table in ``signature``, cast as the torch backend casts."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.capacity = 0  # rows the buffer has room for
        self.rows = 0
        # (table, long, dtype, device, batch, kv heads, head_dim) of the keys in the buffer
        self.signature: tuple | None = None
        self.source: weakref.ref | None = None  # the key tensor the copy mirrors, while it lives
        self.version = -1  # that tensor's version counter when the copy was synchronised
        self.carried = 0  # rows still valid at the start of this forward (set by carry_over, used once)

    def __reduce__(self):
        # Pickling or deep-copying a cache starts its copies afresh: the weak reference cannot travel, and a copied
        # cache holds other tensors than the ones this copy mirrors.
        return (RotatedKeys, ())

    def mirrors(self, keys: Any) -> bool:
        """Whether ``keys`` is the very tensor, unchanged, that the copy was last synchronised with."""
        if self.source is None or not isinstance(keys, torch.Tensor) or keys.is_inference():
            return False  # a reset layer holds None; an inference tensor has no version counter
        return self.source() is keys and keys._version == self.version


def carry_over(cache: Any) -> None:
    """At the start of a forward (before any layer appends): keep each layer's copy only if its key tensor is still
    the one the copy mirrors. Cheap: an identity and a version check per layer, no tensor is read."""
    for layer in getattr(cache, "layers", ()):
        copy = layer.__dict__.get(ATTRIBUTE)
        if copy is not None:
            copy.carried = copy.rows if copy.mirrors(getattr(layer, "keys", None)) else 0
            copy.source = None  # from here on only `carried` vouches for the rows: once, for the next append


def usable_layer(cache: Any, layer_idx: int | None, keys: torch.Tensor) -> Any:
    """The cache layer whose keys ``keys`` are, when a copy can be kept for it; None otherwise.

    Only transformers' plain ``DynamicLayer`` or the :class:`~lr2kernels.hf.appending_layer.AppendingDynamicLayer`
    this module makes of one (exact types: their ``update`` appends and returns the layer's own tensor), and only
    tensors with a version counter and no autograd history to keep.
    """
    if cache is None or layer_idx is None or keys.requires_grad or keys.is_inference():
        return None
    layers = getattr(cache, "layers", None)
    if layers is None or not 0 <= layer_idx < len(layers):
        return None
    layer = layers[layer_idx]
    return layer if type(layer) in _dynamic_layer_classes() and layer.keys is keys else None


def _dynamic_layer_classes() -> tuple[type, type]:
    global _DYNAMIC_LAYERS
    if _DYNAMIC_LAYERS is None:
        from transformers.cache_utils import DynamicLayer

        from lr2kernels.hf.appending_layer import AppendingDynamicLayer

        _DYNAMIC_LAYERS = (DynamicLayer, AppendingDynamicLayer)
    return _DYNAMIC_LAYERS


# transformers' DynamicLayer and its in-place appending subclass, imported on first use (never at package import)
_DYNAMIC_LAYERS: tuple[type, type] | None = None


def rotate_for_decode(
    layer: Any,
    query: torch.Tensor,
    keys: torch.Tensor,
    table: RopeTable,
    long: bool,
    new_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The n newest queries and the layer's keys at positions ``0..T-1``, rotated with the ``long`` or short table.

    Args:
        layer: the cache layer ``keys`` belong to (see :func:`usable_layer`).
        query: ``[B, Hq, n, D]`` PRE-RoPE, at positions ``T-n..T-1``.
        keys: ``[B, Hk, T, D]`` the layer's PRE-RoPE keys, the n newest just appended.
        new_rows: cos, sin ``[n, rotary_dim]`` of positions ``T-n..T-1`` in the keys' dtype (the table's fp32 rows,
            cast), and :func:`lr2kernels.ops.rotary.signed_sin` of sin where the rotation covers all of D, else None.

    Returns:
        ``(query [B, Hq, n, D], keys [B, Hk, T, D])`` rotated; the keys are a view of the layer's copy, of which only
        the rows not rotated before are computed (the new ones, in the same pass as the queries).
    """
    copy = layer.__dict__.get(ATTRIBUTE)
    if copy is None:
        copy = layer.__dict__[ATTRIBUTE] = RotatedKeys()
    plain, appending = _dynamic_layer_classes()
    if type(layer) is plain:
        # From its next update on, the layer appends its PRE-RoPE keys and values in place instead of concatenating:
        # a step then reads its cache once, in the attention (lr2kernels.hf.appending_layer says why and when).
        layer.__class__ = appending
    num_new, query_heads = query.shape[2], query.shape[1]
    batch, kv_heads, total, head_dim = keys.shape
    signature = (table, long, keys.dtype, keys.device, batch, kv_heads, head_dim)
    valid = 0
    if copy.signature == signature:
        if copy.mirrors(keys):  # the same tensor again within a forward (both tables of a crossing chunk)
            valid = copy.rows
        elif 0 < copy.carried == total - num_new:  # carried over from the last forward; the new rows appended
            valid = copy.carried
    copy.carried = 0
    if copy.capacity < total or not valid:
        same_layout = copy.signature is not None and copy.signature[2:] == signature[2:]  # dtype .. head_dim
        _reallocate(copy, keys, valid, total, same_layout)
    cos, sin, sin_signed = new_rows
    rows = copy.buffer.narrow(2, valid, total - valid)  # [B, Hk, T - valid, D]: the rows to compute
    if valid == total - num_new:  # the usual step: the new keys share the queries' positions, so one pass for both
        both = torch.cat((query, keys.narrow(2, valid, num_new)), dim=1)  # [B, Hq + Hk, n, D]
        if sin_signed is not None:
            both = rotary.rotate_full_width(both, cos, sin_signed)
        else:
            both = rotary.rotate(both, cos, sin)
        rows.copy_(both.narrow(1, query_heads, kv_heads))
        query = both.narrow(1, 0, query_heads)
    else:
        # The rows of the whole-cache rotation, by the same elementwise ops (bit-identical to rotating it whole).
        cos_all, sin_all = table._cos_sin_prefix(long, total, keys.device)  # [T, rotary_dim] fp32
        rows.copy_(rotary.rotate(keys[:, :, valid:], cos_all[valid:].to(keys.dtype), sin_all[valid:].to(keys.dtype)))
        query = rotary.rotate(query, cos, sin)
    copy.signature, copy.rows = signature, total
    copy.source, copy.version = weakref.ref(keys), keys._version
    return query, copy.buffer.narrow(2, 0, total)


def growth_capacity(total: int) -> int:
    """Rows to allocate when a cache-side buffer must hold ``total`` rows: room to grow by at least
    ``_MIN_GROWTH_ROWS`` rows or a quarter of the length, so that appends copy the buffer O(log T) times, not each
    step (also the rule of :mod:`~lr2kernels.hf.appending_layer`'s key/value buffers)."""
    return max(total + _MIN_GROWTH_ROWS, total + total // 4)


def _reallocate(copy: RotatedKeys, keys: torch.Tensor, valid: int, total: int, same_layout: bool) -> None:
    """Give ``copy`` a buffer for keys like ``keys`` with room for ``total`` rows, keeping its first ``valid`` rows:
    the current buffer when it has the layout (dtype, device, batch, heads, head_dim) and room (and is not far larger
    than a rebuild needs), else one grown by a quarter."""
    if same_layout and total <= copy.capacity <= 2 * total + _MIN_GROWTH_ROWS:
        return
    batch, heads, _, head_dim = keys.shape
    capacity = growth_capacity(total)
    grown = keys.new_empty(batch, heads, capacity, head_dim)  # [B, Hk, capacity, D]
    if valid:
        grown[:, :, :valid] = copy.buffer[:, :, :valid]
    copy.buffer, copy.capacity = grown, capacity
