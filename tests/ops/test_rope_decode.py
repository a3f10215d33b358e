"""rope_decode on a PRE-RoPE cache, on every backend: equals the last rows of a full forward over each whole sequence
(HF's rotation + naive attention, fp64) and the reference. Unused cache slots hold NaN in every test: they must never
be read. Triton only: the launcher's ``num_splits`` knob and the kernel's angle-addition cos/sin.
"""

from __future__ import annotations

import math

import pytest
import torch

import lr2kernels as lr2
from lr2kernels import reference
from lr2kernels.ops import rotary
from lr2kernels.tables import RopeTable
from tests.ops.helpers import (
    DEVICE,
    INTERPRETED,
    TOLERANCES,
    dtype_id,
    hf_rope_attention,
    hf_rope_decode,
    make_table,
    randn,
    requires_triton,
    run,
    skip_in_interpreter,
    tolerance,
)

try:  # the Triton-only tests below need the kernels' device helpers; every other test runs without Triton
    import triton
    import triton.language as tl

    from lr2kernels.ops.triton import decode
    from lr2kernels.ops.triton.decode import _step_table, _tile_angles
except ImportError as error:
    triton = None
    _TRITON_IMPORT_ERROR = f"{type(error).__name__}: {error}"

pytestmark = pytest.mark.usefixtures("nan_empty")
LENGTHS = [3, 64, 65, 130]  # both sides of L0 = 64, and exactly at it
GQA = [(4, 4), (6, 2), (8, 1)]
DIMS = [(64, 64), (80, 80), (128, 96)]
DIM_IDS = ["D64", "D80", "D128rot96"]


def _heads_id(heads):
    return f"H{heads[0]}kv{heads[1]}"


def _inputs(lengths, hq, hk, n_new, head_dim, dtype=torch.float32, max_len=None):
    """q ``[B, hq, n, D]`` and caches ``[B, hk, max_len, D]`` whose slots past each length hold NaN (garbage that
    must never be read)."""
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
@pytest.mark.parametrize("heads", GQA, ids=_heads_id)
@pytest.mark.parametrize("n_new", [1, 3], ids=lambda n: f"new{n}")
def test_decode_equals_full_forward(backend, n_new, heads, head_dim, rotary_dim):
    table = make_table(head_dim, rotary_dim=rotary_dim)
    hq, hk = heads
    q, k_cache, v_cache, cache_seqlens = _inputs(LENGTHS, hq, hk, n_new, head_dim)
    expected_rows = []
    for b, length in enumerate(LENGTHS):
        # The whole sequence, pre-RoPE; the last n_new tokens are the new queries.
        q_full = torch.randn(1, hq, length, head_dim, device=DEVICE)
        q_full[0, :, -n_new:] = q[b]
        k_full, v_full = k_cache[b : b + 1, :, :length], v_cache[b : b + 1, :, :length]
        full = hf_rope_attention(q_full.double(), k_full.double(), v_full.double(), table)  # HF rule on length
        expected_rows.append(full[0, :, -n_new:])
    expected = torch.stack(expected_rows)
    out = run(backend, lr2.rope_decode, q, k_cache, v_cache, table, cache_seqlens=cache_seqlens)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, **tolerance(backend, torch.float32, "decode"))
    torch.testing.assert_close(
        _expected(q, k_cache, v_cache, cache_seqlens, table), expected, **TOLERANCES[torch.float64]
    )
    # The HF decode oracle of the low-precision test agrees with the full forward.
    hf = hf_rope_decode(q.double(), k_cache.double(), v_cache.double(), cache_seqlens, table)
    torch.testing.assert_close(hf, expected, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 96)], ids=["D64", "D128rot96"])
@pytest.mark.parametrize("heads", [(6, 2), (8, 1)], ids=_heads_id)
@pytest.mark.parametrize("n_new", [1, 3], ids=lambda n: f"new{n}")
def test_low_precision_error_at_most_twice_hf(backend, n_new, heads, head_dim, rotary_dim, dtype):
    # FlashAttention's rule: the error vs fp64 is at most ~2x that of HF's path (rotation + attention) in the dtype.
    table = make_table(head_dim, rotary_dim=rotary_dim)
    q, k_cache, v_cache, cache_seqlens = _inputs(LENGTHS, *heads, n_new, head_dim, dtype=dtype)
    expected = _expected(q, k_cache, v_cache, cache_seqlens, table)
    out = run(backend, lr2.rope_decode, q, k_cache, v_cache, table, cache_seqlens=cache_seqlens)
    assert out.dtype == dtype and torch.isfinite(out).all()
    plain = hf_rope_decode(q, k_cache, v_cache, cache_seqlens, table)
    error = (out.double() - expected).abs().max().item()
    plain_error = (plain.double() - expected).abs().max().item()
    assert error <= 2 * plain_error + 2e-4, f"{backend} error {error:.2e}, HF path error {plain_error:.2e}"


def test_decode_across_the_boundary_needs_no_cache_rewrite(backend):
    # Sequence at length L0, then one more token: the same pre-RoPE cache serves both steps.
    table = make_table(64)
    q_step, k_cache, v_cache, _ = _inputs([65], 4, 2, 1, 64, max_len=80)
    before = run(
        backend, lr2.rope_decode, q_step, k_cache, v_cache, table, cache_seqlens=torch.tensor([64], device=DEVICE)
    )
    after = run(
        backend, lr2.rope_decode, q_step, k_cache, v_cache, table, cache_seqlens=torch.tensor([65], device=DEVICE)
    )
    q_full = randn(1, 4, 65, 64)
    q_full[0, :, 64] = q_step[0, :, 0]
    full = hf_rope_attention(q_full.double(), k_cache[:, :, :65].double(), v_cache[:, :, :65].double(), table)
    torch.testing.assert_close(after[0, :, 0].double(), full[0, :, 64], **tolerance(backend, torch.float32, "decode"))
    assert (before - after).abs().max() > 1e-3


def test_thousands_of_positions_straddling_l0(backend):
    # L0 = 2048: one sequence per side of it and one exactly at it; the angles reach ~3000 rad.
    # Too slow in Triton's interpreter, where test_triton_thousands_of_positions_in_three_splits covers the kernel.
    skip_in_interpreter(backend, too_large=True)
    table = make_table(64, original_max_position=2048)
    q, k_cache, v_cache, cache_seqlens = _inputs([2048, 2049, 3001], 4, 2, 2, 64)
    out = run(backend, lr2.rope_decode, q, k_cache, v_cache, table, cache_seqlens=cache_seqlens)
    expected = _expected(q, k_cache, v_cache, cache_seqlens, table)
    torch.testing.assert_close(out.double(), expected, **tolerance(backend, torch.float32, "decode"))


def test_strided_inputs_and_softmax_scale(backend):
    table = make_table(80)
    q, k_cache, v_cache, cache_seqlens = _inputs(LENGTHS, 6, 2, 2, 80)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, n, D] view of a [B, n, Hq, D] tensor
    k_wide = torch.full((*k_cache.shape[:-1], 96), float("nan"), device=DEVICE)
    k_wide[..., :80] = k_cache
    k_cache = k_wide[..., :80]  # row stride 96
    v_cache = v_cache.transpose(1, 2).contiguous().transpose(1, 2)  # head stride < token stride
    out = run(backend, lr2.rope_decode, q, k_cache, v_cache, table, cache_seqlens=cache_seqlens, softmax_scale=0.3)
    expected = _expected(q, k_cache, v_cache, cache_seqlens, table, softmax_scale=0.3)
    torch.testing.assert_close(out.double(), expected, **tolerance(backend, torch.float32, "decode"))


def test_gradcheck_fp64_flows_to_q_and_cache(backend):
    table = make_table(8, original_max_position=4)
    q = randn(2, 2, 2, 8, dtype=torch.float64, requires_grad=True)
    k_cache = randn(2, 1, 7, 8, dtype=torch.float64, requires_grad=True)
    v_cache = randn(2, 1, 7, 8, dtype=torch.float64, requires_grad=True)
    cache_seqlens = torch.tensor([3, 7], device=DEVICE)
    assert torch.autograd.gradcheck(
        lambda q, k, v: run(backend, lr2.rope_decode, q, k, v, table, cache_seqlens=cache_seqlens),
        (q, k_cache, v_cache),
    )


def _capacity_inputs(lengths, capacity, hq, hk, n_new, head_dim):
    """As :func:`_inputs` with caches of ``capacity`` slots that are views of buffers with 16 more NaN slots per
    head: reading past the capacity would meet NaN. Lengths may exceed the capacity (they fill it)."""
    q, k_wide, v_wide, cache_seqlens = _inputs([min(n, capacity) for n in lengths], hq, hk, n_new, head_dim,
                                               max_len=capacity + 16)  # fmt: skip
    k_wide[:, :, capacity:] = float("nan")
    v_wide[:, :, capacity:] = float("nan")
    return q, k_wide[:, :, :capacity], v_wide[:, :, :capacity], torch.tensor(lengths, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("gpu_like", [False, True], ids=["host_lengths", "device_lengths"])
def test_unchecked_bad_length_gives_nan_rows_and_reads_nothing_past_the_cache(backend, gpu_like, request):
    # With value checks off (as for GPU tensors by default), a length past the capacity or under n must not read past
    # the cache (NaN there) and must not look right: that sequence's rows are NaN, the others exact.
    if gpu_like:
        request.getfixturevalue("as_on_a_gpu")  # no host reads
    capacity, n_new = 70, 2
    lengths = [5, capacity + 9, 1, capacity, 66]
    q, k_cache, v_cache, cache_seqlens = _capacity_inputs(lengths, capacity, 6, 2, n_new, 64)
    table = make_table(64)
    previous = lr2.set_value_checks("never")
    try:
        out = run(backend, lr2.rope_decode, q, k_cache, v_cache, table, cache_seqlens=cache_seqlens)
    finally:
        lr2.set_value_checks(previous)
    invalid = torch.tensor([not n_new <= n <= capacity for n in lengths], device=DEVICE)
    assert out[invalid].isnan().all(), "an invalid length's rows must be NaN"
    valid = ~invalid
    expected = _expected(q[valid], k_cache[valid], v_cache[valid], cache_seqlens[valid], table)
    torch.testing.assert_close(out[valid].double(), expected, **tolerance(backend, torch.float32, "decode"))


def test_checked_bad_length_is_an_error(backend):
    capacity = 70
    q, k_cache, v_cache, cache_seqlens = _capacity_inputs([5, capacity + 9], capacity, 4, 2, 1, 64)
    previous = lr2.set_value_checks("always")
    try:
        with pytest.raises(
            ValueError, match=rf"cache_seqlens: .*{capacity} \(the cache's capacity.*got 79 for sequence 1"
        ):
            lr2.rope_decode(q, k_cache, v_cache, make_table(64), cache_seqlens=cache_seqlens, backend=backend)
    finally:
        lr2.set_value_checks(previous)


# ---------------------------------------------------------------- triton only: the launcher's num_splits knob
def _launch(q, k_cache, v_cache, cache_seqlens, table, num_splits, min_split_keys=None):
    """The Triton launcher itself (the public op picks num_splits), with the table prepared as the backend does."""
    from lr2kernels.ops.triton import decode

    return decode.rope_decode(
        q, k_cache, v_cache, cache_seqlens, rotary.inv_freq_pair(table, q.device).contiguous(),
        table.original_max_position, table.attention_factor_for(False), table.attention_factor_for(True),
        q.shape[-1] ** -0.5, num_splits=num_splits, min_split_keys=min_split_keys,
    )  # fmt: skip


@requires_triton
@pytest.mark.parametrize("min_split_keys", [None, 1], ids=["min_split_default", "min_split1"])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7], ids=lambda s: f"splits{s}")
def test_triton_num_splits_give_the_same_result(num_splits, min_split_keys):
    # Each sequence uses min(num_splits, ceil(length / min_split_keys)) splits: by default (4 key tiles a split) the
    # short sequences use one and their other programs exit at once, and the merge must read only the splits used
    # (the partials of the others are NaN: torch.empty is NaN-filled here). With 1-key splits, 7 splits leave the
    # short sequences with empty splits (lse -inf) that the merge must ignore.
    table = make_table(64)
    q, k_cache, v_cache, cache_seqlens = _inputs([3, 64, 65, 130, 257], 6, 2, 3, 64)
    out = _launch(q, k_cache, v_cache, cache_seqlens, table, num_splits, min_split_keys)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out.double(), _expected(q, k_cache, v_cache, cache_seqlens, table), **TOLERANCES[torch.float32]
    )


@requires_triton
@pytest.mark.parametrize("chunk", ["chunk_default", "chunk_small"])
@pytest.mark.parametrize(
    "heads,n_new", [((4, 4), 1), ((8, 1), 1), ((6, 2), 3)], ids=["mha_tile3d", "gqa8_unrolled", "gqa3_new3"]
)
def test_triton_in_kernel_merge_every_split_count(heads, n_new, chunk, monkeypatch):
    # The last split program of each (sequence, kv head) row block to finish merges them all, counted by an int32
    # arrival counter per block in a workspace kept between calls. It must merge exactly the splits its sequence
    # uses (the others exit at once; with 1-key splits, some used splits see no key: lse -inf), in chunks of
    # MERGE_S splits (chunk_small: one or two a chunk, several chunks) as a 3D tile (MHA's one row) or unrolled
    # (8 and 9 rows), and leave every counter at 0, so that the next call, reusing them, merges right too.
    from lr2kernels.ops.triton import decode

    if chunk == "chunk_small":
        monkeypatch.setattr(decode, "_MERGE_ELEMENTS_PER_THREAD", 1)
    table = make_table(64)
    q, k_cache, v_cache, cache_seqlens = _inputs([3, 64, 65, 130, 257], *heads, n_new, 64)  # both tables
    expected = _expected(q, k_cache, v_cache, cache_seqlens, table)
    for num_splits, min_split_keys in ((2, None), (3, 1), (9, 1), (9, None)):
        out = _launch(q, k_cache, v_cache, cache_seqlens, table, num_splits, min_split_keys)
        torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32])
        counters = decode._COUNTERS[(str(q.device), 0)]
        assert (counters == 0).all(), "every merger resets its block's counter"


@requires_triton
@pytest.mark.skipif(not INTERPRETED, reason="records every load and store: Triton's interpreter")
@pytest.mark.parametrize("chunk", ["chunk_default", "chunk_small"])
@pytest.mark.parametrize(
    "heads,n_new", [((4, 4), 1), ((8, 1), 1), ((6, 2), 1), ((6, 2), 3)],
    ids=["mha_tile3d", "gqa8_unrolled", "gqa3_pad1", "gqa3_new3_pad7"],
)  # fmt: skip
def test_triton_merge_reads_only_written_partials(heads, n_new, chunk, monkeypatch):
    # The merge loads the partials with no row mask and whole chunks of splits with no split mask (the partials
    # keep MERGE_M rows a split, padding rows included): every partial it loads must have been stored in this
    # launch, never the padding of a torch.empty or a slot of a split the sequence does not use. In the
    # interpreter (programs one after the other; the merger last), each loaded address outside the inputs must
    # be one stored before.
    from triton.runtime import interpreter

    from lr2kernels.ops.triton import decode

    if chunk == "chunk_small":
        monkeypatch.setattr(decode, "_MERGE_ELEMENTS_PER_THREAD", 1)
    table = make_table(64)
    q, k_cache, v_cache, cache_seqlens = _inputs([3, 64, 65, 130, 257], *heads, n_new, 64)
    inv_freq = rotary.inv_freq_pair(table, q.device).contiguous()
    step = decode._step_tables(inv_freq)  # the launch's own (cached on inv_freq)
    inputs = [x.untyped_storage() for x in (q, k_cache, v_cache, cache_seqlens, inv_freq, step)]
    stored, loaded_elsewhere = set(), []
    original_load = interpreter.InterpreterBuilder.create_masked_load
    original_store = interpreter.InterpreterBuilder.create_masked_store

    def recording_load(builder, ptrs, mask, *args, **kwargs):
        addresses = ptrs.data[mask.data.astype(bool)].astype("int64").ravel().tolist()
        loaded_elsewhere.extend(
            a for a in addresses if not any(x.data_ptr() <= a < x.data_ptr() + x.nbytes() for x in inputs)
        )
        return original_load(builder, ptrs, mask, *args, **kwargs)

    def recording_store(builder, ptrs, value, mask, *args, **kwargs):
        stored.update(ptrs.data[mask.data.astype(bool)].astype("int64").ravel().tolist())
        return original_store(builder, ptrs, value, mask, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", recording_load)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", recording_store)
    out = decode.rope_decode(
        q, k_cache, v_cache, cache_seqlens, inv_freq, table.original_max_position, table.attention_factor_for(False),
        table.attention_factor_for(True), q.shape[-1] ** -0.5, num_splits=9, min_split_keys=1,
    )  # fmt: skip  # 3 keys: 3 of the 9 splits; 257 keys: all 9
    torch.testing.assert_close(
        out.double(), _expected(q, k_cache, v_cache, cache_seqlens, table), **TOLERANCES[torch.float32]
    )
    assert loaded_elsewhere, "the merge loaded partials"
    unwritten = sorted(set(loaded_elsewhere) - stored)
    assert not unwritten, f"{len(unwritten)} addresses loaded that no program of the launch stored"


class _CacheReads:
    """Records, in Triton's interpreter, the slot of every element a kernel loads from the storage of the given
    caches (``[B, H, S, D]`` views whose heads are blocks of ``stride(1)`` elements; unmasked lanes only): the proof
    that a launch reads nothing past a capacity, even where the storage goes on."""

    def __init__(self, monkeypatch, *caches):
        from triton.runtime import interpreter

        self.slots = []
        original = interpreter.InterpreterBuilder.create_masked_load

        def recording_load(builder, ptrs, mask, *args, **kwargs):
            addresses = ptrs.data[mask.data.astype(bool)].astype("int64")
            for x in caches:
                storage = x.untyped_storage()
                inside = (addresses >= storage.data_ptr()) & (addresses < storage.data_ptr() + storage.nbytes())
                offsets = (addresses[inside] - x.data_ptr()) // x.element_size()
                self.slots.extend(((offsets % x.stride(1)) // x.stride(2)).tolist())
            return original(builder, ptrs, mask, *args, **kwargs)

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", recording_load)


@requires_triton
@pytest.mark.parametrize("num_splits", [1, 3], ids=lambda s: f"splits{s}")
def test_triton_bad_length_nan_rows_in_every_split_layout(num_splits, monkeypatch):
    # The launcher itself (no validation): the split and merge kernels both poison an invalid sequence's rows, and
    # (in the interpreter, which sees every load) no lane reads a slot at or past the capacity.
    capacity, n_new = 70, 2
    lengths = [capacity + 40, 66, 1]
    q, k_cache, v_cache, cache_seqlens = _capacity_inputs(lengths, capacity, 6, 2, n_new, 64)
    table = make_table(64)
    reads = _CacheReads(monkeypatch, k_cache, v_cache) if INTERPRETED else None
    out = _launch(q, k_cache, v_cache, cache_seqlens, table, num_splits)
    assert out[0].isnan().all() and out[2].isnan().all()
    expected = _expected(q[1:2], k_cache[1:2], v_cache[1:2], cache_seqlens[1:2], table)
    torch.testing.assert_close(out[1:2].double(), expected, **TOLERANCES[torch.float32])
    if reads is not None:
        assert reads.slots and max(reads.slots) == capacity - 1, "the over-long sequence reads up to the capacity"


@requires_triton
def test_triton_thousands_of_positions_in_three_splits():
    # As test_thousands_of_positions_straddling_l0, the key tiles spread over three splits.
    table = make_table(64, original_max_position=2048)
    q, k_cache, v_cache, cache_seqlens = _inputs([2048, 2049, 3001], 4, 2, 2, 64)
    out = _launch(q, k_cache, v_cache, cache_seqlens, table, 3)
    torch.testing.assert_close(
        out.double(), _expected(q, k_cache, v_cache, cache_seqlens, table), **TOLERANCES[torch.float32]
    )


@requires_triton
@pytest.mark.parametrize("num_splits", [1, 3], ids=lambda s: f"splits{s}")
def test_triton_key_tiles_past_the_fast_sincos_range(num_splits):
    # Each key tile turns q by its base angle float32(start * w): one shared range reduction below 105615 rad,
    # libdevice's sincos above. Frequencies up to 500 (factors < 1) put every tile from position ~210 above, in
    # both tables (L0 = 256), with base angles up to ~2.5e5 rad where fp32's angle ulp is 1/64.
    half = 32
    table = RopeTable.longrope(
        head_dim=2 * half,
        base=10000.0,
        original_max_position=256,
        max_position=2048,
        short_factor=[0.002] * half,
        long_factor=[0.004 + 0.01 * i for i in range(half)],
    )
    assert float(table.inv_freq(False).max()) * 500 > 105615  # the last tiles are past the fast range
    q, k_cache, v_cache, cache_seqlens = _inputs([130, 250, 500], 4, 2, 2, 2 * half)
    out = _launch(q, k_cache, v_cache, cache_seqlens, table, num_splits)
    torch.testing.assert_close(
        out.double(), _expected(q, k_cache, v_cache, cache_seqlens, table), **TOLERANCES[torch.float32]
    )


@requires_triton
@pytest.mark.parametrize(
    ("splits", "chunk", "expected"),
    [(66, 32, 64), (132, 32, 128), (70, 64, 64), (88, 64, 88), (9, 8, 9), (16, 16, 16), (2, 2, 2), (1, 1, 1),
     (3, 2, 3)],
)  # fmt: skip
def test_triton_auto_splits_whole_merge_chunks(splits, chunk, expected):
    # The launcher's own split count drops the few splits that would take the merge one more chunk (an L2 round
    # trip and a merge-loop trip on the merging SM), only when it keeps >= 90% of them.
    from lr2kernels.ops.triton import decode

    assert decode._whole_merge_chunks(splits, chunk) == expected


@requires_triton
@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "expected"),
    [(8, 1, 128), (16, 2, 64), (32, 8, 16), (9, 3, 88)],
    ids=["mqa8of1", "gqa16of2", "llama8b", "smollm2"],
)
def test_triton_auto_splits_on_a_132_sm_gpu(monkeypatch, q_heads, kv_heads, expected):
    # The launcher's choice for one new token at batch 1 and 32K on a 132-SM GPU (as the bandwidth model takes it):
    # one wave is 132 splits of MQA 8/1 and 66 of GQA 16/2, whose merges read 32 splits of 8 rows a chunk, so they
    # take 128 and 64 (4 and 2 chunks, not 5 and 3); Llama-3-8B's 16 and SmolLM2's 88 (2 programs a SM at head 64;
    # chunks of 64) stay.
    from lr2kernels.ops.triton import decode

    monkeypatch.setattr(decode, "triton_interpreting", lambda: False)
    monkeypatch.setattr(decode, "sm_count", lambda device: 132)
    head_dim = 64 if (q_heads, kv_heads) == (9, 3) else 128
    rows = q_heads // kv_heads
    block_m, block_n = decode._block_sizes(rows, head_dim, torch.bfloat16)
    warps = decode._num_warps(head_dim, block_m)
    splits = decode._auto_splits(kv_heads, 32768, block_n, torch.device("cuda"), head_dim, rows, block_m, warps)
    assert splits == expected


@requires_triton
def test_triton_step_tables_made_once_per_frequencies(monkeypatch):
    # The kernel's angle-addition table [table, cos/sin, offset, frequency]: cos/sin of HF's fp32 angles
    # float32(t) * inv_freq, rounded once from float64; made once per frequencies' tensor (the package passes one
    # cached tensor per table and device), again when that tensor changes in place, and never shared by another.
    table = make_table(64)
    pair = rotary.inv_freq_pair(table, DEVICE)
    assert rotary.inv_freq_pair(table, DEVICE) is pair, "one cached pair per table and device"
    assert torch.equal(pair, torch.stack([table._inv_freq(False, DEVICE), table._inv_freq(True, DEVICE)]))
    step = decode._step_tables(pair)
    assert step.shape == (2, 2, decode._STEP_ROWS, pair.shape[1]) and step.dtype == torch.float32
    assert step.is_contiguous()
    angles = torch.arange(decode._STEP_ROWS, dtype=torch.float32, device=DEVICE)[:, None] * pair[:, None, :]
    torch.testing.assert_close(step[:, 0], angles.double().cos().float(), rtol=0, atol=0)
    torch.testing.assert_close(step[:, 1], angles.double().sin().float(), rtol=0, atol=0)
    assert decode._step_tables(pair) is step, "made once"
    other = pair.clone()
    assert decode._step_tables(other) is not step, "another tensor, its own table"
    other[1] *= 2  # in place: a new version
    changed = decode._step_tables(other)
    torch.testing.assert_close(changed[1, 1, 1], torch.sin(other[1].double()).float(), rtol=0, atol=0)
    # Inside a CUDA graph capture a new table would only be recorded: refused, loudly (the check itself, as a
    # capture cannot run on the CPU).
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture.*warm-up"):
        decode._refuse_capture(torch.device("cuda"))
    decode._refuse_capture(torch.device("cpu"))  # only CUDA captures
    monkeypatch.undo()
    with torch.inference_mode():  # no version counter: made at every call, never cached
        inference = pair.clone()
        first = decode._step_tables(inference)
        assert decode._step_tables(inference) is not first
    torch.testing.assert_close(first, step, rtol=0, atol=0)


@requires_triton
def test_triton_bad_num_splits():
    table = make_table(64)
    q, k_cache, v_cache, cache_seqlens = _inputs([3], 2, 1, 1, 64)
    with pytest.raises(ValueError, match=r"num_splits: expected an int >= 1 or None, got 0"):
        _launch(q, k_cache, v_cache, cache_seqlens, table, 0)
    with pytest.raises(ValueError, match=r"min_split_keys: expected an int >= 1 or None, got 0"):
        _launch(q, k_cache, v_cache, cache_seqlens, table, 2, 0)


# ---------------------------------------------------------- triton only: the kernel's angle-addition cos/sin
if triton is not None:

    @triton.jit
    def _tile_angles_kernel(
        STARTS, INV_FREQ, STEP, COS, SIN, attention, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, ORDER: tl.constexpr, STEP_ROWS: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        start = tl.load(STARTS + pid)
        cols = tl.arange(0, HALF_PAD)
        inv_freq = tl.load(INV_FREQ + cols, mask=cols < HALF, other=0.0)
        SPLIT: tl.constexpr = (HALF, HALF_PAD, HALF_PAD)  # a half in one tile
        cos_step, sin_step = _step_table(STEP, 0, STEP_ROWS, BLOCK_N, SPLIT)  # the launcher's table, row 0
        cos, sin = _tile_angles(start, inv_freq, cos_step[0], sin_step[0], attention, BLOCK_N, ORDER)
        offs = (pid * BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * HALF + cols[None, :]
        mask = (cols < HALF)[None, :]
        tl.store(COS + offs, cos, mask=mask)
        tl.store(SIN + offs, sin, mask=mask)


# (the correction's order, its bound on |ours - HF's fp32|): fp32 caches take the cubic terms (HF's fp32 to ~1e-7);
# 16-bit caches the first order, whose dropped delta^2 / 2 is <= 3.1e-5 below 131072 positions (docs/numerics.md).
_ANGLE_ORDERS = {"cubic-fp32": (3, 2e-6), "first-order-16bit": (1, 3.1e-5 + 2e-6)}


@requires_triton
@pytest.mark.parametrize("order", list(_ANGLE_ORDERS))
@pytest.mark.parametrize("block_n", [64, 128], ids=["N64", "N128"])  # 128-key tiles: heads 80-96 on a GPU
@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_triton_angle_addition_precision_up_to_131k(long, block_n, order):
    """The key tiles' cos/sin (one sincos per tile + angle addition) reproduce HF's fp32 cos/sin, so their error
    against float64 is HF's own, at every sampled position up to 131071: to fp32 precision with the cubic terms,
    within 3.1e-5 (1.6% of a bf16 half-ulp) to first order."""
    angle_order, bound = _ANGLE_ORDERS[order]
    if triton is None:
        pytest.fail(
            f"the triton backend is available but its decode kernel helpers do not import: {_TRITON_IMPORT_ERROR}"
        )
    half = 64
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
            torch.tensor([0, 1, 63, 64, 1023, 1024, 2047, 2048]) * 64 // block_n,  # the first tiles, powers of two
            torch.tensor([65535, 65536, 131071]) // block_n,  # where fp32's angle ulp doubles, and the last tile
            torch.randint(0, 131072 // block_n, (48,), generator=generator),
        ]
    )
    starts = (tiles * block_n).to(torch.int32)
    inv_freq = table.inv_freq(long)
    attention = table.attention_factor_for(long)
    cos = torch.full((len(starts) * block_n, half), float("nan"), device=DEVICE)
    sin = torch.full_like(cos, float("nan"))
    inv_freq_device = inv_freq.to(DEVICE)
    step = decode._step_tables(torch.stack([inv_freq_device, inv_freq_device]))  # as the launcher makes it
    _tile_angles_kernel[(len(starts),)](
        starts.to(DEVICE), inv_freq_device, step, cos, sin, attention,
        HALF=half, HALF_PAD=half, BLOCK_N=block_n, ORDER=angle_order, STEP_ROWS=decode._STEP_ROWS,
        enable_fp_fusion=False,
    )  # fmt: skip
    positions = (starts[:, None].long() + torch.arange(block_n)).reshape(-1)  # [len(starts) * block_n]
    angle64 = positions.double()[:, None] * inv_freq.double()[None, :]  # float64 truth from the same fp32 inv_freq
    cos64, sin64 = torch.cos(angle64) * attention, torch.sin(angle64) * attention
    hf_cos, hf_sin = (x[:, :half].double() for x in table.cos_sin(positions, long=long))  # HF's fp32 path
    for name, ours, hf, truth in (("cos", cos, hf_cos, cos64), ("sin", sin, hf_sin, sin64)):
        ours = ours.cpu().double()
        error, hf_error = (ours - truth).abs().max().item(), (hf - truth).abs().max().item()
        assert error <= hf_error + bound * attention, f"{name}: angle addition error {error:.3e} vs HF {hf_error:.3e}"
        assert (ours - hf).abs().max().item() <= bound * attention, f"{name}: differs from HF's fp32 rounding"
    assert hf_error > 1e-3 * attention or not long  # the test is sharp: fp32 angles are coarse near 131K
    assert math.isfinite(error)
