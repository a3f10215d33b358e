"""Every input error of the public ops: the message names the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import lr2kernels as lr2
from tests.ops.helpers import make_table

TABLE = make_table(64)


def _qkv(hq=4, hk=2, seq=8, head_dim=64, dtype=torch.float32):
    return (
        torch.randn(1, hq, seq, head_dim, dtype=dtype),
        torch.randn(1, hk, seq, head_dim, dtype=dtype),
        torch.randn(1, hk, seq, head_dim, dtype=dtype),
    )


def test_table_type():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="table: expected a lr2kernels.RopeTable"):
        lr2.rope_attention(q, k, v, {"rope_type": "longrope"})


def test_head_dim_mismatch():
    q, k, v = _qkv(head_dim=80)
    with pytest.raises(ValueError, match=r"q: expected head_dim = table.head_dim = 64 .*got 80"):
        lr2.rope_attention(q, k, v, TABLE)


def test_heads_not_divisible():
    q, k, v = _qkv(hq=6, hk=4)
    with pytest.raises(ValueError, match="k: expected a number of heads dividing q's 6, got 4"):
        lr2.rope_attention(q, k, v, TABLE)


def test_dtype_mismatch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"k: expected dtype torch.float32 \(as q\), got torch.float16"):
        lr2.rope_attention(q, k.half(), v, TABLE)
    with pytest.raises(ValueError, match=r"v: expected dtype torch.float32 \(as k\), got torch.float64"):
        lr2.rope_attention(q, k, v.double(), TABLE)


def test_integer_inputs_and_non_tensors():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="q: expected dtype float16, bfloat16, float32 or float64, got torch.int64"):
        lr2.apply_rope(q.long(), k, TABLE)
    with pytest.raises(TypeError, match="k: expected a torch.Tensor, got list"):
        lr2.apply_rope(q, [1.0], TABLE)


def test_wrong_rank_and_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor \[batch, heads, seq, head_dim\]"):
        lr2.rope_attention(q[0], k, v, TABLE)
    with pytest.raises(ValueError, match="k: expected the same batch and sequence sizes as q"):
        lr2.rope_attention(q, k[:, :, :5], v[:, :, :5], TABLE)
    with pytest.raises(ValueError, match="v: expected the shape of k"):
        lr2.rope_attention(q, k, v[:, :1], TABLE)


def test_position_ids_checks():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"position_ids: expected shape \[8\] or \[1, 8\]"):
        lr2.rope_attention(q, k, v, TABLE, position_ids=torch.arange(9))
    with pytest.raises(TypeError, match="position_ids: expected an integer tensor, got dtype torch.float32"):
        lr2.rope_attention(q, k, v, TABLE, position_ids=torch.arange(8.0))


def test_cu_seqlens_checks():
    q, k, v = torch.randn(10, 4, 64), torch.randn(10, 2, 64), torch.randn(10, 2, 64)
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing offsets, got"):
        lr2.rope_attention(q, k, v, TABLE, cu_seqlens=torch.tensor([0, 6, 4, 10]))
    with pytest.raises(ValueError, match="cu_seqlens: expected offsets from 0 to total_tokens = 10, got 0 .. 9"):
        lr2.rope_attention(q, k, v, TABLE, cu_seqlens=torch.tensor([0, 5, 9]))
    with pytest.raises(ValueError, match="cu_seqlens: expected a 1-D int32/int64 tensor"):
        lr2.rope_attention(q, k, v, TABLE, cu_seqlens=torch.tensor([0.0, 10.0]))
    with pytest.raises(ValueError, match=r"max_seqlen: expected at least the longest sequence \(6\), got 5"):
        lr2.rope_attention(q, k, v, TABLE, cu_seqlens=torch.tensor([0, 6, 10]), max_seqlen=5)
    with pytest.raises(ValueError, match=r"q: expected a 3-D tensor \[total_tokens, heads, head_dim\] \(varlen\)"):
        lr2.rope_attention(q[None], k[None], v[None], TABLE, cu_seqlens=torch.tensor([0, 10]))


def test_scalar_argument_checks():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="softmax_scale: expected a finite value > 0, got -1"):
        lr2.rope_attention(q, k, v, TABLE, softmax_scale=-1.0)
    with pytest.raises(TypeError, match="long: expected True, False or None, got str"):
        lr2.rope_attention(q, k, v, TABLE, long="yes")


def test_decode_checks():
    q = torch.randn(2, 4, 1, 64)
    k_cache, v_cache = torch.zeros(2, 2, 16, 64), torch.zeros(2, 2, 16, 64)
    expected = (
        r"cache_seqlens: expected values in \[1 \(new tokens\), 16 \(the cache's capacity, k_cache.shape\[2\]\)\]"
    )
    with pytest.raises(ValueError, match=rf"{expected}, got 17 for sequence 1"):
        lr2.rope_decode(q, k_cache, v_cache, TABLE, cache_seqlens=torch.tensor([3, 17]))
    with pytest.raises(ValueError, match=rf"{expected}, got 0 for sequence 0"):
        lr2.rope_decode(q, k_cache, v_cache, TABLE, cache_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"q: expected at most k_cache's capacity of 16 new tokens .*, got 17"):
        lr2.rope_decode(torch.randn(2, 4, 17, 64), k_cache, v_cache, TABLE, cache_seqlens=torch.tensor([16, 16]))
    with pytest.raises(ValueError, match=r"cache_seqlens: expected an int32/int64 tensor of shape \[2\]"):
        lr2.rope_decode(q, k_cache, v_cache, TABLE, cache_seqlens=torch.tensor([3]))
    with pytest.raises(TypeError, match=r"cache_seqlens: expected an integer torch.Tensor \[batch\], got list"):
        lr2.rope_decode(q, k_cache, v_cache, TABLE, cache_seqlens=[3, 4])
    with pytest.raises(ValueError, match="k_cache: expected a number of heads dividing q's 4, got 3"):
        lr2.rope_decode(
            q, torch.zeros(2, 3, 16, 64), torch.zeros(2, 3, 16, 64), TABLE, cache_seqlens=torch.tensor([3, 4])
        )
    with pytest.raises(ValueError, match="v_cache: expected the shape of k_cache"):
        lr2.rope_decode(q, k_cache, v_cache[:, :, :8], TABLE, cache_seqlens=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="k_cache: expected batch 2 \\(as q\\), got 1"):
        lr2.rope_decode(q, k_cache[:1], v_cache[:1], TABLE, cache_seqlens=torch.tensor([3, 4]))


def test_rerotate_checks():
    k = torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="position_ids: expected the keys' positions, got None"):
        lr2.rerotate(k, TABLE, position_ids=None, from_long=False, to_long=True)
    with pytest.raises(TypeError, match="to_long: expected a bool, got int"):
        lr2.rerotate(k, TABLE, position_ids=torch.arange(8), from_long=False, to_long=1)
    with pytest.raises(ValueError, match=r"k: expected \[B, H, L, D\] or \[T, H, D\]"):
        lr2.rerotate(k[0, 0], TABLE, position_ids=torch.arange(8), from_long=False, to_long=True)


def test_options_are_keyword_only():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="positional argument"):
        lr2.rope_attention(q, k, v, TABLE, torch.arange(8))
    with pytest.raises(TypeError, match="positional argument"):
        lr2.apply_rope(q, k, TABLE, torch.arange(8))
    with pytest.raises(TypeError, match="positional argument"):
        lr2.rerotate(k, TABLE, torch.arange(8), False, True)
    with pytest.raises(TypeError, match="cache_seqlens"):
        lr2.rope_decode(q[:, :, :1], k, v, TABLE)


def test_decode_in_the_old_argument_order_says_how_to_call_it():
    q, k_cache, v_cache = torch.randn(1, 4, 1, 64), torch.zeros(1, 2, 16, 64), torch.zeros(1, 2, 16, 64)
    with pytest.raises(TypeError, match=r"the table comes fourth and cache_seqlens is keyword-only"):
        lr2.rope_decode(q, k_cache, v_cache, torch.tensor([3]), cache_seqlens=TABLE)


def test_calls_in_the_0_1_order_fail_with_a_message_that_says_so():
    # The README promises this: 0.1's positional calls name the change and the call to make instead.
    q, k_cache, v_cache = torch.randn(1, 4, 1, 64), torch.zeros(1, 2, 16, 64), torch.zeros(1, 2, 16, 64)
    seqlens = torch.tensor([3])
    with pytest.raises(TypeError, match=r"rope_decode\(\) takes 4 positional arguments but 5 were given: since 0.2 "
                                        r"every option is keyword-only \(0.1's order: rope_decode\(q, k, v, "
                                        r"cache_seqlens, table\)\); call rope_decode\(q, k_cache, v_cache, table, \*, "
                                        r"cache_seqlens"):  # fmt: skip
        lr2.rope_decode(q, k_cache, v_cache, seqlens, TABLE)
    k = torch.randn(1, 2, 8, 64)
    with pytest.raises(TypeError, match=r"rerotate\(\) takes 2 positional arguments but 5 were given: .*call "
                                        r"rerotate\(k, table, \*, position_ids, from_long, to_long"):  # fmt: skip
        lr2.rerotate(k, TABLE, torch.arange(8), False, True)
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"rope_attention\(\) takes 4 positional arguments but 5 were given"):
        lr2.rope_attention(q, k, v, TABLE, torch.arange(8))
    with pytest.raises(TypeError, match=r"apply_rope\(\) takes 3 positional arguments but 4 were given"):
        lr2.apply_rope(q, k, TABLE, torch.arange(8))
    # The options that have no default are still required, and named when missing.
    with pytest.raises(TypeError, match="missing the keyword argument cache_seqlens"):
        lr2.rope_decode(q[:, :, :1], k, v, TABLE)
    with pytest.raises(TypeError, match="missing the keyword argument to_long"):
        lr2.rerotate(k, TABLE, position_ids=torch.arange(8), from_long=False)


def test_value_checks_modes():
    # "auto" checks host tensors; "never" skips the value checks (shape checks still run); bad modes are named.
    q, k, v = torch.randn(10, 4, 64), torch.randn(10, 2, 64), torch.randn(10, 2, 64)
    decreasing = torch.tensor([0, 6, 4, 10])
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing offsets"):
        lr2.rope_attention(q, k, v, TABLE, cu_seqlens=decreasing, backend="torch")
    previous = lr2.set_value_checks("never")
    try:
        assert previous == "auto"
        lr2.apply_rope(q, k, TABLE, cu_seqlens=decreasing, backend="torch")  # not checked: the caller's promise
        with pytest.raises(ValueError, match="cu_seqlens: expected a 1-D int32/int64 tensor"):
            lr2.apply_rope(q, k, TABLE, cu_seqlens=decreasing.float(), backend="torch")
    finally:
        lr2.set_value_checks(previous)
    with pytest.raises(ValueError, match=r"mode: expected one of \['auto', 'always', 'never'\], got 'sometimes'"):
        lr2.set_value_checks("sometimes")
