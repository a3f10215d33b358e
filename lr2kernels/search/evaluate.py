"""Scoring a RoPE table on a model without reloading it: needle-driven loss / perplexity and greedy passkey accuracy.

The model is patched once (:func:`lr2kernels.patch`); each candidate table is swapped in place with
``patch(model, table=...)``, so a search evaluates thousands of tables on one loaded model. On a GPU the patched
attention runs the fused Triton kernels; on the CPU the torch backend.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from lr2kernels.hf.models import cache_kwargs, output_cache
from lr2kernels.hf.patch import patch
from lr2kernels.search.needle import IGNORE_INDEX, NeedleSample
from lr2kernels.tables import RopeTable


@dataclasses.dataclass(frozen=True)
class NeedleScore:
    """What one table scored on the needle samples.

    Attributes:
        loss: mean cross-entropy over every answer token of every sample (nats).
        perplexity: ``exp(loss)``.
        accuracy: fraction of samples whose every token of the answer span is the model's argmax given the true
            prefix: exactly the samples whose greedy decoding reproduces the answer (:class:`PasskeyEvaluator`).
        sample_losses: each sample's mean answer-token loss.
    """

    loss: float
    perplexity: float
    accuracy: float
    sample_losses: tuple[float, ...]


def _check_samples(samples: Sequence[NeedleSample]) -> list[NeedleSample]:
    samples = list(samples)
    if not samples or not all(isinstance(s, NeedleSample) for s in samples):
        raise ValueError(f"samples: expected a non-empty list of NeedleSample, got {samples!r:.80}")
    return samples


def _check_table(table: RopeTable) -> None:
    if not isinstance(table, RopeTable):
        raise TypeError(f"table: expected a lr2kernels.RopeTable, got {type(table).__name__}")


class _PatchedModel:
    """A model patched once; ``use(table)`` swaps the table in place."""

    def __init__(self, model: torch.nn.Module, backend: str | None, rule: str) -> None:
        self.model, self.backend, self.rule = model, backend, rule
        patch(model, backend=backend, rule=rule)
        self.device = next(model.parameters()).device

    def use(self, table: RopeTable) -> None:
        _check_table(table)
        patch(self.model, backend=self.backend, table=table, rule=self.rule)


class NeedleEvaluator(_PatchedModel):
    """Needle-driven loss of a table: ``evaluator(table) -> NeedleScore`` (``evaluator.loss(table)`` for a search).

    Args:
        model: a transformers causal LM of a type :func:`lr2kernels.patch` supports (patched here, in place).
        samples: from :func:`lr2kernels.search.needle_samples`.
        backend: attention backend (None: the best for the model's device).
        rule: the patch's table rule ("hf": the whole sequence uses the long table past L0, as transformers does).
        batch_size: samples of equal length run together in batches of this size.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        samples: Sequence[NeedleSample],
        *,
        backend: str | None = None,
        rule: str = "hf",
        batch_size: int = 1,
    ) -> None:
        self.samples = _check_samples(samples)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        super().__init__(model, backend, rule)

    def _batches(self) -> list[list[int]]:
        by_length: dict[int, list[int]] = {}
        for index, sample in enumerate(self.samples):
            by_length.setdefault(sample.length, []).append(index)
        size = self.batch_size
        return [group[i : i + size] for group in by_length.values() for i in range(0, len(group), size)]

    @torch.no_grad()
    def __call__(self, table: RopeTable) -> NeedleScore:
        self.use(table)
        losses: list[float] = [math.nan] * len(self.samples)
        correct = [False] * len(self.samples)
        total_loss, total_tokens = 0.0, 0
        for batch in self._batches():
            samples = [self.samples[i] for i in batch]
            length = samples[0].length
            ids = torch.stack([s.input_ids for s in samples]).to(self.device)  # [B, L]
            labels = torch.stack([s.labels for s in samples]).to(self.device)  # [B, L]
            first = min(s.answer_start for s in samples)
            keep = length - first + 1  # logits at positions first-1 .. L-1 predict tokens first .. L-1 (and one past)
            logits = self.model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits  # [B, keep, V]
            logits = logits[:, :-1].float()  # [B, keep-1, V]: predictions of tokens first .. L-1
            targets = labels[:, first:]  # [B, keep-1]
            token_loss = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
            )  # [B, keep-1], 0 where ignored
            mask = targets != IGNORE_INDEX
            # Accuracy checks the whole answer span (whitespace tokens too), as greedy decoding of it would.
            span = (
                torch.arange(first, length, device=ids.device)[None]
                >= torch.tensor([s.answer_start for s in samples], device=ids.device)[:, None]
            )  # [B, keep-1]
            hits = (logits.argmax(-1) == ids[:, first:]) | ~span
            for row, index in enumerate(batch):
                count = int(mask[row].sum())
                row_loss = float(token_loss[row].sum())
                losses[index] = row_loss / count
                correct[index] = bool(hits[row].all())
                total_loss, total_tokens = total_loss + row_loss, total_tokens + count
        loss = total_loss / total_tokens
        return NeedleScore(
            loss=loss,
            perplexity=math.exp(min(loss, 700.0)),
            accuracy=sum(correct) / len(correct),
            sample_losses=tuple(losses),
        )

    def loss(self, table: RopeTable) -> float:
        """The needle loss alone: the objective a factor search minimises."""
        return self(table).loss


class PasskeyEvaluator(_PatchedModel):
    """Greedy passkey accuracy of a table: the model is given each sample's prompt and decodes greedily, with its
    (pre-RoPE) KV cache, as many tokens as the answer has; a sample passes iff they are the answer's tokens.

    ``evaluator(table) -> float`` (fraction passed); ``evaluator.answers(table)`` gives the decoded tokens.
    """

    def __init__(
        self, model: torch.nn.Module, samples: Sequence[NeedleSample], *, backend: str | None = None, rule: str = "hf"
    ) -> None:
        self.samples = _check_samples(samples)
        super().__init__(model, backend, rule)

    @torch.no_grad()
    def _greedy(self, sample: NeedleSample) -> list[int]:
        # The whole answer span: whitespace tokens in front of the number are decoded (and checked) too.
        steps = sample.length - sample.answer_start
        out = self.model(input_ids=sample.prompt_ids[None].to(self.device), use_cache=True, logits_to_keep=1)
        generated = []
        for step in range(steps):
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            if step + 1 < steps:
                step_ids = torch.tensor([[token]], device=self.device)
                cache = cache_kwargs(self.model, output_cache(out))
                out = self.model(input_ids=step_ids, use_cache=True, **cache)
        return generated

    def answers(self, table: RopeTable) -> list[tuple[bool, list[int]]]:
        """(passed, greedy tokens) per sample."""
        self.use(table)
        results = []
        for sample in self.samples:
            tokens = self._greedy(sample)
            results.append((tokens == sample.input_ids[sample.answer_start :].tolist(), tokens))
        return results

    def __call__(self, table: RopeTable) -> float:
        passed = [ok for ok, _ in self.answers(table)]
        return sum(passed) / len(passed)
