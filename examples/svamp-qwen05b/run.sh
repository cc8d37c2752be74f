#!/usr/bin/env bash
# Qwen2.5-Coder-0.5B-Instruct learns SVAMP on a CPU: GRPO, S-GRPO and T-SPMO, one seed each.
# Every run: the paper's SVAMP preset for its algorithm (LoRA r = 16 on q/v of the last 1/3 of the
# layers, |G| = 8 or 50, alpha = 100, k = 100, beta = 0.01, no replay), except, for all three, the dtype,
# lr 1e-3, lambda 0 (T-SPMO) and 40 optimizer steps (docs/qwen.md says why). Validation: the same
# 100 held-out problems every 10 steps; the best adapter is tested on the 300 test problems.
#
#   python -m tinyrl.fetch qwen2.5-coder-0.5b                 # the GGUF, sha256-checked -> .cache/models/
#   examples/svamp-qwen05b/run.sh                             # the three runs, one after another
#   RUNS="grpo tspmo" SVAMP_FILE=SVAMP.json examples/svamp-qwen05b/run.sh   # a subset; a local SVAMP.json
#   DTYPE=bfloat16 examples/svamp-qwen05b/run.sh              # the committed runs' dtype, to reproduce them exactly
#
# The frozen model's dtype defaults to --dtype auto: bfloat16 only where this CPU computes it at least 1.2x
# faster than float32 (on an AVX2-only CPU it is ~8x slower). The committed runs ran in bfloat16.
#
# Re-running resumes a stopped run and skips finished ones. Then:
#   python -m tinyrl.compare runs/svamp-qwen05b/*
set -euo pipefail
model=${MODEL:-.cache/models/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf}
root=${ROOT:-runs/svamp-qwen05b}
dtype=${DTYPE:-auto}
svamp=()
if [ -n "${SVAMP_FILE:-}" ]; then svamp=(--svamp-file "$SVAMP_FILE"); fi
for algo in ${RUNS:-grpo sgrpo tspmo}; do
  out=$root/$algo
  if [ -f "$out/final_eval.json" ]; then continue; fi
  if [ -f "$out/config.json" ]; then python train.py --resume "$out"; continue; fi
  python train.py --algo "$algo" --task svamp --model "$model" "${svamp[@]}" --dtype "$dtype" \
    --lr 1e-3 --lam 0 --steps 40 --eval-every 10 --save-every 5 --out "$out"
done
