import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lr2kernels.search import SearchConfig, SearchLog, evolutionary_search, move_log_aside
from tests.search import search_worker, synthetic
from tests.search.helpers import free_port

WORKER = Path(search_worker.__file__)
CONFIG = SearchConfig(**search_worker.CONFIG)


def run(config=CONFIG, log_path=None, objective=None, fingerprint=None):
    objective = objective or synthetic.Distance()
    result = evolutionary_search(objective, synthetic.space(), config, log_path=log_path,
                                 objective_fingerprint=fingerprint)  # fmt: skip
    return result, objective


def test_converges_near_a_known_optimum():
    config = SearchConfig(population=24, parents=12, mutations=12, crossovers=12, iterations=40, seed=0)
    result, objective = run(config)
    best, target = result.best, synthetic.optimum()
    assert objective.calls == result.evaluations <= config.budget
    start = min(objective(synthetic.space().table(c)) for c in synthetic.space().seeds())
    assert result.score < start / 20  # far better than every seed
    assert best.critical_dim == target.critical_dim
    worst = max(abs(math.log(a / b)) for a, b in zip(best.factors, target.factors))
    assert worst < 0.08  # every factor within 8% of the optimum's
    assert list(result.history) == sorted(result.history, reverse=True)  # the best so far never gets worse


def test_same_seed_same_result_other_seed_other_path():
    first, _ = run()
    again, _ = run()
    other, _ = run(SearchConfig(**{**search_worker.CONFIG, "seed": 6}))
    assert first.log == again.log and first.best == again.best
    assert [c for c, _ in first.log] != [c for c, _ in other.log]


class Killed(Exception):
    pass


class DiesAfter(synthetic.Distance):
    def __init__(self, calls: int) -> None:
        super().__init__()
        self.limit = calls

    def __call__(self, table):
        if self.calls == self.limit:
            raise Killed
        return super().__call__(table)


@pytest.mark.parametrize("kill_at", [1, 7, 12, 30])
def test_resume_after_an_interruption_equals_an_uninterrupted_search(tmp_path, kill_at):
    whole, whole_objective = run()
    log = tmp_path / "log.jsonl"
    with pytest.raises(Killed):
        run(log_path=log, objective=DiesAfter(kill_at))
    resumed, objective = run(log_path=log)
    assert resumed.reused == kill_at  # every evaluation before the kill came from the log...
    assert objective.calls == whole_objective.calls - kill_at  # ...and none was repeated
    assert resumed.log == whole.log and resumed.best == whole.best and resumed.score == whole.score
    assert resumed.history == whole.history
    # A third run finds everything in the log.
    third, objective = run(log_path=log)
    assert objective.calls == 0 and third.best == whole.best


@pytest.mark.parametrize(
    "cut",
    ['{"kind": "evaluation", "key": "[20, [4.0', '{"kind": "evalu\u00e9'.encode("utf-8")[:-1].decode("latin-1"), "{"],
)
def test_a_line_cut_short_by_a_kill_is_repaired_and_the_log_resumed_twice(tmp_path, capsys, cut):
    log = tmp_path / "log.jsonl"
    with pytest.raises(Killed):
        run(log_path=log, objective=DiesAfter(5))
    with open(log, "a", encoding="latin-1") as f:
        f.write(cut)  # the process died mid-write
    whole, _ = run()
    resumed, objective = run(log_path=log)
    assert "repaired" in capsys.readouterr().err
    assert resumed.reused == 5 and objective.calls == whole.evaluations - 5  # the cut evaluation ran again
    assert resumed.log == whole.log and resumed.best == whole.best and resumed.history == whole.history
    text = log.read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())  # no cut line left
    assert len(text.splitlines()) == 1 + whole.evaluations
    again, objective = run(log_path=log)  # the rerun that used to fail
    assert objective.calls == 0 and again.log == whole.log and again.best == whole.best


def test_a_cut_header_and_a_record_short_of_its_newline_are_repaired(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"kind": "header", "form')  # killed while writing the header
    whole, _ = run()
    assert run(log_path=log)[0].log == whole.log
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:4]) + lines[4].rstrip("\n"))  # a whole record, killed before its newline
    resumed, objective = run(log_path=log)
    assert resumed.reused == 4 and objective.calls == whole.evaluations - 4 and resumed.log == whole.log
    assert all(json.loads(line) for line in log.read_text().splitlines())
    assert run(log_path=log)[1].calls == 0


def test_a_log_an_earlier_version_appended_after_a_cut_line_still_resumes(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    with pytest.raises(Killed):
        run(log_path=log, objective=DiesAfter(6))
    lines = log.read_text().splitlines(keepends=True)
    lines[3] = lines[3][:30] + "\n"  # the old append-after-a-cut-line damage: a cut record mid-log
    log.write_text("".join(lines))
    resumed, objective = run(log_path=log)
    assert "cut short" in capsys.readouterr().err
    assert resumed.reused == 5 and resumed.log == run()[0].log


def _fingerprint(**changes):
    return {"model": "tiny", "weights_sha256": "ab" * 32, "samples": 2, "eval_length": 320, **changes}


@pytest.mark.parametrize(
    "field,changes",
    [("model", dict(model="other")), ("weights_sha256", dict(weights_sha256="cd" * 32)), ("samples", dict(samples=3)),
     ("eval_length", dict(eval_length=None)), ("dtype", dict(dtype="bfloat16"))],
)  # fmt: skip
def test_a_log_of_another_objective_is_refused_naming_the_field(tmp_path, field, changes):
    log = tmp_path / "log.jsonl"
    with pytest.raises(Killed):
        run(log_path=log, objective=DiesAfter(7), fingerprint=_fingerprint())
    before = log.read_bytes()
    with pytest.raises(ValueError, match=rf"objective\.{field} is .* in the log and .* in this run") as error:
        run(log_path=log, fingerprint=_fingerprint(**changes))
    assert str(log) in str(error.value) and "--fresh" in str(error.value) and "nothing is deleted" in str(error.value)
    assert log.read_bytes() == before  # refused logs are left as they are
    with pytest.raises(ValueError, match="objective fingerprint recorded in the log, not given"):
        run(log_path=log)
    resumed, objective = run(log_path=log, fingerprint=_fingerprint())  # the right objective resumes it
    assert resumed.reused == 7 and resumed.log == run()[0].log


def test_a_log_without_its_header_is_refused(tmp_path):
    log = tmp_path / "log.jsonl"
    with pytest.raises(Killed):
        run(log_path=log, objective=DiesAfter(4), fingerprint=_fingerprint())
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[1:]))  # the header line removed
    for fingerprint in (_fingerprint(), None):
        with pytest.raises(ValueError, match="does not start with a search-log header"):
            run(log_path=log, fingerprint=fingerprint)
    log.write_text("".join(lines))
    Path(f"{log}.rank1").write_text(lines[2])  # a shard without a header
    with pytest.raises(ValueError, match=r"log\.jsonl\.rank1 does not start with a search-log header"):
        run(log_path=log, fingerprint=_fingerprint())


def test_a_log_of_an_earlier_version_resumes_only_without_a_fingerprint(tmp_path):
    log = tmp_path / "log.jsonl"
    with pytest.raises(Killed):
        run(log_path=log, objective=DiesAfter(4))
    lines = log.read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    del header["version"], header["objective"]  # what lr2kernels wrote before the objective was recorded
    log.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    with pytest.raises(ValueError, match="earlier lr2kernels that did not record the objective"):
        run(log_path=log, fingerprint=_fingerprint())
    resumed, _ = run(log_path=log)  # nothing to match but the space and config, as before
    assert resumed.reused == 4


def test_a_log_of_another_search_is_refused_and_moved_aside_not_deleted(tmp_path):
    log = tmp_path / "log.jsonl"
    small = SearchConfig(population=4, parents=2, mutations=1, crossovers=1, iterations=1)
    run(config=small, log_path=log)
    with pytest.raises(ValueError, match=r"different search: search\.config\.population is 4 in the log and 12"):
        run(log_path=log)
    Path(f"{log}.rank1").write_text("shard\n")
    before = log.read_bytes()
    moved = move_log_aside(log)
    assert moved.parent == tmp_path and moved.name.startswith("log.jsonl.old-")
    assert not log.exists() and not Path(f"{log}.rank1").exists()
    assert moved.read_bytes() == before and Path(f"{moved}.rank1").read_text() == "shard\n"
    run(config=small, log_path=log)
    second = move_log_aside(log)
    assert second != moved and moved.exists() and second.exists()  # the first backup is kept
    assert move_log_aside(log) is None  # nothing left to move
    Path(f"{moved}.rank1").unlink()
    assert run(config=small, log_path=moved)[1].calls == 0  # a moved-aside log still resumes under its new name


def test_nan_scores_rank_last():
    def objective(table):
        return math.nan if table.long_factor[-1] > 6.0 else synthetic.Distance()(table)

    result = evolutionary_search(objective, synthetic.space(), CONFIG)
    assert not math.isnan(result.score)
    assert any(math.isnan(s) for _, s in result.log)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(population=0), "population"),
        (dict(parents=0), "parents"),
        (dict(mutations=0, crossovers=0), "mutations"),
        (dict(mutation_prob=0.0), "mutation_prob"),
        (dict(mutation_step=2.0), "mutation_step"),
        (dict(iterations=-1), "iterations"),
    ],
)
def test_bad_config(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SearchConfig(**kwargs)


def test_bad_arguments():
    with pytest.raises(TypeError, match="objective_fingerprint"):
        evolutionary_search(synthetic.Distance(), synthetic.space(), CONFIG, objective_fingerprint=["x"])
    with pytest.raises(TypeError, match="objective_fingerprint"):
        evolutionary_search(synthetic.Distance(), synthetic.space(), CONFIG, objective_fingerprint={"x": object()})
    with pytest.raises(TypeError, match="space"):
        evolutionary_search(synthetic.Distance(), "space", CONFIG)
    with pytest.raises(TypeError, match="config"):
        evolutionary_search(synthetic.Distance(), synthetic.space(), {"population": 4})


# ---------------------------------------------------------------------------------------------------- processes
def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def test_sigkill_and_resume_in_a_real_process(tmp_path):
    log, out = tmp_path / "log.jsonl", tmp_path / "out"
    command = [sys.executable, str(WORKER), str(out), str(log), "0.05"]
    process = subprocess.Popen(command, env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 9):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    logged = len([line for line in log.read_text().splitlines() if '"evaluation"' in line])
    assert 8 <= logged < CONFIG.budget
    subprocess.run([sys.executable, str(WORKER), str(out), str(log)], env=_env(), check=True, timeout=120)
    resumed = json.loads(Path(f"{out}.rank0.json").read_text())
    whole, _ = run()
    assert resumed["reused"] == logged and resumed["calls"] == whole.evaluations - logged
    assert resumed["best"] == whole.best.to_dict() and resumed["score"] == whole.score
    assert resumed["log"] == [[c.key, s] for c, s in whole.log]


def test_two_gloo_processes_under_torchrun_equal_one_process(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(WORKER), str(out), str(log)]  # fmt: skip
    subprocess.run(command, env=_env(), check=True, timeout=180, capture_output=True)
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    whole, _ = run()
    expected = [[c.key, s] for c, s in whole.log]
    for rank in ranks:
        assert rank["best"] == whole.best.to_dict() and rank["score"] == whole.score
        assert rank["log"] == expected
    # The work was shared: neither process evaluated everything, together they evaluated each candidate once.
    assert 0 < ranks[0]["calls"] < whole.evaluations and ranks[0]["calls"] + ranks[1]["calls"] == whole.evaluations
    # Both processes logged (rank 1 to its own shard); one process resumes from the shards with nothing to do.
    assert Path(f"{log}.rank1").exists()
    header = {"space": synthetic.space().to_dict(), "config": search_worker.CONFIG | {"mutation_prob": 0.3,
              "mutation_step": 0.1}}  # fmt: skip
    assert len(SearchLog(log, header, 0).read()) == whole.evaluations
    resumed, objective = run(log_path=log)
    assert objective.calls == 0 and resumed.best == whole.best
