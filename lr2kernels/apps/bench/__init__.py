"""Benchmarks (``lr2kernels bench``): kernel level against stock attention + separate RoPE (``kernels``), end to end
on a real model, stock vs patched (``e2e``), and context extension per length and method (``extension``, run by
``benchmarks/bench_extension.py``). Timings live here and in ``benchmarks/results``, never in tests."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """``lr2kernels bench``: the kernel and end-to-end suites (``--suite``); 1 if a suite measured nothing."""
    from lr2kernels.apps.bench import e2e, kernels, report  # not at import: `bench.extension` needs none of them
    from lr2kernels.apps.common import device_from

    parser = argparse.ArgumentParser(
        prog="lr2kernels bench", description="Fused kernels vs stock attention + separate RoPE; stock vs patched model."
    )
    parser.add_argument("--suite", choices=["kernels", "e2e", "all"], default="all")
    report.add_options(parser)
    kernels.add_arguments(parser)
    e2e.add_arguments(parser)
    args = parser.parse_args(argv)
    suites = {"kernels": kernels, "e2e": e2e}
    for suite in suites if args.suite == "all" else [args.suite]:
        print(f"== lr2kernels bench: {suite} on {device_from(args.device)}")
        if not suites[suite].run_from_args(args):
            print(f"{suite}: no rows measured")
            return 1
    return 0
