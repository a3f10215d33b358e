"""The "triton" backend: fused rescaled-RoPE kernels written in Triton.

Runs on CUDA GPUs, and on the CPU through Triton's interpreter when ``TRITON_INTERPRET=1`` (slow; for tests). The
ops run as ``torch.ops.lr2kernels.*`` custom ops (:mod:`lr2kernels.ops.custom_ops`) over the launchers of
``attention.py``, ``rope.py`` and ``decode.py``; the kernel modules are imported on first launch.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import types

import torch

from lr2kernels.ops.calls import CallSpec
from lr2kernels.ops.fused import FusedBackend

# Head sizes the kernels are tiled for: up to 256 channels, each segment in at most two power-of-two tiles (_host).
MAX_HEAD_DIM = 256
_TL_DOT_OPS = ("rope_attention", "rope_decode")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton 3.6's interpreter turns a scalar into a Python int with int(array) of a 1-element array, which NumPy 2.4
# made an error ("only 0-dimensional arrays can be converted to Python scalars"): every kernel loop over a loaded
# length fails. Triton 3.9's squeezes first. Found by its source line, so any Triton with the fix passes.
_UNSQUEEZED_INDEX = '"__index__", lambda self: int(self.handle.data))'


def interpreter_problem(numpy_version: str, interpreter_source: str) -> str:
    """Why this Triton interpreter cannot run the kernels with this NumPy ("" when it can)."""
    major, minor = (int(part) for part in numpy_version.split(".")[:2])
    if (major, minor) >= (2, 4) and _UNSQUEEZED_INDEX in interpreter_source:
        return (
            f"this Triton's interpreter cannot run loops over loaded lengths with NumPy {numpy_version} (>= 2.4 "
            f"refuses int() of a 1-element array): pip install 'numpy<2.4', or a Triton whose interpreter squeezes "
            f"first (3.9 does)"
        )
    return ""


@functools.cache
def _installed_interpreter_problem() -> str:
    import inspect

    import numpy
    import triton.runtime.interpreter

    return interpreter_problem(numpy.__version__, inspect.getsource(triton.runtime.interpreter))


class TritonBackend(FusedBackend):
    NAME = "triton"

    def is_available(self, device: torch.device | None = None) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (pip install triton)"
        if device is None:
            if torch.cuda.is_available():
                return True, ""
            if _interpreting():
                problem = _installed_interpreter_problem()
                return not problem, problem
            return False, "needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels on the CPU (Triton's interpreter)"
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and _interpreting():
            problem = _installed_interpreter_problem()
            return not problem, problem
        if device.type == "cpu":
            return False, "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter; slow, for testing)"
        return False, f"no Triton support for {device.type} tensors"

    def supports(self, spec: CallSpec) -> tuple[bool, str]:
        if spec.dtype == torch.float64:
            return False, "the Triton kernels compute in fp32 and are not built for float64 inputs"
        if spec.head_dim > MAX_HEAD_DIM:
            return False, f"head_dim {spec.head_dim} is above the kernels' largest tile ({MAX_HEAD_DIM})"
        if spec.dtype == torch.bfloat16 and spec.device.type == "cpu" and spec.op in _TL_DOT_OPS:
            return False, "Triton's interpreter computes bf16 tl.dot wrongly: bf16 attention needs a GPU"
        return True, ""

    @functools.cached_property
    def _launchers(self) -> types.SimpleNamespace:
        from lr2kernels.ops.triton import attention, decode, rope

        return types.SimpleNamespace(
            rope_attention_fwd=attention.rope_attention_fwd,
            rope_attention_bwd=attention.rope_attention_bwd,
            apply_rope=rope.apply_rope,
            rerotate=rope.rerotate,
            rope_decode=decode.rope_decode,
        )

    def launchers(self) -> types.SimpleNamespace:
        return self._launchers  # the kernel modules are imported on the first launch, once


BACKEND = TritonBackend()
