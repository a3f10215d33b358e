"""What the benchmark suites share beyond :mod:`lr2kernels.apps.common`: their common options, peak memory, the
environment stamp on every row, CSV and PNG output."""

from __future__ import annotations

import argparse
import csv
import datetime
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lr2kernels.apps.common import add_device_option, add_out_option, device_name, fresh_results_folder, print_table


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


def add_options(parser: argparse.ArgumentParser) -> None:
    """The options every suite reads: ``--device``, ``--out``, ``--quick``, ``--reps``."""
    add_device_option(parser)
    add_out_option(parser, fresh_results_folder(), "CSV rows are appended there, PNGs written")
    parser.add_argument("--quick", action="store_true", help="a few sizes, few repetitions")
    parser.add_argument(
        "--reps", type=int, default=None, help="timed repetitions, median (default: by suite, device and --quick)"
    )


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
    return {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def append_csv(rows: Sequence[dict], path: Path) -> Path:
    """Append rows (a header first when the file is new); a sibling ``<stem>-<n>cols.csv`` when the file's columns
    differ. Returns the file written."""
    if not rows:
        return path
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
    return path


def show_and_append(rows: Sequence[dict], columns: Sequence[str], path: Path) -> Path:
    """A suite's rows: ``columns`` as a console table, every column appended to the CSV ``path`` (:func:`append_csv`),
    and where they went."""
    print_table(rows, columns)
    written = append_csv(rows, path)
    print(f"appended {len(rows)} rows to {written}")
    return written


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend; None (saying so) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib, or the [bench] extra)")
        return None
    return plt


def save_figure(fig, path: Path, title: str) -> None:
    """Title, tight layout, ``path`` (PNG, folders made), then the figure is closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_vs_length(rows: Sequence[dict], path: Path, title: str, value: str = "ms", ylabel: str = "ms") -> bool:
    """One panel per ``mode``: ``value`` against ``seq`` per provider (log-log), plus each lr2 provider's ratio to
    the best baseline. Returns False (and says why) when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
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
    save_figure(fig, path, title)
    return True
