"""The Triton dq kernel at 256 channels, run in every tile its launcher may keep on a GPU (attention._KEEP), against
the fp64 reference. The interpreter's own config is one small tile; these force each GPU tile, whose causal
diagonal spans BLOCK_M / BLOCK_N key tiles and whose last query block is partial."""

from __future__ import annotations

import pytest
import torch

import lr2kernels as lr2
from lr2kernels import reference
from tests.ops.helpers import DEVICE, make_table, randn, run, tolerance

pytestmark = pytest.mark.usefixtures("nan_empty")


def _kept_dq_tiles_256() -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the pruning keeps for dq at 256 channels, on either arch."""
    if "triton" not in lr2.available_backends():
        return []
    from lr2kernels.ops.triton import attention

    keep = attention._KEEP[("dq", 256, False)]
    return sorted(set().union(*keep.values()) if isinstance(keep, dict) else keep)


@pytest.mark.parametrize("tile", _kept_dq_tiles_256() or [None], ids=lambda t: "none" if t is None else
                         f"M{t[0]}N{t[1]}w{t[2]}s{t[3]}")  # fmt: skip
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_dq_at_256_channels_in_every_kept_tile(monkeypatch, tile, causal):
    if tile is None:
        pytest.skip("the triton backend is not available here")
    import triton

    from lr2kernels.ops.triton import attention

    block_m, block_n, warps, _ = tile
    # One stage: the interpreter runs the loop as written (stages only pipeline it on a GPU).
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=1)
    monkeypatch.setattr(attention._rope_attention_bwd_dq_kernel, "configs", [config])
    table = make_table(256)
    seq_len = block_m + block_m // 2 + 5  # a partial last query block, a partial last key tile
    q, k, v = (randn(1, h, seq_len, 256, dtype=torch.float32, requires_grad=True) for h in (2, 1, 1))  # GQA 2:1
    positions = torch.arange(30, 30 + seq_len, device=DEVICE)[None]  # crosses L0 = 64: the long table
    out = run("triton", lr2.rope_attention, q, k, v, table, causal=causal, position_ids=positions)
    grad_out = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, (q,), grad_out)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected = reference.rope_attention(q64, k64, v64, table, causal=causal, position_ids=positions)
    (want,) = torch.autograd.grad(expected, (q64,), grad_out.double())
    torch.testing.assert_close(dq.double(), want, **tolerance("triton", torch.float32, "attention_grad"))
