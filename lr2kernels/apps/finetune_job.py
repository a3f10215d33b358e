"""``lr2kernels finetune``: mixed context window finetuning (LongRoPE2) of a model with a searched table.

Packs short and long documents into rows of ``--seq-len`` tokens, each document with its own table (the original
RoPE for documents of at most L0 tokens, the table's long factors past it), and trains on Hugging Face ``Trainer``:
progress bar, checkpoints every ``--save-steps``, and resume: rerunning the same command after a kill continues from
the last checkpoint (removed once the model is exported, unless ``--keep-checkpoints``). Runs under ``torchrun`` /
``accelerate launch`` (DDP; FSDP through accelerate's config) too.

Example (the embedded SmolLM2 and the table ``lr2kernels search`` found)::

    lr2kernels finetune --table benchmarks/results/search_smollm2_16k --seq-len 16384 --steps 200 --out ft

The result, ``<out>/model``, is a Hugging Face model folder whose ``config.json`` carries the table
(``rope_parameters`` ``longrope``): stock transformers loads it, ``lr2kernels.patch`` runs it fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from lr2kernels.apps.common import (
    TABLE_FILE,
    add_device_option,
    add_model_option,
    check_model_device_backend,
    check_writable_folder,
    device_from,
    load_model_quietly,
    load_table_argument,
    make_parser,
    model_config,
    table_path,
)
from lr2kernels.tables import RopeTable

JOB_FILE = "finetune.json"  # lr2kernels.train.finetune.JOB_FILE (not imported: that module imports transformers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser)
    parser.add_argument(
        "--table", required=True, help=f"the LongRoPE table: a {TABLE_FILE}, or the output folder of lr2kernels search"
    )
    parser.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="training documents: text files (one document each) or JSON-lines files (one {'text': ...} per line); "
        "default: a smoke-test corpus from the package's English text",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per packed row, above the table's L0 (default: the table's max)",
    )
    parser.add_argument(
        "--long-fraction", type=float, default=0.5, help="fraction of rows holding a long document, in [0, 1]"
    )
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps")
    parser.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per device and step")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)"
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun with several processes on GPUs: FSDP2 (sharded weights, gradients and optimiser "
        "state) instead of DDP",
    )
    parser.add_argument(
        "--save-steps",
        type=int,
        default=50,
        help="a checkpoint every N steps and at the end (the newest two kept), for a rerun of a killed job to resume "
        "from; 0: none (a killed job starts over)",
    )
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep the checkpoints once the model is exported (default: removed then; each holds the weights and "
        "twice their size in optimiser state, 2.1 GB for SmolLM2-135M)",
    )
    parser.add_argument("--seed", type=int, default=0, help="packing, data order and init seed")
    parser.add_argument(
        "--backend", default=None, help="lr2kernels backend: torch, triton or cuda (default: the best available)"
    )
    add_device_option(parser)
    parser.add_argument("--out", default="lr2kernels-finetune", help="the job's folder")
    parser.add_argument(
        "--fresh", action="store_true", help="move a previous run in --out aside first (nothing is deleted)"
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every argument, the device and the output folder, before anything is loaded."""
    table = load_table_argument(parser, args.table)
    for name in ("seq_len", "steps", "batch_size", "grad_accum"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
    if args.save_steps < 0:
        parser.error(f"--save-steps: expected a number of steps >= 0 (0: no checkpoints), got {args.save_steps}")
    if args.seed < 0:
        parser.error(f"--seed: expected an integer >= 0, got {args.seed}")
    l0 = table.original_max_position
    if args.seq_len is not None and args.seq_len <= l0 and args.long_fraction > 0:
        parser.error(f"--seq-len {args.seq_len}: expected more than the table's L0 {l0}, or no row can hold a long "
                     "document (--long-fraction 0 trains short rows only)")  # fmt: skip
    if not 0.0 <= args.long_fraction <= 1.0:
        parser.error(f"--long-fraction: expected a fraction in [0, 1], got {args.long_fraction}")
    if not 0 < args.lr < float("inf"):
        parser.error(f"--lr: expected a positive learning rate, got {args.lr}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps: expected a number >= 0, got {args.warmup_steps}")
    for data in args.data or ():
        if not Path(data).is_file():
            parser.error(f"--data: expected a readable file, got {data!r} (no such file)")
    check_model_device_backend(parser, args)
    check_table_against_model(parser, args, table)
    if args.fsdp and device_from(args.device).type != "cuda":
        parser.error("--fsdp: accelerate runs FSDP on GPUs only; on the CPU several processes train with DDP (leave "
                     "--fsdp out)")  # fmt: skip
    if args.bf16 and device_from(args.device).type != "cuda":
        parser.error("--bf16: bf16 training is for GPUs; on the CPU train in fp32 (leave --bf16 out)")
    out = Path(args.out)
    if out.is_file():
        parser.error(f"--out: expected a folder for the job, got the file {args.out!r}")
    if out.is_dir() and any(out.iterdir()) and not (out / JOB_FILE).is_file() and not args.fresh:
        parser.error(f"--out: {args.out!r} holds files that are not a finetune's ({JOB_FILE} missing); expected a new "
                     "or empty folder, or --fresh to move it aside")  # fmt: skip
    check_writable_folder(parser, "--out", args.out, "the finetune can write its checkpoints and model to")


def check_table_against_model(parser: argparse.ArgumentParser, args: argparse.Namespace, table: RopeTable) -> None:
    """The table fits the model (head and rotary width), from the model's config alone (not the weights)."""
    try:
        own = RopeTable.from_hf_config(model_config(args.model))
    except (OSError, ValueError, KeyError, TypeError) as error:
        parser.error(f"--model: cannot read the config of {args.model!r}: {error}")
    if (table.head_dim, table.rotary_dim) != (own.head_dim, own.rotary_dim):
        parser.error(f"--table {args.table}: expected a table for head_dim {own.head_dim} / rotary_dim "
                     f"{own.rotary_dim} ({args.model}), got {table.head_dim} / {table.rotary_dim}")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from lr2kernels.train import default_documents, read_documents
    from lr2kernels.train.finetune import FinetuneSettings, finetune

    table = RopeTable.load(table_path(args.table))
    seq_len = args.seq_len or table.max_position
    settings = FinetuneSettings(
        seq_len=seq_len, long_fraction=args.long_fraction, steps=args.steps, learning_rate=args.lr,
        warmup_steps=args.warmup_steps, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16, save_steps=args.save_steps,
        seed=args.seed, backend=args.backend,
    )  # fmt: skip
    device = device_from(args.device)
    print(f"finetune: loading {args.model} on {device}", flush=True)
    model, tokenizer = load_model_quietly(args.model, device, torch.float32)
    if args.data:
        documents = read_documents(args.data, tokenizer)
    else:
        documents = default_documents(tokenizer, original_length=table.original_max_position, seq_len=seq_len,
                                      seed=args.seed)  # fmt: skip
    print(f"finetune: {len(documents)} documents, table L0 {table.original_max_position} -> "
          f"{table.max_position}, rows of {seq_len} tokens", flush=True)  # fmt: skip
    folder = finetune(model, tokenizer, table, documents, settings, args.out, fresh=args.fresh, fsdp=args.fsdp,
                      keep_checkpoints=args.keep_checkpoints)  # fmt: skip
    print(f"finetune: the model is in {folder} (stock transformers: AutoModelForCausalLM.from_pretrained)", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``lr2kernels finetune`` (also under ``torchrun -m lr2kernels finetune``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    try:
        return run(args)
    except ValueError as error:  # what only the loaded model and documents tell (another job in --out, ...)
        print(f"lr2kernels finetune: error: {error}", file=sys.stderr, flush=True)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("lr2kernels finetune", __doc__.splitlines()[0])
    add_arguments(parser)
    return parser
