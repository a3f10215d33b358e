"""``lr2kernels search`` end to end on a tiny random model saved as a local HF folder (with SmolLM2's tokenizer):
the outputs, the config transformers loads, resuming from the folder's log, and a 2-process torchrun run."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import lr2kernels as lr2
from lr2kernels.apps.cli import main
from lr2kernels.search.outputs import hf_config_dict
from tests.search.helpers import free_port, tiny_llama

ARGS = ["--target-length", "512", "--eval-length", "320", "--samples", "2", "--population", "4",
        "--parents", "2", "--mutations", "2", "--crossovers", "2", "--iterations", "2", "--critical-window", "2",
        "--no-progress"]  # fmt: skip


def test_search_writes_a_table_a_config_transformers_loads_and_a_plot(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["search", "--model", str(model_dir), "--out", str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "critical dim" in printed and "searched" in printed and "YaRN" in printed
    for name in ("PI", "NTK", "YaRN", "NTK-rcd", "YaRN-rcd", "searched"):  # a line as each table is scored
        assert re.search(rf"^  {re.escape(name)}: loss [0-9.]+, held out [0-9.]+ \(\d+ s\)$", printed, re.M), name

    table = lr2.RopeTable.load(out / "table.json")
    assert table.original_max_position == 256 and table.max_position == 512
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluations"] <= 4 + 2 * 4 and summary["reused_from_log"] == 0
    # The budget is accounted for: every planned evaluation was made or is counted as skipped.
    assert summary["budget"] == 4 + 2 * 4 == summary["evaluations"] + summary["skipped_duplicates"]
    assert f"{summary['evaluations']} of 12 evaluations" in printed
    # Wall time: the whole run (model, search, scoring), its parts inside it.
    assert 0 < summary["search_s"] < summary["wall_s"] and 0 < summary["baselines_s"] < summary["wall_s"]
    assert summary["resumed_search_s"] == 0 and summary["total_s"] == summary["wall_s"]
    # The verdict: searched vs the best baseline on held-out samples (another seed), as a field and a line.
    verdict, held_out = summary["verdict"], summary["held_out_scores"]
    assert set(held_out) == set(summary["scores"]) and held_out != summary["scores"]
    baselines = {name: score["loss"] for name, score in held_out.items() if name != "searched"}
    assert verdict["best_baseline"] == min(baselines, key=baselines.get)
    assert verdict["best_baseline_loss"] == min(baselines.values())
    assert verdict["searched_loss"] == held_out["searched"]["loss"]
    assert verdict["searched_beats_best_baseline"] == (verdict["searched_loss"] < verdict["best_baseline_loss"])
    beats = "BEATS" if verdict["searched_beats_best_baseline"] else "does NOT beat"
    line = f"verdict: the searched table {beats} the best baseline, {verdict['best_baseline']}, at 320 tokens"
    assert line in printed
    assert set(summary["scores"]) == {"PI", "NTK", "YaRN", "NTK-rcd", "YaRN-rcd", "searched"}
    logged = [json.loads(line)["score"] for line in (out / "search_log.jsonl").read_text().splitlines()[1:]]
    assert summary["scores"]["searched"]["loss"] == min(logged)
    assert (out / "factors.png").stat().st_size > 10_000

    # transformers reads the config back into the same table, and the model runs past L_train with it.
    config = AutoConfig.from_pretrained(out)
    assert lr2.RopeTable.from_hf_config(config) == table
    assert config.max_position_embeddings == 512
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config).eval()
    positions = torch.arange(400)[None]  # past L_train: transformers switches to the long factors
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    expected_cos, expected_sin = table.cos_sin(positions, long=True)
    assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)
    with torch.no_grad():
        logits = model(torch.randint(0, 1000, (1, 400))).logits
    assert torch.isfinite(logits).all()
    # What vLLM reads for a longrope model (rope_scaling, L0) is there.
    raw = json.loads((out / "config.json").read_text())
    assert raw["rope_scaling"]["type"] == raw["rope_scaling"]["rope_type"] == "longrope"
    assert raw["rope_scaling"]["long_factor"] == list(table.long_factor)
    assert raw["rope_scaling"]["short_factor"] == list(table.short_factor)
    assert raw["original_max_position_embeddings"] == 256
    # As transformers writes a config for this model: its class named, no classifier labels, keys sorted.
    assert raw["architectures"] == ["LlamaForCausalLM"]
    assert "id2label" not in raw and "label2id" not in raw and list(raw) == sorted(raw)

    # Running it again resumes from the folder's log: nothing is evaluated twice.
    assert main(["search", "--model", str(model_dir), "--out", str(out), *ARGS]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["reused_from_log"] == again["evaluations"] == summary["evaluations"]
    # The time the reused evaluations took in the first run is counted in the total.
    assert again["resumed_search_s"] > 0 and again["total_s"] == again["wall_s"] + again["resumed_search_s"]
    assert lr2.RopeTable.load(out / "table.json") == table
    # Another target cannot reuse that log: one line, exit 2.
    assert main(["search", "--model", str(model_dir), "--out", str(out), *ARGS, "--target-length", "1024"]) == 2
    error = capsys.readouterr().err
    assert "lr2kernels search: error: log: " in error and "Traceback" not in error
    assert "different search: search.space.target_length is 512 in the log and 1024" in error


@pytest.fixture(scope="module")
def logged_search(model_dir, tmp_path_factory):
    """An output folder of a finished search (its log) on ``model_dir``."""
    out = tmp_path_factory.mktemp("logged") / "out"
    assert main(["search", "--model", str(model_dir), "--out", str(out), *ARGS]) == 0
    return out


def _copy(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    copy.mkdir()
    shutil.copy(out / "search_log.jsonl", copy / "search_log.jsonl")
    return copy


@pytest.mark.parametrize(
    "option,field",
    [(["--samples", "3"], "samples"), (["--eval-length", "300"], "eval_length"), (["--depth", "0.3"], "depth"),
     (["--digits", "5"], "digits"), (["--text", "OTHER"], "text_sha256"), (["--dtype", "bfloat16"], "dtype"),
     (["--backend", "torch"], "backend")],
)  # fmt: skip
def test_a_log_of_another_objective_is_refused_naming_the_option(logged_search, tmp_path, capsys, option, field):
    out = _copy(logged_search, tmp_path)
    before = (out / "search_log.jsonl").read_bytes()
    if option[0] == "--text":
        (tmp_path / "other.txt").write_text("Another filler text, about nothing in particular at all. " * 60)
        option = ["--text", str(tmp_path / "other.txt")]
    args = ["search", "--model", _model_of(logged_search), "--out", str(out), *ARGS, *option]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert re.search(rf"different search: objective\.{field} is .* in the log", error)
    assert "--fresh" in error and str(out / "search_log.jsonl") in error
    assert (out / "search_log.jsonl").read_bytes() == before  # refused, untouched
    # --fresh starts over and keeps the old log, renamed next to it.
    assert main([*args, "--fresh"]) == 0
    assert "moved the earlier log" in capsys.readouterr().out
    (backup,) = out.glob("search_log.jsonl.old-*")
    assert backup.read_bytes() == before
    assert json.loads((out / "summary.json").read_text())["reused_from_log"] == 0


def _model_of(out: Path) -> str:
    return json.loads((out / "summary.json").read_text())["model"]


def test_changed_weights_are_refused(tokenizer, tmp_path, capsys):
    folder, out = tmp_path / "model", tmp_path / "out"
    model = tiny_llama(len(tokenizer), max_position=256, seed=2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert main(["search", "--model", str(folder), "--out", str(out), *ARGS]) == 0
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3  # one parameter, same path, same config
    model.save_pretrained(folder)
    assert main(["search", "--model", str(folder), "--out", str(out), *ARGS]) == 2
    refused = capsys.readouterr().err
    assert re.search(r"objective\.weights_sha256 is '[0-9a-f]{64}' in the log and '[0-9a-f]{64}'", refused)


def test_a_log_cut_by_a_kill_resumes_twice_through_the_cli(logged_search, tmp_path, capsys):
    out = _copy(logged_search, tmp_path)
    lines = (out / "search_log.jsonl").read_text().splitlines(keepends=True)
    (out / "search_log.jsonl").write_text("".join(lines[:4]) + lines[4][:40])  # killed mid-write
    args = ["search", "--model", _model_of(logged_search), "--out", str(out), *ARGS]
    assert main(args) == 0
    assert "repaired" in capsys.readouterr().err
    first = json.loads((out / "summary.json").read_text())
    assert first["reused_from_log"] == 3
    assert main(args) == 0
    second = json.loads((out / "summary.json").read_text())
    assert second["reused_from_log"] == second["evaluations"] == first["evaluations"]
    expected = json.loads((logged_search / "summary.json").read_text())
    assert second["history"] == expected["history"] and second["critical_dim"] == expected["critical_dim"]


def test_hf_config_dict_rejects_a_plain_table():
    with pytest.raises(ValueError, match="table"):
        hf_config_dict({"model_type": "llama"}, lr2.RopeTable.default(head_dim=16, base=1e4, max_position=256))
    with pytest.raises(TypeError, match="model_config"):
        hf_config_dict(42, lr2.RopeTable.default(head_dim=16, base=1e4, max_position=256))


def test_torchrun_two_processes_give_the_one_process_table(model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cli = ["-m", "lr2kernels", "search", "--model", str(model_dir), "--device", "cpu", *ARGS]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *cli, "--out", str(one)], env=env, check=True, timeout=300, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port())]  # fmt: skip
    done = subprocess.run([*torchrun, *cli, "--out", str(two)], env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    assert lr2.RopeTable.load(two / "table.json") == lr2.RopeTable.load(one / "table.json")
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2
    assert (two / "search_log.jsonl.rank1").exists()  # the second process evaluated (and logged) its share


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--samples", "0"], "--samples: expected a positive number, got 0"),
        (["--depth", "1.5"], r"--depth: expected a fraction of the filler in \[0, 1\], got 1.5"),
        (["--population", "0"], "--population: expected a positive integer, got 0"),
        (["--mutation-prob", "0"], r"--mutation-prob: expected a probability in \(0, 1\]"),
        (["--text", "/no/such/file.txt"], "--text: expected a readable text file, got '/no/such/file.txt'"),
        (["--model", "/no/such/model"], "--model: expected 'smollm2', a local HF model folder or a .gguf file"),
        (["--backend", "tpu"], "--backend: expected torch, triton or cuda, got 'tpu'"),
        (["--device", "cuda"], "--device: 'cuda' asked for, but torch .* sees no CUDA device"),
    ],
    ids=["samples", "depth", "population", "mutation-prob", "text", "model", "backend", "device"],
)
def test_bad_arguments_stop_before_anything_loads(tmp_path, monkeypatch, capsys, arguments, message):
    from lr2kernels.apps import search_job

    if arguments[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(search_job, "load_model_quietly", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as stop:
        search_job.main([*arguments, "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_an_unwritable_out_folder_stops_before_anything_loads(tmp_path, monkeypatch, capsys):
    from lr2kernels.apps import search_job

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(search_job, "load_model_quietly", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit):
        search_job.main(["--out", str(blocker / "out")])
    assert "--out: expected a folder the search can write its log and results to" in capsys.readouterr().err


def test_the_budget_is_accounted_for_when_the_space_runs_out_of_new_candidates(tmp_path, capsys):
    """With every factor pinned (upper 1: [s, s]) only the critical dimension varies: 3 distinct candidates for a
    budget of 12. The search says what it skipped, and evaluations + skipped is the budget; a resumed run counts the
    time the logged evaluations took."""
    import time

    from lr2kernels.search import SearchConfig, evolutionary_search
    from lr2kernels.search.space import SearchSpace

    space = SearchSpace(lr2.RopeTable.default(head_dim=16, base=1e4, max_position=256), 1024, 3, 5, upper=1.0)
    config = SearchConfig(population=4, parents=2, mutations=2, crossovers=2, iterations=2)
    calls = []

    def objective(table):
        calls.append(table)
        time.sleep(0.02)
        return float(sum(table.long_factor))

    log = tmp_path / "log.jsonl"
    result = evolutionary_search(objective, space, config, log_path=log, progress=True)
    assert result.evaluations == len(calls) == 3
    assert result.evaluations + result.skipped == config.budget == 12
    err = capsys.readouterr().err
    assert "generation 0: 1 planned candidate(s) skipped" in err and "3/3 evaluations" in err
    again = evolutionary_search(objective, space, config, log_path=log)
    assert len(calls) == 3 and again.reused == 3 and again.skipped == result.skipped
    assert again.logged_untimed == 0 and 3 * 0.02 <= again.logged_s < 3 * 0.02 + 5


def test_the_factor_plot_marks_the_found_and_the_theoretical_critical_dimension(tmp_path, monkeypatch):
    import matplotlib.figure

    from lr2kernels.search.outputs import plot_factors

    saved = []
    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), original(fig, *a, **k))
    )
    table = lr2.RopeTable.yarn(head_dim=32, base=1e4, original_max_position=256, max_position=1024)
    plot_factors(tmp_path / "f.png", {"YaRN": table}, critical_dim=9, theoretical_critical_dim=12)
    (axes,) = saved[0].axes
    texts = [text.get_text().strip() for text in axes.texts]
    assert texts == ["critical dim 9", "theoretical 12"]
    vertical = [line.get_xdata()[0] for line in axes.lines if len(set(line.get_xdata())) == 1]
    assert vertical == [9, 12]
    assert (tmp_path / "f.png").stat().st_size > 10_000


def test_the_search_and_the_scoring_are_never_silent(model_dir, tmp_path, monkeypatch, capsys):
    """Without --no-progress: the bar after every evaluation and a heartbeat line (every 30 s; here 0.05 s) through
    the search and through the scoring of the baselines."""
    from transformers.models.llama import modeling_llama

    from lr2kernels.apps import search_job

    monkeypatch.setattr(search_job, "HEARTBEAT_S", 0.05)
    # The tiny model's forwards take milliseconds: on an idle machine a whole search fits between two beats. Each
    # decoder layer is made to last longer than two beats, so the beat always lands inside a forward, whatever the load.
    original_layer_forward = modeling_llama.LlamaDecoderLayer.forward

    def slow_layer_forward(self, *args, **kwargs):
        time.sleep(0.12)
        return original_layer_forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", slow_layer_forward)
    args = ["--target-length", "512", "--eval-length", "320", "--samples", "1", "--population", "2", "--parents",
            "2", "--mutations", "1", "--crossovers", "0", "--iterations", "1", "--critical-window", "1"]  # fmt: skip
    assert main(["search", "--model", str(model_dir), "--out", str(tmp_path / "out"), *args]) == 0
    captured = capsys.readouterr()
    assert re.search(r"^  \.\.\. search: \d+ s, forward \d+, layer [12]/2$", captured.out, re.M)
    assert re.search(r"^  \.\.\. scoring: \d+ s, forward \d+, layer [12]/2$", captured.out, re.M)
    assert re.search(r"search \[#+\.*\] 3/3 evaluations", captured.err)
