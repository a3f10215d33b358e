"""End-to-end benchmark smoke test on SmolLM2 at tiny lengths: rows, ratios, CSV and PNG (no timings asserted)."""

from __future__ import annotations

import torch

from lr2kernels.apps.bench import e2e
from lr2kernels.apps.bench.report import append_csv, plot_vs_length
from lr2kernels.hf import is_patched


def test_e2e_rows(fresh_smollm2, tmp_path):
    model, tokenizer = fresh_smollm2
    rows = e2e.run(model, tokenizer, torch.device("cpu"), lengths=[48], decode_steps=2, reps=1)
    assert not is_patched(model)  # the suite leaves the model as it found it
    assert {(r["mode"], r["provider"]) for r in rows} == {
        (mode, provider) for mode in ("prefill", "decode", "boundary") for provider in ("stock-hf", "lr2-patched")
    }
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["ratio"] > 0 for r in rows if r["provider"] == "lr2-patched")
    append_csv(rows, tmp_path / "e2e.csv")
    assert plot_vs_length(rows, tmp_path / "e2e.png", "smoke")
    assert (tmp_path / "e2e.csv").read_text().count("\n") == len(rows) + 1
    assert (tmp_path / "e2e.png").stat().st_size > 10_000
