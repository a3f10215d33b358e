"""lr2kernels.patch on tiny random transformers models of every supported architecture."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import lr2kernels as lr2
from lr2kernels.hf import is_patched
from tests.models import ARCHS, L0, incremental_errors, model_from_config, tiny_model, token_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_logits_equal_stock(arch):
    model = tiny_model(arch)
    # below L0 (short table) and past it (long table)
    short, long = token_ids(2, L0 - 2, low=1), token_ids(2, 3 * L0, low=1)
    with torch.no_grad():
        stock = [model(x).logits for x in (short, long)]
        lr2.patch(model)
        assert is_patched(model)
        patched = [model(x).logits for x in (short, long)]
        for got, want in zip(patched, stock):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        lr2.unpatch(model)
        assert not is_patched(model)
        assert torch.equal(model(short).logits, stock[0])  # unpatch restores the exact stock outputs


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_across_l0_equals_full_forward_one_layer(arch):
    # One layer: the PRE-RoPE cache makes every step past L0 exactly a full forward over the prefix;
    # stock transformers keeps short-table keys in its cache and drifts.
    model = tiny_model(arch, layers=1)
    ids = token_ids(2, L0 + 8, low=1)
    with torch.no_grad():
        stock_error = incremental_errors(model, ids, prefill=L0 - 4)
        lr2.patch(model)
        patched_error = incremental_errors(model, ids, prefill=L0 - 4)
    assert patched_error <= 1e-5, patched_error
    assert stock_error > 1e-3, stock_error


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_across_l0_deeper_models(arch):
    # With more layers, the hidden states of tokens decoded before the switch were computed with the short table,
    # while a full forward recomputes them with the long one: no cache layout can remove that part. The patched
    # model still removes the stale-key error (the larger part).
    model = tiny_model(arch, layers=2)
    ids = token_ids(2, L0 + 8, low=1)
    with torch.no_grad():
        stock_error = incremental_errors(model, ids, prefill=L0 - 4)
        lr2.patch(model)
        patched_error = incremental_errors(model, ids, prefill=L0 - 4)
        # Steps whose whole prefix was decoded with one table are exact.
        short_error = incremental_errors(model, ids[:, : L0 - 1], prefill=L0 - 6)
    assert short_error <= 1e-5
    assert patched_error < stock_error / 3, (patched_error, stock_error)


@pytest.mark.parametrize("arch", ARCHS)
def test_position_rule_decodes_exactly_like_a_full_forward(arch):
    # rule="position": every token uses the table of its own position, so each cached step past L0 is exactly the
    # full forward over the prefix, for any depth, and nothing is ever re-computed.
    model = tiny_model(arch, layers=3)
    ids = token_ids(2, L0 + 12, low=1)
    with torch.no_grad():
        stock_short = model(ids[:, : L0 - 2]).logits
        lr2.patch(model, rule="position")
        assert incremental_errors(model, ids, prefill=L0 - 5) <= 1e-4
        torch.testing.assert_close(model(ids[:, : L0 - 2]).logits, stock_short, atol=1e-5, rtol=1e-5)
        # A chunk of several tokens that crosses L0 (chunked prefill) is the same computation too.
        out = model(ids[:, : L0 - 5], use_cache=True)
        chunk = model(ids[:, L0 - 5 : L0 + 7], cache=out.past_key_values, use_cache=True).logits
        torch.testing.assert_close(chunk, model(ids[:, : L0 + 7]).logits[:, L0 - 5 :], atol=1e-4, rtol=1e-4)


def test_bad_rule():
    with pytest.raises(ValueError, match=r"rule: expected one of \['hf', 'position'\], got 'causal'"):
        lr2.patch(tiny_model("llama"), rule="causal")


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_generate_greedy_and_sampling_match_stock_below_l0(arch):
    model = tiny_model(arch)
    prompt = token_ids(2, 10, low=1)
    stock = model.generate(prompt, max_new_tokens=12, do_sample=False)
    torch.manual_seed(3)
    stock_sampled = model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=5)
    lr2.patch(model)
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False), stock)
    torch.manual_seed(3)
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=5), stock_sampled)


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_across_l0_equals_full_forwards_by_default(arch):
    # rule="hf" (the default): every generated token's logits equal a full forward over the sequence so far, across
    # L0 too, in a left-padded batch (positions from the mask, as generate computes them).
    model = tiny_model(arch, scale=6.0)  # positions and tables must matter
    stock = copy.deepcopy(model)
    prompt = token_ids(2, L0 - 3, low=1)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    lr2.patch(model, backend="torch")
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=9, do_sample=False,
                             return_dict_in_generate=True, output_logits=True, pad_token_id=0)  # fmt: skip
        for step, logits in enumerate(out.logits):
            sequence = out.sequences[:, : prompt.shape[1] + step]
            full_mask = torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], dim=1)
            positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
            full = stock(sequence, attention_mask=full_mask, position_ids=positions).logits[:, -1]
            # A cached step rounds differently from a full forward (up to ~2e-4 in these x6 logits with torch 2.13);
            # a key one position off moves them by > 0.1.
            torch.testing.assert_close(logits, full, atol=5e-4, rtol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_generation_re_runs_the_sequence_at_l0_under_rule_hf_only(arch):
    model = tiny_model(arch)
    lengths: list[int] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    prompt = token_ids(1, L0 - 3, low=1)
    lr2.patch(model)  # rule="hf": one full run at the step whose sequence first exceeds L0
    model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert lengths == [L0 - 3, 1, 1, 1, L0 + 1, 1, 1, 1]  # the 5th forward adds position L0
    lengths.clear()
    lr2.patch(model, rule="position")  # one cached step crosses L0
    model.generate(prompt, max_new_tokens=8, do_sample=False)
    hook.remove()
    assert lengths == [L0 - 3] + [1] * 7


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_left_padding_with_attention_mask_matches_stock(arch):
    model = tiny_model(arch)
    ids = token_ids(2, 40, low=1)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # row 0 is left-padded
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        stock = model(ids, attention_mask=mask, position_ids=position_ids).logits
        lr2.patch(model)
        patched = model(ids, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(patched[mask.bool()], stock[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_training_loss_and_gradients_match_stock(arch):
    model = tiny_model(arch).train()
    ids = token_ids(2, 48, low=1)  # past L0: the long table
    stock_loss = model(ids, labels=ids).loss
    stock_grads = torch.autograd.grad(stock_loss, list(model.parameters()), allow_unused=True)
    lr2.patch(model)
    loss = model(ids, labels=ids).loss
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, stock_loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, stock_grads):
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_partial_rotary_phi3():
    model = tiny_model("phi3", partial_rotary=0.5)
    ids = token_ids(1, 3 * L0, low=1)
    with torch.no_grad():
        stock = model(ids).logits
        lr2.patch(model)
        torch.testing.assert_close(model(ids).logits, stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_close_to_stock(dtype):
    model = tiny_model("llama").to(dtype)
    ids = token_ids(2, 40, low=1)
    with torch.no_grad():
        stock = model(ids).logits.float()
        lr2.patch(model)
        patched = model(ids).logits.float()
    assert (patched - stock).abs().max().item() <= 2e-2


def test_patch_twice_is_a_no_op_and_use_cache_false():
    model = tiny_model("llama")
    ids = token_ids(1, 40, low=1)
    lr2.patch(model)
    with torch.no_grad():
        once = model(ids, use_cache=False).logits
        assert lr2.patch(model) is model
        torch.testing.assert_close(model(ids, use_cache=False).logits, once, atol=0, rtol=0)
    lr2.unpatch(model)
    lr2.unpatch(model)  # unpatching twice is a no-op too
    assert model.config._attn_implementation == "sdpa"


def test_unsupported_model_type_lists_the_supported_ones():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match=r"model.config.model_type: expected one of \['llama', 'mistral'"):
        lr2.patch(model)


def test_wrong_factor_length_fails_at_patch_time():
    model = tiny_model("llama")
    model.config.rope_parameters["long_factor"] = [1.0] * 5  # head_dim 16 needs 8
    with pytest.raises(ValueError, match="long_factor: expected rotary_dim // 2 = 8 factors, got 5"):
        lr2.patch(model)
    assert not is_patched(model)


@pytest.mark.parametrize("rule", ["hf", "position"])
def test_static_cache_generation(rule):
    # StaticCache hands attention the whole preallocated buffer plus a mask: the masked path must ignore the slots
    # past the sequence, and crossing L0 must give the same tokens as the dynamic cache.
    model = tiny_model("llama")
    prompt = token_ids(1, L0 - 4, low=1)
    lr2.patch(model, rule=rule)
    dynamic = model.generate(prompt, max_new_tokens=10, do_sample=False)
    static = model.generate(prompt, max_new_tokens=10, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)


REAL_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "data" / "real_configs").glob("*.json"))


def shrunk_real_model(path: Path) -> torch.nn.Module:
    """The real config at toy size: its RoPE (factors, partial rotary, GQA ratio, head_dim) kept, L0 moved to 32."""
    data = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    head_dim = data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"]
    ratio = data["num_attention_heads"] // data["num_key_value_heads"]
    data.update(
        num_hidden_layers=2, num_attention_heads=ratio, num_key_value_heads=1, hidden_size=ratio * head_dim,
        head_dim=head_dim, intermediate_size=64, vocab_size=101, max_position_embeddings=16 * L0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    rope = data.get("rope_scaling") or {}
    if "original_max_position_embeddings" in data:
        data["original_max_position_embeddings"] = L0
    if "original_max_position_embeddings" in rope:
        rope["original_max_position_embeddings"] = L0
        rope["factor"] = 16.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.CONFIG_MAPPING[data["model_type"]](**data)
    return model_from_config(config)


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=lambda p: p.stem)
def test_real_configs_shrunk(path):
    model = shrunk_real_model(path)
    ids = token_ids(1, 3 * L0, low=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LongRoPE2 llama config's one-time L0 notice
        stock = model(ids).logits
        lr2.patch(model)
        torch.testing.assert_close(model(ids).logits, stock, atol=1e-5, rtol=1e-5)
        lr2.patch(model, rule="position")
        assert incremental_errors(model, ids[:, : L0 + 6], prefill=L0 - 3) <= 1e-4


def test_assisted_and_beam_generation_across_l0_equal_stock_phi3():
    # Stock Phi-3 re-runs the sequence when a step first passes L0, also when that step verifies several candidate
    # tokens (assisted decoding, which then crops the cache) or runs beams (which expand and reorder it): the
    # patched model (rule="hf") gives the same tokens. (Under HF's rule a verification step that straddles L0 uses
    # the long table for all its tokens, so assisted decoding need not equal plain greedy; stock's does not either.)
    stock = tiny_model("phi3", scale=6.0)
    patched = lr2.patch(copy.deepcopy(stock), backend="torch")
    assistant = tiny_model("phi3", layers=1)
    prompt = token_ids(1, L0 - 5, low=1)
    runs = dict(assisted=dict(assistant_model=assistant, max_new_tokens=12), beams=dict(num_beams=3, max_new_tokens=10))
    for name, kwargs in runs.items():
        with torch.no_grad():
            want = stock.generate(prompt, do_sample=False, **kwargs)
            got = patched.generate(prompt, do_sample=False, **kwargs)
        assert torch.equal(got, want), name


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_assisted_generation_across_l0_equals_greedy_under_the_position_rule(arch):
    # rule="position": every token by its own position, so verifying candidates in one step changes nothing.
    model = lr2.patch(tiny_model(arch, scale=6.0), backend="torch", rule="position")
    prompt = token_ids(1, L0 - 5, low=1)
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=12, do_sample=False)
        assisted = model.generate(
            prompt, max_new_tokens=12, do_sample=False, assistant_model=tiny_model(arch, layers=1)
        )
    assert torch.equal(assisted, greedy)
