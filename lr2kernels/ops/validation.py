"""Input checks shared by every backend: each error names the argument, what was given and what was expected."""

from __future__ import annotations

import dataclasses

import torch

from lr2kernels.tables import RopeTable

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """What the checks learned about a dense or varlen q/k/v triple."""

    varlen: bool
    batch: int  # number of sequences (varlen: len(cu_seqlens) - 1)
    seq_len: int  # dense: L; varlen: total tokens
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


def check_table(table: object) -> None:
    if not isinstance(table, RopeTable):
        raise TypeError(f"table: expected a lr2kernels.RopeTable, got {type(table).__name__}")


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


def check_gqa(num_q_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"k: expected a number of heads dividing q's {num_q_heads}, got {num_kv_heads}")


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
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total_tokens:
        raise ValueError(
            f"cu_seqlens: expected offsets from 0 to total_tokens = {total_tokens}, got {offsets[0]} .. {offsets[-1]}"
        )
    if any(b < a for a, b in zip(offsets[:-1], offsets[1:])):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {offsets}")
    return cu_seqlens


def check_position_ids(position_ids: object, shape: AttentionShape, device: torch.device) -> torch.Tensor | None:
    if position_ids is None:
        return None
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids: expected an integer torch.Tensor, got {type(position_ids).__name__}")
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids: expected an integer tensor, got dtype {position_ids.dtype}")
    if position_ids.device != device:
        raise ValueError(f"position_ids: expected device {device} (as q), got {position_ids.device}")
    if shape.varlen:
        expected = [(shape.seq_len,)]
    else:
        expected = [(shape.seq_len,), (shape.batch, shape.seq_len), (1, shape.seq_len)]
    if tuple(position_ids.shape) not in expected:
        raise ValueError(
            f"position_ids: expected shape {' or '.join(str(list(s)) for s in expected)}, "
            f"got {list(position_ids.shape)}"
        )
    return position_ids


def check_qk(
    q: object, k: object, table: object, cu_seqlens: object = None, position_ids: object = None
) -> tuple[AttentionShape, torch.Tensor | None, torch.Tensor | None]:
    """Check q, k (dense ``[B, H, L, D]`` or varlen ``[T, H, D]``), the table, cu_seqlens and position_ids."""
    check_table(table)
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
    head_axis = 1
    check_gqa(q.shape[head_axis], k.shape[head_axis])
    if varlen:
        cu_seqlens = check_cu_seqlens(cu_seqlens, q.shape[0], q.device)
        shape = AttentionShape(True, cu_seqlens.numel() - 1, q.shape[0], q.shape[1], k.shape[1], q.shape[-1])
    else:
        shape = AttentionShape(False, q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.shape[-1])
    position_ids = check_position_ids(position_ids, shape, q.device)
    return shape, cu_seqlens, position_ids


def check_v(v: object, k: torch.Tensor) -> torch.Tensor:
    v = check_tensor("v", v)
    check_same("v", v, "k", k)
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    return v


def check_max_seqlen(max_seqlen: object, cu_seqlens: torch.Tensor | None) -> int | None:
    if max_seqlen is None:
        return None
    if cu_seqlens is None:
        raise ValueError("max_seqlen: only meaningful with cu_seqlens (varlen layout), got it without")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen: expected an int, got {type(max_seqlen).__name__}")
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen: expected at least the longest sequence ({longest}), got {max_seqlen}")
    return max_seqlen


def check_decode(q: object, k_cache: object, v_cache: object, cache_seqlens: object, table: object) -> torch.Tensor:
    """Check decode inputs; returns cache_seqlens."""
    check_table(table)
    q = check_tensor("q", q)
    k_cache, v_cache = check_tensor("k_cache", k_cache), check_tensor("v_cache", v_cache)
    check_same("k_cache", k_cache, "q", q)
    check_same("v_cache", v_cache, "q", q)
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [batch, heads, seq, head_dim], got shape {tuple(x.shape)}")
        check_head_dim(name, x, table)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if k_cache.shape[0] != q.shape[0]:
        raise ValueError(f"k_cache: expected batch {q.shape[0]} (as q), got {k_cache.shape[0]}")
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"k_cache: expected a number of heads dividing q's {q.shape[1]}, got {k_cache.shape[1]}")
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens: expected an integer torch.Tensor [batch], got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64) or tuple(cache_seqlens.shape) != (q.shape[0],):
        raise ValueError(
            f"cache_seqlens: expected an int32/int64 tensor of shape [{q.shape[0]}], got dtype {cache_seqlens.dtype} "
            f"shape {list(cache_seqlens.shape)}"
        )
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens: expected device {q.device} (as q), got {cache_seqlens.device}")
    n_new, max_len = q.shape[2], k_cache.shape[2]
    lengths = cache_seqlens.tolist()
    bad = [n for n in lengths if n < n_new or n > max_len]
    if bad:
        raise ValueError(
            f"cache_seqlens: expected values in [{n_new} (new tokens), {max_len} (cache size)], got {lengths}"
        )
    return cache_seqlens


def check_softmax_scale(softmax_scale: object) -> None:
    if softmax_scale is None:
        return
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    if not softmax_scale > 0:
        raise ValueError(f"softmax_scale: expected a value > 0, got {softmax_scale}")


def check_long(long: object) -> None:
    if long is not None and not isinstance(long, bool):
        raise TypeError(f"long: expected True, False or None, got {type(long).__name__}")
