"""A ``DynamicLayer`` that appends a decode step's keys and values in place, for the CPU rotated-key path.

transformers' ``DynamicLayer.update`` concatenates: every step writes a new ``[B, Hk, T, D]`` key tensor and value
tensor, a full pass over the layer's cache. Stock pays it too, but stock's attention then reads the keys its ``cat``
has just written (in cache); a patched CPU decode reads its rotated-key copy instead (:mod:`~.rotated_keys`), whose
rows were last touched a step ago, so on top of the same copies it pays one more cold read of the keys per layer
(measured: 3-4% slower than stock per step at 500-2000 cached tokens on SmolLM2). This class removes the copies:
the layer keeps its PRE-RoPE keys and values in buffers with growth room and a step writes only its new rows.
``layer.keys`` / ``layer.values`` are then ``[B, Hk, T, D]`` views of the first T rows (the same numbers ``cat``
gives; their rows are never written again, growth only writes rows past T).

Where: only where the patch keeps a rotated-key copy (the torch backend on a plain ``DynamicLayer``):
:func:`lr2kernels.hf.rotated_keys.rotate_for_decode` sets the class of each layer it serves to
:class:`AppendingDynamicLayer` (a subclass: ``isinstance(layer, DynamicLayer)`` holds and every other method is
transformers'). The GPU kernel backends keep no copy and leave the layers as they are.

When in place, and when not. A layer appends in place only while its ``keys`` and ``values`` are the very views it
last handed out and the new rows fit the buffers (same dtype, device, batch, heads, head size; no autograd history;
no inference tensors). Anything that replaces them (``crop``, ``reorder_cache``, ``batch_select_indices``,
``batch_repeat_interleave``, ``reset``, ``offload`` to another device, a user's assignment) makes the next update
start new buffers (one copy, as ``cat`` makes), or run transformers' own ``update`` where they cannot be used. An
in-place edit of ``layer.keys`` changes rows the buffer holds, so appending after it is still the concatenation.
Views are only ever prefixes of the buffer, and a step writes past the current length, so no tensor anyone holds
changes. A shallow copy of a layer shares its buffers and views: the first of the two to append moves on, and the
other, whose views are then no longer the buffers' latest, starts its own. Pickling or deep-copying a layer gives a
plain ``DynamicLayer`` (with the buffers' storage: the growth room travels along).

Cost: the growth room (at least 256 rows, or a quarter of the length) on keys and values; ``unpatch`` leaves a live
cache's layers appending in place (the same numbers).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from lr2kernels.hf.rotated_keys import growth_capacity

_ROOM = "_lr2_kv_room"  # on an AppendingDynamicLayer: its _Room


class _Room:
    """The buffers ``[B, Hk, capacity, D]`` that one layer's keys and values are views of, and those views."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor) -> None:
        self.key_buffer, self.value_buffer = key_buffer, value_buffer
        self.keys: torch.Tensor | None = None  # the views last handed to the layer
        self.values: torch.Tensor | None = None


def _plain(*tensors: Any) -> bool:
    """Tensors that may be written in place and read back as ``cat`` would: no autograd history to keep, and no
    inference tensors (they cannot be written outside ``torch.inference_mode``)."""
    return all(isinstance(t, torch.Tensor) and not t.requires_grad and not t.is_inference() for t in tensors)


def _fits(rows: torch.Tensor, cached: torch.Tensor) -> bool:
    """``rows`` ``[B, Hk, n, D]`` can be appended to ``cached`` ``[B, Hk, T, D]`` without type promotion."""
    return (
        rows.dim() == 4 == cached.dim()
        and rows.dtype == cached.dtype
        and rows.device == cached.device
        and rows.shape[:2] == cached.shape[:2]
        and rows.shape[3] == cached.shape[3]
    )


def _grown(cached: torch.Tensor, rows: torch.Tensor, capacity: int) -> torch.Tensor:
    """A new ``[B, Hk, capacity, D]`` buffer holding ``cached`` then ``rows``."""
    batch, heads, length, head_dim = cached.shape
    buffer = cached.new_empty(batch, heads, capacity, head_dim)
    buffer[:, :, :length].copy_(cached)
    buffer[:, :, length : length + rows.shape[2]].copy_(rows)
    return buffer


class AppendingDynamicLayer(DynamicLayer):
    """transformers' ``DynamicLayer``, whose ``update`` writes the new rows into buffers with growth room instead of
    concatenating (see the module docstring). Only a patched model's CPU rotated-key path makes one."""

    _layer_type = None  # never entered in transformers' layer-type mappings (CacheLayerMixin.__init_subclass__)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``DynamicLayer.update``: the cached keys and values followed by ``key_states`` / ``value_states``
        ``[B, Hk, n, D]``, returned as ``(keys, values)`` ``[B, Hk, T, D]``, which become the layer's."""
        keys, values = getattr(self, "keys", None), getattr(self, "values", None)
        usable = (
            self.is_initialized
            and not torch.is_inference_mode_enabled()
            and _plain(keys, values, key_states, value_states)
            and _fits(key_states, keys)
            and _fits(value_states, values)
            and keys.shape[2] == values.shape[2]
            and key_states.shape[2] == value_states.shape[2]
        )
        if not usable or keys.shape[2] == 0:
            self.__dict__.pop(_ROOM, None)
            return super().update(key_states, value_states, *args, **kwargs)
        room: _Room | None = self.__dict__.get(_ROOM)
        length, total = keys.shape[2], keys.shape[2] + key_states.shape[2]
        if room is None or room.keys is not keys or room.values is not values:
            # Not the views this layer's buffers gave (replaced, or the first step): new buffers, one copy.
            capacity = growth_capacity(total)
            room = _Room(_grown(keys, key_states, capacity), _grown(values, value_states, capacity))
            self.__dict__[_ROOM] = room
        elif total > room.key_buffer.shape[2]:
            capacity = growth_capacity(total)
            room.key_buffer = _grown(keys, key_states, capacity)
            room.value_buffer = _grown(values, value_states, capacity)
        else:
            room.key_buffer[:, :, length:total].copy_(key_states)
            room.value_buffer[:, :, length:total].copy_(value_states)
        self.keys = room.keys = room.key_buffer.narrow(2, 0, total)  # [B, Hk, T, D]
        self.values = room.values = room.value_buffer.narrow(2, 0, total)
        return self.keys, self.values

    def __reduce_ex__(self, protocol):
        # A copy (pickle, deepcopy) is a plain DynamicLayer without the buffers' bookkeeping: it concatenates until a
        # patched CPU decode makes it append again; its keys are still views of the copied storage.
        state = {name: value for name, value in vars(self).items() if name != _ROOM}
        return _plain_layer, (), state


def _plain_layer() -> DynamicLayer:
    """An empty ``DynamicLayer`` for a copy's state (set by pickle / deepcopy, as for any object)."""
    return DynamicLayer.__new__(DynamicLayer)
