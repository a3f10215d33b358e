"""What the apps (``cli``, ``demo``, ``bench``, ``search_job``) share: their common options, the device and dtype
they default to, loading a model without the loaders' progress bars, timers and console tables."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from lr2kernels.hf.progress import Heartbeat

__all__ = ["Heartbeat"]  # re-exported: the apps' progress lines (lr2kernels.hf.progress, shared with train)

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------- options
def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="smollm2 (default), a local HF model folder or a .gguf")


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default None: :func:`device_from` picks cuda if available)."""
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def add_out_option(parser: argparse.ArgumentParser, default: str, what: str) -> None:
    parser.add_argument("--out", default=default, help=f"output folder: {what} (default {default})")


RESULTS_ROOT = "lr2kernels-results"


def fresh_results_folder() -> str:
    """A new folder name under ./lr2kernels-results for a run's results: a run never appends to or overwrites the
    results of another (e.g. the tracked benchmarks/results the README cites) unless ``--out`` says so."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = Path(RESULTS_ROOT) / stamp, 1
    while candidate.exists():
        n += 1
        candidate = Path(RESULTS_ROOT) / f"{stamp}-{n}"
    return str(candidate)


def check_model_device_backend(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors for ``--model``, ``--device`` and ``--backend``, before anything is loaded."""
    if args.model != "smollm2" and not Path(args.model).exists():
        parser.error(f"--model: expected 'smollm2', a local HF model folder or a .gguf file, got {args.model!r}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device: expected cpu or cuda, got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device: {args.device!r} asked for, but torch {torch.__version__} sees no CUDA device")
    if getattr(args, "backend", None) is not None and args.backend not in ("torch", "triton", "cuda"):
        parser.error(f"--backend: expected torch, triton or cuda, got {args.backend!r}")


def check_writable_folder(parser: argparse.ArgumentParser, option: str, folder: str, purpose: str) -> None:
    """A usage error unless ``folder`` exists or can be made, and can be written to (probed with a file)."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe = Path(folder) / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        parser.error(f"{option}: expected a folder {purpose}, got {folder!r} ({error.strerror or error})")


def device_from(arg: str | None) -> torch.device:
    """The ``--device`` argument as a device; None: cuda if torch sees one, else cpu."""
    return torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))


def default_dtype(device: torch.device) -> torch.dtype:
    """The apps' model dtype unless told otherwise: bfloat16 on a GPU, float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu (<arch>, <n> threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------------- loading
_PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+ \[")


@contextlib.contextmanager
def progress_bars_dropped() -> Iterator[None]:
    """Leaves progress bars (tqdm lines) written to ``sys.stderr`` inside the block out of the output.

    Only what is written to ``sys.stderr`` is captured; every line that is not a progress bar is passed on when the
    block ends (logging handlers keep the stream they were made with and are not affected at all).
    """
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        kept = [line for line in re.split(r"[\r\n]", captured.getvalue()) if line and not _PROGRESS_BAR.search(line)]
        if kept:
            print("\n".join(kept), file=sys.stderr, flush=True)


def load_model_quietly(name: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """:func:`lr2kernels.hf.models.load_model` without the GGUF reader's and transformers' progress bars."""
    from lr2kernels.hf.models import load_model

    with progress_bars_dropped():
        return load_model(name, device, dtype)


# ---------------------------------------------------------------------------------------------------- progress
def random_model(config_path: str, device: torch.device, dtype: torch.dtype):
    """A model of a real config.json at random weights (speed needs no trained weights), in training mode: the
    benchmarks' way to time real shapes (Llama-3-8B, Phi-4-mini) where the weights cannot be had."""
    import json

    import transformers

    data = {k: v for k, v in json.loads(Path(config_path).read_text()).items() if not k.startswith("_")}
    config = transformers.CONFIG_MAPPING[data["model_type"]](**data)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.train()


# ---------------------------------------------------------------------------------------------------- timers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """(``fn()``, its wall seconds), the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall seconds of ``reps`` calls of ``fn()``."""
    return statistics.median(timed(fn, device)[1] for _ in range(reps))


def time_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()``: ``triton.testing.do_bench`` on a GPU, a plain timer on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=max(25, reps * 10)))  # type: ignore
    for _ in range(warmup):
        fn()
    samples = sorted(timed(fn, device)[1] * 1e3 for _ in range(reps))
    return statistics.median(samples), samples[len(samples) // 5], samples[(4 * len(samples)) // 5]


# ---------------------------------------------------------------------------------------------------- console
def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """``rows`` (dicts) as a ``|``-separated table of ``columns``, each as wide as its widest cell."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print(" | ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(row.get(c, "")).rjust(w) for c, w in zip(columns, widths)))


def table_row(cells: Sequence[object], widths: Sequence[int]) -> str:
    """One line of a fixed-width table: the first cell left-aligned, the others right-aligned."""
    first, *others = (str(cell) for cell in cells)
    return first.ljust(widths[0]) + "".join(cell.rjust(width) for cell, width in zip(others, widths[1:]))
