"""Input checks of the public ops; each error names the argument, what was given and what was expected.

Two kinds of check:
- metadata checks (types, dtypes, devices, ranks, shapes) always run: they cost no device work;
- value checks (``cu_seqlens`` offsets, ``cache_seqlens`` range, ``max_seqlen`` bound) need the data on the host.
  They run where reading it costs no device sync (CPU tensors, outside ``torch.compile``), and on device tensors
  only when asked for (``set_value_checks("always")`` or ``LR2KERNELS_CHECK_VALUES=always``), because a read there
  stalls the GPU and breaks CUDA graph capture. ``"never"`` skips them everywhere.

:func:`set_host_reads` ``("never")`` makes the package treat every tensor as a GPU one (no value checks unless
``"always"``, no host fast paths of the torch backend): a CPU run then takes the paths, and makes the host reads, that
a GPU run would.

The ``check_*_call`` functions return the typed call description (:mod:`lr2kernels.ops.calls`) a backend runs.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

from lr2kernels.ops.calls import AttentionCall, DecodeCall, RerotateCall, RopeCall
from lr2kernels.tables import MAX_POSITION, RopeTable

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
VALUE_CHECK_MODES = ("auto", "always", "never")
_value_checks = os.environ.get("LR2KERNELS_CHECK_VALUES", "auto")


def set_value_checks(mode: str) -> str:
    """Choose when the value checks run: ``"auto"`` (default: host tensors only), ``"always"`` (device tensors too:
    one device-to-host copy per checked tensor; for debugging) or ``"never"``. Returns the previous mode."""
    global _value_checks
    if mode not in VALUE_CHECK_MODES:
        raise ValueError(f"mode: expected one of {list(VALUE_CHECK_MODES)}, got {mode!r}")
    previous, _value_checks = _value_checks, mode
    return previous


HOST_READ_MODES = ("auto", "never")
_host_reads = "auto"


def set_host_reads(mode: str) -> str:
    """Choose where the package may read tensor values on the host: ``"auto"`` (default: CPU tensors outside
    ``torch.compile``, where a read costs no device sync) or ``"never"`` (no tensor: a CPU run takes the GPU's code
    paths, to test or debug them without a GPU). Returns the previous mode."""
    global _host_reads
    if mode not in HOST_READ_MODES:
        raise ValueError(f"mode: expected one of {list(HOST_READ_MODES)}, got {mode!r}")
    previous, _host_reads = _host_reads, mode
    return previous


def reads_values(x: torch.Tensor) -> bool:
    """Whether the package may read ``x``'s values on the host: free for CPU tensors outside ``torch.compile``
    (never under ``set_host_reads("never")``). Also gates the torch backend's host fast paths."""
    if _host_reads == "never" or torch.compiler.is_compiling():
        return False
    return x.device.type == "cpu"


def _run_value_checks(x: torch.Tensor) -> bool:
    if _value_checks == "never" or torch.compiler.is_compiling():
        return False
    return _value_checks == "always" or reads_values(x)


def check_table(table: object) -> RopeTable:
    if not isinstance(table, RopeTable):
        raise TypeError(f"table: expected a lr2kernels.RopeTable, got {type(table).__name__}")
    return table


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.dtype != ref.dtype:
        raise ValueError(f"{name}: expected dtype {ref.dtype} (as {ref_name}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {x.device}")


def check_head_dim(name: str, x: torch.Tensor, table: RopeTable) -> None:
    if x.shape[-1] != table.head_dim:
        raise ValueError(
            f"{name}: expected head_dim = table.head_dim = {table.head_dim} (last dim), got {x.shape[-1]} "
            f"(shape {tuple(x.shape)})"
        )


def check_gqa(name: str, num_q_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"{name}: expected a number of heads dividing q's {num_q_heads}, got {num_kv_heads}")


def check_bool(name: str, flag: object, allow_none: bool = False) -> None:
    if allow_none and flag is None:
        return
    if not isinstance(flag, bool):
        expected = "True, False or None" if allow_none else "a bool"
        raise TypeError(f"{name}: expected {expected}, got {type(flag).__name__}")


def check_softmax_scale(softmax_scale: object, head_dim: int) -> float:
    """The scale to use: ``head_dim ** -0.5`` for None."""
    if softmax_scale is None:
        return head_dim**-0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    if not (softmax_scale > 0 and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale: expected a finite value > 0, got {softmax_scale}")
    return float(softmax_scale)


def check_cu_seqlens(cu_seqlens: object, total_tokens: int, device: torch.device) -> torch.Tensor:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected an int32/int64 torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens: expected a 1-D int32/int64 tensor [num_seqs + 1], got dtype {cu_seqlens.dtype} "
            f"shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens: expected device {device} (as q), got {cu_seqlens.device}")
    if _run_value_checks(cu_seqlens):
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or offsets[-1] != total_tokens:
            raise ValueError(
                f"cu_seqlens: expected offsets from 0 to total_tokens = {total_tokens}, got {offsets[0]} .. "
                f"{offsets[-1]}"
            )
        if any(b < a for a, b in zip(offsets[:-1], offsets[1:])):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {offsets}")
    return cu_seqlens


def check_position_ids(
    position_ids: object, varlen: bool, batch: int, seq_len: int, device: torch.device
) -> torch.Tensor | None:
    if position_ids is None:
        return None
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids: expected an integer torch.Tensor, got {type(position_ids).__name__}")
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids: expected an integer tensor, got dtype {position_ids.dtype}")
    if position_ids.device != device:
        raise ValueError(f"position_ids: expected device {device} (as q), got {position_ids.device}")
    expected = [(seq_len,)] if varlen else [(seq_len,), (batch, seq_len), (1, seq_len)]
    if tuple(position_ids.shape) not in expected:
        raise ValueError(
            f"position_ids: expected shape {' or '.join(str(list(s)) for s in expected)}, "
            f"got {list(position_ids.shape)}"
        )
    if position_ids.numel() and _run_value_checks(position_ids):
        largest = int(position_ids.max())
        if largest > MAX_POSITION:
            raise ValueError(
                f"position_ids: expected positions <= {MAX_POSITION} (int32 in the kernels), got {largest}"
            )
    return position_ids


def _check_qk(q: object, k: object, table: object, cu_seqlens: object, position_ids: object) -> dict:
    """Checks shared by apply_rope and rope_attention; returns the call fields they share."""
    table = check_table(table)
    q, k = check_tensor("q", q), check_tensor("k", k)
    check_same("k", k, "q", q)
    varlen = cu_seqlens is not None
    rank = 3 if varlen else 4
    layout = "[total_tokens, heads, head_dim] (varlen)" if varlen else "[batch, heads, seq, head_dim]"
    for name, x in (("q", q), ("k", k)):
        if x.dim() != rank:
            raise ValueError(f"{name}: expected a {rank}-D tensor {layout}, got shape {tuple(x.shape)}")
        check_head_dim(name, x, table)
    token_axis = 0 if varlen else 2
    if k.shape[token_axis] != q.shape[token_axis] or (not varlen and k.shape[0] != q.shape[0]):
        raise ValueError(f"k: expected the same batch and sequence sizes as q {tuple(q.shape)}, got {tuple(k.shape)}")
    check_gqa("k", q.shape[1], k.shape[1])
    if varlen:
        cu_seqlens = check_cu_seqlens(cu_seqlens, q.shape[0], q.device)
        batch, seq_len = cu_seqlens.numel() - 1, q.shape[0]
    else:
        batch, seq_len = q.shape[0], q.shape[2]
    position_ids = check_position_ids(position_ids, varlen, batch, seq_len, q.device)
    return dict(
        table=table, varlen=varlen, batch=batch, seq_len=seq_len, num_q_heads=q.shape[1], num_kv_heads=k.shape[1],
        head_dim=q.shape[-1], dtype=q.dtype, device=q.device, q=q, k=k, position_ids=position_ids,
        cu_seqlens=cu_seqlens,
    )  # fmt: skip


def check_rope_call(
    q: object, k: object, table: object, position_ids: object, long: object, cu_seqlens: object
) -> RopeCall:
    fields = _check_qk(q, k, table, cu_seqlens, position_ids)
    check_bool("long", long, allow_none=True)
    return RopeCall(**fields, long=long)


def check_max_seqlen(max_seqlen: object, cu_seqlens: torch.Tensor | None, total_tokens: int) -> int | None:
    """The longest varlen sequence as an int (numpy ints and 0-d integer tensors are accepted), at most T."""
    if max_seqlen is None:
        return None
    if cu_seqlens is None:
        raise ValueError("max_seqlen: only meaningful with cu_seqlens (varlen layout), got it without")
    if isinstance(max_seqlen, torch.Tensor) and max_seqlen.dim() == 0 and not max_seqlen.dtype.is_floating_point:
        max_seqlen = int(max_seqlen)  # a host read for a device tensor: pass a Python int on a GPU
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral):
        raise TypeError(f"max_seqlen: expected an int, got {type(max_seqlen).__name__}")
    max_seqlen = int(max_seqlen)
    if not 0 <= max_seqlen <= total_tokens:
        raise ValueError(f"max_seqlen: expected a length in [0, total_tokens = {total_tokens}], got {max_seqlen}")
    if _run_value_checks(cu_seqlens):
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if max_seqlen < longest:
            raise ValueError(f"max_seqlen: expected at least the longest sequence ({longest}), got {max_seqlen}")
    return max_seqlen


def check_attention_call(
    q: object,
    k: object,
    v: object,
    table: object,
    position_ids: object,
    long: object,
    cu_seqlens: object,
    max_seqlen: object,
    causal: object,
    softmax_scale: object,
    return_lse: object,
) -> AttentionCall:
    fields = _check_qk(q, k, table, cu_seqlens, position_ids)
    v = check_tensor("v", v)
    check_same("v", v, "k", fields["k"])
    if v.shape != fields["k"].shape:
        raise ValueError(f"v: expected the shape of k {tuple(fields['k'].shape)}, got {tuple(v.shape)}")
    check_bool("long", long, allow_none=True)
    check_bool("causal", causal)
    check_bool("return_lse", return_lse)
    max_seqlen = check_max_seqlen(max_seqlen, fields["cu_seqlens"], fields["seq_len"])
    return AttentionCall(
        **fields, v=v, long=long, max_seqlen=max_seqlen, causal=causal,
        softmax_scale=check_softmax_scale(softmax_scale, fields["head_dim"]), return_lse=return_lse,
    )  # fmt: skip


def check_block_table(block_table: object, batch: int, device: torch.device) -> torch.Tensor:
    """Metadata of a paged decode's ``block_table``: an int32/int64 ``[batch, max_blocks]`` tensor on q's device."""
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(
            f"block_table: expected an int32/int64 torch.Tensor [batch, max_blocks] or None, got "
            f"{type(block_table).__name__}"
        )
    if block_table.dtype not in (torch.int32, torch.int64) or block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(
            f"block_table: expected an int32/int64 tensor of shape [{batch} (batch, as q), max_blocks], got dtype "
            f"{block_table.dtype} shape {list(block_table.shape)}"
        )
    if block_table.device != device:
        raise ValueError(f"block_table: expected device {device} (as q), got {block_table.device}")
    return block_table


def _check_block_ids(block_table: torch.Tensor, lengths: list[int], block_size: int, num_blocks: int) -> None:
    """Value check of a paged decode: every block a sequence reads (its first ``ceil(length / block_size)``
    entries; the rest of its row is never read and may hold anything, e.g. -1 padding) lies in [0, num_blocks)."""
    rows = block_table.tolist()
    for seq, (row, length) in enumerate(zip(rows, lengths)):
        for index, block in enumerate(row[: -(-length // block_size)]):
            if not 0 <= block < num_blocks:
                raise ValueError(
                    f"block_table: expected block ids in [0, {num_blocks}) (num_blocks, k_cache.shape[0]) for the "
                    f"{-(-length // block_size)} block(s) sequence {seq} reads (cache_seqlens {length}, block_size "
                    f"{block_size}), got {block} at block_table[{seq}, {index}]"
                )


def check_decode_call(
    q: object,
    k_cache: object,
    v_cache: object,
    table: object,
    cache_seqlens: object,
    softmax_scale: object,
    block_table: object = None,
) -> DecodeCall:
    if isinstance(table, torch.Tensor) and isinstance(cache_seqlens, RopeTable):
        raise TypeError(
            "table: expected a lr2kernels.RopeTable, got a Tensor; since 0.2 the table comes fourth and "
            "cache_seqlens is keyword-only: rope_decode(q, k_cache, v_cache, table, cache_seqlens=...)"
        )
    table = check_table(table)
    q = check_tensor("q", q)
    k_cache, v_cache = check_tensor("k_cache", k_cache), check_tensor("v_cache", v_cache)
    check_same("k_cache", k_cache, "q", q)
    check_same("v_cache", v_cache, "q", q)
    paged = block_table is not None
    cache_layout = "[num_blocks, block_size, heads, head_dim] (paged)" if paged else "[batch, heads, seq, head_dim]"
    for name, x, layout in (("q", q, "[batch, heads, seq, head_dim]"), ("k_cache", k_cache, cache_layout),
                            ("v_cache", v_cache, cache_layout)):  # fmt: skip
        if x.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor {layout}, got shape {tuple(x.shape)}")
        check_head_dim(name, x, table)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if paged:
        block_table = check_block_table(block_table, q.shape[0], q.device)
        num_blocks, block_size, num_kv_heads = k_cache.shape[:3]
        if block_size == 0:
            raise ValueError(f"k_cache: expected a block size >= 1 (paged: shape[1]), got shape {tuple(k_cache.shape)}")
        capacity = block_table.shape[1] * block_size
        capacity_is = f"block_table.shape[1] * block_size = {block_table.shape[1]} * {block_size}"
    else:
        if k_cache.shape[0] != q.shape[0]:
            raise ValueError(f"k_cache: expected batch {q.shape[0]} (as q), got {k_cache.shape[0]}")
        num_kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
        capacity_is = "k_cache.shape[2]"
    check_gqa("k_cache", q.shape[1], num_kv_heads)
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens: expected an integer torch.Tensor [batch], got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64) or tuple(cache_seqlens.shape) != (q.shape[0],):
        raise ValueError(
            f"cache_seqlens: expected an int32/int64 tensor of shape [{q.shape[0]}], got dtype {cache_seqlens.dtype} "
            f"shape {list(cache_seqlens.shape)}"
        )
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens: expected device {q.device} (as q), got {cache_seqlens.device}")
    n_new = q.shape[2]
    if n_new > capacity:
        raise ValueError(
            f"q: expected at most k_cache's capacity of {capacity} new tokens ({capacity_is}), got {n_new}"
        )
    if _run_value_checks(cache_seqlens):
        # Unchecked (GPU tensors under "auto"), an out-of-range length is still never read past the cache: the
        # kernels clamp their key range to the capacity and write NaN to that sequence's output rows.
        lengths = cache_seqlens.tolist()
        for seq, length in enumerate(lengths):
            if not n_new <= length <= capacity:
                raise ValueError(
                    f"cache_seqlens: expected values in [{n_new} (new tokens), {capacity} (the cache's capacity, "
                    f"{capacity_is})], got {length} for sequence {seq}"
                )
        if paged and _run_value_checks(block_table):
            # Unchecked, a block id outside [0, num_blocks) is never read through either: the kernels skip it and
            # write NaN to that sequence's output rows.
            _check_block_ids(block_table, lengths, block_size, num_blocks)
    return DecodeCall(
        table=table, varlen=False, batch=q.shape[0], seq_len=capacity, num_q_heads=q.shape[1],
        num_kv_heads=num_kv_heads, head_dim=q.shape[-1], dtype=q.dtype, device=q.device, q=q, k_cache=k_cache,
        v_cache=v_cache, cache_seqlens=cache_seqlens, softmax_scale=check_softmax_scale(softmax_scale, q.shape[-1]),
        block_table=block_table,
    )  # fmt: skip


def check_rerotate_call(k: object, table: object, position_ids: object, from_long: object, to_long: object):
    table = check_table(table)
    k = check_tensor("k", k)
    if k.dim() not in (3, 4):
        raise ValueError(f"k: expected [B, H, L, D] or [T, H, D], got shape {tuple(k.shape)}")
    check_head_dim("k", k, table)
    if position_ids is None:
        raise ValueError("position_ids: expected the keys' positions, got None")
    varlen = k.dim() == 3  # [T, H, D]: one sequence of T tokens
    batch, seq_len = (1, k.shape[0]) if varlen else (k.shape[0], k.shape[2])
    position_ids = check_position_ids(position_ids, varlen, batch, seq_len, k.device)
    check_bool("from_long", from_long)
    check_bool("to_long", to_long)
    return RerotateCall(
        table=table, varlen=varlen, batch=batch, seq_len=seq_len, num_q_heads=k.shape[1], num_kv_heads=k.shape[1],
        head_dim=k.shape[-1], dtype=k.dtype, device=k.device, k=k, position_ids=position_ids, from_long=from_long,
        to_long=to_long,
    )  # fmt: skip
