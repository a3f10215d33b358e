"""``lr2kernels search``: a model + a target length -> a LongRoPE factor table, HF config and plot.

Single process, or one process per device under ``torchrun`` (gloo on CPUs, nccl on GPUs): every process loads
the model and evaluates its share of each generation; the first process writes the outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lr2kernels.apps.common import (
    Heartbeat,
    add_device_option,
    add_model_option,
    add_out_option,
    check_model_device_backend,
    check_writable_folder,
    default_dtype,
    load_model_quietly,
    make_parser,
    model_config,
    table_row,
)
from lr2kernels.hf.models import weights_sha256
from lr2kernels.search.critical import baseline_tables, critical_dimension
from lr2kernels.search.evaluate import NeedleEvaluator
from lr2kernels.search.evolution import SearchConfig, evolutionary_search, move_log_aside
from lr2kernels.search.needle import needle_samples, package_text, read_texts
from lr2kernels.search.outputs import plot_factors, save_hf_config
from lr2kernels.search.space import SearchSpace
from lr2kernels.tables import RopeTable

LOG_NAME = "search_log.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SearchConfig()
    add_model_option(parser)
    parser.add_argument(
        "--target-length", type=int, default=None, help="length to extend to, above L_train (default: 4 x L_train)"
    )
    add_original_length_option(parser)
    parser.add_argument(
        "--eval-length", type=int, default=None, help="needle sample tokens (default: the target length)"
    )
    parser.add_argument("--samples", type=int, default=4, help="needle samples per evaluation")
    parser.add_argument("--depth", type=float, default=0.1, help="needle depth as a fraction of the filler, in [0, 1]")
    parser.add_argument("--digits", type=int, default=7, help="digits of the magic number, 1 to 30")
    parser.add_argument(
        "--text",
        action="append",
        default=None,
        metavar="FILE",
        help="filler text file (repeatable; default: the package's English essay)",
    )
    parser.add_argument(
        "--critical-dim",
        type=int,
        default=None,
        help="highest critical pair searched, 1 to (rotary pairs - 1) (default: the theoretical critical dimension)",
    )
    parser.add_argument("--critical-window", type=int, default=4, help="also search this many pairs below it")
    parser.add_argument(
        "--population",
        type=int,
        default=defaults.population,
        help="candidate tables per generation",
    )
    parser.add_argument(
        "--parents",
        type=int,
        default=defaults.parents,
        help="best candidates kept to breed the next generation",
    )
    parser.add_argument(
        "--mutations",
        type=int,
        default=defaults.mutations,
        help="children by mutating a parent, per generation",
    )
    parser.add_argument(
        "--crossovers",
        type=int,
        default=defaults.crossovers,
        help="children by crossing two parents, per generation",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=defaults.iterations,
        help="generations after the initial population",
    )
    parser.add_argument(
        "--mutation-prob",
        type=float,
        default=defaults.mutation_prob,
        help="chance that a mutation moves each factor, in (0, 1]",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the needle samples and the search")
    add_out_option(parser, "lr2_search", "table, HF config, plot, summary; its log makes a rerun resume")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over: move the log aside (to <log>.old-<date>; nothing is deleted) instead of resuming it",
    )
    add_device_option(parser)
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="model dtype (default: bfloat16 on cuda, float32 on cpu)",
    )
    parser.add_argument(
        "--backend", default=None, help="attention backend: torch, triton or cuda (default: the best available)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _init_processes(device_arg: str | None) -> tuple[torch.device, int, int]:
    """(device, rank, world): joins the torchrun process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")
    if world == 1:
        return torch.device(device_arg or ("cuda" if cuda else "cpu")), 0, 1
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return device, dist.get_rank(), dist.get_world_size()


def add_original_length_option(parser: argparse.ArgumentParser) -> None:
    """``--original-length``, read by :func:`model_table_for`."""
    parser.add_argument(
        "--original-length",
        type=int,
        default=None,
        help="L_train, the pretraining length (default: the model's max_position_embeddings)",
    )


def model_table_for(config, original_length: int | None) -> RopeTable:
    """The model's own table, with ``max_position`` = L_train (``original_length`` when given)."""
    table = RopeTable.from_hf_config(config)
    if original_length is None:
        return table
    if original_length <= 0:
        raise ValueError(f"--original-length: expected a positive length, got {original_length}")
    return dataclasses.replace(
        table, original_max_position=min(table.original_max_position, original_length), max_position=original_length
    )


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def samples_sha256(samples) -> str:
    """sha256 over the needle samples' tokens, labels and answer positions (what the objective is computed on)."""
    digest = hashlib.sha256()
    for sample in samples:
        for tensor in (sample.input_ids, sample.labels):
            digest.update(memoryview(tensor.detach().cpu().contiguous().to(torch.int64).numpy()))
        digest.update(f"|{sample.answer_start}|{sample.answer}\n".encode())
    return digest.hexdigest()


def objective_fingerprint(args, model, dtype, device, model_table, target, length, text, samples) -> dict:
    """Everything the needle loss of a table depends on, as named fields (recorded in the search log's header; a
    rerun resumes the log only when every field is equal)."""
    model_path = Path(args.model)
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _RUN_KEYS}
    return {
        "objective": "needle_loss",
        "model": str(model_path.resolve()) if model_path.exists() else args.model,
        "model_type": model.config.model_type,
        "dtype": str(dtype),
        "device": device.type,
        "backend": args.backend or "auto",
        "rule": "hf",
        "model_config_sha256": _sha256_json(config),
        "weights_sha256": weights_sha256(model),  # after dtype: a dtype change names dtype, not the hash
        "target_length": target,
        "model_table": model_table.to_dict(),
        "samples": args.samples,
        "eval_length": length,
        "depth": args.depth,
        "digits": args.digits,
        "seed": args.seed,
        "text_sha256": hashlib.sha256((package_text() if text is None else text).encode()).hexdigest(),
        "samples_sha256": samples_sha256(samples),
    }


_RUN_KEYS = {"dtype", "torch_dtype", "transformers_version", "use_cache"}  # how it was loaded, not what it computes


HELD_OUT_SEED = 1_000_003  # added to --seed: the held-out needle samples the verdict is judged on
HEARTBEAT_S = 30.0  # a line at least this often while the search or the scoring runs (unless --no-progress)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    device, rank, world = _init_processes(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    model, tokenizer = load_model_quietly(args.model, device, dtype)
    model_table = model_table_for(model.config, args.original_length)
    original = model_table.max_position
    target = args.target_length or 4 * original
    space = SearchSpace.for_table(model_table, target, args.critical_dim, args.critical_window)
    config = SearchConfig(population=args.population, parents=args.parents, mutations=args.mutations,
                          crossovers=args.crossovers, iterations=args.iterations, mutation_prob=args.mutation_prob,
                          seed=args.seed)  # fmt: skip
    text = read_texts(args.text) if args.text else None
    length = args.eval_length or target
    samples = needle_samples(tokenizer, length, args.samples, args.depth, args.seed, text, args.digits)
    fingerprint = objective_fingerprint(args, model, dtype, device, model_table, target, length, text, samples)
    evaluator = NeedleEvaluator(model, samples, backend=args.backend)
    theory = critical_dimension(model_table.base, model_table.rotary_dim, original)
    say(f"lr2kernels search: {args.model} ({model.config.model_type}, {dtype}, {device}, {world} process(es)); "
        f"L_train {original} -> {target} (s = {space.scale:g}); theoretical critical dim {theory} of "
        f"{space.half} pairs, searching {space.critical_min}..{space.critical_max}; {args.samples} needle sample(s) "
        f"of {length} tokens; budget {config.budget} evaluations")  # fmt: skip

    out = Path(args.out)
    log_path = out / LOG_NAME
    if args.fresh and rank == 0:
        moved = move_log_aside(log_path)
        if moved is not None:
            say(f"--fresh: moved the earlier log {log_path} aside to {moved} (with its shards); starting over")
    if world > 1:
        torch.distributed.barrier()
    # A line every 30 s while an evaluation runs (one of 32K tokens takes minutes on a CPU), besides the bar.
    beat = Heartbeat("search", model, every=HEARTBEAT_S, indent="  ") if rank == 0 and not args.no_progress else None
    with beat or contextlib.nullcontext():
        result = evolutionary_search(evaluator.loss, space, config, log_path=log_path,
                                     objective_fingerprint=fingerprint, progress=not args.no_progress)  # fmt: skip
    if rank != 0:
        return 0
    skipped = f"; {result.skipped} skipped (children equal to a candidate already scored)" if result.skipped else ""
    say(f"\nsearch: {result.evaluations} of {config.budget} evaluations ({result.reused} from the log{skipped}) in "
        f"{result.wall_s:.0f} s; critical dim {result.best.critical_dim}")  # fmt: skip

    # The baselines and the result, on the search's samples and on held-out ones (another seed: what the verdict is
    # judged on, since the search's own samples favour the table that was picked on them).
    held_out_seed = args.seed + HELD_OUT_SEED
    held_out = needle_samples(tokenizer, length, args.samples, args.depth, held_out_seed, text, args.digits)
    held_out_evaluator = NeedleEvaluator(model, held_out, backend=args.backend)
    baselines = baseline_tables(model_table, target, critical=result.best.critical_dim)
    tables = {**baselines, "searched": result.table}
    say(f"scoring {len(tables)} tables on the {args.samples} search and {args.samples} held-out sample(s):")
    scores, held_out_scores = {}, {}
    baselines_start = time.perf_counter()
    with Heartbeat("scoring", model, every=HEARTBEAT_S, indent="  ") if beat else contextlib.nullcontext():
        for name, table in tables.items():
            table_start = time.perf_counter()
            scores[name], held_out_scores[name] = evaluator(table), held_out_evaluator(table)
            say(f"  {name}: loss {scores[name].loss:.4f}, held out {held_out_scores[name].loss:.4f} "
                f"({time.perf_counter() - table_start:.0f} s)")  # fmt: skip
    baselines_s = time.perf_counter() - baselines_start
    best_baseline = min(baselines, key=lambda name: held_out_scores[name].loss)
    searched_loss, baseline_loss = held_out_scores["searched"].loss, held_out_scores[best_baseline].loss
    verdict = {
        "searched_beats_best_baseline": bool(searched_loss < baseline_loss), "best_baseline": best_baseline,
        "searched_loss": searched_loss, "best_baseline_loss": baseline_loss, "held_out_samples": args.samples,
        "held_out_seed": held_out_seed, "eval_length": length,
    }  # fmt: skip

    out.mkdir(parents=True, exist_ok=True)
    result.table.save(out / "table.json")
    save_hf_config(out / "config.json", model.config, result.table, architectures=[type(model).__name__])
    plot_factors(out / "factors.png", tables, result.best.critical_dim,
                 f"{args.model}: L_train {original} -> {target}", theoretical_critical_dim=theory)  # fmt: skip
    wall_s = time.perf_counter() - started
    summary = {
        "model": args.model, "original_length": original, "target_length": target, "eval_length": length,
        "samples": args.samples, "theoretical_critical_dim": theory, "critical_dim": result.best.critical_dim,
        "budget": config.budget, "evaluations": result.evaluations, "skipped_duplicates": result.skipped,
        "reused_from_log": result.reused, "wall_s": wall_s, "search_s": result.wall_s, "baselines_s": baselines_s,
        "resumed_search_s": result.logged_s, "resumed_untimed_evaluations": result.logged_untimed,
        "total_s": wall_s + result.logged_s,
        "processes": world, "device": str(device), "dtype": str(dtype), "config": dataclasses.asdict(config),
        "history": list(result.history), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "scores": {name: dataclasses.asdict(score) for name, score in scores.items()},
        "held_out_scores": {name: dataclasses.asdict(score) for name, score in held_out_scores.items()},
        "verdict": verdict,
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    say(f"needle loss at {length} tokens ({args.samples} search samples; {args.samples} held out, seed "
        f"{held_out_seed}):")  # fmt: skip
    widths = (12, 10, 10, 10, 10)
    say(table_row(("  table", "loss", "ppl", "accuracy", "held out"), widths))
    for name, score in scores.items():
        say(table_row((f"  {name}", f"{score.loss:.4f}", f"{score.perplexity:.3f}", f"{score.accuracy:.2f}",
                       f"{held_out_scores[name].loss:.4f}"), widths))  # fmt: skip
    resumed = f" + {result.logged_s:.0f} s of evaluations in earlier runs" if result.reused else ""
    say(f"time: {wall_s:.0f} s this run (search {result.wall_s:.0f} s, scoring {baselines_s:.0f} s){resumed}")
    beats = "BEATS" if verdict["searched_beats_best_baseline"] else "does NOT beat"
    say(f"verdict: the searched table {beats} the best baseline, {best_baseline}, at {length} tokens on "
        f"{args.samples} held-out sample(s): loss {searched_loss:.4f} vs {baseline_loss:.4f}")  # fmt: skip
    say(f"wrote {out / 'table.json'}, {out / 'config.json'}, {out / 'factors.png'}, {out / 'summary.json'}")
    return 0


OUTPUTS = ("table.json", "config.json", "factors.png", "summary.json")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every argument, the device and the output folder, checked before anything is loaded: a bad one stops the
    job in a second with a usage error naming it, not after the model has loaded or the first evaluation ran. What
    depends on the model (its L_train, its number of RoPE pairs) is checked against its config alone."""
    positive = ("target_length", "original_length", "eval_length", "samples", "digits")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive number, got {value}")
    if args.digits > 30:
        parser.error(f"--digits: expected 1 to 30 digits, got {args.digits}")
    if args.critical_window < 0:
        parser.error(f"--critical-window: expected a number of pairs >= 0, got {args.critical_window}")
    if args.critical_dim is not None and args.critical_dim < 1:
        parser.error(f"--critical-dim: expected a pair index >= 1, got {args.critical_dim}")
    if not 0.0 <= args.depth <= 1.0:
        parser.error(f"--depth: expected a fraction of the filler in [0, 1], got {args.depth}")
    try:
        SearchConfig(population=args.population, parents=args.parents, mutations=args.mutations,
                     crossovers=args.crossovers, iterations=args.iterations, mutation_prob=args.mutation_prob,
                     seed=args.seed)  # fmt: skip
    except ValueError as error:
        parser.error(f"--{str(error).replace('_', '-')}")
    for path in args.text or ():
        if not Path(path).is_file():
            parser.error(f"--text: expected a readable text file, got {path!r} (no such file)")
    check_model_device_backend(parser, args)
    check_against_model(parser, args)
    out = Path(args.out)
    if out.is_dir() and not (out / LOG_NAME).exists():
        foreign = [name for name in OUTPUTS if (out / name).exists()]
        if foreign:
            parser.error(f"--out: {args.out!r} holds {', '.join(foreign)} but no {LOG_NAME} (not a search's folder: "
                         "the search would overwrite them); expected a new or empty folder, or a search's")  # fmt: skip
    check_writable_folder(parser, "--out", args.out, "the search can write its log and results to")


def check_against_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--target-length above L_train and --critical-dim below the model's pairs, from the model's config alone
    (a header read, not the weights)."""
    try:
        table = model_table_for(model_config(args.model), args.original_length)
    except (OSError, ValueError, KeyError, TypeError) as error:
        parser.error(f"--model: cannot read the config of {args.model!r}: {error}")
    original = table.max_position
    if args.target_length is not None and args.target_length <= original:
        where = "--original-length" if args.original_length else "the model's original context"
        parser.error(f"--target-length {args.target_length}: expected more than {where} {original}")
    half = table.rotary_dim // 2
    if args.critical_dim is not None and args.critical_dim > half - 1:
        parser.error(f"--critical-dim {args.critical_dim}: expected a pair index in [1, {half - 1}] (the model "
                     f"rotates {half} pairs)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("lr2kernels search", __doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``lr2kernels search`` (also under ``torchrun -m lr2kernels search``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    try:
        return run(args)
    except ValueError as error:  # what only the model and the log tell (a log of another search in --out, ...)
        print(f"lr2kernels search: error: {error}", file=sys.stderr, flush=True)
        return 2
