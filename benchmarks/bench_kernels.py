"""Kernel benchmark: fused rescaled-RoPE attention vs stock SDPA fed by a separate RoPE, on the same inputs.

Modes: ``fwd``, ``fwd_bwd`` (prefill; causal, GQA) and ``decode`` (one new token on a cache of the given length:
ours reads PRE-RoPE keys and rotates them on the fly; the baseline reads a POST-RoPE cache and only rotates the
new token). Baselines: SDPA's flash and cuDNN backends (GPU) or its default (CPU), with HF's
``apply_rotary_pos_emb`` arithmetic for the RoPE, and ``flash_attn`` when importable.

Prints a table and writes ``bench_kernels.csv`` and ``bench_kernels.png`` under ``--out``.
Run: ``python benchmarks/bench_kernels.py --device cuda --out $OUT`` (or ``--device cpu --quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lr2kernels as lr2  # noqa: E402


def make_table(head_dim: int) -> lr2.RopeTable:
    """LongRoPE2-like table for an 8K -> 128K model: plain RoPE below L0, YaRN-shaped long factors above."""
    long = lr2.RopeTable.yarn(head_dim=head_dim, base=500000.0, original_max_position=8192, max_position=131072)
    return lr2.RopeTable.longrope(
        head_dim=head_dim,
        base=500000.0,
        original_max_position=8192,
        max_position=131072,
        short_factor=[1.0] * (head_dim // 2),
        long_factor=long.long_factor,
    )


def time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=reps * 10))  # type: ignore[return-value]
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[len(samples) // 5], samples[(4 * len(samples)) // 5]


def sdpa_backend(name: str):
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name])


def separate_rope_attention(q, k, v, table, sdpa: str):
    """Stock path: HF-style RoPE (fp32 cos/sin cast to the input dtype), then SDPA."""
    q_rot, k_rot = lr2.apply_rope(q, k, table, backend="torch")
    with sdpa_backend(sdpa):
        return F.scaled_dot_product_attention(q_rot, k_rot, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def providers(device: torch.device) -> list[tuple[str, str | None]]:
    """(provider name, sdpa backend or None for ours)."""
    found = []
    if "triton" in lr2.available_backends() and device.type == "cuda":
        found.append(("lr2-triton", None))
    if device.type == "cuda":
        found += [("sdpa-flash+rope", "flash"), ("sdpa-cudnn+rope", "cudnn")]
    else:
        found += [("lr2-torch", None), ("sdpa+rope", "default")]
    return found


def flops(mode: str, batch: int, heads: int, seq: int, head_dim: int) -> float:
    causal_fwd = 4 * batch * heads * seq * seq * head_dim / 2
    if mode == "fwd":
        return causal_fwd
    if mode == "fwd_bwd":
        return causal_fwd * 3.5  # backward = 2.5x forward
    return 4 * batch * heads * seq * head_dim  # decode: one query against `seq` keys


def bench_prefill(mode, provider, sdpa, batch, hq, hk, seq, head_dim, dtype, device, reps, table):
    q = torch.randn(batch, hq, seq, head_dim, device=device, dtype=dtype, requires_grad=mode == "fwd_bwd")
    k = torch.randn(batch, hk, seq, head_dim, device=device, dtype=dtype, requires_grad=mode == "fwd_bwd")
    v = torch.randn(batch, hk, seq, head_dim, device=device, dtype=dtype, requires_grad=mode == "fwd_bwd")
    backend = provider.removeprefix("lr2-") if sdpa is None else None

    def forward():
        if backend is not None:
            return lr2.rope_attention(q, k, v, table, backend=backend)
        return separate_rope_attention(q, k, v, table, sdpa)

    if mode == "fwd":
        with torch.no_grad():
            return time_ms(forward, device, reps)
    grad = torch.randn(batch, hq, seq, head_dim, device=device, dtype=dtype)

    def forward_backward():
        torch.autograd.grad(forward(), (q, k, v), grad)

    return time_ms(forward_backward, device, reps)


def bench_decode(provider, sdpa, batch, hq, hk, seq, head_dim, dtype, device, reps, table):
    q = torch.randn(batch, hq, 1, head_dim, device=device, dtype=dtype)
    k_cache = torch.randn(batch, hk, seq, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn(batch, hk, seq, head_dim, device=device, dtype=dtype)
    cache_seqlens = torch.full((batch,), seq, dtype=torch.int32, device=device)
    position = torch.tensor([seq - 1], device=device)
    backend = provider.removeprefix("lr2-") if sdpa is None else None

    def ours():
        return lr2.rope_decode(q, k_cache, v_cache, cache_seqlens, table, backend=backend)

    def baseline():  # post-RoPE cache: rotate only the new token, then SDPA over the cache
        q_rot, _ = lr2.apply_rope(q, q[:, :1], table, position_ids=position, long=table.use_long(seq), backend="torch")
        with sdpa_backend(sdpa):
            return F.scaled_dot_product_attention(q_rot, k_cache, v_cache, enable_gqa=hq != hk)

    with torch.no_grad():
        return time_ms(ours if backend is not None else baseline, device, reps)


def bench_rerotate(batch, hk, seq, head_dim, dtype, device, reps, table):
    """Re-rotating a post-RoPE cache to the long table vs recomputing it (rotating all keys again)."""
    k = torch.randn(batch, hk, seq, head_dim, device=device, dtype=dtype)
    positions = torch.arange(seq, device=device)
    backend = "triton" if device.type == "cuda" and "triton" in lr2.available_backends() else "torch"
    with torch.no_grad():
        return time_ms(lambda: lr2.rerotate(k, table, positions, False, True, backend=backend), device, reps)


def environment(device: torch.device) -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="few sizes, few repetitions")
    parser.add_argument("--seqlens", type=int, nargs="*", default=None)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--heads", type=int, nargs=2, default=(32, 8), metavar=("HQ", "HK"))
    parser.add_argument("--modes", nargs="*", default=["fwd", "fwd_bwd", "decode", "rerotate"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.seqlens:
        seqlens = args.seqlens
    elif device.type == "cuda":
        seqlens = [4096, 16384] if args.quick else [4096, 8192, 16384, 32768, 65536, 131072]
    else:
        seqlens = [256, 1024] if args.quick else [256, 512, 1024, 2048, 4096]
    reps = 3 if args.quick else 10
    hq, hk = args.heads
    table = make_table(args.head_dim)
    env = environment(device)
    rows: list[dict] = []
    for mode in args.modes:
        for seq in seqlens:
            batch = max(1, 16384 // seq) if device.type == "cuda" else 1
            if mode == "rerotate":
                ms = bench_rerotate(batch, hk, seq, args.head_dim, dtype, device, reps, table)
                rows.append(dict(mode=mode, provider="lr2-rerotate", seq=seq, batch=batch, ms=ms))
                continue
            for provider, sdpa in providers(device):
                if mode == "fwd_bwd" and seq > 32768 and device.type == "cuda":
                    continue  # keeps the GPU suite inside its time budget
                try:
                    if mode == "decode":
                        ms = bench_decode(provider, sdpa, batch, hq, hk, seq, args.head_dim, dtype, device, reps, table)
                    else:
                        ms = bench_prefill(mode, provider, sdpa, batch, hq, hk, seq, args.head_dim, dtype, device,
                                           reps, table)  # fmt: skip
                except (RuntimeError, NotImplementedError) as error:  # e.g. a SDPA backend that refuses the shape
                    print(f"skip {mode} {provider} L={seq}: {str(error).splitlines()[0][:100]}")
                    continue
                rows.append(dict(mode=mode, provider=provider, seq=seq, batch=batch, ms=ms))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for row in rows:
        median, p20, p80 = row.pop("ms")
        work = flops(row["mode"], row["batch"], hq, row["seq"], args.head_dim) if row["mode"] != "rerotate" else 0
        row.update(
            ms=round(median, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
            tflops=round(work / median / 1e9, 2) if work else "",
            head_dim=args.head_dim, hq=hq, hk=hk, dtype=str(dtype).removeprefix("torch."), **env,
        )  # fmt: skip
    add_ratios(rows)
    report(rows, Path(args.out))
    return rows


def add_ratios(rows: list[dict]) -> None:
    """ratio = ours / best baseline at the same mode and length (< 1: ours is faster)."""
    for row in rows:
        row["ratio_vs_best_baseline"] = ""
    for row in rows:
        if not row["provider"].startswith("lr2-") or row["mode"] == "rerotate":
            continue
        baselines = [
            r["ms"] for r in rows if r["mode"] == row["mode"] and r["seq"] == row["seq"] and "rope" in r["provider"]
        ]
        if baselines:
            row["ratio_vs_best_baseline"] = round(row["ms"] / min(baselines), 3)


def report(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = ["mode", "provider", "seq", "batch", "ms", "p20_ms", "p80_ms", "tflops", "ratio_vs_best_baseline"]
    print(" | ".join(f"{c:>16}" for c in columns))
    for row in rows:
        print(" | ".join(f"{row[c]!s:>16}" for c in columns))
    csv_path = out / "bench_kernels.csv"
    new_file = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else columns)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for provider in sorted({r["provider"] for r in rows if r["mode"] == mode}):
            points = [(r["seq"], r["ms"]) for r in rows if r["mode"] == mode and r["provider"] == provider]
            ax.plot(*zip(*points), marker="o", label=provider)
        ax.set(title=mode, xlabel="sequence length", ylabel="ms", xscale="log", yscale="log")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{rows[0]['device_name']} {rows[0]['dtype']} D={rows[0]['head_dim']} GQA {rows[0]['hq']}:{rows[0]['hk']}"
    )
    fig.tight_layout()
    fig.savefig(out / "bench_kernels.png", dpi=110)
    print(f"wrote {csv_path} and {out / 'bench_kernels.png'}")


if __name__ == "__main__":
    main()
