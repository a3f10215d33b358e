"""Decode bandwidth: the fused decode kernels on a PRE-RoPE cache (cuda, triton) and SDPA on a POST-RoPE cache, as
GB/s of cache read against the device's own copy bandwidth.

Run: python benchmarks/bench_decode.py --device cuda   (cache lengths 4K..128K, batch 1, 8, 64)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lr2kernels.apps.bench.decode import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
