"""Compile every csrc/*.cu for each architecture with ``nvcc -Xptxas -v`` and report each kernel's resources.

Usage: ``python csrc/ptxas_report.py [--archs 80 90] [--out benchmarks/results/cuda_ptxas.md] [--jobs N]``.

Needs nvcc only (no GPU, no torch): each translation unit is compiled to an object in a temporary directory, with the
flags setup.py uses, and ptxas's verbose output is parsed into one row per (kernel, architecture): registers, spill
stores/loads, stack frame and static shared memory. The checks of tests/cuda/test_ptxas.py: no spills, at most 255
registers, shared memory within the architecture's per-block limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).resolve().parent
ROOT = CSRC.parent
DEFAULT_ARCHS = ("80", "90")
# Shared memory one block may use (opt-in maximum), bytes: A100 (sm_80) 163 KB, H100/H200 (sm_90) 227 KB.
SMEM_LIMIT = {"80": 163 * 1024, "86": 99 * 1024, "89": 99 * 1024, "90": 227 * 1024}
MAX_REGISTERS = 255
STATIC_SMEM_LIMIT = 48 * 1024  # static shared memory a block may declare (more: dynamic, opted in at launch)

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclasses.dataclass
class Kernel:
    source: str
    arch: str
    mangled: str
    name: str = ""
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    dynamic_smem: int = 0  # the launch's dynamic shared memory (rope_decode: DecodeShape.dynamic_bytes)

    def problems(self) -> list[str]:
        found = []
        if self.spill_stores or self.spill_loads:
            found.append(f"spills ({self.spill_stores} B stores, {self.spill_loads} B loads)")
        if self.registers > MAX_REGISTERS:
            found.append(f"{self.registers} registers > {MAX_REGISTERS}")
        limit = SMEM_LIMIT.get(self.arch)
        if limit is not None and self.smem + self.dynamic_smem > limit:
            found.append(f"{self.smem + self.dynamic_smem} B shared memory > sm_{self.arch}'s {limit} B")
        if self.smem > STATIC_SMEM_LIMIT:
            found.append(f"{self.smem} B static shared memory > the {STATIC_SMEM_LIMIT} B a block may declare")
        return found


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, then PATH (as setup.py looks)."""
    for home in filter(None, [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]):
        nvcc = Path(home) / "bin" / "nvcc"
        if nvcc.is_file():
            return str(nvcc)
    return shutil.which("nvcc")


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def parse(text: str, source: str) -> list[Kernel]:
    """Kernels of one ``-Xptxas -v`` output (lines after "Compiling entry function" belong to that kernel)."""
    kernels: list[Kernel] = []
    for line in text.splitlines():
        if match := _ENTRY.search(line):
            kernels.append(Kernel(source, match.group(2), match.group(1)))
            continue
        if not kernels:
            continue
        kernel = kernels[-1]
        if match := _SPILL.search(line):
            kernel.stack, kernel.spill_stores, kernel.spill_loads = map(int, match.groups())
        if match := _USED.search(line):
            kernel.registers = int(match.group(1))
            if match := _SMEM.search(line):
                kernel.smem = int(match.group(1))
    return kernels


def _demangle(kernels: list[Kernel]) -> None:
    names = [k.mangled for k in kernels]
    cxxfilt = shutil.which("c++filt")
    if cxxfilt and names:
        out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=False).stdout
        demangled = out.splitlines()
        if len(demangled) == len(names):
            for kernel, name in zip(kernels, demangled):
                name = re.sub(r"\([^()]*\)$", "", name)  # the parameter list
                name = name.replace("(anonymous namespace)::", "").replace("lr2::", "")
                kernel.name = name.removeprefix("void ")
            return
    for kernel in kernels:
        kernel.name = kernel.mangled


def compile_one(nvcc: str, source: Path, arch: str, out_dir: Path) -> list[Kernel]:
    obj = out_dir / f"{source.stem}.sm_{arch}.o"
    cmd = [
        nvcc, "-c", str(source), "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
        f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", f"-I{CSRC}",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr}")
    return parse(result.stdout + result.stderr, source.name)


def report(nvcc: str, archs: tuple[str, ...] = DEFAULT_ARCHS, jobs: int | None = None) -> list[Kernel]:
    """Every kernel of every csrc/*.cu for every arch (translation units compiled in parallel)."""
    jobs = jobs or os.cpu_count() or 1
    tasks = [(src, arch) for src in sources() for arch in archs]
    with tempfile.TemporaryDirectory(prefix="lr2_ptxas_") as tmp, ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda task: compile_one(nvcc, task[0], task[1], Path(tmp)), tasks))
    kernels = [k for result in results for k in result]
    _demangle(kernels)
    for kernel in kernels:
        if shape := decode_shape(kernel):
            kernel.dynamic_smem = shape.dynamic_bytes
    return sorted(kernels, key=lambda k: (k.source, k.name, k.arch))


def markdown(kernels: list[Kernel], nvcc_version: str, seconds: float) -> str:
    lines = [
        "# CUDA kernels: ptxas resource usage",
        "",
        f"Generated by `python csrc/ptxas_report.py` ({nvcc_version}; flags as setup.py: `-O3 -std=c++17`, one",
        f"`-gencode` per architecture; {seconds:.0f} s on {os.cpu_count()} CPUs). No GPU is needed. Checked by",
        "`tests/cuda/test_ptxas.py`: no spills, <= 255 registers, static shared memory <= 48 KB and static +",
        "dynamic within the per-block opt-in limit (sm_80: 163 KB, sm_90: 227 KB). The 32-byte stack frames are",
        "sincosf's local array for the Payne-Hanek argument reduction of large angles (its slow path), not spills.",
        "smem: static (ptxas) + dynamic (the launch's: fp16/bf16 head 256 at 4 rows keeps its stages there).",
        "",
        "| source | kernel | arch | registers | spill stores (B) | spill loads (B) | stack (B) | smem (B) | ok |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for k in kernels:
        status = "; ".join(k.problems()) or "yes"
        smem = f"{k.smem} + {k.dynamic_smem}" if k.dynamic_smem else f"{k.smem}"
        lines.append(
            f"| {k.source} | `{k.name}` | sm_{k.arch} | {k.registers} | {k.spill_stores} | {k.spill_loads} | "
            f"{k.stack} | {smem} | {status} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ decode model
# The static bandwidth model of csrc/README.md for rope_decode_kernel<T, D, ROWS> on sm_90 (H100, H200), from the
# registers and shared memory ptxas reports. DecodeShape mirrors csrc/rope_decode.cuh's (tests/cuda/test_host_math.py
# checks the two agree through the host shim).
GPUS = {"H100 SXM": 3.35e12, "H200": 4.8e12}  # HBM bytes/s
SMS = 132
DRAM_LATENCY_S = 800e-9  # the pessimistic end of 600-800 ns (loaded latency grows with the queue)
CLOCK_HZ = 1.755e9  # sustained SM clock under load (boost is 1.98 GHz)
ISSUE_PER_CYCLE = 4  # warp-instructions an SM issues per cycle (4 schedulers)
REGISTERS_PER_SM = 65536
SMEM_PER_SM = {"80": 164 * 1024, "90": 228 * 1024}
THREADS = 128
# Blocks per SM the launcher's splits provide at batch 1 (lr2kernels/ops/cuda/launch.py: _grid_blocks_per_sm): at most
# this many are resident even where the registers and shared memory would allow more; 2 for the kernels whose shared
# memory allows only 2 (DecodeShape.dynamic_bytes: one wave, no third block an SM left to run alone).
GRID_BLOCKS_PER_SM = 3
GRID_BLOCKS_PER_SM_DYNAMIC = 2
_DECODE = re.compile(r"rope_decode_kernel<(float|__half|__nv_bfloat16), (\d+), (\d+), (false|true)>")
# The paged kernel's extra instructions per tile and warp (issue(): the shift for a power-of-two block size, the table
# read, the bounds check, the block's k and v base addresses with four 64-bit multiplies), executed by each of the 4
# warps once a tile: ~30 PTX instructions in the bf16 head-128 loop, the 64-bit multiplies ~3 SASS each.
PAGE_LOOKUP_INSTRUCTIONS = 36
# Per-tile work every shape does besides the keys' loop: the 16-byte cp.async copies (address, predicate, copy: ~10
# instructions each, a thread issuing 2 x TILE x D x element bytes / 16 / 128 of them a tile) and the tile's base
# angles (one precise sincosf per rotary slot and base, ~40 instructions on its fast path).
COPY_INSTRUCTIONS = 10
SINCOS_INSTRUCTIONS = 40
_ELEMENT_BYTES = {"float": 4, "__half": 2, "__nv_bfloat16": 2}


def _floor_pow2(x: int) -> int:
    p = 1
    while 2 * p <= x:
        p *= 2
    return p


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """csrc/rope_decode.cuh's DecodeShape<T, D, ROWS> (paged: the PAGED instantiation's issue cost)."""

    element_bytes: int
    head_dim: int
    rows: int
    paged: bool = False

    @property
    def slots(self) -> int:
        return self.head_dim // 2

    @property
    def lanes_per_key(self) -> int:
        target = min(8, max(1, 16 // self.rows))
        lanes = [n for n in (1, 2, 4, 8, 16, 32) if self.slots % n == 0]
        return next((n for n in lanes if self.slots // n <= target), lanes[-1])

    @property
    def slots_per_lane(self) -> int:
        return self.slots // self.lanes_per_key

    @property
    def keys_per_warp(self) -> int:
        return 32 // self.lanes_per_key

    @property
    def mma(self) -> bool:
        """fp16/bf16 at 4 and 8 rows (4 at head 256): the tensor-core tiles (rope_decode_mma_tiles)."""
        return self.element_bytes == 2 and self.rows >= 4

    @property
    def warp_keys(self) -> bool:
        """Head 256 on tensor cores: each warp copies, looks up (paged) and angles its own 8 keys (WARP_KEYS)."""
        return self.mma and self.head_dim > 128

    @property
    def tile(self) -> int:
        if self.mma:
            return 32  # 4 warps x the 8 keys of an mma.m16n8k16
        by_bytes = _floor_pow2(8192 // (2 * self.head_dim * self.element_bytes))
        return max(4 * self.keys_per_warp, by_bytes)

    @property
    def page_span(self) -> int:  # keys a block-table lookup serves (DecodeShape::PAGE_SPAN)
        return 8 if self.warp_keys else self.tile // 2 if self.mma else self.tile

    @property
    def bases(self) -> int:  # base angles a tile (one per half tile for the mma tiles, one per warp for WARP_KEYS)
        return 4 if self.warp_keys else 2 if self.mma else 1

    @property
    def lookups_per_warp(self) -> int:  # paged: block-table lookups a warp makes a tile
        return 1 if self.warp_keys else self.tile // self.page_span

    @property
    def stage_bytes(self) -> int:  # padded rows, as allocated
        return 2 * self.tile * (self.head_dim + 16 // self.element_bytes) * self.element_bytes

    @property
    def stages(self) -> int:
        return 3 if self.stage_bytes <= 10240 else 2

    @property
    def tile_cache_bytes(self) -> int:  # the cache bytes a tile moves (keys and values)
        return 2 * self.tile * self.head_dim * self.element_bytes

    @property
    def groups(self) -> int:  # partial softmax states merged after the loop
        return 4 if self.mma else 4 * self.keys_per_warp

    @property
    def buffer_bytes(self) -> int:  # the stages, after the loop the merge buffer (DecodeShape::SMEM_BYTES)
        return max(self.stages * self.stage_bytes, self.groups * self.rows * self.head_dim * 4)

    @property
    def table_bytes(self) -> int:  # the step and base tables (fp16/bf16), the groups' m and l
        step = self.tile // self.bases + self.bases if self.element_bytes == 2 else 0
        return step * self.slots * 8 + self.groups * self.rows * 8

    @property
    def dynamic_bytes(self) -> int:
        """The stages in dynamic shared memory where the block needs more than 48 KB (DecodeShape::DYNAMIC_BYTES)."""
        return self.buffer_bytes if self.buffer_bytes + self.table_bytes > 48 * 1024 else 0

    @property
    def smem_bytes(self) -> int:  # the block's shared memory, static and dynamic
        return self.buffer_bytes + self.table_bytes

    @property
    def min_blocks(self) -> int:
        fits = self.element_bytes == 2 and not self.dynamic_bytes
        return 3 if fits and (self.mma or self.rows * self.slots_per_lane <= 16) else 2

    def instructions_per_key(self) -> float:
        """Estimated warp-instructions per cached key: its loop plus the per-tile work (tile_instructions_per_key).

        CUDA-core tiles (fp32; fp16/bf16 at 1 and 2 rows). Per lane and key: each pair slot ~34 (4 shared
        loads + 4 conversions of k/v, 2 step-table loads, ~20 for the angle-addition cos/sin, 4 for the rotation;
        fp32: a sincosf instead); each row 2 * SPL FMAs for the dot and 2 * SPL for the accumulator; ~12 of loop and
        masks. Up to 2 rows, each row also reduces its dot over the LPK lanes (2 log2(LPK): shuffle + add) and runs
        its softmax (~6; the rescale is rare). From 4 rows, the transposed reduction: ROWS - 1 shuffles + adds + 2
        selects to leave each lane one row, 2 log2(LPK / ROWS) for the rest, one softmax (~8), a vote (~2) and a
        shuffle per row for its probability. The warp's 32 lanes serve 32 / LPK keys.

        Tensor-core tiles (mma): the RoPE pass ~34 a rotary slot and key over the 32 lanes (2 loads + 2 conversions of
        k, 2 step-table loads, ~20 cos/sin, 4 rotation, 2 conversions + 2 stores back); per 8 keys a warp: D / 16 x (2
        shared loads + 1 mma) for the scores, ~25 for the masks, scale and softmax of the lane's 2 scores (the row max
        by 2 shuffles), D / 16 x (4 shared loads + 2 packs + 1 mma) for O += P V, ~12 of loop."""
        if self.mma:
            rope = 34 * self.slots / 32
            per_8_keys = 3 * self.head_dim / 16 + 25 + 7 * self.head_dim / 16 + 12
            loop = rope + per_8_keys / 8
        else:
            spl, lpk, rows = self.slots_per_lane, self.lanes_per_key, self.rows
            fma = 4 * spl * rows
            if rows >= 4:
                reduce = 4 * (rows - 1) + 2 * ((lpk // rows).bit_length() - 1) + 8 + 2 + rows
            else:
                reduce = rows * (2 * (lpk.bit_length() - 1) + 6)
            loop = (34 * spl + fma + reduce + 12) / self.keys_per_warp
        return loop + self.tile_instructions_per_key()

    def tile_instructions_per_key(self) -> float:
        """The per-tile work over the tile's keys, in warp-instructions a key: the cp.async copies (COPY_INSTRUCTIONS
        each, 2 x D x element bytes / 16 a key, over 32 lanes), the base angles (bases x D / 2 sincosf a tile, over 32
        lanes) and, paged, every warp's block lookups (PAGE_LOOKUP_INSTRUCTIONS each: one per page_span keys of the
        tile, or with WARP_KEYS one a warp, for its own 8 keys)."""
        copies = 2 * self.head_dim * self.element_bytes / 16 * COPY_INSTRUCTIONS / 32
        angles = self.bases * self.slots * SINCOS_INSTRUCTIONS / 32 / self.tile if self.element_bytes == 2 else 0.0
        page = 4 * self.lookups_per_warp * PAGE_LOOKUP_INSTRUCTIONS / self.tile if self.paged else 0.0
        return copies + angles + page


def decode_shape(kernel: Kernel) -> DecodeShape | None:
    """The DecodeShape of a rope_decode_kernel<T, D, ROWS, PAGED> (None for the other kernels)."""
    match = _DECODE.fullmatch(kernel.name)
    if not match:
        return None
    return DecodeShape(_ELEMENT_BYTES[match.group(1)], int(match.group(2)), int(match.group(3)),
                       match.group(4) == "true")  # fmt: skip


def blocks_per_sm(kernel: Kernel) -> int:
    registers = -(-max(kernel.registers, 1) // 8) * 8  # allocated per warp in units of 256 (8 a thread)
    by_registers = REGISTERS_PER_SM // (registers * THREADS)
    smem = kernel.smem + kernel.dynamic_smem + 1024  # 1 KB reserved a block
    by_smem = SMEM_PER_SM.get(kernel.arch, 99 * 1024) // smem
    return min(by_registers, by_smem, 2048 // THREADS, 32)


def decode_model(kernels: list[Kernel]) -> list[dict]:
    """One row per sm_90 rope_decode_kernel: blocks per SM, bytes in flight per SM, and the predicted fraction of each
    GPU's HBM bandwidth at batch 1 and long contexts (enough splits to fill every SM), memory- and issue-bound."""
    rows = []
    for kernel in kernels:
        shape = decode_shape(kernel)
        if kernel.arch != "90" or shape is None:
            continue
        blocks = blocks_per_sm(kernel)
        grid_blocks = GRID_BLOCKS_PER_SM_DYNAMIC if shape.dynamic_bytes else GRID_BLOCKS_PER_SM
        in_flight = min(blocks, grid_blocks) * (shape.stages - 1) * shape.tile_cache_bytes
        key_bytes = 2 * shape.head_dim * shape.element_bytes
        issue_bytes_per_s = SMS * ISSUE_PER_CYCLE * CLOCK_HZ * key_bytes / shape.instructions_per_key()
        row = {"kernel": kernel.name, "registers": kernel.registers, "blocks_per_sm": blocks, "shape": shape,
               "in_flight": in_flight, "instructions_per_key": shape.instructions_per_key()}  # fmt: skip
        for gpu, peak in GPUS.items():
            memory = min(1.0, SMS * in_flight / DRAM_LATENCY_S / peak)
            issue = min(1.0, issue_bytes_per_s / peak)
            row[gpu] = (memory, issue, min(memory, issue))
        rows.append(row)
    return rows


def decode_model_markdown(kernels: list[Kernel]) -> str:
    needed = {gpu: peak * DRAM_LATENCY_S / SMS for gpu, peak in GPUS.items()}
    lines = [
        "## rope_decode: static bandwidth model (sm_90)",
        "",
        "Bytes in flight per SM = resident blocks (the fewer of what the registers and shared memory above allow and "
        f"the {GRID_BLOCKS_PER_SM} a SM the launcher's splits provide, {GRID_BLOCKS_PER_SM_DYNAMIC} for the kernels "
        "with dynamic shared memory) x (STAGES - 1) x the "
        "cache bytes of a tile, against the latency-bandwidth product per SM: "
        + ", ".join(f"{gpu} {needed[gpu] / 1024:.1f} KB ({peak / 1e12:.2f} TB/s x {DRAM_LATENCY_S * 1e9:.0f} ns / "
                    f"{SMS} SMs)" for gpu, peak in GPUS.items())
        + f". Issue bound: estimated warp-instructions per key (csrc/ptxas_report.py: DecodeShape."
        f"instructions_per_key: the keys' loop, the cp.async copies and the tile's base angles, paged the block "
        f"lookup) at {ISSUE_PER_CYCLE} per cycle and {CLOCK_HZ / 1e9:.3f} GHz. Each cell: memory-bound /"
        " "
        "issue-bound / predicted (the smaller) fraction of HBM bandwidth at batch 1 once the splits fill every SM "
        "(32K keys and up), before the fixed costs (launches, the merge, the first tile's latency); csrc/README.md.",
        "",
        "| kernel | regs | blocks/SM | LPK x SPL (mma: tensor cores) | tile x stages | KB in flight/SM | instr/key | "
        + " | ".join(GPUS) + " |",
        "|---|---:|---:|---|---|---:|---:|" + "---|" * len(GPUS),
    ]  # fmt: skip
    for row in decode_model(kernels):
        shape = row["shape"]
        cells = " | ".join("{:.0%} / {:.0%} / **{:.0%}**".format(*row[gpu]) for gpu in GPUS)
        lanes = "mma" if shape.mma else f"{shape.lanes_per_key} x {shape.slots_per_lane}"
        lines.append(
            f"| `{row['kernel']}` | {row['registers']} | {row['blocks_per_sm']} | {lanes} | "
            f"{shape.tile} x {shape.stages} | {row['in_flight'] / 1024:.0f} | "
            f"{row['instructions_per_key']:.0f} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return f"nvcc {match.group(2)}" if match else "nvcc"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cuda_ptxas.md")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found ($CUDA_HOME, $CUDA_PATH, /usr/local/cuda, PATH)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    kernels = report(nvcc, tuple(args.archs), args.jobs)
    text = markdown(kernels, nvcc_version(nvcc), time.perf_counter() - start) + "\n" + decode_model_markdown(kernels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    bad = [k for k in kernels if k.problems()]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
