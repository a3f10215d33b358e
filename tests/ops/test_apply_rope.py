"""apply_rope against transformers' own rotation (bit for bit on the torch backend) and the fp32 reference."""

from __future__ import annotations

import pytest
import torch

import lr2kernels as lr2
from lr2kernels import reference
from tests.ops.conftest import hf_rotate, make_table


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (80, 80), (128, 96), (96, 32)], ids=lambda x: str(x))
@pytest.mark.parametrize("seq", [1, 63, 257], ids=lambda s: f"L{s}")
def test_torch_backend_equals_hf_rotation_bitwise(dtype, head_dim, rotary_dim, seq):
    table = make_table(head_dim, rotary_dim=rotary_dim)
    q = torch.randn(2, 6, seq, head_dim).to(dtype)
    k = torch.randn(2, 2, seq, head_dim).to(dtype)
    q_rot, k_rot = lr2.apply_rope(q, k, table, backend="torch")
    cos, sin = table.cos_sin(torch.arange(seq).expand(2, seq))  # HF's module casts cos/sin to x.dtype
    hf_q, hf_k = hf_rotate(q, k, cos.to(dtype), sin.to(dtype))
    assert torch.equal(q_rot, hf_q) and torch.equal(k_rot, hf_k)
    assert torch.equal(q_rot[..., rotary_dim:], q[..., rotary_dim:])  # pass-through channels untouched


@pytest.mark.parametrize("seq", [63, 100], ids=lambda s: f"L{s}")
def test_reference_matches_torch_backend(seq):
    table = make_table(96, rotary_dim=64)
    q, k = torch.randn(1, 3, seq, 96), torch.randn(1, 1, seq, 96)
    ours = lr2.apply_rope(q, k, table)
    ref = reference.apply_rope(q.double(), k.double(), table)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_rotation_preserves_norm_times_attention_factor():
    table = make_table(64)
    q, k = torch.randn(1, 2, 100, 64, dtype=torch.float64), torch.randn(1, 2, 100, 64, dtype=torch.float64)
    q_rot, _ = reference.apply_rope(q, k, table)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1) * table.attention_factor, atol=1e-5, rtol=1e-5)


def test_gradients_equal_hf_path():
    table = make_table(128, rotary_dim=96)
    q = torch.randn(2, 4, 70, 128, requires_grad=True)
    k = torch.randn(2, 2, 70, 128, requires_grad=True)
    grad_q, grad_k = torch.randn(2, 4, 70, 128), torch.randn(2, 2, 70, 128)
    grads = torch.autograd.grad(lr2.apply_rope(q, k, table), (q, k), (grad_q, grad_k))
    cos, sin = table.cos_sin(torch.arange(70).expand(2, 70))
    expected = torch.autograd.grad(hf_rotate(q, k, cos, sin), (q, k), (grad_q, grad_k))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_gradcheck_fp64():
    table = make_table(8, rotary_dim=6, original_max_position=4)
    q = torch.randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 7, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: lr2.apply_rope(q, k, table), (q, k))


def test_varlen_picks_the_table_per_sequence():
    table = make_table(64)
    lengths = [10, 100, 64, 65]  # L0 = 64: short, long, short (exactly L0), long
    cu_seqlens = torch.tensor([0, 10, 110, 174, 239])
    q, k = torch.randn(239, 4, 64), torch.randn(239, 2, 64)
    q_rot, k_rot = lr2.apply_rope(q, k, table, cu_seqlens=cu_seqlens)
    bounds = cu_seqlens.tolist()
    for (start, end), length in zip(zip(bounds[:-1], bounds[1:]), lengths):
        cos, sin = table.cos_sin(torch.arange(length)[None], long=length > 64)
        hf_q, hf_k = hf_rotate(q[None, start:end].transpose(1, 2), k[None, start:end].transpose(1, 2), cos, sin)
        assert torch.equal(q_rot[start:end], hf_q[0].transpose(0, 1))
        assert torch.equal(k_rot[start:end], hf_k[0].transpose(0, 1))


def test_dense_batch_rule_and_long_override():
    table = make_table(64)
    q, k = torch.randn(1, 2, 70, 64), torch.randn(1, 2, 70, 64)
    auto = lr2.apply_rope(q, k, table)  # 70 > L0 = 64: long
    forced_long = lr2.apply_rope(q, k, table, long=True)
    forced_short = lr2.apply_rope(q, k, table, long=False)
    assert torch.equal(auto[0], forced_long[0])
    assert not torch.allclose(auto[0], forced_short[0])
    position_ids = torch.arange(10, 40)  # max position 39 < L0: short
    q_rot, _ = lr2.apply_rope(q[:, :, :30], k[:, :, :30], table, position_ids=position_ids)
    cos, sin = table.cos_sin(position_ids[None], long=False)
    assert torch.equal(q_rot, hf_rotate(q[:, :, :30], k[:, :, :30], cos, sin)[0])
