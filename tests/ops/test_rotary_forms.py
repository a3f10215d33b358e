"""The shortcuts a CPU decode step takes, against the forms they replace.

``rotary.rotate_full_width`` (four passes) must give :func:`rotary.rotate`'s (seven passes) bits exactly, signed zeros
included, since the rotated-key copy of a patched model mixes rows rotated either way. ``one_query_attention`` (the
query heads of a kv head packed as its rows) must equal SDPA with ``enable_gqa`` up to rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lr2kernels.ops import rotary
from lr2kernels.ops.torch_backend import one_query_attention

# dtype -> the integer dtype of its bits
_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


@pytest.mark.parametrize("dtype", list(_BITS), ids=str)
def test_rotate_full_width_gives_rotate_bit_for_bit(dtype):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 5, 7, 64, generator=generator, dtype=torch.float64) * 50).to(dtype)
    x[0, 0, 0, :6] = torch.tensor([0.0, -0.0, 1e-30, 6e4, -7.0, -0.0], dtype=torch.float64).to(dtype)
    x[0, 0, 0, 32:38] = torch.tensor([-0.0, 0.0, -0.0, 1.0, 0.0, 3.0], dtype=torch.float64).to(dtype)
    angle = torch.rand(7, 32, generator=generator, dtype=torch.float64) * 2e5  # large angles too
    angle = torch.cat((angle, angle), dim=-1).float()
    cos, sin = (angle.cos() * 1.19).to(dtype), (angle.sin() * 1.19).to(dtype)  # an attention factor, as LongRoPE's
    want = rotary.rotate(x, cos, sin)
    got = rotary.rotate_full_width(x, cos, rotary.signed_sin(sin))
    assert torch.equal(got.view(_BITS[dtype]), want.view(_BITS[dtype]))


def test_signed_sin_negates_the_first_half():
    sin = torch.tensor([[0.5, -0.25, 0.5, -0.25]])
    assert torch.equal(rotary.signed_sin(sin), torch.tensor([[-0.5, 0.25, 0.5, -0.25]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (6, 3), (9, 3), (8, 2), (8, 1)], ids=lambda h: f"{h[0]}:{h[1]}")
def test_one_query_attention_equals_sdpa_with_gqa(heads, dtype):
    query_heads, kv_heads = heads
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(3, query_heads, 1, 32, generator=generator).to(dtype)
    k, v = (torch.randn(3, kv_heads, 37, 32, generator=generator).to(dtype) for _ in range(2))
    want = F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)
    got = one_query_attention(q, k, v, 0.3)
    assert got.shape == want.shape == (3, query_heads, 1, 32)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


def test_one_query_attention_takes_strided_views():
    # The rotated-key copy hands a view of a larger buffer; the queries come as a slice of a wider tensor.
    generator = torch.Generator().manual_seed(2)
    both = torch.randn(2, 9 + 3, 1, 16, generator=generator)
    buffer = torch.randn(2, 3, 50, 16, generator=generator)
    q, k, v = both.narrow(1, 0, 9), buffer.narrow(2, 0, 21), torch.randn(2, 3, 21, 16, generator=generator)
    want = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v, enable_gqa=True)
    torch.testing.assert_close(one_query_attention(q, k, v, None), want, atol=1e-6, rtol=1e-6)
