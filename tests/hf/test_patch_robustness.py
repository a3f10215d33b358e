"""Patching must hold in every path a user takes: every Phi-3 class, pickling, a later change of attention
implementation, and a table that does not fit the model."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
import torch
import transformers

import lr2kernels as lr2
from lr2kernels.hf import is_patched
from tests.models import L0, tiny_config, tiny_model, token_ids


@pytest.mark.parametrize(
    "class_name", ["Phi3Model", "Phi3ForCausalLM", "Phi3ForSequenceClassification", "Phi3ForTokenClassification"]
)
def test_every_phi3_class_patches_and_matches_stock(class_name):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, class_name)(tiny_config("phi3")).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(6.0)  # as tiny_model(scale=6.0): a position error must show
    ids = token_ids(2, L0 + 8, low=1)  # past L0: the long table
    with torch.no_grad():
        stock = model(ids)[0]
        lr2.patch(model, backend="torch")
        patched = model(ids)[0]
    torch.testing.assert_close(patched, stock, atol=1e-4, rtol=1e-4)
    lr2.unpatch(model)
    assert not is_patched(model) and "prepare_inputs_for_generation" not in vars(model)


def test_pickled_patched_model_loads_patched_in_a_new_process(tmp_path):
    model = tiny_model("phi3", scale=6.0)
    ids = token_ids(1, L0 + 8, low=1)
    with torch.no_grad():
        stock = model(ids).logits
    lr2.patch(model)
    torch.save(model, tmp_path / "model.pt")
    torch.save({"ids": ids, "stock": stock}, tmp_path / "data.pt")
    # A new process: transformers' attention registry has never heard of lr2kernels there.
    code = f"""
import torch, lr2kernels as lr2
model = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
data = torch.load({str(tmp_path / "data.pt")!r})
with torch.no_grad():
    error = (model(data["ids"]).logits - data["stock"]).abs().max().item()
attention = model.model.layers[0].self_attn
print(lr2.hf.is_patched(model), model.config._attn_implementation, attention.config._attn_implementation, error)
lr2.unpatch(model)
with torch.no_grad():
    print((model(data["ids"]).logits - data["stock"]).abs().max().item())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    patched_line, unpatched_line = result.stdout.strip().splitlines()[-2:]
    is_patched_there, model_implementation, attention_implementation, error = patched_line.split()
    assert is_patched_there == "True" and (model_implementation, attention_implementation) == ("sdpa", "lr2kernels")
    assert float(error) < 1e-4 and float(unpatched_line) < 1e-4


def test_switching_attention_implementation_after_patch_keeps_the_patch():
    # set_attn_implementation changes model.config; the patched layers keep their private config, so the patch keeps
    # working (never a model without RoPE), and an eager model's attention maps come back when asked for.
    model = tiny_model("llama", scale=6.0)
    ids = token_ids(1, 40, low=1)
    with torch.no_grad():
        stock = model(ids).logits
        model.set_attn_implementation("eager")
        stock_maps = model(ids, output_attentions=True).attentions
        lr2.patch(model)
        model.set_attn_implementation("sdpa")
        model.set_attn_implementation("eager")
        patched = model(ids, output_attentions=True)
    assert is_patched(model) and model.model.layers[0].self_attn.config._attn_implementation == "lr2kernels"
    torch.testing.assert_close(patched.logits, stock, atol=1e-4, rtol=1e-4)
    assert len(patched.attentions) == len(stock_maps) == 2
    for got, expected in zip(patched.attentions, stock_maps):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_layer_config_switched_behind_the_patch_falls_back_to_stock_rope():
    # Someone sets the attention layers' own config to another implementation: that attention expects rotated q/k,
    # so the rotary module gives the stock rotation, with a warning, rather than run the model without RoPE.
    model = tiny_model("llama", scale=6.0)
    ids = token_ids(1, 40, low=1)
    with torch.no_grad():
        stock = model(ids).logits
        lr2.patch(model)
        model.model.layers[0].self_attn.config._attn_implementation = "sdpa"
        with pytest.warns(UserWarning, match="attention implementation was changed after lr2kernels.patch"):
            switched = model(ids).logits
    torch.testing.assert_close(switched, stock, atol=1e-4, rtol=1e-4)


def test_a_table_of_another_rotary_width_is_refused_at_patch_time():
    model = tiny_model("llama")  # head_dim 16, full rotary
    partial = lr2.RopeTable.longrope(
        head_dim=16, base=10000.0, original_max_position=L0, max_position=8 * L0,
        short_factor=[1.0] * 4, long_factor=[2.0] * 4, rotary_dim=8,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"table.rotary_dim: expected the model's rotary width 16 .*got 8"):
        lr2.patch(model, table=partial)
    assert not is_patched(model)


def test_the_cache_goes_under_the_name_this_transformers_reads():
    # transformers < 5.24 silently ignores cache= (and runs the step without a cache): take the name from the
    # model's signature.
    from lr2kernels.hf.models import cache_kwargs, output_cache

    class Older(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return input_ids

    assert cache_kwargs(Older(), "kv") == {"past_key_values": "kv"}
    model = tiny_model("llama")
    assert cache_kwargs(model, "kv") == {"cache": "kv"}
    ids = token_ids(1, 12, low=1)
    with torch.no_grad():
        out = model(ids[:, :10], use_cache=True)
        step = model(ids[:, 10:], use_cache=True, **cache_kwargs(model, output_cache(out))).logits[:, -1]
        full = model(ids).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)  # the step really used the cache


def test_patch_never_changes_a_shared_config():
    # Two models built from one config object: patching one must not change what the other (or a third, built
    # later from model.config) runs; unpatching leaves the shared config as it was.
    first = tiny_model("llama")
    second = transformers.AutoModelForCausalLM.from_config(first.config).eval()
    second.load_state_dict(first.state_dict())
    ids = token_ids(1, 20, low=1)
    shared = first.config
    with torch.no_grad():
        stock = first(ids).logits
        lr2.patch(first), lr2.patch(second)
        assert first.config is shared and shared._attn_implementation == "sdpa"
        third = transformers.AutoModelForCausalLM.from_config(first.config).eval()
        third.load_state_dict(first.state_dict())
        assert not is_patched(third)
        torch.testing.assert_close(third(ids).logits, stock, atol=1e-5, rtol=1e-5)
        lr2.unpatch(first), lr2.unpatch(second)
    assert shared._attn_implementation == "sdpa"
    assert all(layer.self_attn.config is shared for layer in first.model.layers)


def test_a_failing_patch_leaves_the_model_untouched(monkeypatch):
    patch_module = importlib.import_module("lr2kernels.hf.patch")  # the module (lr2kernels.hf.patch is the function)

    model = tiny_model("phi3")
    ids = token_ids(1, 20, low=1)
    with torch.no_grad():
        stock = model(ids).logits
    before = {name: dict(vars(module)) for name, module in model.named_modules()}

    def broken(*args, **kwargs):
        raise RuntimeError("hook registration failed")

    monkeypatch.setattr(patch_module, "_keep_cache_prepare", broken)  # the last step of patching
    with pytest.raises(RuntimeError, match="hook registration failed"):
        lr2.patch(model)
    assert not is_patched(model)
    after = {name: dict(vars(module)) for name, module in model.named_modules()}
    assert after.keys() == before.keys()
    for name, attributes in before.items():
        assert after[name].keys() == attributes.keys(), name
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock, atol=0, rtol=0)
    monkeypatch.undo()
    lr2.patch(model)
    assert is_patched(model)
