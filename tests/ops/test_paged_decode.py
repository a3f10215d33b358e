"""rope_decode on a PAGED cache (``block_table``, FlashAttention's / vLLM's ``[num_blocks, block_size, Hk, D]``
layout), on every backend: equals the reference on the paged data, the reference and the backend's own dense decode
on the same data laid out densely. The block tables are shuffled, share blocks between sequences, leave the last block
of a sequence partly filled and pad the unread entries with -1; every slot no sequence reads (unused blocks, the
rest of a last block) holds NaN, so a read of one fails loudly.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import lr2kernels as lr2
from lr2kernels import reference
from lr2kernels.ops import custom_ops, dispatch, validation
from lr2kernels.ops.calls import DecodeCall
from lr2kernels.ops.fused import FusedBackend
from tests.ops.helpers import (
    DEVICE,
    INTERPRETED,
    TOLERANCES,
    build_call,
    dtype_id,
    make_table,
    requires_triton,
    run,
    tolerance,
)

pytestmark = pytest.mark.usefixtures("nan_empty")


LENGTHS = [3, 64, 65, 130]  # L0 = 64: short, exactly at it, just past it (long table), two tiles past it


def _heads_id(heads):
    return f"H{heads[0]}kv{heads[1]}"


def _dense_inputs(lengths, hq, hk, n_new, head_dim, capacity, dtype, share=None):
    """q ``[B, hq, n, D]``, dense caches ``[B, hk, capacity, D]`` (NaN past each length) and int32 lengths; with
    ``share = (donor, taker, slots)`` the first ``slots`` slots of sequence ``taker`` equal ``donor``'s (the prefix
    the paged cache stores once)."""
    batch = len(lengths)
    k_cache = torch.full((batch, hk, capacity, head_dim), float("nan"), device=DEVICE)
    v_cache = torch.full((batch, hk, capacity, head_dim), float("nan"), device=DEVICE)
    for b, length in enumerate(lengths):
        k_cache[b, :, :length] = torch.randn(hk, length, head_dim, device=DEVICE)
        v_cache[b, :, :length] = torch.randn(hk, length, head_dim, device=DEVICE)
    if share is not None:
        donor, taker, slots = share
        k_cache[taker, :, :slots] = k_cache[donor, :, :slots]
        v_cache[taker, :, :slots] = v_cache[donor, :, :slots]
    q = torch.randn(batch, hq, n_new, head_dim, device=DEVICE)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    return q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), seqlens


def _paginate(k_dense, v_dense, lengths, block_size, spare_blocks=3, share=None):
    """The dense caches ``[B, Hk, capacity, D]`` as paged ones ``[num_blocks, block_size, Hk, D]`` and their int32
    block table ``[B, capacity / block_size]``: each sequence's blocks drawn from a shuffled pool (plus
    ``spare_blocks`` never used, NaN), with ``share = (donor, taker, blocks)`` the taker's first blocks being the
    donor's, entries past a sequence's last block -1. The last block of a sequence keeps the dense cache's NaN past
    its length."""
    batch, hk, capacity, head_dim = k_dense.shape
    assert capacity % block_size == 0
    max_blocks = capacity // block_size
    needed = [-(-n // block_size) for n in lengths]
    donor, taker, shared = share if share is not None else (0, 0, 0)
    num_blocks = sum(needed) - shared + spare_blocks
    pool = torch.randperm(num_blocks).tolist()
    table = torch.full((batch, max_blocks), -1, dtype=torch.long)
    k_paged = torch.full((num_blocks, block_size, hk, head_dim), float("nan"), dtype=k_dense.dtype, device=DEVICE)
    v_paged = torch.full_like(k_paged, float("nan"))
    order = [donor] + [b for b in range(batch) if b != donor]  # the donor's blocks exist before the taker's
    for b in order:
        for i in range(needed[b]):
            block = table[donor, i].item() if b == taker and i < shared else pool.pop()
            table[b, i] = block
            slots = slice(i * block_size, (i + 1) * block_size)
            k_paged[block] = k_dense[b, :, slots].transpose(0, 1)
            v_paged[block] = v_dense[b, :, slots].transpose(0, 1)
    return k_paged, v_paged, table.to(torch.int32).to(DEVICE)


def _case(lengths, heads, n_new, head_dim, block_size, dtype=torch.float32, rotary_dim=None):
    """(table, q, dense k/v, paged k/v, block_table, lengths): capacity one block past the longest sequence; the
    longest sequence shares its first full blocks with the second longest (a common prefix)."""
    capacity = (-(-max(lengths) // block_size) + 1) * block_size
    taker, donor = sorted(range(len(lengths)), key=lambda b: lengths[b])[-2:]
    share = (donor, taker, lengths[taker] // block_size) if len(lengths) > 1 else None
    q, k_dense, v_dense, seqlens = _dense_inputs(lengths, *heads, n_new, head_dim, capacity, dtype,
                                                 share=share and (donor, taker, share[2] * block_size))  # fmt: skip
    k_paged, v_paged, block_table = _paginate(k_dense, v_dense, lengths, block_size, share=share)
    return make_table(head_dim, rotary_dim=rotary_dim), q, k_dense, v_dense, k_paged, v_paged, block_table, seqlens


def _expected(q, k_cache, v_cache, seqlens, table, **kwargs):
    return reference.rope_decode(q.double(), k_cache.double(), v_cache.double(), seqlens, table, **kwargs)


# (block_size, (hq, hk), n_new): block sizes below the interpreter's 32-key tile (ids loaded once a block: 1, 8, 16),
# at and above it (one id a tile) and one that is not a power of two (one id a key); GQA groups of 1, 2 and 4 (and 3);
# one and several new tokens.
CASES = [
    (16, (4, 4), 1),
    (16, (4, 2), 3),
    (32, (4, 1), 1),
    (64, (6, 2), 3),
    (128, (4, 2), 2),
    (24, (4, 2), 2),
    (8, (4, 2), 2),
    (1, (4, 1), 1),
]


@pytest.mark.parametrize("block_size,heads,n_new", CASES,
                         ids=[f"bs{b}-{_heads_id(h)}-new{n}" for b, h, n in CASES])  # fmt: skip
def test_paged_equals_dense_and_reference(backend, block_size, heads, n_new):
    table, q, k_dense, v_dense, k_paged, v_paged, block_table, seqlens = _case(LENGTHS, heads, n_new, 64, block_size)
    expected = _expected(q, k_dense, v_dense, seqlens, table)
    # The reference itself: paged (gathered) == dense, exactly in fp64.
    paged_reference = _expected(q, k_paged, v_paged, seqlens, table, block_table=block_table)
    torch.testing.assert_close(paged_reference, expected, **TOLERANCES[torch.float64])
    out = run(backend, lr2.rope_decode, q, k_paged, v_paged, table, cache_seqlens=seqlens, block_table=block_table)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, **tolerance(backend, torch.float32, "decode"))
    # The backend's dense decode on the same data: the same arithmetic, so (nearly) the same numbers.
    dense = lr2.rope_decode(q, k_dense, v_dense, table, cache_seqlens=seqlens, backend=backend)
    torch.testing.assert_close(out, dense, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("head_dim,rotary_dim", [(80, 80), (128, 96)], ids=["D80", "D128rot96"])
def test_paged_head_dims_and_partial_rotary(backend, head_dim, rotary_dim):
    table, q, k_dense, v_dense, k_paged, v_paged, block_table, seqlens = _case(
        [70, 5, 129], (4, 2), 2, head_dim, 16, rotary_dim=rotary_dim
    )
    out = run(backend, lr2.rope_decode, q, k_paged, v_paged, table, cache_seqlens=seqlens, block_table=block_table)
    torch.testing.assert_close(
        out.double(), _expected(q, k_dense, v_dense, seqlens, table), **tolerance(backend, torch.float32, "decode")
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_paged_low_precision_equals_dense(backend, dtype):
    table, q, k_dense, v_dense, k_paged, v_paged, block_table, seqlens = _case(LENGTHS, (4, 2), 2, 64, 16, dtype)
    out = run(backend, lr2.rope_decode, q, k_paged, v_paged, table, cache_seqlens=seqlens, block_table=block_table)
    dense = lr2.rope_decode(q, k_dense, v_dense, table, cache_seqlens=seqlens, backend=backend)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out, dense, **TOLERANCES[dtype])
    torch.testing.assert_close(out.double(), _expected(q, k_dense, v_dense, seqlens, table), **TOLERANCES[dtype])


def test_paged_int64_table_and_transformers_flat_layout(backend):
    # transformers' PagedAttentionCache stores [num_blocks * block_size, Hk, D]: a view gives the paged layout.
    table, q, k_dense, v_dense, k_paged, v_paged, block_table, seqlens = _case([40, 17], (4, 2), 1, 64, 16)
    k_flat, v_flat = k_paged.flatten(0, 1), v_paged.flatten(0, 1)
    out = run(backend, lr2.rope_decode, q, k_flat.view(k_paged.shape), v_flat.view(v_paged.shape), table,
              cache_seqlens=seqlens.long(), block_table=block_table.long())  # fmt: skip
    torch.testing.assert_close(
        out.double(), _expected(q, k_dense, v_dense, seqlens, table), **tolerance(backend, torch.float32, "decode")
    )


def test_paged_strided_cache_and_softmax_scale(backend):
    # Heads and tokens of a block in [num_blocks, Hk, block_size, D] storage (vLLM's older layout), viewed as paged.
    table, q, k_dense, v_dense, k_paged, v_paged, block_table, seqlens = _case([33, 70], (6, 2), 2, 64, 16)
    k_strided = k_paged.transpose(1, 2).contiguous().transpose(1, 2)
    out = run(backend, lr2.rope_decode, q, k_strided, v_paged, table, cache_seqlens=seqlens, block_table=block_table,
              softmax_scale=0.3)  # fmt: skip
    expected = _expected(q, k_dense, v_dense, seqlens, table, softmax_scale=0.3)
    torch.testing.assert_close(out.double(), expected, **tolerance(backend, torch.float32, "decode"))


def test_paged_empty_batch(backend):
    table = make_table(64)
    q = torch.randn(0, 4, 1, 64, device=DEVICE)
    cache = torch.randn(3, 16, 2, 64, device=DEVICE)
    empty = torch.zeros(0, 2, dtype=torch.int32, device=DEVICE)
    seqlens = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    out = run(backend, lr2.rope_decode, q, cache, cache, table, cache_seqlens=seqlens, block_table=empty)
    assert out.shape == q.shape


# ------------------------------------------------------------------------------------------ unchecked values
class _BlockReads:
    """Records, in Triton's interpreter, the block of every element a kernel loads from the storage of a paged
    cache (unmasked lanes only): blocks at or past ``num_blocks`` lie in the storage too, so a read through a bad
    block id shows."""

    def __init__(self, monkeypatch, cache: torch.Tensor):
        from triton.runtime import interpreter

        self.blocks = set()
        original = interpreter.InterpreterBuilder.create_masked_load
        storage = cache.untyped_storage()

        def recording_load(builder, ptrs, mask, *args, **kwargs):
            addresses = ptrs.data[mask.data.astype(bool)].astype("int64")
            inside = (addresses >= storage.data_ptr()) & (addresses < storage.data_ptr() + storage.nbytes())
            offsets = (addresses[inside] - cache.data_ptr()) // cache.element_size()
            self.blocks.update((offsets // cache.stride(0)).tolist())
            return original(builder, ptrs, mask, *args, **kwargs)

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", recording_load)


def _without_value_checks(backend, gpu_like, monkeypatch, *args, **kwargs):
    previous_reads = validation.set_host_reads("never" if gpu_like else "auto")  # "never": as on a GPU
    previous = lr2.set_value_checks("never")
    try:
        return run(backend, lr2.rope_decode, *args, **kwargs)
    finally:
        lr2.set_value_checks(previous)
        validation.set_host_reads(previous_reads)


@pytest.mark.parametrize("block_size", [16, 32], ids=["bs16", "bs32"])
@pytest.mark.parametrize("gpu_like", [False, True], ids=["host_values", "device_values"])
def test_unchecked_bad_block_ids_and_lengths_give_nan_rows(backend, gpu_like, block_size, monkeypatch):
    # Value checks off: a block id outside [0, num_blocks) among those a sequence reads, or a length outside
    # [n, capacity], makes that sequence's rows NaN and reads nothing through the bad id or past the capacity (the
    # caches are views of storage with NaN blocks past num_blocks); the other sequences are exact. Blocks of 16
    # and 32 keys: two ids a 32-key tile (the interpreter's) and one.
    n_new = 2
    lengths = [40, 20, 33, 50, 1, 18]
    capacity = 64  # 4 or 2 blocks per sequence
    q, k_dense, v_dense, seqlens = _dense_inputs(
        [min(n, capacity) for n in lengths], 4, 2, n_new, 64, capacity, torch.float32
    )
    k_paged, v_paged, block_table = _paginate(k_dense, v_dense, [min(n, capacity) for n in lengths], block_size)
    num_blocks = k_paged.shape[0]
    k_store = torch.full((num_blocks + 8, *k_paged.shape[1:]), float("nan"), device=DEVICE)
    v_store = torch.full_like(k_store, float("nan"))
    k_store[:num_blocks], v_store[:num_blocks] = k_paged, v_paged
    k_paged, v_paged = k_store[:num_blocks], v_store[:num_blocks]
    block_table[0, 1] = num_blocks + 2  # read by sequence 0 (40 tokens): past the cache
    block_table[2, 32 // block_size] = -3  # the last block sequence 2 (33 tokens) reads: negative
    block_table[1, -(-20 // block_size)] = num_blocks + 5  # the first block sequence 1 (20 tokens) does NOT read
    lengths[3] = capacity + 9  # past the capacity
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)  # sequence 4: 1 < n_new
    reads = _BlockReads(monkeypatch, k_paged) if backend == "triton" and INTERPRETED else None
    table = make_table(64)
    out = _without_value_checks(backend, gpu_like, monkeypatch, q, k_paged, v_paged, table, cache_seqlens=seqlens,
                                block_table=block_table)  # fmt: skip
    invalid = torch.tensor([True, False, True, True, True, False], device=DEVICE)
    assert out[invalid].isnan().all(), "a sequence with a bad block id or length must give NaN rows"
    valid = ~invalid
    expected = _expected(q[valid], k_dense[valid], v_dense[valid], seqlens[valid], table)
    torch.testing.assert_close(out[valid].double(), expected, **tolerance(backend, torch.float32, "decode"))
    if reads is not None:
        assert reads.blocks and max(reads.blocks) < num_blocks and min(reads.blocks) >= 0, sorted(reads.blocks)


def test_checked_bad_values_are_errors(backend):
    table, q, k_dense, v_dense, k_paged, v_paged, block_table, seqlens = _case([40, 17], (4, 2), 1, 64, 16)
    capacity = block_table.shape[1] * 16
    with pytest.raises(ValueError, match=rf"cache_seqlens: expected values in \[1 \(new tokens\), {capacity} \(the "
                                         rf"cache's capacity, block_table.shape\[1\] \* block_size = 4 \* 16\)\], "
                                         rf"got 65 for sequence 1"):  # fmt: skip
        lr2.rope_decode(q, k_paged, v_paged, table, cache_seqlens=torch.tensor([40, 65], device=DEVICE),
                        block_table=block_table, backend=backend)  # fmt: skip
    bad = block_table.clone()
    bad[1, 1] = k_paged.shape[0]
    with pytest.raises(ValueError, match=rf"block_table: expected block ids in \[0, {k_paged.shape[0]}\) .* sequence "
                                         rf"1 reads .*, got {k_paged.shape[0]} at block_table\[1, 1\]"):  # fmt: skip
        lr2.rope_decode(q, k_paged, v_paged, table, cache_seqlens=seqlens, block_table=bad, backend=backend)
    bad[1, 1] = -1
    with pytest.raises(ValueError, match=r"block_table: expected block ids in \[0, .*got -1 at block_table\[1, 1\]"):
        lr2.rope_decode(q, k_paged, v_paged, table, cache_seqlens=seqlens, block_table=bad, backend=backend)
    # The same -1 where sequence 1 (17 tokens: 2 blocks of 16) does not read is padding: no error, and the result
    # is the reference's.
    bad[1, 1], bad[1, 2] = block_table[1, 1], -1
    out = lr2.rope_decode(q, k_paged, v_paged, table, cache_seqlens=seqlens, block_table=bad, backend=backend)
    torch.testing.assert_close(
        out.double(), _expected(q, k_dense, v_dense, seqlens, table), **tolerance(backend, torch.float32, "decode")
    )


# ------------------------------------------------------------------------------------------------ validation
def test_paged_argument_checks():
    table = make_table(64)
    q = torch.randn(2, 4, 1, 64)
    k_paged, v_paged = torch.zeros(5, 16, 2, 64), torch.zeros(5, 16, 2, 64)
    block_table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    seqlens = torch.tensor([20, 3])

    def call(**changes):
        kwargs = dict(q=q, k_cache=k_paged, v_cache=v_paged, cache_seqlens=seqlens, block_table=block_table)
        kwargs.update(changes)
        args = [kwargs.pop(name) for name in ("q", "k_cache", "v_cache")]
        return lr2.rope_decode(*args, table, **kwargs, backend="torch")

    with pytest.raises(TypeError, match=r"block_table: expected an int32/int64 torch.Tensor \[batch, max_blocks\] "
                                        r"or None, got list"):  # fmt: skip
        call(block_table=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"block_table: expected an int32/int64 tensor of shape \[2 \(batch, as q\), "
                                         r"max_blocks\], got dtype torch.float32 shape \[2, 2\]"):  # fmt: skip
        call(block_table=block_table.float())
    with pytest.raises(ValueError, match=r"block_table: .*got dtype torch.int32 shape \[4\]"):
        call(block_table=block_table.flatten())
    with pytest.raises(ValueError, match=r"block_table: .*shape \[2 \(batch, as q\), max_blocks\], .*shape \[1, 2\]"):
        call(block_table=block_table[:1])
    with pytest.raises(ValueError, match=r"block_table: expected device cpu \(as q\), got meta"):
        call(block_table=block_table.to("meta"))
    with pytest.raises(ValueError, match=r"k_cache: expected a 4-D tensor \[num_blocks, block_size, heads, head_dim\] "
                                         r"\(paged\), got shape \(80, 2, 64\)"):  # fmt: skip
        call(k_cache=k_paged.flatten(0, 1), v_cache=v_paged.flatten(0, 1))
    with pytest.raises(ValueError, match="k_cache: expected a number of heads dividing q's 4, got 3"):
        call(k_cache=torch.zeros(5, 16, 3, 64), v_cache=torch.zeros(5, 16, 3, 64))
    with pytest.raises(ValueError, match=r"k_cache: expected head_dim = table.head_dim = 64 .*got 80"):
        call(k_cache=torch.zeros(5, 16, 2, 80), v_cache=torch.zeros(5, 16, 2, 80))
    with pytest.raises(ValueError, match=r"v_cache: expected the shape of k_cache \(5, 16, 2, 64\), got \(5, 8, 2"):
        call(v_cache=torch.zeros(5, 8, 2, 64))
    with pytest.raises(ValueError, match=r"v_cache: expected dtype torch.float32 \(as q\), got torch.float16"):
        call(v_cache=v_paged.half())
    with pytest.raises(ValueError, match=r"k_cache: expected a block size >= 1"):
        call(k_cache=torch.zeros(5, 0, 2, 64), v_cache=torch.zeros(5, 0, 2, 64))
    with pytest.raises(ValueError, match=r"q: expected at most k_cache's capacity of 32 new tokens \(block_table"
                                         r".shape\[1\] \* block_size = 2 \* 16\), got 33"):  # fmt: skip
        call(q=torch.randn(2, 4, 33, 64), cache_seqlens=torch.tensor([33, 33]))
    # A paged cache's batch is not q's: 5 blocks for 2 sequences is no error (the dense check would refuse it).
    out = call()
    torch.testing.assert_close(out, reference.rope_decode(q, k_paged, v_paged, seqlens, table, block_table=block_table))


def test_decode_call_describes_the_paged_layout():
    table = make_table(64)
    q, cache = torch.randn(2, 4, 1, 64), torch.zeros(5, 16, 2, 64)
    block_table, seqlens = torch.tensor([[0, 1, 4], [2, 3, 4]]), torch.tensor([20, 3])
    call = build_call(lr2.rope_decode, q, cache, cache, table, cache_seqlens=seqlens, block_table=block_table)
    assert isinstance(call, DecodeCall) and call.paged and call.block_table is block_table
    assert (call.block_size, call.num_blocks, call.capacity, call.seq_len, call.num_kv_heads) == (16, 5, 48, 48, 2)
    dense = build_call(lr2.rope_decode, q, cache[:2].transpose(1, 2), cache[:2].transpose(1, 2), table,
                       cache_seqlens=torch.tensor([16, 3]))  # fmt: skip
    assert not dense.paged and dense.block_table is None and dense.block_size is None
    assert (dense.capacity, dense.num_kv_heads) == (16, 2)


def test_a_kernel_backend_without_paging_refuses_a_paged_call(monkeypatch):
    # A launcher without a block_table parameter must never be handed paged caches (it would read blocks as
    # sequences): the custom op refuses the call.
    def rope_decode(q, k_cache, v_cache, cache_seqlens, inv_freq, original_max_position, attention_short,
                    attention_long, softmax_scale, num_splits=None):  # fmt: skip
        raise AssertionError("a paged call reached a launcher without paging")

    real = custom_ops._launchers
    monkeypatch.setattr(
        custom_ops,
        "_launchers",
        lambda name: SimpleNamespace(rope_decode=rope_decode) if name == "dense" else real(name),
    )

    class DenseOnly(FusedBackend):
        NAME = "dense"

    table = make_table(64)
    call = build_call(lr2.rope_decode, torch.randn(1, 2, 1, 64), torch.zeros(2, 16, 1, 64), torch.zeros(2, 16, 1, 64),
                      table, cache_seqlens=torch.tensor([5]), block_table=torch.tensor([[1]]))  # fmt: skip
    with pytest.raises(NotImplementedError, match=r"the dense backend has no paged decode kernel yet"):
        DenseOnly().rope_decode(call)


@requires_triton
def test_triton_paged_splits_give_the_same_result():
    # The launcher's num_splits (and 1-key splits, which leave short sequences with empty splits): the paged kernel
    # keeps the split-K design.
    from lr2kernels.ops import rotary
    from lr2kernels.ops.triton import decode

    table, q, k_dense, v_dense, k_paged, v_paged, block_table, seqlens = _case([3, 64, 65, 257], (6, 2), 3, 64, 16)
    expected = _expected(q, k_dense, v_dense, seqlens, table)
    for num_splits, min_split_keys in ((1, None), (3, None), (7, 1)):
        out = decode.rope_decode(
            q, k_paged, v_paged, seqlens, rotary.inv_freq_pair(table, q.device).contiguous(),
            table.original_max_position, table.attention_factor_for(False), table.attention_factor_for(True),
            q.shape[-1] ** -0.5, num_splits=num_splits, min_split_keys=min_split_keys, block_table=block_table,
        )  # fmt: skip
        torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32])


def test_default_backend_runs_paged(monkeypatch):
    # backend=None picks a backend that reads the paged caches (never one that would run them as dense ones).
    table, q, k_dense, v_dense, k_paged, v_paged, block_table, seqlens = _case([30, 17], (4, 2), 1, 64, 16)
    out = lr2.rope_decode(q, k_paged, v_paged, table, cache_seqlens=seqlens, block_table=block_table)
    name = dispatch.backend_name("rope_decode", q.device, q.dtype, 64)
    torch.testing.assert_close(
        out.double(), _expected(q, k_dense, v_dense, seqlens, table), **tolerance(name, torch.float32, "decode")
    )


def test_paged_decode_compiles_fullgraph(backend):
    # torch.compile(fullgraph=True) traces a paged call (the torch backend's gather without host reads, the kernels'
    # custom op with its optional block_table) and gives the eager result.
    table, q, k_dense, v_dense, k_paged, v_paged, block_table, seqlens = _case([40, 17], (4, 2), 1, 64, 16)

    def decode(q, k_cache, v_cache, seqlens, block_table):
        return lr2.rope_decode(
            q, k_cache, v_cache, table, cache_seqlens=seqlens, block_table=block_table, backend=backend
        )

    torch._dynamo.reset()
    compiled = torch.compile(decode, fullgraph=True, backend="aot_eager")
    out = compiled(q, k_paged, v_paged, seqlens, block_table)
    torch.testing.assert_close(out, decode(q, k_paged, v_paged, seqlens, block_table), atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(
        out.double(), _expected(q, k_dense, v_dense, seqlens, table), **tolerance(backend, torch.float32, "decode")
    )


@requires_triton
def test_triton_128_key_tiles_dense_and_paged(monkeypatch):
    # On a GPU, heads 80-96 with 16-row tiles take 128-key tiles (the interpreter takes 32): the same launch with
    # BLOCK_N forced to 128, dense and through 16- and 256-key blocks, split (the in-kernel merge) and not, lengths
    # on both sides of L0 and past one tile.
    from lr2kernels.ops import rotary
    from lr2kernels.ops.triton import decode

    real = decode._block_sizes
    monkeypatch.setattr(decode, "_block_sizes", lambda *args, **kwargs: (real(*args, **kwargs)[0], 128))
    for block_size in (16, 256):
        table, q, k_dense, v_dense, k_paged, v_paged, block_table, seqlens = _case(
            [3, 64, 65, 300], (4, 4), 1, 80, block_size
        )
        expected = _expected(q, k_dense, v_dense, seqlens, table)
        for num_splits in (1, 3):
            for paged in ({}, {"block_table": block_table}):
                k, v = (k_paged, v_paged) if paged else (k_dense, v_dense)
                out = decode.rope_decode(
                    q, k, v, seqlens, rotary.inv_freq_pair(table, q.device).contiguous(),
                    table.original_max_position, table.attention_factor_for(False), table.attention_factor_for(True),
                    q.shape[-1] ** -0.5, num_splits=num_splits, min_split_keys=1, **paged,
                )  # fmt: skip
                torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32])


@requires_triton
@pytest.mark.parametrize("block_size", [8, 24, 64], ids=["bs8", "bs24", "bs64"])
def test_triton_paged_int64_offsets(monkeypatch, block_size):
    # Caches of 2^31 elements or more take 64-bit per-key offsets: that path, forced on small caches, for ids loaded
    # once a block, one a key and one a tile (the interpreter's 32-key tiles); k and v of different layouts.
    from lr2kernels.ops.triton import decode

    monkeypatch.setattr(decode, "_INT32_ROWS_LIMIT", 0)
    table, q, k_dense, v_dense, k_paged, v_paged, block_table, seqlens = _case([3, 65, 130], (4, 2), 2, 64, block_size)
    k_strided = k_paged.transpose(1, 2).contiguous().transpose(1, 2)
    out = run("triton", lr2.rope_decode, q, k_strided, v_paged, table, cache_seqlens=seqlens, block_table=block_table)
    torch.testing.assert_close(
        out.double(), _expected(q, k_dense, v_dense, seqlens, table), **tolerance("triton", torch.float32, "decode")
    )


@requires_triton
@pytest.mark.parametrize("ahead", [False, True], ids=["in_trip", "ahead"])
@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 256], ids=["bs8", "bs16", "bs32", "bs64", "bs256"])
def test_triton_paged_ids_ahead_and_in_trip(monkeypatch, block_size, ahead):
    # The key loop loads the block ids a trip ahead or in the trip, by Triton version (_ids_ahead): both paths, for
    # ids once a block and once a tile (the interpreter's 32-key tiles), exact, and with the bad-id guard.
    from lr2kernels.ops.triton import decode

    monkeypatch.setattr(decode, "_ids_ahead", lambda page, block_n, block_m=16: ahead)
    table, q, k_dense, v_dense, k_paged, v_paged, block_table, seqlens = _case([3, 65, 130], (4, 2), 2, 64, block_size)
    out = run("triton", lr2.rope_decode, q, k_paged, v_paged, table, cache_seqlens=seqlens, block_table=block_table)
    torch.testing.assert_close(
        out.double(), _expected(q, k_dense, v_dense, seqlens, table), **tolerance("triton", torch.float32, "decode")
    )
    if block_size in (16, 32):
        test_unchecked_bad_block_ids_and_lengths_give_nan_rows("triton", True, block_size, monkeypatch)


@requires_triton
@pytest.mark.parametrize(
    ("version", "page", "block_m", "ahead"),
    [
        ("3.6.0", 16, 16, True),  # blocks dividing the tile: the shorter trip on 3.6
        ("3.6.0", 256, 16, False),  # blocks a multiple of it: in the trip on 3.6 ...
        ("3.6.0", 256, 32, True),  # ... but ahead for 32-row tiles (in the trip they spill 12 B on sm_80)
        ("3.9.0", 16, 16, False),
        ("3.9.0", 256, 16, True),
        ("3.9.0", 256, 32, True),
        ("3.9.0", 48, 16, False),  # a block id per key: always in the trip
        ("3.6.0", 48, 32, False),
    ],
)
def test_triton_paged_ids_ahead_choice(monkeypatch, version, page, block_m, ahead):
    # The launcher's choice by Triton version, block size and rows (64-key tiles), as compiled (decode.py).
    from lr2kernels.ops.triton import decode

    monkeypatch.setattr(decode.triton, "__version__", version)
    assert decode._ids_ahead(page, 64, block_m) is ahead
