"""Packing documents into fixed-length rows for mixed context window training (LongRoPE2, arXiv 2502.20082).

Every row has ``seq_len`` tokens and is a sequence of segments: documents, then (if the documents do not fill it) one
padding segment. Positions restart at 0 in every segment, so a patched model (:func:`lr2kernels.patch`) attends
within a segment only and picks each document's RoPE table from that document's own length: the long table iff the
length is > ``original_length`` (L0). Short documents are packed several to a row; a long document fills a row of
its own, so a row is either a "short row" or a "long row" and :func:`pack_documents` can mix them in a chosen ratio.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import random
from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import Any

import torch

__all__ = ["IGNORE_INDEX", "PackedRow", "collate", "pack_documents"]

IGNORE_INDEX = -100  # labels that the loss skips (torch's cross_entropy default)
_INT32_MAX = 2**31 - 1  # cu_seq_lens are int32, as flash attention's varlen kernels take them


@dataclasses.dataclass(frozen=True)
class PackedRow:
    """One packed training row of ``seq_len`` tokens.

    Attributes:
        input_ids: [seq_len] the documents end to end, then ``pad_token_id`` up to ``seq_len``.
        position_ids: [seq_len] 0, 1, ... restarting at 0 at every document; trailing padding is a segment of its
            own (0 .. n-1), so it never extends the last document.
        labels: [seq_len] ``input_ids``, except ``IGNORE_INDEX`` at every document's first token and on padding.
            HF models shift labels inside (logits[i] predicts labels[i + 1]), so this keeps the last token of one
            document from being trained to predict the first token of the next.
        cu_seq_lens: [segments + 1] segment boundaries ``0, end of document 1, ..., seq_len``; the padding segment,
            if any, is the last one.
        max_length: the longest segment (padding included: varlen attention kernels size their work by it).
        document_lengths: [documents] the real documents' lengths, in row order (a piece of a split document
            counts as a document); padding is not listed.
        long: the row holds a long document (length > original_length). A long row holds that document only.
    """

    input_ids: tuple[int, ...]
    position_ids: tuple[int, ...]
    labels: tuple[int, ...]
    cu_seq_lens: tuple[int, ...]
    max_length: int
    document_lengths: tuple[int, ...]
    long: bool

    @property
    def seq_len(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------------------------------------------------------------
# argument checks


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def _check_fraction(long_fraction: Any) -> float:
    if isinstance(long_fraction, bool) or not isinstance(long_fraction, numbers.Real):
        raise TypeError(f"long_fraction: expected a number in [0, 1], got {type(long_fraction).__name__}")
    value = float(long_fraction)
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise ValueError(f"long_fraction: expected a number in [0, 1], got {long_fraction}")
    return value


def _document_tokens(index: int, document: Any) -> list[int]:
    """``documents[index]`` as a list of token ids, checked: 1-D, not empty, non-negative integers."""
    name = f"documents[{index}]"
    if isinstance(document, torch.Tensor):
        if document.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor of token ids, got shape {tuple(document.shape)}")
        if document.dtype == torch.bool or document.is_floating_point() or document.is_complex():
            raise TypeError(f"{name}: expected an integer tensor of token ids, got dtype {document.dtype}")
        tokens = document.tolist()
    elif hasattr(document, "tolist") and hasattr(document, "ndim"):  # numpy arrays
        if document.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D array of token ids, got {document.ndim} dimensions")
        tokens = document.tolist()
    elif isinstance(document, (str, bytes)) or not isinstance(document, Iterable):
        raise TypeError(f"{name}: expected a sequence of token ids, got {type(document).__name__}")
    else:
        tokens = list(document)
    if not tokens:
        raise ValueError(f"{name}: expected at least one token, got an empty document")
    if set(map(type, tokens)) == {int} and min(tokens) >= 0:  # the common case, checked at C speed
        return tokens
    for position, token in enumerate(tokens):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise TypeError(f"{name}[{position}]: expected an integer token id, got {type(token).__name__}")
        if token < 0:
            raise ValueError(f"{name}[{position}]: expected a token id >= 0, got {token}")
    return [int(token) for token in tokens]


def _check_documents(documents: Any) -> list[list[int]]:
    if isinstance(documents, (str, bytes, dict)) or not isinstance(documents, Iterable):
        raise TypeError(f"documents: expected a sequence of token-id sequences, got {type(documents).__name__}")
    checked = [_document_tokens(i, document) for i, document in enumerate(documents)]
    if not checked:
        raise ValueError("documents: expected at least one document, got none")
    return checked


# ---------------------------------------------------------------------------------------------------------------------
# packing


def _split(documents: list[list[int]], seq_len: int, original_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """The segments that go to rows, as (short pool, long rows): a document longer than ``seq_len`` is cut into
    ``seq_len`` pieces (and a remainder); every segment is then short or long by its own length, as the patched
    model will judge it."""
    short: list[list[int]] = []
    long: list[list[int]] = []
    for index, tokens in enumerate(documents):
        if seq_len < len(tokens) <= original_length:
            # Short documents are never cut (they would lose their context), so they must fit in a row.
            raise ValueError(
                f"seq_len: expected at least the longest short document, got seq_len={seq_len} < {len(tokens)} "
                f"tokens of documents[{index}] (<= original_length={original_length}, so a short document, which "
                f"must fit in a row)"
            )
        for start in range(0, len(tokens), seq_len):
            piece = tokens[start : start + seq_len]
            (long if len(piece) > original_length else short).append(piece)
    return short, long


class _FirstFit:
    """First-fit bin packing in O(log bins) per item: a max-tree over the bins' free space.

    Bins not used yet have full capacity, so the leftmost bin that fits is always a used one or the next new one.
    """

    def __init__(self, capacity: int, max_bins: int):
        self.size = 1 << max(0, max_bins - 1).bit_length()
        self.free = [capacity] * (2 * self.size)  # free[1] is the root; leaves are free[size:]
        self.used = 0

    def place(self, length: int) -> int:
        """Puts an item of ``length`` (<= capacity) in the leftmost bin with room; returns that bin's index."""
        node = 1
        while node < self.size:
            node = 2 * node if self.free[2 * node] >= length else 2 * node + 1
        self.free[node] -= length
        parent = node // 2
        while parent:
            self.free[parent] = max(self.free[2 * parent], self.free[2 * parent + 1])
            parent //= 2
        index = node - self.size
        self.used = max(self.used, index + 1)
        return index


def _pack_short(segments: list[list[int]], seq_len: int) -> list[list[list[int]]]:
    """Short segments, in the given order, packed first-fit into rows of ``seq_len`` tokens: [rows][segments]."""
    if not segments:
        return []
    packer = _FirstFit(seq_len, len(segments))
    rows: list[list[list[int]]] = [[] for _ in segments]
    for segment in segments:
        rows[packer.place(len(segment))].append(segment)
    return rows[: packer.used]


def _make_row(segments: list[list[int]], seq_len: int, original_length: int, pad_token_id: int) -> PackedRow:
    """A row from its documents (each <= seq_len tokens, together <= seq_len), padded to ``seq_len``."""
    input_ids: list[int] = []
    position_ids: list[int] = []
    labels: list[int] = []
    cu_seq_lens = [0]
    for tokens in segments:
        input_ids += tokens
        position_ids += range(len(tokens))
        labels += [IGNORE_INDEX, *tokens[1:]]  # the first token is nobody's target: no loss across documents
        cu_seq_lens.append(len(input_ids))
    padding = seq_len - len(input_ids)
    if padding:
        input_ids += [pad_token_id] * padding
        position_ids += range(padding)
        labels += [IGNORE_INDEX] * padding
        cu_seq_lens.append(seq_len)
    lengths = tuple(len(tokens) for tokens in segments)
    return PackedRow(
        input_ids=tuple(input_ids),
        position_ids=tuple(position_ids),
        labels=tuple(labels),
        cu_seq_lens=tuple(cu_seq_lens),
        max_length=max((*lengths, padding)),
        document_lengths=lengths,
        long=max(lengths) > original_length,
    )


# ---------------------------------------------------------------------------------------------------------------------
# the mix of long and short rows


def _mix_counts(available_long: int, available_short: int, long_fraction: float) -> tuple[int, int]:
    """How many (long, short) rows to keep so that long / all is as close to ``long_fraction`` as the rows allow.

    Every row of the scarcer kind is kept and only surplus rows of the other kind are dropped. ``long_fraction`` 0
    or 1 asks for one kind only. Ties keep more rows (more data). Exact arithmetic, so the choice never depends on
    float rounding.
    """
    if long_fraction == 0.0:
        return 0, available_short
    if long_fraction == 1.0:
        return available_long, 0
    if not available_long or not available_short:
        return available_long, available_short  # every selection has the same fraction: keep everything
    target = Fraction(long_fraction)
    if Fraction(available_long, available_long + available_short) >= target:  # long rows are the surplus
        ideal = target * available_short / (1 - target)
        candidates = {(min(n, available_long), available_short) for n in (math.floor(ideal), math.ceil(ideal))}
    else:  # short rows are the surplus
        ideal = available_long * (1 - target) / target
        candidates = {(available_long, min(n, available_short)) for n in (math.floor(ideal), math.ceil(ideal))}
    return min(candidates, key=lambda c: (abs(Fraction(c[0], c[0] + c[1]) - target), -(c[0] + c[1])))


def _keep(rows: list[list[list[int]]], count: int, rng: random.Random) -> list[list[list[int]]]:
    """``count`` of ``rows`` ([rows][documents][tokens]), drawn by ``rng`` (never repeated), in their order.
    Rows are chosen before they are built, so dropped rows cost nothing."""
    if count >= len(rows):
        return rows
    return [rows[i] for i in sorted(rng.sample(range(len(rows)), count))]


def _empty_mix_error(long_fraction: float, original_length: int) -> str:
    # Only 0 and 1 can select nothing: any fraction in between keeps every row of the kind there is.
    kind, why = ("long", "no") if long_fraction == 1.0 else ("short", "every")
    return (
        f"long_fraction: {long_fraction} selects no rows: it asks for {kind} rows only, but {why} document or piece "
        f"has more than original_length={original_length} tokens"
    )


def pack_documents(
    documents: Iterable[Sequence[int] | torch.Tensor],
    *,
    seq_len: int,
    original_length: int,
    long_fraction: float = 0.5,
    pad_token_id: int = 0,
    seed: int = 0,
) -> list[PackedRow]:
    """Packs tokenized documents into rows of exactly ``seq_len`` tokens for mixed context window training.

    - A short document (<= ``original_length`` tokens) is packed with other short ones: first fit, in an order
      shuffled by ``seed``. It is never cut: one longer than ``seq_len`` is an error.
    - A long document (> ``original_length`` tokens) fills a row of its own, padded to ``seq_len``.
    - A document longer than ``seq_len`` is cut into ``seq_len``-token pieces, each a document of its own (positions
      restart at 0); each piece, the remainder included, is then short or long by its own length. (With ``seq_len
      <= original_length`` every piece is short.)
    - Rows are then mixed: ``long_fraction`` of the returned rows are long rows, as closely as the available rows
      allow. All rows of the scarcer kind are kept; surplus rows of the other kind are dropped (whole rows, with
      their documents), chosen by ``seed``; nothing is repeated. ``long_fraction`` 0 or 1 keeps one kind only; with
      one kind missing, any other fraction keeps every row of the kind there is.
    - The selected rows are shuffled by ``seed``.

    Args:
        documents: token-id sequences: lists, tuples, or 1-D integer tensors / arrays.
        seq_len: tokens per row, >= 2.
        original_length: L0, the model's pretrained context; a document uses the long table iff it is longer.
        long_fraction: target fraction of long rows, in [0, 1].
        pad_token_id: fills each row after its documents (its labels are ``IGNORE_INDEX``).
        seed: makes the result deterministic.

    Returns:
        The rows; see :class:`PackedRow` for the fields. ``collate`` turns a batch of them into model inputs.

    Raises:
        TypeError / ValueError naming the argument: no documents, an empty document, a token that is not an integer
        >= 0, ``seq_len`` < 2, ``original_length`` < 1, a short document longer than ``seq_len``, ``long_fraction``
        outside [0, 1], or a mix that selects no rows (``long_fraction`` 1 without long documents, 0 without short).
    """
    seq_len = check_int("seq_len", seq_len, 2)
    original_length = check_int("original_length", original_length, 1)
    long_fraction = _check_fraction(long_fraction)
    pad_token_id = check_int("pad_token_id", pad_token_id, 0)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an integer, got {type(seed).__name__}")
    short, long = _split(_check_documents(documents), seq_len, original_length)

    rng = random.Random(int(seed))
    rng.shuffle(short)
    short_rows = _pack_short(short, seq_len)
    long_rows = [[piece] for piece in long]
    num_long, num_short = _mix_counts(len(long_rows), len(short_rows), long_fraction)
    if num_long + num_short == 0:
        raise ValueError(_empty_mix_error(long_fraction, original_length))
    selected = _keep(long_rows, num_long, rng) + _keep(short_rows, num_short, rng)
    rng.shuffle(selected)
    return [_make_row(segments, seq_len, original_length, pad_token_id) for segments in selected]


# ---------------------------------------------------------------------------------------------------------------------
# batching


def _check_rows(rows: Any) -> list[PackedRow]:
    if isinstance(rows, (PackedRow, str, bytes)) or not isinstance(rows, Sequence):
        raise TypeError(f"rows: expected a sequence of PackedRow, got {type(rows).__name__}")
    if not rows:
        raise ValueError("rows: expected at least one PackedRow, got none")
    for i, row in enumerate(rows):
        if not isinstance(row, PackedRow):
            raise TypeError(f"rows[{i}]: expected a PackedRow, got {type(row).__name__}")
        if row.seq_len != rows[0].seq_len:
            raise ValueError(f"rows[{i}]: expected seq_len {rows[0].seq_len} like rows[0], got {row.seq_len}")
    if len(rows) * rows[0].seq_len > _INT32_MAX:
        raise ValueError(
            f"rows: expected at most {_INT32_MAX} tokens in all (int32 cu_seq_lens), got {len(rows)} rows of "
            f"{rows[0].seq_len}"
        )
    return list(rows)


def collate(rows: Sequence[PackedRow]) -> dict[str, torch.Tensor | int]:
    """A batch of packed rows as keyword arguments for a patched model (and its loss).

    Returns:
        ``input_ids``, ``position_ids``, ``labels``: [B, seq_len] int64.
        ``cu_seq_lens_q`` = ``cu_seq_lens_k``: [segments + 1] int32, the segment boundaries over the B * seq_len
        tokens flattened row after row (row r's boundaries offset by r * seq_len), from 0 to B * seq_len.
        ``max_length_q`` = ``max_length_k``: the longest segment, a Python int.
        These are the names and dtypes transformers' ``DataCollatorWithFlattening`` returns for flash attention.
    """
    rows = _check_rows(rows)
    seq_len = rows[0].seq_len
    boundaries = [0]
    for r, row in enumerate(rows):
        boundaries += [r * seq_len + end for end in row.cu_seq_lens[1:]]
    cu_seq_lens = torch.tensor(boundaries, dtype=torch.int32)
    max_length = max(row.max_length for row in rows)
    return {
        "input_ids": torch.tensor([row.input_ids for row in rows], dtype=torch.int64),
        "position_ids": torch.tensor([row.position_ids for row in rows], dtype=torch.int64),
        "labels": torch.tensor([row.labels for row in rows], dtype=torch.int64),
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens.clone(),
        "max_length_q": max_length,
        "max_length_k": max_length,
    }
