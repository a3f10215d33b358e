"""The ``lr2kernels`` command: ``info``, ``bench``, ``demo``, ``search``, ``finetune``, ``serve``.

Each command lives in its own module with a ``main(argv) -> exit code`` that parses the command's options; this
module imports it only when the command runs (``lr2kernels --help`` and ``--version`` import no torch, no
transformers, no matplotlib).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from lr2kernels._version import __version__

COMMANDS = {  # name: (module, help)
    "info": ("lr2kernels.apps.info", "print versions, CUDA device and available backends"),
    "bench": ("lr2kernels.apps.bench", "benchmarks: kernels vs stock attention + RoPE; stock vs patched model"),
    "demo": ("lr2kernels.apps.demo", "the main job: stock vs patched real model, passkey, the L0 boundary"),
    "search": ("lr2kernels.apps.search_job", "LongRoPE2 factor search: needle-driven evolutionary search of factors"),
    "finetune": ("lr2kernels.apps.finetune_job", "LongRoPE2 mixed context window finetuning with a searched table"),
    "serve": ("lr2kernels.apps.serve", "transformers serve (OpenAI-compatible server) on the lr2kernels attention"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: which command; the command's own options are left to its module."""
    parser = argparse.ArgumentParser(
        prog="lr2kernels",
        description="LongRoPE2-style RoPE kernels.",
        epilog="lr2kernels COMMAND --help lists the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"lr2kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)  # --help after COMMAND goes to the command
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    args, rest = build_parser().parse_known_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(rest)
