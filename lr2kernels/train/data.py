"""Documents for mixed context window training: read from files, or a small default corpus for smoke tests.

Tokenizers are duck-typed (``tokenizer(text, add_special_tokens=False)["input_ids"]``, as Hugging Face tokenizers
answer), so this module never imports transformers.
"""

from __future__ import annotations

import importlib.resources
import json
import numbers
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lr2kernels.train.packing import check_int

__all__ = ["JSONL_SUFFIXES", "default_documents", "read_documents"]

JSONL_SUFFIXES = (".jsonl", ".json-lines")  # one JSON document per line; any other file is one text document
MIN_WINDOW = 16  # the shortest default short window: shorter ones teach next to nothing


def _package_text() -> str:
    """The English essay shipped with the package (``lr2kernels/data/english_text.txt``)."""
    return importlib.resources.files("lr2kernels").joinpath("data/english_text.txt").read_text(encoding="utf-8")


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return [int(token) for token in tokenizer(text, add_special_tokens=False)["input_ids"]]


# ---------------------------------------------------------------------------------------------------------------------
# files


def _jsonl_document(tokenizer: Any, record: Any, where: str) -> list[int]:
    """One JSON line's document: its "text" tokenized, or its "input_ids" as given."""
    if not isinstance(record, dict):
        raise ValueError(f"paths: {where}: expected a JSON object, got {type(record).__name__}")
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            raise ValueError(f'paths: {where}: expected "text" to be a string, got {type(text).__name__}')
        tokens = _tokenize(tokenizer, text)
    elif "input_ids" in record:
        tokens = record["input_ids"]
        if not isinstance(tokens, list) or not all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in tokens
        ):
            raise ValueError(f'paths: {where}: expected "input_ids" to be a list of token ids >= 0')
        tokens = [int(t) for t in tokens]
    else:
        raise ValueError(f'paths: {where}: expected a "text" or "input_ids" field, got fields {sorted(record)}')
    if not tokens:
        raise ValueError(f"paths: {where}: expected a document of at least one token, got an empty one")
    return tokens


def _read_jsonl(path: Path, tokenizer: Any) -> list[list[int]]:
    documents = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():  # blank lines (a trailing newline, say) hold no document
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"paths: {where}: expected a JSON object, got invalid JSON ({error})") from None
            documents.append(_jsonl_document(tokenizer, record, where))
    return documents


def _read_text(path: Path, tokenizer: Any) -> list[list[int]]:
    # The file's outer whitespace (a trailing newline, say) is not part of the document.
    text = path.read_text(encoding="utf-8").strip()
    return [_tokenize(tokenizer, text)] if text else []


def read_documents(paths: Sequence[str | os.PathLike], tokenizer: Any) -> list[list[int]]:
    """Tokenized documents from files, in order.

    - A ``.jsonl`` / ``.json-lines`` file holds one document per line: a JSON object with a "text" field (tokenized
      here) or an "input_ids" field (a list of token ids, taken as is). Blank lines are skipped.
    - Any other file is ONE text document (its outer whitespace stripped).

    Args:
        paths: the files.
        tokenizer: a Hugging Face tokenizer, or anything answering ``tokenizer(text, add_special_tokens=False)
            ["input_ids"]`` with a list of token ids. No special tokens are added: a document is its text.

    Returns:
        [documents][tokens] token ids.

    Raises:
        ValueError naming the file (and line): no paths, an empty file, invalid JSON, a missing or wrong field, or a
        document that tokenizes to nothing.
    """
    if isinstance(paths, (str, bytes, os.PathLike)) or not isinstance(paths, Sequence):
        raise TypeError(f"paths: expected a sequence of file paths, got {type(paths).__name__}")
    if not paths:
        raise ValueError("paths: expected at least one file, got none")
    documents = []
    for path in map(Path, paths):
        read = _read_jsonl if path.suffix.lower() in JSONL_SUFFIXES else _read_text
        found = read(path, tokenizer)
        if not found:
            raise ValueError(f"paths: {path}: expected at least one document, got an empty file")
        if not all(found):
            raise ValueError(f"paths: {path}: expected text that tokenizes to at least one token, got none")
        documents += found
    return documents


# ---------------------------------------------------------------------------------------------------------------------
# the default corpus


def _window(tokens: list[int], length: int, rng: random.Random) -> list[int]:
    """``length`` tokens from a random offset of ``tokens`` repeated end to end."""
    start = rng.randrange(len(tokens))
    return [tokens[(start + i) % len(tokens)] for i in range(length)]


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def default_documents(
    tokenizer: Any,
    *,
    original_length: int,
    seq_len: int,
    num_short: int = 64,
    num_long: int = 16,
    seed: int = 0,
) -> list[list[int]]:
    """A small corpus for smoke tests of mixed context window training, from the package's English essay.

    This is only good for checking that a training loop runs (shapes, packing, loss going down): the essay is a few
    KB, so the long documents are that same text repeated end to end, and a model can lower their loss by copying
    from an earlier repeat instead of learning long-range structure. Real finetunes pass their own text
    (:func:`read_documents`).

    Returns ``num_short`` short documents, then ``num_long`` long ones, deterministic in ``seed``:

    - short: the essay's paragraphs (blank-line separated) that have at most ``min(original_length, seq_len)``
      tokens, a seeded sample of them if there are more than ``num_short``; if there are fewer, seeded random
      windows of the tokenized essay (repeated end to end) make up the number, each of between
      ``min(16, max)`` and ``max = min(original_length, seq_len)`` tokens;
    - long: seeded random windows of the tokenized essay repeated end to end, each of between
      ``original_length + 1`` and ``seq_len`` tokens (so each fits one row and uses the long table).

    Args:
        tokenizer: as for :func:`read_documents`.
        original_length: L0, the model's pretrained context.
        seq_len: the packed row length the documents are for.
        num_short / num_long: how many documents of each kind.
        seed: makes the result deterministic.
    """
    original_length = check_int("original_length", original_length, 1)
    seq_len = check_int("seq_len", seq_len, 2)
    num_short = check_int("num_short", num_short, 0)
    num_long = check_int("num_long", num_long, 0)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an integer, got {type(seed).__name__}")
    if num_short + num_long == 0:
        raise ValueError("num_short / num_long: expected at least one document, got 0 and 0")
    if num_long and seq_len <= original_length:
        raise ValueError(
            f"seq_len: expected more than original_length={original_length} for long documents (num_long="
            f"{num_long}), got {seq_len}"
        )
    rng = random.Random(int(seed))
    text = _package_text()
    tokens = _tokenize(tokenizer, text)
    max_short = min(original_length, seq_len)
    paragraphs = [p for p in (_tokenize(tokenizer, p) for p in _paragraphs(text)) if 0 < len(p) <= max_short]
    if len(paragraphs) > num_short:
        paragraphs = [paragraphs[i] for i in sorted(rng.sample(range(len(paragraphs)), num_short))]
    min_short = min(MIN_WINDOW, max_short)
    short = paragraphs + [
        _window(tokens, rng.randint(min_short, max_short), rng) for _ in range(num_short - len(paragraphs))
    ]
    long = [_window(tokens, rng.randint(original_length + 1, seq_len), rng) for _ in range(num_long)]
    return short + long
