"""Quality of a mixed context window finetune: needle / passkey at the table's length and held-out short-text
perplexity, before and after (the LongRoPE2 paper's claim: >= 97% of short-context performance retained).

Run: python benchmarks/bench_quality.py --table benchmarks/results/search_smollm2_16k/table.json --steps 12
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lr2kernels.apps.bench.quality import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
