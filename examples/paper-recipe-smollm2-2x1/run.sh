#!/usr/bin/env bash
# The paper's T-SPMO multiplication recipe, unchanged, on SmolLM2-135M-Instruct at 2x1 digits: lr 1e-4,
# lambda 0.01, |G| 50, replay (1, 0), rank 8 on the last 1/4 of the layers, temperature 0.3. The one CPU
# deviation: 128 new tokens (the paper: 300). Three runs on the same seed and problems, differing only in
# how lambda acts (docs/design.md, "lambda: two readings"):
#   loss       lambda·Σ||W||² in the loss (Eq. 10 as written)
#   decoupled  AdamW's decoupled weight decay lambda
#   lam0       lambda = 0, the control
# Validation on the 237 held-out problems every 25 steps; the best adapter tested on the 237 test problems.
# The CPU kernels are pinned to torch's: measured per process, two runs side by side could pick different
# ones, and their sums would then differ from step 1, before lambda has done anything.
#
#   examples/paper-recipe-smollm2-2x1/run.sh                         # the three runs, 150 steps each
#   RUNS="loss decoupled" OMP_NUM_THREADS=1 examples/paper-recipe-smollm2-2x1/run.sh     # a subset
#   RUNS=decoupled STEPS=350 examples/paper-recipe-smollm2-2x1/run.sh  # continue one to the paper's 350 steps
#
# Re-running resumes a stopped run and skips finished ones (a finished run is continued when STEPS is
# larger than the steps it ran). The committed runs ran in place (ROOT=examples/paper-recipe-smollm2-2x1
# KEEP=1): an unfinished one keeps its latest checkpoint here, so it resumes from what is committed. Then:
#   python -m tinyrl.compare runs/paper-recipe-2x1/* --base runs/paper-recipe-2x1/base_test.jsonl
# where base_test.jsonl is the base model on the same test problems, written once by (committed here):
#   python eval.py --task mult --digits 2x1 --model "$model" --max-new-tokens 128 --batch-size 64 \
#     --cpu-kernels torch --out runs/paper-recipe-2x1/base_test.jsonl
set -euo pipefail
model=${MODEL:-.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}
root=${ROOT:-runs/paper-recipe-2x1}
steps=${STEPS:-150}
for run in ${RUNS:-loss decoupled lam0}; do
  out=$root/$run
  if [ -f "$out/final_eval.json" ] && [ "$(python -c "import json; print(json.load(open('$out/final_eval.json'))['steps'])")" -ge "$steps" ]; then
    continue
  fi
  if [ -f "$out/config.json" ]; then python train.py --resume "$out" --steps "$steps" ${KEEP:+--keep $KEEP}; continue; fi
  case $run in
    loss) mode=(--lam-mode loss) ;;
    decoupled) mode=(--lam-mode decoupled) ;;
    lam0) mode=(--lam 0) ;;
    *) echo "unknown run $run (loss | decoupled | lam0)" >&2; exit 2 ;;
  esac
  python train.py --algo tspmo --task mult --digits 2x1 --model "$model" --max-new-tokens 128 "${mode[@]}" \
    --cpu-kernels torch --steps "$steps" --eval-every 25 --eval-n 237 --save-every 5 ${KEEP:+--keep $KEEP} --seed 0 --out "$out"
done
