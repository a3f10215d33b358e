"""Bad inputs found by hostile testing: each raises an error that names the argument (no AttributeError, KeyError,
ZeroDivisionError, OverflowError or NaN), and reasonable inputs of other numeric types are accepted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import lr2kernels as lr2
from lr2kernels import reference
from lr2kernels.tables import RopeTable

TABLE = RopeTable.longrope(
    head_dim=16, base=10000.0, original_max_position=16, max_position=64, short_factor=[1.0] * 8,
    long_factor=[2.0] * 8,
)  # fmt: skip


def _longrope(**overrides):
    kwargs = dict(
        head_dim=16, base=10000.0, original_max_position=16, max_position=64, short_factor=[1.0] * 8,
        long_factor=[2.0] * 8,
    )  # fmt: skip
    return RopeTable.longrope(**{**kwargs, **overrides})


@pytest.mark.parametrize("data", [[1, 2], None, "table"], ids=["list", "null", "string"])
def test_loading_a_table_that_is_not_an_object(tmp_path, data):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="path: expected a RopeTable JSON object"):
        RopeTable.load(path)
    with pytest.raises(TypeError, match="data: expected a dict written by RopeTable.to_dict"):
        RopeTable.from_dict(data)


def test_hf_configs_with_missing_fields():
    llama3 = {"model_type": "llama", "max_position_embeddings": 64, "head_dim": 16, "rope_theta": 1e4}
    with pytest.raises(ValueError, match=r"config.rope_parameters\['low_freq_factor'\]: expected a number"):
        RopeTable.from_hf_config({**llama3, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match=r"config.rope_parameters\['factor'\]: expected a number"):
        RopeTable.from_hf_config({**llama3, "rope_scaling": {"rope_type": "linear"}})
    with pytest.raises(ValueError, match="config.head_dim: expected head_dim, or hidden_size and num_attention_heads"):
        RopeTable.from_hf_config({"model_type": "llama", "max_position_embeddings": 64, "rope_theta": 1e4})


def test_a_model_without_rope_has_no_table():
    with pytest.raises(ValueError, match="config: expected a RoPE model .* 'gpt2' config"):
        RopeTable.from_hf_config(transformers.GPT2Config())


def test_table_numbers_out_of_range():
    with pytest.raises(ValueError, match=r"max_position: expected at most 2147483647 .*got a 401-digit number"):
        _longrope(max_position=10**400)
    with pytest.raises(ValueError, match=r"long_factor\[0\]: expected a factor whose frequency .* got 1e-300"):
        _longrope(long_factor=[1e-300] * 8)


def test_numpy_numbers_are_accepted():
    table = _longrope(original_max_position=np.int64(16), short_factor=np.ones(8), long_factor=[np.float32(2)] * 8)
    assert table == TABLE and type(table.original_max_position) is int


def test_module_with_zero_kv_heads():
    with pytest.raises(ValueError, match="num_kv_heads: expected a positive int, got 0"):
        lr2.LongRopeAttention(32, 4, TABLE, num_kv_heads=0)


def test_op_arguments():
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="softmax_scale: expected a finite value > 0, got inf"):
        lr2.rope_attention(q, q, q, TABLE, softmax_scale=float("inf"))
    with pytest.raises(TypeError, match="causal: expected a bool, got str"):
        lr2.rope_attention(q, q, q, TABLE, causal="no")
    with pytest.raises(ValueError, match=r"position_ids: expected positions <= 2147483647"):
        lr2.rope_attention(q, q, q, TABLE, position_ids=torch.tensor([0, 1, 2, 2**31]))


def test_max_seqlen_types_and_bounds():
    q, cu_seqlens = torch.randn(10, 2, 16), torch.tensor([0, 4, 10])
    expected = lr2.rope_attention(q, q, q, TABLE, cu_seqlens=cu_seqlens, max_seqlen=6)
    for max_seqlen in (np.int64(6), torch.tensor(6)):
        got = lr2.rope_attention(q, q, q, TABLE, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"max_seqlen: expected a length in \[0, total_tokens = 10\], got 10000"):
        lr2.rope_attention(q, q, q, TABLE, cu_seqlens=cu_seqlens, max_seqlen=10_000)


def test_decode_with_an_empty_batch():
    q, empty, lengths = torch.randn(0, 4, 1, 16), torch.randn(0, 2, 8, 16), torch.zeros(0, dtype=torch.long)
    out = lr2.rope_decode(q, empty, empty, TABLE, cache_seqlens=lengths)
    torch.testing.assert_close(out, reference.rope_decode(q, empty, empty, lengths, TABLE), atol=0, rtol=0)
