"""Packed rows of short and long documents, each with its own table (mixed context window training).

A tiny LongRoPE model with L0 = 32 and documents of 20, 50 and 10 tokens (short, long, short): in one packed row
each document must come out exactly as it does run alone through the stock model (which picks the table from that
document's own length), and the gradients of the packed loss must equal the sum of the per-document losses'.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lr2kernels as lr2
from tests.models import DEVICE, L0, tiny_model

LENGTHS = [20, 50, 10]


def _packed(lengths, batch: int = 1, device: torch.device | None = None):
    tokens = torch.randint(3, 101, (batch, sum(lengths)), generator=torch.Generator().manual_seed(5))
    positions = torch.cat([torch.arange(n) for n in lengths])[None].expand(batch, -1)
    return tokens.to(device), positions.to(device)


def _summed_loss(logits: torch.Tensor, tokens: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """Sum of next-token cross entropies, no target crossing a document start."""
    labels = tokens.clone()
    labels[:, starts] = -100
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_each_packed_document_equals_it_alone_in_the_stock_model(arch, backend):
    stock = tiny_model(arch, scale=4.0).to(DEVICE)
    patched = lr2.patch(copy.deepcopy(stock), backend=backend)
    tokens, positions = _packed(LENGTHS, device=DEVICE)
    with torch.no_grad():
        packed = patched(tokens, position_ids=positions, use_cache=False).logits
        alone = [stock(part).logits for part in tokens.split(LENGTHS, dim=1)]
    assert [n > L0 for n in LENGTHS] == [False, True, False]  # short, long, short
    tolerance = 1e-5 if backend == "torch" else 5e-5  # Triton: tiled fp32 sums, logits of magnitude ~10
    for got, want in zip(packed.split(LENGTHS, dim=1), alone, strict=True):
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_packed_gradients_equal_the_sum_of_per_document_gradients(arch, backend):
    stock = tiny_model(arch, scale=4.0).to(DEVICE).train()
    patched = lr2.patch(copy.deepcopy(stock), backend=backend).train()
    tokens, positions = _packed(LENGTHS, device=DEVICE)
    starts = [0, LENGTHS[0], LENGTHS[0] + LENGTHS[1]]
    _summed_loss(patched(tokens, position_ids=positions, use_cache=False).logits, tokens, starts).backward()
    for part in tokens.split(LENGTHS, dim=1):
        _summed_loss(stock(part).logits, part, [0]).backward()
    tolerance = 1e-4  # relative to the largest gradient entry
    for (name, want), got in zip(stock.named_parameters(), patched.parameters(), strict=True):
        relative = ((got.grad - want.grad).abs().max() / want.grad.abs().max().clamp_min(1e-6)).item()
        assert relative <= tolerance, (name, relative)


def test_a_short_document_next_to_a_long_one_keeps_the_short_table():
    # Under HF's rule for the whole row (max position 49 + 1 > L0) the short documents would use the long table;
    # per document, they keep the short one: their logits equal the short-table stock run, not the long-table one.
    stock = tiny_model("llama", scale=4.0)
    patched = lr2.patch(copy.deepcopy(stock))
    tokens, positions = _packed(LENGTHS)
    with torch.no_grad():
        packed = patched(tokens, position_ids=positions, use_cache=False).logits
        whole_row_rule = stock(tokens, position_ids=positions, use_cache=False).logits  # stock: one table per row
    first = slice(0, LENGTHS[0])
    assert (packed[:, first] - whole_row_rule[:, first]).abs().max() > 1e-2
