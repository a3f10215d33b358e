"""rope_attention on every backend against an independent oracle (HF's rotation + naive attention, fp64) and the
reference: forward, gradients, varlen, log-sum-exp.

Floating outputs allocated with ``torch.empty``/``torch.empty_like`` start as NaN (the ``nan_empty`` fixture).
"""

from __future__ import annotations

import pytest
import torch

import lr2kernels as lr2
from lr2kernels import reference
from tests.ops.helpers import (
    DEVICE,
    L0,
    TOLERANCES,
    cu_seqlens_of,
    dtype_id,
    hf_rope_attention,
    make_table,
    randn,
    run,
    skip_in_interpreter,
    tolerance,
)

pytestmark = pytest.mark.usefixtures("nan_empty")
GQA = [(2, 2), (3, 1), (8, 1)]  # (q heads, kv heads): 1:1, 3:1, 8:1
HEAD_DIMS = [64, 80, 96, 128]
SEQ_LENS = [1, 63, 100, 257]  # 100 and 257 are past L0 = 64: long table


def _heads_id(heads):
    return f"H{heads[0]}kv{heads[1]}"


def _qkv(shape_q, shape_kv, dtype=torch.float32, requires_grad=False):
    return randn(*shape_q, dtype=dtype, requires_grad=requires_grad), *(
        randn(*shape_kv, dtype=dtype, requires_grad=requires_grad) for _ in range(2)
    )


def _f64(*tensors):
    return [x.detach().double() for x in tensors]


def _reference(q, k, v, table, grad_out, **kwargs) -> tuple[torch.Tensor, ...]:
    """(out, dq, dk, dv) of the fp64 reference, by autograd."""
    q64, k64, v64 = (x.requires_grad_() for x in _f64(q, k, v))
    expected = reference.rope_attention(q64, k64, v64, table, **kwargs)
    return expected, *torch.autograd.grad(expected, (q64, k64, v64), grad_out.double())


def _assert_like_reference(backend, dtype, got, want) -> None:
    """(out, dq, dk, dv) of ``backend`` against the reference's, each to its tolerance."""
    torch.testing.assert_close(got[0].double(), want[0], **tolerance(backend, dtype))
    grad_tol = tolerance(backend, dtype, "attention_grad")
    for name, got_grad, want_grad in zip("qkv", got[1:], want[1:], strict=True):
        torch.testing.assert_close(got_grad.double(), want_grad, **grad_tol, msg=lambda m, n=name: f"d{n}: {m}")


def _check(backend, q, k, v, table, **kwargs):
    """Forward and gradients of ``backend``'s rope_attention vs autograd through the fp64 reference."""
    out = run(backend, lr2.rope_attention, q, k, v, table, **kwargs)
    assert out.dtype == q.dtype
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    _assert_like_reference(backend, q.dtype, (out, *grads), _reference(q, k, v, table, grad_out, **kwargs))
    return out


def _triton_launchers(q, k, v, table, grad_out, *, staged=True, group_splits=None, position_ids=None,
                      cu_seqlens=None, max_seqlen=None, causal=True):  # fmt: skip
    """(out, dq, dk, dv) from the Triton launchers called directly with their options (the triton backend calls
    them with the defaults), from the arguments the backend prepares for them (lr2kernels.ops.fused)."""
    from lr2kernels.ops import rotary
    from lr2kernels.ops.triton import attention

    batch, max_seqlen = (len(cu_seqlens) - 1, max_seqlen) if cu_seqlens is not None else (q.shape[0], q.shape[2])
    is_long = rotary.sequence_is_long(table, batch, max_seqlen, position_ids, cu_seqlens, None, DEVICE)
    args = (rotary.inv_freq_pair(table, DEVICE).contiguous(), is_long, position_ids, cu_seqlens, max_seqlen, causal,
            q.shape[-1] ** -0.5, table.attention_factor_for(False), table.attention_factor_for(True))  # fmt: skip
    q, k, v = (x.detach() for x in (q, k, v))
    out, lse = attention.rope_attention_fwd(q, k, v, *args, staged=staged)
    return out, *attention.rope_attention_bwd(
        grad_out, q, k, v, out, lse, *args, staged=staged, group_splits=group_splits
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seq", SEQ_LENS, ids=lambda s: f"L{s}")
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("heads", GQA, ids=_heads_id)
def test_dense_forward_and_gradients(backend, heads, head_dim, seq, causal):
    skip_in_interpreter(backend, too_large=seq > 100 or head_dim > 96)
    hq, hk = heads
    table = make_table(head_dim)
    q, k, v = _qkv((1, hq, seq, head_dim), (1, hk, seq, head_dim), requires_grad=True)
    out = _check(backend, q, k, v, table, causal=causal)
    expected = hf_rope_attention(*_f64(q, k, v), table, causal=causal)
    torch.testing.assert_close(out.double(), expected, **tolerance(backend, torch.float32))
    ref = reference.rope_attention(*_f64(q, k, v), table, causal=causal)  # the reference agrees with HF's path
    torch.testing.assert_close(ref, expected, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)], ids=_heads_id)
@pytest.mark.parametrize("seq", [63, 100], ids=lambda s: f"L{s}")
def test_batched_gradients_match_hf_oracle(backend, heads, seq):
    skip_in_interpreter(backend, too_large=True)  # batch 2, up to 8 heads: the grid above covers triton on the CPU
    table = make_table(80)
    q, k, v = _qkv((2, heads[0], seq, 80), (2, heads[1], seq, 80), requires_grad=True)
    grad_out = randn(2, heads[0], seq, 80)
    out = run(backend, lr2.rope_attention, q, k, v, table)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (x.requires_grad_() for x in _f64(q, k, v))
    expected = torch.autograd.grad(hf_rope_attention(q64, k64, v64, table), (q64, k64, v64), grad_out.double())
    grad_tol = tolerance(backend, torch.float32, "attention_grad")
    for name, got, want in zip("qkv", grads, expected):
        torch.testing.assert_close(got.double(), want, **grad_tol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize(
    "head_dim,rotary_dim",
    [(64, 32), (64, 48), (80, 32), (128, 96), (256, 256)],
    ids=["D64rot32", "D64rot48", "D80rot32", "D128rot96", "D256"],  # D80rot32 (Phi-2): pass-through in 2 tiles
)
def test_partial_rotary_and_large_heads(backend, head_dim, rotary_dim):
    table = make_table(head_dim, rotary_dim=rotary_dim)
    q, k, v = _qkv((1, 2, 70, head_dim), (1, 1, 70, head_dim), requires_grad=True)
    out = _check(backend, q, k, v, table)
    expected = hf_rope_attention(*_f64(q, k, v), table)
    torch.testing.assert_close(out.double(), expected, **tolerance(backend, torch.float32))


def test_long_table_and_long_override(backend):
    # Guards the tests above against a table whose long half is never used.
    table = make_table(64)
    q, k, v = _qkv((1, 2, 100, 64), (1, 2, 100, 64))
    long_out = run(backend, lr2.rope_attention, q, k, v, table)
    short_out = run(backend, lr2.rope_attention, q, k, v, table, long=False)
    assert (long_out - short_out).abs().max() > 1e-2
    torch.testing.assert_close(long_out, run(backend, lr2.rope_attention, q, k, v, table, long=True))
    # Forced long below L0, forward and gradients.
    q, k, v = _qkv((1, 2, 40, 64), (1, 2, 40, 64), requires_grad=True)
    _check(backend, q, k, v, table, long=True)


# Slack on the "at most twice the plain path's error" rule, by (backend, dtype).
LOW_PRECISION_SLACK = {
    ("torch", torch.float16): 1e-3,
    ("torch", torch.bfloat16): 1e-3,
    ("triton", torch.float16): tolerance("triton", torch.float16)["atol"] / 3,
    ("triton", torch.bfloat16): tolerance("triton", torch.bfloat16)["atol"] / 3,
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_low_precision_error_within_twice_plain_hf(backend, dtype):
    # FlashAttention's rule: our error vs fp64 is at most ~2x the error of the plain HF path in the same dtype.
    table = make_table(64)
    q, k, v = _qkv((1, 4, 100, 64), (1, 2, 100, 64))
    exact = hf_rope_attention(*_f64(q, k, v), table)
    ql, kl, vl = q.to(dtype), k.to(dtype), v.to(dtype)
    out = run(backend, lr2.rope_attention, ql, kl, vl, table)
    plain = hf_rope_attention(ql, kl, vl, table)
    assert out.dtype == dtype
    plain_err = (plain.double() - exact).abs().max().item()
    our_err = (out.double() - exact).abs().max().item()
    assert our_err <= 2 * plain_err + LOW_PRECISION_SLACK[backend, dtype], (our_err, plain_err)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("rotary_dim", [8, 4], ids=["full_rotary", "partial_rotary"])
def test_gradcheck_fp64_dense(backend, rotary_dim, causal):
    table = make_table(8, rotary_dim=rotary_dim, original_max_position=4)
    q, k, v = _qkv((1, 4, 6, 8), (1, 2, 6, 8), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: run(backend, lr2.rope_attention, q, k, v, table, causal=causal), (q, k, v)
    )


def test_gradcheck_fp64_varlen(backend):
    table = make_table(8, original_max_position=4)
    cu_seqlens = cu_seqlens_of([3, 6])  # one short sequence, one past L0 = 4
    q, k, v = _qkv((9, 2, 8), (9, 1, 8), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: run(backend, lr2.rope_attention, q, k, v, table, cu_seqlens=cu_seqlens), (q, k, v)
    )


def test_position_ids_with_offsets_use_the_batch_rule(backend):
    # One row starts at 0, one at 90: the batch max is past L0, so HF uses the long table for both rows.
    table = make_table(64)
    q, k, v = _qkv((2, 4, 20, 64), (2, 2, 20, 64), requires_grad=True)
    position_ids = torch.stack([torch.arange(20), torch.arange(90, 110)]).to(DEVICE)
    out = _check(backend, q, k, v, table, position_ids=position_ids)
    expected = hf_rope_attention(*_f64(q, k, v), table, position_ids=position_ids)
    torch.testing.assert_close(out.double(), expected, **tolerance(backend, torch.float32))
    first_row_short = hf_rope_attention(*_f64(q[:1], k[:1], v[:1]), table, long=False)
    assert (out[:1].double() - first_row_short).abs().max() > 1e-2
    chunk = torch.arange(30, 50, device=DEVICE)  # a chunk of a prefill, all below L0: short
    _check(backend, q, k, v, table, position_ids=chunk, causal=False)


def _as_dense(x, start, end):
    return x[start:end].transpose(0, 1)[None]  # [L, H, D] -> [1, H, L, D]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads", [(2, 2), (6, 2), (8, 1)], ids=_heads_id)
def test_varlen_each_sequence_uses_its_own_table(backend, heads, causal):
    skip_in_interpreter(backend, too_large=heads != (6, 2))
    lengths = [1, 63, 100, 30, 65]  # around L0 = 64: short, short, long, short, long
    table = make_table(80)
    total = sum(lengths)
    q, k, v = _qkv((total, heads[0], 80), (total, heads[1], 80), requires_grad=True)
    cu_seqlens = cu_seqlens_of(lengths)
    out = _check(backend, q, k, v, table, cu_seqlens=cu_seqlens, max_seqlen=max(lengths), causal=causal)
    ref = reference.rope_attention(*_f64(q, k, v), table, cu_seqlens=cu_seqlens, causal=causal)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        # The oracle on the sequence alone applies HF's rule to its own length.
        expected = hf_rope_attention(*(_as_dense(x, start, end) for x in _f64(q, k, v)), table, causal=causal)
        expected = expected[0].transpose(0, 1)
        torch.testing.assert_close(out[start:end].double(), expected, **tolerance(backend, torch.float32))
        torch.testing.assert_close(ref[start:end], expected, **TOLERANCES[torch.float64])


def test_varlen_explicit_positions_cross_l0_and_empty_sequence(backend):
    table = make_table(64)
    lengths = [5, 0, 40]
    q, k, v = _qkv((45, 4, 64), (45, 2, 64), requires_grad=True)
    # Chunked prefill: the second chunk of a sequence at positions 50..89 crosses L0 -> long table.
    position_ids = torch.cat([torch.arange(5), torch.arange(50, 90)]).to(DEVICE)
    out = _check(backend, q, k, v, table, position_ids=position_ids, cu_seqlens=cu_seqlens_of(lengths))
    expected = hf_rope_attention(
        *(_as_dense(x, 5, 45) for x in _f64(q, k, v)), table, position_ids=torch.arange(50, 90, device=DEVICE)
    )
    torch.testing.assert_close(out[5:45].double(), expected[0].transpose(0, 1), **tolerance(backend, torch.float32))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_return_lse_dense_and_varlen(backend, causal):
    table = make_table(64)
    q, k, v = _qkv((2, 2, 50, 64), (2, 1, 50, 64))
    out, lse = run(backend, lr2.rope_attention, q, k, v, table, causal=causal, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 2, 50) and lse.dtype == torch.float32
    q_rot, k_rot = reference.apply_rope(*_f64(q, k), table)
    scores = q_rot @ k_rot.repeat_interleave(2, dim=1).transpose(-1, -2) / 8.0
    if causal:
        scores = scores.masked_fill(~torch.ones(50, 50, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), **tolerance(backend, torch.float32))
    ref_out, ref_lse = reference.rope_attention(*_f64(q, k, v), table, causal=causal, return_lse=True)
    torch.testing.assert_close(lse.double(), ref_lse, **tolerance(backend, torch.float32))
    torch.testing.assert_close(out.double(), ref_out, **tolerance(backend, torch.float32))
    torch.testing.assert_close(out, run(backend, lr2.rope_attention, q, k, v, table, causal=causal))

    qv, kv, vv = _qkv((80, 2, 64), (80, 1, 64))
    cu_seqlens = cu_seqlens_of([10, 70])
    _, lse_varlen = run(
        backend, lr2.rope_attention, qv, kv, vv, table, cu_seqlens=cu_seqlens, causal=causal, return_lse=True
    )
    assert lse_varlen.shape == (2, 80) and lse_varlen.dtype == torch.float32
    _, ref_lse = reference.rope_attention(
        *_f64(qv, kv, vv), table, cu_seqlens=cu_seqlens, causal=causal, return_lse=True
    )
    torch.testing.assert_close(lse_varlen.double(), ref_lse, **tolerance(backend, torch.float32))
    # The second sequence alone, dense: the same lse (each sequence its own table and its own softmax).
    _, lse_second = reference.rope_attention(
        *(_as_dense(x, 10, 80) for x in _f64(qv, kv, vv)), table, causal=causal, return_lse=True
    )
    torch.testing.assert_close(lse_varlen[:, 10:].double(), lse_second[0], **tolerance(backend, torch.float32))


def test_softmax_scale_is_used(backend):
    table = make_table(64)
    q, k, v = _qkv((1, 2, 30, 64), (1, 2, 30, 64))
    out = run(backend, lr2.rope_attention, q, k, v, table, softmax_scale=0.05)
    q_rot, k_rot = reference.apply_rope(*_f64(q, k), table)
    causal = torch.ones(30, 30, dtype=torch.bool, device=DEVICE).tril()
    scores = (q_rot @ k_rot.transpose(-1, -2) * 0.05).masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(
        out.double(), torch.softmax(scores, -1) @ v.double(), **tolerance(backend, torch.float32)
    )


def test_non_contiguous_inputs_and_softmax_scale(backend):
    # [B, L, H, D] storage viewed as [B, H, L, D], as the output of a q/k/v projection is.
    table = make_table(64)
    q = torch.randn(1, 40, 4, 64, device=DEVICE).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 40, 2, 64, device=DEVICE).transpose(1, 2).requires_grad_()
    v = torch.randn(1, 40, 2, 64, device=DEVICE).transpose(1, 2).requires_grad_()
    _check(backend, q, k, v, table, softmax_scale=0.07)


def test_positions_near_128k_keep_hf_precision(backend):
    # HF's fp32 angle (float32(pos) * inv_freq, one rounding) and a precise cos/sin: at positions up to 131071 the
    # backends agree with the reference's cos/sin (HF's path) far inside the fp32 budget.
    table = make_table(128, rotary_dim=96, original_max_position=4096)
    assert table.max_position == 32768  # make_table: 8 x L0; positions past it are still well defined
    q, k, v = _qkv((1, 2, 32, 128), (1, 1, 32, 128), requires_grad=True)
    position_ids = torch.arange(131040, 131072, device=DEVICE)
    _check(backend, q, k, v, table, position_ids=position_ids)
    q_rot, k_rot = run(backend, lr2.apply_rope, q.detach(), k.detach(), table, position_ids=position_ids)
    ref_q, ref_k = reference.apply_rope(*_f64(q, k), table, position_ids=position_ids)
    torch.testing.assert_close(q_rot.double(), ref_q, **tolerance(backend, torch.float32, "rope"))
    torch.testing.assert_close(k_rot.double(), ref_k, **tolerance(backend, torch.float32, "rope"))


def test_positions_past_l0_rotate_differently_under_the_two_tables():
    # The long-table rows really sit past L0: position L0 rotates differently under the two tables.
    table = make_table(64)
    cos_short, _ = table.cos_sin(torch.tensor([L0]), long=False)
    cos_long, _ = table.cos_sin(torch.tensor([L0]), long=True)
    assert (cos_short - cos_long).abs().max() > 1e-2


@pytest.mark.parametrize("layout", ["dense_positions", "varlen", "partial_rotary"])
def test_triton_per_tile_rotation_matches_the_staged_default(layout, monkeypatch):
    """The Triton launchers rotate the loop operands once (``staged=True``, the default); ``staged=False`` rotates
    every tile in the loop instead. Both paths compile from one kernel body: both must give the reference's result,
    and the same result as each other."""
    if "triton" not in lr2.available_backends():
        pytest.skip("the triton backend is not available here")
    from lr2kernels.ops.triton import attention

    stagings = []  # the forward's key rotation and the backward's q/k staging, as launched
    for name in ("apply_rope", "_stage_rotated"):
        real = getattr(attention, name)
        monkeypatch.setattr(
            attention, name, lambda *a, real=real, name=name, **k: stagings.append(name) or real(*a, **k)
        )
    if layout == "varlen":
        lengths = [20, 70, 9]  # short, long (> L0 = 64), short
        table, kwargs = make_table(32), {"cu_seqlens": cu_seqlens_of(lengths), "max_seqlen": 70}
        q, k, v = _qkv((sum(lengths), 6, 32), (sum(lengths), 2, 32), requires_grad=True)
    else:
        table = make_table(32, rotary_dim=24 if layout == "partial_rotary" else 32)
        positions = torch.arange(40, 110, device=DEVICE)[None].expand(2, -1)  # crosses L0
        kwargs = {"position_ids": positions} if layout == "dense_positions" else {}
        q, k, v = _qkv((2, 6, 70, 32), (2, 2, 70, 32), requires_grad=True)
    grad_out = randn(*q.shape)
    expected = _reference(q, k, v, table, grad_out, **kwargs)
    results = {}
    for staged in (True, False):
        stagings.clear()
        results[staged] = _triton_launchers(q, k, v, table, grad_out, staged=staged, **kwargs)
        assert stagings == (["apply_rope", "_stage_rotated"] if staged else []), (staged, stagings)
        _assert_like_reference("triton", torch.float32, results[staged], expected)
    for got, want in zip(results[False], results[True]):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_triton_backward_delta_is_rowsum_in_fp32(varlen, dtype):
    """The backward's delta = rowsum(O * dO) comes from a kernel reading O and dO in their own dtype (no fp32 copies
    of them in memory), in the lse's layout: dense [B, H, L], varlen [H, T]; the same kernel writes the lse in log2
    units, -inf (a row that saw no key) as 0."""
    if "triton" not in lr2.available_backends():
        pytest.skip("the triton backend is not available here")
    from lr2kernels.ops.triton.attention import _delta

    shape = (37, 3, 80) if varlen else (2, 3, 37, 80)  # rows not a multiple of the block; head_dim not a power of 2
    out, grad_out = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    expected = (out.double() * grad_out.double()).sum(-1)
    expected = expected.transpose(0, 1) if varlen else expected
    lse = randn(*expected.shape)
    lse.view(-1)[5] = float("-inf")
    got, lse_log2 = _delta(out, grad_out, lse, varlen)
    assert got.dtype == torch.float32 and got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    expected_log2 = torch.where(lse.isinf(), 0.0, lse.double() * 1.4426950408889634)  # / ln(2)
    torch.testing.assert_close(lse_log2.double(), expected_log2, atol=1e-6, rtol=1e-6)


def test_autotune_length_buckets():
    """Autotune keys on a bucket of the length: one tuning per bucket, not per length (varlen batches change their
    longest length every step)."""
    pytest.importorskip("triton")
    from lr2kernels.ops.triton.attention import _TUNE_KEY, length_bucket

    assert "len_bucket" in _TUNE_KEY and "seq_len_dense" not in _TUNE_KEY
    assert [length_bucket(n) for n in (1, 1024, 1025, 4096, 5000, 16384, 65536, 70000, 131072, 10**7)] == [
        1024, 1024, 4096, 4096, 16384, 16384, 65536, 262144, 262144, 262144
    ]  # fmt: skip


@pytest.mark.parametrize("splits", [2, 4], ids=lambda s: f"parts{s}")
@pytest.mark.parametrize("layout", ["dense_positions", "varlen"])
def test_triton_dkdv_split_gqa_group_matches_one_program_per_kv_head(layout, splits, monkeypatch):
    """Where one dk/dv program per kv head and key tile would under-fill the GPU, each GQA group is split into parts
    whose fp32 partial sums the launcher adds. Asked for here (``group_splits``; the interpreter has no SMs to
    count): the gradients must equal the unsplit kernel's and the reference's."""
    if "triton" not in lr2.available_backends():
        pytest.skip("the triton backend is not available here")
    if layout == "varlen":
        lengths = [20, 70, 9]
        table, kwargs = make_table(32), {"cu_seqlens": cu_seqlens_of(lengths), "max_seqlen": 70}
        q, k, v = _qkv((sum(lengths), 8, 32), (sum(lengths), 2, 32), requires_grad=True)
    else:
        table = make_table(32)
        kwargs = {"position_ids": torch.arange(40, 110, device=DEVICE)[None].expand(2, -1)}  # crosses L0
        q, k, v = _qkv((2, 8, 70, 32), (2, 2, 70, 32), requires_grad=True)
    from lr2kernels.ops.triton import attention

    partials, real = [], attention._partials  # the split path's fp32 buffers: one for dk, one for dv
    monkeypatch.setattr(attention, "_partials", lambda x, parts: partials.append(parts) or real(x, parts))
    grad_out = randn(*q.shape)
    results = {
        parts: _triton_launchers(q, k, v, table, grad_out, group_splits=parts, **kwargs) for parts in (1, splits)
    }
    assert partials == [splits, splits]  # the split kernel ran (and the unsplit one needed none)
    for name, got, want in zip("qkv", results[splits][1:], results[1][1:]):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6, msg=lambda m, n=name: f"d{n}: {m}")
    _assert_like_reference("triton", torch.float32, results[splits], _reference(q, k, v, table, grad_out, **kwargs))


def test_dkdv_group_splits_fill_the_gpu_only_when_needed(monkeypatch):
    from lr2kernels.ops.triton import attention

    monkeypatch.setattr(attention, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert attention.dkdv_group_splits(1024, 4, cuda) == 1  # 1,024 programs: every SM has two already
    assert attention.dkdv_group_splits(128, 4, cuda) == 4  # 8 kv heads x 16 tiles: 128 -> 512
    assert attention.dkdv_group_splits(100, 6, cuda) == 3  # the smallest divisor that reaches 264
    assert attention.dkdv_group_splits(10, 4, cuda) == 4  # never more parts than q heads per kv head
    assert attention.dkdv_group_splits(10, 1, cuda) == 1  # no GQA: nothing to split
    assert attention.dkdv_group_splits(10, 4, torch.device("cpu")) == 1  # the interpreter: by default, never
    q, k = torch.zeros(1, 4, 8, 16), torch.zeros(1, 1, 8, 16)
    args = (q, q, k, k, q, torch.zeros(1, 4, 8), torch.ones(2, 8), torch.zeros(1, dtype=torch.int32), None, None, 8)
    with pytest.raises(ValueError, match="group_splits: expected None or a divisor of the GQA group 4, got 3"):
        attention.rope_attention_bwd(*args, True, 0.25, 1.0, 1.0, group_splits=3)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_triton_forward_without_tma_matches_the_reference(monkeypatch, causal):
    """The forward loads its key tiles through TMA descriptors bounded by each sequence where the device has TMA
    (the interpreter emulates it) and k and v allow it; v rows 33 elements apart (132 bytes, not a multiple of 16)
    take the pointer loads instead. Both give the reference's output, dense and varlen, in the diagonal and the
    sequence's last partial tile."""
    if "triton" not in lr2.available_backends():
        pytest.skip("the triton backend is not available here")
    from lr2kernels.ops.triton import attention

    chosen = []
    real = attention._use_tma
    monkeypatch.setattr(attention, "_use_tma", lambda *a: chosen.append(real(*a)) or chosen[-1])
    table = make_table(32)
    for layout in ("dense", "varlen"):
        if layout == "varlen":
            lengths = [20, 70, 9]
            kwargs = {"cu_seqlens": cu_seqlens_of(lengths), "max_seqlen": 70}
            shape_q, shape_kv = (sum(lengths), 6, 32), (sum(lengths), 2, 32)
        else:
            kwargs = {"position_ids": torch.arange(40, 110, device=DEVICE)[None].expand(2, -1)}  # crosses L0
            shape_q, shape_kv = (2, 6, 70, 32), (2, 2, 70, 32)
        q, k = randn(*shape_q), randn(*shape_kv)
        v_padded = randn(*shape_kv[:-1], 33)
        for v in (v_padded[..., :32].contiguous(), v_padded[..., :32]):
            chosen.clear()
            with torch.no_grad():
                out, lse = run("triton", lr2.rope_attention, q, k, v, table, causal=causal, return_lse=True, **kwargs)
            expected, expected_lse = reference.rope_attention(*_f64(q, k, v), table, causal=causal, return_lse=True,
                                                              **kwargs)  # fmt: skip
            assert chosen == [v.is_contiguous()], (layout, chosen)
            torch.testing.assert_close(out.double(), expected, **tolerance("triton", torch.float32))
            torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)


def test_tma_alignment_rule():
    """TMA takes a 16-byte aligned base and row strides that are multiples of 16 bytes (the descriptors' rule)."""
    pytest.importorskip("triton")
    from lr2kernels.ops.triton._host import tma_aligned

    x = torch.zeros(2, 3, 8, 32)
    assert tma_aligned(x) and tma_aligned(x.transpose(1, 2))  # any order of the leading axes
    assert not tma_aligned(torch.zeros(2, 3, 8, 33)[..., :32])  # rows 132 bytes apart
    assert not tma_aligned(torch.zeros(64)[1:33].view(2, 16))  # a base 4 bytes past an aligned one
    assert tma_aligned(torch.zeros(8, 8, dtype=torch.float16))  # 16-byte rows
    assert not tma_aligned(torch.zeros(8, 12, dtype=torch.float16))  # 24-byte rows


def test_triton_forward_rotates_large_query_blocks_in_chunks(monkeypatch):
    """A query block of more than 8K elements (128 x 128 and up on a GPU) is rotated in row chunks before it is
    staged in the output rows; forced here with 64-row blocks at 256 channels (two chunks), keys in 32-row tiles
    (the block's diagonal spans two)."""
    if "triton" not in lr2.available_backends():
        pytest.skip("the triton backend is not available here")
    import triton

    from lr2kernels.ops.triton import attention

    config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)
    monkeypatch.setattr(attention._rope_attention_fwd_kernel, "configs", [config])
    table = make_table(256)
    q, k, v = _qkv((1, 2, 100, 256), (1, 1, 100, 256))
    kwargs = {"position_ids": torch.arange(30, 130, device=DEVICE)[None]}  # crosses L0 = 64
    for causal in (True, False):
        with torch.no_grad():
            out, lse = run("triton", lr2.rope_attention, q, k, v, table, causal=causal, return_lse=True, **kwargs)
        expected, expected_lse = reference.rope_attention(*_f64(q, k, v), table, causal=causal, return_lse=True,
                                                          **kwargs)  # fmt: skip
        torch.testing.assert_close(out.double(), expected, **tolerance("triton", torch.float32))
        torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)
