"""Benchmark plumbing shared by the suites: timers, the environment stamp, table / CSV / PNG output."""

from __future__ import annotations

import csv
import datetime
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def time_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()``: ``triton.testing.do_bench`` on a GPU, a plain timer on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=max(25, reps * 10)))  # type: ignore
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[len(samples) // 5], samples[(4 * len(samples)) // 5]


class PeakMemory:
    """Peak memory of a block in MB: CUDA allocator peak on a GPU, sampled process RSS above the start on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mb = device, 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        process = psutil.Process()
        self._base, self._peak, self._stop = process.memory_info().rss, 0, threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, process.memory_info().rss)
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(0, self._peak - self._base) / 2**20


def environment(device: torch.device) -> dict[str, str]:
    """Device name, versions, git commit and UTC date stamped on every CSV row."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        import platform

        name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print(" | ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(row.get(c, "")).rjust(w) for c, w in zip(columns, widths)))


def append_csv(rows: Sequence[dict], path: Path) -> None:
    """Append rows (a header first when the file is new or its columns changed)."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0].keys())
    if path.exists():
        with open(path) as f:
            header = f.readline().strip().split(",")
        if header != fields:
            path = path.with_name(f"{path.stem}-{len(fields)}cols{path.suffix}")
    new_file = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def plot_vs_length(rows: Sequence[dict], path: Path, title: str, value: str = "ms", ylabel: str = "ms") -> bool:
    """One panel per ``mode``: ``value`` against ``seq`` per provider (log-log), plus each lr2 provider's ratio to
    the best baseline. Returns False (and says why) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib, or the [bench] extra)")
        return False
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(2, len(modes), figsize=(4.5 * len(modes), 7), squeeze=False)
    for column, mode in enumerate(modes):
        ax, ratio_ax = axes[0][column], axes[1][column]
        mode_rows = [r for r in rows if r["mode"] == mode]
        for provider in dict.fromkeys(r["provider"] for r in mode_rows):
            points = sorted((r["seq"], r[value]) for r in mode_rows if r["provider"] == provider)
            ax.plot(*zip(*points), marker="o", label=provider)
            ratios = sorted((r["seq"], r["ratio"]) for r in mode_rows if r["provider"] == provider and r.get("ratio"))
            if ratios:
                ratio_ax.plot(*zip(*ratios), marker="o", label=provider)
        ax.set(title=mode, xlabel="sequence length", ylabel=ylabel, xscale="log", yscale="log")
        ax.legend(fontsize=7)
        ratio_ax.axhline(1.0, color="gray", linewidth=0.8)
        ratio_ax.set(xlabel="sequence length", ylabel="ours / best baseline (<1: faster)", xscale="log")
        if ratio_ax.lines[1:]:
            ratio_ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
