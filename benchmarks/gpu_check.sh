#!/usr/bin/env bash
# The GPU check, one command of at most 10 minutes: see benchmarks/gpu_check.py for the plan (or run it with
# --dry-run). Results under $OUT (default benchmarks/results/gpu); PARTS="kernels decode" (or --steps) runs a
# selection. Uses the machine's own python3, torch, triton and transformers; installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 benchmarks/gpu_check.py "$@"
