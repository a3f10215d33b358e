"""Every public op under ``torch.compile(fullgraph=True)``: no graph break, and the same values as eager.

The torch backend is compiled for real (inductor, on the CPU); the fused backends run as ``torch.ops.lr2kernels``
custom ops, which the compiler must see through by their fake implementations and registered autograd (checked with
``aot_eager`` in Triton's interpreter, and by ``torch.library.opcheck``).
"""

from __future__ import annotations

import pytest
import torch

import lr2kernels as lr2
from lr2kernels.ops import dispatch
from tests.ops.helpers import DEVICE, make_table

TABLE = make_table(64, rotary_dim=48)  # partial rotary, L0 = 64
SEQ = 80  # past L0: the long table
CPU = torch.device("cpu")  # inductor compiles the torch backend here; the fused ops run on DEVICE


def _inputs(requires_grad: bool = False, device: torch.device = CPU):
    torch.manual_seed(0)
    q = torch.randn(2, 4, SEQ, 64, device=device, requires_grad=requires_grad)
    k = torch.randn(2, 2, SEQ, 64, device=device, requires_grad=requires_grad)
    v = torch.randn(2, 2, SEQ, 64, device=device, requires_grad=requires_grad)
    return q, k, v


def _varlen(x: torch.Tensor) -> torch.Tensor:
    return x.detach()[0].transpose(0, 1).contiguous().requires_grad_(x.requires_grad)  # [T, H, D]


CU_SEQLENS = [0, 30, 30, SEQ]  # an empty sequence; one of 30, one of 50


def _ops(backend: str, device: torch.device = CPU):
    """name -> (function of tensors, its tensor inputs on ``device``, differentiable?)."""
    q, k, v = _inputs(requires_grad=True, device=device)
    positions = torch.arange(SEQ, device=device)
    cu_seqlens = torch.tensor(CU_SEQLENS, dtype=torch.int32, device=device)
    return {
        "apply_rope": (
            lambda q, k, p: lr2.apply_rope(q, k, TABLE, position_ids=p, backend=backend),
            (q, k, positions),
            True,
        ),
        "rope_attention": (
            lambda q, k, v, p: lr2.rope_attention(q, k, v, TABLE, position_ids=p, backend=backend),
            (q, k, v, positions),
            True,
        ),
        "rope_attention_lse": (
            lambda q, k, v: lr2.rope_attention(q, k, v, TABLE, return_lse=True, backend=backend),
            (q, k, v),
            False,
        ),
        "rope_attention_varlen": (
            lambda q, k, v, cu: lr2.rope_attention(q, k, v, TABLE, cu_seqlens=cu, max_seqlen=50, backend=backend),
            (_varlen(q), _varlen(k), _varlen(v), cu_seqlens),
            True,
        ),
        "rope_decode": (
            lambda q, kc, vc, n: lr2.rope_decode(q, kc, vc, TABLE, cache_seqlens=n, backend=backend),
            (q.detach()[:, :, :1], k.detach(), v.detach(), torch.tensor([SEQ, 40], device=device)),
            False,
        ),
        "rerotate": (
            lambda k, p: lr2.rerotate(k, TABLE, position_ids=p, from_long=False, to_long=True, backend=backend),
            (k, positions),
            True,
        ),
    }


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _check_compiled(backend: str, compiler: str, name: str, device: torch.device = CPU):
    fn, inputs, differentiable = _ops(backend, device)[name]
    torch._dynamo.reset()
    dispatch._instances.clear()  # the backend choice (imports, probes) must stay out of the graph, even the first
    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    compiled_out = _as_tuple(compiled(*inputs))  # first: traced with no backend imported by an eager call yet
    eager_out = _as_tuple(fn(*inputs))
    for eager, got in zip(eager_out, compiled_out):
        torch.testing.assert_close(got, eager, atol=2e-5, rtol=2e-5)
    if not differentiable:
        return
    leaves = [x for x in inputs if x.requires_grad]
    grad_out = [torch.randn_like(x) for x in eager_out]
    eager_grads = torch.autograd.grad(eager_out, leaves, grad_out)
    compiled_grads = torch.autograd.grad(_as_tuple(compiled(*inputs)), leaves, grad_out)
    for eager, got in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(got, eager, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", list(_ops("torch")))
def test_torch_backend_compiles_fullgraph(name):
    _check_compiled("torch", "inductor", name)


@pytest.mark.skipif("triton" not in lr2.available_backends(), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", list(_ops("torch")))
def test_fused_custom_ops_trace_fullgraph(name):
    # The custom ops are opaque to the compiler: it traces the preparation around them and their fake and
    # autograd registrations (aot_eager: no code generation, so the interpreter can run the kernels). On DEVICE:
    # where Triton runs here (a GPU when there is one: it takes no CPU tensors then).
    _check_compiled("triton", "aot_eager", name, DEVICE)


def test_backend_choice_is_marked_constant_as_torch_would():
    marked = torch.compiler.assume_constant_result(lambda: None)
    for attribute, value in vars(marked).items():
        assert getattr(dispatch._choose, attribute, None) == value, attribute
