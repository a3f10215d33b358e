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
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option that takes a value ends its help with its default, ``(default: ...)``, unless the text already
    says it (a default computed at run time, e.g. ``(default: cuda if available)``); flags are off by default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.nargs == 0 or action.default is None:
            return text
        if action.default is argparse.SUPPRESS:
            return text
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def make_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A command's parser: defaults shown (:class:`HelpFormatter`), no reST markup in the text (docstrings' double
    backticks are for the API docs, not a terminal)."""
    plain = lambda text: text.replace("``", "") if text else text  # noqa: E731
    return argparse.ArgumentParser(
        prog=prog, description=plain(description), epilog=plain(epilog), formatter_class=HelpFormatter
    )


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """A usage error for the first option among ``names`` (attribute names) whose value, or one of whose values
    (``nargs`` lists), is below 1; None (not given) passes."""
    for name in names:
        value = getattr(args, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v is not None and v < 1 for v in values):
            shown = " ".join(map(str, values)) if isinstance(value, (list, tuple)) else value
            plural = "positive integers" if isinstance(value, (list, tuple)) else "a positive integer"
            parser.error(f"--{name.replace('_', '-')}: expected {plural}, got {shown}")


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="smollm2 (embedded SmolLM2-135M), a local HF model folder "
                        "or a .gguf file")  # fmt: skip


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default None: :func:`device_from` picks cuda if available)."""
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def add_out_option(parser: argparse.ArgumentParser, default: str, what: str) -> None:
    parser.add_argument("--out", default=default, help=f"output folder: {what} (default: {default})")


def model_config(name: str) -> dict:
    """The model's config as a ``config.json`` dict, read cheaply (for usage errors before the weights load): a HF
    folder's ``config.json``; for a GGUF file its header's metadata (:func:`gguf_config`), through transformers only
    where that header holds RoPE scaling this reader does not map."""
    import json

    from lr2kernels.hf.models import DEFAULT_MODEL, SMOLLM2_GGUF, smollm2_dir

    path = smollm2_dir() / SMOLLM2_GGUF if name == DEFAULT_MODEL else Path(name)
    if path.is_dir() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"model: expected a folder with config.json or one .gguf file, got {name}")
        path = ggufs[0]
    config = gguf_config(path)
    if config is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig

        loaded = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        config = loaded.to_dict()
    return config


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file's header (arrays skipped, as None): a few ms, where gguf's own reader
    decodes every array (a 49K-token vocabulary: seconds)."""
    import struct

    with open(path, "rb") as f:
        data = f.read(1 << 22)  # the header; a vocabulary array larger than this is read on demand below

        def need(end: int) -> None:
            nonlocal data
            while end > len(data):
                more = f.read(max(1 << 22, end - len(data)))
                if not more:
                    raise ValueError(f"model: {path} ends inside its GGUF header")
                data += more

        def scalar(kind: int, at: int) -> tuple[Any, int]:
            if kind == 8:  # string
                need(at + 8)
                (length,) = struct.unpack_from("<Q", data, at)
                need(at + 8 + length)
                return data[at + 8 : at + 8 + length].decode("utf-8", "replace"), at + 8 + length
            fmt = _GGUF_SCALARS[kind]
            need(at + struct.calcsize(fmt))
            return struct.unpack_from(fmt, data, at)[0], at + struct.calcsize(fmt)

        need(24)
        if data[:4] != b"GGUF":
            raise ValueError(f"model: expected a GGUF file, {path} does not start with GGUF")
        _, _, count = struct.unpack_from("<IQQ", data, 4)
        at, fields = 24, {}
        for _ in range(count):
            key, at = scalar(8, at)
            need(at + 4)
            (kind,) = struct.unpack_from("<I", data, at)
            at += 4
            if kind == 9:  # array: element kind, count, elements
                need(at + 12)
                element, length = struct.unpack_from("<IQ", data, at)
                at += 12
                if element == 8:
                    for _ in range(length):
                        _, at = scalar(8, at)
                else:
                    at += length * struct.calcsize(_GGUF_SCALARS[element])
                fields[key] = None
            else:
                fields[key], at = scalar(kind, at)
    return fields


_GGUF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}


def gguf_config(path: Path) -> dict | None:
    """The RoPE-relevant part of a GGUF model's config, as transformers names it; None for an architecture or a
    RoPE scaling this does not map (the caller then asks transformers)."""
    fields = gguf_metadata(path)
    arch = fields.get("general.architecture")
    if arch not in _GGUF_MODEL_TYPES or fields.get(f"{arch}.rope.scaling.type", "none") != "none":
        return None
    get = lambda key: fields.get(f"{arch}.{key}")  # noqa: E731
    hidden, heads = get("embedding_length"), get("attention.head_count")
    if not (hidden and heads and get("context_length")):
        return None
    head_dim = get("attention.key_length") or hidden // heads
    config = {
        "model_type": _GGUF_MODEL_TYPES[arch], "max_position_embeddings": int(get("context_length")),
        "hidden_size": int(hidden), "num_attention_heads": int(heads), "head_dim": int(head_dim),
        "rope_theta": float(get("rope.freq_base") or 10000.0),
    }  # fmt: skip
    rotary = get("rope.dimension_count")
    if rotary and int(rotary) != head_dim:
        config["partial_rotary_factor"] = int(rotary) / head_dim
    return config


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


TABLE_FILE = "table.json"  # what lr2kernels search writes; finetune and serve read it


def table_path(value: str) -> Path:
    """A ``table.json``, or the output folder of ``lr2kernels search`` (which holds one)."""
    path = Path(value)
    return path / TABLE_FILE if path.is_dir() else path


def load_table_argument(parser: argparse.ArgumentParser, value: str):
    """``--table``'s RopeTable, or exit 2 with one line naming the option (before anything slow is loaded)."""
    from lr2kernels.tables import RopeTable

    path = table_path(value)
    if not path.is_file():
        parser.error(f"--table: expected a {TABLE_FILE} or a folder holding one, got {value!r} (not found)")
    try:
        return RopeTable.load(path)
    except (ValueError, TypeError, OSError) as error:
        parser.error(f"--table: {path} is not a usable table: {error}")
