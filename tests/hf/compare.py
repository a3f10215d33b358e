"""Stock vs patched on the same weights: the assertions the Hugging Face tests share."""

from __future__ import annotations

import copy

import torch

import lr2kernels as lr2
from tests.models import tiny_default_rope

RULES = ["hf", "position"]
# Logits of the x6-scaled models (tests.models.DEFAULT_ROPE_SCALED), ~20 in magnitude: a key one position off moves
# them by > 0.1 (tests/hf/test_stock_differential.py says where the rounding differences come from).
TOL = dict(atol=5e-4, rtol=1e-4)


def stock_and_patched(arch: str, rule: str = "hf", **kwargs):
    """(a tiny_default_rope model of ``arch``, a patched copy of it on the torch backend)."""
    stock = tiny_default_rope(arch, **kwargs)
    return stock, lr2.patch(copy.deepcopy(stock), backend="torch", rule=rule)


def generate_both(stock, patched, prompt, seed: int = 0, max_new_tokens: int = 8, **kwargs):
    """Generate with both models from the same seed; assert equal tokens and per-step logits, return them."""
    results = []
    for model in (stock, patched):
        torch.manual_seed(seed)
        with torch.no_grad():
            results.append(
                model.generate(
                    prompt, max_new_tokens=max_new_tokens, return_dict_in_generate=True, output_logits=True, **kwargs
                )
            )
    want, got = results
    assert torch.equal(got.sequences, want.sequences)
    for step_got, step_want in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(step_got, step_want, **TOL)
    return want, got
