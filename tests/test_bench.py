"""Benchmark smoke tests: tiny sizes; they check that the suites produce sane rows, a CSV and a PNG (no timings)."""

from __future__ import annotations

import csv

import torch

from lr2kernels.apps.bench import kernels
from lr2kernels.apps.cli import main


def test_kernel_suite_rows_csv_and_plot(tmp_path):
    rows = kernels.run(torch.device("cpu"), [32, 48], [16], [(2, 1)], ["fwd", "fwd_bwd", "decode", "rerotate"], 1, 1)
    providers = {(r["mode"], r["provider"]) for r in rows}
    assert ("fwd", "lr2-torch") in providers and ("fwd", "sdpa+rope") in providers
    assert ("rerotate", "lr2-torch") in providers
    assert all(r["ms"] > 0 for r in rows)
    ours = [r for r in rows if r["provider"] == "lr2-torch" and r["mode"] != "rerotate"]
    assert len(ours) == 6 and all(r["ratio"] > 0 for r in ours)  # ours / baseline on the same shape
    assert all(r["device_name"].startswith("cpu") and r["torch"] == torch.__version__ for r in rows)


def test_cli_bench_writes_csv_and_png(tmp_path, capsys):
    args = ["bench", "--suite", "kernels", "--device", "cpu", "--out", str(tmp_path), "--seqlens", "32",
            "--head-dims", "16", "--heads", "2:1", "--modes", "fwd", "decode", "--reps", "1"]  # fmt: skip
    assert main(args) == 0
    assert main(args) == 0  # appends to the same CSV
    with open(tmp_path / "kernels.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and {r["mode"] for r in table} == {"fwd", "decode"}
    assert all(float(r["ms"]) > 0 for r in table) and all(r["commit"] is not None for r in table)
    png = tmp_path / "kernels_D16_H2-1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "ratio" in capsys.readouterr().out


def test_results_go_to_a_fresh_folder_by_default(tmp_path, monkeypatch):
    # Never append to (or overwrite) another run's results, such as the tracked benchmarks/results, by default.
    import argparse
    from pathlib import Path

    from lr2kernels.apps.bench import report
    from lr2kernels.apps.common import RESULTS_ROOT

    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    report.add_options(parser)
    first = Path(parser.parse_args([]).out)
    first.mkdir(parents=True)
    parser = argparse.ArgumentParser()
    report.add_options(parser)
    second = Path(parser.parse_args([]).out)
    assert first.parent.name == second.parent.name == RESULTS_ROOT
    assert second != first and not second.exists()


def test_training_suite_compares_packed_and_padded_on_the_same_tokens():
    from lr2kernels.apps.bench.training import COLUMNS, run
    from tests.models import tiny_model

    rows = run(tiny_model("llama").train(), torch.device("cpu"), seq_len=96, rows=2, docs_per_batch=3, reps=1, seed=0)
    assert [row["provider"] for row in rows] == ["stock, padded", "stock, packed", "patched, packed"]
    assert all(set(COLUMNS) <= set(row) for row in rows)
    assert len({row["real_tokens"] for row in rows}) == 1  # the same documents for all three
    assert rows[1]["computed_tokens"] == rows[2]["computed_tokens"] == 2 * 96
    assert all(row["ms"] > 0 and row["tokens_per_s"] > 0 and row["saved_mb"] > 0 for row in rows)
    assert rows[2]["saved_mb"] < rows[0]["saved_mb"]  # no padding, no [L, L] mask or scores kept for backward
    assert rows[0]["speedup"] == 1.0


def test_e2e_suite_times_a_real_config_at_random_weights(tmp_path):
    """``--config``: a real model's shapes at random weights on random ids (Phi-4-mini's attention and LongRoPE
    fields: partial rotary 96 of 128, GQA; shrunk to 1 layer and 2 heads to run here)."""
    import json
    from pathlib import Path

    config = json.loads((Path(__file__).parent / "data" / "real_configs" / "phi4-mini-instruct.json").read_text())
    config.update(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                  intermediate_size=64, vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    argv = ["--suite", "e2e", "--config", str(tmp_path / "config.json"), "--device", "cpu", "--lengths", "40",
            "--decode-steps", "2", "--reps", "1", "--e2e-modes", "prefill", "decode",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(["bench", *argv]) == 0
    with open(tmp_path / "e2e.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["mode"], r["provider"]) for r in rows) == [
        ("decode", "lr2-patched"), ("decode", "stock-hf"), ("prefill", "lr2-patched"), ("prefill", "stock-hf")
    ]  # fmt: skip
    assert all(r["model"] == "Phi3ForCausalLM" and float(r["ms"]) > 0 for r in rows)
    assert all(r["ratio"] for r in rows if r["provider"] == "lr2-patched")


def test_decode_bandwidth_suite_rows_csv_and_plot(tmp_path):
    from lr2kernels.apps.bench.decode import COLUMNS
    from lr2kernels.apps.bench.decode import main as decode_main

    argv = ["--device", "cpu", "--batches", "1", "2", "--caches", "64", "--heads", "4:2", "--head-dim", "64",
            "--reps", "2", "--peak-mb", "8", "--out", str(tmp_path)]  # fmt: skip
    assert decode_main(argv) == 0
    with open(tmp_path / "decode.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["provider"] for r in rows}) == ["lr2-torch", "sdpa"] and len(rows) == 4
    assert all(set(COLUMNS) <= set(r) and float(r["gb_per_s"]) > 0 and float(r["of_copy_peak"]) > 0 for r in rows)
    assert all(float(r["vs_post_rope"]) == 1.0 for r in rows if r["provider"] == "sdpa")
    assert (tmp_path / "decode.png").exists()
