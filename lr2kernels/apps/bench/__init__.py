"""Benchmarks (``lr2kernels bench``): kernel level against stock attention + separate RoPE (``kernels``), end to end
on a real model, stock vs patched (``e2e``), and context extension per length and method (``extension``, run by
``benchmarks/bench_extension.py``). Timings live here and in ``benchmarks/results``, never in tests."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The options of ``lr2kernels bench`` (every suite's)."""
    from lr2kernels.apps.bench import e2e, kernels, report  # not at import: `bench.extension` needs none of them
    from lr2kernels.apps.common import make_parser

    description = "Fused kernels vs stock attention + separate RoPE; stock vs patched model."
    parser = make_parser("lr2kernels bench", description)
    parser.add_argument(
        "--suite", choices=["kernels", "e2e", "all"], default="all", help="kernels, e2e (a real model) or both"
    )
    report.add_options(parser)
    kernels.add_arguments(parser)
    e2e.add_arguments(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options, checked before anything is loaded or timed (a usage error exits with status 2). Loads no model
    and needs no GPU: benchmarks/gpu_check.py's dry run checks its commands with it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for pair in args.heads or []:
        q_heads, _, kv_heads = pair.partition(":")
        if not (q_heads.isdigit() and kv_heads.isdigit() and int(kv_heads) > 0 and int(q_heads) % int(kv_heads) == 0):
            parser.error(f"--heads: expected q:kv pairs with q a multiple of kv (e.g. 32:8), got {pair!r}")
    for option in ("seqlens", "head_dims", "lengths", "decode_steps", "reps", "max_bwd_seqlen"):
        value = getattr(args, option)
        values = value if isinstance(value, list) else [] if value is None else [value]
        if any(v < 1 for v in values):
            parser.error(f"--{option.replace('_', '-')}: expected positive integers, got {value}")
    if args.config is not None and not Path(args.config).is_file():
        parser.error(f"--config: expected a config.json file, got {args.config!r} (not a file)")
    odd = [d for d in args.head_dims or [] if d % 2]
    if odd:
        parser.error(f"--head-dims: expected even head dims (RoPE rotates pairs), got {odd[0]}")
    if args.model != "smollm2" and not Path(args.model).exists():  # the device is not checked: see gpu_check.py
        parser.error(f"--model: expected 'smollm2', a local HF model folder or a .gguf file, got {args.model!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``lr2kernels bench``: the kernel and end-to-end suites (``--suite``); 1 if a suite measured nothing."""
    from lr2kernels.apps.bench import e2e, kernels
    from lr2kernels.apps.common import device_from

    args = parse_args(argv)
    suites = {"kernels": kernels, "e2e": e2e}
    for suite in suites if args.suite == "all" else [args.suite]:
        print(f"== lr2kernels bench: {suite} on {device_from(args.device)}")
        if not suites[suite].run_from_args(args):
            print(f"{suite}: no rows measured")
            return 1
    return 0
