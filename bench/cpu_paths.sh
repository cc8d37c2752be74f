#!/usr/bin/env bash
# The CPU-speed checks of "fast on every CPU", on this machine's native dispatch and then as an AVX2-only
# CPU (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 make torch and oneDNN dispatch as on an AMD Zen 3):
#   1. bfloat16 against float32: the kernels `--dtype auto` measures, and a whole greedy eval in each;
#   2. the first 50 x 64-token `sample` call of a fresh process against HF generate's, kernel cache empty/filled;
#   3. evaluation (continuous batching) against HF generate in static batches, float32.
# SmolLM2-135M-Instruct (python -m tinyrl.fetch smollm2-135m), or MODEL=FILE.gguf. Nothing else on the cores:
#   bash bench/cpu_paths.sh [SVAMP.json] 2>&1 | tee cpu_paths.log
set -euo pipefail
export PYTHONUNBUFFERED=1
svamp=${1:+--svamp-file $1}
model=${MODEL:+--model $MODEL}
run() {
  python bench/dtype_speed.py $model --eval-n 32 --max-new-tokens 64
  python bench/sampling.py $model --fresh --n 50 --max-new-tokens 64
  python bench/eval_speed.py $model $svamp --n 64 --batch-size 16 --max-new-tokens 200
}
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2); native bfloat16: $(grep -o -m1 -E 'avx512_bf16|amx_bf16' /proc/cpuinfo || echo none)"
echo "== native dispatch"; run
echo "== as an AVX2-only CPU"; ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 run
