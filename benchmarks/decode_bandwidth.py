"""Static bandwidth model of the Triton decode (``lr2kernels.ops.triton.decode``), from its compile as launched.

No GPU needed. The launcher runs for real on ``meta`` tensors of the modelled shape, under a stand-in driver that
reports the target GPU: Triton's ``jit_cache_hook`` captures every launch (signature, specialization, constexprs,
num_warps, num_stages), which is then compiled for that target exactly so (Triton's bundled ptxas; the cubin
disassembled with its nvdisasm, since Triton 3.6 truncates ``asm["sass"]``). From each compile:

- registers, spills, shared memory -> programs per SM (occupancy);
- the loads (PTX): 16-byte ``cp.async`` (pipelined into shared memory) or ``ld.global.v4``;
- SASS of one key-tile trip: the instructions on the shortest path through the tile loop (the fast path: the
  slow-path branch of a sincos is not taken), issued by each of the program's warps.

The model, for batch B, kv heads Hk, q heads Hq, n new tokens, a cache filled to L (bytes = 2 L Hk D elt B):

- bytes in flight per SM = tile bytes (k + v, BLOCK_N x D) x (num_stages - 1; paged, num_stages - 3) x programs
  per SM: the pipeline's loads outstanding while one tile is computed. Little's law: an SM streams at most
  in_flight / latency; HBM needs BW x latency / SMs per SM (the latency-bandwidth product);
- issue: a trip's warp-instructions (trip x warps) over 4 schedulers at ``--ipc`` instructions per cycle each bound
  what an SM can stream to tile bytes x 4 x ipc x clock / (trip x warps);
- the grid: programs = B x Hk x splits (the launcher's choice for that GPU's SM count), spread evenly: the busiest
  SM streams ceil(programs / SMs) programs' bytes, min(that, programs per SM) at a time (fewer concurrent programs,
  fewer bytes in flight). Its time = bytes / min(BW / SMs, in flight / latency, issue bound), plus each program's
  prologue and epilogue (the fast-path SASS before and after the loop: q and its sincos, the step table's load, the
  stores) and the in-kernel merge: the last split of each (sequence, kv head) to finish merges all of them, after an
  atomic arrival count (its fence and the atomic: two L2 round trips), one L2 round trip and one trip of the
  merge's loop (SASS, as compiled) per chunk of ``MERGE_S`` splits; no second launch. (A merge kernel, as
  before the in-kernel merge: a launch gap, then an L2 round trip and a loop trip per split.)

``--page N`` models a paged cache (blocks of N keys, read through a block table) instead of a dense one.

Predicted fraction of HBM bandwidth = (bytes / BW) / predicted time. Run with each Triton to compare them::

    python benchmarks/decode_bandwidth.py --out docs/decode_bandwidth_3.9.md
    .ci/.triton36/bin/python benchmarks/decode_bandwidth.py --out /tmp/decode_3.6.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import heapq
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be created for a GPU target, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    arch: int
    sms: int
    bandwidth: float  # bytes/s
    clock: float  # Hz, sustained under a memory-bound load (below the 1.98 GHz boost)
    smem_per_sm: int  # bytes usable by blocks
    regs_per_sm: int = 65536
    max_warps: int = 64


GPUS = {
    "H100": Gpu("H100 SXM", 90, 132, 3.35e12, 1.755e9, 228 * 1024),
    "H200": Gpu("H200 SXM", 90, 132, 4.8e12, 1.755e9, 228 * 1024),
    "A100": Gpu("A100 SXM 80GB", 80, 108, 2.04e12, 1.41e9, 164 * 1024),
}
LATENCIES_NS = (600.0, 800.0)  # DRAM load latency under load; the prediction uses the worse
# An L2 round trip under load: H100's L2 hit is ~260-300 cycles unloaded (~150-170 ns); the far partition and
# queueing behind the stream's DRAM traffic are assumed to more than double it.
L2_LATENCY_NS = 400.0
# The two-kernel form (a merge kernel launched after the split kernel, before the in-kernel merge) is still
# modelled, for comparisons with older commits: one dependent launch, stream-ordered, then its loop over the
# splits (one L2 round trip each: 0 B of shared memory, no pipelining).
LAUNCH_GAP_S = 2e-6


# ------------------------------------------------------------------------------------------ capture and compile
class _Driver:
    """Enough of a Triton driver for the launcher to bind and specialize its arguments for ``arch``."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.target.arch  # a device per arch: Triton keeps a binder (target, options) per device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("meta")

    def is_active(self):
        return True


@contextlib.contextmanager
def captured_launches(arch: int):
    """Within: every @triton.jit launch is recorded as (JITFunction, its compile arguments) and not run."""
    launches = []

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        launches.append((fn.jit_function, compile))
        return True  # skip compiling and launching

    previous = knobs.runtime.jit_cache_hook
    driver.set_active(_Driver(arch))
    knobs.runtime.jit_cache_hook = hook
    try:
        yield launches
    finally:
        knobs.runtime.jit_cache_hook = previous
        driver._active = None


def _tuples(value):
    """JSON's lists back to the tuples Triton's options hold (they are hashed)."""
    return tuple(_tuples(x) for x in value) if isinstance(value, list) else value


def compile_launch(fn, args: dict, arch: int):
    """(compiled kernel, ptxas log) of one captured launch, for ``arch``, in a fresh cache (so ptxas runs)."""
    from triton.compiler import ASTSource

    knobs.cache.dir = tempfile.mkdtemp(prefix="lr2_decode_model_")
    knobs.nvidia.dump_ptxas_log = True
    src = ASTSource(fn=fn, signature=args["signature"], constexprs=args["constants"], attrs=args["configs"][0])
    options = json.loads(args["specialization_data"])["options"]  # every option as the launch resolved them
    options = {k: _tuples(v) for k, v in options.items()}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return kernel, log.getvalue()


_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_LABEL = re.compile(r"^\s*(\.?L\w+):")
_BRANCH = re.compile(r"\bBRA\s+(?:`\()?(\.?L\w+)")


def sass_of(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    return subprocess.run([str(_BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout


def _instructions(sass: str) -> tuple[list[str], dict[str, int]]:
    insts, labels = [], {}
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(insts)
            continue
        text = line.strip()
        if text.startswith("/*") and "*/" in text:
            ins = text.split("*/", 1)[1].strip().rstrip(";").strip()
            if ins:
                insts.append(ins)
    return insts, labels


def _is_exit(ins: str) -> bool:
    """An EXIT, predicated (``@P0 EXIT``: a program that leaves early, e.g. a split that does not merge) or not."""
    return ins.split()[-1] == "EXIT"


def loop_trip(sass: str) -> tuple[int, int, int]:
    """(trip, rest, last): the instructions on the shortest path through the key loop (the largest holding an MMA)
    from its header to its back edge (one trip's fast path: a slow path not taken is not counted), on the shortest
    path from the kernel's entry to that loop plus from the loop to an EXIT (the prologue and epilogue of a program
    that runs the loop; a predicated EXIT counts: a split that does not merge leaves there), and on one trip of the
    last loop after it (the decode's merge; 0 if none)."""
    insts, labels = _instructions(sass)
    cuts = {0, *labels.values()}
    cuts |= {i + 1 for i, ins in enumerate(insts) if _BRANCH.search(ins) or _is_exit(ins)}
    starts = sorted(c for c in cuts if c < len(insts))
    ends = starts[1:] + [len(insts)]
    block_of = {i: b for b, (s, e) in enumerate(zip(starts, ends)) for i in range(s, e)}
    back_edges = [
        (i - labels[m.group(1)], labels[m.group(1)], i)
        for i, ins in enumerate(insts)
        if (m := _BRANCH.search(ins)) and m.group(1) in labels and labels[m.group(1)] <= i
    ]
    if not back_edges:
        return 0, len(insts), 0
    # The key loop: the largest holding an MMA (the merge's loop, after it, may be as long); else the largest.
    mma = [e for e in back_edges if any("MMA" in insts[i].split()[1 if insts[i].startswith("@") else 0]
                                         for i in range(e[1], e[2] + 1))]  # fmt: skip
    _, head, tail = max(mma or back_edges)
    first, last = block_of[head], block_of[tail]
    after = [(t, h) for _, h, t in back_edges if h > tail and t > h]  # later loops (not the end's BRA to itself)

    def successors(b):  # forward edges only: the shortest paths run each loop at most once
        ins = insts[ends[b] - 1]
        branch = _BRANCH.search(ins)
        out = [block_of[labels[branch.group(1)]]] if branch and branch.group(1) in labels else []
        unconditional = (branch or _is_exit(ins)) and not ins.startswith("@")
        if not unconditional and ends[b] < len(insts):
            out.append(b + 1)
        return [n for n in out if n > b]

    def shortest(source, targets, inside=lambda b: True):
        dist = {source: ends[source] - starts[source]}
        queue = [(dist[source], source)]
        while queue:
            d, b = heapq.heappop(queue)
            if b in targets:
                return d
            if d > dist[b]:
                continue
            for n in successors(b):
                nd = d + ends[n] - starts[n]
                if inside(n) and nd < dist.get(n, math.inf):
                    dist[n] = nd
                    heapq.heappush(queue, (nd, n))
        return 0

    trip = shortest(first, {last}, inside=lambda b: first < b <= last)
    exits = {b for b in range(len(starts)) if _is_exit(insts[ends[b] - 1])}
    prologue = shortest(0, {first}) - (ends[first] - starts[first])
    epilogue = shortest(last + 1, exits) if last + 1 < len(starts) else 0
    last_trip = 0
    if after:
        tail2, head2 = max(after)
        first2, last2 = block_of[head2], block_of[tail2]
        last_trip = shortest(first2, {last2}, inside=lambda b: first2 < b <= last2)
    return trip, prologue + epilogue, last_trip


@dataclasses.dataclass
class Compiled:
    kernel: str
    constants: dict
    warps: int
    stages: int
    registers: int
    spills: int
    smem: int
    cp_async_16: int
    ld_v4: int
    trip: int
    rest: int
    merge_trip: int = 0


def compile_report(fn, args: dict, arch: int) -> Compiled:
    kernel, log = compile_launch(fn, args, arch)
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log)]
    ptx = kernel.asm["ptx"]
    names = fn.arg_names
    constants = {names[k[0]]: v for k, v in args["constants"].items()}
    trip, rest, merge_trip = loop_trip(sass_of(kernel))
    return Compiled(
        fn.__name__, constants, args["num_warps"], args["num_stages"], max(regs, default=0), max(spills, default=0),
        int(kernel.metadata.shared), len(re.findall(r"cp\.async\.cg\.shared\.global \[[^]]+\], \[[^]]+\], 0x10", ptx)),
        ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4") + ptx.count("ld.global.cg.v4"), trip, rest,
        merge_trip,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------ model
@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int
    n_new: int = 1
    rotary_dim: int = 0  # 0: the whole head turns


SHAPES = [
    Shape("Llama-3-8B (GQA 32/8, D128)", 32, 8, 128),
    Shape("Llama-3-70B (GQA 64/8, D128)", 64, 8, 128),
    Shape("MHA 32/32, D128", 32, 32, 128),
    Shape("Phi-3-mini (MHA 32/32, D96)", 32, 32, 96),
    Shape("SmolLM2-135M (GQA 9/3, D64)", 9, 3, 64),
    Shape("Qwen2.5-7B (GQA 28/4, D128)", 28, 4, 128),
    Shape("Phi-4-mini (GQA 24/8, D128, rotary 96)", 24, 8, 128, rotary_dim=96),
    # Few kv heads: a small cache a step (16 MB at 32K for one kv head of 128), the merge of many splits on one SM.
    Shape("MQA 8/1, D128", 8, 1, 128),
    Shape("GQA 16/2, D128", 16, 2, 128),
]
LENGTHS = [32768, 65536, 131072]


def launches(shape: Shape, length: int, batch: int, gpu: Gpu, dtype: torch.dtype, page: int = 0):
    """The decode's launches for this shape on ``gpu``, as its launcher makes them (num_splits from the SM count);
    ``page`` > 0: a paged cache of blocks of that many keys, read through a block table."""
    from lr2kernels.ops.triton import decode

    q = torch.empty(batch, shape.q_heads, shape.n_new, shape.head_dim, device="meta", dtype=dtype)
    if page:
        cache = torch.empty(batch * length // page, page, shape.kv_heads, shape.head_dim, device="meta", dtype=dtype)
        paged = {"block_table": torch.empty(batch, length // page, dtype=torch.int32, device="meta")}
    else:
        cache = torch.empty(batch, shape.kv_heads, length, shape.head_dim, device="meta", dtype=dtype)
        paged = {}
    seqlens = torch.empty(batch, dtype=torch.int32, device="meta")
    inv_freq = torch.empty(2, (shape.rotary_dim or shape.head_dim) // 2, device="meta")
    rows = shape.q_heads // shape.kv_heads * shape.n_new
    block_m, block_n = decode._block_sizes(rows, shape.head_dim, dtype, paged=bool(page))
    programs = batch * shape.kv_heads * triton.cdiv(rows, block_m)
    real_sm_count = decode.sm_count
    decode.sm_count = lambda device: gpu.sms
    try:
        warps = decode._num_warps(shape.head_dim, block_m)
        splits = decode._auto_splits(programs, length, block_n, torch.device("cuda"), shape.head_dim, rows, block_m,
                                     warps)  # fmt: skip
    finally:
        decode.sm_count = real_sm_count
    with captured_launches(gpu.arch) as captured:
        decode.rope_decode(q, cache, cache, seqlens, inv_freq, 4096, 1.0, 1.2, shape.head_dim**-0.5,
                           num_splits=splits, **paged)  # fmt: skip
    return captured, splits, programs * splits


def programs_per_sm(c: Compiled, gpu: Gpu) -> int:
    regs_per_warp = math.ceil(max(c.registers, 1) * 32 / 256) * 256  # allocated per warp in 256-register units
    by_regs = gpu.regs_per_sm // (regs_per_warp * c.warps)
    by_smem = gpu.smem_per_sm // (c.smem + 1024) if c.smem else 32  # 1 KB reserved per block
    return max(0, min(by_regs, by_smem, gpu.max_warps // c.warps, 32))


def model(shape, length, batch, gpu, dtype, ipc, compiled_cache, page=0):
    captured, splits, grid = launches(shape, length, batch, gpu, dtype, page)
    rows = []
    for fn, args in captured:
        key = (fn.__name__, repr(sorted(args["constants"].items())), args["num_warps"], args["num_stages"], gpu.arch)
        if key not in compiled_cache:
            compiled_cache[key] = compile_report(fn, args, gpu.arch)
        rows.append(compiled_cache[key])
    main = rows[0]
    elt = torch.finfo(dtype).bits // 8
    block_n = main.constants["BLOCK_N"]
    tile_bytes = 2 * block_n * shape.head_dim * elt  # k and v
    per_sm = programs_per_sm(main, gpu)
    # k/v tiles loading ahead of the one computed: stages - 1 (paged too: the kernel loads the block ids a trip
    # ahead itself); a block id per key (a block size neither dividing BLOCK_N nor a multiple of it) is a load in
    # the loop whose chain takes two stages of the pipeline (the launcher's 5 keep two k/v tiles ahead)
    ahead = main.stages - (3 if page and not main.constants["IDS_AHEAD"] else 1)
    in_flight = tile_bytes * ahead * per_sm
    lbp = [gpu.bandwidth * lat * 1e-9 / gpu.sms for lat in LATENCIES_NS]
    mlp_sm = in_flight / (max(LATENCIES_NS) * 1e-9)  # bytes/s one SM can keep coming
    issue_sm = tile_bytes * 4 * ipc * gpu.clock / (main.trip * main.warps)
    # The busiest SM: programs spread evenly, ceil(grid / SMs) of them, at most per_sm at a time.
    rounds_programs = math.ceil(grid / gpu.sms)
    concurrent = min(per_sm, rounds_programs)
    kv_bytes = 2 * batch * shape.kv_heads * length * shape.head_dim * elt
    sm_bytes = kv_bytes / grid * rounds_programs
    mlp_now = tile_bytes * ahead * concurrent / (max(LATENCIES_NS) * 1e-9)
    sm_rate = min(gpu.bandwidth / gpu.sms, mlp_now, issue_sm)
    prologue = main.rest * main.warps / (4 * ipc * gpu.clock) * rounds_programs / concurrent
    merge_time = 0.0
    if len(rows) > 1:  # a merge kernel (before the in-kernel merge): a launch gap, an L2 round trip a split
        merge = rows[1]
        merge_time = LAUNCH_GAP_S + splits * (L2_LATENCY_NS * 1e-9 + merge.trip * merge.warps / (4 * ipc * gpu.clock))
    elif splits > 1:  # the last split to arrive: the fence and atomic, then a load round and a loop trip per chunk
        rounds = math.ceil(splits / main.constants["MERGE_S"])
        merge_trip_s = main.merge_trip * main.warps / (4 * ipc * gpu.clock)
        merge_time = (2 + rounds) * L2_LATENCY_NS * 1e-9 + rounds * merge_trip_s
    time = sm_bytes / sm_rate + prologue + merge_time
    busy = kv_bytes / gpu.sms / sm_bytes  # the average SM's share of the busiest one's bytes
    ideal = kv_bytes / gpu.bandwidth
    return dict(
        main=main, merge_time=merge_time, splits=splits, grid=grid, per_sm=per_sm, tile_bytes=tile_bytes,
        in_flight=in_flight, lbp=lbp, mlp=min(1.0, mlp_sm * gpu.sms / gpu.bandwidth),
        issue=min(9.99, issue_sm * gpu.sms / gpu.bandwidth), busy=busy, fraction=ideal / time, time=time,
    )  # fmt: skip


def report(args) -> str:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cache: dict = {}
    lines = [
        f"Triton {triton.__version__}, {args.dtype}, batch {args.batch}, n = 1 new token, "
        + (f"paged: blocks of {args.page} keys (block_table), " if args.page else "")
        + f"issue at {args.ipc} "
        f"instructions/cycle per scheduler, DRAM latency {LATENCIES_NS[0]:.0f}-{LATENCIES_NS[1]:.0f} ns "
        f"(the model uses {LATENCIES_NS[1]:.0f}), an L2 round trip of {L2_LATENCY_NS:.0f} ns (the merge).",
        "",
    ]
    for gpu_name in args.gpus:
        gpu = GPUS[gpu_name]
        lbp = [gpu.bandwidth * lat * 1e-9 / gpu.sms for lat in LATENCIES_NS]
        lines += [
            f"### {gpu.name} (sm_{gpu.arch}, {gpu.sms} SMs, {gpu.bandwidth / 1e12:.2f} TB/s, clock "
            f"{gpu.clock / 1e9:.3f} GHz): latency-bandwidth product {lbp[0] / 1024:.1f}-{lbp[1] / 1024:.1f} KB per SM",
            "",
            "| shape | L | config (M x N, warps, stages) | regs | spills | smem KB | 16-B cp.async / ld.v4 | SASS: a "
            "trip / outside the loop | programs/SM | in flight KB/SM | MLP bound | issue bound | splits, grid, busy "
            "| merge: chunk (splits x rows), trip, us | predicted |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for shape in SHAPES:
            for length in LENGTHS:
                m = model(shape, length, args.batch, gpu, dtype, args.ipc, cache, args.page)
                c = m["main"]
                k = c.constants
                lines.append(
                    f"| {shape.name} | {length // 1024}K | {k['BLOCK_M']} x {k['BLOCK_N']}, w{c.warps}, s{c.stages} | "
                    f"{c.registers} | {c.spills} | {c.smem / 1024:.0f} | {c.cp_async_16} / {c.ld_v4} | "
                    f"{c.trip} / {c.rest} | "
                    f"{m['per_sm']} | {m['in_flight'] / 1024:.0f} | {m['mlp']:.0%} | {m['issue']:.0%} | "
                    f"{m['splits']}, {m['grid']}, {m['busy']:.0%} | "
                    f"{k.get('MERGE_S', 1)} x {k.get('MERGE_M', k['BLOCK_M'])}, {c.merge_trip}, "
                    f"{m['merge_time'] * 1e6:.1f} | "
                    f"**{m['fraction']:.0%}** |"
                )  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"


HEAD_CASES = {"64": (64, 64), "80": (80, 80), "96": (96, 96), "128": (128, 128), "256": (256, 256),
              "96of128": (128, 96)}  # fmt: skip
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # per block


def compile_check(args) -> tuple[str, bool]:
    """Every head case x arch, compiled as launched for one new token of MHA (16-row tiles) and for 64 rows (GQA 8 x 8
    new tokens: the launcher's largest row tile), each unsplit and split (and the merge): registers, spills, shared
    memory, the loads."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    lines = [
        f"Triton {triton.__version__}, {args.dtype}: the decode compiled as launched (capacity 32K, batch 1).",
        "",
        "| head | arch | kernel | config | regs | spills | smem KB | 16-B cp.async / ld.v4 | SASS: a trip "
        "| merge trip |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok = True
    for head in args.heads:
        head_dim, rotary_dim = HEAD_CASES[head]
        for arch in args.archs:
            for q_heads, kv_heads, n_new, splits in ((8, 8, 1, 1), (8, 8, 1, 2), (8, 1, 8, 1), (8, 1, 8, 2)):
                q = torch.empty(1, q_heads, n_new, head_dim, device="meta", dtype=dtype)
                cache = torch.empty(1, kv_heads, 32768, head_dim, device="meta", dtype=dtype)
                inv_freq = torch.empty(2, rotary_dim // 2, device="meta")
                seqlens = torch.empty(1, dtype=torch.int32, device="meta")
                from lr2kernels.ops.triton import decode

                with captured_launches(arch) as captured:
                    decode.rope_decode(q, cache, cache, seqlens, inv_freq, 4096, 1.0, 1.2, head_dim**-0.5,
                                       num_splits=splits)  # fmt: skip
                for fn, launch in captured:
                    c = compile_report(fn, launch, arch)
                    k = c.constants
                    config = f"M{k['BLOCK_M']} N{k['BLOCK_N']} split={int(k['IS_SPLIT'])}"
                    if k["IS_SPLIT"]:
                        config += f" merge {k['MERGE_S']}x{k['MERGE_M']}"
                    good = c.spills == 0 and c.smem <= SMEM_LIMIT[arch] and c.registers > 0
                    ok &= good
                    lines.append(
                        f"| {head} | sm_{arch} | {c.kernel} | {config} w{c.warps} s{c.stages} | {c.registers} | "
                        f"{c.spills} | {c.smem / 1024:.0f} | {c.cp_async_16} / {c.ld_v4} | {c.trip} | "
                        f"{c.merge_trip or ''} |"
                        + ("" if good else " **fails**")
                    )  # fmt: skip
    return "\n".join(lines) + "\n", ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", nargs="+", default=["H100", "H200", "A100"], choices=list(GPUS))
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--page", type=int, default=0, help="model a paged cache of this block size (0: dense)")
    parser.add_argument("--ipc", type=float, default=0.7, help="sustained issue rate per scheduler (<= 1)")
    parser.add_argument("--out", type=Path, help="write the markdown table here (default: stdout)")
    parser.add_argument("--check", action="store_true", help="compile every head case instead; exit 1 on a spill")
    parser.add_argument("--heads", nargs="+", default=list(HEAD_CASES), choices=list(HEAD_CASES))
    parser.add_argument("--archs", nargs="+", type=int, default=[80, 90], choices=[80, 90])
    args = parser.parse_args()
    if args.check:
        text, ok = compile_check(args)
        if args.out:
            args.out.write_text(text)
        print(text)
        sys.exit(0 if ok else 1)
    text = report(args)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
