"""Quality of a mixed context window finetune, before and after: long-context retrieval and short-text perplexity.

LongRoPE2's claim: mixed context window training improves the long context while retaining >= 97% of the model's
short-context performance. This benchmark measures both sides on one model, on the CPU or a GPU:

- **long**: needle loss (mean loss of the answer tokens, :class:`lr2kernels.search.NeedleEvaluator`) and greedy
  passkey accuracy at ``--length`` tokens, with the searched table;
- **short**: perplexity of held-out text, ``--short-length`` tokens from each of ``--held-out`` documents the
  finetune never sees (the same domain as the training text, so a finetune may lower it), and of the package's
  English essay (another domain: what general short-text skill is retained);
- for the base model with its own RoPE (short text only: it is what the finetune must retain), the base model with
  the searched table, and the finetuned model with the table (evaluated as stock transformers loads the exported
  folder: the table's short factors up to L0, its long factors past it).

Data: the Python reference manual that ships with every CPython (``pydoc_data.topics``: about 80 topics, 113K
SmolLM2 tokens of English technical prose), so that the run needs no download and anyone can repeat it. Short
documents are the topics themselves (those of at most L0 tokens); long documents are the manual's topics read end
to end (seeded order), cut into pieces of ``--seq-len`` tokens. ``lr2kernels.train`` packs them with the paper's
short:long mix (``--long-fraction``).

Run: ``python benchmarks/bench_quality.py --table benchmarks/results/search_smollm2_16k/table.json --steps 12``
(the finetune's folder, ``--job``, holds checkpoints: rerunning after a kill resumes the finetune).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

import lr2kernels as lr2
from lr2kernels.apps.bench.report import environment, pyplot, save_figure, show_and_append
from lr2kernels.apps.common import (
    Heartbeat,
    add_device_option,
    add_model_option,
    add_out_option,
    device_from,
    fresh_results_folder,
    load_model_quietly,
    make_parser,
)
from lr2kernels.search.evaluate import NeedleEvaluator, PasskeyEvaluator
from lr2kernels.search.needle import needle_samples, package_text, passkey_samples
from lr2kernels.tables import RopeTable
from lr2kernels.train.finetune import FinetuneSettings, finetune

COLUMNS = ["model", "rope", "short_ppl", "short_retained", "essay_ppl", "essay_retained", "needle_loss", "needle_acc",
           "passkey_acc", "steps", "trained_tokens", "seconds"]  # fmt: skip


def manual_documents(
    tokenizer: Any, *, original_length: int, seq_len: int, held_out: int, short_length: int, seed: int = 0
) -> tuple[list[list[int]], list[list[int]]]:
    """(training documents, held-out texts) from the Python reference manual (``pydoc_data.topics``).

    Held out: ``held_out`` topics of at least ``short_length`` tokens (seeded choice), their first ``short_length``
    tokens each; they appear nowhere in the training documents. Training: every other topic of at most
    ``original_length`` tokens as a short document, then the other topics read end to end (seeded order) and cut into
    pieces of ``seq_len`` tokens (the last piece joins the one before when it would be too short to be long).
    """
    import pydoc_data.topics

    if seq_len <= original_length:
        raise ValueError(f"seq_len: expected more than L0 = {original_length} (long documents), got {seq_len}")
    rng = random.Random(seed)
    names = sorted(pydoc_data.topics.topics)
    tokens = {name: tokenizer(pydoc_data.topics.topics[name], add_special_tokens=False)["input_ids"] for name in names}
    candidates = [name for name in names if len(tokens[name]) >= short_length]
    if len(candidates) < held_out:
        raise ValueError(f"held_out: only {len(candidates)} topics have {short_length} tokens, asked for {held_out}")
    kept_out = set(rng.sample(candidates, held_out))
    texts = [list(tokens[name][:short_length]) for name in sorted(kept_out)]
    training = [name for name in names if name not in kept_out]
    short = [list(tokens[name]) for name in training if len(tokens[name]) <= original_length]
    order = training[:]
    rng.shuffle(order)
    stream = [token for name in order for token in tokens[name]]
    long = [stream[start : start + seq_len] for start in range(0, len(stream), seq_len)]
    if len(long) > 1 and len(long[-1]) <= original_length:
        long[-2] = long[-2] + long.pop()  # longer than seq_len: packing splits it into seq_len pieces
    return short + long, texts


@torch.no_grad()
def short_text_perplexity(model: torch.nn.Module, texts: list[list[int]]) -> float:
    """Perplexity of the texts (every token but each text's first), the model as it stands (patched or not)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([text], device=device)  # [1, L]
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # [L-1, V]
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += len(text) - 1
    return math.exp(total / count)


def _long_scores(model, table: RopeTable, tokenizer, length: int, samples: int, seed: int) -> dict[str, float]:
    depths = [0.5 * (i + 0.5) / samples for i in range(samples)]
    with Heartbeat(f"needle and passkey at {length} tokens", model, every=30):
        score = NeedleEvaluator(model, needle_samples(tokenizer, length, samples, depths, seed))(table)
        passkey = PasskeyEvaluator(model, passkey_samples(tokenizer, length, samples, seed + 1))(table)
    lr2.unpatch(model)
    return {"needle_loss": round(score.loss, 4), "needle_acc": round(score.accuracy, 3), "passkey_acc": passkey}


def _short_ppl(model, text_sets, table: RopeTable | None) -> tuple[float, ...]:
    if table is not None:
        lr2.patch(model, table=table)  # up to L0 the table's short factors: what stock transformers uses too
    try:
        return tuple(short_text_perplexity(model, texts) for texts in text_sets)
    finally:
        if table is not None:
            lr2.unpatch(model)


def run(
    model,
    tokenizer,
    table: RopeTable,
    settings: FinetuneSettings,
    job: str | Path,
    *,
    length: int,
    samples: int,
    held_out: int,
    short_length: int,
    seed: int = 0,
) -> list[dict]:
    """The three rows (base own RoPE, base + table, finetuned + table); the finetune runs in (or resumes from)
    ``job``. ``model`` is trained in place."""
    essay = [tokenizer(package_text(), add_special_tokens=False)["input_ids"][:short_length]]
    documents, texts = manual_documents(
        tokenizer, original_length=table.original_max_position, seq_len=settings.seq_len, held_out=held_out,
        short_length=short_length, seed=seed,
    )  # fmt: skip
    print(f"quality: {len(documents)} training documents ({sum(map(len, documents))} tokens), {held_out} held-out "
          f"texts of {short_length} tokens", flush=True)  # fmt: skip
    rows = []

    def row(name: str, rope: str, ppl: tuple[float, float], long: dict | None, seconds: float, steps: int = 0) -> dict:
        long = long or {"needle_loss": "", "needle_acc": "", "passkey_acc": ""}
        return {"model": name, "rope": rope, "short_ppl": round(ppl[0], 3), "short_retained": "",
                "essay_ppl": round(ppl[1], 3), "essay_retained": "", **long,
                "steps": steps, "trained_tokens": steps * settings.seq_len * settings.batch_size
                * settings.gradient_accumulation_steps, "seconds": round(seconds, 1)}  # fmt: skip

    model.eval()
    start = time.perf_counter()
    rows.append(row("base", "own", _short_ppl(model, (texts, essay), None), None, time.perf_counter() - start))
    print(f"quality: base model, own RoPE: perplexity {rows[-1]['short_ppl']} (held out), {rows[-1]['essay_ppl']} "
          f"(essay)", flush=True)  # fmt: skip
    start = time.perf_counter()
    ppl = _short_ppl(model, (texts, essay), table)
    long = _long_scores(model, table, tokenizer, length, samples, seed)
    rows.append(row("base", "table", ppl, long, time.perf_counter() - start))
    print(f"quality: base model, table: {rows[-1]}", flush=True)

    start = time.perf_counter()
    finetune(model, tokenizer, table, documents, settings, job)  # its own progress: a bar, and a line every 30 s
    train_seconds = time.perf_counter() - start
    model.eval()
    start = time.perf_counter()
    ppl = _short_ppl(model, (texts, essay), table)
    long = _long_scores(model, table, tokenizer, length, samples, seed)
    rows.append(row("finetuned", "table", ppl, long, train_seconds + time.perf_counter() - start, settings.steps))
    for r in rows:  # > 1: lower perplexity than the base model with its own RoPE
        r["short_retained"] = round(rows[0]["short_ppl"] / r["short_ppl"], 4)
        r["essay_retained"] = round(rows[0]["essay_ppl"] / r["essay_ppl"], 4)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    labels = [f"{r['model']}\n{r['rope']}" for r in rows]
    fig, (short_ax, long_ax) = plt.subplots(1, 2, figsize=(9, 3.8))
    width = 0.38
    positions = range(len(rows))
    short_ax.bar([x - width / 2 for x in positions], [r["short_ppl"] for r in rows], width, label="held-out manual")
    essay = [r["essay_ppl"] for r in rows]
    short_ax.bar([x + width / 2 for x in positions], essay, width, label="essay (other domain)")
    short_ax.set_xticks(list(positions), labels)
    short_ax.set(ylabel="perplexity", title="short text (<= L0)")
    short_ax.legend(fontsize=7)
    long_rows = [r for r in rows if r["needle_loss"] != ""]
    long_ax.bar([f"{r['model']}\n{r['rope']}" for r in long_rows], [r["needle_loss"] for r in long_rows],
                color=["tab:blue", "tab:green"][: len(long_rows)])  # fmt: skip
    long_ax.set(ylabel="needle loss (nats, answer tokens)", title="long context")
    save_figure(fig, path, title)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser)
    add_device_option(parser)
    parser.add_argument("--table", required=True, help="the searched table (RopeTable JSON)")
    parser.add_argument("--length", type=int, default=None, help="needle / passkey tokens (default: the table's max)")
    parser.add_argument("--samples", type=int, default=2, help="needle and passkey samples (default 2)")
    parser.add_argument("--held-out", type=int, default=4, help="held-out manual topics for perplexity (default 4)")
    parser.add_argument("--short-length", type=int, default=2048, help="tokens per held-out text (default 2048)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per training row (default: the table's max)")
    parser.add_argument("--long-fraction", type=float, default=0.5, help="rows with a long document (default 0.5)")
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps (default 12: about an hour on a CPU)")
    parser.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="linear warm-up steps (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="data, held-out choice and samples (default 0)")
    parser.add_argument("--job", default="lr2kernels-finetune-quality",
                        help="the finetune's folder (checkpoints; a rerun resumes)")  # fmt: skip
    add_out_option(parser, fresh_results_folder(), "rows are appended to quality.csv there, quality.png written")


def main(argv=None) -> int:
    parser = make_parser("bench_quality", __doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    device = device_from(args.device)
    table = RopeTable.load(args.table)
    seq_len = args.seq_len or table.max_position
    settings = FinetuneSettings(
        seq_len=seq_len, long_fraction=args.long_fraction, steps=args.steps, learning_rate=args.lr,
        warmup_steps=args.warmup_steps, gradient_checkpointing=True, save_steps=1, seed=args.seed,
        bf16=device.type == "cuda",
    )  # fmt: skip
    model, tokenizer = load_model_quietly(args.model, device, torch.float32)
    print(f"quality benchmark: {type(model).__name__} on {device}, table L0 {table.original_max_position} -> "
          f"{table.max_position}, {args.steps} steps of {seq_len} tokens", flush=True)  # fmt: skip
    rows = run(
        model, tokenizer, table, settings, args.job, length=args.length or table.max_position, samples=args.samples,
        held_out=args.held_out, short_length=args.short_length, seed=args.seed,
    )  # fmt: skip
    env = environment(device)
    for r in rows:
        r.update(model_name=args.model, length=args.length or table.max_position, samples=args.samples,
                 lr=args.lr, seq_len=seq_len, **env)  # fmt: skip
    out = Path(args.out)
    show_and_append(rows, COLUMNS, out / "quality.csv")
    if plot(rows, out / "quality.png", f"mixed context window finetune, {args.steps} steps ({env['device_name']})"):
        print(f"wrote {out / 'quality.png'}")
    return 0
