"""The fused kernels' ``torch.library`` registrations, checked by ``torch.library.opcheck``.

opcheck runs each op for real and against its fake implementation (shapes, dtypes, strides), checks the schema
(no mutation, no aliasing) and that the registered autograd agrees with the op. Needs a kernel backend: Triton on a
GPU or in its interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import pytest
import torch

import lr2kernels as lr2
from lr2kernels.ops import custom_ops, rotary  # noqa: F401  (registers torch.ops.lr2kernels)
from tests.ops.helpers import DEVICE, make_table

pytestmark = pytest.mark.skipif("triton" not in lr2.available_backends(), reason="needs a GPU or TRITON_INTERPRET=1")
# Every tensor on DEVICE: where Triton runs here (a GPU when there is one: it takes no CPU tensors then).

TABLE = make_table(64, rotary_dim=48)
# schema, fake tensor and autograd registration; not the opcheck variants that rerun the op under extra modes.
CHECKS = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def _table_args():
    inv_freq = rotary.inv_freq_pair(TABLE, DEVICE).contiguous()
    return inv_freq, TABLE.attention_factor_for(False), TABLE.attention_factor_for(True)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_rope_attention_ops(varlen):
    torch.manual_seed(0)
    inv_freq, short, long = _table_args()
    if varlen:
        q, k, v = (torch.randn(40, h, 64, device=DEVICE, requires_grad=True) for h in (4, 2, 2))
        cu_seqlens = torch.tensor([0, 15, 40], dtype=torch.int32, device=DEVICE)
        is_long, max_seqlen = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE), 25
    else:
        q, k, v = (torch.randn(2, h, 40, 64, device=DEVICE, requires_grad=True) for h in (4, 2, 2))
        cu_seqlens, is_long, max_seqlen = None, torch.tensor([1, 1], dtype=torch.int32, device=DEVICE), 40
    args = (q, k, v, inv_freq, is_long, None, cu_seqlens, max_seqlen, True, 0.125, short, long, "triton")
    torch.library.opcheck(torch.ops.lr2kernels.rope_attention_fwd.default, args, test_utils=CHECKS)
    out, lse = torch.ops.lr2kernels.rope_attention_fwd(*args)
    grad = torch.randn_like(out)
    backward_args = (grad, q.detach(), k.detach(), v.detach(), out.detach(), lse, *args[3:])
    torch.library.opcheck(torch.ops.lr2kernels.rope_attention_bwd.default, backward_args, test_utils=CHECKS)


def test_apply_rope_and_rerotate_ops():
    torch.manual_seed(0)
    inv_freq, short, long = _table_args()
    q = torch.randn(2, 4, 20, 64, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 20, 64, device=DEVICE, requires_grad=True)
    positions = torch.arange(60, 80, dtype=torch.int32, device=DEVICE)
    is_long = torch.tensor([1, 1], dtype=torch.int32, device=DEVICE)
    rope_args = (q, k, inv_freq, is_long, positions, None, 20, short, long, False, "triton")
    torch.library.opcheck(torch.ops.lr2kernels.apply_rope.default, rope_args, test_utils=CHECKS)
    rerotate_args = (k, inv_freq, positions, False, True, long / short, False, "triton")
    torch.library.opcheck(torch.ops.lr2kernels.rerotate.default, rerotate_args, test_utils=CHECKS)


def test_rope_decode_op():
    torch.manual_seed(0)
    inv_freq, short, long = _table_args()
    q = torch.randn(2, 4, 1, 64, device=DEVICE)
    k_cache, v_cache = torch.randn(2, 2, 96, 64, device=DEVICE), torch.randn(2, 2, 96, 64, device=DEVICE)
    lengths = torch.tensor([96, 30], device=DEVICE)
    args = (q, k_cache, v_cache, lengths, inv_freq, TABLE.original_max_position, short, long, 0.125)
    torch.library.opcheck(torch.ops.lr2kernels.rope_decode.default, (*args, "triton"), test_utils=CHECKS[:2])
