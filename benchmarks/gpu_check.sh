#!/usr/bin/env bash
# One-shot GPU check for a cold machine (one H200, torch 2.11, triton 3.6, no network), in under 7 minutes
# including every compile and autotune:
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (from anywhere; default OUT_DIR benchmarks/results/gpu-DATE)
#
# Steps, each under a timeout cut to the time left before the deadline (GPU_CHECK_SECONDS, default 400 s):
#   1. compile (<= 90 s): `loldu-triton compile-check --scope gpu-check` compiles, in one process per core,
#      every kernel variant the later steps launch: 438 for sm_90 under triton 3.6, 618 s of compile time on
#      a loaded 2-core machine (1.4 s each), so about 40 s on 16 processes. The JIT of the later steps then
#      loads them from Triton's cache instead of compiling them one after another (about 10 minutes).
#   2. correctness (<= 100 s): the GPU kernel tests against float64, element by element.
#   3. headline (<= 60 s): bf16 4096x4096, M=8192 and M=1, r=16/64/full, against F.linear and PEFT LoRA.
#   4. the rest, while time is left: other shapes and ranks, quantized bases, many adapters in a batch,
#      torch.compile.
# Every bench row is written to OUT_DIR/*/bench.md and bench.csv as soon as it is measured, so a step cut off
# by its timeout keeps what it measured. The budget arithmetic is in the README ("GPU check").
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu-$(date +%Y-%m-%d)}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
deadline=$((start + ${GPU_CHECK_SECONDS:-400}))
failed=0

# step NAME BUDGET command...: run command under timeout min(BUDGET, time left), output to the screen and
# OUT_DIR/NAME.log; a failing step is counted, the next one still runs
step() {
  local name=$1 budget=$2
  shift 2
  local left=$((deadline - $(date +%s)))
  local limit=$((budget < left ? budget : left))
  if ((limit < 15)); then
    echo "== $name: skipped, ${left} s left" | tee -a "$out/summary.txt"
    return 0
  fi
  echo "== $name (at most ${limit} s)"
  local t0
  t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $(($(date +%s) - t0)) s" | tee -a "$out/summary.txt"
  ((rc == 0)) || failed=$((failed + 1))
}

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python -c "import peft; print('peft', peft.__version__)" 2>/dev/null || echo "peft: not installed (its rows are skipped)"
} | tee "$out/env.txt"
: > "$out/summary.txt"
arch=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(10 * m + n)")

if [[ $arch == 90 || $arch == 80 ]]; then
  step compile 90 python -m loldu_triton.tools.cli compile-check --arch "$arch" --scope gpu-check \
    --jobs "$(nproc)" --json "$out/compile_check.json"
else
  echo "== compile: no compile-check target for sm_$arch; the steps below compile as they go" | tee -a "$out/summary.txt"
fi

if python -c "import pytest" 2>/dev/null; then
  step correctness 100 python -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_quant.py \
    -k "gpu and not torch_compile"
else
  echo "== correctness: skipped, pytest is not installed" | tee -a "$out/summary.txt"
  failed=$((failed + 1))
fi

bench=(python -m loldu_triton.tools.cli bench --device cuda --dtype bfloat16)
step headline 60 "${bench[@]}" --shapes 8192x4096x4096,1x4096x4096 --ranks 16,64,full \
  --methods linear,loldu,loldu_torch,peft_lora --out "$out/headline"

step rest 150 "${bench[@]}" --shapes 512x4096x4096,8192x4096x11008,1x4096x11008 --ranks 16,64,256,1024,full \
  --methods linear,loldu,loldu_torch,peft_lora --out "$out/rest"
# quantized base: memory of a 4096 x 11008 layer, decode (reading half the bytes) and prefill
step quantized 40 "${bench[@]}" --ranks 16 --shapes 1x4096x11008,8192x4096x11008 \
  --methods linear,loldu,loldu_int8,loldu_fp8 --out "$out/quantized"
step adapters 25 "${bench[@]}" --ranks 16 --adapter-counts 1,10,100,1000 --out "$out/adapters"
if python -c "import pytest" 2>/dev/null; then
  step compile_graph 60 python -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "gpu and torch_compile"
fi

echo "GPU check done in $(($(date +%s) - start)) s, $failed step(s) failed; tables under $out" | tee -a "$out/summary.txt"
exit $((failed > 0))
