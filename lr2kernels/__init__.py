"""lr2kernels: fused LongRoPE2-style rescaled-RoPE attention kernels and the tools around them.

``import lr2kernels`` is cheap: the public names load on first use (PEP 562), so the import itself reads no torch,
compiles nothing, imports no transformers and probes no GPU; ``lr2kernels --help`` and ``--version`` stay instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
_SUBPACKAGES = ("apps", "hf", "nn", "ops", "reference", "search", "tables")

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

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from lr2kernels.hf import patch, unpatch
    from lr2kernels.nn import LongRopeAttention
    from lr2kernels.ops import apply_rope, available_backends, rerotate, rope_attention, rope_decode, set_value_checks
    from lr2kernels.tables import RopeTable


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"lr2kernels.{name}")
    else:
        raise AttributeError(f"module 'lr2kernels' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBPACKAGES})
