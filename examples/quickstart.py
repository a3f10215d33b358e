"""lr2kernels in one minute: a LongRoPE table, fused-style attention on pre-RoPE q/k, and decode across L0.

Run: python examples/quickstart.py [--device cpu|cuda] [--backend torch|triton|cuda] [--tolerance 1e-4]
Everything here is checked against lr2kernels.reference and printed; the exit code is 1 if any error is above its
tolerance (``--tolerance``, or twice stock PyTorch attention's own error on the same input where that is larger).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import lr2kernels as lr2
from lr2kernels import reference


def build_table() -> lr2.RopeTable:
    """A LongRoPE-style table: plain RoPE up to L0 = 256, YaRN-shaped factors up to 8x beyond it."""
    head_dim, base, l0, target = 64, 10000.0, 256, 2048
    long = lr2.RopeTable.yarn(head_dim=head_dim, base=base, original_max_position=l0, max_position=target)
    return lr2.RopeTable.longrope(
        head_dim=head_dim,
        base=base,
        original_max_position=l0,
        max_position=target,
        short_factor=[1.0] * (head_dim // 2),
        long_factor=long.long_factor,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda where available)")  # fmt: skip
    parser.add_argument("--backend", default=None, help="torch, triton or cuda (default: the best for the device)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest max-abs error accepted against the fp64 reference (default: 1e-4)")  # fmt: skip
    args = parser.parse_args()
    if not args.tolerance > 0:
        parser.error(f"--tolerance: expected a positive number, got {args.tolerance}")
    failed: list[str] = []

    def check(name: str, error: float, tolerance: float) -> None:
        if not error <= tolerance:  # NaN fails too
            failed.append(f"{name}: error {error:.2e} above the tolerance {tolerance:.2e}")

    device = torch.device(args.device)
    torch.manual_seed(0)

    table = build_table()
    print(f"lr2kernels {lr2.__version__}; backends here: {lr2.available_backends()}")
    print(
        f"table: head_dim {table.head_dim}, L0 {table.original_max_position} -> {table.max_position}, "
        f"attention factor {table.attention_factor:.4f}, long factors {table.long_factor[0]:.2f}"
        f"..{table.long_factor[-1]:.2f}"
    )

    # 1. Dense causal attention on PRE-RoPE q/k, 512 tokens (past L0: the long table), GQA 3:1.
    q = torch.randn(1, 6, 512, 64, device=device)
    k = torch.randn(1, 2, 512, 64, device=device)
    v = torch.randn(1, 2, 512, 64, device=device)
    out = lr2.rope_attention(q, k, v, table, backend=args.backend)
    ref = reference.rope_attention(q.double(), k.double(), v.double(), table)
    print(f"rope_attention [1, 6, 512, 64]: max |ours - reference| = {(out.double() - ref).abs().max():.2e}")
    # The yardstick: PyTorch's own fp32 attention on the same rotated inputs, on this machine. fp32 attention
    # kernels differ by CPU and GPU (blocking, fused multiply-add, reduced-precision matmul modes); ours should be
    # as close to the reference as stock attention is.
    q_rot, k_rot = reference.apply_rope(q.double(), k.double(), table)
    stock = torch.nn.functional.scaled_dot_product_attention(
        q_rot.float(), k_rot.float(), v, is_causal=True, enable_gqa=True
    )
    stock_error = (stock.double() - ref).abs().max()
    print(f"  PyTorch SDPA on the same rotated q/k (fp32): max |stock - reference| = {stock_error:.2e}")
    # fp32 attention kernels differ by machine: ours must be within the tolerance, or within twice stock's error.
    check("rope_attention", float((out.double() - ref).abs().max()), max(args.tolerance, 2 * float(stock_error)))

    # 2. Varlen: three packed sequences, each picks its own table (100 and 200 short, 300 long).
    lengths = [100, 300, 200]
    cu_seqlens = torch.tensor([0, 100, 400, 600], dtype=torch.int32, device=device)
    qv, kv, vv = (torch.randn(600, h, 64, device=device) for h in (6, 2, 2))
    out_v = lr2.rope_attention(qv, kv, vv, table, cu_seqlens=cu_seqlens, max_seqlen=300, backend=args.backend)
    ref_v = reference.rope_attention(qv.double(), kv.double(), vv.double(), table, cu_seqlens=cu_seqlens)
    tables = ["long" if table.use_long(n) else "short" for n in lengths]
    print(f"varlen {lengths} -> tables {tables}: max error {(out_v.double() - ref_v).abs().max():.2e}")
    check("varlen rope_attention", float((out_v.double() - ref_v).abs().max()), args.tolerance)

    # 3. Decode across the boundary on a PRE-RoPE cache: token 257 switches to the long table, no re-prefill.
    k_cache = torch.zeros(1, 2, 512, 64, device=device)
    v_cache = torch.zeros(1, 2, 512, 64, device=device)
    k_cache[:, :, :257], v_cache[:, :, :257] = k[:, :, :257], v[:, :, :257]
    step = lr2.rope_decode(q[:, :, 256:257], k_cache, v_cache, table, cache_seqlens=torch.tensor([257], device=device))
    full = reference.rope_attention(q[:, :, :257].double(), k[:, :, :257].double(), v[:, :, :257].double(), table)
    step_error = (step.double() - full[:, :, 256:]).abs().max()
    print(f"decode step at position 256 (257 > L0): max |step - full forward| = {step_error:.2e}")
    check("rope_decode", float(step_error), args.tolerance)

    # 4. Save the table, and export it for transformers / vLLM.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.json"
        table.save(path)
        assert lr2.RopeTable.load(path) == table
    params = table.to_hf_rope_parameters()
    shown = {key: (f"[{len(val)} factors]" if isinstance(val, list) else val) for key, val in params.items()}
    print("HF rope_parameters:", json.dumps(shown))

    if failed:
        print("FAILED: " + "; ".join(failed))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
