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

    def problems(self) -> list[str]:
        found = []
        if self.spill_stores or self.spill_loads:
            found.append(f"spills ({self.spill_stores} B stores, {self.spill_loads} B loads)")
        if self.registers > MAX_REGISTERS:
            found.append(f"{self.registers} registers > {MAX_REGISTERS}")
        limit = SMEM_LIMIT.get(self.arch)
        if limit is not None and self.smem > limit:
            found.append(f"{self.smem} B shared memory > sm_{self.arch}'s {limit} B")
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
    return sorted(kernels, key=lambda k: (k.source, k.name, k.arch))


def markdown(kernels: list[Kernel], nvcc_version: str, seconds: float) -> str:
    lines = [
        "# CUDA kernels: ptxas resource usage",
        "",
        f"Generated by `python csrc/ptxas_report.py` ({nvcc_version}; flags as setup.py: `-O3 -std=c++17`, one",
        f"`-gencode` per architecture; {seconds:.0f} s on {os.cpu_count()} CPUs). No GPU is needed. Checked by",
        "`tests/cuda/test_ptxas.py`: no spills, <= 255 registers, static shared memory within the per-block limit",
        "(sm_80: 163 KB, sm_90: 227 KB). The 32-byte stack frames are sincosf's local array for the Payne-Hanek",
        "argument reduction of large angles (its slow path), not spills.",
        "",
        "| source | kernel | arch | registers | spill stores (B) | spill loads (B) | stack (B) | smem (B) | ok |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for k in kernels:
        status = "; ".join(k.problems()) or "yes"
        lines.append(
            f"| {k.source} | `{k.name}` | sm_{k.arch} | {k.registers} | {k.spill_stores} | {k.spill_loads} | "
            f"{k.stack} | {k.smem} | {status} |"
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
    text = markdown(kernels, nvcc_version(nvcc), time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    bad = [k for k in kernels if k.problems()]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
