"""The plugin that runs transformers' own model test suites on patched models (tools/transformers_suites) patches
every model of a supported architecture once, as a whole, however it is built, and nothing else."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import transformers

from lr2kernels.hf.patch import is_patched
from tests.models import tiny_config

PLUGIN = Path(__file__).resolve().parents[2] / "tools" / "transformers_suites" / "lr2_patch_plugin.py"


@pytest.fixture
def plugin():
    spec = importlib.util.spec_from_file_location("lr2_patch_plugin_under_test", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.pytest_configure(None)
    try:
        yield module
    finally:
        module.pytest_unconfigure(None)
        sys.modules.pop("lr2_patch_plugin_under_test", None)
    assert transformers.PreTrainedModel.post_init is module._stock_post_init


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_every_built_model_is_patched_once_as_a_whole(plugin, model_type, tmp_path):
    causal = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, layers=1))
    assert is_patched(causal) and not is_patched(causal.model)  # the base model is the owner's to patch
    base = transformers.AutoModel.from_config(tiny_config(model_type, layers=1))
    assert is_patched(base)
    causal.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert is_patched(loaded) and not is_patched(loaded.model)
    assert dict(plugin.PATCHED) == {type(causal).__name__: 2, type(base).__name__: 1}


def test_other_architectures_are_left_stock(plugin):
    config = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=64, n_positions=64)
    assert not is_patched(transformers.GPT2LMHeadModel(config))
    assert not plugin.PATCHED
