"""rope_attention (torch backend and reference) against an independent oracle: HF's rotation + naive attention."""

from __future__ import annotations

import pytest
import torch

import lr2kernels as lr2
from lr2kernels import reference
from tests.ops.conftest import L0, TOLERANCES, hf_rope_attention, make_table

GQA = [(4, 4), (6, 2), (8, 1)]  # (q heads, kv heads): 1:1, 3:1, 8:1
HEAD_DIMS = [64, 80, 96, 128]
SEQ_LENS = [1, 63, 100, 257]  # 100 and 257 are past L0 = 64: the long table


def _qkv(batch, hq, hk, seq, head_dim, dtype=torch.float32, requires_grad=False):
    q = torch.randn(batch, hq, seq, head_dim, dtype=dtype)
    k = torch.randn(batch, hk, seq, head_dim, dtype=dtype)
    v = torch.randn(batch, hk, seq, head_dim, dtype=dtype)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seq", SEQ_LENS, ids=lambda s: f"L{s}")
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"H{h[0]}kv{h[1]}")
def test_forward_matches_hf_oracle(heads, head_dim, seq, causal):
    table = make_table(head_dim)
    q, k, v = _qkv(2, *heads, seq, head_dim)
    expected = hf_rope_attention(q.double(), k.double(), v.double(), table, causal=causal)
    out = lr2.rope_attention(q, k, v, table, causal=causal, backend="torch")
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32])
    ref = reference.rope_attention(q.double(), k.double(), v.double(), table, causal=causal)
    torch.testing.assert_close(ref, expected, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("rotary_dim", [32, 48, 64], ids=lambda r: f"rot{r}")
def test_partial_rotary_matches_hf_oracle(rotary_dim):
    table = make_table(64, rotary_dim=rotary_dim)
    q, k, v = _qkv(1, 6, 2, 100, 64)
    expected = hf_rope_attention(q.double(), k.double(), v.double(), table)
    out = lr2.rope_attention(q, k, v, table)
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32])


def test_long_table_changes_the_result():
    # Guards the tests above against a table whose long half is never used.
    table = make_table(64)
    q, k, v = _qkv(1, 4, 4, 100, 64)
    long_out = lr2.rope_attention(q, k, v, table)
    short_out = lr2.rope_attention(q, k, v, table, long=False)
    assert (long_out - short_out).abs().max() > 1e-2
    torch.testing.assert_close(long_out, lr2.rope_attention(q, k, v, table, long=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_error_within_twice_plain_torch(dtype):
    # FlashAttention's rule: our error vs fp64 is at most ~2x the error of the plain HF path in the same dtype.
    table = make_table(64)
    q, k, v = _qkv(2, 6, 2, 100, 64)
    exact = hf_rope_attention(q.double(), k.double(), v.double(), table)
    plain = hf_rope_attention(q.to(dtype), k.to(dtype), v.to(dtype), table)
    out = lr2.rope_attention(q.to(dtype), k.to(dtype), v.to(dtype), table)
    assert out.dtype == dtype
    plain_err = (plain.double() - exact).abs().max().item()
    our_err = (out.double() - exact).abs().max().item()
    assert our_err <= 2 * plain_err + 1e-3, (our_err, plain_err)


@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"H{h[0]}kv{h[1]}")
@pytest.mark.parametrize("seq", [63, 100], ids=lambda s: f"L{s}")
def test_gradients_match_hf_oracle(heads, seq):
    table = make_table(80)
    q, k, v = _qkv(2, *heads, seq, 80, requires_grad=True)
    grad_out = torch.randn(2, heads[0], seq, 80)
    out = lr2.rope_attention(q, k, v, table)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected = torch.autograd.grad(hf_rope_attention(q64, k64, v64, table), (q64, k64, v64), grad_out.double())
    for name, got, want in zip("qkv", grads, expected):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=5e-5, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("rotary_dim", [8, 4], ids=["full_rotary", "partial_rotary"])
def test_gradcheck_fp64_dense(rotary_dim, causal):
    table = make_table(8, rotary_dim=rotary_dim, original_max_position=4)
    q, k, v = _qkv(1, 4, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: lr2.rope_attention(q, k, v, table, causal=causal), (q, k, v))


def test_gradcheck_fp64_varlen():
    table = make_table(8, original_max_position=4)
    cu_seqlens = torch.tensor([0, 3, 9])  # one short sequence, one past L0 = 4
    q = torch.randn(9, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(9, 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(9, 1, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: lr2.rope_attention(q, k, v, table, cu_seqlens=cu_seqlens), (q, k, v)
    )


def test_position_ids_with_offsets_use_the_batch_rule():
    # One row starts at 0, one at 90: the batch max is past L0, so HF uses the long table for both rows.
    table = make_table(64)
    q, k, v = _qkv(2, 4, 2, 20, 64)
    position_ids = torch.stack([torch.arange(20), torch.arange(90, 110)])
    out = lr2.rope_attention(q, k, v, table, position_ids=position_ids)
    expected = hf_rope_attention(q.double(), k.double(), v.double(), table, position_ids=position_ids)
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32])
    first_row_short = hf_rope_attention(q[:1].double(), k[:1].double(), v[:1].double(), table, long=False)
    assert (out[:1].double() - first_row_short).abs().max() > 1e-2


def _varlen_batch(lengths, hq, hk, head_dim, dtype=torch.float32):
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu_seqlens[-1])
    q = torch.randn(total, hq, head_dim, dtype=dtype)
    k = torch.randn(total, hk, head_dim, dtype=dtype)
    v = torch.randn(total, hk, head_dim, dtype=dtype)
    return q, k, v, cu_seqlens


def _as_dense(x, start, end):
    return x[start:end].transpose(0, 1)[None]  # [L, H, D] -> [1, H, L, D]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"H{h[0]}kv{h[1]}")
def test_varlen_each_sequence_uses_its_own_table(heads, causal):
    lengths = [1, 63, 100, 30, 65]  # around L0 = 64: short, short, long, short, long
    table = make_table(96)
    q, k, v, cu_seqlens = _varlen_batch(lengths, *heads, 96)
    out = lr2.rope_attention(q, k, v, table, cu_seqlens=cu_seqlens, max_seqlen=max(lengths), causal=causal)
    ref = reference.rope_attention(q.double(), k.double(), v.double(), table, cu_seqlens=cu_seqlens, causal=causal)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        # The oracle on the sequence alone applies HF's rule to its own length.
        expected = hf_rope_attention(*(_as_dense(x.double(), start, end) for x in (q, k, v)), table, causal=causal)
        expected = expected[0].transpose(0, 1)
        torch.testing.assert_close(out[start:end].double(), expected, **TOLERANCES[torch.float32])
        torch.testing.assert_close(ref[start:end], expected, **TOLERANCES[torch.float64])


def test_varlen_explicit_positions_and_empty_sequence():
    table = make_table(64)
    lengths = [5, 0, 40]
    q, k, v, cu_seqlens = _varlen_batch(lengths, 4, 2, 64)
    # Chunked prefill: the second chunk of a sequence at positions 50..89 crosses L0 -> long table.
    position_ids = torch.cat([torch.arange(5), torch.arange(50, 90)])
    out = lr2.rope_attention(q, k, v, table, position_ids=position_ids, cu_seqlens=cu_seqlens)
    expected = hf_rope_attention(
        *(_as_dense(x.double(), 5, 45) for x in (q, k, v)), table, position_ids=torch.arange(50, 90)
    )
    torch.testing.assert_close(out[5:45].double(), expected[0].transpose(0, 1), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_return_lse_dense_and_varlen(causal):
    table = make_table(64)
    q, k, v = _qkv(2, 6, 3, 70, 64)
    out, lse = lr2.rope_attention(q, k, v, table, causal=causal, return_lse=True)
    assert lse.shape == (2, 6, 70) and lse.dtype == torch.float32
    q_rot, k_rot = reference.apply_rope(q.double(), k.double(), table)
    scores = q_rot @ k_rot.repeat_interleave(2, dim=1).transpose(-1, -2) / 8.0
    if causal:
        scores = scores.masked_fill(~torch.ones(70, 70, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, lr2.rope_attention(q, k, v, table, causal=causal), atol=1e-5, rtol=1e-5)

    qv, kv, vv, cu_seqlens = _varlen_batch([10, 70], 6, 3, 64)
    _, lse_varlen = lr2.rope_attention(qv, kv, vv, table, cu_seqlens=cu_seqlens, causal=causal, return_lse=True)
    assert lse_varlen.shape == (6, 80)
    _, lse_second = reference.rope_attention(
        *(_as_dense(x, 10, 80) for x in (qv, kv, vv)), table, causal=causal, return_lse=True
    )
    torch.testing.assert_close(lse_varlen[:, 10:], lse_second[0], atol=1e-5, rtol=1e-5)


def test_softmax_scale_is_used():
    table = make_table(64)
    q, k, v = _qkv(1, 2, 2, 30, 64)
    out = lr2.rope_attention(q, k, v, table, softmax_scale=0.05)
    q_rot, k_rot = reference.apply_rope(q.double(), k.double(), table)
    scores = (q_rot @ k_rot.transpose(-1, -2) * 0.05).masked_fill(
        ~torch.ones(30, 30, dtype=torch.bool).tril(), float("-inf")
    )
    torch.testing.assert_close(out.double(), torch.softmax(scores, -1) @ v.double(), atol=1e-5, rtol=1e-5)


def test_positions_past_l0_and_long_sequences_in_reference():
    # The reference's long-table rows really sit past L0: position L0 rotates differently under the two tables.
    table = make_table(64)
    cos_short, _ = table.cos_sin(torch.tensor([L0]), long=False)
    cos_long, _ = table.cos_sin(torch.tensor([L0]), long=True)
    assert (cos_short - cos_long).abs().max() > 1e-2
