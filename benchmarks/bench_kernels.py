"""Kernel benchmark (fused vs SDPA + separate RoPE): the same as ``lr2kernels bench --suite kernels``.

Run: python benchmarks/bench_kernels.py --device cuda --out $OUT   (or --device cpu --quick)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lr2kernels.apps.bench.kernels import main  # noqa: E402

if __name__ == "__main__":
    main()
