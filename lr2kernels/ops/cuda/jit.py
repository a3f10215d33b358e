"""The CUDA extension built on first use, for an install made without nvcc (a wheel, ``LR2_BUILD_CUDA=0``) on a
machine that has nvcc now.

``LR2_CUDA_JIT=1`` lets :func:`lr2kernels.ops.cuda.launch.load_extension` build ``lr2kernels._cuda`` when it is not
installed; :func:`build` does it explicitly. The build goes to a cache folder (``$LR2KERNELS_CACHE_DIR``, default
``~/.cache/lr2kernels``), one subfolder per (sources, architectures, nvcc, Python ABI), under a file lock, so that
several processes starting together (``torchrun``) build once and the others wait and load it; a finished build is
moved into place whole, so a killed build never leaves a half-written module behind. Later imports find the cached
build without ``LR2_CUDA_JIT`` (nothing is compiled then). The compile recipe is setup.py's
(:mod:`lr2kernels.ops.cuda.build`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

from lr2kernels.ops.cuda import build as recipe

__all__ = ["build", "cached_build", "load_built", "sources_dir"]

MODULE = "lr2kernels._cuda"


def sources_dir() -> Path | None:
    """The CUDA sources: ``csrc/`` of a source checkout, or the copy a wheel ships (``lr2kernels/_csrc``)."""
    package = Path(__file__).resolve().parents[2]  # .../lr2kernels
    for folder in (package.parent / "csrc", package / "_csrc"):
        if any(folder.glob("*.cu")):
            return folder
    return None


def cache_root() -> Path:
    return Path(os.environ.get("LR2KERNELS_CACHE_DIR") or Path.home() / ".cache" / "lr2kernels")


def _nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]


def _build_key(sources: Path, archs: Sequence[str], nvcc: str) -> str:
    digest = hashlib.sha256(recipe.sources_digest(sources).encode())
    digest.update(";".join(archs).encode() + _nvcc_version(nvcc).encode())
    digest.update(str(sysconfig.get_config_var("EXT_SUFFIX")).encode())
    return digest.hexdigest()[:16]


def _library_name() -> str:
    return "_cuda" + str(sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def cached_build(archs: Sequence[str] | None = None) -> Path | None:
    """The path of a finished build of the current sources, or None (nothing is compiled here)."""
    sources, cuda = sources_dir(), recipe.find_cuda()
    if sources is None or cuda is None:
        return None
    folder = cache_root() / f"cuda-{_build_key(sources, archs or recipe.archs_from_env(), cuda[0])}"
    library = folder / _library_name()
    return library if library.is_file() else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _say(message: str) -> None:
    print(f"lr2kernels: {message}", file=sys.stderr, flush=True)


def build(archs: Sequence[str] | None = None, jobs: int | None = None) -> Path:
    """Build the extension into the cache (or find it there) and return the module's path.

    Args:
        archs: compute capabilities to compile for (default ``$LR2_CUDA_ARCHS``, else ``80;90``).
        jobs: translation units compiled in parallel (default ``$LR2_BUILD_JOBS``, else all CPUs).

    Raises:
        RuntimeError: no sources, no nvcc or no pybind11 (saying which), or a compiler error (with its output).
    """
    sources, cuda = sources_dir(), recipe.find_cuda()
    if sources is None:
        raise RuntimeError("the CUDA sources are not in this install (csrc/ or lr2kernels/_csrc): reinstall lr2kernels")
    if cuda is None:
        raise RuntimeError("nvcc was not found ($CUDA_HOME, $CUDA_PATH, /usr/local/cuda or PATH)")
    if importlib.util.find_spec("pybind11") is None:
        raise RuntimeError("pybind11 is not installed (pip install pybind11)")
    import pybind11

    archs = list(archs or recipe.archs_from_env())
    folder = cache_root() / f"cuda-{_build_key(sources, archs, cuda[0])}"
    library = folder / _library_name()
    with _locked(folder.with_suffix(".lock")):
        if library.is_file():  # built meanwhile by another process
            return library
        start = time.perf_counter()
        _say(f"building the CUDA extension for sm_{', sm_'.join(archs)} into {folder} (once; about a minute)")
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".building-") as scratch:
            work = Path(scratch)
            includes = [sources, pybind11.get_include(), sysconfig.get_paths()["include"]]
            flags = recipe.nvcc_flags(archs, includes)
            commands = recipe.cu_commands(cuda[0], sorted(sources.glob("*.cu")), work, flags)
            cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
            define = "-D{}={}".format(*recipe.digest_define(sources))  # the module's SOURCES_DIGEST
            commands += [[cxx, "-c", str(cpp), "-o", str(work / f"{cpp.stem}.o"), *recipe.CXX_FLAGS, "-fPIC", define,
                          *(f"-I{d}" for d in includes)] for cpp in sorted(sources.glob("*.cpp"))]  # fmt: skip
            objects = recipe.run_commands(commands, jobs, log=lambda line: _say(f"  {line.split()[2]}"))
            linked = work / library.name
            link = [cxx, "-shared", *objects, "-o", str(linked), f"-L{cuda[1] / 'lib64'}",
                    *(f"-l{name}" for name in recipe.LINK_LIBRARIES)]  # fmt: skip
            recipe.run_commands([link], 1, log=lambda line: _say("  linking"))
            staged = work / "done"
            staged.mkdir()
            shutil.move(str(linked), staged / library.name)
            if folder.exists():  # an earlier build that died before finishing: nothing of it is used
                shutil.rmtree(folder)
            os.replace(staged, folder)  # the whole folder appears at once
        _say(f"built the CUDA extension in {time.perf_counter() - start:.0f} s")
    return library


def load_built(path: Path) -> types.ModuleType:
    """Import a built extension file as ``lr2kernels._cuda``."""
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[MODULE] = module
    return module
