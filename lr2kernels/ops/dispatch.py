"""Backend registry: which backends exist, which are usable here, and which one a call gets.

Backends are imported lazily on first use, so ``import lr2kernels`` compiles nothing and probes no GPU.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

# name -> module implementing the op functions (apply_rope, rope_attention, rope_decode, rerotate) and
# `is_available(device) -> (bool, reason)`; None marks a backend that is planned but not in this version.
_BACKEND_MODULES: dict[str, str | None] = {
    "torch": "lr2kernels.ops.torch_backend",
    "triton": "lr2kernels.ops.triton",
    "cuda": None,
}
_NOT_BUILT_REASON = "not part of this version of lr2kernels yet"
# Order of preference for backend=None, per device type.
_PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("torch",)}
_warned: set[str] = set()


def _load(name: str) -> ModuleType | None:
    module = _BACKEND_MODULES[name]
    return None if module is None else importlib.import_module(module)


def backend_status(name: str, device: torch.device | None = None) -> tuple[bool, str]:
    """(available, reason-if-not) for one backend on ``device`` (None: anywhere on this machine)."""
    if name not in _BACKEND_MODULES:
        raise ValueError(f"backend: expected one of {list(_BACKEND_MODULES)} or None, got {name!r}")
    module = _load(name)
    if module is None:
        return False, _NOT_BUILT_REASON
    return module.is_available(device)


def available_backends() -> list[str]:
    """Backends usable on this machine: "torch" always; "triton" / "cuda" where their kernels can run."""
    return [name for name in _BACKEND_MODULES if backend_status(name)[0]]


def resolve(backend: str | None, device: torch.device) -> ModuleType:
    """The backend module for a call on ``device``: the named one (error if unusable) or the best available."""
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a backend name or None, got {type(backend).__name__}")
        ok, reason = backend_status(backend, device)
        if not ok:
            raise ValueError(f"backend: {backend!r} is not available for {device.type} tensors: {reason}")
        return _load(backend)
    preference = _PREFERENCE.get(device.type, ("torch",))
    for name in preference:
        if backend_status(name, device)[0]:
            if name != preference[0] and name == "torch" and device.type not in _warned:
                _warned.add(device.type)
                warnings.warn(
                    f"lr2kernels: no fused kernel backend is available for {device.type} tensors; using the "
                    "'torch' backend (separate RoPE + scaled_dot_product_attention), which is slower.",
                    UserWarning,
                    stacklevel=3,
                )
            return _load(name)
    raise ValueError(f"backend: no backend is available for {device.type} tensors")
