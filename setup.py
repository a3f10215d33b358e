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
import runpy
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
# The compile recipe shared with the build on first use (lr2kernels.ops.cuda.jit), run by path: never the package.
BUILD = runpy.run_path(str(ROOT / "lr2kernels" / "ops" / "cuda" / "build.py"))
find_cuda = BUILD["find_cuda"]


def read_version() -> str:
    text = (ROOT / "lr2kernels" / "_version.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    if match is None:
        raise RuntimeError('lr2kernels/_version.py must contain a line __version__ = "X.Y.Z"')
    return match.group(1)


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
            define_macros=[BUILD["digest_define"](ROOT / "csrc")],  # the module's SOURCES_DIGEST (stale check)
            library_dirs=[str(cuda[1] / "lib64")],
            libraries=BUILD["LINK_LIBRARIES"],  # static cudart: only the driver is needed at run time
            extra_compile_args=BUILD["CXX_FLAGS"],
            language="c++",
        )
    ]


class BuildExtWithNvcc(build_ext):
    """Compiles the .cu sources with nvcc; setuptools then compiles the .cpp bindings and links everything."""

    nvcc: str | None = None

    def build_extension(self, ext: Extension) -> None:
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        out_dir = Path(self.build_temp) / "cu"
        out_dir.mkdir(parents=True, exist_ok=True)
        flags = BUILD["nvcc_flags"](BUILD["archs_from_env"](), ext.include_dirs)
        commands = BUILD["cu_commands"](self.nvcc, cu_sources, out_dir, flags)
        ext.extra_objects += BUILD["run_commands"](commands)  # one translation unit per dtype, in parallel
        super().build_extension(ext)


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (``lr2kernels/_csrc``), so that an install made without nvcc can build the
    extension on first use later (``LR2_CUDA_JIT=1``, lr2kernels.ops.cuda.jit)."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "lr2kernels" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted((ROOT / "csrc").glob("*")):
            if path.suffix in (".cu", ".cuh", ".h", ".cpp"):
                shutil.copy2(path, target / path.name)


CUDA = find_cuda()
BuildExtWithNvcc.nvcc = CUDA[0] if CUDA else None

setup(
    version=read_version(),
    ext_modules=cuda_extensions(CUDA),
    cmdclass={"build_ext": BuildExtWithNvcc, "build_py": BuildPyWithSources},
    zip_safe=False,
)
