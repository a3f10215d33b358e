"""How the CUDA extension ``lr2kernels._cuda`` is compiled: found toolkit, nvcc flags, parallel compile commands.

Standard library only, and importing nothing of the package: ``setup.py`` runs this file by path (a build must not
import the package or torch) and :mod:`lr2kernels.ops.cuda.jit` imports it, so ``pip install`` and the build on
first use compile the same way.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_ARCHS = "80;90"
# Static cudart: the extension then needs only the driver at run time, not a matching toolkit.
LINK_LIBRARIES = ["cudart_static", "dl", "rt", "pthread"]
CXX_FLAGS = ["-O3", "-std=c++17"]
# The files of csrc/ a build compiles (and setup.py ships as lr2kernels/_csrc).
SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")


def sources_digest(folder: str | Path) -> str:
    """A digest of the CUDA sources in ``folder`` (names and contents of its .cu/.cuh/.h/.cpp files).

    A build embeds it (:func:`digest_define`: ``lr2kernels._cuda.SOURCES_DIGEST``), so that the launcher can tell an
    extension built from other sources (a stale in-tree build after the sources changed) and refuse to load it.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.suffix in SOURCE_SUFFIXES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def digest_define(folder: str | Path) -> tuple[str, str]:
    """The macro the bindings (csrc/bindings.cpp) read the sources' digest from, as setuptools' define_macros take
    it (a C string literal; no shell sees it)."""
    return "LR2_SOURCES_DIGEST", f'"{sources_digest(folder)}"'


def find_cuda() -> tuple[str, Path] | None:
    """(nvcc, toolkit root) from $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, then nvcc on PATH; None if absent."""
    for home in filter(None, [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]):
        nvcc = Path(home) / "bin" / "nvcc"
        if nvcc.is_file():
            return str(nvcc), Path(home)
    nvcc = shutil.which("nvcc")
    return (nvcc, Path(nvcc).resolve().parent.parent) if nvcc else None


def archs_from_env() -> list[str]:
    """``$LR2_CUDA_ARCHS`` (default ``80;90``) as a list of compute capabilities."""
    return [a.strip() for a in os.environ.get("LR2_CUDA_ARCHS", DEFAULT_ARCHS).split(";") if a.strip()]


def nvcc_flags(archs: Sequence[str], include_dirs: Sequence[str | Path]) -> list[str]:
    """nvcc flags: one -gencode per architecture, PTX for the last one (newer GPUs JIT it), the includes.

    Never --use_fast_math: it turns the kernels' sincosf into __sincosf, inaccurate at large RoPE angles.
    """
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return [*CXX_FLAGS, "-Xcompiler", "-fPIC", *gencode, *(f"-I{d}" for d in include_dirs)]


def cu_commands(nvcc: str, sources: Sequence[str | Path], out_dir: Path, flags: Sequence[str]) -> list[list[str]]:
    """One ``nvcc -c`` per .cu translation unit, objects in ``out_dir``."""
    return [[nvcc, "-c", str(src), "-o", str(out_dir / f"{Path(src).stem}.o"), *flags] for src in sources]


def run_commands(
    commands: Sequence[list[str]], jobs: int | None = None, log: Callable[[str], None] | None = None
) -> list[str]:
    """Run the compile commands in parallel (``jobs``, default ``$LR2_BUILD_JOBS`` or all CPUs); the objects' paths.

    A failing command raises ``RuntimeError`` with the compiler's output.
    """
    jobs = jobs or int(os.environ.get("LR2_BUILD_JOBS", "0")) or os.cpu_count() or 1
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def run(cmd: list[str]) -> str:
        log(" ".join(cmd))
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}{result.stderr}")
        return cmd[cmd.index("-o") + 1]

    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(commands)))) as pool:
        return list(pool.map(run, commands))
