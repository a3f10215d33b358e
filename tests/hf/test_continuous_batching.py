"""Continuous batching (transformers' serving path: every request flattened into one row, a paged KV cache) on a
patched model gives stock's tokens, request for request.

The weights are scaled x6 (tests.models), so a key at a wrong position changes the tokens: rotating every cached key
at position 0 instead of its own makes 0 of the 4 requests of these tests equal stock's on every architecture
(checked by hand), and so does giving the short requests of a long batch their own table (asserted below). The
prompts have different lengths; ``max_batch_tokens=16`` splits the prefills into chunks, so that batches mix
prefills, chunks that continue a cache and single-token decodes.
"""

from __future__ import annotations

import copy
import pickle
import time

import pytest
import torch
import transformers

import lr2kernels as lr2
from lr2kernels.hf import serving
from lr2kernels.ops import dispatch
from tests.models import ARCHS, L0, tiny_default_rope, tiny_model, token_ids

NEW_TOKENS = 8
MIXED = [(1, 9), (2, 17), (3, 5), (4, 30)]  # (seed, prompt length)
SHORT = [(1, 9), (2, 17), (3, 5)]  # a LongRoPE model stays below L0 = 32 (at most 16 + 8 positions)
CROSSING = [(1, 9), (2, L0 - 4), (3, 5), (4, L0 + 8)]  # one prompt past L0: every batch uses the long table
# The tiny models run on the CPU: the Triton kernels there need Triton's interpreter (conftest sets it without a GPU).
requires_cpu_triton = pytest.mark.skipif(
    not dispatch.backend_status("triton", torch.device("cpu"))[0],
    reason=f"triton on the CPU: {dispatch.backend_status('triton', torch.device('cpu'))[1]}",
)


def prompts(spec) -> list[list[int]]:
    return [token_ids(1, length, seed=seed)[0].tolist() for seed, length in spec]


def cb_config(max_batch_tokens: int = 16, **kwargs) -> transformers.ContinuousBatchingConfig:
    # A few small pages: the default sizes the cache from the machine's memory (~40 s on a CPU for a tiny model).
    return transformers.ContinuousBatchingConfig(
        num_blocks=32, page_size=16, max_batch_tokens=max_batch_tokens, **kwargs
    )


def generation_config() -> transformers.GenerationConfig:
    return transformers.GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)


def generate_batch(model, spec, **config) -> list[list[int]]:
    """Greedy ``generate_batch``: each request's generated tokens, in request order."""
    out = model.generate_batch(
        prompts(spec), generation_config=generation_config(), continuous_batching_config=cb_config(**config),
        warmup=False,
    )  # fmt: skip
    return [out[key].generated_tokens for key in sorted(out, key=lambda name: int(name.split("_")[-1]))]


def patched_copy(stock, **kwargs):
    return lr2.patch(copy.deepcopy(stock), backend="torch", **kwargs)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts of the fused ops the paged path calls (the torch backend here; the same calls run the GPU kernels)."""
    calls = {"rope_attention": 0, "rope_decode": 0}
    for name in calls:
        op = getattr(serving, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(serving, name, counted)
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_batch_equals_stock(arch, fused_calls):
    stock = tiny_default_rope(arch)
    want = generate_batch(stock, MIXED)
    assert generate_batch(patched_copy(stock), MIXED) == want
    # Prefills through the varlen kernel, cached requests through the decode kernel.
    assert fused_calls["rope_attention"] > 0 and fused_calls["rope_decode"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_manager_api_equals_stock(arch):
    # init_continuous_batching: a background loop; requests arrive while others decode.
    stock = tiny_default_rope(arch)
    want = generate_batch(stock, MIXED)
    manager = patched_copy(stock).init_continuous_batching(
        generation_config=generation_config(), continuous_batching_config=cb_config()
    )
    manager.start()
    try:
        first = manager.add_requests(prompts(MIXED[:2]), max_new_tokens=NEW_TOKENS)
        results = {}
        deadline = time.monotonic() + 60
        while len(results) < len(MIXED) and time.monotonic() < deadline:
            if len(results) == 1 and len(first) == 2:  # the first request is done: the others join the batch
                first += manager.add_requests(prompts(MIXED[2:]), max_new_tokens=NEW_TOKENS)
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = result.generated_tokens
    finally:
        manager.stop(block=True, timeout=30)
    assert [results.get(request_id) for request_id in first] == want


@pytest.mark.filterwarnings("error:lr2kernels. continuous batching switched")
@pytest.mark.parametrize("spec", [SHORT, CROSSING], ids=["below-L0", "crossing-L0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_longrope_table_equals_stock(arch, spec):
    # A LongRoPE model (L0 = 32): below L0 every batch uses the short table; with a prompt past L0 in every batch
    # (all prefilled together, all finishing together), every batch uses the long one, also for the short requests
    # and for the request whose positions cross L0: the table stock's rotary picks for the flattened batch.
    stock = tiny_model(arch, scale=6.0)
    assert generate_batch(patched_copy(stock), spec, max_batch_tokens=128) == generate_batch(
        stock, spec, max_batch_tokens=128
    )


def test_a_table_switch_under_cached_keys_is_announced():
    # Request 2 (30 tokens) crosses L0 = 32 while decoding, and request 1 holds cached keys then: stock keeps those
    # keys rotated with the short table, a patched model re-rotates them with the long one, so it says so.
    spec = [(1, 9), (2, L0 - 2)]
    model = patched_copy(tiny_model("llama", scale=6.0))
    with pytest.warns(UserWarning, match="switched the RoPE table") as caught:
        generate_batch(model, spec, max_batch_tokens=64)
    assert "rule='position'" in str(caught[0].message)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_position_rule_gives_each_request_its_own_tables(arch):
    # rule="position": each token by its own position, whatever it is batched with: each request as it generates
    # alone (which equals its own full forward), also the prompt past L0 whose prefill uses both tables. Stock
    # rotates the short requests of a long batch with the long table, so the tokens differ from stock's: the test
    # above would see a wrong table.
    stock = tiny_model(arch, scale=6.0)
    model = patched_copy(stock, rule="position")
    got = generate_batch(model, CROSSING, max_batch_tokens=128)
    alone = []
    for prompt in prompts(CROSSING):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), generation_config=generation_config())
        alone.append(out[0, len(prompt) :].tolist())
    assert got == alone
    assert got != generate_batch(stock, CROSSING, max_batch_tokens=128)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_sliding_window_equals_stock(arch):
    # A window of 8: the sliding allocator returns each request's newest keys (not from position 0).
    stock = tiny_default_rope(arch, sliding_window=8)
    want = generate_batch(stock, MIXED)
    assert generate_batch(patched_copy(stock), MIXED) == want
    assert want != generate_batch(tiny_default_rope(arch), MIXED)  # the window changes the tokens


def test_eager_model_switched_to_paged_eager_equals_stock():
    # An eager model: continuous batching switches it to "paged|eager" (and back); the patched layers keep theirs.
    stock = tiny_default_rope("llama", attn="eager")
    patched = patched_copy(stock)
    assert generate_batch(patched, MIXED) == generate_batch(stock, MIXED)
    assert patched.config._attn_implementation == "eager"


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_cpu_triton)])
def test_decode_fast_path_block_table(monkeypatch, paged_decodes, backend):
    # The decode fast path (flash attention on CUDA): transformers leaves the cache write to the kernel and passes
    # a block table; forced here on the CPU, the patched model writes the pages itself; the torch backend reads them
    # back, the Triton decode kernel reads them through that block table. Stock's SDPA cannot run that path, so stock
    # runs the index path.
    from transformers.generation.continuous_batching import initialization

    stock = tiny_default_rope("llama")
    want = generate_batch(stock, MIXED, max_batch_tokens=128)
    monkeypatch.setattr(initialization, "ensure_decode_fast_path_is_available", lambda *args, **kwargs: None)
    reads = []
    real = serving._keys_from_block_table
    monkeypatch.setattr(serving, "_keys_from_block_table", lambda *args: reads.append(1) or real(*args))
    patched = lr2.patch(copy.deepcopy(stock), backend=backend)
    assert generate_batch(patched, MIXED, max_batch_tokens=128, max_blocks_per_request=8) == want
    assert reads  # the block-table path ran
    assert (paged_decodes["block_table"] > 0) == (backend == "triton")


@pytest.fixture
def paged_decodes(monkeypatch):
    """The ``rope_decode`` calls of the paged path: how many read the paged cache through a block table, how many a
    padded copy."""
    calls = {"block_table": 0, "padded": 0}
    real = serving.rope_decode

    def counted(*args, **kwargs):
        calls["padded" if kwargs.get("block_table") is None else "block_table"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(serving, "rope_decode", counted)
    return calls


@requires_cpu_triton
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_triton_decode_reads_the_pages_by_block_table(arch, paged_decodes):
    # On a kernel backend (Triton, run by the interpreter here), cached requests reach the fused decode kernel through
    # the paged cache's block table (made from read_index), not a padded copy of their keys. A LongRoPE model, fp32.
    stock = tiny_model(arch, scale=6.0)
    spec = [(1, 9), (2, 17), (3, 5)]
    patched = lr2.patch(copy.deepcopy(stock), backend="triton")
    assert generate_batch(patched, spec, max_batch_tokens=16) == generate_batch(stock, spec, max_batch_tokens=16)
    assert paged_decodes["block_table"] > 0 and paged_decodes["padded"] == 0


def test_pickled_and_copied_patched_models_batch_like_stock():
    stock = tiny_default_rope("qwen2")
    want = generate_batch(stock, MIXED)
    patched = patched_copy(stock)
    for copied in (copy.deepcopy(patched), pickle.loads(pickle.dumps(patched))):
        assert lr2.hf.is_patched(copied)
        assert generate_batch(copied, MIXED) == want
    assert generate_batch(lr2.unpatch(patched), MIXED) == want


def test_generate_with_the_paged_cache_equals_stock():
    # generate(cache_implementation="paged") hands the batch to continuous batching.
    stock = tiny_default_rope("qwen3")
    prompt = token_ids(2, 12)
    kwargs = dict(cache_implementation="paged", max_new_tokens=6, do_sample=False, eos_token_id=-1,
                  continuous_batching_config=cb_config(64))  # fmt: skip
    assert torch.equal(patched_copy(stock).generate(prompt, **kwargs), stock.generate(prompt, **kwargs))
