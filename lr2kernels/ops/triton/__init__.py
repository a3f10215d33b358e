"""The "triton" backend: fused rescaled-RoPE kernels written in Triton.

Runs on CUDA GPUs, and on the CPU through Triton's interpreter when ``TRITON_INTERPRET=1`` (slow; for tests).
Inputs are validated by ``lr2kernels.ops``; this module only prepares launches.
"""

from __future__ import annotations

import importlib.util
import os

import torch

NAME = "triton"


def is_available(device: torch.device | None = None) -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device is None:
        if interpreting or torch.cuda.is_available():
            return True, ""
        return False, "needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels on the CPU in Triton's interpreter"
    if device.type == "cuda" or (device.type == "cpu" and interpreting):
        return True, ""
    if device.type == "cpu":
        return False, "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter; slow, for testing)"
    return False, f"no Triton support for {device.type} tensors"


def _contiguous_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def sequence_is_long(table, batch: int, seq_len: int, position_ids, cu_seqlens, long, device) -> torch.Tensor:
    """int32 flag per sequence (1: long table), computed on the device without a host sync.

    Dense: HF's rule for the whole batch (max position + 1 > L0). Varlen: each sequence by its own max position.
    """
    l0 = table.original_max_position
    if long is not None:
        return torch.full((batch,), int(long), dtype=torch.int32, device=device)
    if cu_seqlens is None:
        if position_ids is None:
            return torch.full((batch,), int(seq_len > l0), dtype=torch.int32, device=device)
        return (position_ids.max() + 1 > l0).to(torch.int32).expand(batch).contiguous()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if position_ids is None:
        return (lengths > l0).to(torch.int32)
    seq_of_token = torch.repeat_interleave(
        torch.arange(batch, device=device), lengths, output_size=position_ids.numel()
    )
    max_pos = torch.full((batch,), -1, dtype=torch.long, device=device)
    max_pos = max_pos.scatter_reduce(0, seq_of_token, position_ids.long(), reduce="amax")
    return (max_pos + 1 > l0).to(torch.int32)


def rope_attention(q, k, v, table, position_ids, causal, softmax_scale, cu_seqlens, max_seqlen, long, return_lse):
    from lr2kernels.ops.triton.attention import RopeAttentionFunction, _Launch

    q, k, v = (_contiguous_last(x) for x in (q, k, v))
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        batch, seq_len = cu_seqlens.numel() - 1, max_seqlen
    else:
        batch, seq_len = q.shape[0], q.shape[2]
    if position_ids is not None:
        position_ids = position_ids.to(torch.int32).contiguous()
    is_long = sequence_is_long(table, batch, seq_len, position_ids, cu_seqlens, long, q.device)
    launch = _Launch(q, k, v, table, position_ids, cu_seqlens, max_seqlen, is_long, causal, softmax_scale)
    out, lse = RopeAttentionFunction.apply(q, k, v, launch)
    return (out, lse) if return_lse else out


def apply_rope(q, k, table, position_ids, long, cu_seqlens):
    from lr2kernels.ops.triton.rope import apply_rope as _apply_rope

    return _apply_rope(q, k, table, position_ids, long, cu_seqlens)


def rerotate(k, table, position_ids, from_long, to_long):
    from lr2kernels.ops.triton.rope import rerotate as _rerotate

    return _rerotate(k, table, position_ids, from_long, to_long)


def rope_decode(q, k_cache, v_cache, cache_seqlens, table, softmax_scale):
    from lr2kernels.ops.triton.decode import rope_decode as _rope_decode

    return _rope_decode(q, k_cache, v_cache, cache_seqlens, table, softmax_scale)
