"""lr2kernels: fused LongRoPE2-style rescaled-RoPE attention kernels and the tools around them.

``import lr2kernels`` is cheap: the public names load on first use (PEP 562), so the import itself reads no torch,
compiles nothing, imports no transformers and probes no GPU; ``lr2kernels --help`` and ``--version`` stay instant.
"""

# No module-level helper names here (no `from __future__ import annotations`, private aliases below): the
# package namespace shows the API only (`dir(lr2kernels)`, tab completion).
import importlib as _importlib
import typing as _typing

from lr2kernels._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "LongRopeAttention": "lr2kernels.nn",
    "RopeTable": "lr2kernels.tables",
    "apply_rope": "lr2kernels.ops",
    "available_backends": "lr2kernels.ops",
    "patch": "lr2kernels.hf",
    "rerotate": "lr2kernels.ops",
    "rope_attention": "lr2kernels.ops",
    "rope_decode": "lr2kernels.ops",
    "set_value_checks": "lr2kernels.ops",
    "unpatch": "lr2kernels.hf",
}
_SUBPACKAGES = ("apps", "hf", "nn", "ops", "reference", "search", "tables", "train")

__all__ = [
    "LongRopeAttention",
    "RopeTable",
    "__version__",
    "apply_rope",
    "available_backends",
    "patch",
    "rerotate",
    "rope_attention",
    "rope_decode",
    "set_value_checks",
    "unpatch",
]

if _typing.TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from lr2kernels.hf import patch, unpatch
    from lr2kernels.nn import LongRopeAttention
    from lr2kernels.ops import apply_rope, available_backends, rerotate, rope_attention, rope_decode, set_value_checks
    from lr2kernels.tables import RopeTable


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = _importlib.import_module(f"lr2kernels.{name}")
    else:
        raise AttributeError(f"module 'lr2kernels' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """The public API and the subpackages; loaded submodules and private helpers are not listed."""
    return sorted({*__all__, *_SUBPACKAGES})


# attn_implementation="lr2kernels" in transformers (from_pretrained, from_config, set_attn_implementation): installed
# when transformers loads its models (now, if it already has); imports neither transformers nor torch before that.
from lr2kernels import _transformers_hook as _transformers_hook  # noqa: E402 - after __getattr__, which it may use

_transformers_hook.install()
