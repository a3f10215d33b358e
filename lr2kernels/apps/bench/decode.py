"""Decode bandwidth: one new token per sequence against a KV cache, as GB/s of cache read against the device's own
copy bandwidth, for every decode kernel here side by side on the same cache.

Providers: ``lr2-cuda`` (csrc's split-KV kernel, where the extension and a GPU exist) and ``lr2-triton`` (the Triton
kernel), both on a PRE-RoPE cache, rotating each key in registers; ``lr2-torch`` on the CPU; the baseline ``sdpa``
decodes on a POST-RoPE cache (the new token rotated, then SDPA: flash on a GPU) as stock transformers does. Decode
is memory bound, so the figure of merit is bytes moved per second: the K and V cache (``2 * B * Hk * L * D *
itemsize``) over the median time. The "peak" is measured in the same run, a device-to-device copy of a large
buffer, so the percentage needs no datasheet. Goal for the fused kernels: >= 80% of it at long caches, and no slower
than the post-RoPE baseline (the rotation must be free in a memory-bound kernel).

Run: ``python benchmarks/bench_decode.py --device cuda`` (cache lengths 4K..128K, batch 1, 8, 64).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import lr2kernels as lr2
from lr2kernels.apps.bench.kernels import make_table
from lr2kernels.apps.bench.report import environment, pyplot, save_figure, show_and_append
from lr2kernels.apps.common import (
    add_device_option,
    add_out_option,
    default_dtype,
    device_from,
    fresh_results_folder,
    make_parser,
    time_ms,
)
from lr2kernels.ops import dispatch

COLUMNS = ["provider", "batch", "cache", "ms", "gb_per_s", "of_copy_peak", "vs_post_rope"]


FUSED = ("lr2-cuda", "lr2-triton", "lr2-torch")  # the decode kernels on a PRE-RoPE cache; "sdpa" is the baseline


def providers(device: torch.device, wanted: list[str] | None = None) -> list[str]:
    """The fused decode kernels available here (or those of ``wanted``, each of which must be), then the post-RoPE
    baseline.

    Raises:
        ValueError: a provider of ``wanted`` that cannot run on ``device``, with the backend's reason.
    """
    if wanted:
        for name in wanted:
            ok, reason = dispatch.backend_status(name.removeprefix("lr2-"), device)
            if not ok:
                raise ValueError(f"--providers: {name} cannot run on {device} here: {reason}")
        return [*wanted, "sdpa"]
    backends = lr2.available_backends()
    if device.type != "cuda":
        return ["lr2-torch", "sdpa"]
    return [f"lr2-{name}" for name in ("cuda", "triton") if name in backends] + ["sdpa"]


def copy_peak_gbps(device: torch.device, megabytes: int, reps: int) -> float:
    """Device-to-device copy bandwidth (read + write) of a ``megabytes`` buffer: the run's own peak."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source), device, reps)[0]
    return 2 * source.numel() / (ms * 1e-3) / 1e9


def _decoder(provider: str, q, k_cache, v_cache, table, lengths):
    if provider.startswith("lr2-"):
        backend = provider.removeprefix("lr2-")
        return lambda: lr2.rope_decode(q, k_cache, v_cache, table, cache_seqlens=lengths, backend=backend)
    seq = k_cache.shape[2]
    position = torch.tensor([seq - 1], device=q.device)

    def post_rope_decode():  # the stock path: the new token rotated, the cache already post-RoPE
        q_rot, _ = lr2.apply_rope(q, q, table, position_ids=position, long=table.use_long(seq), backend="torch")
        return F.scaled_dot_product_attention(q_rot, k_cache, v_cache, enable_gqa=q.shape[1] != k_cache.shape[1])

    return post_rope_decode


def run(
    device: torch.device, batches: list[int], caches: list[int], heads: tuple[int, int], head_dim: int, reps: int,
    max_gb: float, peak_mb: int, wanted: list[str] | None = None,
) -> list[dict]:  # fmt: skip
    dtype = default_dtype(device)
    table = make_table(head_dim)
    names = providers(device, wanted)  # before anything is timed: an unavailable one stops here
    peak = copy_peak_gbps(device, peak_mb, reps)
    print(f"device copy bandwidth: {peak:.0f} GB/s (read + write of {peak_mb} MB)", flush=True)
    env = environment(device)
    hq, hk = heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = []
    for batch in batches:
        for cache in caches:
            cache_bytes = 2 * batch * hk * cache * head_dim * itemsize  # K and V
            if cache_bytes > max_gb * 1e9:
                print(f"skipped batch {batch} x {cache} tokens: {cache_bytes / 1e9:.1f} GB of cache > --max-gb")
                continue
            q = torch.randn(batch, hq, 1, head_dim, device=device, dtype=dtype)
            k_cache = torch.randn(batch, hk, cache, head_dim, device=device, dtype=dtype)
            v_cache = torch.randn(batch, hk, cache, head_dim, device=device, dtype=dtype)
            lengths = torch.full((batch,), cache, dtype=torch.int32, device=device)
            times = {}
            for provider in names:
                times[provider] = time_ms(_decoder(provider, q, k_cache, v_cache, table, lengths), device, reps)[0]
            for provider, ms in times.items():
                gbps = cache_bytes / (ms * 1e-3) / 1e9
                rows.append(dict(
                    provider=provider, batch=batch, cache=cache, ms=round(ms, 4), gb_per_s=float(f"{gbps:.4g}"),
                    of_copy_peak=round(gbps / peak, 3), vs_post_rope=round(times["sdpa"] / ms, 3),
                    copy_peak=round(peak), hq=hq, hk=hk, head_dim=head_dim, dtype=str(dtype).removeprefix("torch."),
                    **env,
                ))  # fmt: skip
            del q, k_cache, v_cache
            print(f"decode batch {batch}, cache {cache}: done", flush=True)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for provider in dict.fromkeys(r["provider"] for r in rows):
            points = sorted((r["cache"], r["of_copy_peak"]) for r in rows if r["batch"] == batch and
                            r["provider"] == provider)  # fmt: skip
            if points:
                ax.plot(*zip(*points), marker="o", label=provider)
        ax.axhline(0.8, color="grey", linestyle="--", linewidth=1)
        ax.set(title=f"batch {batch}", xlabel="cache tokens", ylabel="cache GB/s / copy GB/s", xscale="log")
        ax.legend(fontsize=7)
    save_figure(fig, path, title)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_device_option(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 64 (GPU), 1 2 (CPU)")
    parser.add_argument("--caches", type=int, nargs="+", default=None, help="default 4K..128K (GPU), 256 1024 (CPU)")
    parser.add_argument("--heads", default="32:8", help="q heads:kv heads (default 32:8)")
    parser.add_argument("--head-dim", type=int, default=128, help="default 128")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions, median (default 20)")
    parser.add_argument("--max-gb", type=float, default=40.0, help="skip shapes whose cache exceeds this (default 40)")
    parser.add_argument("--peak-mb", type=int, default=1024, help="copy buffer for the peak (default 1024 MB)")
    parser.add_argument(
        "--providers", nargs="+", choices=FUSED, default=None,
        help="the decode kernels to time (default: every one available here); the baseline sdpa is always timed",
    )  # fmt: skip
    add_out_option(parser, fresh_results_folder(), "rows are appended to decode.csv there, decode.png written")


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked before anything is allocated or timed (a usage error exits with status 2); needs no
    GPU: benchmarks/gpu_check.py's dry run checks its commands with it."""
    parser = make_parser("bench_decode", __doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    hq, _, hk = args.heads.partition(":")
    if not (hq.isdigit() and hk.isdigit() and int(hk) > 0) or int(hq) % int(hk):
        parser.error(f"--heads: expected q:kv with q a multiple of kv (e.g. 32:8), got {args.heads!r}")
    for option in ("batches", "caches"):
        if any(n < 1 for n in getattr(args, option) or []):
            parser.error(f"--{option}: expected positive integers, got {getattr(args, option)}")
    if args.reps < 1 or args.peak_mb < 1 or args.head_dim < 1:
        parser.error(f"--reps, --peak-mb, --head-dim: expected positive integers, got {args.reps}, {args.peak_mb}, "
                     f"{args.head_dim}")  # fmt: skip
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = device_from(args.device)
    gpu = device.type == "cuda"
    hq, _, hk = args.heads.partition(":")
    batches = args.batches or ([1, 8, 64] if gpu else [1, 2])
    caches = args.caches or ([4096, 16384, 32768, 65536, 131072] if gpu else [256, 1024])
    rows = run(device, batches, caches, (int(hq), int(hk)), args.head_dim, args.reps, args.max_gb, args.peak_mb,
               args.providers)  # fmt: skip
    out = Path(args.out)
    show_and_append(rows, COLUMNS, out / "decode.csv")
    if rows and plot(rows, out / "decode.png", f"decode bandwidth, {args.heads} heads, D {args.head_dim}"):
        print(f"wrote {out / 'decode.png'}")
    return 0 if rows else 1
