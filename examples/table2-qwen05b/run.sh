#!/usr/bin/env bash
# Table II in kind: GRPO, S-GRPO and T-SPMO on multiplication with Qwen2.5-Coder-0.5B-Instruct, at the
# paper's recipe and length. Every run: the shipped preset of its algorithm for --task mult (lr 1e-4,
# beta / lambda as the presets set them, LoRA r = 8 on q/v of the last 1/4 of the layers, temperature
# 0.3, |G| 8 / 8 / 50, S-GRPO (alpha, k) = (50, 100), T-SPMO replay (1, 0)) and the paper's step
# counts (GRPO 450, S-GRPO 450, T-SPMO 350). Validation: the same 200 held-out problems every 50 steps;
# the best adapter is tested on 1,000 held-out problems. One seed each.
# The CPU deviations, the same for all three: DTYPE (float32 unless the CPU computes bfloat16 natively:
# `grep -o -m1 -E 'avx512_bf16|amx_bf16' /proc/cpuinfo`; a run keeps the dtype it started with) and
# MAX_NEW_TOKENS (only if the completions it cuts are under 5%).
#
#   DIGITS=3x2 examples/table2-qwen05b/run.sh                  # the three runs, one after another
#   RUNS="grpo tspmo" DIGITS=3x2 OMP_NUM_THREADS=1 examples/table2-qwen05b/run.sh   # a subset
#
# Re-running resumes a stopped run and skips finished ones. Then:
#   python -m tinyrl.compare runs/table2-qwen05b-$DIGITS/* --out compare.png
set -euo pipefail
: "${DIGITS:?set DIGITS to the digits chosen by the base accuracy (3x2 or 2x2)}"
model=${MODEL:-.cache/models/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf}
root=${ROOT:-runs/table2-qwen05b-$DIGITS}
for algo in ${RUNS:-grpo sgrpo tspmo}; do
  out=$root/$algo
  if [ -f "$out/final_eval.json" ]; then continue; fi
  if [ -f "$out/config.json" ]; then python train.py --resume "$out" ${KEEP:+--keep $KEEP}; continue; fi
  python train.py --algo "$algo" --task mult --digits "$DIGITS" --model "$model" --dtype "${DTYPE:-float32}" \
    --max-new-tokens "${MAX_NEW_TOKENS:-300}" --eval-every 50 --eval-n 200 --test-n 1000 --save-every 10 \
    ${KEEP:+--keep $KEEP} --out "$out"
done
