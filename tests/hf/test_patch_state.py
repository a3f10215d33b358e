"""A patch is one PatchedModel held by the model (lr2kernels.hf.patch): nothing per layer but one reference to it,
one plan per forward, and deep copies that are independent patched models."""

from __future__ import annotations

import copy
import importlib
import pickle

import pytest
import torch

import lr2kernels as lr2
from lr2kernels.hf import plan as plan_module
from tests.models import L0, tiny_model, token_ids


def _lr2_attributes(model: torch.nn.Module) -> dict[str, set[str]]:
    """``{attribute: {module names}}`` of every ``_lr2_*`` attribute on the model's modules."""
    found: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        for key in vars(module):
            if key.startswith("_lr2_"):
                found.setdefault(key, set()).add(name or "<model>")
    return found


def test_the_state_is_held_once_and_reached_through_one_reference():
    model = tiny_model("qwen3", layers=3)
    lr2.patch(model)
    attention = {f"model.layers.{i}.self_attn" for i in range(3)}
    assert _lr2_attributes(model) == {"_lr2_patch_state": {"<model>"}, "_lr2_patch": attention}
    state = lr2.hf.state_of(model)
    assert all(model.get_submodule(name)._lr2_patch is state for name in attention)
    lr2.unpatch(model)
    assert _lr2_attributes(model) == {} and lr2.hf.state_of(model) is None


def test_one_plan_per_forward_and_routes_decided_once_per_kind_of_layer(monkeypatch):
    model = lr2.patch(tiny_model("llama", layers=4), backend="torch")
    plans, decisions = [], []
    make, decide = plan_module.make_plan, plan_module.ForwardPlan._decide
    patch_module = importlib.import_module("lr2kernels.hf.patch")  # the module (lr2kernels.hf.patch is the function)
    monkeypatch.setattr(patch_module, "make_plan", lambda *a: plans.append(make(*a)) or plans[-1])
    monkeypatch.setattr(plan_module.ForwardPlan, "_decide", lambda *a: decisions.append(1) or decide(*a))
    with torch.no_grad():
        model(token_ids(2, 12))
    assert len(plans) == 1 and len(decisions) == 1  # four layers of one kind: one decision
    assert plans[0].longs == (False,)  # 12 tokens, below L0: the short table


def test_a_deep_copy_is_an_independent_patched_model():
    stock = tiny_model("llama", scale=6.0)  # logits ~20: a table change shows far above the tolerance
    patched = lr2.patch(copy.deepcopy(stock))
    twin = copy.deepcopy(patched)
    assert lr2.hf.state_of(twin) is not lr2.hf.state_of(patched)
    assert twin.model.layers[0].self_attn._lr2_patch is lr2.hf.state_of(twin)
    ids = token_ids(1, L0 + 8)
    other = lr2.RopeTable.from_hf_config(stock.config)
    other = lr2.RopeTable.longrope(
        head_dim=other.head_dim, base=other.base * 3, original_max_position=other.original_max_position,
        max_position=other.max_position, short_factor=other.factors(False), long_factor=other.factors(True),
    )  # fmt: skip
    lr2.patch(twin, table=other)  # changes the copy's table only
    with torch.no_grad():
        want = stock(ids).logits
        torch.testing.assert_close(patched(ids).logits, want, atol=5e-4, rtol=1e-4)
        assert (twin(ids).logits - want).abs().max() > 0.1  # the other table: other logits
        lr2.unpatch(twin)  # unpatching the copy leaves the original patched
        assert lr2.hf.is_patched(patched)
        torch.testing.assert_close(twin(ids).logits, want, atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_plan_does_not_travel_with_the_model(how):
    # The facts and plan of a forward given a cache (generate's) hold a weak reference to it, which cannot be pickled:
    # a patched model pickles after such a forward as before any (the plan is per forward).
    import transformers

    from lr2kernels.hf.models import cache_kwargs

    model = lr2.patch(tiny_model("phi3"))
    ids = token_ids(1, 10)
    with torch.no_grad():
        out = model(ids, **cache_kwargs(model, transformers.DynamicCache(config=model.config)), use_cache=True)
        copied = pickle.loads(pickle.dumps(model)) if how == "pickle" else copy.deepcopy(model)
        assert lr2.hf.state_of(copied).plan is None
        torch.testing.assert_close(copied(ids).logits, out.logits, atol=0, rtol=0)
