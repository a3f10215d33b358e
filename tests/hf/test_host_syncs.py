"""A patched model reads device data on the host at most once per forward (CUDA graphs, latency).

On a GPU every ``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)`` of a device tensor stalls the host until the
device catches up. The package may read values freely only where they already live on the host
(``lr2kernels.ops.validation.reads_values``); these tests turn that off (the ``as_on_a_gpu`` fixture), so the CPU
run behaves as a GPU run would, and count every such read made from the package's own code during a forward.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import lr2kernels as lr2
from tests.models import L0, tiny_model

PACKAGE_DIR = str(Path(lr2.__file__).parent)
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


class HostReads:
    """Counts Tensor value reads whose caller chain passes through the lr2kernels package."""

    def __init__(self, monkeypatch):
        self.count = 0
        self.where: list[str] = []
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))

    def _wrap(self, original):
        counter = self

        def read(tensor, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None:
                if frame.f_code.co_filename.startswith(PACKAGE_DIR):
                    counter.count += 1
                    counter.where.append(f"{frame.f_code.co_filename}:{frame.f_lineno}")
                    break
                frame = frame.f_back
            return original(tensor, *args, **kwargs)

        return read

    def take(self) -> int:
        count, self.count = self.count, 0
        self.where.clear()
        return count


@pytest.mark.parametrize("rule", ["hf", "position"])
def test_one_host_read_per_forward(as_on_a_gpu, monkeypatch, rule):
    model = lr2.patch(tiny_model("llama", layers=3), backend="torch", rule=rule)
    ids = torch.randint(1, 101, (2, L0 + 4), generator=torch.Generator().manual_seed(0))
    reads = HostReads(monkeypatch)
    with torch.no_grad():
        out = model(ids[:, : L0 - 2], use_cache=True)  # prefill below L0
        per_forward = [reads.take()]
        cache = out.past_key_values
        for t in range(L0 - 2, L0 + 4):  # decode steps that cross L0
            cache = model(ids[:, t : t + 1], cache=cache, use_cache=True).past_key_values
            per_forward.append(reads.take())
    assert max(per_forward) <= 1, per_forward


def test_fused_calls_read_nothing_with_their_lengths_given(as_on_a_gpu, monkeypatch):
    # The public ops themselves: no value reads when the caller supplies what the grid needs (max_seqlen).
    table = lr2.RopeTable.longrope(
        head_dim=16, base=10000.0, original_max_position=L0, max_position=8 * L0,
        short_factor=[1.0] * 8, long_factor=[2.0] * 8,
    )  # fmt: skip
    q, k, v = torch.randn(40, 4, 16), torch.randn(40, 2, 16), torch.randn(40, 2, 16)
    cu_seqlens = torch.tensor([0, 10, 40], dtype=torch.int32)
    reads = HostReads(monkeypatch)
    lr2.rope_attention(q, k, v, table, cu_seqlens=cu_seqlens, max_seqlen=30, backend="torch")
    lr2.apply_rope(q, k, table, cu_seqlens=cu_seqlens, backend="torch")
    caches = torch.randn(2, 2, 50, 16), torch.randn(2, 2, 50, 16)
    lr2.rope_decode(q[:2, :, None], *caches, table, cache_seqlens=torch.tensor([50, 20]), backend="torch")
    assert reads.take() == 0, reads.where
