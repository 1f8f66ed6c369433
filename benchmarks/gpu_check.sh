#!/usr/bin/env bash
# One-shot GPU check: the GPU tests, then the benchmark tables at LLaMA-7B shapes (bf16); each step has a
# timeout and together they stay under 8 minutes.
# Run from the repository root on a machine with CUDA, torch and triton installed (no network needed):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu-$(date +%Y-%m-%d)}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$out/env.txt"

timeout 150 python -m pytest -q -x tests/test_kernels.py tests/test_quant.py -k "gpu or cuda" 2>&1 | tail -25 | tee "$out/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}

timeout 230 python -m loldu_triton.cli bench --device cuda --dtype bfloat16 \
  --shapes 1x4096x4096,512x4096x4096,8192x4096x4096,1x4096x11008,512x4096x11008,8192x4096x11008 \
  --ranks 16,64,256,1024,full --methods linear,loldu,loldu_torch --out "$out" 2>&1 | tail -40
bench_rc=${PIPESTATUS[0]}

timeout 40 python -m loldu_triton.cli bench --device cuda --dtype bfloat16 --ranks 16 \
  --adapter-counts 1,10,100,1000 --out "$out" 2>&1 | tail -8

# quantized base: memory of a 4096 x 11008 layer, decode (reading half the bytes) and prefill
timeout 50 python -m loldu_triton.cli bench --device cuda --dtype bfloat16 --ranks 16 \
  --shapes 1x4096x11008,8192x4096x11008 --methods linear,loldu,loldu_int8,loldu_fp8 --out "$out/quantized" \
  2>&1 | tail -12
echo "gpu tests exit $tests_rc, bench exit $bench_rc; table in $out/bench.md"
exit $(( tests_rc || bench_rc ))
