"""read_documents (text and JSON-lines files, errors naming the file and line) and default_documents (lengths within
the short and long bounds, deterministic in the seed)."""

from __future__ import annotations

import json

import pytest

from lr2kernels.train import default_documents, pack_documents, read_documents


class WordTokenizer:
    """A stand-in for a Hugging Face tokenizer: one id per whitespace-separated word, ids given in order of first
    appearance; no special tokens are ever asked for."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.calls = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert add_special_tokens is False
        self.calls += 1
        return {"input_ids": [self.vocab.setdefault(word, len(self.vocab) + 1) for word in text.split()]}


@pytest.fixture
def tokenizer():
    return WordTokenizer()


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_a_text_file_is_one_document(tmp_path, tokenizer):
    path = tmp_path / "essay.txt"
    path.write_text("the cat sat\n\non the mat\n", encoding="utf-8")
    assert read_documents([path], tokenizer) == [[1, 2, 3, 4, 1, 5]]


def test_jsonl_lines_are_documents(tmp_path, tokenizer):
    jsonl = _write(tmp_path / "docs.jsonl", [json.dumps({"text": "a b c"}), "", json.dumps({"input_ids": [7, 8]})])
    other = _write(tmp_path / "more.json-lines", [json.dumps({"text": "c a", "source": "x"})])
    text = tmp_path / "t.md"
    text.write_text("b b", encoding="utf-8")
    assert read_documents([jsonl, str(other), text], tokenizer) == [[1, 2, 3], [7, 8], [3, 1], [2, 2]]


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"text": "a"}', "{not json"], r"docs.jsonl line 2: expected a JSON object, got invalid JSON"),
        (['{"text": "a"}', "[1, 2]"], r"docs.jsonl line 2: expected a JSON object, got list"),
        (['{"body": "a"}'], r"""docs.jsonl line 1: expected a "text" or "input_ids" field, got fields \['body'\]"""),
        (['{"text": 3}'], r'docs.jsonl line 1: expected "text" to be a string, got int'),
        (['{"input_ids": [1, "2"]}'], r'docs.jsonl line 1: expected "input_ids" to be a list of token ids >= 0'),
        (['{"input_ids": []}'], r"docs.jsonl line 1: expected a document of at least one token, got an empty one"),
        (["", '{"text": "   "}'], r"docs.jsonl line 2: expected a document of at least one token, got an empty one"),
        ([], r"docs.jsonl: expected at least one document, got an empty file"),
        (["", "  "], r"docs.jsonl: expected at least one document, got an empty file"),
    ],
)
def test_bad_jsonl_files_name_the_file_and_line(tmp_path, tokenizer, lines, match):
    path = _write(tmp_path / "docs.jsonl", lines)
    with pytest.raises(ValueError, match=rf"^paths: .*{match}"):
        read_documents([path], tokenizer)


def test_bad_paths(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"paths: .*empty.txt: expected at least one document, got an empty file"):
        read_documents([empty], tokenizer)
    with pytest.raises(ValueError, match=r"paths: expected at least one file, got none"):
        read_documents([], tokenizer)
    with pytest.raises(TypeError, match=r"paths: expected a sequence of file paths, got str"):
        read_documents(str(empty), tokenizer)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_documents([tmp_path / "missing.txt"], tokenizer)


def test_a_file_that_tokenizes_to_nothing(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("words", encoding="utf-8")
    with pytest.raises(ValueError, match=r"paths: .*doc.txt: expected text that tokenizes to at least one token"):
        read_documents([path], lambda text, add_special_tokens: {"input_ids": []})


@pytest.mark.parametrize("original_length, seq_len", [(64, 256), (300, 512), (8, 12)])
def test_default_documents_respect_the_bounds(tokenizer, original_length, seq_len):
    documents = default_documents(tokenizer, original_length=original_length, seq_len=seq_len, num_short=20,
                                  num_long=6)  # fmt: skip
    short, long = documents[:20], documents[20:]
    assert len(long) == 6
    max_short = min(original_length, seq_len)
    assert all(min(16, max_short) <= len(d) <= max_short for d in short)
    assert all(original_length < len(d) <= seq_len for d in long)
    assert all(isinstance(t, int) for d in documents for t in d)
    # They pack: the short ones several to a row, each long one in a row of its own.
    rows = pack_documents(documents, seq_len=seq_len, original_length=original_length, long_fraction=0.5)
    assert any(r.long for r in rows) and any(not r.long for r in rows)


def test_default_short_documents_are_the_essays_paragraphs_first(tokenizer):
    documents = default_documents(tokenizer, original_length=4096, seq_len=8192, num_short=3, num_long=0)
    assert len(documents) == 3 and len(set(map(tuple, documents))) == 3
    # Paragraphs are whole: each ends with the end of a sentence.
    words = {i: w for w, i in tokenizer.vocab.items()}
    assert all(words[d[-1]].endswith((".", "?", "!", '"')) for d in documents)
    many = default_documents(WordTokenizer(), original_length=4096, seq_len=8192, num_short=40, num_long=0)
    assert len(many) == 40 and all(16 <= len(d) <= 4096 for d in many)


def test_default_documents_are_deterministic_in_the_seed():
    kwargs = dict(original_length=32, seq_len=128, num_short=10, num_long=4)
    first = default_documents(WordTokenizer(), seed=1, **kwargs)
    assert default_documents(WordTokenizer(), seed=1, **kwargs) == first
    assert default_documents(WordTokenizer(), seed=2, **kwargs) != first


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(seq_len=64), ValueError, r"seq_len: expected more than original_length=64 for long documents"),
        (dict(num_short=0, num_long=0), ValueError, r"num_short / num_long: expected at least one document"),
        (dict(num_short=-1), ValueError, r"num_short: expected an integer >= 0, got -1"),
        (dict(num_long=2.0), TypeError, r"num_long: expected an integer >= 0, got float"),
        (dict(original_length=0), ValueError, r"original_length: expected an integer >= 1, got 0"),
        (dict(seq_len=1, num_long=0), ValueError, r"seq_len: expected an integer >= 2, got 1"),
        (dict(seed="x"), TypeError, r"seed: expected an integer, got str"),
    ],
)
def test_default_documents_bad_inputs(tokenizer, kwargs, error, match):
    with pytest.raises(error, match=match):
        default_documents(tokenizer, **{"original_length": 64, "seq_len": 256, **kwargs})


def test_default_documents_without_long_ones_need_no_room_for_them(tokenizer):
    documents = default_documents(tokenizer, original_length=64, seq_len=32, num_short=5, num_long=0)
    assert len(documents) == 5 and all(len(d) <= 32 for d in documents)
