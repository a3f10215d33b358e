"""The GPU check's dry run (benchmarks/gpu_check.py): its plan fits one 10-minute command, most valuable part first,
every bench command's options pass its own parser, every pytest selection collects, and the correctness selection
has bf16 cases of the Triton forward, backward and decode. Also its runner, on stand-in commands: limits, SIGINT
then SIGKILL, a background step joined in time, blocked and missing steps, the summary written as it goes.

Runs on any machine, GPU or not (nothing here runs a kernel)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from lr2kernels.ops import dispatch
from lr2kernels.ops.calls import CallSpec

ROOT = Path(__file__).resolve().parents[1]


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("lr2_gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


def test_the_default_plan_fits_one_command_and_every_step_starts():
    steps = gpu_check.select(gpu_check.PLAN, None)
    print(gpu_check.format_plan(steps, gpu_check.BUDGET_S))
    assert gpu_check.check_plan(steps, gpu_check.BUDGET_S) == []
    # One command of the device tool (600 s at most) with room for the interpreter's start and the summary.
    assert gpu_check.BUDGET_S <= 540
    assert sum(step.limit_s for step in steps if not step.background) <= gpu_check.BUDGET_S
    # Most valuable first: correctness, kernel timings, decode bandwidth, end to end; the CUDA extension's kernels
    # (never run on a GPU yet, so isolated in their own processes) after them.
    foreground = [step.name for step in steps if not step.background]
    assert foreground == ["env", "correctness", "kernels", "decode", "e2e", "cuda_tests", "cuda_decode"]
    (build,) = [step for step in steps if step.background]
    assert build.name == "cuda_build" and build.join_before == "kernels"  # built beside the correctness step
    assert all("-x" not in step.options for step in steps if step.is_pytest)  # one failure must not stop the rest


def test_the_steps_outside_the_default_plan_each_fit_one_command():
    optional = [step for step in gpu_check.PLAN if not step.default]
    assert optional
    # Each alone, its options through its parser; not collected (ops_suite is the whole of tests/ops).
    for step in optional:
        assert gpu_check.check_plan([step], gpu_check.BUDGET_S, collect=False) == [], step.name


@pytest.mark.parametrize("op", ["rope_attention", "rope_decode", "apply_rope", "rerotate"])
def test_the_correctness_cases_run_in_bf16_on_a_gpu(op):
    # The interpreter declines bf16 attention, so on the CPU those cases skip; on a GPU the backend must take them.
    assert dispatch.get_backend("triton").supports(CallSpec(op, torch.device("cuda"), torch.bfloat16, 128, False))[0]


def test_the_dry_run_reports_broken_plans():
    steps = {step.name: step for step in gpu_check.PLAN}
    broken_options = gpu_check.dataclasses.replace(steps["kernels"], options=("--modes", "forward"))
    late = gpu_check.dataclasses.replace(steps["cuda_tests"], after=("cuda_decode",))
    missing_config = gpu_check.dataclasses.replace(steps["e2e"], options=("--config", "no/such/config.json"))
    problems = gpu_check.check_plan([broken_options, late, missing_config, steps["cuda_decode"]], 100, collect=False)
    text = "\n".join(problems)
    assert "the foreground limits add up to 290 s, over the 100 s budget" in text
    assert "kernels: lr2kernels.apps.bench.parse_args refused the options (exit 2" in text
    assert "cuda_tests: runs after 'cuda_decode', which is not an earlier step of the plan" in text
    assert "e2e: --config no/such/config.json does not exist" in text
    assert "cuda_decode: runs after 'cuda_build'" in text


def test_step_selection_names_what_it_expected():
    with pytest.raises(ValueError, match=r"--steps: expected names from \[.*'kernels'.*\], got unknown \['kernel'\]"):
        gpu_check.select(gpu_check.PLAN, ["kernel"])
    assert [s.name for s in gpu_check.select(gpu_check.PLAN, ["e2e", "kernels"])] == ["kernels", "e2e"]  # plan order
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--steps", "kernel", "--dry-run"])
    assert stop.value.code == 2


def test_a_machine_without_a_gpu_is_told_to_dry_run(monkeypatch, tmp_path, capsys):
    def no_gpu():
        raise RuntimeError("no CUDA GPU here (nvidia-smi and torch found none)")

    monkeypatch.setattr(gpu_check, "device_arch", no_gpu)
    assert gpu_check.main(["--out", str(tmp_path), "--steps", "env"]) == 2
    assert "--dry-run` checks the plan on any machine" in capsys.readouterr().err


def _python_step(name: str, code: str, limit_s: int, **kwargs):
    return gpu_check.Step(name, f"stand-in {name}", ("-c",), (code,), limit_s, (f"{name}.log",), **kwargs)


def test_the_runner_limits_joins_blocks_and_summarises(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "GRACE_S", 1)
    interruptible = (
        "import time\ntry:\n    time.sleep(60)\n"
        "except KeyboardInterrupt:\n    print('interrupted, reporting', flush=True)\n    raise"
    )
    steps = [
        _python_step("build", "import time; time.sleep(1); print('built')", 10, background=True, join_before="uses"),
        _python_step("good", "print('result row')", 10),
        _python_step("bad", "import sys; sys.exit(3)", 10),
        _python_step("slow", interruptible, 3),
        _python_step("deaf", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)", 3),
        _python_step("uses", "print('used the build')", 10, after=("build",)),
        _python_step("after_bad", "print('never')", 10, after=("bad",)),
        _python_step("needs", "print('never')", 10, requires=("no_such_module_for_the_gpu_check",)),
    ]
    started = time.monotonic()
    ok = gpu_check.Runner(steps, tmp_path, budget_s=60, env=dict(os.environ)).run()
    assert not ok
    assert time.monotonic() - started < 20  # 3 s limits held: the SIGINT-deaf step was killed
    results = json.loads((tmp_path / "summary.json").read_text())
    status = {name: result["status"] for name, result in results.items()}
    assert status["build"] == status["good"] == status["uses"] == "ok"
    assert status["bad"] == "FAILED (exit 3)"
    assert status["slow"].startswith("TIMED OUT") and status["deaf"].startswith("TIMED OUT")
    assert status["after_bad"] == "BLOCKED (bad did not succeed)"
    assert status["needs"].startswith("MISSING no_such_module_for_the_gpu_check (python -m pip install")
    assert "interrupted, reporting" in (tmp_path / "slow.log").read_text()  # SIGINT first: the step could report
    assert "result row" in (tmp_path / "good.log").read_text()
    assert results["good"]["outputs"] == {"good.log": f"{(tmp_path / 'good.log').stat().st_size} B"}
    summary = (tmp_path / "summary.md").read_text()
    assert "| bad | FAILED (exit 3) |" in summary and "| uses | ok |" in summary


def test_the_runner_stops_at_the_budget(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "GRACE_S", 1)
    steps = [_python_step("first", "import time; time.sleep(30)", 30), _python_step("second", "print(1)", 10)]
    started = time.monotonic()
    # The first step gets the 7 s of the budget, not its 30; the second, with under MIN_STEP_S left, never starts.
    assert not gpu_check.Runner(steps, tmp_path, budget_s=7, env=dict(os.environ)).run()
    assert time.monotonic() - started < 12
    results = json.loads((tmp_path / "summary.json").read_text())
    assert results["first"]["status"].startswith("TIMED OUT")
    assert results["second"]["status"] == "NOT RUN (the budget is spent)"
