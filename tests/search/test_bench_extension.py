"""Smoke test of the context-extension benchmark on a tiny random model: rows, CSV, PNG (no timings asserted)."""

import csv

import pytest

import lr2kernels as lr2
from lr2kernels.apps.bench import extension
from lr2kernels.search import critical_dimension


def test_rows_csv_and_plot(model_dir, tmp_path):
    searched = tmp_path / "table.json"
    model_table = lr2.RopeTable.default(head_dim=16, base=10000.0, max_position=256)
    cd = critical_dimension(10000.0, 16, 256)
    long_factor = [1.5 ** (i / cd) for i in range(cd)] + [1.5] * (8 - cd)
    lr2.RopeTable.longrope(head_dim=16, base=10000.0, original_max_position=256, max_position=384,
                           short_factor=model_table.long_factor, long_factor=long_factor).save(searched)  # fmt: skip
    rows = extension.main(["--model", str(model_dir), "--device", "cpu", "--lengths", "200", "384", "--samples", "2",
                           "--table", f"searched={searched}", "--out", str(tmp_path)])  # fmt: skip
    assert rows == 0
    with open(tmp_path / "extension.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["length"], r["method"]) for r in table] == [
        (length, method) for length in ("200", "384") for method in ("original", "PI", "NTK", "YaRN", "searched")
    ]
    for row in table:
        assert 0.0 <= float(row["needle_acc"]) <= 1.0 and 0.0 <= float(row["passkey_acc"]) <= 1.0
        assert float(row["needle_ppl"]) >= 1.0 and row["target_length"] == "384"
    # Below L_train every method is the model's own RoPE but for its attention factor: PI and NTK have none.
    short = {r["method"]: r for r in table if r["length"] == "200"}
    assert short["PI"]["needle_loss"] == short["NTK"]["needle_loss"] == short["original"]["needle_loss"]
    assert (tmp_path / "extension.png").stat().st_size > 10_000


def test_bad_table_argument(model_dir, tmp_path):
    with pytest.raises(ValueError, match="--table"):
        extension.main(["--model", str(model_dir), "--device", "cpu", "--lengths", "200", "--table", "nameless"])
