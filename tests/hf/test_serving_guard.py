"""Continuous batching (transformers' serving path, a paged KV cache) on a patched model raises a clear error instead
of returning wrong tokens; after unpatch it runs as on a model that was never patched."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import transformers

import lr2kernels as lr2
from lr2kernels.hf import is_patched
from tests.hf.test_stock_differential import ARCHS, ids, tiny_default_rope

REFUSAL = r"patched by lr2kernels\.patch\(\).*continuous batching.*not supported.*lr2kernels\.unpatch\(model\)"


def _cb_config(**kwargs):
    # A few small pages: the default sizes the cache from the machine's memory (~40 s on a CPU for a tiny model).
    return transformers.ContinuousBatchingConfig(num_blocks=8, page_size=16, max_batch_tokens=64, **kwargs)


def _generation_config():
    return transformers.GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)


def _prompts() -> list[list[int]]:
    return [ids(1, length, seed=seed)[0].tolist() for seed, length in ((1, 9), (2, 17), (3, 5))]


def _generate_batch(model) -> list[list[int]]:
    out = model.generate_batch(
        _prompts(), generation_config=_generation_config(), continuous_batching_config=_cb_config(), warmup=False
    )
    return [out[key].generated_tokens for key in sorted(out)]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_continuous_batching_entry_is_refused_on_a_patched_model(arch):
    patched = lr2.patch(tiny_default_rope(arch), backend="torch")
    with pytest.raises(NotImplementedError, match=r"generate_batch\(\): this model is " + REFUSAL):
        patched.generate_batch(_prompts(), generation_config=_generation_config())
    with pytest.raises(NotImplementedError, match=r"init_continuous_batching\(\): this model is " + REFUSAL):
        patched.init_continuous_batching(continuous_batching_config=_cb_config())
    context = patched.continuous_batching_context_manager
    with pytest.raises(NotImplementedError, match=REFUSAL), context(continuous_batching_config=_cb_config()):
        pass
    with pytest.raises(NotImplementedError, match=REFUSAL):  # generate's own switch to continuous batching
        patched.generate(ids(1, 6), cache_implementation="paged", max_new_tokens=2)
    assert getattr(patched, "_cached_continuous_batching_manager", None) is None
    assert patched.config._attn_implementation == "sdpa"  # refused before transformers switched anything


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_continuous_batching_after_unpatch_equals_a_never_patched_model(arch):
    stock = tiny_default_rope(arch)
    model = lr2.patch(copy.deepcopy(stock), backend="torch")
    with pytest.raises(NotImplementedError, match=REFUSAL):
        model.generate_batch(_prompts(), generation_config=_generation_config())
    lr2.unpatch(model)
    assert not is_patched(model)
    assert not any(name in vars(model) for name in lr2.hf.serving.CONTINUOUS_BATCHING_ENTRIES)
    assert _generate_batch(model) == _generate_batch(stock)


def test_a_paged_cache_given_to_a_patched_forward_is_refused():
    # Whoever builds the paged cache (a manager made before the patch, a serving loop): the forward refuses it
    # before any layer writes to it.
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
    from transformers.generation.continuous_batching.distributed import DistributedHelper

    stock = tiny_default_rope("llama")
    patched = lr2.patch(copy.deepcopy(stock), backend="torch")
    cache = PagedAttentionCache(
        stock.config, _cb_config(max_memory_percent=0.1), "cpu",
        DistributedHelper(device_mesh=None, cpu_group_timeout=60), dtype=torch.float32,
    )  # fmt: skip
    with pytest.raises(NotImplementedError, match=r"LlamaModel.forward: got a PagedAttentionCache as the KV cache, "
                       r"expected a transformers Cache .*or None\. This model is " + REFUSAL):  # fmt: skip
        patched(ids(1, 5), cache=cache)


def test_the_refusal_survives_pickle_and_deepcopy_and_leaves_the_copy_unpatchable():
    patched = lr2.patch(tiny_default_rope("qwen2"), backend="torch")
    for copied in (copy.deepcopy(patched), pickle.loads(pickle.dumps(patched))):
        with pytest.raises(NotImplementedError, match=REFUSAL):
            copied.generate_batch(_prompts(), generation_config=_generation_config())
        lr2.unpatch(copied)
        assert "generate_batch" not in vars(copied)


def test_paged_sdpa_implementation_name_keeps_the_patch_equal_to_stock():
    # "paged|sdpa" (a deprecated alias of "sdpa" in transformers 5.2x) on an ordinary forward and generate.
    stock = tiny_default_rope("llama")
    patched = lr2.patch(copy.deepcopy(stock), backend="torch")
    prompt = ids(2, 12)
    mask = torch.ones_like(prompt)
    mask[0, :4], prompt[0, :4] = 0, 0  # left padding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation of the "paged|" prefix
        for model in (stock, patched):
            model.set_attn_implementation("paged|sdpa")
    with torch.no_grad():
        expected = stock.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False)
        got = patched.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)
