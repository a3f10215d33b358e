"""Needle data for LongRoPE2's needle-driven perplexity: long filler documents with a "magic number" needle and a
question about it at the end; only the answer's tokens carry labels.

Plain perplexity over long documents is dominated by local context and misleads the factor search (LongRoPE2,
Table 6); a loss on the answer to a question about something far back measures long-range retrieval.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import random
from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # labels that the loss skips (torch's cross_entropy default)
NEEDLE = " The special magic number is {number}. Remember it: the special magic number is {number}."
QUESTION = (
    "\n\nQuestion: what is the special magic number mentioned in the text above?\nAnswer: The special magic number is"
)
ANSWER = " {number}"
# The classic passkey-retrieval filler (Landmark Attention, LongRoPE): repetitive, so only the needle carries meaning.
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def package_text() -> str:
    """The filler shipped with the package: an English essay (``lr2kernels/data/english_text.txt``)."""
    return importlib.resources.files("lr2kernels").joinpath("data/english_text.txt").read_text(encoding="utf-8")


def read_texts(paths: Sequence[str | os.PathLike]) -> str:
    """The contents of text files, joined by blank lines (filler for :func:`needle_samples`)."""
    parts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            parts.append(f.read().strip())
    text = "\n\n".join(p for p in parts if p)
    if not text:
        raise ValueError(f"text_files: expected text, got only empty files {list(map(str, paths))}")
    return text


@dataclasses.dataclass(frozen=True)
class NeedleSample:
    """One needle document of exactly ``len(input_ids)`` tokens.

    Attributes:
        input_ids: [L] int64: optional BOS, filler, needle, filler, question, answer.
        labels: [L] int64: the answer's tokens at their positions, ``IGNORE_INDEX`` everywhere else.
        answer: the magic number, as text.
        needle_start / needle_end: token span of the needle sentence (``input_ids[needle_start:needle_end]``).
        answer_start: index of the first labelled token.
        depth: where the needle was asked to be, as a fraction of the filler before the question.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    answer: str
    needle_start: int
    needle_end: int
    answer_start: int
    depth: float

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    @property
    def prompt_ids(self) -> torch.Tensor:
        """[answer_start] the document up to the answer: what a model is given to generate the answer."""
        return self.input_ids[: self.answer_start]

    @property
    def answer_ids(self) -> torch.Tensor:
        """[answer tokens] the tokens a greedy answer must reproduce."""
        return self.input_ids[self.answer_start :][self.labels[self.answer_start :] != IGNORE_INDEX]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _start_tokens(tokenizer) -> list[int]:
    # What the tokenizer puts in front of a document (BOS for Llama-style tokenizers, nothing for SmolLM2's).
    with_special, without = tokenizer("a").input_ids, _encode(tokenizer, "a")
    return list(with_special[: len(with_special) - len(without)]) if with_special[-len(without) :] == without else []


def _question_and_answer(tokenizer, number: str) -> tuple[list[int], list[int]]:
    question = _encode(tokenizer, QUESTION)
    joint = _encode(tokenizer, QUESTION + ANSWER.format(number=number))
    if joint[: len(question)] != question:  # the answer merged with the question's last token: label that part too
        question = question[:-1]
    answer = joint[len(question) :]
    return question, answer


def needle_samples(
    tokenizer,
    length: int,
    num_samples: int = 1,
    depth: float | Sequence[float] = 0.1,
    seed: int = 0,
    text: str | None = None,
    digits: int = 7,
) -> list[NeedleSample]:
    """Needle documents of exactly ``length`` tokens, deterministic in ``seed``.

    Each sample draws a ``digits``-long magic number and a random starting point in the filler ``text`` (default:
    :func:`package_text`, repeated as needed), puts the needle sentence after ``depth`` of the filler and ends with
    a question whose answer is the number. Only the answer tokens are labelled (whitespace-only tokens in front
    of the number are not).

    Args:
        tokenizer: a Hugging Face tokenizer (``tokenizer(text).input_ids``, ``decode``).
        length: tokens per sample.
        num_samples: how many samples.
        depth: the needle's position as a fraction in [0, 1] of the filler (0 = at the start); one value for all
            samples or one per sample.
        seed: every random choice (numbers, filler offsets) comes from ``random.Random(seed)``.
        text: filler text (e.g. :func:`read_texts` of your files); default the package's essay.
        digits: length of the magic number.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive integer, got {num_samples!r}")
    if not isinstance(digits, int) or not 1 <= digits <= 30:
        raise ValueError(f"digits: expected an integer in [1, 30], got {digits!r}")
    depths = [float(depth)] * num_samples if isinstance(depth, (int, float)) else [float(d) for d in depth]
    if len(depths) != num_samples or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depth: expected one value or {num_samples} values in [0, 1], got {depth!r}")
    filler = _encode(tokenizer, package_text() if text is None else text)
    if len(filler) < 16:
        raise ValueError(f"text: expected at least 16 tokens of filler, got {len(filler)}")
    rng = random.Random(seed)
    start = _start_tokens(tokenizer)
    samples = []
    for sample_depth in depths:
        number = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        offset = rng.randrange(len(filler))
        needle = _encode(tokenizer, NEEDLE.format(number=number))
        question, answer = _question_and_answer(tokenizer, number)
        fill = length - len(start) - len(needle) - len(question) - len(answer)
        if fill < 0:
            raise ValueError(
                f"length: expected at least {length - fill} tokens to hold the needle, question and answer, "
                f"got {length}"
            )
        stream = (filler * (1 + (offset + fill) // len(filler)))[offset : offset + fill]
        before = round(sample_depth * fill)
        ids = start + stream[:before] + needle + stream[before:] + question + answer
        labels = [IGNORE_INDEX] * (len(ids) - len(answer))
        labels += [IGNORE_INDEX if not tokenizer.decode([t]).strip() else t for t in answer]
        needle_start = len(start) + before
        samples.append(
            NeedleSample(
                input_ids=torch.tensor(ids, dtype=torch.long),
                labels=torch.tensor(labels, dtype=torch.long),
                answer=number,
                needle_start=needle_start,
                needle_end=needle_start + len(needle),
                answer_start=len(ids) - len(answer),
                depth=sample_depth,
            )
        )
    return samples


def passkey_samples(tokenizer, length: int, num_samples: int = 1, seed: int = 0, digits: int = 5) -> list[NeedleSample]:
    """Passkey retrieval: the needle in the classic repetitive filler (:data:`PASSKEY_FILLER`) at a random depth
    per sample (uniform in [0, 1], from ``seed``), a ``digits``-long key. Score with :class:`PasskeyEvaluator`."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive integer, got {num_samples!r}")
    rng = random.Random(seed)
    depths = [rng.random() for _ in range(num_samples)]
    return needle_samples(tokenizer, length, num_samples, depths, seed, PASSKEY_FILLER * 8, digits)
