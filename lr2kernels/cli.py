"""The ``lr2kernels`` command. Heavy imports (torch, triton) happen inside the subcommands, never at import."""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Sequence
from typing import Any


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    except Exception as exc:  # a broken install should be reported, not crash `info`
        return f"broken ({type(exc).__name__}: {exc})"
    return triton.__version__


def collect_info() -> dict[str, Any]:
    """Versions, CUDA device and available backends, as printed by ``lr2kernels info``."""
    import torch

    from lr2kernels import available_backends
    from lr2kernels._version import __version__

    cuda = torch.cuda.is_available()
    return {
        "lr2kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "backends": list(available_backends()),
    }


def _cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cuda = f"yes ({info['cuda_device']})" if info["cuda_available"] else "no"
    rows = [
        ("lr2kernels", info["lr2kernels"]),
        ("python", info["python"]),
        ("torch", info["torch"]),
        ("triton", info["triton"]),
        ("cuda", cuda),
        ("backends", ", ".join(info["backends"])),
    ]
    for name, value in rows:
        print(f"{name:<11} {value}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from lr2kernels.bench import e2e, kernels

    suites = ["kernels", "e2e"] if args.suite == "all" else [args.suite]
    for suite in suites:
        print(f"== lr2kernels bench: {suite} on {args.device}")
        rows = {"kernels": kernels, "e2e": e2e}[suite].run_from_args(args)
        if not rows:
            print(f"{suite}: no rows measured")
            return 1
    return 0


def _add_bench_parser(sub) -> None:
    from lr2kernels.bench import e2e, kernels  # imports torch: only when the parser is built

    bench = sub.add_parser("bench", help="benchmarks: kernels vs stock attention + RoPE; stock vs patched model")
    bench.add_argument("--suite", choices=["kernels", "e2e", "all"], default="all")
    kernels.add_arguments(bench)
    e2e.add_arguments(bench)
    bench.set_defaults(func=_cmd_bench)


def _cmd_demo(args: argparse.Namespace) -> int:
    from lr2kernels import demo

    return demo.run(args)


def _add_demo_parser(sub) -> None:
    from lr2kernels import demo  # imports torch: only when the parser is built

    parser = sub.add_parser("demo", help="the main job: stock vs patched real model, passkey, the L0 boundary")
    demo.add_arguments(parser)
    parser.set_defaults(func=_cmd_demo)


def _cmd_search(args: argparse.Namespace) -> int:
    from lr2kernels.search import job

    return job.run(args)


def _add_search_parser(sub) -> None:
    from lr2kernels.search import job  # imports torch: only when the parser is built

    parser = sub.add_parser("search", help="LongRoPE2 factor search: needle-driven evolutionary search of long factors")
    job.add_arguments(parser)
    parser.set_defaults(func=_cmd_search)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lr2kernels", description="LongRoPE2-style RoPE kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="print versions, CUDA device and available backends")
    info.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    info.set_defaults(func=_cmd_info)
    _add_bench_parser(sub)
    _add_demo_parser(sub)
    _add_search_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)
