"""What the search tests share: the tiny llama they search on (SmolLM2's vocabulary, so needle samples built from
real text run through it) and a free port for torchrun."""

from __future__ import annotations

import socket
from typing import Any

import torch

from tests.models import tiny_model


def tiny_llama(vocab_size: int, **overrides: Any) -> torch.nn.Module:
    """A random llama (:func:`tests.models.tiny_model`) of ``vocab_size`` tokens: hidden 32, 4 heads of 16 (2 KV
    heads), 2 layers, plain RoPE (theta 10000), 256 positions (L_train), no pad token, fp32, eval."""
    settings = dict(rope="default", hidden=32, intermediate=64, max_position=256, pad_token_id=None)
    return tiny_model("llama", vocab=vocab_size, **{**settings, **overrides})


def free_port() -> int:
    """A free TCP port on localhost for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
