"""Compile every Triton kernel for real GPUs on the CPU and report registers, spills and shared memory.

Triton ships ptxas, so ``triton.compile`` with a fake ``GPUTarget("cuda", 80 | 90, 32)`` runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin) without a GPU. For each kernel, each config its launcher may pick (the
autotune list after the kernel's ``early_config_prune``; decode's ``_block_sizes``; rope's ``_grid`` block), each
head case and dtype, it records ptxas's register count and spill stores and Triton's dynamic shared memory, and
whether that fits the arch (sm_80: 166,912 B, sm_90: 232,448 B of dynamic shared memory per block).

Usage::

    python benchmarks/compile_report.py                 # reduced matrix, writes benchmarks/results/triton_compile.md
    python benchmarks/compile_report.py --matrix full   # every head case x fp16/bf16/fp32
    python benchmarks/compile_report.py --json out.json # also the raw rows (tests/ops/test_compile_gate.py)

One constexpr variant per attention kernel is compiled (causal, dense, explicit positions: the most code); the
other flags only drop code. TRITON_INTERPRET is removed from the environment before Triton is imported.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # must happen before any @triton.jit function is created

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMEM_LIMIT = {80: 166_912, 90: 232_448}  # max dynamic shared memory per block (opt-in)
# (name, head_dim, rotary_dim)
HEAD_CASES = {
    "64": (64, 64),
    "80": (80, 80),
    "96": (96, 96),
    "128": (128, 128),
    "256": (256, 256),
    "96of128": (128, 96),
}
MATRICES = {
    "full": (list(HEAD_CASES), ["fp16", "bf16", "fp32"]),
    "reduced": (["64", "128", "256", "96of128"], ["bf16", "fp32"]),
    "gate": (list(HEAD_CASES), ["bf16"]),
    "half": (list(HEAD_CASES), ["bf16", "fp16"]),
}
KERNELS = ["fwd", "bwd_dq", "bwd_dkdv", "bwd_delta", "decode", "decode_merge", "apply_rope", "rerotate"]

# Pointer arguments that are always fp32 / int32; every other upper-case argument is a tensor of the input dtype.
_FP32_PTRS = {"LSE", "DELTA", "INV_FREQ", "LSE_PART"}
_I32_PTRS = {"CU_SEQLENS", "POS", "IS_LONG", "SEQLENS"}
_FP32_SCALARS = {"sm_scale", "sm_scale_log2", "attention_short", "attention_long", "scale"}


@dataclass
class Job:
    kernel: str
    head: str
    dtype: str
    arch: int
    config: str  # human-readable
    constexprs: dict
    options: dict
    ptr_overrides: dict  # name -> type string


@dataclass
class Row:
    kernel: str
    head: str
    dtype: str
    arch: int
    config: str
    regs: int | None
    spill_bytes: int | None
    smem: int | None
    fits: bool
    error: str = ""
    seconds: float = 0.0
    triton: str = ""  # the Triton version that compiled it

    @property
    def ok(self) -> bool:
        return not self.error and self.fits and self.spill_bytes == 0


def _modules():
    from lr2kernels.ops.triton import attention, decode, rope

    return attention, decode, rope


def _jit_fn(kernel: str):
    attention, decode, rope = _modules()
    k = {
        "fwd": attention._rope_attention_fwd_kernel,
        "bwd_dq": attention._rope_attention_bwd_dq_kernel,
        "bwd_dkdv": attention._rope_attention_bwd_dkdv_kernel,
        "bwd_delta": attention._delta_kernel,
        "decode": decode._rope_decode_kernel,
        "decode_merge": decode._rope_decode_merge_kernel,
        "apply_rope": rope._apply_rope_kernel,
        "rerotate": rope._rerotate_kernel,
    }[kernel]
    return k


def _signature(fn, dtype: str, overrides: dict) -> dict:
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name in overrides:
            sig[name] = overrides[name]
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name in _I32_PTRS:
            sig[name] = "*i32"
        elif name.isupper() or name[0].isupper():
            sig[name] = f"*{dtype}"
        elif name in _FP32_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _torch_dtype(dtype: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def jobs_for(
    kernel: str, head: str, dtype: str, arch: int, staged: bool = True, all_configs: bool = False
) -> list[Job]:
    """The compilations of one (kernel, head case, dtype, arch): one per config the launcher may pick. ``staged``:
    the attention kernels' loop operands come rotated (the launchers' default), else rotated per tile.
    ``all_configs``: every config of the attention kernels' autotune lists, before pruning (to choose what they
    keep: ``attention._KEEP``)."""
    import torch

    from lr2kernels.ops.triton._host import dot_precision, head_sizes, split_sizes

    attention, decode, rope = _modules()
    head_dim, rotary_dim = HEAD_CASES[head]
    tdt = _torch_dtype(dtype)
    # As the launchers do: the backward's accumulators and decode's rows in one tile per segment.
    split = split_sizes(head_dim, rotary_dim, one_tile=kernel in ("bwd_dq", "bwd_dkdv"))
    sizes = head_sizes(head_dim, one_tile=kernel in ("decode", "decode_merge"))
    jobs = []
    if kernel in ("fwd", "bwd_dq", "bwd_dkdv"):
        tuner = _jit_fn(kernel)
        constexprs = dict(**split, **sizes, IS_CAUSAL=True, IS_VARLEN=False, HAS_POS=True,
                          PRECISION=dot_precision(tdt), STAGED=staged)  # fmt: skip
        configs = tuner.configs
        if getattr(tuner, "early_config_prune", None) and not all_configs:
            configs = tuner.early_config_prune(configs, dict.fromkeys(tuner.fn.arg_names), arch=arch, **constexprs)
        for c in configs:
            name = f"M{c.kwargs['BLOCK_M']} N{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
            jobs.append(Job(kernel, head, dtype, arch, name, dict(constexprs, **c.kwargs),
                            dict(num_warps=c.num_warps, num_stages=c.num_stages), {}))  # fmt: skip
    elif kernel == "bwd_delta":  # rowsum(O * dO): the block the launcher picks
        block = attention.delta_block(head_dim)
        jobs.append(Job(kernel, head, dtype, arch, f"B{block} w4", dict(**sizes, BLOCK=block), {}, {}))
    elif kernel in ("decode", "decode_merge"):
        seen = set()
        for num_rows in (1, 64):  # BLOCK_M spans 16 .. 64 with the packed rows (group * n_new)
            block_m, block_n = decode._block_sizes(num_rows, head_dim, tdt)
            warps = decode._num_warps(head_dim) if hasattr(decode, "_num_warps") else 4
            if kernel == "decode_merge":
                block_m = getattr(decode, "_MERGE_BLOCK_M", block_m)  # the merge's own row tile, where it has one
                if block_m in seen:
                    continue
                seen.add(block_m)
                jobs.append(Job(kernel, head, dtype, arch, f"M{block_m} w{warps}", dict(**sizes, BLOCK_M=block_m),
                                dict(num_warps=warps), {}))  # fmt: skip
                continue
            for is_split in (num_rows > 1,):  # both store paths, one per BLOCK_M extreme
                ce = dict(**split, **sizes, BLOCK_M=block_m, BLOCK_N=block_n, IS_SPLIT=is_split,
                          PRECISION=dot_precision(tdt))  # fmt: skip
                overrides = {} if is_split else {"O_PART": f"*{dtype}", "LSE_PART": f"*{dtype}"}
                name = f"M{block_m} N{block_n} w{warps} s3 split={int(is_split)}"
                options = {"enable_fp_fusion": False, "num_warps": warps}
                jobs.append(Job(kernel, head, dtype, arch, name, ce, options, overrides))
    else:  # apply_rope, rerotate: BLOCK from the launcher's _grid (sm_count stubbed: it only sizes the chunks)
        real_sm_count = rope.sm_count
        rope.sm_count = lambda device: 132
        try:
            # As the launchers decide: apply_rope at 256 channels or partial rotary, rerotate at partial rotary.
            small = rotary_dim < head_dim or (kernel == "apply_rope" and head_dim > 128)
            try:
                block = rope._grid(4096, 1, 8, head_dim, torch.device("cuda"), small)[0]
            except TypeError:  # a _grid without small_block (before the fix)
                block = rope._grid(4096, 1, 8, head_dim, torch.device("cuda"))[0]
        finally:
            rope.sm_count = real_sm_count
        ce = dict(**split, BLOCK=block, TRANSPOSED=False)
        if kernel == "apply_rope":
            ce.update(IS_VARLEN=False, HAS_POS=True)
        jobs.append(Job(kernel, head, dtype, arch, f"B{block} w4", ce, {}, {}))
    return jobs


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores")


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="lr2_compile_report_")  # fresh: ptxas always runs
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def compile_job(job: Job) -> Row:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    # A fresh cache per compilation: a cache hit (e.g. decode_merge, which ignores the rotary split) skips ptxas.
    knobs.cache.dir = tempfile.mkdtemp(prefix="lr2_compile_report_")
    fn = _jit_fn(job.kernel)
    if isinstance(fn, triton.runtime.Autotuner):
        fn = fn.fn  # unwrap triton.autotune
    knobs.nvidia.dump_ptxas_log = True
    src = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, job.dtype, job.ptr_overrides),
                                    constexprs=job.constexprs)  # fmt: skip
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        msg = str(e).strip().splitlines()
        return Row(job.kernel, job.head, job.dtype, job.arch, job.config, None, None, None, False,
                   error=(msg[0] if msg else type(e).__name__)[:200], seconds=time.perf_counter() - t0,
                   triton=triton.__version__)  # fmt: skip
    log = buf.getvalue()
    regs = _PTXAS_REGS.findall(log)
    spills = _PTXAS_SPILL.findall(log)
    smem = int(compiled.metadata.shared)
    return Row(job.kernel, job.head, job.dtype, job.arch, job.config,
               max(map(int, regs)) if regs else None, max(map(int, spills)) if spills else None, smem,
               smem <= SMEM_LIMIT[job.arch], error="" if regs else "no ptxas log",
               seconds=time.perf_counter() - t0, triton=triton.__version__)  # fmt: skip


_SASS_LABEL = re.compile(r"^\s*(\.?L\w+):")
_SASS_BRANCH = re.compile(r"\bBRA\s+(\.?L\w+)")


def loop_instructions(sass: str) -> int:
    """Static SASS instructions of the kernel's largest loop: from a label to the last backward branch to it. In the
    attention kernels that is the tile loop (keys in the forward and dq, queries in dk/dv), so the count is what a
    warp issues per tile, give or take the branches it skips (the slow path of sin/cos for huge angles)."""
    labels: dict[str, int] = {}
    largest, count = 0, 0
    for line in sass.splitlines():
        label = _SASS_LABEL.match(line)
        if label:
            labels[label.group(1)] = count
            continue
        stripped = line.strip()
        if "\t" not in line or not stripped or stripped.startswith(("//", ".")):
            continue
        branch = _SASS_BRANCH.search(line)
        if branch and branch.group(1) in labels:
            largest = max(largest, count - labels[branch.group(1)] + 1)
        count += 1
    return largest


def loop_trig_ops(ttir: str) -> int:
    """``math.sin`` / ``math.cos`` operations inside ``scf.for`` loops of Triton's TTIR (before libdevice is inlined,
    so each tl.sin / tl.cos of the source is one op)."""
    depth, loop_depths, count = 0, [], 0
    for line in ttir.splitlines():
        if "scf.for" in line and line.rstrip().endswith("{"):
            loop_depths.append(depth)
        if loop_depths and ("math.sin" in line or "math.cos" in line):
            count += 1
        depth += line.count("{") - line.count("}")
        while loop_depths and depth <= loop_depths[-1]:
            loop_depths.pop()
    return count


_TT_DOT = re.compile(r"tt\.dot .*: tensor<(\d+)x(\d+)x\w+> \* tensor<\d+x(\d+)x\w+>")


def loop_mma_channels(ttir: str, block_m: int, block_n: int) -> int:
    """The MMA work of one trip of the tile loops, in channels: the sum of M x K x N over the ``tt.dot`` ops inside
    ``scf.for`` loops of the TTIR, divided by BLOCK_M x BLOCK_N. The forward's q k^T and p v give twice its head
    size when no channel is padding (D96: 2 x 96, not 2 x 128)."""
    depth, loop_depths, work = 0, [], 0
    for line in ttir.splitlines():
        if "scf.for" in line and line.rstrip().endswith("{"):
            loop_depths.append(depth)
        dot = _TT_DOT.search(line) if loop_depths else None
        if dot:
            m, k, n = map(int, dot.groups())
            work += m * k * n
        depth += line.count("{") - line.count("}")
        while loop_depths and depth <= loop_depths[-1]:
            loop_depths.pop()
    return work // (block_m * block_n)


LOOP_KERNELS = ["fwd", "bwd_dq", "bwd_dkdv"]


def loop_job(kernel: str, head: str, dtype: str, arch: int, staged: bool) -> tuple[str, bool, str, int, int, int]:
    """(kernel, staged, config, loop instructions, cos/sin ops in loops, MMA channels per loop trip) of the first
    config the launcher may pick."""
    import triton
    from triton.backends.compiler import GPUTarget

    _worker_init()
    job = jobs_for(kernel, head, dtype, arch, staged)[0]
    fn = _jit_fn(kernel).fn
    src = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, job.dtype, job.ptr_overrides),
                                    constexprs=job.constexprs)  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=job.options)
    ttir = compiled.asm["ttir"]
    mma = loop_mma_channels(ttir, job.constexprs["BLOCK_M"], job.constexprs["BLOCK_N"])
    return kernel, staged, job.config, loop_instructions(compiled.asm["sass"]), loop_trig_ops(ttir), mma


def run_loops(head: str, dtype: str, arch: int, workers: int) -> list[dict]:
    """The attention kernels' tile loops, with the loop operand staged (rotated once by the launcher) and rotated
    per tile: SASS instructions per tile (static count, :func:`loop_instructions`)."""
    cases = [(k, head, dtype, arch, staged) for k in LOOP_KERNELS for staged in (False, True)]
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
        results = list(pool.map(loop_job, *zip(*cases)))
    rows = []
    for kernel in LOOP_KERNELS:
        found = {staged: (config, n, trig, mma) for k, staged, config, n, trig, mma in results if k == kernel}
        rows.append(dict(kernel=kernel, head=head, dtype=dtype, arch=arch, config=found[True][0],
                         per_tile_rotation=found[False][1], staged=found[True][1],
                         trig_per_tile_rotation=found[False][2], trig_staged=found[True][2],
                         mma_channels=found[True][3]))  # fmt: skip
        print(f"{kernel:13s} tile loop: {found[False][1]} SASS instructions and {found[False][2]} cos/sin rotating "
              f"per tile, {found[True][1]} and {found[True][2]} staged", flush=True)  # fmt: skip
    return rows


def run(kernels, heads, dtypes, archs, workers: int, all_configs: bool = False) -> list[Row]:
    _worker_init()
    jobs_by_kernel = {}
    for kernel in kernels:
        jobs_by_kernel[kernel] = [
            j
            for head in heads
            for dtype in dtypes
            for arch in archs
            for j in jobs_for(kernel, head, dtype, arch, all_configs=all_configs)
        ]
    rows: list[Row] = []
    t_all = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
        futures = {k: pool.map(compile_job, js) for k, js in jobs_by_kernel.items()}  # all queued at once
        for kernel in kernels:
            t0 = time.perf_counter()
            krows = list(futures[kernel])
            rows += krows
            bad = sum(not r.ok for r in krows)
            print(f"{kernel:13s} {len(krows):4d} compiles, {bad:3d} spilling/over-smem/failed, "
                  f"done at {time.perf_counter() - t_all:6.1f} s (waited {time.perf_counter() - t0:5.1f} s)",
                  flush=True)  # fmt: skip
    return rows


def summarize(rows: list[Row]) -> dict[tuple, bool]:
    """(kernel, head, dtype, arch) -> whether at least one spill-free config fits shared memory."""
    out: dict[tuple, bool] = {}
    for r in rows:
        key = (r.kernel, r.head, r.dtype, r.arch)
        out[key] = out.get(key, False) or r.ok
    return out


def loops_markdown(loops: list[dict]) -> list[str]:
    if not loops:
        return []
    lines = [
        "",
        "## Instructions per tile: the loop operand rotated once (staged) vs rotated in every tile",
        "",
        "Static SASS instructions of each attention kernel's tile loop (largest backward branch), the first config "
        "its launcher may pick. Staged (the default): the launcher rotates the keys (forward, dq) or queries (dk/dv) "
        "once into a scratch buffer; per tile: each program recomputes sin/cos and rotates every tile it visits. "
        "cos/sin: math.cos / math.sin ops inside scf.for loops of the TTIR. MMA channels: the loop's tt.dot work "
        "(sum of M x K x N) over BLOCK_M x BLOCK_N, staged (the forward's q k^T and p v: twice the head size when "
        "no channel is padding).",
        "",
        "| kernel | head | dtype | arch | config | per-tile rotation | staged | ratio | cos/sin in loop: per tile, "
        "staged | MMA channels |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in loops:
        counts = (r["per_tile_rotation"], r["staged"], f"{r['per_tile_rotation'] / max(r['staged'], 1):.2f}x")
        if r["per_tile_rotation"] < 100:  # no tile loop in this Triton's SASS listing (3.6's): nothing to count
            counts = ("n/a", "n/a", "n/a")
        lines.append(f"| {r['kernel']} | {r['head']} | {r['dtype']} | sm_{r['arch']} | {r['config']} | "
                     f"{counts[0]} | {counts[1]} | {counts[2]} | {r['trig_per_tile_rotation']}, "
                     f"{r['trig_staged']} | {r['mma_channels']} |")  # fmt: skip
    return lines


def tile_widths_markdown(heads: list[str]) -> list[str]:
    """The tiles each head case is cut into (``_host.tile_widths``): the channels tl.dot contracts q k^T over in
    the forward and decode, in the backward (``one_tile``: one tile per segment), and the width of the v / output
    rows, against one power-of-two tile per segment."""
    from lr2kernels.ops.triton._host import head_sizes, one_tile_widths, segment_tiles, split_sizes

    lines = [
        "",
        "## Tile widths: the channels tl.dot runs over",
        "",
        "Each segment (a NeoX half, the pass-through, a whole v / output row) is cut into at most two power-of-two "
        "tiles, so a 48-channel half is 32 + 16 channels, not 64. The backward keeps the halves and the "
        "pass-through of its dq / dk accumulators in one tile each (16-channel accumulator tiles spill), and decode "
        "its v / output rows (its 16-row tiles). In parentheses: one power-of-two tile per segment (before).",
        "",
        "| head | forward, decode: q k^T tiles | q k^T channels | backward q k^T channels | "
        "v / output rows (not decode) |",
        "|---|---|---|---|---|",
    ]
    for head in heads:
        head_dim, rotary_dim = HEAD_CASES[head]
        split, row = split_sizes(head_dim, rotary_dim), head_sizes(head_dim)
        backward = split_sizes(head_dim, rotary_dim, one_tile=True)

        def contracted(sizes: dict) -> tuple[list[int], list[int], int]:
            halves = segment_tiles(sizes["HALF"], sizes["HALF_A"], sizes["HALF_B"])
            passthrough = segment_tiles(sizes["PASS"], sizes["PASS_A"], sizes["PASS_B"])
            return halves, passthrough, 2 * sum(halves) + sum(passthrough)

        halves, passthrough, channels = contracted(split)
        one_tile = 2 * one_tile_widths(split["HALF"])[0] + (one_tile_widths(split["PASS"])[0] if split["PASS"] else 0)
        shown = f"2 x ({'+'.join(map(str, halves))})" + (f" + {'+'.join(map(str, passthrough))}" if passthrough else "")
        rows = sum(segment_tiles(row["HEAD_DIM"], row["HEAD_A"], row["HEAD_B"]))
        lines.append(f"| {head} | {shown} | {channels} ({one_tile}) | {contracted(backward)[2]} ({one_tile}) | "
                     f"{rows} ({one_tile_widths(head_dim)[0]}) |")  # fmt: skip
    return lines


def markdown(rows: list[Row], seconds: float, argv: str, loops: list[dict] | None = None) -> str:
    lines = [
        "# Triton kernels compiled for sm_80 / sm_90 on the CPU",
        "",
        f"Generated by `python benchmarks/compile_report.py {argv}` with Triton "
        f"{', '.join(sorted({r.triton for r in rows}))} in {seconds:.0f} s "
        f"({len(rows)} compilations). Registers and spill stores from ptxas `-v`; shared memory is Triton's "
        f"dynamic shared memory (`metadata.shared`); fits: <= {SMEM_LIMIT[80]:,} B (sm_80), "
        f"<= {SMEM_LIMIT[90]:,} B (sm_90). Attention kernels: causal, dense, explicit positions.",
        "",
        "## Spill-free config that fits, per (kernel, head, dtype, arch)",
        "",
        "| kernel | head | dtype | sm_80 | sm_90 |",
        "|---|---|---|---|---|",
    ]
    summary = summarize(rows)
    keys = sorted({(k, h, d) for (k, h, d, _a) in summary}, key=lambda x: (KERNELS.index(x[0]), x[1], x[2]))
    for k, h, d in keys:
        cells = []
        for a in (80, 90):
            v = summary.get((k, h, d, a))
            cells.append("-" if v is None else ("yes" if v else "**NO**"))
        lines.append(f"| {k} | {h} | {d} | {cells[0]} | {cells[1]} |")
    lines += loops_markdown(loops or [])
    lines += tile_widths_markdown(sorted({r.head for r in rows}, key=list(HEAD_CASES).index))
    lines += [
        "",
        "## Every config",
        "",
        "| kernel | head | dtype | arch | config | regs | spill B | smem B | fits | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (KERNELS.index(r.kernel), r.head, r.dtype, r.arch, r.config)):
        note = r.error or ("" if r.ok else ("spills" if r.fits else "over smem"))
        lines.append(f"| {r.kernel} | {r.head} | {r.dtype} | sm_{r.arch} | {r.config} | {r.regs} | "
                     f"{r.spill_bytes} | {r.smem} | {'yes' if r.fits else '**no**'} | {note} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--matrix", choices=sorted(MATRICES), default="reduced")
    p.add_argument("--kernels", nargs="*", default=KERNELS, choices=KERNELS)
    p.add_argument("--heads", nargs="*", choices=list(HEAD_CASES), help="overrides the matrix's head cases")
    p.add_argument("--dtypes", nargs="*", choices=["fp16", "bf16", "fp32"], help="overrides the matrix's dtypes")
    p.add_argument("--archs", nargs="*", type=int, default=[80, 90], choices=[80, 90])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/triton_compile.md")
    p.add_argument("--json", type=Path, help="also write the raw rows as JSON")
    p.add_argument(
        "--all-configs",
        action="store_true",
        help="compile every attention autotune config, before pruning (to choose attention._KEEP)",
    )
    p.add_argument("--loop-heads", nargs="*", default=["128"], choices=list(HEAD_CASES),
                   help="head cases whose tile loops are counted (--loops on)")  # fmt: skip
    p.add_argument("--loops", choices=["on", "off"], default="on",
                   help="also count the attention kernels' tile-loop instructions, staged vs per-tile rotation "
                        "(the --loop-heads, the first dtype, sm_90)")  # fmt: skip
    args = p.parse_args(argv)
    heads, dtypes = MATRICES[args.matrix]
    heads, dtypes = args.heads or heads, args.dtypes or dtypes
    t0 = time.perf_counter()
    rows = run(args.kernels, heads, dtypes, args.archs, args.workers, args.all_configs)
    loops = []
    if args.loops == "on":
        for head in args.loop_heads:
            loops += run_loops(head, dtypes[0], 90, args.workers)
    seconds = time.perf_counter() - t0
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, seconds, shown, loops))
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "limits": SMEM_LIMIT, "loops": loops,
                                         "rows": [asdict(r) for r in rows]}, indent=1))  # fmt: skip
    missing = [k for k, v in summarize(rows).items() if not v]
    print(f"{len(rows)} compilations in {seconds:.1f} s; no spill-free fitting config for: {missing or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
