"""Pickle, torch.save and deepcopy of stock and patched models in a process that has patched models: before the
patch, during, and after unpatch, for every supported architecture, with the same outputs after the round trip.

transformers builds the Llama, Mistral, Qwen2 and Qwen3 attention classes with ``use_kernelized_func``: with the
``kernels`` package (a dependency since 5.25) each layer owns a wrapper module of ``apply_rotary_pos_emb`` whose pickle
finds the modeling module's function by name.
lr2kernels changes nothing outside the model, so those lookups find transformers' own objects.
"""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch

import lr2kernels as lr2
from lr2kernels.hf import is_patched
from tests.hf.compare import generate_both
from tests.models import ARCHS, tiny_default_rope, token_ids


def _torch_round_trip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {
    "torch.save": _torch_round_trip,
    "pickle": lambda model: pickle.loads(pickle.dumps(model)),
    "deepcopy": copy.deepcopy,
}


def _module_functions(model) -> dict[str, object]:
    """The ``apply_rotary_pos_emb`` of the model's modeling module (what a process-wide change would replace)."""
    module = sys.modules[type(model).__module__]
    return {"apply_rotary_pos_emb": module.apply_rotary_pos_emb}


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("how", list(ROUND_TRIPS))
@pytest.mark.parametrize("arch", ARCHS)
def test_stock_and_patched_models_round_trip_before_during_and_after_the_patch(arch, how):
    round_trip = ROUND_TRIPS[how]
    stock = tiny_default_rope(arch)
    functions = _module_functions(stock)
    tokens = token_ids(2, 40)
    expected = _logits(stock, tokens)
    lr2.patch(tiny_default_rope(arch), backend="torch")  # another model of the architecture, patched in this process

    before = round_trip(stock)
    assert not is_patched(before) and torch.equal(_logits(before, tokens), expected)

    patched = lr2.patch(copy.deepcopy(stock), backend="torch")
    assert _module_functions(patched) == functions  # nothing process-wide: transformers' functions are untouched
    during = round_trip(patched)
    assert is_patched(during) and is_patched(patched)
    torch.testing.assert_close(_logits(during, tokens), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(patched, tokens), expected, atol=1e-5, rtol=1e-5)
    lr2.unpatch(during)  # the copy unpatches on its own, back to stock's numbers exactly
    assert not is_patched(during) and is_patched(patched) and torch.equal(_logits(during, tokens), expected)

    after = round_trip(lr2.unpatch(patched))
    assert not is_patched(after) and torch.equal(_logits(after, tokens), expected)
    assert _module_functions(after) == functions


@pytest.mark.parametrize("arch", ARCHS)
def test_a_round_tripped_patched_model_generates_as_stock(arch):
    # A cached generate: the copy's rotary, attention layers, hooks and generate wrapper all came through.
    stock = tiny_default_rope(arch)
    patched = lr2.patch(copy.deepcopy(stock), backend="torch")
    for round_trip in ROUND_TRIPS.values():
        generate_both(stock, round_trip(patched), token_ids(2, 9), max_new_tokens=6)  # equal tokens and step logits


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_layers_own_rotation_wrapper_is_patched_per_instance(arch):
    # Where transformers gives each attention layer its own apply_rotary_pos_emb wrapper (with `kernels`), the patch
    # is on that instance: a copy's wrapper skips for the copy's own layer, and unpatch restores the class's forward.
    stock = tiny_default_rope(arch)
    wrappers = [getattr(layer.self_attn, "_kernel_funcs", {}) for layer in stock.model.layers]
    if not all(wrappers):
        pytest.skip("this transformers gives the attention layers no apply_rotary_pos_emb wrapper")
    patched = lr2.patch(copy.deepcopy(stock), backend="torch")
    for model in (patched, copy.deepcopy(patched), pickle.loads(pickle.dumps(patched))):
        for layer in model.model.layers:
            (wrapper,) = layer.self_attn._kernel_funcs.values()
            assert vars(wrapper)["forward"].__self__ is wrapper
        lr2.unpatch(model)
        for layer in model.model.layers:
            assert all("forward" not in vars(wrapper) for wrapper in layer.self_attn._kernel_funcs.values())


def test_a_pickled_patched_llama_loads_patched_in_a_new_process(tmp_path):
    # A new process: transformers' registry has never heard of lr2kernels, and the layers' wrappers are rebuilt.
    stock = tiny_default_rope("llama")
    tokens = token_ids(1, 40)
    torch.save(lr2.patch(copy.deepcopy(stock), backend="torch"), tmp_path / "model.pt")
    torch.save({"ids": tokens, "stock": _logits(stock, tokens)}, tmp_path / "data.pt")
    code = f"""
import io, torch, lr2kernels as lr2
model = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
data = torch.load({str(tmp_path / "data.pt")!r})
with torch.no_grad():
    print(lr2.hf.is_patched(model), (model(data["ids"]).logits - data["stock"]).abs().max().item())
    torch.save(model, io.BytesIO())  # and it pickles again there
    lr2.unpatch(model)
    print((model(data["ids"]).logits - data["stock"]).abs().max().item())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    patched_line, unpatched_line = result.stdout.strip().splitlines()[-2:]
    is_patched_there, error = patched_line.split()
    assert is_patched_there == "True" and float(error) < 1e-5 and float(unpatched_line) == 0.0
