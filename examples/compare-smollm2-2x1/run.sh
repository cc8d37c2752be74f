#!/usr/bin/env bash
# The 3-seed comparison of GRPO, S-GRPO and T-SPMO on SmolLM2-135M-Instruct, 2x1-digit multiplication.
# Every run: the paper's preset for its algorithm, except lr 1e-3, lambda 0 (T-SPMO) and 128 new tokens,
# the same for all three; 60 optimizer steps; validation on the same 237 held-out problems every 20 steps;
# the best adapter tested on the same 237 test problems. A seed fixes the training problems' order, the
# LoRA init and the sampler: the three algorithms of one seed see the same problems.
#
#   examples/compare-smollm2-2x1/run.sh                      # all nine runs, one after another
#   RUNS="sgrpo:0 tspmo:0" OMP_NUM_THREADS=1 examples/compare-smollm2-2x1/run.sh   # a subset (ALGO:SEED)
#
# Re-running resumes a stopped run and skips finished ones. Then:
#   python -m tinyrl.compare runs/compare-2x1/* --out compare.png
set -euo pipefail
model=${MODEL:-.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}
root=${ROOT:-runs/compare-2x1}
for run in ${RUNS:-grpo:0 sgrpo:0 tspmo:0 grpo:1 sgrpo:1 tspmo:1 grpo:2 sgrpo:2 tspmo:2}; do
  algo=${run%:*} seed=${run#*:}
  out=$root/$algo-s$seed
  if [ -f "$out/final_eval.json" ]; then continue; fi
  if [ -f "$out/config.json" ]; then python train.py --resume "$out"; continue; fi
  python train.py --algo "$algo" --task mult --digits 2x1 --model "$model" --max-new-tokens 128 \
    --lr 1e-3 --lam 0 --steps 60 --eval-every 20 --eval-n 237 --save-every 10 --seed "$seed" --out "$out"
done
