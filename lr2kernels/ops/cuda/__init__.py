"""The "cuda" backend: hand-written CUDA C++ kernels (``csrc/``, built into the optional extension lr2kernels._cuda).

Phase 1 implements ``rope_decode`` (split-KV decode on a PRE-RoPE cache, dense or paged through a block table),
``apply_rope`` (with its backward, the transposed rotation) and ``rerotate``; ``supports()`` declines
``rope_attention`` with a reason, so with ``backend=None`` that op runs on the next backend (triton). The ops run as
``torch.ops.lr2kernels.*`` custom ops over the launchers of :mod:`lr2kernels.ops.cuda.launch`. Nothing here imports
the extension or probes a GPU at import: the extension is loaded (once) by the first availability probe or launch.
"""

from __future__ import annotations

import types

import torch

from lr2kernels.ops.calls import CallSpec
from lr2kernels.ops.cuda import launch
from lr2kernels.ops.fused import FusedBackend

__all__ = ["BACKEND", "CudaBackend"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OPS = ("apply_rope", "rerotate", "rope_decode")


def _not_implemented(op: str):
    def launcher(*args, **kwargs):
        raise NotImplementedError(f"the cuda backend has no {op} kernel yet (supports() declines it)")

    return launcher


class CudaBackend(FusedBackend):
    NAME = "cuda"

    def is_available(self, device: torch.device | None = None) -> tuple[bool, str]:
        module, reason = launch.load_extension()
        if module is None:
            return False, reason
        if device is not None and device.type != "cuda":
            return False, f"the CUDA kernels run on CUDA tensors only, not {device.type} tensors"
        count, error = launch.device_count()
        if count == 0:
            return False, f"no GPU: the CUDA runtime sees no device ({error or 'no CUDA device'})"
        if not torch.cuda.is_available():
            return False, "this torch has no CUDA support (a CPU-only build), so there are no CUDA tensors"
        return True, ""

    def supports(self, spec: CallSpec) -> tuple[bool, str]:
        if spec.op not in _OPS:
            return False, f"no CUDA kernel for {spec.op} yet (phase 1 has {', '.join(_OPS)})"
        if spec.dtype not in _DTYPES:
            return False, f"the CUDA kernels are built for float32, float16 and bfloat16, not {spec.dtype}"
        if spec.op == "rope_decode" and spec.head_dim not in launch.DECODE_HEAD_DIMS:
            dims = ", ".join(map(str, launch.DECODE_HEAD_DIMS))
            return False, f"rope_decode's CUDA kernel is instantiated for head_dim {dims}, not {spec.head_dim}"
        return True, ""

    def launchers(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(
            rope_attention_fwd=_not_implemented("rope_attention"),
            rope_attention_bwd=_not_implemented("rope_attention"),
            apply_rope=launch.apply_rope,
            rerotate=launch.rerotate,
            rope_decode=launch.rope_decode,
        )


BACKEND = CudaBackend()
