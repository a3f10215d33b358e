"""``lr2kernels serve``: transformers' OpenAI-compatible server (``transformers serve``) on the lr2kernels attention.

It is ``transformers serve`` itself (chat completions, completions, responses, streaming, continuous batching, the
model manager, every option of the installed transformers' command, under the same names), with each model loaded
with ``attn_implementation="lr2kernels"`` (lr2kernels/hf/loading.py: the patched model, which answers what the stock
model answers), plus ``--table`` for a searched RoPE table and ``--backend``::

    lr2kernels serve ./my-model --host 127.0.0.1 --port 8000
    lr2kernels serve smollm2 --table benchmarks/results/search_smollm2_16k

How: transformers serve builds its model loader inside its command, so for the time the command runs, its serving
module's ``ModelLoader`` is lr2kernels' subclass (lr2kernels/apps/serve_loader.py), in this process only; nothing
else of transformers is changed. Needs transformers >= 5.25 with its serving extras:
``pip install 'lr2kernels[serve]'``.
"""

from __future__ import annotations

import argparse
import enum
import importlib.util
import inspect
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lr2kernels.apps.common import TABLE_FILE, load_table_argument, make_parser, model_config, table_path

MIN_TRANSFORMERS = (5, 25)  # transformers serve's ModelLoader, which loads each model in a process of its own
INSTALL = "pip install 'lr2kernels[serve]'"
SERVING_MODULES = ("fastapi", "uvicorn", "openai", "pydantic")  # transformers' is_serve_available()
BACKENDS = ("torch", "triton", "cuda")
OWN = ("table", "backend")  # the options lr2kernels adds; every other one is transformers serve's


def _transformers_version() -> tuple[int, ...] | None:
    """The installed transformers' (major, minor), read from its metadata (not imported), or None."""
    from importlib import metadata

    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None
    numbers = []
    for part in version.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits or 0))
    return tuple(numbers)


def _serve_command() -> Any | None:
    """transformers serve's command (the ``Serve`` class whose ``__init__`` runs the server), or None where this
    transformers has none that lr2kernels serve can drive."""
    version = _transformers_version()
    if version is None or version < MIN_TRANSFORMERS or importlib.util.find_spec("typer") is None:
        return None
    try:
        from transformers.cli.serve import Serve
    except ImportError:
        return None
    return Serve


class _Parameter(typing.NamedTuple):
    name: str  # Serve.__init__'s keyword
    kind: type  # bool, int, float, str or an Enum
    default: Any
    help: str
    argument: bool  # the positional MODEL
    flags: tuple[str, ...]  # its option names, as typer names them


def _serve_parameters(serve: Any) -> list[_Parameter]:
    """transformers serve's arguments and options, read from its command's signature (typer's declarations)."""
    hints = typing.get_type_hints(serve.__init__, include_extras=True)
    found = []
    for name, parameter in inspect.signature(serve.__init__).parameters.items():
        hint = hints.get(name)
        if name == "self" or typing.get_origin(hint) is not typing.Annotated:
            continue
        annotated, info = typing.get_args(hint)[0], typing.get_args(hint)[1]
        if getattr(info, "hidden", False):
            continue
        kinds = [k for k in (typing.get_args(annotated) or (annotated,)) if k is not type(None)]
        kind = kinds[0] if len(kinds) == 1 and isinstance(kinds[0], type) else str
        decls = getattr(info, "param_decls", None) or ()
        # "--x/--no-x" declares a flag and its negation: argparse's BooleanOptionalAction makes the "--no-" one
        declared = [decl.split("/")[0] for decl in decls if decl.startswith("-")]
        flags = tuple(declared) or (f"--{name.replace('_', '-')}",)
        text = " ".join((getattr(info, "help", None) or "").replace("`", "").split())
        found.append(_Parameter(name, kind, parameter.default, text, type(info).__name__ == "ArgumentInfo", flags))
    return found


def build_parser(serve: Any | None) -> argparse.ArgumentParser:
    """lr2kernels' options, then transformers serve's (those of the installed transformers, ``serve``)."""
    parser = make_parser(
        "lr2kernels serve",
        "transformers' OpenAI-compatible server (transformers serve: /v1/chat/completions, /v1/completions, "
        "/v1/responses, /v1/models, /health) with every model on the lr2kernels attention "
        '(attn_implementation="lr2kernels"): the answers of the stock model, RoPE applied at attention time.',
        epilog="Every option but --table and --backend is transformers serve's, passed to it as given.",
    )
    own = parser.add_argument_group("lr2kernels options")
    own.add_argument(
        "--table",
        default=None,
        help=f"a searched RoPE table for MODEL: a {TABLE_FILE}, or the output folder of lr2kernels search "
        "(default: the model's own RoPE, from its config)",
    )
    own.add_argument("--backend", default=None, help="lr2kernels backend: torch, triton or cuda (default: the best "
                     "available)")  # fmt: skip
    if serve is None:
        parser.epilog = f"transformers serve's options are listed once transformers >= 5.25 is installed: {INSTALL}"
        return parser
    theirs = parser.add_argument_group("transformers serve options")
    for p in _serve_parameters(serve):
        text = p.help.replace("%", "%%")
        if p.argument:
            theirs.add_argument(
                p.name, metavar="MODEL", nargs="?", default=p.default,
                help=f"{text} smollm2: the embedded SmolLM2-135M. (default: none, each request names its model)",
            )  # fmt: skip
        elif p.name == "attn_implementation":  # the one value this command can take
            theirs.add_argument(*p.flags, dest=p.name, choices=["lr2kernels"], default="lr2kernels",
                                help="the attention: lr2kernels (its masks and fallbacks run sdpa)")  # fmt: skip
        elif p.kind is bool:
            theirs.add_argument(*p.flags, dest=p.name, action=argparse.BooleanOptionalAction, default=p.default,
                                help=text or p.name)  # fmt: skip
        elif isinstance(p.kind, type) and issubclass(p.kind, enum.Enum):
            default = p.default.value if isinstance(p.default, enum.Enum) else p.default
            theirs.add_argument(*p.flags, dest=p.name, choices=[m.value for m in p.kind], default=default,
                                help=text or p.name)  # fmt: skip
        else:
            unset = " (default: unset)" if p.default is None else ""
            theirs.add_argument(*p.flags, dest=p.name, type=p.kind if p.kind in (int, float) else str,
                                default=p.default, help=f"{text or p.name}{unset}")  # fmt: skip
    return parser


def _missing_serving_modules() -> list[str]:
    return [name for name in SERVING_MODULES if importlib.util.find_spec(name) is None]


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, serve: Any | None) -> None:
    """Usage errors (exit 2, one line) before anything is loaded."""
    if serve is None:
        version = _transformers_version()
        found = "none installed" if version is None else "transformers " + ".".join(map(str, version))
        parser.error(f"needs transformers >= 5.25 (its serve command), got {found}: {INSTALL}")
    missing = _missing_serving_modules()
    if missing:
        parser.error(f"transformers serve needs {', '.join(missing)}, not installed: {INSTALL}")
    if args.backend is not None and args.backend not in BACKENDS:
        parser.error(f"--backend: expected torch, triton or cuda, got {args.backend!r}")
    model = args.force_model
    if args.table is not None:
        table = load_table_argument(parser, args.table)
        if model is None:
            parser.error("--table: a table is for one model; expected MODEL too (lr2kernels serve MODEL --table ...)")
        # read again in the model's process, whose working folder may differ
        args.table = str(table_path(args.table).resolve())
    if model is None or not (model == "smollm2" or Path(model).exists()):
        return  # a Hub model (or none: each request names one) is checked by transformers as it loads
    try:
        config = model_config(model)
    except (OSError, ValueError, KeyError, TypeError) as error:
        parser.error(f"MODEL: cannot read the config of {model!r}: {error}")
    from lr2kernels.hf import SUPPORTED_MODEL_TYPES

    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        parser.error(f"MODEL: {model} is a {config.get('model_type')!r} model; lr2kernels serves the model types "
                     f"{sorted(SUPPORTED_MODEL_TYPES)}")  # fmt: skip
    if args.table is not None:
        from lr2kernels.tables import RopeTable

        own = RopeTable.from_hf_config(config)
        if (table.head_dim, table.rotary_dim) != (own.head_dim, own.rotary_dim):
            parser.error(f"--table {args.table}: expected a table for head_dim {own.head_dim} / rotary_dim "
                         f"{own.rotary_dim} ({model}), got {table.head_dim} / {table.rotary_dim}")  # fmt: skip


def _model_id(model: str | None) -> str | None:
    """MODEL as transformers serve names it: ``smollm2`` is the embedded GGUF file (``folder:file.gguf``)."""
    if model != "smollm2" or Path(model).exists():
        return model
    from lr2kernels.hf.models import SMOLLM2_GGUF, smollm2_dir

    return f"{smollm2_dir()}:{SMOLLM2_GGUF}"


def run(args: argparse.Namespace, serve: Any) -> int:
    """Run transformers serve with lr2kernels' model loader, until it stops (Ctrl+C, SIGTERM)."""
    from transformers.cli.serving import model_manager

    from lr2kernels.apps.serve_loader import Lr2ModelLoader

    kwargs = {}
    for p in _serve_parameters(serve):
        value = getattr(args, p.name)
        if isinstance(p.kind, type) and issubclass(p.kind, enum.Enum) and value is not None:
            value = p.kind(value)
        kwargs[p.name] = value
    kwargs["force_model"] = _model_id(args.force_model)
    kwargs["attn_implementation"] = None  # transformers checks the names it knows; the loader sets lr2kernels'
    original = model_manager.ModelLoader
    model_manager.ModelLoader = Lr2ModelLoader
    Lr2ModelLoader.default_table, Lr2ModelLoader.default_backend = args.table, args.backend
    try:
        serve(**kwargs)
    finally:
        model_manager.ModelLoader = original
        Lr2ModelLoader.default_table = Lr2ModelLoader.default_backend = None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    serve = _serve_command()
    parser = build_parser(serve)
    # Without transformers serve, its options are unknown here: what to install is the one thing to say.
    args = parser.parse_args(argv) if serve is not None else parser.parse_known_args(argv)[0]
    check_arguments(parser, args, serve)
    return run(args, serve)
