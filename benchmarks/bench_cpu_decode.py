"""CPU decode and prefill, stock vs patched (torch backend): SmolLM2-135M fp32, greedy cached steps after a prompt.

Stock and patched rounds alternate on one model (``stock_and_patched_rounds``: each round the other goes first), and
each step is timed in this process's CPU time (``time.process_time``), so that other processes on a busy machine
slow both sides alike and time spent descheduled is not counted. Prints, per prompt length, the medians over rounds
of the per-round median ms per step (and of the prefill), and patched/stock speed. Checks that both decode the same
tokens.

Run: python benchmarks/bench_cpu_decode.py --prompts 64,512,1000,2000 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lr2kernels.apps.common import load_model_quietly  # noqa: E402
from lr2kernels.apps.model_runs import last_logits, stock_and_patched_rounds  # noqa: E402


@torch.no_grad()
def one_round(model, ids: torch.Tensor, steps: int) -> tuple[float, list[float], list[int]]:
    """(prefill CPU seconds, CPU seconds of each greedy cached step, the tokens)."""
    start = time.process_time()
    logits, cache = last_logits(model, ids, use_cache=True)
    prefill = time.process_time() - start
    tokens, times = [int(logits.argmax(-1))], []
    for _ in range(steps):
        start = time.process_time()
        logits, cache = last_logits(model, torch.tensor([tokens[-1:]]), cache)
        times.append(time.process_time() - start)
        tokens.append(int(logits.argmax(-1)))
    return prefill, times, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="64,512,1000,2000", help="comma-separated prompt lengths")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=24, help="decode steps per round (the first 2 are not counted)")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds of each (after one warm-up round)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_model_quietly("smollm2", torch.device("cpu"), torch.float32)
    print(f"SmolLM2-135M fp32, {args.threads} thread(s), {args.steps} steps x {args.rounds} rounds, CPU time")
    print("prompt | stock ms/step | patched ms/step | speed | stock prefill ms | patched prefill ms | speed")
    for length in (int(x) for x in args.prompts.split(",")):
        ids = torch.randint(100, 10000, (1, length), generator=torch.Generator().manual_seed(length))
        step = {"stock": [], "patched": []}
        prefill = {"stock": [], "patched": []}
        tokens = {}
        for rep, provider in stock_and_patched_rounds(model, args.rounds):
            seconds, times, tokens[provider] = one_round(model, ids, args.steps)
            if rep:
                prefill[provider].append(seconds * 1e3)
                step[provider].append(statistics.median(times[2:]) * 1e3)  # the first steps grow the buffers
        if tokens["stock"] != tokens["patched"]:
            print(f"  {length}: patched tokens differ from stock: {tokens['patched']} vs {tokens['stock']}")
        s, p = (statistics.median(step[k]) for k in ("stock", "patched"))
        sp, pp = (statistics.median(prefill[k]) for k in ("stock", "patched"))
        spread = max(max(v) / min(v) - 1 for v in step.values())
        print(f"{length} | {s:.2f} | {p:.2f} | {s / p:.3f}x | {sp:.1f} | {pp:.1f} | {sp / pp:.3f}x"
              f"   (rounds' spread up to {spread:.0%})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
