"""``attn_implementation="lr2kernels"``: transformers' own way of asking gives the model ``lr2kernels.patch`` gives.

Tiny random models of every supported architecture, weights x6 so that a key at a wrong position (rotated twice, or
not at all) moves the logits far past the tolerance, saved as folders and loaded back with ``from_pretrained``; the
reference is the stock model of the same weights. See lr2kernels/hf/loading.py.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

pytest.importorskip("transformers")
import transformers

import lr2kernels
from lr2kernels.hf import is_patched

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3")
ATOL, RTOL = 5e-4, 1e-4  # the differential suite's tolerance (logits of magnitude ~20)
L0 = 32


def _config(arch: str, longrope: bool = False, **extra):
    kwargs = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                  intermediate_size=96, vocab_size=101, max_position_embeddings=8 * L0, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
    if longrope:  # short and long factors that differ: a generation that crosses L0 switches tables
        kwargs["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0,
                                     "short_factor": [1.0 + 0.05 * i for i in range(8)],
                                     "long_factor": [1.0 + 1.5 * i for i in range(8)],
                                     "original_max_position_embeddings": L0}  # fmt: skip
        if arch == "phi3":
            kwargs["original_max_position_embeddings"] = L0
    else:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    kwargs.update(extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.CONFIG_MAPPING[arch](**kwargs)


def _stock(config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(6.0)  # transformers' 0.02 init hides position errors in nearly flat logits
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{(arch, longrope): (folder, stock model)} for every architecture (plain RoPE), llama and phi3 with LongRoPE."""
    made = {}
    for arch, longrope in [*((a, False) for a in ARCHS), ("llama", True), ("phi3", True)]:
        stock = _stock(_config(arch, longrope))
        folder = tmp_path_factory.mktemp(f"{arch}{'-longrope' if longrope else ''}")
        stock.save_pretrained(folder)
        made[arch, longrope] = (folder, stock)
    return made


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


def _load(folder, **kwargs) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def _assert_same_model(model, stock, new_tokens: int = 8, prompt: int = 20) -> None:
    ids = _ids(2, prompt)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock(ids).logits, atol=ATOL, rtol=RTOL)
    greedy = dict(max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(model.generate(ids, **greedy), stock.generate(ids, **greedy))


def _assert_patched_as_patch_does(model) -> None:
    """What lr2kernels.patch leaves: the model's config names the fallback, its attention layers name lr2kernels,
    its rotary modules return the identity rotation (q and k reach the attention pre-RoPE)."""
    assert is_patched(model)
    assert model.config._attn_implementation == "sdpa"
    layers = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    assert layers and all(layer.config._attn_implementation == "lr2kernels" for layer in layers)
    rotary = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    x, positions = torch.zeros(1, 3, 8), torch.arange(3)[None]
    for module in rotary:
        cos, sin = module(x, positions)
        assert torch.equal(cos, torch.ones_like(cos)) and torch.equal(sin, torch.zeros_like(sin))


@pytest.mark.parametrize("arch", ARCHS)
def test_from_pretrained_gives_the_patched_model_equal_to_stock(arch, folders):
    folder, stock = folders[arch, False]
    model = _load(folder, attn_implementation="lr2kernels")
    _assert_patched_as_patch_does(model)
    _assert_same_model(model, stock)
    # The same model as lr2kernels.patch gives: unpatch restores the stock model, exactly.
    lr2kernels.unpatch(model)
    assert not is_patched(model) and model.config._attn_implementation == "sdpa"
    rotary = next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    assert "forward" not in vars(rotary)
    _assert_same_model(model, stock)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_a_longrope_generation_across_l0_equals_lr2kernels_patch(arch, folders):
    """The table switches at L0 inside the generation, and generate re-runs the sequence there (the patch's
    generate wrapper is in place): what lr2kernels.patch gives, which for Phi-3 is stock's (stock Llama-type
    LongRoPE models keep their cache at L0 and drift instead, docs/hf.md)."""
    folder, stock = folders[arch, True]
    model = _load(folder, attn_implementation="lr2kernels")
    _assert_patched_as_patch_does(model)
    reference = stock if arch == "phi3" else lr2kernels.patch(copy.deepcopy(stock))
    _assert_same_model(model, reference, new_tokens=16, prompt=24)  # 24 + 16 > L0 = 32


def test_a_plain_load_in_the_same_process_stays_stock(folders):
    folder, stock = folders["llama", False]
    patched = _load(folder, attn_implementation="lr2kernels")
    plain = _load(folder)
    assert is_patched(patched) and not is_patched(plain)
    assert not any("forward" in vars(m) for m in plain.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    assert all(m.config._attn_implementation == "sdpa" for m in plain.modules() if hasattr(m, "layer_idx"))
    _assert_same_model(plain, stock)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_from_config_and_the_constructor(arch, folders):
    _, stock = folders[arch, False]
    built = [
        transformers.AutoModelForCausalLM.from_config(_config(arch), attn_implementation="lr2kernels"),
        type(stock)(_config(arch, attn_implementation="lr2kernels")),
    ]
    for model in built:
        model.load_state_dict(stock.state_dict())
        model.generation_config.pad_token_id = 0
        _assert_patched_as_patch_does(model.eval())
        _assert_same_model(model, stock)


def test_a_base_model_and_a_classification_head_are_patched(folders):
    folder, _ = folders["llama", False]
    base = transformers.AutoModel.from_pretrained(folder, attn_implementation="lr2kernels")
    assert type(base).__name__ == "LlamaModel" and is_patched(base)
    head = transformers.AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="lr2kernels")
    # One patch, on the outermost model of the config (its inner LlamaModel's own is moved up to it).
    assert is_patched(head) and not is_patched(head.model)


def test_set_attn_implementation_patches_and_keeps_a_patch(folders):
    folder, stock = folders["llama", False]
    model = _load(folder)
    model.set_attn_implementation("lr2kernels")
    _assert_patched_as_patch_does(model)
    _assert_same_model(model, stock)
    model.set_attn_implementation("eager")  # the fallback changes, the patch stays (as for lr2kernels.patch)
    assert is_patched(model) and model.config._attn_implementation == "eager"
    _assert_same_model(model, stock)
    model.set_attn_implementation("lr2kernels")  # already patched: kept, with its fallback
    assert is_patched(model) and model.config._attn_implementation == "eager"


def test_a_table_set_by_patch_survives_set_attn_implementation(folders):
    folder, _ = folders["llama", False]
    model = _load(folder, attn_implementation="lr2kernels")
    table = lr2kernels.RopeTable.default(head_dim=16, base=500.0, max_position=8 * L0)
    lr2kernels.patch(model, table=table)
    model.set_attn_implementation("lr2kernels")
    assert lr2kernels.hf.state_of(model).table is table


def test_an_unsupported_architecture_is_refused_by_name(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    expected = r"attn_implementation=\"lr2kernels\": GPT2\w+ is a 'gpt2' model; lr2kernels supports the model types"
    with pytest.raises(ValueError, match=expected) as error:
        _load(tmp_path, attn_implementation="lr2kernels")
    assert "'llama'" in str(error.value) and "'phi3'" in str(error.value)
    with pytest.raises(ValueError, match=expected):
        transformers.AutoModelForCausalLM.from_config(config, attn_implementation="lr2kernels")
    model = _load(tmp_path)
    with pytest.raises(ValueError, match=expected):
        model.set_attn_implementation("lr2kernels")
    assert model.config._attn_implementation == "sdpa" and not is_patched(model)  # left as it was


def test_save_pretrained_writes_a_config_any_transformers_loads(folders, tmp_path):
    folder, stock = folders["qwen3", False]
    model = _load(folder, attn_implementation="lr2kernels")
    model.save_pretrained(tmp_path)
    assert "lr2kernels" not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    _assert_same_model(_load(tmp_path), stock)


_IN_A_NEW_PROCESS = """
import sys, warnings
warnings.simplefilter("ignore")
{imports}
import torch
from transformers import AutoModelForCausalLM
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="lr2kernels").eval()
stock = AutoModelForCausalLM.from_pretrained(folder).eval()
from lr2kernels.hf import is_patched
ids = torch.arange(3, 23)[None]
with torch.no_grad():
    difference = (model(ids).logits - stock(ids).logits).abs().max().item()
print(is_patched(model), is_patched(stock), difference < 5e-4)
"""


@pytest.mark.parametrize(
    "imports", ["import lr2kernels", "import transformers.modeling_utils\nimport lr2kernels"], ids=["before", "after"]
)
def test_import_lr2kernels_before_or_after_transformers(imports, folders):
    """The name is installed when transformers loads its models (the finder) or at once if it already has."""
    folder, _ = folders["llama", False]
    code = _IN_A_NEW_PROCESS.format(imports=imports)
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "False", "True"]


def test_without_import_lr2kernels_transformers_does_not_know_the_name(folders):
    folder, _ = folders["llama", False]
    code = _IN_A_NEW_PROCESS.format(imports="")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and 'attn_implementation="lr2kernels"` is not supported' in done.stderr


def test_import_hook_does_not_import_transformers():
    code = textwrap.dedent(
        """
        import sys, lr2kernels
        from lr2kernels import _transformers_hook
        print('transformers' in sys.modules, 'torch' in sys.modules,
              any(isinstance(f, _transformers_hook._Finder) for f in sys.meta_path))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False", "True"]


_UNPICKLE = """
import sys, warnings
warnings.simplefilter("ignore")
import torch
model = torch.load(sys.argv[1], weights_only=False)  # imports lr2kernels while unpickling (nothing else does here)
from lr2kernels.hf import is_patched
ids, expected = torch.load(sys.argv[2])
with torch.no_grad():
    same = torch.allclose(model(ids).logits, expected, atol=5e-4, rtol=1e-4)
from transformers import AutoModelForCausalLM
again = AutoModelForCausalLM.from_pretrained(sys.argv[3], attn_implementation="lr2kernels")
print(is_patched(model), same, is_patched(again))
"""


def test_a_loaded_model_pickles_into_a_new_process(folders, tmp_path):
    """There the unpickled model is patched and gives the same logits, and the name works for a new load."""
    folder, stock = folders["mistral", False]
    model = _load(folder, attn_implementation="lr2kernels")
    ids = _ids(1, 20)
    with torch.no_grad():
        torch.save((ids, stock(ids).logits), tmp_path / "expected.pt")
    torch.save(model, tmp_path / "model.pt")
    argv = [sys.executable, "-c", _UNPICKLE, str(tmp_path / "model.pt"), str(tmp_path / "expected.pt"), str(folder)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "True", "True"]
