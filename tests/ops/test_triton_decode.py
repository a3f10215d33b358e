"""The split-KV Triton rope_decode against reference.py, and its angle-addition cos/sin against float64.

Runs on the CPU under TRITON_INTERPRET=1 (small shapes, fp32/fp16) and on a GPU as is. Unused cache slots hold NaN
in every test: they must never be read.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

import lr2kernels as lr2
from lr2kernels import reference
from lr2kernels.ops.dispatch import backend_status
from lr2kernels.ops.triton import decode
from lr2kernels.ops.triton.decode import _step_table, _tile_angles
from lr2kernels.tables import RopeTable
from tests.ops.conftest import make_table

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not backend_status("triton", DEVICE)[0], reason=f"triton backend: {backend_status('triton', DEVICE)[1]}"
)
LENGTHS = [3, 64, 65, 130]  # both sides of L0 = 64, and exactly at it
GQA = [(4, 4), (6, 2), (8, 1)]
DIMS = [(64, 64), (80, 80), (128, 96)]
DIM_IDS = ["D64", "D80", "D128rot96"]
FP32_TOL = dict(atol=2e-5, rtol=2e-5)


def _inputs(lengths, hq, hk, n_new, head_dim, dtype=torch.float32, max_len=None):
    """q ``[B, hq, n, D]`` and caches ``[B, hk, max_len, D]`` whose slots past each length hold NaN."""
    batch, max_len = len(lengths), max_len or max(lengths) + 5
    k_cache = torch.full((batch, hk, max_len, head_dim), float("nan"), device=DEVICE)
    v_cache = torch.full((batch, hk, max_len, head_dim), float("nan"), device=DEVICE)
    for b, length in enumerate(lengths):
        k_cache[b, :, :length] = torch.randn(hk, length, head_dim, device=DEVICE)
        v_cache[b, :, :length] = torch.randn(hk, length, head_dim, device=DEVICE)
    q = torch.randn(batch, hq, n_new, head_dim, device=DEVICE)
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    return q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), cache_seqlens


def _expected(q, k_cache, v_cache, cache_seqlens, table, **kwargs):
    return reference.rope_decode(q.double(), k_cache.double(), v_cache.double(), cache_seqlens, table, **kwargs)


@pytest.mark.parametrize("head_dim,rotary_dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"H{h[0]}kv{h[1]}")
@pytest.mark.parametrize("n_new", [1, 3], ids=lambda n: f"new{n}")
def test_fp32_matches_reference(n_new, heads, head_dim, rotary_dim):
    table = make_table(head_dim, rotary_dim=rotary_dim)
    q, k_cache, v_cache, cache_seqlens = _inputs(LENGTHS, *heads, n_new, head_dim)
    out = lr2.rope_decode(q, k_cache, v_cache, cache_seqlens, table, backend="triton")
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _expected(q, k_cache, v_cache, cache_seqlens, table), **FP32_TOL)


@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 96)], ids=["D64", "D128rot96"])
@pytest.mark.parametrize("heads", [(6, 2), (8, 1)], ids=lambda h: f"H{h[0]}kv{h[1]}")
@pytest.mark.parametrize("n_new", [1, 3], ids=lambda n: f"new{n}")
def test_fp16_error_at_most_twice_torch(n_new, heads, head_dim, rotary_dim):
    table = make_table(head_dim, rotary_dim=rotary_dim)
    q, k_cache, v_cache, cache_seqlens = _inputs(LENGTHS, *heads, n_new, head_dim, dtype=torch.float16)
    expected = _expected(q, k_cache, v_cache, cache_seqlens, table)
    out = lr2.rope_decode(q, k_cache, v_cache, cache_seqlens, table, backend="triton")
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch_out = lr2.rope_decode(q, k_cache, v_cache, cache_seqlens, table, backend="torch")
    error = (out.double() - expected).abs().max().item()
    torch_error = (torch_out.double() - expected).abs().max().item()
    assert error <= 2 * torch_error + 2e-4, f"triton fp16 error {error:.2e}, torch fp16 error {torch_error:.2e}"


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7], ids=lambda s: f"splits{s}")
def test_num_splits_give_the_same_result(num_splits):
    # 7 splits leave the short sequences with empty splits (lse -inf) that the merge must ignore.
    table = make_table(64)
    q, k_cache, v_cache, cache_seqlens = _inputs([3, 64, 65, 130, 257], 6, 2, 3, 64)
    out = decode.rope_decode(q, k_cache, v_cache, cache_seqlens, table, num_splits=num_splits)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _expected(q, k_cache, v_cache, cache_seqlens, table), **FP32_TOL)


def test_thousands_of_positions_straddling_l0():
    # L0 = 2048: one sequence per side of it and one exactly at it; the angles reach ~3000 rad.
    table = make_table(64, original_max_position=2048)
    q, k_cache, v_cache, cache_seqlens = _inputs([2048, 2049, 3001], 4, 2, 2, 64)
    out = decode.rope_decode(q, k_cache, v_cache, cache_seqlens, table, num_splits=3)
    torch.testing.assert_close(out.double(), _expected(q, k_cache, v_cache, cache_seqlens, table), **FP32_TOL)


def test_strided_inputs_and_softmax_scale():
    table = make_table(80)
    q, k_cache, v_cache, cache_seqlens = _inputs(LENGTHS, 6, 2, 2, 80)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, n, D] view of a [B, n, Hq, D] tensor
    k_wide = torch.full((*k_cache.shape[:-1], 96), float("nan"), device=DEVICE)
    k_wide[..., :80] = k_cache
    k_cache = k_wide[..., :80]  # row stride 96
    v_cache = v_cache.transpose(1, 2).contiguous().transpose(1, 2)  # head stride < token stride
    out = lr2.rope_decode(q, k_cache, v_cache, cache_seqlens, table, backend="triton", softmax_scale=0.3)
    expected = _expected(q, k_cache, v_cache, cache_seqlens, table, softmax_scale=0.3)
    torch.testing.assert_close(out.double(), expected, **FP32_TOL)


def test_bad_num_splits():
    table = make_table(64)
    q, k_cache, v_cache, cache_seqlens = _inputs([3], 2, 1, 1, 64)
    with pytest.raises(ValueError, match=r"num_splits: expected an int >= 1 or None, got 0"):
        decode.rope_decode(q, k_cache, v_cache, cache_seqlens, table, num_splits=0)


@triton.jit
def _tile_angles_kernel(
    STARTS, INV_FREQ, COS, SIN, attention, HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_N: tl.constexpr
):
    pid = tl.program_id(0)
    start = tl.load(STARTS + pid)
    cols = tl.arange(0, HALF_PAD)
    inv_freq = tl.load(INV_FREQ + cols, mask=cols < HALF, other=0.0)
    cos_step, sin_step = _step_table(inv_freq, BLOCK_N)
    cos, sin = _tile_angles(start, inv_freq, cos_step, sin_step, attention, BLOCK_N)
    offs = (pid * BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * HALF + cols[None, :]
    mask = (cols < HALF)[None, :]
    tl.store(COS + offs, cos, mask=mask)
    tl.store(SIN + offs, sin, mask=mask)


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_angle_addition_precision_up_to_131k(long):
    """The key tiles' cos/sin (one sincos per tile + angle addition) reproduce HF's fp32 cos/sin, so their error
    against float64 is HF's own, at every sampled position up to 131071."""
    half, block_n = 64, 64
    table = RopeTable.longrope(
        head_dim=2 * half,
        base=500000.0,
        original_max_position=4096,
        max_position=131072,
        short_factor=[1.0 + 0.05 * i / half for i in range(half)],
        long_factor=[1.0 + 31.0 * (i / (half - 1)) ** 1.5 for i in range(half)],
    )
    generator = torch.Generator().manual_seed(0)
    tiles = torch.cat(
        [
            torch.tensor([0, 1, 63, 64, 1023, 1024, 2047, 2048]),  # the first tiles and around powers of two
            torch.tensor([65535, 65536, 131071]) // block_n,  # where fp32's angle ulp doubles, and the last tile
            torch.randint(0, 131072 // block_n, (48,), generator=generator),
        ]
    )
    starts = (tiles * block_n).to(torch.int32)
    inv_freq = table.inv_freq(long)
    attention = table.attention_factor_for(long)
    cos = torch.empty(len(starts) * block_n, half, device=DEVICE)
    sin = torch.empty_like(cos)
    _tile_angles_kernel[(len(starts),)](
        starts.to(DEVICE), inv_freq.to(DEVICE), cos, sin, attention,
        HALF=half, HALF_PAD=half, BLOCK_N=block_n, enable_fp_fusion=False,
    )  # fmt: skip
    positions = (starts[:, None].long() + torch.arange(block_n)).reshape(-1)  # [len(starts) * block_n]
    angle64 = positions.double()[:, None] * inv_freq.double()[None, :]  # float64 truth from the same fp32 inv_freq
    cos64, sin64 = torch.cos(angle64) * attention, torch.sin(angle64) * attention
    hf_cos, hf_sin = (x[:, :half].double() for x in table.cos_sin(positions, long=long))  # HF's fp32 path
    for name, ours, hf, truth in (("cos", cos, hf_cos, cos64), ("sin", sin, hf_sin, sin64)):
        ours = ours.cpu().double()
        error, hf_error = (ours - truth).abs().max().item(), (hf - truth).abs().max().item()
        assert error <= hf_error + 1e-6, f"{name}: angle addition error {error:.3e} vs HF fp32 {hf_error:.3e}"
        assert (ours - hf).abs().max().item() <= 2e-6 * attention, f"{name}: differs from HF's fp32 rounding"
    assert hf_error > 1e-3 * attention or not long  # the test is sharp: fp32 angles are coarse near 131K
    assert math.isfinite(error)
