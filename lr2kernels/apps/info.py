"""``lr2kernels info``: versions, CUDA device and available backends."""

from __future__ import annotations

import argparse
import json
import platform
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


def collect_info() -> dict[str, Any]:
    """Versions, CUDA device and available backends, as printed by ``lr2kernels info``."""
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
        "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "backends": list(available_backends()),
        "unavailable": {name: backend_status(name)[1] for name in _BACKENDS if not backend_status(name)[0]},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lr2kernels info", description=__doc__.splitlines()[0].strip("`"))
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
        ("cuda", cuda),
        ("backends", ", ".join(info["backends"])),
        *((f"  {name}", f"unavailable: {reason}") for name, reason in info["unavailable"].items()),
    ]
    for name, value in rows:
        print(f"{name:<11} {value}")
    return 0
