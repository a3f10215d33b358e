"""Backend contract and registry: which backends exist, which are usable here, and which one a call gets.

A backend is an object of the :class:`Backend` protocol: ``is_available(device)`` for the machine, ``supports(call)``
for one call (dtype, head_dim, layout), and one method per op taking the typed call description built by
validation. Backends are imported lazily on first use, so ``import lr2kernels`` compiles nothing and probes no GPU.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Protocol

import torch

from lr2kernels.ops.calls import AttentionCall, CallSpec, DecodeCall, OpCall, RerotateCall, RopeCall


class Backend(Protocol):
    """What ``lr2kernels.ops`` needs of a backend. The call's inputs are validated; ``supports`` was asked first."""

    NAME: str

    def is_available(self, device: torch.device | None = None) -> tuple[bool, str]:
        """(usable, why not) for tensors on ``device`` (None: anywhere on this machine)."""

    def supports(self, spec: CallSpec) -> tuple[bool, str]:
        """(runs calls like this, why not), from the call's metadata only: op, device, dtype, head_dim, layout."""

    def apply_rope(self, call: RopeCall) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rope_attention(self, call: AttentionCall) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...

    def rope_decode(self, call: DecodeCall) -> torch.Tensor: ...

    def rerotate(self, call: RerotateCall) -> torch.Tensor: ...


# name -> "module:attribute" of the backend object; None marks a backend planned but not in this version.
_BACKENDS: dict[str, str | None] = {
    "torch": "lr2kernels.ops.torch_backend:BACKEND",
    "triton": "lr2kernels.ops.triton:BACKEND",
    "cuda": "lr2kernels.ops.cuda:BACKEND",
}
_NOT_BUILT_REASON = "not part of this version of lr2kernels yet"
# Order of preference for backend=None, per device type. The CUDA kernels come after Triton until
# benchmarks/gpu_check.sh has validated them on a GPU (they compile and their math is tested on the CPU, but no
# kernel has run yet): backend="cuda" selects them explicitly.
_PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("torch",)}
_instances: dict[str, Backend] = {}  # "module:attribute" -> the imported backend object
_warned: set[tuple[str, str]] = set()


def get_backend(name: str) -> Backend | None:
    """The backend object registered as ``name`` (imported on first use), None for a planned one."""
    if name not in _BACKENDS:
        raise ValueError(f"backend: expected one of {list(_BACKENDS)} or None, got {name!r}")
    target = _BACKENDS[name]
    if target is None:
        return None
    if target not in _instances:
        module, attribute = target.split(":")
        _instances[target] = getattr(importlib.import_module(module), attribute)
    return _instances[target]


def backend_status(name: str, device: torch.device | None = None) -> tuple[bool, str]:
    """(available, reason-if-not) for one backend on ``device`` (None: anywhere on this machine)."""
    backend = get_backend(name)
    if backend is None:
        return False, _NOT_BUILT_REASON
    return backend.is_available(device)


def available_backends() -> list[str]:
    """Backends usable on this machine: "torch" always; "triton" / "cuda" where their kernels can run."""
    return [name for name in _BACKENDS if backend_status(name)[0]]


def resolve(backend: str | None, call: OpCall) -> Backend:
    """The backend that runs ``call``: the named one (an error says why it cannot), or the best one that can.

    With ``backend=None`` a call that the preferred backend does not support runs on the next one, with a one-time
    warning naming the reason, since that path is slower.
    """
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name or None, got {type(backend).__name__}")
    spec = call.spec
    name = _choose(backend, spec.op, spec.device.type, spec.device.index, spec.dtype, spec.head_dim, spec.varlen)
    return _instances[_BACKENDS[name]]


def backend_name(
    op: str, device: torch.device, dtype: torch.dtype, head_dim: int, backend: str | None = None, varlen: bool = False
) -> str:
    """The name of the backend that a call of ``op`` with this metadata runs on (as :func:`resolve` chooses it);
    remembered per metadata, since availability does not change within a process."""
    key = (op, device, dtype, head_dim, backend, varlen)
    name = _chosen.get(key)
    if name is None:
        name = _chosen[key] = _choose(backend, op, device.type, device.index, dtype, head_dim, varlen)
    return name


_chosen: dict[tuple, str] = {}  # backend_name's answers


def _choose(
    backend: str | None,
    op: str,
    device_type: str,
    device_index: int | None,
    dtype: torch.dtype,
    head_dim: int,
    varlen: bool,
) -> str:
    """The backend's name for a call with this metadata. Pure metadata in, a name out: ``torch.compile`` runs it
    once while tracing and keeps the answer, so the choice (imports, availability probes) never enters a graph."""
    spec = CallSpec(op, torch.device(device_type, device_index), dtype, head_dim, varlen)
    if backend is not None:
        ok, reason = backend_status(backend, spec.device)
        if ok:
            ok, reason = get_backend(backend).supports(spec)
        if not ok:
            raise ValueError(f"backend: {backend!r} cannot run this {op} on {device_type} tensors: {reason}")
        return backend
    preference = _PREFERENCE.get(device_type, ("torch",))
    skipped: list[str] = []
    for name in preference:
        ok, reason = backend_status(name, spec.device)
        if ok:
            ok, reason = get_backend(name).supports(spec)
        if ok:
            if skipped and name == "torch":
                _warn_slower(spec, skipped)
            return name
        skipped.append(f"{name}: {reason}")
    raise ValueError(f"backend: no backend can run this {op} on {device_type} tensors ({'; '.join(skipped)})")


# What torch.compiler.assume_constant_result(_choose) does, without importing torch._dynamo (and with it triton)
# at package import; tests/ops/test_compile.py checks that the mark is the one torch's decorator sets.
_choose._dynamo_marked_constant = True


def _warn_slower(spec: CallSpec, skipped: list[str]) -> None:
    key = (spec.op, spec.device.type)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"lr2kernels: {spec.op} on {spec.device.type} tensors runs on the 'torch' backend (separate RoPE + "
        f"scaled_dot_product_attention), which is slower: no fused kernel backend can run it ({'; '.join(skipped)}).",
        UserWarning,
        stacklevel=5,
    )
