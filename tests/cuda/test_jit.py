"""The CUDA extension built on first use (lr2kernels.ops.cuda.jit): compiled into a cache folder under a lock (two
processes starting together build once), loaded from there later without compiling, and setup.py ships the sources
that this needs inside the package. Compiles for sm_80 only, to keep the test short (about a minute on 2 cores)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.cuda.helpers import ROOT

pytestmark = pytest.mark.skipif(
    shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"), reason="nvcc is not installed"
)

# The extension's CUDA runtime must see the devices torch sees (none on a CPU-only machine, every one on a GPU's).
BUILD = textwrap.dedent("""
    import torch
    from lr2kernels.ops.cuda import jit
    path = jit.build(archs=["80"])
    module = jit.load_built(path)
    print("PATH", path)
    print("HEAD_DIMS", tuple(module.DECODE_HEAD_DIMS), "DEVICES", module.device_count()[0], torch.cuda.device_count())
""")

# The installed extension hidden: load_extension must then find the cached build, compiling nothing.
FROM_CACHE = textwrap.dedent("""
    import sys
    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name == "lr2kernels._cuda":
                raise ImportError("hidden by the test")
    sys.meta_path.insert(0, Hide())
    from lr2kernels.ops.cuda import launch
    module, reason = launch.load_extension()
    print("LOADED", getattr(module, "__file__", None), reason)
""")


def _python(code: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_two_processes_build_once_and_later_ones_load_the_cache(tmp_path):
    pytest.importorskip("pybind11")
    env = {**os.environ, "LR2KERNELS_CACHE_DIR": str(tmp_path), "LR2_CUDA_ARCHS": "80", "LR2_BUILD_JOBS": "2"}
    env.pop("LR2_CUDA_JIT", None)
    first, second = _python(BUILD, env), _python(BUILD, env)
    results = [process.communicate(timeout=900) for process in (first, second)]
    for process, (_, err) in zip((first, second), results):
        assert process.returncode == 0, err[-4000:]
    paths = {line.split(" ", 1)[1] for out, _ in results for line in out.splitlines() if line.startswith("PATH")}
    assert len(paths) == 1  # the same build for both
    built = [err for _, err in results if "building the CUDA extension" in err]
    assert len(built) == 1  # one compiled, the other waited on the lock and loaded it
    for out, _ in results:
        (line,) = [line for line in out.splitlines() if line.startswith("HEAD_DIMS")]
        assert line.startswith("HEAD_DIMS (64, 96, 128, 256) DEVICES "), line
        extension_sees, torch_sees = line.split()[-2:]
        assert extension_sees == torch_sees, line
    (path,) = paths
    folder = os.path.dirname(path)
    assert sorted(os.listdir(folder)) == [os.path.basename(path)]  # no objects or half builds left
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".building")]

    out, err = _python(FROM_CACHE, env).communicate(timeout=300)
    assert f"LOADED {path} " in out, out + err
    assert "building" not in err


def test_setup_ships_the_cuda_sources_inside_the_package(tmp_path):
    """A wheel built without nvcc still carries csrc/ (as lr2kernels/_csrc) for a build on first use."""
    env = {**os.environ, "LR2_BUILD_CUDA": "0"}
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)], cwd=ROOT, env=env,
                   check=True, capture_output=True)  # fmt: skip
    shipped = {p.name for p in (tmp_path / "lr2kernels" / "_csrc").iterdir()}
    expected = {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp")}
    assert expected and shipped == expected
