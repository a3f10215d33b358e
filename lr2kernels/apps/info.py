"""``lr2kernels info``: versions (torch, triton, transformers, numpy, the CUDA toolchain), device and backends."""

from __future__ import annotations

import json
import platform
import subprocess
from collections.abc import Sequence
from typing import Any


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    except Exception as exc:  # a broken install should be reported, not crash `info`
        return f"broken ({type(exc).__name__}: {exc})"
    return triton.__version__


def _distribution_version(name: str) -> str:
    """An installed distribution's version from its metadata, without importing it (transformers takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _cuda_toolkit(torch_cuda: str | None) -> str:
    """The CUDA toolchain: torch's build (its CUDA version, or CPU-only) and the nvcc that builds the extension."""
    from lr2kernels.ops.cuda.build import find_cuda

    torch_part = f"torch built with CUDA {torch_cuda}" if torch_cuda else "torch built without CUDA"
    found = find_cuda()
    if found is None:
        return f"{torch_part}; nvcc not found ($CUDA_HOME, $CUDA_PATH, /usr/local/cuda or PATH)"
    nvcc = found[0]
    try:
        lines = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{torch_part}; nvcc at {nvcc} does not run ({type(exc).__name__}: {exc})"
    release = next((line.split("release", 1)[1].split(",")[0].strip() for line in lines if "release" in line), "?")
    return f"{torch_part}; nvcc {release} at {nvcc}"


def collect_info() -> dict[str, Any]:
    """Versions, CUDA device, toolchain and available backends, as printed by ``lr2kernels info``."""
    import numpy
    import torch

    from lr2kernels import available_backends
    from lr2kernels._version import __version__
    from lr2kernels.ops.dispatch import _BACKENDS, backend_status

    cuda = torch.cuda.is_available()
    return {
        "lr2kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "transformers": _distribution_version("transformers"),
        "numpy": numpy.__version__,
        "cuda_toolkit": _cuda_toolkit(torch.version.cuda),
        "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "backends": list(available_backends()),
        "unavailable": {name: backend_status(name)[1] for name in _BACKENDS if not backend_status(name)[0]},
    }


def main(argv: Sequence[str] | None = None) -> int:
    from lr2kernels.apps.common import make_parser  # imports torch, as collect_info does

    parser = make_parser("lr2kernels info", __doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    args = parser.parse_args(argv)
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cuda = f"yes ({info['cuda_device']})" if info["cuda_available"] else "no"
    rows = [
        ("lr2kernels", info["lr2kernels"]),
        ("python", info["python"]),
        ("torch", info["torch"]),
        ("triton", info["triton"]),
        ("transformers", info["transformers"]),
        ("numpy", info["numpy"]),
        ("toolchain", info["cuda_toolkit"]),
        ("cuda", cuda),
        ("backends", ", ".join(info["backends"])),
        *((f"  {name}", f"unavailable: {reason}") for name, reason in info["unavailable"].items()),
    ]
    for name, value in rows:
        print(f"{name:<12} {value}")
    return 0
