"""LongRopeAttention against the same projections fed through reference.rope_attention, and HF's LlamaAttention."""

from __future__ import annotations

import pytest
import torch

import lr2kernels as lr2
from lr2kernels import reference
from tests.models import tiny_config
from tests.ops.helpers import make_table


def _expected(module: lr2.LongRopeAttention, x: torch.Tensor) -> torch.Tensor:
    batch, seq, _ = x.shape
    q = module.q_proj(x).view(batch, seq, module.num_heads, -1).transpose(1, 2).double()
    k = module.k_proj(x).view(batch, seq, module.num_kv_heads, -1).transpose(1, 2).double()
    v = module.v_proj(x).view(batch, seq, module.num_kv_heads, -1).transpose(1, 2).double()
    out = reference.rope_attention(q, k, v, module.table)
    return module.o_proj(out.transpose(1, 2).reshape(batch, seq, -1).float())


@pytest.mark.parametrize("seq", [5, 100], ids=lambda s: f"L{s}")
def test_dense_matches_reference_and_trains(seq):
    torch.manual_seed(0)
    module = lr2.LongRopeAttention(96, num_heads=6, num_kv_heads=2, table=make_table(16))
    x = torch.randn(2, seq, 96, requires_grad=True)
    out, expected = module(x), _expected(module, x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    leaves = [x, *module.parameters()]
    grads = torch.autograd.grad(out.square().mean(), leaves)
    expected_grads = torch.autograd.grad(expected.square().mean(), leaves)  # through the fp64 reference
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_packed_sequences_use_their_own_tables():
    torch.manual_seed(0)
    module = lr2.LongRopeAttention(64, num_heads=4, table=make_table(16), bias=True)
    a, b = torch.randn(1, 20, 64), torch.randn(1, 90, 64)  # 90 > L0 = 64: the long table
    packed = module(torch.cat([a[0], b[0]]), cu_seqlens=torch.tensor([0, 20, 110]), max_seqlen=90)
    torch.testing.assert_close(packed[:20], module(a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[20:], module(b)[0], atol=1e-5, rtol=1e-5)


def test_matches_hf_llama_attention_with_the_same_weights():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
            "short_factor": [1.0] * 8, "long_factor": [1.0 + i for i in range(8)]}  # fmt: skip
    config = tiny_config("llama", rope=rope, max_position=128, attn_implementation="sdpa")  # hidden 64, 4:2 heads of 16
    torch.manual_seed(0)
    hf = LlamaAttention(config, layer_idx=0).eval()
    ours = lr2.LongRopeAttention(64, 4, lr2.RopeTable.from_hf_config(config), num_kv_heads=2)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 50, 64)
    position_ids = torch.arange(50)[None].expand(2, 50)
    cos_sin = LlamaRotaryEmbedding(config)(x, position_ids)
    with torch.no_grad():
        expected, _ = hf(x, position_embeddings=cos_sin, attention_mask=None, position_ids=position_ids)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_kv_heads: expected a divisor of num_heads = 6, got 4"):
        lr2.LongRopeAttention(96, 6, make_table(16), num_kv_heads=4)
    with pytest.raises(TypeError, match="table: expected a lr2kernels.RopeTable"):
        lr2.LongRopeAttention(96, 6, {"rope_type": "longrope"})
