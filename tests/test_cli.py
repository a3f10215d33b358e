"""The command line as a new user meets it: every bad value of every command stops before anything slow (no model
loaded) with one line naming the option, the value and what is expected, exit code 2 and no traceback; every option
of every command says what it does and its default; no reST markup in any help page."""

from __future__ import annotations

import argparse
import importlib
import re
import time

import pytest
import torch

import lr2kernels as lr2
from lr2kernels.apps import cli

COMMANDS = list(cli.COMMANDS)

SMOLLM2_CONTEXT = 8192  # the embedded model's max_position_embeddings (read from its GGUF header)


def _parser_of(command: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``lr2kernels COMMAND`` builds (caught as it parses, before the command runs)."""
    return _parser_of_module(cli.COMMANDS[command][0], monkeypatch)


def _parser_of_module(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``module.main`` builds (caught as it parses, before anything runs)."""
    seen = []

    class Parsed(Exception):
        pass

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(Parsed):
        importlib.import_module(module).main([])
    monkeypatch.undo()
    return seen[-1]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_that_shows_its_default_and_no_markup(command, monkeypatch, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0
    page = capsys.readouterr().out
    assert page.startswith(f"usage: lr2kernels {command}")
    assert "`" not in page and ":func:" not in page and ":class:" not in page

    _check_option_help(_parser_of(command, monkeypatch), command)


# The suites benchmarks/bench_*.py run (python -m lr2kernels.apps.bench.<suite> --help).
SUITES = ["decode", "extension", "kernels", "quality", "training"]


@pytest.mark.parametrize("suite", SUITES)
def test_every_benchmark_script_option_has_help_that_shows_its_default(suite, monkeypatch, capsys):
    module = importlib.import_module(f"lr2kernels.apps.bench.{suite}")
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert "`" not in capsys.readouterr().out
    _check_option_help(_parser_of_module(module.__name__, monkeypatch), suite)


def _check_option_help(parser: argparse.ArgumentParser, command: str) -> None:
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[-1]
        shown = formatter._get_help_string(action)
        assert action.help and action.help.strip(), f"{command} {name}: no help text"
        if action.nargs != 0 and not action.required:  # flags are off by default; the rest say their default
            assert "default" in shown, f"{command} {name}: the help does not show the default: {shown!r}"
            assert "(default: None)" not in shown, f"{command} {name}: says 'default: None'"


def test_top_level_help_has_no_markup(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    page = capsys.readouterr().out
    assert "`" not in page and all(name in page for name in COMMANDS)


# ---- bad values: exit 2 before anything loads --------------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Any model load (real or random-weight) fails the test: the errors must come before it."""
    import lr2kernels.apps.common as common
    import lr2kernels.hf.models as models

    def loaded(*args, **kwargs):
        pytest.fail("a model was loaded before the usage error")

    monkeypatch.setattr(models, "load_model", loaded)
    monkeypatch.setattr(common, "random_model", loaded)
    for module in ("search_job", "finetune_job", "demo"):
        monkeypatch.setattr(importlib.import_module(f"lr2kernels.apps.{module}"), "load_model_quietly", loaded)


@pytest.fixture
def files(tmp_path):
    """A table for the embedded model (head_dim 64, L0 = its 8192), one for another head, a foreign folder."""
    half = 32
    good = lr2.RopeTable.longrope(head_dim=64, base=1e5, original_max_position=SMOLLM2_CONTEXT,
                                  max_position=4 * SMOLLM2_CONTEXT, short_factor=[1.0] * half,
                                  long_factor=[4.0] * half)  # fmt: skip
    good.save(tmp_path / "table.json")
    lr2.RopeTable.default(head_dim=16, base=1e4, max_position=256).save(tmp_path / "small.json")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")  # a user's folder: must not be written over
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path


CUDA_LESS = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

# (argv after the command, the option the message names, a pattern of what it says)
BAD = {
    "info": [
        (["--bogus"], "--bogus", "unrecognized arguments"),
    ],
    "search": [
        (["--target-length", "4096"], "--target-length 4096", "expected more than the model's original context 8192"),
        (["--target-length", "0"], "--target-length", "expected a positive number, got 0"),
        (
            ["--original-length", "1024", "--target-length", "1024"],
            "--target-length 1024",
            "expected more than --original-length 1024",
        ),
        (["--original-length", "-5"], "--original-length", "got -5"),
        (["--eval-length", "0"], "--eval-length", "got 0"),
        (["--samples", "0"], "--samples", "expected a positive number, got 0"),
        (["--samples", "four"], "--samples", "invalid int value: 'four'"),
        (["--depth", "1.5"], "--depth", r"in \[0, 1\], got 1.5"),
        (["--digits", "0"], "--digits", "got 0"),
        (["--digits", "31"], "--digits", "expected 1 to 30 digits, got 31"),
        (["--critical-dim", "0"], "--critical-dim", "expected a pair index >= 1, got 0"),
        (["--critical-dim", "40"], "--critical-dim 40", r"expected a pair index in \[1, 31\]"),
        (["--critical-window", "-1"], "--critical-window", "got -1"),
        (["--population", "0"], "--population", "expected a positive integer, got 0"),
        (["--parents", "0"], "--parents", "got 0"),
        (["--mutations", "-1"], "--mutations", "got -1"),
        (["--crossovers", "-2"], "--crossovers", "got -2"),
        (["--mutations", "0", "--crossovers", "0"], "--mutations / crossovers", "at least one child"),
        (["--iterations", "-1"], "--iterations", "got -1"),
        (["--mutation-prob", "0"], "--mutation-prob", r"\(0, 1\], got 0.0"),
        (["--seed", "-1"], "--seed", "got -1"),
        (["--text", "/no/such.txt"], "--text", "expected a readable text file, got '/no/such.txt'"),
        (["--model", "/no/such/model"], "--model", "expected 'smollm2', a local HF model folder or a .gguf file"),
        (["--backend", "tpu"], "--backend", "expected torch, triton or cuda, got 'tpu'"),
        (["--dtype", "float8"], "--dtype", "invalid choice: 'float8'"),
        (["--device", "tpu"], "--device", "expected cpu or cuda, got 'tpu'"),
        pytest.param(["--device", "cuda"], "--device", "sees no CUDA device", marks=CUDA_LESS),
        (["--out", "{tmp}/mine"], "--out", "holds config.json but no search_log.jsonl"),
        (["--out", "{tmp}/a_file/out"], "--out", "expected a folder the search can write"),
    ],
    "finetune": [
        (["--table", "{tmp}/nowhere"], "--table", "expected a table.json or a folder holding one"),
        (["--table", "{tmp}/small.json"], "--table", "expected a table for head_dim 64 / rotary_dim 64"),
        (["--seq-len", "0"], "--seq-len", "expected a positive integer, got 0"),
        (["--seq-len", "4096"], "--seq-len 4096", "expected more than the table's L0 8192"),
        (["--steps", "0"], "--steps", "expected a positive integer, got 0"),
        (["--batch-size", "0"], "--batch-size", "got 0"),
        (["--grad-accum", "0"], "--grad-accum", "got 0"),
        (["--save-steps", "-1"], "--save-steps", "expected a number of steps >= 0"),
        (["--long-fraction", "2"], "--long-fraction", r"expected a fraction in \[0, 1\], got 2.0"),
        (["--lr", "0"], "--lr", "expected a positive learning rate, got 0.0"),
        (["--lr", "inf"], "--lr", "expected a positive learning rate, got inf"),
        (["--warmup-steps", "-1"], "--warmup-steps", "got -1"),
        (["--seed", "-1"], "--seed", "got -1"),
        (["--data", "{tmp}/missing.txt"], "--data", "expected a readable file"),
        (["--model", "/no/such/model"], "--model", "expected 'smollm2'"),
        (["--backend", "tpu"], "--backend", "got 'tpu'"),
        (["--bf16", "--device", "cpu"], "--bf16", "bf16 training is for GPUs"),
        (["--fsdp", "--device", "cpu"], "--fsdp", "accelerate runs FSDP on GPUs only"),
        (["--out", "{tmp}/mine"], "--out", "holds files that are not a finetune's"),
        (["--out", "{tmp}/a_file"], "--out", "expected a folder for the job, got the file"),
    ],
    "demo": [
        (["--length", "10"], "--length 10", "expected at least 128 tokens"),
        (["--length", "100000"], "--length 100000", "expected at most the model's context 8192"),
        (["--model", "/no/such/model"], "--model", "expected 'smollm2'"),
        (["--device", "tpu"], "--device", "got 'tpu'"),
        pytest.param(["--device", "cuda"], "--device", "sees no CUDA device", marks=CUDA_LESS),
        (["--seed", "x"], "--seed", "invalid int value: 'x'"),
    ],
    "bench": [
        (["--suite", "nope"], "--suite", "invalid choice: 'nope'"),
        (["--reps", "0"], "--reps", "0"),
        (["--seqlens", "0"], "--seqlens", "0"),
        (["--head-dims", "-64"], "--head-dims", "-64"),
        (["--heads", "32:5"], "--heads", "'32:5'"),
        (["--modes", "bwd"], "--modes", "invalid choice: 'bwd'"),
        (["--e2e-modes", "train"], "--e2e-modes", "invalid choice: 'train'"),
        (["--lengths", "-1"], "--lengths", "-1"),
        (["--decode-steps", "0"], "--decode-steps", "0"),
        (["--config", "{tmp}/missing.json"], "--config", "missing.json"),
        (["--max-bwd-seqlen", "0"], "--max-bwd-seqlen", "0"),
        (["--head-dims", "63"], "--head-dims", "expected even head dims"),
        (["--model", "/no/such/model"], "--model", "expected 'smollm2'"),
    ],
}


def _cases():
    for command, cases in BAD.items():
        for case in cases:
            values, marks = (case.values, case.marks) if hasattr(case, "marks") else (case, ())
            yield pytest.param(command, *values, marks=marks, id=f"{command} {' '.join(values[0])}")


@pytest.mark.parametrize(("command", "argv", "option", "pattern"), list(_cases()))
def test_a_bad_value_stops_at_once_with_one_line_naming_it(command, argv, option, pattern, files, no_model, capsys):
    argv = [arg.replace("{tmp}", str(files)) for arg in argv]
    if command == "finetune" and "--table" not in argv:
        argv = ["--table", str(files / "table.json"), *argv]
    if command in ("search", "finetune") and "--out" not in argv:
        argv = [*argv, "--out", str(files / "out")]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        cli.main([command, *argv])
    seconds = time.perf_counter() - start
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    message = captured.err.strip().splitlines()[-1]  # after argparse's usage lines
    assert message.startswith(f"lr2kernels {command}: error: "), message
    assert option in message and re.search(pattern, message), message
    assert seconds < 10, f"{seconds:.1f} s before the usage error"
    assert not (files / "out").exists() or not any((files / "out").iterdir())  # nothing written


def test_the_config_checks_read_the_embedded_models_header_only():
    """The search's and finetune's model checks read the GGUF header (milliseconds), not the 100 MB of weights, and
    read what transformers reads from it."""
    from lr2kernels.apps.common import model_config

    start = time.perf_counter()
    config = model_config("smollm2")
    assert time.perf_counter() - start < 5
    table = lr2.RopeTable.from_hf_config(config)
    assert (config["model_type"], table.max_position, table.head_dim, table.rotary_dim) == ("llama", 8192, 64, 64)
    assert table.base == 100000.0


def test_a_good_search_reads_the_config_of_a_local_folder(tmp_path, no_model, capsys):
    """A HF folder's config.json is read for the checks: its L_train (256 here), not SmolLM2's."""
    import json

    folder = tmp_path / "model"
    folder.mkdir()
    config = {"model_type": "llama", "max_position_embeddings": 256, "hidden_size": 64, "num_attention_heads": 4,
              "head_dim": 16, "rope_theta": 10000.0}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        cli.main(["search", "--model", str(folder), "--target-length", "256", "--out", str(tmp_path / "o")])
    assert "--target-length 256: expected more than the model's original context 256" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["search", "--model", str(folder), "--critical-dim", "8", "--out", str(tmp_path / "o")])
    assert r"--critical-dim 8: expected a pair index in [1, 7]" in capsys.readouterr().err


def _write_gguf(path, **extra) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(["a", "bb", "ccc"] * 1000)  # arrays before the fields: they must be stepped over
    writer.add_token_scores([0.5] * 3000)
    writer.add_context_length(4096)
    writer.add_embedding_length(256)
    writer.add_head_count(4)
    writer.add_rope_freq_base(5e5)
    writer.add_rope_dimension_count(32)
    for key, value in extra.items():
        writer.add_string(key, value)
    writer.add_tensor("x", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_the_gguf_header_reader_gives_the_config_transformers_would(tmp_path):
    from lr2kernels.apps.common import gguf_config, gguf_metadata, model_config

    _write_gguf(tmp_path / "m.gguf")
    config = model_config(str(tmp_path / "m.gguf"))
    expected = {"model_type": "llama", "max_position_embeddings": 4096, "hidden_size": 256, "num_attention_heads": 4,
                "head_dim": 64, "rope_theta": 5e5, "partial_rotary_factor": 0.5}  # fmt: skip
    assert config == expected
    table = lr2.RopeTable.from_hf_config(config)
    assert (table.head_dim, table.rotary_dim, table.max_position, table.base) == (64, 32, 4096, 5e5)
    # RoPE scaling it does not map: None, so that the caller asks transformers instead of guessing.
    _write_gguf(tmp_path / "scaled.gguf", **{"llama.rope.scaling.type": "yarn"})
    assert gguf_metadata(tmp_path / "scaled.gguf")["llama.rope.scaling.type"] == "yarn"
    assert gguf_config(tmp_path / "scaled.gguf") is None
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(ValueError, match="expected a GGUF file"):
        gguf_metadata(tmp_path / "not.gguf")
