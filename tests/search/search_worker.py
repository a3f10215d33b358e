"""Runs the synthetic search in its own process(es): ``python search_worker.py OUT LOG [DELAY]`` or the same under
``torchrun --nproc_per_node N`` (gloo). Each process writes ``OUT.rank<r>.json``: its result and its own call count."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synthetic  # noqa: E402

from lr2kernels.search import evolutionary_search  # noqa: E402

CONFIG = dict(population=12, parents=6, mutations=5, crossovers=5, iterations=8, seed=5)


def main() -> None:
    out, log = sys.argv[1], sys.argv[2]
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    from lr2kernels.search import SearchConfig

    objective = synthetic.Distance(delay)
    result = evolutionary_search(objective, synthetic.space(), SearchConfig(**CONFIG), log_path=log or None)
    rank = int(os.environ.get("RANK", "0"))
    record = {"best": result.best.to_dict(), "score": result.score, "calls": objective.calls,
              "log": [[c.key, s] for c, s in result.log], "reused": result.reused}  # fmt: skip
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
