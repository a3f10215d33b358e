"""What a patched model still refuses on transformers' serving path, loudly, and what unpatch gives back.

Continuous batching itself runs on a patched model (tests/hf/test_continuous_batching.py); refused are the KV caches
whose key positions the patch cannot know (anything that is neither a transformers ``Cache`` nor continuous batching's
``PagedAttentionCache``) and a paged forward whose positions do not continue each request's cache.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers

import lr2kernels as lr2
from lr2kernels.hf import is_patched
from tests.models import tiny_default_rope, token_ids


def _cb_config(**kwargs):
    # A few small pages: the default sizes the cache from the machine's memory (~40 s on a CPU for a tiny model).
    return transformers.ContinuousBatchingConfig(num_blocks=8, page_size=16, max_batch_tokens=64, **kwargs)


def _generate_batch(model) -> list[list[int]]:
    prompts = [token_ids(1, length, seed=seed)[0].tolist() for seed, length in ((1, 9), (2, 17), (3, 5))]
    generation = transformers.GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    out = model.generate_batch(
        prompts, generation_config=generation, continuous_batching_config=_cb_config(), warmup=False
    )
    return [out[key].generated_tokens for key in sorted(out)]


def test_a_cache_of_unknown_layout_is_refused():
    class OwnCache:  # e.g. a serving loop's own KV store: where its keys sit is unknown to the patch
        def update(self, key, value, layer_idx, **kwargs):
            return key, value

    patched = lr2.patch(tiny_default_rope("llama"), backend="torch")
    with pytest.raises(NotImplementedError, match=r"LlamaModel\.forward: got a OwnCache as the KV cache, expected a "
                       r"transformers Cache .*PagedAttentionCache or None.*lr2kernels\.unpatch\(model\)"):  # fmt: skip
        patched(token_ids(1, 5), cache=OwnCache())


def test_paged_positions_that_do_not_continue_the_cache_are_refused():
    # A forward on the paged cache whose positions skip one: the keys' positions would be guessed, so it raises.
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
    from transformers.generation.continuous_batching.distributed import DistributedHelper

    model = lr2.patch(tiny_default_rope("llama"), backend="torch")
    cache = PagedAttentionCache(
        model.config, _cb_config(max_memory_percent=0.1), "cpu",
        DistributedHelper(device_mesh=None, cpu_group_timeout=60), dtype=torch.float32,
    )  # fmt: skip
    positions = torch.tensor([[0, 1, 3, 4]])
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match=r"request 0 .* query positions \[0, 1, 3, 4\].*consecutive"):
        model(token_ids(1, 4), cache=cache, position_ids=positions, cu_seq_lens_q=cu,
              cu_seq_lens_k={"full_attention": cu}, max_length_q=4, max_length_k={"full_attention": 4})  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_continuous_batching_after_unpatch_equals_a_never_patched_model(arch):
    stock = tiny_default_rope(arch)
    model = lr2.patch(copy.deepcopy(stock), backend="torch")
    lr2.unpatch(model)
    assert not is_patched(model)
    assert _generate_batch(model) == _generate_batch(stock)


def test_paged_sdpa_implementation_name_keeps_the_patch_equal_to_stock():
    # "paged|sdpa" (a deprecated alias of "sdpa" in transformers 5.2x) on an ordinary forward and generate.
    stock = tiny_default_rope("llama")
    patched = lr2.patch(copy.deepcopy(stock), backend="torch")
    prompt = token_ids(2, 12)
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
