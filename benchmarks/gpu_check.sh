#!/usr/bin/env bash
# GPU check for one H200 (or any CUDA machine): the test suite on CUDA (bf16 included) and a short kernel
# benchmark against SDPA flash / cuDNN + separate RoPE. Everything lands under $OUT; finishes in < 8 minutes.
# Uses the machine's own torch/triton/transformers (the H200 image has them); installs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

python3 -m lr2kernels info 2>&1 | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$OUT/info.txt"

# Correctness on CUDA: every test that runs on the GPU (the Triton tests pick CUDA tensors when a GPU exists).
timeout 300 python3 -m pytest tests -q -x -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/pytest.txt"
tests_status=${PIPESTATUS[0]}

# Speed: fused vs stock at 4K..32K (fwd, fwd+bwd) and decode / rerotate up to 128K.
timeout 200 python3 benchmarks/bench_kernels.py --device cuda --out "$OUT" \
  --seqlens 4096 8192 16384 32768 131072 2>&1 | tee "$OUT/bench.txt"
bench_status=${PIPESTATUS[0]}

echo "tests exit $tests_status, bench exit $bench_status" | tee -a "$OUT/info.txt"
exit $(( tests_status != 0 || bench_status != 0 ))
