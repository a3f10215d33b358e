"""The rotated-key copy of a CPU decode (lr2kernels.hf.rotated_keys): same numbers as rotating the whole cache at every
step, bit for bit, through everything that changes a cache between steps.

Each test runs the same script on two patched copies of one model, ``rotated_key_cache=True`` (the default: a step
rotates only its new keys) and ``False`` (the whole PRE-RoPE cache is rotated again at every step), and demands
``torch.equal`` logits. The model is the LongRoPE tiny_model of tests/models.py (L0 = 32), so scripts can cross L0.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import transformers

import lr2kernels as lr2
from lr2kernels.hf import rotated_keys
from tests.models import L0, tiny_model

ARCHS = ["llama", "qwen3", "phi3"]


def scaled_model(arch: str, partial_rotary: float = 1.0):
    """The tiny model with weights x6, as the stock-vs-patched suite: a key one position off moves logits > 0.1."""
    return tiny_model(arch, partial_rotary=partial_rotary, scale=6.0)


def both_ways(arch: str, rule: str = "hf", partial_rotary: float = 1.0, with_stock: bool = False):
    """(kept copy, whole-cache rotation[, stock]): two patched copies of one tiny model[, and the model itself]."""
    model = scaled_model(arch, partial_rotary)
    kept = lr2.patch(copy.deepcopy(model), rule=rule)
    whole = lr2.patch(copy.deepcopy(model), rule=rule, rotated_key_cache=False)
    return (kept, whole, model) if with_stock else (kept, whole)


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


def copy_of(cache, layer: int = 0):
    return cache.layers[layer].__dict__.get(rotated_keys.ATTRIBUTE)


@torch.no_grad()
def run_script(model, prompt: torch.Tensor, script) -> list[torch.Tensor]:
    """Prefill ``prompt`` into a new cache (as generate does: the prefill builds the copy), then for each entry of
    ``script``: a callable edits the cache, an int is a decode step of that token. Returns the logits of every
    step, the prefill's included."""
    out = model(prompt, cache=transformers.DynamicCache(config=model.config), use_cache=True)
    cache, logits = out.past_key_values, [out.logits[:, -1]]
    for entry in script:
        if callable(entry):
            entry(cache)
            continue
        step = torch.full((cache.layers[0].keys.shape[0], 1), entry)
        out = model(step, cache=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
    return logits


def assert_same(kept, whole, prompt, script) -> list[torch.Tensor]:
    got, want = run_script(kept, prompt, script), run_script(whole, prompt, script)
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"step {step}: max |diff| {(a - b).abs().max().item():.3e}"
    return got


# ---- the copy is used, and is exact ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decode_equals_whole_cache_rotation_bit_for_bit(arch):
    kept, whole = both_ways(arch)
    prompt = tokens(2, 20)
    assert_same(kept, whole, prompt, [5, 17, 3, 99, 42, 7, 8, 9])
    # The copy was kept and extended: it holds every key, rotated, and was not rebuilt at each step.
    with torch.no_grad():
        cache = kept(prompt, use_cache=True).past_key_values
        assert copy_of(cache) is None  # the model made its cache inside the prefill: the copy starts at step 1
        cache = transformers.DynamicCache(config=kept.config)
        kept(prompt, cache=cache, use_cache=True)  # a prefill into a given cache (generate's) builds it
        held = copy_of(cache)
        assert held is not None and held.rows == 20
        buffer = held.buffer
        for token in (4, 5, 6):
            cache = kept(torch.full((2, 1), token), cache=cache, use_cache=True).past_key_values
    assert copy_of(cache) is held and held.buffer is buffer  # extended in place, never rebuilt
    assert held.rows == cache.layers[0].keys.shape[2] == 23
    assert held.buffer.shape[2] <= 20 + 256  # growth room is bounded


def test_the_pre_rope_cache_is_appended_in_place_with_the_same_numbers():
    # With the copy, the cache layers append their keys and values in place (no torch.cat of the whole cache per
    # step); without it (and on the GPU backends, which keep no copy) they stay transformers' own DynamicLayer.
    from transformers.cache_utils import DynamicLayer

    from lr2kernels.hf.appending_layer import AppendingDynamicLayer

    kept, whole = both_ways("llama")
    caches = []
    for model in (kept, whole):
        with torch.no_grad():
            cache = model(tokens(2, 20), use_cache=True).past_key_values
            for token in (4, 5, 6, 7):
                cache = model(torch.full((2, 1), token), cache=cache, use_cache=True).past_key_values
            storage = cache.layers[0].keys.untyped_storage().data_ptr()
            cache = model(torch.full((2, 1), 8), cache=cache, use_cache=True).past_key_values
            caches.append((cache, storage == cache.layers[0].keys.untyped_storage().data_ptr()))
    (kept_cache, in_place), (whole_cache, whole_in_place) = caches
    assert in_place and not whole_in_place
    for a, b in zip(kept_cache.layers, whole_cache.layers, strict=True):
        assert type(a) is AppendingDynamicLayer and type(b) is DynamicLayer
        assert a.keys.shape == b.keys.shape == (2, b.keys.shape[1], 25, b.keys.shape[3])
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_partial_rotary_equals_whole_cache_rotation():
    kept, whole = both_ways("phi3", partial_rotary=0.75)  # Phi-4-mini's layout: the last quarter is not rotated
    assert_same(kept, whole, tokens(1, 12), [5, 6, 7, 8])


@pytest.mark.parametrize("rule", ["hf", "position"])
def test_decoding_across_l0_switches_the_copy_to_the_long_table(rule):
    kept, whole = both_ways("llama", rule=rule)
    # Prefill L0 - 3 tokens, then 6 steps: the sequence crosses L0 and every key must be rotated with the long table.
    assert_same(kept, whole, tokens(1, L0 - 3), [11, 12, 13, 14, 15, 16])


def test_generate_greedy_and_beams_equal_whole_cache_rotation():
    kept, whole = both_ways("llama")
    prompt = tokens(1, 12)
    for kwargs in (dict(do_sample=False), dict(do_sample=False, num_beams=3, num_return_sequences=2)):
        results = []
        for model in (kept, whole):
            with torch.no_grad():
                results.append(
                    model.generate(
                        prompt, max_new_tokens=10, return_dict_in_generate=True, output_logits=True, pad_token_id=0,
                        **kwargs,
                    )
                )  # fmt: skip
        assert torch.equal(results[0].sequences, results[1].sequences)
        for a, b in zip(results[0].logits, results[1].logits, strict=True):
            assert torch.equal(a, b)


# ---- everything that changes a cache between steps invalidates the copy ---------------------------------------


def _permute(cache):
    cache.reorder_cache(torch.tensor([1, 0]))  # beam search: the rows swap, lengths stay


def _crop(cache):
    cache.crop(-3)  # assisted decoding: the newest 3 tokens go


def _edit_in_place(cache):
    for layer in cache.layers:
        layer.keys[:, :, 4] += 0.5  # a user's in-place edit through a view: the version counter moves


def _select(cache):
    cache.batch_select_indices(torch.tensor([1]))


def _repeat(cache):
    cache.batch_repeat_interleave(2)


def _reset(cache):
    cache.reset()


def test_a_key_one_position_off_moves_these_logits():
    # The premise of the stock comparisons below: with weights x6, shifting the positions of the newest token by one
    # (what a stale or misplaced rotated key amounts to) moves the logits by far more than their tolerance.
    model = scaled_model("llama")
    prompt = tokens(1, 16)
    with torch.no_grad():
        right = model(prompt).logits[:, -1]
        shifted = torch.cat([torch.arange(15), torch.tensor([16])])[None]
        wrong = model(prompt, position_ids=shifted).logits[:, -1]
    assert (right - wrong).abs().max() > 0.1


@pytest.mark.parametrize(
    "edit", [_permute, _crop, _edit_in_place, _select, _repeat], ids=["reorder", "crop", "in-place", "select", "repeat"]
)
def test_cache_changes_between_steps_are_never_served_stale(edit):
    kept, whole, stock = both_ways("llama", with_stock=True)
    # Two steps (the copy is kept), the change, then steps on the changed cache (positions stay below L0 = 32).
    script = [5, 6, edit, 7, 8, 9]
    got = assert_same(kept, whole, tokens(2, 16), script)
    if edit is not _edit_in_place:  # stock caches rotated keys: an edit of its cache means something else
        for step, (a, b) in enumerate(zip(got, run_script(stock, tokens(2, 16), script), strict=True)):
            torch.testing.assert_close(a, b, atol=5e-4, rtol=1e-4, msg=lambda m, i=step: f"step {i} vs stock: {m}")


def test_reset_and_a_new_prefill_rebuild_the_copy():
    kept, whole = both_ways("llama")
    logits = []
    for model in (kept, whole):
        with torch.no_grad():
            cache = model(tokens(1, 10), use_cache=True).past_key_values
            for token in (3, 4):
                cache = model(torch.full((1, 1), token), cache=cache, use_cache=True).past_key_values
            cache.reset()
            cache = model(tokens(1, 14, seed=2), cache=cache, use_cache=True).past_key_values
            steps = []
            for token in (5, 6, 7):
                out = model(torch.full((1, 1), token), cache=cache, use_cache=True)
                cache = out.past_key_values
                steps.append(out.logits[:, -1])
        logits.append(steps)
    for a, b in zip(*logits, strict=True):
        assert torch.equal(a, b)


def test_a_table_swap_rebuilds_the_copy():
    kept, whole = both_ways("llama")
    other = lr2.RopeTable.from_hf_config(kept.config)
    other = lr2.RopeTable.longrope(
        head_dim=other.head_dim, base=other.base * 3, original_max_position=other.original_max_position,
        max_position=other.max_position, short_factor=other.factors(False), long_factor=other.factors(True),
    )  # fmt: skip

    table = lr2.hf.state_of(kept).table
    logits = []
    for model in (kept, whole):
        lr2.patch(model, table=table)
        swap = lambda cache, model=model: lr2.patch(model, table=other)  # noqa: E731
        logits.append(run_script(model, tokens(1, 12), [5, 6, swap, 7, 8]))
    for step, (a, b) in enumerate(zip(*logits, strict=True)):
        assert torch.equal(a, b), f"step {step}"
    assert not torch.equal(logits[0][-1], run_script(kept, tokens(1, 12), [5, 6, 7, 8])[-1])  # the swap mattered


def test_a_deep_copied_or_pickled_cache_continues_exactly():
    # A copied cache's layers hold other tensors: their copies start afresh (a weak reference cannot be pickled).
    kept, whole = both_ways("llama")
    prompt = tokens(1, 12)
    want = run_script(whole, prompt, [3, 4, 5])[-1]
    with torch.no_grad():
        cache = kept(prompt, use_cache=True).past_key_values
        for token in (3, 4):
            cache = kept(torch.full((1, 1), token), cache=cache, use_cache=True).past_key_values
        assert copy_of(cache) is not None
        copies = [copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))]
        for cache_copy in [*copies, cache]:
            got = kept(torch.full((1, 1), 5), cache=cache_copy, use_cache=True).logits[:, -1]
            assert torch.equal(got, want)


def test_no_copy_under_inference_mode_or_with_gradients():
    kept, whole = both_ways("llama")
    prompt = tokens(1, 12)
    with torch.inference_mode():  # inference tensors have no version counter: a copy could not be checked
        cache = kept(prompt, use_cache=True).past_key_values
        kept(torch.full((1, 1), 3), cache=cache, use_cache=True)
        assert copy_of(cache) is None
    cache = kept(prompt, use_cache=True).past_key_values  # autograd on: keys carry history
    out = kept(torch.full((1, 1), 3), cache=cache, use_cache=True)
    assert copy_of(cache) is None
    out.logits.sum().backward()  # the step stays differentiable


def test_the_option_is_checked_and_unpatch_removes_it():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="rotated_key_cache: expected a bool, got str"):
        lr2.patch(model, rotated_key_cache="yes")
    lr2.patch(model, rotated_key_cache=False)
    assert lr2.hf.state_of(model).rotated_key_cache is False
    lr2.patch(model)  # patching again updates the option, as it does table, backend and rule
    assert lr2.hf.state_of(model).rotated_key_cache is True
    lr2.unpatch(model)
    assert lr2.hf.state_of(model) is None


# ---- the identity rotation a patched model's layers no longer compute ------------------------------------------


def test_skipped_identity_rotation_leaves_stock_models_alone():
    import transformers.models.llama.modeling_llama as modeling

    original = modeling.apply_rotary_pos_emb
    stock = tiny_model("llama")
    prompt = tokens(2, 40)
    with torch.no_grad():
        before = stock(prompt).logits
        patched = lr2.patch(tiny_model("llama"))  # the skip is on that model's layers only
        after = stock(prompt).logits
    assert torch.equal(before, after) and modeling.apply_rotary_pos_emb is original

    wrappers = [w for layer in patched.model.layers for w in getattr(layer.self_attn, "_kernel_funcs", {}).values()]
    if not wrappers:
        pytest.skip("this transformers gives the attention layers no apply_rotary_pos_emb wrapper (no `kernels`)")
    wrapper = wrappers[0]
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    for got, want in zip(wrapper(q, k, cos, sin), original(q, k, cos, sin), strict=True):
        assert torch.equal(got, want)  # any other cos: the stock rotation
    identity = torch.ones(2, 5, 16)
    identity._lr2_identity_rotation = True
    got_q, got_k = wrapper(q, k, identity, torch.zeros(2, 5, 16))
    assert got_q is q and got_k is k
    lr2.unpatch(patched)
    assert all("forward" not in vars(w) for w in wrappers)
