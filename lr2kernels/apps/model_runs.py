"""Running a transformers causal LM for the apps (and the HF tests): stock vs patched, forwards and greedy decoding
with a KV cache, the incremental-vs-full check, and the stock rotary modules rebuilt for a LongRoPE table."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

from lr2kernels import patch, unpatch
from lr2kernels.apps.common import timed
from lr2kernels.hf.models import cache_kwargs, output_cache
from lr2kernels.search.needle import package_text
from lr2kernels.tables import RopeTable

TEXT_NAME = "english_text.txt"  # the package's English essay (package_text)


def text_ids(tokenizer, length: int, device: torch.device) -> torch.Tensor:
    """[1, length] token ids of the package's English essay, repeated as needed."""
    ids = tokenizer(package_text(), return_tensors="pt").input_ids[0]
    if ids.numel() < length:
        ids = ids.repeat(length // ids.numel() + 1)
    return ids[:length][None].to(device)


def last_logits(model, ids: torch.Tensor, cache=None, use_cache: bool = False) -> tuple[torch.Tensor, object]:
    """(fp32 logits of the last position, the cache) of one forward (a 4K-token prompt's full logits take 0.8 GB)."""
    out = model(ids, use_cache=use_cache or cache is not None, logits_to_keep=1, **cache_kwargs(model, cache))
    return out.logits[:, -1].float(), output_cache(out)


@contextlib.contextmanager
def patched(model, **kwargs) -> Iterator[None]:
    """``lr2kernels.patch(model, **kwargs)`` inside the block; the stock model again after it."""
    patch(model, **kwargs)
    try:
        yield
    finally:
        unpatch(model)


def stock_and_patched_rounds(model, reps: int) -> Iterator[tuple[int, str]]:
    """(round, "stock" or "patched"), the model patched or not accordingly while the caller's loop body runs.

    Round 0 warms both up; rounds 1..reps alternate which of the two goes first, so a noisy machine hurts both alike.
    """
    for rep in range(reps + 1):
        for provider in ("stock", "patched") if rep % 2 else ("patched", "stock"):
            with patched(model) if provider == "patched" else contextlib.nullcontext():
                yield rep, provider


@torch.no_grad()
def prefill_and_decode(model, ids: torch.Tensor, steps: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, seconds of ``steps`` greedy cached steps after it, the ``steps + 1`` greedy tokens)."""
    (logits, cache), prefill = timed(lambda: last_logits(model, ids, use_cache=True), ids.device)
    tokens = [int(logits.argmax(-1))]

    def decode() -> None:
        nonlocal cache
        for _ in range(steps):
            logits, cache = last_logits(model, torch.tensor([tokens[-1:]], device=ids.device), cache)
            tokens.append(int(logits.argmax(-1)))

    _, seconds = timed(decode, ids.device)
    return prefill, seconds, tokens


class TokenCounter:
    """Counts the tokens that go through the model (a hook on its input embedding); ``tokens`` may be reset."""

    def __init__(self, model) -> None:
        self.tokens = 0
        self._handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.tokens += inputs[0].numel()

    def close(self) -> None:
        self._handle.remove()


@torch.no_grad()
def incremental_vs_full(model, ids: torch.Tensor, prefill: int) -> list[float]:
    """Prefill ``ids[:, :prefill]``, then decode ``ids[:, prefill:]`` one cached step at a time.

    Returns, per step, max |logits of the cached step - logits of a full forward over the same prefix|:
    entry ``i`` is the step that makes the sequence ``prefill + i + 1`` tokens long.
    """
    _, cache = last_logits(model, ids[:, :prefill], use_cache=True)
    errors = []
    for t in range(prefill, ids.shape[1]):
        step, cache = last_logits(model, ids[:, t : t + 1], cache)
        full, _ = last_logits(model, ids[:, : t + 1])
        errors.append((step - full).abs().max().item())
    return errors


def generate_vs_full(model, prompt: torch.Tensor, new_tokens: int) -> list[float]:
    """Greedy ``model.generate`` from ``prompt`` (the path users take); per generated token, max |its logits - a
    full forward over the same prefix|. Entry ``i`` is the step that makes the sequence ``len(prompt) + i + 1``."""
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, return_dict_in_generate=True, output_logits=True,
        pad_token_id=model.config.pad_token_id or 0,
    )  # fmt: skip
    errors = []
    for step, logits in enumerate(out.logits):
        full, _ = last_logits(model, out.sequences[:, : prompt.shape[1] + step])
        errors.append((logits - full).abs().max().item())
    return errors


@contextlib.contextmanager
def stock_rotary_with_table(model, table: RopeTable) -> Iterator[list[torch.nn.Module]]:
    """The STOCK model running ``table`` through transformers' own code (``longrope`` for a LongRoPE table).

    A copy of the config gets ``table.to_hf_rope_parameters()`` (and ``max_position_embeddings``); each rotary
    module is rebuilt from it by its own class, exactly as ``from_pretrained`` would build it for that config, so
    its ``inv_freq`` and the short/long switch are transformers'. The weights are untouched; the original rotary
    modules come back on exit. Yields the rebuilt modules.
    """
    config = copy.deepcopy(model.config)
    config.rope_parameters = table.to_hf_rope_parameters()
    config.max_position_embeddings = table.max_position
    if getattr(config, "original_max_position_embeddings", None) is not None:  # Phi3 style: L0 at top level too
        config.original_max_position_embeddings = table.original_max_position
    names = [name for name, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")]
    originals = [model.get_submodule(name) for name in names]
    device = next(model.parameters()).device
    rebuilt = [type(m)(config).to(device) for m in originals]

    def install(modules: list[torch.nn.Module]) -> None:
        for name, module in zip(names, modules):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, module)

    install(rebuilt)
    try:
        yield rebuilt
    finally:
        install(originals)
