"""Backend-neutral preparation of a call: which table each sequence uses, its frequencies, and the torch rotation.

Every function here runs on the tensors' device without reading their values on the host (no ``.item()``,
``.tolist()``, ``int(tensor)``), so a patched model stays free of host syncs, CUDA graphs can capture it and
``torch.compile`` traces it without graph breaks. The fused backends take the per-sequence flags and the frequency
pair from here; the torch backend also takes its cos/sin and rotation from here.

Angles are HF's: ``float32(position) * inv_freq`` rounded once in fp32, cos/sin multiplied by the attention factor
of the table in use, so the torch backend reproduces transformers' RoPE bit for bit.
"""

from __future__ import annotations

import torch

from lr2kernels.tables import RopeTable


def inv_freq_pair(table: RopeTable, device: torch.device) -> torch.Tensor:
    """``[2, rotary_dim // 2]`` fp32 inverse frequencies on ``device``: row 0 the short table, row 1 the long one.

    Cached and shared (one tensor per table and device, never to be modified): no stack per call, and the Triton
    decode finds its angle table for these frequencies again (``decode._step_tables``)."""
    return table._inv_freq_pair(device)


def default_position_ids(num_tokens: int, device: torch.device, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """0..L-1 (dense, ``[L]``), or 0..len_i-1 for every sequence of a varlen batch of ``num_tokens`` (``[T]``)."""
    tokens = torch.arange(num_tokens, device=device)
    if cu_seqlens is None:
        return tokens
    return tokens - cu_seqlens[sequence_of_token(cu_seqlens, num_tokens)].long()


def sequence_of_token(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[T]`` int64: the index of the sequence each token of a varlen batch belongs to (empty sequences own none)."""
    tokens = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True)


def sequence_is_long(
    table: RopeTable,
    batch: int,
    seq_len: int,
    position_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    long: bool | None,
    device: torch.device,
) -> torch.Tensor:
    """``[batch]`` int32 flag per sequence (1: the long table), computed on the device.

    ``long`` forces a table for every sequence. Otherwise dense batches follow HF's rule for the whole batch
    (long iff max(position) + 1 > L0; ``seq_len`` is L) and each varlen sequence is decided by its own positions.
    """
    l0 = table.original_max_position
    if long is not None:
        return torch.full((batch,), int(long), dtype=torch.int32, device=device)
    if cu_seqlens is None:
        if position_ids is None:
            return torch.full((batch,), int(seq_len > l0), dtype=torch.int32, device=device)
        return (position_ids.max() + 1 > l0).to(torch.int32).expand(batch).contiguous()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if position_ids is None:
        return (lengths > l0).to(torch.int32)
    max_position = torch.full((batch,), -1, dtype=torch.long, device=device)
    max_position = max_position.scatter_reduce(
        0, sequence_of_token(cu_seqlens, position_ids.numel()), position_ids.long(), reduce="amax"
    )
    return (max_position + 1 > l0).to(torch.int32)


def token_cos_sin(
    table: RopeTable, position_ids: torch.Tensor, is_long: torch.Tensor | bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled cos/sin ``[..., rotary_dim]`` in ``dtype`` for integer positions ``[...]``.

    ``is_long``: a Python bool (one table), or a bool tensor broadcastable to ``position_ids`` choosing the table per
    token. The fp32 values equal :meth:`RopeTable.cos_sin`'s (and so transformers') bit for bit.
    """
    if isinstance(is_long, bool):
        inv_freq = table._inv_freq(is_long, position_ids.device)  # [half]
        factor: torch.Tensor | float = table.attention_factor_for(is_long)
    else:
        pair = inv_freq_pair(table, position_ids.device)
        is_long = is_long[..., None]
        inv_freq = torch.where(is_long, pair[1], pair[0])  # [..., half]: each token its table's frequencies
        factors = [table.attention_factor_for(False), table.attention_factor_for(True)]
        factor = torch.where(is_long, factors[1], factors[0]).float()
    angle = position_ids[..., None].float() * inv_freq  # [..., half], rounded once in fp32 as HF's
    angle = torch.cat((angle, angle), dim=-1)  # [..., rotary_dim]: both halves of a NeoX pair share it
    return (angle.cos() * factor).to(dtype), (angle.sin() * factor).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` channels of ``x`` (NeoX split-half pairs); the rest pass through.

    Per pair ``(x1, x2) -> (x1 c - x2 s, x2 c + x1 s)``, the roundings of HF's ``x * cos + rotate_half(x) * sin``, in
    one ``cat`` instead of HF's four passes over memory. ``cos``/``sin`` broadcast against ``x[..., :rotary_dim]``.
    """
    half = cos.shape[-1] // 2
    first, second, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    cos_half, sin_half = cos[..., :half], sin[..., :half]
    return torch.cat((first * cos_half - second * sin_half, second * cos_half + first * sin_half, rest), dim=-1)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` ``[..., rotary_dim]`` (both halves equal, HF layout) -> ``[-sin, sin]`` halves, for
    :func:`rotate_full_width`."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate_full_width(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """:func:`rotate` for a rotation over all of x's channels (``cos.shape[-1] == x.shape[-1]``), in four passes
    instead of seven, for small tensors where each pass costs a launch: ``x * cos + roll(x, D / 2) * sin_signed``
    with ``sin_signed`` from :func:`signed_sin`.

    Bit-identical to :func:`rotate`: per pair, ``x1 * c + x2 * (-s)`` rounds ``x2 * s`` as rotate does and negates
    it exactly, and ``a + (-b)`` is ``a - b`` in IEEE arithmetic; ``x2 * c + x1 * s`` is rotate's own sum.
    """
    swapped = torch.roll(x, x.shape[-1] // 2, dims=-1)  # (x2, x1): the halves swapped, in one pass
    return x * cos + swapped * sin_signed
