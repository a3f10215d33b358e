"""What the op tests share: the backends to run, their tolerances, tables whose short and long halves differ, inputs,
and an independent HF-based oracle. Fixtures (``backend``, ``nan_empty``) are in tests/ops/conftest.py.

Every op test that takes the ``backend`` fixture runs once per backend of :func:`lr2kernels.available_backends`
("torch" always; "triton" on a GPU or under ``TRITON_INTERPRET=1``, which tests/conftest.py sets without a GPU). A
case a backend declines (``supports(call.spec)``: e.g. triton with float64, or bf16 attention in Triton's
interpreter) is skipped with the backend's reason by :func:`run`, never passed silently; cases too large for the
interpreter are skipped, with that reason, for triton on the CPU only (:func:`skip_in_interpreter`). Tests of one
backend only carry its name (``test_torch_backend_*``, ``test_triton_*``)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import lr2kernels as lr2
from lr2kernels.ops import dispatch, validation
from lr2kernels.ops.calls import OpCall
from lr2kernels.tables import RopeTable
from tests.models import DEVICE

L0 = 64  # small original length so that the odd test lengths (63, 100, 257) straddle it
BACKENDS = lr2.available_backends()
# Triton's CPU interpreter runs every lane in numpy: the largest shapes are left to the GPU.
INTERPRETED = DEVICE.type == "cpu"
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dtype_id(dtype: torch.dtype) -> str:
    return DTYPE_IDS[dtype]


# ------------------------------------------------------------------------------------------------ backends
requires_triton = pytest.mark.skipif(
    not dispatch.backend_status("triton", DEVICE)[0],
    reason=f"triton backend: {dispatch.backend_status('triton', DEVICE)[1]}",
)


def skip_in_interpreter(backend: str, too_large: bool) -> None:
    """Skip a case too large for Triton's CPU interpreter (it runs on a GPU, and on the other backends)."""
    if too_large and backend == "triton" and INTERPRETED:
        pytest.skip("too slow for Triton's CPU interpreter: this case runs on a GPU")


_CHECKS = {
    "apply_rope": validation.check_rope_call,
    "rope_attention": validation.check_attention_call,
    "rope_decode": validation.check_decode_call,
    "rerotate": validation.check_rerotate_call,
}


def build_call(op, *args, **kwargs) -> OpCall:
    """The call description ``op(*args, **kwargs)`` (a public op of lr2kernels) hands to its backend."""
    bound = inspect.signature(op).bind(*args, **kwargs)
    bound.apply_defaults()
    del bound.arguments["backend"]
    bound.arguments.pop("options_passed_positionally", None)  # () here: the ops reject 0.1's positional options
    return _CHECKS[op.__name__](**bound.arguments)


def skip_unless_supported(backend: str, call: OpCall) -> None:
    """Skip the test, with the backend's reason, when ``backend`` declines ``call`` (``supports(call.spec)``)."""
    ok, reason = dispatch.get_backend(backend).supports(call.spec)
    if not ok:
        pytest.skip(f"{backend} backend does not support this {call.op}: {reason}")


def run(backend: str, op, *args, **kwargs):
    """``op(*args, **kwargs, backend=backend)``; skips the test when the backend does not support the case."""
    skip_unless_supported(backend, build_call(op, *args, **kwargs))
    return op(*args, backend=backend, **kwargs)


# ---------------------------------------------------------------------------------------------- tolerances
# Tolerances of the torch backend vs the fp64 oracle, by dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2.5e-2, rtol=2.5e-2),
}
# The Triton kernels vs the fp64 reference, by dtype (their attention output).
TRITON_TOLERANCES = {torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _same(value: float) -> dict:
    return dict(atol=value, rtol=value)


# What each backend is held to, by (backend, dtype), for each kind of result against the fp64 oracle.
_TOLERANCES = {
    # rope_attention's output
    "attention": {
        **{("torch", dtype): tol for dtype, tol in TOLERANCES.items()},
        **{("triton", dtype): _same(tol) for dtype, tol in TRITON_TOLERANCES.items()},
    },
    # rope_attention's gradients (fp32)
    "attention_grad": {("torch", torch.float32): _same(5e-5), ("triton", torch.float32): _same(1e-4)},
    # rope_decode's output
    "decode": {("torch", torch.float32): TOLERANCES[torch.float32], ("triton", torch.float32): _same(2e-5)},
    # apply_rope's output and gradients, rerotate's gradient (fp32)
    "rope": {("torch", torch.float32): _same(1e-5), ("triton", torch.float32): _same(2e-6)},
    # rerotate's output (fp32): fp32 cos/sin lie on the circle only to ~1e-7, which bounds any one-pass rerotation
    "rerotate": {("torch", torch.float32): _same(2e-5), ("triton", torch.float32): dict(atol=4e-6, rtol=0)},
}

# The CUDA kernels are fused kernels of the same arithmetic (fp32 angles and accumulation): the Triton tolerances.
for _kind in _TOLERANCES.values():
    _kind.update({("cuda", dtype): tol for (name, dtype), tol in list(_kind.items()) if name == "triton"})


def tolerance(backend: str, dtype: torch.dtype, kind: str = "attention") -> dict:
    """``atol``/``rtol`` for ``torch.testing.assert_close`` of ``backend``'s ``kind`` of result in ``dtype``."""
    return _TOLERANCES[kind][backend, dtype]


# --------------------------------------------------------------------------------------------------- inputs
def randn(*shape, dtype: torch.dtype = torch.float32, requires_grad: bool = False) -> torch.Tensor:
    """Standard normal values drawn in fp32 on DEVICE, then cast (so every dtype sees the same numbers)."""
    return torch.randn(shape, device=DEVICE).to(dtype).requires_grad_(requires_grad)


def cu_seqlens_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def make_table(head_dim: int, rotary_dim: int | None = None, original_max_position: int = L0) -> RopeTable:
    """A LongRoPE table with a non-trivial long table and attention factor (short != long everywhere but dim 0)."""
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    half = rotary_dim // 2
    long_factor = [1.0 + 7.0 * (i / max(half - 1, 1)) ** 1.5 for i in range(half)]
    short_factor = [1.0 + 0.1 * i / half for i in range(half)]
    return RopeTable.longrope(
        head_dim=head_dim,
        base=10000.0,
        original_max_position=original_max_position,
        max_position=8 * original_max_position,
        short_factor=short_factor,
        long_factor=long_factor,
        rotary_dim=rotary_dim,
    )


# --------------------------------------------------------------------------------------------------- oracle
def hf_rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' own rotation (Phi3's, which handles partial rotary); q, k ``[B, H, L, D]``, cos ``[B, L, r]``."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def naive_attention(q, k, v, causal: bool, scale: float | None = None, query_offset: int = 0):
    """softmax(q k^T * scale) v with HF's repeat_kv for GQA; ``[B, H, L, D]``; query i sits at key query_offset+i."""
    from transformers.models.llama.modeling_llama import repeat_kv

    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if causal:
        lq, lk = scores.shape[-2:]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=query_offset)
        scores = scores.masked_fill(~mask, -math.inf)
    return torch.softmax(scores, dim=-1) @ v


def hf_rope_attention(q, k, v, table: RopeTable, position_ids=None, causal=True, long=None, scale=None):
    """Oracle for dense rope_attention: HF cos/sin + HF rotation + naive attention, all in q's dtype."""
    batch, _, seq, _ = q.shape
    if position_ids is None:
        position_ids = torch.arange(seq, device=q.device)
    position_ids = position_ids.expand(batch, seq) if position_ids.dim() == 1 else position_ids
    cos, sin = table.cos_sin(position_ids, long=long)
    q_rot, k_rot = hf_rotate(q, k, cos.to(q.dtype), sin.to(q.dtype))
    return naive_attention(q_rot, k_rot, v, causal, scale)


def hf_rope_decode(q, k_cache, v_cache, cache_seqlens, table: RopeTable):
    """Oracle for rope_decode in q's dtype: per sequence, HF's cos/sin for its length, HF's rotation of the valid
    cache slots and the new queries, naive causal attention of the queries at the sequence's last positions."""
    n_new, rows = q.shape[2], []
    for b, length in enumerate(cache_seqlens.tolist()):
        cos, sin = table.cos_sin(torch.arange(length, device=q.device)[None], long=table.use_long(length))
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # [1, length, r]
        q_rot, _ = hf_rotate(q[b : b + 1], q[b : b + 1], cos[:, -n_new:], sin[:, -n_new:])
        k_rot, _ = hf_rotate(k_cache[b : b + 1, :, :length], k_cache[b : b + 1, :, :length], cos, sin)
        rows.append(naive_attention(q_rot, k_rot, v_cache[b : b + 1, :, :length], True, query_offset=length - n_new))
    return torch.cat(rows)
