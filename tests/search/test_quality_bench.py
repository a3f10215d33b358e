"""The quality benchmark (apps/bench/quality.py): held-out text never trained on, three rows, a finetune between."""

from __future__ import annotations

import pydoc_data.topics

import lr2kernels as lr2
from lr2kernels.apps.bench.quality import COLUMNS, manual_documents, run
from lr2kernels.train.finetune import FinetuneSettings
from tests.search.helpers import tiny_llama


def test_manual_documents_hold_out_their_texts_and_mix_short_with_long(tokenizer):
    documents, texts = manual_documents(tokenizer, original_length=512, seq_len=2048, held_out=3, short_length=300)
    assert len(texts) == 3 and all(len(t) == 300 for t in texts)
    short = [d for d in documents if len(d) <= 512]
    long = [d for d in documents if len(d) > 512]
    assert short and long
    assert all(len(d) <= 2048 for d in long[:-1])
    # No held-out text is inside any training document.
    flat = [tuple(d) for d in documents]
    for text in texts:
        window = tuple(text[:64])
        assert not any(_contains(document, window) for document in flat)
    # Every topic that is not held out is trained on: the long documents are the whole manual minus held-out topics.
    total = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in pydoc_data.topics.topics.values())
    assert sum(len(d) for d in long) < total
    again, _ = manual_documents(tokenizer, original_length=512, seq_len=2048, held_out=3, short_length=300)
    assert again == documents  # seeded


def _contains(document: tuple[int, ...], window: tuple[int, ...]) -> bool:
    n = len(window)
    return any(document[i : i + n] == window for i in range(len(document) - n + 1))


def test_run_gives_base_and_finetuned_rows_and_trains_the_model(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer), max_position=128)
    table = lr2.RopeTable.longrope(
        head_dim=16, base=10000.0, original_max_position=128, max_position=512,
        short_factor=[1.0] * 8, long_factor=[1.0 + 0.5 * i for i in range(8)],
    )  # fmt: skip
    before = {name: t.clone() for name, t in model.state_dict().items()}
    settings = FinetuneSettings(seq_len=512, steps=2, learning_rate=1e-3, save_steps=1)
    rows = run(model, tokenizer, table, settings, tmp_path / "job", length=300, samples=1, held_out=2,
               short_length=100)  # fmt: skip
    assert [(r["model"], r["rope"]) for r in rows] == [("base", "own"), ("base", "table"), ("finetuned", "table")]
    assert all(set(COLUMNS) <= set(r) for r in rows)
    assert rows[0]["short_retained"] == rows[0]["essay_retained"] == 1.0 and rows[0]["needle_loss"] == ""
    assert all(r["short_ppl"] > 1 and r["essay_ppl"] > 1 and r["needle_loss"] != "" for r in rows[1:])
    assert rows[2]["steps"] == 2
    assert not lr2.hf.is_patched(model)
    assert any(not before[name].equal(t) for name, t in model.state_dict().items())
    assert (tmp_path / "job" / "model" / "config.json").exists()
    assert len(list((tmp_path / "job" / "checkpoints").glob("checkpoint-*"))) <= 2  # the newest two are kept
