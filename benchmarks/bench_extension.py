"""Context-extension benchmark (needle PPL and passkey accuracy for the model's RoPE, PI, NTK, YaRN, searched).

Run: python benchmarks/bench_extension.py --lengths 8192 12288 16384 \
        --table searched=benchmarks/results/search_smollm2_16k/table.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lr2kernels.apps.bench.extension import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
