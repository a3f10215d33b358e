import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lr2kernels.search import SearchConfig, SearchLog, delete_log, evolutionary_search
from tests.search import search_worker, synthetic
from tests.search.conftest import free_port

WORKER = Path(search_worker.__file__)
CONFIG = SearchConfig(**search_worker.CONFIG)


def run(config=CONFIG, log_path=None, objective=None):
    objective = objective or synthetic.Distance()
    return evolutionary_search(objective, synthetic.space(), config, log_path=log_path), objective


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


def test_a_line_cut_short_by_a_kill_is_ignored(tmp_path):
    log = tmp_path / "log.jsonl"
    with pytest.raises(Killed):
        run(log_path=log, objective=DiesAfter(5))
    with open(log, "a") as f:
        f.write('{"kind": "evaluation", "key": "[20, [4.0')  # the process died mid-write
    resumed, objective = run(log_path=log)
    whole, _ = run()
    assert resumed.reused == 5 and resumed.best == whole.best
    lines = log.read_text().splitlines()
    assert all(json.loads(line) for line in lines[:5] + lines[7:])  # later records start on a fresh line


def test_a_log_of_another_search_is_refused(tmp_path):
    log = tmp_path / "log.jsonl"
    run(config=SearchConfig(population=4, parents=2, mutations=1, crossovers=1, iterations=1), log_path=log)
    with pytest.raises(ValueError, match="different search"):
        run(log_path=log)
    delete_log(log)
    assert not log.exists()
    run(config=SearchConfig(population=4, parents=2, mutations=1, crossovers=1, iterations=1), log_path=log)


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
