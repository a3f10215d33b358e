"""pack_documents and collate: rows of seq_len tokens, one segment per document, labels that never cross a document,
the long/short mix, determinism, and errors that name the argument."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lr2kernels.train import IGNORE_INDEX, PackedRow, collate, pack_documents

SEQ_LEN = 32
L0 = 12
PAD = 0


def _documents(lengths: list[int]) -> list[list[int]]:
    """Documents whose tokens are unique across documents (document i uses i * 1000 + 1 ...), so each can be found."""
    return [[i * 1000 + 1 + j for j in range(n)] for i, n in enumerate(lengths)]


def _mixed_lengths(seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    short = [rng.randint(1, L0) for _ in range(60)]
    long = [rng.randint(L0 + 1, SEQ_LEN) for _ in range(8)] + [SEQ_LEN, 2 * SEQ_LEN + 5, 3 * SEQ_LEN + L0 + 3]
    return short + long


def _segments(row: PackedRow) -> list[tuple[int, int]]:
    return list(zip(row.cu_seq_lens[:-1], row.cu_seq_lens[1:]))


def _check_row(row: PackedRow, seq_len: int, original_length: int, pad: int = PAD) -> None:
    """Every invariant a row must hold."""
    assert len(row.input_ids) == len(row.position_ids) == len(row.labels) == seq_len == row.seq_len
    cu = row.cu_seq_lens
    assert cu[0] == 0 and cu[-1] == seq_len and all(a < b for a, b in zip(cu[:-1], cu[1:]))
    # Positions restart at 0 exactly at the segment starts and count up within a segment.
    assert [i for i, p in enumerate(row.position_ids) if p == 0] == list(cu[:-1])
    for start, end in _segments(row):
        assert row.position_ids[start:end] == tuple(range(end - start))
    used = sum(row.document_lengths)
    segments = _segments(row)
    documents = segments if used == seq_len else segments[:-1]
    assert tuple(end - start for start, end in documents) == row.document_lengths
    assert row.max_length == max(end - start for start, end in segments)
    for start, end in documents:  # the first token of a document is nobody's target
        assert row.labels[start] == IGNORE_INDEX
        assert row.labels[start + 1 : end] == row.input_ids[start + 1 : end]
    assert row.input_ids[used:] == (pad,) * (seq_len - used)  # padding: its own segment, no targets
    assert row.labels[used:] == (IGNORE_INDEX,) * (seq_len - used)
    assert row.long == (max(row.document_lengths) > original_length)
    if row.long:
        assert len(row.document_lengths) == 1  # a long document shares its row with padding only


def _row_documents(rows: list[PackedRow]) -> list[tuple[int, ...]]:
    return [row.input_ids[s:e] for row in rows for s, e in _segments(row)[: len(row.document_lengths)]]


def test_rows_hold_every_invariant_and_every_document():
    lengths = _mixed_lengths()
    documents = _documents(lengths)
    rows = pack_documents(documents, seq_len=SEQ_LEN, original_length=L0, long_fraction=0.0, seed=3)
    rows += pack_documents(documents, seq_len=SEQ_LEN, original_length=L0, long_fraction=1.0, seed=3)
    for row in rows:
        _check_row(row, SEQ_LEN, L0)
    found = _row_documents(rows)
    assert len(found) == len(set(found))  # nothing repeated
    for document in documents:
        if len(document) <= SEQ_LEN:  # intact, exactly once
            assert found.count(tuple(document)) == 1
        else:  # cut into seq_len pieces (then the remainder), each a document of its own
            pieces = [tuple(document[i : i + SEQ_LEN]) for i in range(0, len(document), SEQ_LEN)]
            assert all(found.count(piece) == 1 for piece in pieces)
            assert all(len(piece) == SEQ_LEN for piece in pieces[:-1])
    # The remainders: 5 tokens (short, packed with others) and L0 + 3 (long, a row of its own).
    remainders = {len(d) % SEQ_LEN: d[-(len(d) % SEQ_LEN) :] for d in documents if len(d) > SEQ_LEN}
    assert not next(r for r in rows if tuple(remainders[5]) in _row_documents([r])).long
    assert next(r for r in rows if tuple(remainders[L0 + 3]) in _row_documents([r])).long
    # Short documents are packed several to a row: fewer short rows than short documents.
    short_rows = [r for r in rows if not r.long]
    assert len(short_rows) < sum(n <= L0 for n in lengths) and max(len(r.document_lengths) for r in short_rows) > 2


def test_a_hand_checked_row():
    (row,) = pack_documents([[5, 6, 7], [8, 9]], seq_len=8, original_length=4)
    I = IGNORE_INDEX
    in_order = PackedRow(
        input_ids=(5, 6, 7, 8, 9, 0, 0, 0), position_ids=(0, 1, 2, 0, 1, 0, 1, 2), labels=(I, 6, 7, I, 9, I, I, I),
        cu_seq_lens=(0, 3, 5, 8), max_length=3, document_lengths=(3, 2), long=False,
    )  # fmt: skip
    swapped = PackedRow(
        input_ids=(8, 9, 5, 6, 7, 0, 0, 0), position_ids=(0, 1, 0, 1, 2, 0, 1, 2), labels=(I, 9, I, 6, 7, I, I, I),
        cu_seq_lens=(0, 2, 5, 8), max_length=3, document_lengths=(2, 3), long=False,
    )  # fmt: skip
    assert row in (in_order, swapped)


def test_a_row_without_padding_has_no_padding_segment():
    (row,) = pack_documents([[1] * 5, [2] * 3], seq_len=8, original_length=5, pad_token_id=7)
    assert row.cu_seq_lens[-1] == 8 and len(row.cu_seq_lens) == 3 and 7 not in row.input_ids
    (row,) = pack_documents([[3] * 6], seq_len=8, original_length=5, pad_token_id=7)
    assert row.long and row.input_ids == (3,) * 6 + (7, 7) and row.cu_seq_lens == (0, 6, 8)
    assert row.position_ids == (0, 1, 2, 3, 4, 5, 0, 1) and row.max_length == 6


def test_tensors_and_arrays_are_documents():
    lists = _documents([3, 9, 20])
    expected = pack_documents(lists, seq_len=SEQ_LEN, original_length=L0, seed=1)
    for kind in (lambda d: torch.tensor(d), lambda d: torch.tensor(d, dtype=torch.int32), np.array, tuple):
        assert pack_documents([kind(d) for d in lists], seq_len=SEQ_LEN, original_length=L0, seed=1) == expected
    assert pack_documents(torch.tensor([[1, 2, 3]]), seq_len=4, original_length=3) == pack_documents(
        [[1, 2, 3]], seq_len=4, original_length=3
    )


def test_pieces_are_short_when_seq_len_is_at_most_original_length():
    rows = pack_documents(_documents([20, 3]), seq_len=8, original_length=8)
    assert not any(row.long for row in rows)
    assert sorted(n for row in rows for n in row.document_lengths) == [3, 4, 8, 8]


# The mix: 40 short documents of 4 tokens make 10 full short rows of 16; 30 long documents make 30 long rows.
MIX = _documents([4] * 40 + [9] * 30)


@pytest.mark.parametrize(
    "long_fraction, expected",
    [
        (0.5, (10, 10)),
        (0.25, (3, 10)),  # long surplus: 3/13 = 0.231 beats 4/14 = 0.286
        (0.9, (30, 3)),  # short surplus: 30/33 = 0.909 beats 30/34 = 0.882
        (0.75, (30, 10)),  # exactly what is available: nothing dropped
        (0.0, (0, 10)),
        (1.0, (30, 0)),
        (0.01, (0, 10)),  # 0/10 is closer to 0.01 than 1/11
    ],
)
def test_the_long_fraction_is_met_as_closely_as_possible(long_fraction, expected):
    rows = pack_documents(MIX, seq_len=16, original_length=8, long_fraction=long_fraction, seed=5)
    assert (sum(r.long for r in rows), sum(not r.long for r in rows)) == expected
    found = _row_documents(rows)
    assert len(found) == len(set(found))  # dropped rows are dropped, never replaced by repeats
    # Surplus short rows are dropped whole: each short document is intact in a kept row or gone.
    assert sum(len(d) == 4 for d in found) == 4 * expected[1]
    assert set(found) <= {tuple(d) for d in MIX}


def test_a_missing_kind_keeps_all_of_the_other():
    short = pack_documents(MIX[:40], seq_len=16, original_length=8, long_fraction=0.5)
    assert len(short) == 10 and not any(r.long for r in short)
    long = pack_documents(MIX[40:], seq_len=16, original_length=8, long_fraction=0.5)
    assert len(long) == 30 and all(r.long for r in long)


def test_a_mix_that_selects_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"long_fraction: 1.0 selects no rows: it asks for long rows only"):
        pack_documents(MIX[:40], seq_len=16, original_length=8, long_fraction=1.0)
    with pytest.raises(ValueError, match=r"long_fraction: 0.0 selects no rows: it asks for short rows only"):
        pack_documents(MIX[40:], seq_len=16, original_length=8, long_fraction=0)


def test_the_seed_decides_and_repeats():
    documents = _documents(_mixed_lengths())
    kwargs = dict(seq_len=SEQ_LEN, original_length=L0, long_fraction=0.3)
    assert pack_documents(documents, seed=1, **kwargs) == pack_documents(documents, seed=1, **kwargs)
    assert pack_documents(documents, seed=1, **kwargs) != pack_documents(documents, seed=2, **kwargs)
    # The dropped rows depend on the seed too.
    kept = [set(_row_documents(pack_documents(MIX, seq_len=16, original_length=8, long_fraction=0.2, seed=s)))
            for s in (1, 2)]  # fmt: skip
    assert kept[0] != kept[1]


def test_collate():
    rows = pack_documents(_documents(_mixed_lengths()), seq_len=SEQ_LEN, original_length=L0, seed=4)[:5]
    batch = collate(rows)
    assert set(batch) == {
        "input_ids", "position_ids", "labels", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"
    }  # fmt: skip
    for key in ("input_ids", "position_ids", "labels"):
        assert batch[key].shape == (5, SEQ_LEN) and batch[key].dtype == torch.int64
        assert batch[key].tolist() == [list(getattr(row, key)) for row in rows]
    expected = [0] + [r * SEQ_LEN + end for r, row in enumerate(rows) for end in row.cu_seq_lens[1:]]
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == torch.int32 and batch[key].tolist() == expected
    assert expected[-1] == 5 * SEQ_LEN
    # Over the flattened tokens, positions restart exactly at the boundaries.
    flat = batch["position_ids"].flatten()
    assert torch.nonzero(flat == 0).flatten().tolist() == expected[:-1]
    assert batch["max_length_q"] == batch["max_length_k"] == max(row.max_length for row in rows)
    assert type(batch["max_length_q"]) is int


def test_collate_matches_transformers_flattening():
    # Rows without padding are exactly what DataCollatorWithFlattening makes of their documents, end to end.
    transformers = pytest.importorskip("transformers")
    documents = _documents([8, 4, 8, 4, 4, 8, 16, 4, 8, 16])  # sizes that leave no padding in this seed
    rows = pack_documents(documents, seq_len=16, original_length=8, long_fraction=0.5, seed=0)
    assert all(sum(row.document_lengths) == 16 for row in rows)
    in_order = [{"input_ids": list(row.input_ids[s:e])} for row in rows for s, e in _segments(row)]
    expected = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(in_order)
    batch = collate(rows)
    assert set(batch) == set(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert batch[key].dtype == value.dtype, key
            assert torch.equal(batch[key].flatten(), value.flatten()), key
        else:
            assert batch[key] == value, key


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(documents=[]), ValueError, r"documents: expected at least one document, got none"),
        (dict(documents="abc"), TypeError, r"documents: expected a sequence of token-id sequences, got str"),
        (dict(documents=[[1], []]), ValueError, r"documents\[1\]: expected at least one token, got an empty document"),
        (dict(documents=[[1, 2.5]]), TypeError, r"documents\[0\]\[1\]: expected an integer token id, got float"),
        (dict(documents=[[1, True]]), TypeError, r"documents\[0\]\[1\]: expected an integer token id, got bool"),
        (dict(documents=["hello"]), TypeError, r"documents\[0\]: expected a sequence of token ids, got str"),
        (dict(documents=[5]), TypeError, r"documents\[0\]: expected a sequence of token ids, got int"),
        (dict(documents=[[1, -3]]), ValueError, r"documents\[0\]\[1\]: expected a token id >= 0, got -3"),
        (dict(documents=[torch.ones(3)]), TypeError, r"documents\[0\]: expected an integer tensor .* torch.float32"),
        (dict(documents=[torch.ones(2, 2, dtype=torch.long)]), ValueError, r"documents\[0\]: expected a 1-D tensor"),
        (dict(seq_len=1), ValueError, r"seq_len: expected an integer >= 2, got 1"),
        (dict(seq_len=8.0), TypeError, r"seq_len: expected an integer >= 2, got float"),
        (dict(original_length=0), ValueError, r"original_length: expected an integer >= 1, got 0"),
        (dict(seq_len=4, original_length=8), ValueError, r"seq_len: .* got seq_len=4 < 5 tokens of documents\[1\]"),
        (dict(long_fraction=1.5), ValueError, r"long_fraction: expected a number in \[0, 1\], got 1.5"),
        (dict(long_fraction=-0.1), ValueError, r"long_fraction: expected a number in \[0, 1\], got -0.1"),
        (dict(long_fraction=float("nan")), ValueError, r"long_fraction: expected a number in \[0, 1\], got nan"),
        (dict(long_fraction="half"), TypeError, r"long_fraction: expected a number in \[0, 1\], got str"),
        (dict(pad_token_id=-1), ValueError, r"pad_token_id: expected an integer >= 0, got -1"),
        (dict(seed=1.5), TypeError, r"seed: expected an integer, got float"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, error, match):
    arguments = dict(documents=[[1, 2, 3], [4, 5, 6, 7, 8], list(range(1, 20))], seq_len=8, original_length=8)
    with pytest.raises(error, match=match):
        pack_documents(**{**arguments, **kwargs})


@pytest.mark.parametrize(
    "rows, error, match",
    [
        ([], ValueError, r"rows: expected at least one PackedRow, got none"),
        ("rows", TypeError, r"rows: expected a sequence of PackedRow, got str"),
        ([[1, 2]], TypeError, r"rows\[0\]: expected a PackedRow, got list"),
    ],
)
def test_collate_bad_inputs(rows, error, match):
    with pytest.raises(error, match=match):
        collate(rows)


def test_collate_rows_of_different_lengths():
    rows = [pack_documents([[1, 2]], seq_len=n, original_length=2)[0] for n in (4, 6)]
    with pytest.raises(ValueError, match=r"rows\[1\]: expected seq_len 4 like rows\[0\], got 6"):
        collate(rows)
    with pytest.raises(TypeError, match=r"rows: expected a sequence of PackedRow, got PackedRow"):
        collate(rows[0])
