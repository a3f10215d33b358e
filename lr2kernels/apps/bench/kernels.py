"""Kernel benchmark: fused rescaled-RoPE attention vs stock attention fed by a separate RoPE, on the same inputs.

Modes: ``fwd``, ``fwd_bwd`` (causal prefill, GQA), ``decode`` (one new token on a cache of the given length: ours
reads PRE-RoPE keys and rotates them on the fly; the baseline reads a POST-RoPE cache and rotates only the new
token) and ``rerotate`` (moving a whole post-RoPE cache to the long table). Baselines: SDPA (flash and cuDNN
backends on a GPU, its default on the CPU) after HF's RoPE arithmetic, ``flash_attn`` and Liger's RoPE when
importable. Every row carries the ratio ours / best baseline at the same shape.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

import lr2kernels as lr2
from lr2kernels.apps.bench.report import PeakMemory, add_options, environment, plot_vs_length, show_and_append
from lr2kernels.apps.common import default_dtype, device_from, make_parser, time_ms


def make_table(head_dim: int) -> lr2.RopeTable:
    """LongRoPE2-like table for an 8K -> 128K model: plain RoPE below L0, YaRN-shaped long factors above."""
    long = lr2.RopeTable.yarn(head_dim=head_dim, base=500000.0, original_max_position=8192, max_position=131072)
    return lr2.RopeTable.longrope(
        head_dim=head_dim, base=500000.0, original_max_position=8192, max_position=131072,
        short_factor=[1.0] * (head_dim // 2), long_factor=long.long_factor,
    )  # fmt: skip


def _sdpa_backend(name: str):
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name])


def _separate_rope(q, k, table, rope: str):
    if rope == "liger":
        from liger_kernel.ops.rope import LigerRopeFunction

        cos, sin = table.cos_sin(torch.arange(q.shape[2], device=q.device)[None])
        return LigerRopeFunction.apply(q, k, cos.to(q.dtype), sin.to(q.dtype))
    return lr2.apply_rope(q, k, table, backend="torch")  # HF's own arithmetic


def _baseline_attention(q, k, v, table, provider: str):
    rope = "liger" if "liger" in provider else "hf"
    q_rot, k_rot = _separate_rope(q, k, table, rope)
    if provider.startswith("flash-attn"):
        from flash_attn import flash_attn_func

        out = flash_attn_func(q_rot.transpose(1, 2), k_rot.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    sdpa = provider.split("+")[0].removeprefix("sdpa-") if provider.startswith("sdpa-") else "default"
    with _sdpa_backend(sdpa):
        return F.scaled_dot_product_attention(q_rot, k_rot, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def providers(device: torch.device) -> list[str]:
    """Ours first, then the baselines that exist here."""
    if device.type != "cuda":
        return ["lr2-torch", "sdpa+rope"]
    found = ["lr2-triton"] if "triton" in lr2.available_backends() else []
    found += ["sdpa-flash+rope", "sdpa-cudnn+rope"]
    if importlib.util.find_spec("flash_attn") is not None:
        found.append("flash-attn+rope")
    if importlib.util.find_spec("liger_kernel") is not None:
        found.append("sdpa-flash+liger-rope")
    return found


def flops(mode: str, batch: int, heads: int, seq: int, head_dim: int) -> float:
    causal_fwd = 4 * batch * heads * seq * seq * head_dim / 2
    return {"fwd": causal_fwd, "fwd_bwd": 3.5 * causal_fwd, "decode": 4 * batch * heads * seq * head_dim}.get(mode, 0)


def _case(mode, provider, batch, hq, hk, seq, head_dim, dtype, device, table):
    """A no-argument callable running one (mode, provider) on fresh inputs."""
    ours = provider.startswith("lr2-")
    backend = provider.removeprefix("lr2-") if ours else None
    if mode == "rerotate":
        k = torch.randn(batch, hk, seq, head_dim, device=device, dtype=dtype)
        positions = torch.arange(seq, device=device)
        return lambda: lr2.rerotate(k, table, position_ids=positions, from_long=False, to_long=True, backend=backend)
    if mode == "decode":
        q = torch.randn(batch, hq, 1, head_dim, device=device, dtype=dtype)
        k_cache = torch.randn(batch, hk, seq, head_dim, device=device, dtype=dtype)
        v_cache = torch.randn(batch, hk, seq, head_dim, device=device, dtype=dtype)
        lengths = torch.full((batch,), seq, dtype=torch.int32, device=device)
        position = torch.tensor([seq - 1], device=device)
        if ours:
            return lambda: lr2.rope_decode(q, k_cache, v_cache, table=table, cache_seqlens=lengths, backend=backend)

        def baseline_decode():  # post-RoPE cache: rotate only the new token, then attention over the cache
            q_rot, _ = lr2.apply_rope(q, q, table, position_ids=position, long=table.use_long(seq), backend="torch")
            sdpa = "flash" if device.type == "cuda" else "default"
            with _sdpa_backend(sdpa):
                return F.scaled_dot_product_attention(q_rot, k_cache, v_cache, enable_gqa=hq != hk)

        return baseline_decode
    grad = mode == "fwd_bwd"
    q = torch.randn(batch, hq, seq, head_dim, device=device, dtype=dtype, requires_grad=grad)
    k = torch.randn(batch, hk, seq, head_dim, device=device, dtype=dtype, requires_grad=grad)
    v = torch.randn(batch, hk, seq, head_dim, device=device, dtype=dtype, requires_grad=grad)

    def forward():
        if ours:
            return lr2.rope_attention(q, k, v, table, backend=backend)
        return _baseline_attention(q, k, v, table, provider)

    if not grad:
        return lambda: torch.no_grad()(forward)()
    grad_out = torch.randn(batch, hq, seq, head_dim, device=device, dtype=dtype)
    return lambda: torch.autograd.grad(forward(), (q, k, v), grad_out)


def run(
    device: torch.device,
    seqlens: list[int],
    head_dims: list[int],
    heads: list[tuple[int, int]],
    modes: list[str],
    reps: int,
    tokens_per_batch: int,
    max_backward_seqlen: int = 1 << 30,
) -> list[dict]:
    dtype = default_dtype(device)
    env = environment(device)
    rows: list[dict] = []
    for head_dim in head_dims:
        table = make_table(head_dim)
        for hq, hk in heads:
            for mode in modes:
                for seq in seqlens:
                    batch = max(1, tokens_per_batch // seq)
                    names = ["lr2-triton" if device.type == "cuda" else "lr2-torch"] if mode == "rerotate" else None
                    if mode == "fwd_bwd" and seq > max_backward_seqlen:
                        continue  # keeps a GPU sweep inside its time budget
                    for provider in names or providers(device):
                        try:
                            fn = _case(mode, provider, batch, hq, hk, seq, head_dim, dtype, device, table)
                            median, p20, p80 = time_ms(fn, device, reps)
                            with PeakMemory(device) as memory:
                                fn()
                        except (RuntimeError, NotImplementedError, ValueError) as error:  # a backend refusing a shape
                            print(f"skip {mode} {provider} L={seq} D={head_dim}: {str(error).splitlines()[0][:90]}")
                            continue
                        work = flops(mode, batch, hq, seq, head_dim)
                        rows.append(dict(
                            suite="kernels", mode=mode, provider=provider, seq=seq, batch=batch, head_dim=head_dim,
                            hq=hq, hk=hk, dtype=str(dtype).removeprefix("torch."), ms=round(median, 4),
                            p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                            tflops=round(work / median / 1e9, 3) if work else "", peak_mb=round(memory.peak_mb, 1),
                            ratio="", **env,
                        ))  # fmt: skip
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """ratio = ours / best baseline at the same mode and shape (< 1: ours is faster)."""
    key = ("mode", "seq", "head_dim", "hq", "hk")
    for row in rows:
        if not row["provider"].startswith("lr2-"):
            continue
        baselines = [r["ms"] for r in rows if not r["provider"].startswith("lr2-") and all(r[k] == row[k] for k in key)]
        if baselines:
            row["ratio"] = round(row["ms"] / min(baselines), 3)


MODES = ("fwd", "fwd_bwd", "decode", "rerotate")
COLUMNS = ["mode", "provider", "seq", "batch", "head_dim", "hq", "hk", "ms", "tflops", "peak_mb", "ratio"]


def main(argv: list[str] | None = None) -> list[dict]:
    """This suite alone (``benchmarks/bench_kernels.py``): the rows measured."""
    parser = make_parser("bench_kernels", __doc__.splitlines()[0])
    add_options(parser)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This suite's own options (beside :func:`lr2kernels.apps.bench.report.add_options`)."""
    parser.add_argument(
        "--seqlens",
        type=int,
        nargs="*",
        default=None,
        help="kernels: sequence lengths (default: 4K..128K on a GPU, 256..4096 on the CPU; --quick: two)",
    )
    parser.add_argument(
        "--head-dims", type=int, nargs="*", default=None, help="kernels: head dims (default: 64 128; --quick: 128)"
    )
    parser.add_argument(
        "--heads",
        type=str,
        nargs="*",
        default=None,
        help="kernels: HQ:HK pairs, e.g. 32:8 32:4 (default: 32:8 32:4 on a GPU, 8:2 8:1 on the CPU; --quick: the "
        "first)",
    )
    parser.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES), help="kernels: what to time")
    parser.add_argument("--max-bwd-seqlen", type=int, default=32768, help="kernels: longest length timed for fwd_bwd")


def run_from_args(args: argparse.Namespace) -> list[dict]:
    device = device_from(args.device)
    gpu = device.type == "cuda"
    if args.seqlens:
        seqlens = args.seqlens
    elif gpu:
        seqlens = [4096, 16384] if args.quick else [4096, 8192, 16384, 32768, 65536, 131072]
    else:
        seqlens = [256, 1024] if args.quick else [256, 512, 1024, 2048, 4096]
    head_dims = args.head_dims or ([128] if args.quick else [64, 128])
    if args.heads:
        heads = [tuple(int(x) for x in pair.split(":")) for pair in args.heads]
    else:
        heads = [(32, 8), (32, 4)] if gpu else [(8, 2), (8, 1)]  # GQA 4:1 and 8:1
        heads = heads[:1] if args.quick else heads
    reps = args.reps or (3 if args.quick else (10 if gpu else 5))
    tokens = 16384 if gpu else 1
    rows = run(device, seqlens, head_dims, heads, args.modes, reps, tokens, max_backward_seqlen=args.max_bwd_seqlen)
    out = Path(args.out)
    show_and_append(rows, COLUMNS, out / "kernels.csv")
    for head_dim in head_dims:
        for hq, hk in heads:
            selected = [r for r in rows if (r["head_dim"], r["hq"], r["hk"]) == (head_dim, hq, hk)]
            if selected:
                title = f"{selected[0]['device_name']} {selected[0]['dtype']} D={head_dim} heads {hq}:{hk}"
                plot_vs_length(selected, out / f"kernels_D{head_dim}_H{hq}-{hk}.png", title)
    return rows


if __name__ == "__main__":
    main()
