"""csrc/ compiled for the host (g++) through a ctypes shim, against lr2kernels.reference / torch fp64.

Two layers: the inline math every kernel calls (csrc/rope_math.cuh: angle, pair rotation, online-softmax update and
merge), and the REAL rope_decode kernel bodies with their launch (csrc/rope_decode.cuh), run block by block by the
emulation of tests/cuda/host_cuda (each CUDA thread a fiber; barriers, warp shuffles and cp.async emulated; 16-byte
alignment checked). On the device, rope_cos_sin uses CUDA's sincosf (2 ulp, full-range argument reduction); on the
host the shim uses libm's sinf/cosf: the angles (one fp32 multiply) are bit-identical either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from lr2kernels import reference
from lr2kernels.tables import RopeTable
from tests.cuda.helpers import CSRC, host_compiler, load_ptxas_report

SHIM = CSRC.parent / "tests" / "cuda" / "host_math_shim.cpp"
HOST_CUDA = SHIM.parent / "host_cuda"
HEAD_DIM = 128
L0 = 4096


@pytest.fixture(scope="session")
def shim(tmp_path_factory):
    compiler = host_compiler()
    if compiler is None:
        pytest.skip("no host C++ compiler (g++, c++ or clang++) to build the rope_math.cuh shim")
    library = tmp_path_factory.mktemp("rope_math") / "librope_math.so"
    # -ffp-contract=off: every product rounded on its own, as the device code's angle (a single multiply) is.
    cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-DLR2_HOST_EMULATION",
           f"-I{HOST_CUDA}", f"-I{CSRC}", str(SHIM), "-o", str(library)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}"
    lib = ctypes.CDLL(str(library))
    lib.lr2_rope_decode.restype = ctypes.c_char_p
    lib.lr2_library_path = str(library)
    return lib


def _p(t: torch.Tensor) -> ctypes.c_void_p:
    assert t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def _f(x: float) -> ctypes.c_float:
    return ctypes.c_float(x)


@pytest.fixture(scope="module")
def table() -> RopeTable:
    gen = torch.Generator().manual_seed(0)
    half = HEAD_DIM // 2
    short = (1.0 + torch.rand(half, generator=gen) * 0.5).tolist()
    long = torch.linspace(1.0, 40.0, half).mul(1.0 + 0.1 * torch.rand(half, generator=gen)).tolist()
    return RopeTable.longrope(head_dim=HEAD_DIM, base=10000.0, original_max_position=L0, max_position=32 * L0,
                              short_factor=short, long_factor=long)  # fmt: skip


def _positions() -> torch.Tensor:
    edges = torch.tensor([0, 1, 2, 3, L0 - 1, L0, L0 + 1, 2**17 - 1, 2**17, 2**20 - 1, 2**20])
    return torch.cat([edges, torch.arange(0, 2**20, 4093)]).to(torch.int32).contiguous()


def _angles(shim, positions, inv_freq, attention):
    n, half = positions.numel(), inv_freq.numel()
    angle, cos, sin = (torch.empty(n, half, dtype=torch.float32) for _ in range(3))
    shim.lr2_angles(_p(positions), n, _p(inv_freq), half, _f(attention), _p(angle), _p(cos), _p(sin))
    return angle, cos, sin


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_angles_are_hf_fp32_and_cos_sin_accurate(shim, table, long):
    positions = _positions()
    inv_freq = table.inv_freq(long).float().contiguous()
    attention = table.attention_factor_for(long)
    angle, cos, sin = _angles(shim, positions, inv_freq, attention)
    # The angle: float32(position) * inv_freq rounded once, bit for bit as HF / the torch backend.
    expected = positions.float()[:, None] * inv_freq
    assert torch.equal(angle, expected)
    # cos/sin against fp64 of the same fp32 angle, and no worse than HF's own fp32 path (table.cos_sin).
    exact_cos = torch.cos(expected.double()) * attention
    exact_sin = torch.sin(expected.double()) * attention
    hf_cos, hf_sin = table.cos_sin(positions.long(), long=long)
    half = inv_freq.numel()
    hf_error = max(
        (hf_cos[:, :half].double() - exact_cos).abs().max(), (hf_sin[:, :half].double() - exact_sin).abs().max()
    )
    our_error = max((cos.double() - exact_cos).abs().max(), (sin.double() - exact_sin).abs().max())
    assert our_error <= max(float(hf_error), 1.5e-7 * attention), (our_error, hf_error)


@pytest.mark.parametrize("tile", [16, 32, 64])
@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_angle_addition_gives_hf_angles_cos_sin(shim, table, long, tile):
    """The decode kernel's keys in fp16/bf16: one sincosf per tile of keys plus a step table (rope_cos_sin_step)
    give the cos/sin of HF's once-rounded fp32 angle within twice the error of a sincosf per key, up to 2^20
    positions (measured: 2.9e-7 against 1.4e-7; HF rounds cos/sin to the model's fp16/bf16, 1e-3, on that path). The
    fp32 kernel keeps a sincosf per key: HF's fp32 path is 1.4e-7."""
    positions = torch.cat([_positions(), torch.arange(2**17 - 3 * tile, 2**17 + 3 * tile)]).to(torch.int32)
    positions = positions.contiguous()
    inv_freq = table.inv_freq(long).float().contiguous()
    attention = table.attention_factor_for(long)
    n, half = positions.numel(), inv_freq.numel()
    cos, sin = (torch.empty(n, half, dtype=torch.float32) for _ in range(2))
    shim.lr2_angles_by_steps(_p(positions), n, _p(inv_freq), half, _f(attention), tile, _p(cos), _p(sin))
    hf_angle = positions.float()[:, None] * inv_freq  # fp32, rounded once
    exact_cos = torch.cos(hf_angle.double()) * attention
    exact_sin = torch.sin(hf_angle.double()) * attention
    _, direct_cos, direct_sin = _angles(shim, positions, inv_freq, attention)  # one sincos per key
    direct = max((direct_cos.double() - exact_cos).abs().max(), (direct_sin.double() - exact_sin).abs().max())
    stepped = max((cos.double() - exact_cos).abs().max(), (sin.double() - exact_sin).abs().max())
    assert stepped <= max(2 * float(direct), 3e-7 * attention), (stepped, direct)


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_rotation_equals_reference(shim, table, long):
    positions = _positions()[:64].contiguous()
    inv_freq = table.inv_freq(long).float().contiguous()
    _, cos, sin = _angles(shim, positions, inv_freq, table.attention_factor_for(long))
    x = torch.randn(positions.numel(), HEAD_DIM, generator=torch.Generator().manual_seed(1))
    y = torch.empty_like(x)
    shim.lr2_rotate(_p(x), x.shape[0], HEAD_DIM // 2, _p(cos), _p(sin), 0, _p(y))
    cos_full, sin_full = torch.cat((cos, cos), -1).double(), torch.cat((sin, sin), -1).double()
    torch.testing.assert_close(y.double(), reference.rotate(x.double(), cos_full, sin_full), atol=2e-6, rtol=1e-6)
    # The transposed rotation (the backward) undoes it up to the attention factor squared.
    back = torch.empty_like(x)
    shim.lr2_rotate(_p(y), x.shape[0], HEAD_DIM // 2, _p(cos), _p(sin), 1, _p(back))
    torch.testing.assert_close(back.double(), reference.rotate(y.double(), cos_full, -sin_full), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(back.double() / table.attention_factor_for(long) ** 2, x.double(), atol=3e-6, rtol=1e-6)


@pytest.mark.parametrize(("from_long", "to_long"), [(False, True), (True, False)])
def test_rerotate_cos_sin(shim, table, from_long, to_long):
    positions = _positions()
    scale = table.attention_factor_for(to_long) / table.attention_factor_for(from_long)
    angle_f, cos_f, sin_f = _angles(shim, positions, table.inv_freq(from_long).float().contiguous(), 1.0)
    angle_t, cos_t, sin_t = _angles(shim, positions, table.inv_freq(to_long).float().contiguous(), scale)
    c, s = ctypes.c_float(), ctypes.c_float()
    diff = angle_t.double() - angle_f.double()
    for index in [0, 5, 100, positions.numel() * table.rotary_dim // 2 - 1]:
        i, j = divmod(index, table.rotary_dim // 2)
        args = (float(cos_f[i, j]), float(sin_f[i, j]), float(cos_t[i, j]), float(sin_t[i, j]))
        shim.lr2_rerotate_cos_sin(*map(_f, args), ctypes.byref(c), ctypes.byref(s))
        assert c.value == pytest.approx(scale * math.cos(diff[i, j]), abs=5e-7)
        assert s.value == pytest.approx(scale * math.sin(diff[i, j]), abs=5e-7)


def _state(shim, scores, v):
    m, l = ctypes.c_float(), ctypes.c_float()
    acc = torch.empty(v.shape[1])
    shim.lr2_softmax_state(_p(scores), _p(v), scores.numel(), v.shape[1], ctypes.byref(m), ctypes.byref(l), _p(acc))
    return m.value, l.value, acc


def _expected(scores, v):
    """softmax over the union in fp64 (scores in log2 units), and lse in log2 units; masked everywhere: 0, -inf."""
    s = scores.double() * math.log(2.0)
    if torch.isinf(s).all():
        return torch.zeros(v.shape[1], dtype=torch.float64), -math.inf
    w = torch.softmax(s, 0)
    return w @ v.double(), float(torch.logsumexp(s, 0)) / math.log(2.0)


@pytest.mark.parametrize("case", ["split", "one_empty", "both_empty", "huge_scores"])
def test_softmax_merge_equals_softmax_over_union(shim, case):
    gen = torch.Generator().manual_seed(2)
    n, d, cut = 37, 16, 15
    scores = torch.randn(n, generator=gen) * 4
    scores[torch.rand(n, generator=gen) < 0.2] = -math.inf  # some masked keys
    if case == "one_empty":
        scores[:cut] = -math.inf
    elif case == "both_empty":
        scores[:] = -math.inf
    elif case == "huge_scores":
        scores = scores * 100
    v = torch.randn(n, d, generator=gen)
    expected_out, expected_lse = _expected(scores, v)
    state_a = _state(shim, scores[:cut].contiguous(), v[:cut].contiguous())
    state_b = _state(shim, scores[cut:].contiguous(), v[cut:].contiguous())

    out, lse = torch.empty(d), ctypes.c_float()
    shim.lr2_merge_finish(_f(state_a[0]), _f(state_a[1]), _p(state_a[2]), _f(state_b[0]), _f(state_b[1]),
                          _p(state_b[2]), d, _p(out), ctypes.byref(lse))  # fmt: skip
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), expected_out, atol=2e-6, rtol=2e-6)
    assert lse.value == pytest.approx(expected_lse, abs=2e-5) if math.isfinite(expected_lse) else lse.value == -math.inf

    # The split combine of the merge kernel: each state finished to (o, lse), then combined by lse.
    parts, lses = [], []
    for m, l, acc in (state_a, state_b):
        o, part_lse = torch.empty(d), ctypes.c_float()
        shim.lr2_finish(_f(m), _f(l), _p(acc), d, _p(o), ctypes.byref(part_lse))
        parts.append(o)
        lses.append(part_lse.value)
    combined = torch.empty(d)
    stacked, lse_t = torch.stack(parts).contiguous(), torch.tensor(lses, dtype=torch.float32)
    shim.lr2_combine(_p(stacked), _p(lse_t), 2, d, _p(combined))
    torch.testing.assert_close(combined.double(), expected_out, atol=2e-6, rtol=2e-6)


# ------------------------------------------------------------------------------------ rope_decode kernel bodies
DECODE_L0 = 40
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Error of the kernel's output against fp64 of the same inputs: the output's own rounding (and fp32 accumulation).
_DECODE_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# The emulation's two schedules (tests/cuda/host_cuda/lr2_host.h): cp.async performed at its wait with threads in
# turn (a stage read before its wait fails), and at issue with warp 0 running ahead (a stage refilled while another
# warp still reads it fails).
SCHEDULES = {"late-copies": (0, 0), "eager-copies-greedy": (1, 1)}


@pytest.fixture(params=list(SCHEDULES))
def decode_shim(shim, request):
    shim.lr2_host_mode(*SCHEDULES[request.param])
    yield shim
    shim.lr2_host_mode(0, 0)


def _decode_table(head_dim: int, rotary_dim: int | None = None) -> RopeTable:
    gen = torch.Generator().manual_seed(head_dim)
    half = (rotary_dim or head_dim) // 2
    short = (1.0 + torch.rand(half, generator=gen) * 0.5).tolist()
    long = torch.linspace(1.0, 8.0, half).mul(1.0 + 0.1 * torch.rand(half, generator=gen)).tolist()
    return RopeTable.longrope(head_dim=head_dim, base=10000.0, original_max_position=DECODE_L0,
                              max_position=8 * DECODE_L0, short_factor=short, long_factor=long,
                              rotary_dim=rotary_dim)  # fmt: skip


def _strides(x: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * 3)(*x.stride()[:3])


def _host_decode(shim, q, k_cache, v_cache, seqlens, table, num_splits, capacity=None, min_keys=16, parts=False,
                 block_table=None, expect_error=None):  # fmt: skip
    """The CUDA rope_decode (kernel bodies and launch) on the host; out filled with NaN first (an unwritten element
    fails). k_cache/v_cache may be views into larger buffers (their strides are passed). num_splits is the grid's;
    a sequence uses min(num_splits, ceil(len / min_keys)). parts: also the split partials (NaN where unwritten).
    block_table: paged caches [num_blocks, block_size, Hk, D] (capacity max_blocks * block_size). expect_error: the
    launch's refusal is returned instead of asserted away."""
    batch, num_q_heads, n_new, head_dim = q.shape
    if block_table is None:
        num_kv_heads = k_cache.shape[1]
        capacity = k_cache.shape[2] if capacity is None else capacity
        k_strides, v_strides = _strides(k_cache), _strides(v_cache)
        paged = (None, ctypes.c_int64(0), 0, 0)
    else:
        num_blocks, block_size, num_kv_heads = k_cache.shape[:3]
        capacity = block_table.shape[1] * block_size if capacity is None else capacity
        k_strides, v_strides = ((ctypes.c_int64 * 3)(*(x.stride()[i] for i in (0, 2, 1))) for x in (k_cache, v_cache))
        block_table = block_table.to(torch.int32).contiguous()
        paged = (_p(block_table), ctypes.c_int64(block_table.stride(0)), block_size, num_blocks)
    group = num_q_heads // num_kv_heads
    out = torch.full_like(q, math.nan)
    rows = group * n_new
    o_part = torch.full((batch * num_kv_heads, num_splits, rows, head_dim), math.nan)
    lse_part = torch.full((batch * num_kv_heads, num_splits, rows), math.nan)
    inv_freq = torch.stack([table.inv_freq(False), table.inv_freq(True)]).float().contiguous()
    seqlens = seqlens.to(torch.int32).contiguous()
    error = shim.lr2_rope_decode(
        _DTYPE_CODES[q.dtype], ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(k_cache.data_ptr()),
        ctypes.c_void_p(v_cache.data_ptr()), ctypes.c_void_p(out.data_ptr()), _p(o_part), _p(lse_part),
        _p(seqlens), _p(inv_freq), _strides(q), k_strides, v_strides, _strides(out),
        batch, num_kv_heads, group, n_new, table.rotary_dim // 2, head_dim, num_splits, min_keys, capacity,
        table.original_max_position, _f(head_dim**-0.5 * 1.4426950408889634), _f(table.attention_factor_for(False)),
        _f(table.attention_factor_for(True)), *paged,
    )  # fmt: skip
    if expect_error is not None:
        return error.decode()
    assert error == b"", error.decode()
    return (out, o_part, lse_part) if parts else out


def _reference_rows(q, k_cache, v_cache, seqlens, table, b):
    """fp64 reference of sequence b alone (its keys 0..len-1)."""
    length = int(seqlens[b])
    k = k_cache[b : b + 1, :, :length].double()
    v = v_cache[b : b + 1, :, :length].double()
    return reference.rope_decode(q[b : b + 1].double(), k, v, torch.tensor([length]), table)[0]


def _poisoned_cache(gen, batch, heads, capacity, head_dim, dtype, seqlens, pad=16):
    """[B, Hk, capacity, D] as a view into a buffer of capacity + pad positions: every position at or past a
    sequence's length (and all the memory past the capacity) holds NaN, so a key read there turns its row NaN."""
    buf = torch.randn(batch, heads, capacity + pad, head_dim, generator=gen).to(dtype)
    for b, length in enumerate(seqlens.tolist()):
        buf[b, :, max(0, min(length, capacity)) :] = math.nan
    return buf[:, :, :capacity]


def _check_decode(shim, head_dim, rotary_dim, dtype, batch, hq, hk, n_new, capacity, seqlens, splits, min_keys=16):
    gen = torch.Generator().manual_seed(hash((head_dim, hq, n_new, capacity)) % 2**31)
    table = _decode_table(head_dim, rotary_dim)
    lengths = torch.tensor(seqlens)
    q = torch.randn(batch, hq, n_new, head_dim, generator=gen).to(dtype)
    k = _poisoned_cache(gen, batch, hk, capacity, head_dim, dtype, lengths)
    v = _poisoned_cache(gen, batch, hk, capacity, head_dim, dtype, lengths)
    out, o_part, _ = _host_decode(shim, q, k, v, lengths, table, splits, min_keys=min_keys, parts=True)
    for b in range(batch):
        expected = _reference_rows(q, k, v, lengths, table, b)
        torch.testing.assert_close(out[b].double(), expected, atol=_DECODE_ATOL[dtype], rtol=0)
    return o_part


DECODE_CASES = [
    # (head_dim, rotary_dim, dtype, batch, q heads, kv heads, n_new, capacity, seqlens, splits)
    (128, None, torch.float32, 3, 6, 2, 2, 90, (37, 90, 5), 1),  # rows 6 -> 8 per block, 6 tiles in one split
    (128, None, torch.float32, 3, 6, 2, 2, 90, (37, 90, 5), 3),
    (128, None, torch.bfloat16, 2, 4, 4, 1, 130, (130, 100), 1),  # MHA: one row per block, 9 tiles
    (128, None, torch.float16, 1, 2, 1, 1, 75, (75,), 2),  # two rows
    (64, None, torch.float16, 2, 8, 1, 1, 77, (77, 41), 4),  # 8 rows
    (64, None, torch.float32, 1, 9, 3, 1, 100, (100,), 1),  # 3 rows -> 4
    (96, None, torch.bfloat16, 2, 3, 3, 3, 70, (2, 70), 2),  # 3 rows -> 4, a sequence shorter than n_new
    (96, None, torch.float32, 1, 10, 1, 1, 50, (50,), 1),  # 10 rows: two row blocks of 8
    (128, 96, torch.bfloat16, 1, 12, 4, 1, 66, (61,), 5),  # partial rotary (Phi-4-mini's 96 of 128)
    (256, None, torch.float16, 2, 10, 2, 1, 50, (50, 39), 2),  # 5 rows -> 4 per block at head 256, two row blocks
    (256, None, torch.bfloat16, 1, 1, 1, 1, 45, (45,), 1),
    # head 256 at 4 rows on tensor cores (dynamic shared memory, each warp its own keys): group 4 with lengths on both
    # sides of L0 and 3 splits; group 8 as two row blocks of 4; 2 x 2 new tokens; partial rotary at group 3
    (256, None, torch.bfloat16, 2, 8, 2, 1, 91, (91, 37), 3),
    (256, None, torch.float16, 1, 16, 2, 1, 75, (75,), 2),
    (256, None, torch.float16, 1, 4, 2, 2, 67, (67,), 1),
    (256, 128, torch.bfloat16, 1, 6, 2, 1, 70, (45,), 2),
    # fp16/bf16 at 8 rows run on tensor cores (mma.sync, emulated): groups of 8, 4 x 2 new tokens, partial rotary,
    # 8 + 2 rows (an mma row block and a CUDA-core one)
    (128, None, torch.bfloat16, 2, 16, 2, 1, 100, (100, 61), 3),
    (96, None, torch.float16, 1, 8, 2, 2, 80, (80,), 2),
    (128, 96, torch.bfloat16, 1, 8, 1, 1, 70, (70,), 1),
    (64, None, torch.bfloat16, 1, 10, 1, 1, 50, (50,), 1),
]


@pytest.mark.parametrize(
    ("head_dim", "rotary_dim", "dtype", "batch", "hq", "hk", "n_new", "capacity", "seqlens", "splits"),
    DECODE_CASES,
    ids=[f"D{c[0]}{'-r' + str(c[1]) if c[1] else ''}-{str(c[2])[6:]}-B{c[3]}-{c[4]}x{c[5]}-n{c[6]}-s{c[9]}"
         for c in DECODE_CASES],
)  # fmt: skip
def test_decode_kernel_equals_reference(decode_shim, head_dim, rotary_dim, dtype, batch, hq, hk, n_new, capacity,
                                        seqlens, splits):  # fmt: skip
    """The kernel bodies against the fp64 reference: odd shapes, GQA and MHA (rows per block 1, 2, 4, 8, and two row
    blocks), several new tokens, lengths on both sides of L0 (short and long table per sequence), multi-tile
    pipelines, split-KV with its merge, positions past each length NaN."""
    _check_decode(decode_shim, head_dim, rotary_dim, dtype, batch, hq, hk, n_new, capacity, seqlens, splits)


def test_decode_splits_follow_each_sequence_length(decode_shim):
    """The grid has 6 splits and a split at least 32 keys (chunks are multiples of 32): a sequence of 200 keys uses 4
    (6 would need chunks of 34), one of 192 all 6, one of 70 uses 3, one of 20 uses 1 (the decode kernel writes it,
    no partial). The partials of the splits a sequence does not use stay unwritten (NaN); the outputs are exact."""
    o_part = _check_decode(decode_shim, 64, None, torch.float16, 4, 2, 1, 1, 200, (200, 192, 70, 20), 6, min_keys=32)
    written = ~torch.isnan(o_part).all(dim=(2, 3))  # [B * Hk, splits]
    assert written.tolist() == [[True] * 4 + [False] * 2, [True] * 6, [True] * 3 + [False] * 3, [False] * 6]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_overlong_sequence_gets_nan_rows(decode_shim, dtype, splits):
    """A cache_seqlens past the capacity: NaN in every output element of that sequence's rows, the others exact; the
    memory past the capacity is NaN, so a read there would also show in the other sequences' rows."""
    gen = torch.Generator().manual_seed(7)
    head_dim, capacity = 64, 48
    table = _decode_table(head_dim)
    lengths = torch.tensor([30, capacity + 1, capacity, 2 * capacity + 5])
    q = torch.randn(4, 4, 2, head_dim, generator=gen).to(dtype)
    k = _poisoned_cache(gen, 4, 2, capacity, head_dim, dtype, lengths)
    v = _poisoned_cache(gen, 4, 2, capacity, head_dim, dtype, lengths)
    out = _host_decode(decode_shim, q, k, v, lengths, table, splits)
    for b in (1, 3):
        assert torch.isnan(out[b]).all(), f"sequence {b} is over the capacity: every element must be NaN"
    for b in (0, 2):
        torch.testing.assert_close(out[b].double(), _reference_rows(q, k, v, lengths, table, b),
                                   atol=_DECODE_ATOL[dtype], rtol=0)  # fmt: skip


def test_decode_rejects_misaligned_16_byte_copies(shim):
    """The kernel reads k and v in 16-byte copies: the emulation fails a misaligned one, as the GPU would fault (the
    Python launcher rejects such a cache with a ValueError before any launch)."""
    table = _decode_table(64)
    buf = torch.randn(1, 1, 33 * 64 + 1)
    k = buf[..., 1:].view(1, 1, 33, 64)  # data pointer 4 bytes past a 16-byte boundary
    q = torch.randn(1, 1, 1, 64)
    with pytest.raises(AssertionError, match="misaligned"):
        _host_decode(shim, q, k, k, torch.tensor([33]), table, 1)


_GUARD_SCRIPT = textwrap.dedent(
    """
    import ctypes, math, mmap, sys
    import torch
    sys.path.insert(0, {root!r})
    from tests.cuda import test_host_math as t

    shim = ctypes.CDLL({library!r})
    shim.lr2_rope_decode.restype = ctypes.c_char_p
    shim.lr2_host_mode({eager}, {eager})
    libc = ctypes.CDLL(None)
    page = mmap.PAGESIZE
    batch, heads, capacity, head_dim, dtype = 2, 2, 40, {head_dim}, torch.{dtype}
    size = torch.empty((), dtype=dtype).element_size()
    nbytes = batch * heads * capacity * head_dim * size
    pages = -(-nbytes // page)
    region = mmap.mmap(-1, (pages + 1) * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert libc.mprotect(ctypes.c_void_p(base + pages * page), page, 0) == 0  # PROT_NONE right after the cache
    flat = torch.frombuffer(region, dtype=dtype, count=pages * page // size)
    cache = flat[(pages * page - nbytes) // size :].view(batch, heads, capacity, head_dim)
    cache.copy_(torch.randn(cache.shape))
    lengths = torch.tensor([capacity, capacity + 300])  # the last sequence, last kv head, ends at the guard page
    q = torch.randn(batch, {hq}, 1, head_dim).to(dtype)
    out = t._host_decode(shim, q, cache, cache, lengths, t._decode_table(head_dim), {splits})
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
    print("ok")
    """
)


# The guard tests' kernels: fp32 head 64 at 2 rows (CUDA cores), and fp16 head 256 at 4 rows (tensor cores, each warp
# copying and looking up its own keys).
_GUARD_KERNELS = {"fp32-D64-2rows": ("float32", 64, 4), "fp16-D256-4rows": ("float16", 256, 8)}


@pytest.mark.parametrize("kernel", list(_GUARD_KERNELS))
@pytest.mark.parametrize("eager", [0, 1], ids=["late-copies", "eager-copies"])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_overlong_sequence_reads_nothing_past_the_capacity(shim, splits, eager, kernel):
    """The cache of the over-long sequence ends right before an inaccessible page: a key read at or past the capacity
    is a segmentation fault (in a child process, so the test fails instead of the run)."""
    dtype, head_dim, hq = _GUARD_KERNELS[kernel]
    script = _GUARD_SCRIPT.format(root=str(CSRC.parent), library=shim.lr2_library_path, splits=splits, eager=eager,
                                  dtype=dtype, head_dim=head_dim, hq=hq)  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (result.returncode, result.stderr[-2000:])


@pytest.mark.parametrize("element_bytes", [2, 4])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_decode_model_mirrors_the_kernel_shape(shim, element_bytes, head_dim):
    """csrc/ptxas_report.py's bandwidth model uses a Python copy of DecodeShape: it must agree with the C++ one."""
    model = load_ptxas_report()
    for rows in (1, 2, 4, 8) if head_dim < 256 else (1, 2, 4):
        out = (ctypes.c_int * 9)()
        assert shim.lr2_decode_shape(element_bytes, head_dim, rows, out) == 0
        shape = model.DecodeShape(element_bytes, head_dim, rows)
        mirror = (shape.lanes_per_key, shape.slots_per_lane, shape.tile, shape.stages, shape.stage_bytes,
                  shape.min_blocks, shape.page_span, shape.dynamic_bytes, shape.smem_bytes)  # fmt: skip
        assert tuple(out) == mirror, (head_dim, rows)
        # Dynamic shared memory exactly where a block needs more than 48 KB: fp16/bf16 head 256 at 4 rows.
        assert bool(shape.dynamic_bytes) == (element_bytes == 2 and head_dim == 256 and rows == 4)


# ------------------------------------------------------------------------------- rope_decode on a paged cache
def _paged_layout(gen, lengths, block_size, max_blocks, share_first=0, spare=2):
    """A shuffled block table [B, max_blocks]: sequence b's ceil(len / block_size) blocks (the capacity's for an
    over-long one) drawn in random order from the pool, the first `share_first` of sequence 1 being sequence 0's (a
    shared prefix), `spare` blocks nobody uses. The entries past a sequence's blocks hold ids outside the pool (-1,
    num_blocks + 7), as a padded table may: the kernel must never read them (a read would give NaN rows)."""
    capacity = max_blocks * block_size
    needed = [-(-min(length, capacity) // block_size) for length in lengths]
    num_blocks = sum(needed) - (share_first if len(lengths) > 1 else 0) + spare
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.empty(len(lengths), max_blocks, dtype=torch.int32)
    for b, count in enumerate(needed):
        ids = table[0, :share_first].tolist() if b == 1 else []
        ids += [pool.pop() for _ in range(count - len(ids))]
        table[b] = torch.tensor(ids + [-1 if (b + i) % 2 else num_blocks + 7 for i in range(max_blocks - count)])
    return table, num_blocks


def _paged_caches(gen, table, num_blocks, lengths, block_size, heads, head_dim, dtype):
    """k and v [num_blocks, block_size, Hk, D] as the two halves of one [num_blocks, 2, block_size, Hk, D] buffer
    (vLLM's kv_cache[:, 0] and [:, 1]: the block stride is twice a block). Every slot no sequence's length reaches
    holds NaN, so a key read there turns a row NaN."""
    live = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    capacity = table.shape[1] * block_size
    for b, length in enumerate(lengths):
        for j in range(length if length <= capacity else 0):
            block = int(table[b, j // block_size])
            if 0 <= block < num_blocks:  # (a test's bad id names no slot)
                live[block, j % block_size] = True
    kv = torch.randn(num_blocks, 2, block_size, heads, head_dim, generator=gen).to(dtype)
    kv[~live[:, None, :].expand(-1, 2, -1)] = math.nan
    return kv[:, 0], kv[:, 1]


def _paged_reference(q, k, v, lengths, table, block_table, b):
    """fp64 reference of sequence b alone through lr2kernels.reference's paged path (its blocks gathered)."""
    length = torch.tensor([int(lengths[b])])
    return reference.rope_decode(q[b : b + 1].double(), k.double(), v.double(), length, table,
                                 block_table=block_table[b : b + 1])[0]  # fmt: skip


PAGED_CASES = [
    # (head_dim, rotary_dim, dtype, q heads, kv heads, n_new, block_size, max_blocks, seqlens, splits, shared blocks)
    (128, None, torch.bfloat16, 4, 4, 1, 16, 6, (37, 90, 5), 1, 2),  # MHA (1 row), block = the 16-key tile
    (128, None, torch.bfloat16, 4, 2, 1, 48, 3, (100, 61), 2, 1),  # blocks of 48: not a power of two (a divide)
    (128, None, torch.float16, 4, 2, 1, 32, 4, (70, 128), 3, 1),  # group 2, a length at the capacity, 3 splits
    (64, None, torch.float32, 8, 2, 1, 32, 3, (33, 96), 2, 1),  # group 4
    (64, None, torch.float16, 8, 1, 1, 64, 2, (100, 41), 4, 0),  # group 8, blocks of 64
    (64, None, torch.bfloat16, 4, 1, 2, 32, 3, (80, 40), 3, 1),  # group 4 x 2 new tokens: 8 rows
    (96, None, torch.bfloat16, 6, 3, 3, 32, 3, (70, 45), 2, 1),  # group 2 x 3 new tokens: 6 -> 8 rows
    (128, 96, torch.bfloat16, 12, 4, 1, 32, 3, (61, 36), 2, 1),  # partial rotary, group 3 -> 4 rows
    (256, None, torch.float16, 10, 2, 1, 32, 2, (50, 39), 2, 1),  # group 5: two row blocks of 4 at head 256
    (128, None, torch.bfloat16, 16, 2, 1, 32, 4, (100, 61), 3, 1),  # group 8 at head 128 (tensor cores)
    (128, 96, torch.float16, 8, 1, 1, 64, 2, (70, 128), 2, 1),  # partial rotary at 8 rows (tensor cores)
    (128, None, torch.bfloat16, 8, 2, 1, 16, 7, (100, 61), 3, 2),  # blocks of 16 under the 32-key mma tiles
    (96, None, torch.float16, 8, 2, 1, 48, 3, (131, 17), 2, 1),  # blocks of 48 under the mma tiles (a divide)
    # head 256 on tensor cores: a lookup per warp's 8 keys (blocks of 8 fit), group 4 and group 8 (two row blocks of
    # 4), blocks of 8, 16 and 24 (a divide), shared blocks, lengths on both sides of L0, splits
    (256, None, torch.bfloat16, 8, 2, 1, 8, 12, (91, 37), 3, 2),
    (256, None, torch.float16, 16, 2, 1, 16, 5, (75, 41), 2, 1),
    (256, 128, torch.bfloat16, 4, 1, 1, 24, 4, (83, 20), 2, 0),
]


@pytest.mark.parametrize(
    ("head_dim", "rotary_dim", "dtype", "hq", "hk", "n_new", "block_size", "max_blocks", "seqlens", "splits",
     "shared"),
    PAGED_CASES,
    ids=[f"D{c[0]}{'-r' + str(c[1]) if c[1] else ''}-{str(c[2])[6:]}-{c[3]}x{c[4]}-n{c[5]}-bs{c[6]}-s{c[9]}"
         for c in PAGED_CASES],
)  # fmt: skip
def test_paged_decode_kernel_equals_reference(decode_shim, head_dim, rotary_dim, dtype, hq, hk, n_new, block_size,
                                              max_blocks, seqlens, splits, shared):  # fmt: skip
    """The kernel bodies on a paged cache against the fp64 reference's paged path: a shuffled block table, blocks
    shared by two sequences (a common prefix), partial last blocks, GQA groups 1 to 8 (rows per block 1, 2, 4, 8,
    and two row blocks), n = 1 and n > 1, lengths on both sides of L0, splits; k and v interleaved in one buffer.
    Every slot no length reaches is NaN, and the table's entries past each length are ids outside the pool."""
    gen = torch.Generator().manual_seed(hash((head_dim, hq, n_new, block_size)) % 2**31)
    table = _decode_table(head_dim, rotary_dim)
    lengths = torch.tensor(seqlens)
    block_table, num_blocks = _paged_layout(gen, seqlens, block_size, max_blocks, share_first=shared)
    k, v = _paged_caches(gen, block_table, num_blocks, seqlens, block_size, hk, head_dim, dtype)
    q = torch.randn(len(seqlens), hq, n_new, head_dim, generator=gen).to(dtype)
    out = _host_decode(decode_shim, q, k, v, lengths, table, splits, block_table=block_table)
    for b in range(len(seqlens)):
        expected = _paged_reference(q, k, v, lengths, table, block_table, b)
        torch.testing.assert_close(out[b].double(), expected, atol=_DECODE_ATOL[dtype], rtol=0)


@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("splits", [1, 3])
def test_paged_decode_bad_block_ids_and_overlong_lengths_give_nan_rows(decode_shim, splits, head_dim):
    """Sequence 1's third block id is past the pool, sequence 2's first is -1, sequence 3's length exceeds the
    capacity: NaN in every element of their rows (no read: the slots the ids would name do not exist, and a read of
    a NaN slot elsewhere would show in the other rows). Sequences 0 (length 40 with -1 entries past it) and 4 (at the
    capacity) are exact. 4 rows a block (group 2 x 2 new tokens): tensor cores, at head 256 a lookup per warp."""
    gen = torch.Generator().manual_seed(11)
    block_size, max_blocks = 32, 3
    capacity = block_size * max_blocks
    table = _decode_table(head_dim)
    seqlens = (40, 90, 50, capacity + 1, capacity)
    lengths = torch.tensor(seqlens)
    block_table, num_blocks = _paged_layout(gen, seqlens, block_size, max_blocks)
    block_table[1, 2] = num_blocks
    block_table[2, 0] = -1
    k, v = _paged_caches(gen, block_table, num_blocks, seqlens, block_size, 2, head_dim, torch.float16)
    q = torch.randn(len(seqlens), 4, 2, head_dim, generator=gen).to(torch.float16)
    out = _host_decode(decode_shim, q, k, v, lengths, table, splits, block_table=block_table)
    for b in (1, 2, 3):
        assert torch.isnan(out[b]).all(), f"sequence {b}: every element must be NaN"
    for b in (0, 4):
        torch.testing.assert_close(out[b].double(), _paged_reference(q, k, v, lengths, table, block_table, b),
                                   atol=_DECODE_ATOL[torch.float16], rtol=0)  # fmt: skip


_PAGED_GUARD_SCRIPT = textwrap.dedent(
    """
    import ctypes, math, mmap, sys
    import torch
    sys.path.insert(0, {root!r})
    from tests.cuda import test_host_math as t

    shim = ctypes.CDLL({library!r})
    shim.lr2_rope_decode.restype = ctypes.c_char_p
    shim.lr2_host_mode({eager}, {eager})
    libc = ctypes.CDLL(None)
    page = mmap.PAGESIZE
    num_blocks, block_size, heads, head_dim, dtype = {num_blocks}, {block_size}, 2, {head_dim}, torch.{dtype}
    size = torch.empty((), dtype=dtype).element_size()
    block_bytes = block_size * heads * head_dim * size
    guard = -(-block_bytes // page) * page  # a block's worth of inaccessible pages on each side of the pool
    pool = num_blocks * block_bytes
    region = mmap.mmap(-1, guard + pool + guard)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert libc.mprotect(ctypes.c_void_p(base), guard, 0) == 0
    assert libc.mprotect(ctypes.c_void_p(base + guard + pool), guard, 0) == 0
    flat = torch.frombuffer(region, dtype=dtype, count=(guard + pool) // size)
    cache = flat[guard // size :].view(num_blocks, block_size, heads, head_dim)
    cache.copy_(torch.randn(cache.shape))
    lengths = torch.tensor([64, 64, 64, 64])
    table = torch.tensor({table}, dtype=torch.int32)
    q = torch.randn(4, {hq}, 1, head_dim).to(dtype)
    decode_table = t._decode_table(head_dim)
    out = t._host_decode(shim, q, cache, cache, lengths, decode_table, {splits}, block_table=table)
    assert torch.isnan(out[1:]).all() and not torch.isnan(out[0]).any()
    expected = t._paged_reference(q, cache, cache, lengths, decode_table, table, 0)
    torch.testing.assert_close(out[0].double(), expected, atol=t._DECODE_ATOL[dtype], rtol=0)
    print("ok")
    """
)


# (num_blocks, block_size, table): blocks of 32 (2 a sequence of 64), and of 8 under head 256's tiles of 32 (a bad id
# in the middle of a tile: only the warp whose 8 keys it holds sees it).
_PAGED_GUARD_TABLES = {
    "fp32-D64-2rows": (6, 32, [[0, 1, -1], [2, "num_blocks", 0], [-1, 3, 4], [2**30, 5, 1]]),
    "fp16-D256-4rows": (20, 8, [[0, 1, 2, 3, 4, 5, 6, 7, -1], [8, 9, 10, "num_blocks", 11, 12, 13, 14, 0],
                                [-1, 15, 16, 17, 18, 19, 0, 1, 2], [3, 4, 5, 6, 7, 8, 2**30, 9, 2**30]]),
}  # fmt: skip


@pytest.mark.parametrize("kernel", list(_GUARD_KERNELS))
@pytest.mark.parametrize("eager", [0, 1], ids=["late-copies", "eager-copies"])
@pytest.mark.parametrize("splits", [1, 2])
def test_paged_decode_never_dereferences_a_bad_block_id(shim, splits, eager, kernel):
    """The pool lies between two inaccessible regions a block long: a read through block id num_blocks, -1 or 2^30
    is a segmentation fault (in a child process, so the test fails instead of the run). Sequence 0 (its entry past
    its length is -1, never read) is exact; the others get NaN rows."""
    dtype, head_dim, hq = _GUARD_KERNELS[kernel]
    num_blocks, block_size, table = _PAGED_GUARD_TABLES[kernel]
    table = str(table).replace("'num_blocks'", "num_blocks")
    script = _PAGED_GUARD_SCRIPT.format(root=str(CSRC.parent), library=shim.lr2_library_path, splits=splits,
                                        eager=eager, dtype=dtype, head_dim=head_dim, hq=hq, num_blocks=num_blocks,
                                        block_size=block_size, table=table)  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (result.returncode, result.stderr[-2000:])


def test_paged_decode_refuses_a_block_size_that_splits_a_tile(shim):
    """fp16 head 64 reads tiles of 32 keys: blocks of 16 are refused by the launch (nothing runs; the Python
    launcher raises a ValueError first, from its mirror decode_key_tile); blocks of 32 run."""
    gen = torch.Generator().manual_seed(3)
    table = _decode_table(64)
    q = torch.randn(1, 1, 1, 64, generator=gen).to(torch.float16)
    for block_size, expected in ((16, "multiple of the kernel's key tile"), (32, "")):
        cache = torch.randn(4, block_size, 1, 64, generator=gen).to(torch.float16)
        block_table = torch.tensor([[0, 1]], dtype=torch.int32)
        error = _host_decode(shim, q, cache, cache, torch.tensor([block_size + 1]), table, 1,
                             block_table=block_table, expect_error=True)  # fmt: skip
        assert expected in error and bool(error) == bool(expected), error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_key_tile_mirrors_the_kernel(shim, dtype):
    """lr2kernels.ops.cuda.launch.decode_key_tile (the Python launcher's block-size check) is DecodeShape::TILE."""
    from lr2kernels.ops.cuda import launch

    element_bytes = torch.empty((), dtype=dtype).element_size()
    for head_dim in (64, 96, 128, 256):
        for rows in (1, 2, 4, 8) if head_dim < 256 else (1, 2, 4):
            out = (ctypes.c_int * 9)()
            assert shim.lr2_decode_shape(element_bytes, head_dim, rows, out) == 0
            assert launch.decode_key_tile(dtype, head_dim, rows) == out[6], (dtype, head_dim, rows)
            assert 32 % out[6] == 0  # every multiple of 32 is a valid block size
            # The grid's blocks per SM: 2 where the kernel's shared memory is dynamic (2 resident), else 3.
            assert launch._dynamic_smem(dtype, head_dim, rows) == (out[7] > 0), (dtype, head_dim, rows)
            assert launch._grid_blocks_per_sm(dtype, head_dim, rows) == (2 if out[7] else 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_dynamic_shared_memory_is_checked_against_the_device_limit(shim, dtype):
    """Head 256 at 4 rows keeps its 66 KB of stages in dynamic shared memory: the launch opts the kernel in
    (cudaFuncSetAttribute; the emulation fails a launch past 48 KB without it) after checking static + dynamic
    against the device's per-block opt-in limit. On a device whose limit is 64 KB it refuses with the bytes it needs;
    the 2-row kernel (static shared memory) still runs; at 80000 bytes (the kernel's own)
    it runs and is exact."""
    gen = torch.Generator().manual_seed(5)
    table = _decode_table(256)
    lengths = torch.tensor([40])
    k = torch.randn(1, 1, 40, 256, generator=gen).to(dtype)
    v = torch.randn(1, 1, 40, 256, generator=gen).to(dtype)
    try:
        shim.lr2_host_smem_optin(64 * 1024)
        q = torch.randn(1, 4, 1, 256, generator=gen).to(dtype)
        error = _host_decode(shim, q, k, v, lengths, table, 1, expect_error=True)
        assert "needs 80000 bytes of shared memory a block (12416 static + 67584 dynamic)" in error, error
        assert "opt-in limit of 65536 bytes" in error and "backend='triton'" in error, error
        q2 = torch.randn(1, 2, 1, 256, generator=gen).to(dtype)
        out = _host_decode(shim, q2, k, v, lengths, table, 1)
        torch.testing.assert_close(out[0].double(), _reference_rows(q2, k, v, lengths, table, 0),
                                   atol=_DECODE_ATOL[dtype], rtol=0)  # fmt: skip
        shim.lr2_host_smem_optin(80000)
        out = _host_decode(shim, q, k, v, lengths, table, 1)
        torch.testing.assert_close(out[0].double(), _reference_rows(q, k, v, lengths, table, 0),
                                   atol=_DECODE_ATOL[dtype], rtol=0)  # fmt: skip
    finally:
        shim.lr2_host_smem_optin(227 * 1024)


class _ShimExtension:
    """A stand-in for lr2kernels._cuda whose rope_decode runs the host emulation of the kernels with the arguments
    the Python launcher passes (the bindings' order, less the stream): the launcher's tensor side (strides, the
    table, the capacity, the length mapping) is checked end to end without a GPU."""

    def __init__(self, shim):
        self.shim = shim

    def rope_decode(self, dtype, q, k, v, out, o_part, lse_part, seqlens, inv_freq, q_strides, k_strides, v_strides,
                    o_strides, *rest):  # fmt: skip
        (batch, num_kv_heads, group, n_new, half, head_dim, num_splits, split_min_keys, capacity, original_max_position,
         scale_log2, attention_short, attention_long, block_table, block_table_stride, block_size, num_blocks,
         _stream) = rest  # fmt: skip
        triple = lambda strides: (ctypes.c_int64 * 3)(*strides)  # noqa: E731
        pointer = ctypes.c_void_p
        error = self.shim.lr2_rope_decode(
            dtype, pointer(q), pointer(k), pointer(v), pointer(out), pointer(o_part), pointer(lse_part),
            pointer(seqlens), pointer(inv_freq), triple(q_strides), triple(k_strides), triple(v_strides),
            triple(o_strides), batch, num_kv_heads, group, n_new, half, head_dim, num_splits, split_min_keys, capacity,
            original_max_position, _f(scale_log2), _f(attention_short), _f(attention_long), pointer(block_table),
            ctypes.c_int64(block_table_stride), block_size, num_blocks,
        )  # fmt: skip
        assert error == b"", error.decode()


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_python_launcher_runs_the_kernel_as_the_reference(shim, monkeypatch, paged):
    """lr2kernels.ops.cuda.launch.rope_decode on CPU tensors, its extension replaced by the host emulation: a paged
    cache given as k/v halves of one buffer and an int64 block table (converted by the launcher), 2 splits, a length
    below n (NaN rows, the launcher's mapping), one past the capacity (NaN rows); the others equal the reference."""
    from lr2kernels.ops.cuda import launch

    monkeypatch.setattr(launch, "extension", lambda: _ShimExtension(shim))
    monkeypatch.setattr(launch, "_stream", lambda device: 0)
    monkeypatch.setattr(launch.torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(launch, "_SPLIT_MIN_KEYS", 32)
    gen = torch.Generator().manual_seed(13)
    head_dim, block_size, max_blocks, n_new = 128, 32, 3, 2
    capacity = block_size * max_blocks
    table = _decode_table(head_dim)
    seqlens = (70, 1, capacity + 3, 33)
    lengths = torch.tensor(seqlens)
    if paged:
        block_table, num_blocks = _paged_layout(gen, seqlens, block_size, max_blocks)
        k, v = _paged_caches(gen, block_table, num_blocks, seqlens, block_size, 2, head_dim, torch.bfloat16)
        block_table = block_table.long()
    else:
        block_table = None
        k = _poisoned_cache(gen, len(seqlens), 2, capacity, head_dim, torch.bfloat16, lengths)
        v = _poisoned_cache(gen, len(seqlens), 2, capacity, head_dim, torch.bfloat16, lengths)
    q = torch.randn(len(seqlens), 8, n_new, head_dim, generator=gen).to(torch.bfloat16)
    inv_freq = torch.stack([table.inv_freq(False), table.inv_freq(True)]).float()
    paged_args = {"block_table": block_table} if paged else {}
    out = launch.rope_decode(q, k, v, lengths, inv_freq, table.original_max_position, table.attention_factor_for(False),
                             table.attention_factor_for(True), head_dim**-0.5, 2, **paged_args)  # fmt: skip
    for b in (1, 2):
        assert torch.isnan(out[b]).all(), f"sequence {b}: its length is outside [n, capacity]"
    for b in (0, 3):
        if paged:
            expected = _paged_reference(q, k, v, lengths, table, block_table, b)
        else:
            expected = _reference_rows(q, k, v, lengths, table, b)
        torch.testing.assert_close(out[b].double(), expected, atol=_DECODE_ATOL[torch.bfloat16], rtol=0)
