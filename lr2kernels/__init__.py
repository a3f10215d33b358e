"""lr2kernels: fused LongRoPE2-style rescaled-RoPE attention kernels and the tools around them.

``import lr2kernels`` is cheap: it imports torch, but compiles nothing, imports no transformers and probes no GPU.
"""

from lr2kernels._version import __version__
from lr2kernels.hf import patch, unpatch
from lr2kernels.nn import LongRopeAttention
from lr2kernels.ops import apply_rope, available_backends, rerotate, rope_attention, rope_decode, set_value_checks
from lr2kernels.tables import RopeTable

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
