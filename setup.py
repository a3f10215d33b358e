"""Build script: the pure-Python package always; the CUDA extension from csrc/ only where asked and possible.

Metadata lives in pyproject.toml. This file adds only the version (parsed from lr2kernels/_version.py as text,
so building never imports the package or torch) and the optional extension ``lr2kernels._cuda``:

- ``LR2_BUILD_CUDA=auto`` (default): build it when csrc/ has *.cu sources, nvcc is found and pybind11 is in the
  build environment; otherwise install without it (saying why, unless there are simply no sources).
- ``LR2_BUILD_CUDA=0``: never build it.
- ``LR2_BUILD_CUDA=1``: build it or stop with an error that says what is missing.
- ``LR2_CUDA_ARCHS`` (default ``80;90``): GPU architectures to compile for; PTX is added for the last one.
- ``LR2_BUILD_JOBS`` (default: all CPUs): .cu translation units compiled in parallel.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def read_version() -> str:
    text = (ROOT / "lr2kernels" / "_version.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    if match is None:
        raise RuntimeError('lr2kernels/_version.py must contain a line __version__ = "X.Y.Z"')
    return match.group(1)


def find_cuda() -> tuple[str, Path] | None:
    """(nvcc, toolkit root) from $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, then nvcc on PATH; None if absent."""
    for home in filter(None, [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]):
        nvcc = Path(home) / "bin" / "nvcc"
        if nvcc.is_file():
            return str(nvcc), Path(home)
    nvcc = shutil.which("nvcc")
    return (nvcc, Path(nvcc).resolve().parent.parent) if nvcc else None


def csrc_files(pattern: str) -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").glob(pattern))


def cuda_extensions(cuda: tuple[str, Path] | None) -> list[Extension]:
    mode = os.environ.get("LR2_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"LR2_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return []
    sources = csrc_files("*.cu")
    if not sources:
        missing = "csrc/ has no *.cu sources"
    elif cuda is None:
        missing = "nvcc was not found ($CUDA_HOME, /usr/local/cuda or PATH)"
    elif importlib.util.find_spec("pybind11") is None:
        missing = "pybind11 is not installed in the build environment (add it to [build-system] requires)"
    else:
        missing = None
    if missing is not None:
        if mode == "1":
            raise RuntimeError(f"LR2_BUILD_CUDA=1 but {missing}")
        if sources:
            print(f"lr2kernels: not building the CUDA extension: {missing}", file=sys.stderr)
        return []

    import pybind11

    return [
        Extension(
            "lr2kernels._cuda",
            sources=sources + csrc_files("*.cpp"),
            include_dirs=["csrc", pybind11.get_include()],
            library_dirs=[str(cuda[1] / "lib64")],
            # Static cudart: the extension then needs only the driver at run time, not a matching toolkit.
            libraries=["cudart_static", "dl", "rt", "pthread"],
            extra_compile_args=["-O3", "-std=c++17"],
            language="c++",
        )
    ]


class BuildExtWithNvcc(build_ext):
    """Compiles the .cu sources with nvcc; setuptools then compiles the .cpp bindings and links everything."""

    nvcc: str | None = None

    def build_extension(self, ext: Extension) -> None:
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        archs = [a.strip() for a in os.environ.get("LR2_CUDA_ARCHS", "80;90").split(";") if a.strip()]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        includes = [f"-I{d}" for d in ext.include_dirs]
        out_dir = Path(self.build_temp) / "cu"
        out_dir.mkdir(parents=True, exist_ok=True)
        # Never --use_fast_math: it turns the kernels' sincosf into __sincosf, inaccurate at large RoPE angles.
        flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", *gencode, *includes]
        commands = [[self.nvcc, "-c", src, "-o", str(out_dir / f"{Path(src).stem}.o"), *flags] for src in cu_sources]
        # One translation unit per element type: compile them in parallel ($LR2_BUILD_JOBS, default: all CPUs).
        jobs = int(os.environ.get("LR2_BUILD_JOBS", "0")) or os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(commands)))) as pool:
            for cmd in pool.map(_run, commands):
                ext.extra_objects.append(cmd[cmd.index("-o") + 1])
        super().build_extension(ext)


def _run(cmd: list[str]) -> list[str]:
    print(" ".join(cmd), file=sys.stderr)
    subprocess.check_call(cmd)
    return cmd


CUDA = find_cuda()
BuildExtWithNvcc.nvcc = CUDA[0] if CUDA else None

setup(
    version=read_version(),
    ext_modules=cuda_extensions(CUDA),
    cmdclass={"build_ext": BuildExtWithNvcc},
    zip_safe=False,
)
