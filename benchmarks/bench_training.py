"""Training benchmark: packed varlen rows (patched) vs padded per-document batches (stock), same tokens.

Run: python benchmarks/bench_training.py --seq-len 2048 --rows 2   (CPU; a GPU: --config <config.json> --seq-len 32768)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lr2kernels.apps.bench.training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
