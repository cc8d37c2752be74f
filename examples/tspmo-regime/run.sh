#!/usr/bin/env bash
# The T-SPMO regime study (docs/tspmo-regime.md): four arms x three seeds, alike in everything but the arm.
#   GRPO |G| 8; S-GRPO |G| 8, (alpha, k) = (50, 100); T-SPMO (|G|, C_success, C_failure) = (50, 1, 0); T-SPMO (50, 0, 0).
# Every run: lr 1e-3 with lambda as the default reading sets it (AdamW decoupled decay 0.01 for T-SPMO; the
# presets' beta 0.01 for GRPO/S-GRPO), the mult presets' LoRA (r 8, q/v, last 1/4), temperature 0.3, 300 new
# tokens, --dtype auto (bfloat16 only where the CPU computes it natively; a run keeps its dtype), validation on
# 200 held-out problems every 25 steps, the best adapter tested on 1,000; T-SPMO records its trees.
#   MODEL=... DIGITS=... PROMPT=... STEPS=... RUNS="tspmo-s0 grpo-s0" OMP_NUM_THREADS=1 examples/tspmo-regime/run.sh
#   MAX_BATCH_TOKENS=4096: the update in smaller passes (the 1.5B's float32 T-SPMO then fits 24 GiB).
# Re-running resumes a stopped run and skips finished ones.
set -euo pipefail
: "${MODEL:?set MODEL (the choice of the screening)}" "${DIGITS:?set DIGITS}" "${STEPS:?set STEPS (the same for every arm)}"
root=${ROOT:-examples/tspmo-regime/$(basename "$MODEL" .gguf)-$DIGITS}
for run in ${RUNS:-grpo-s0 sgrpo-s0 tspmo-s0 tspmo-norep-s0 grpo-s1 sgrpo-s1 tspmo-s1 tspmo-norep-s1 grpo-s2 sgrpo-s2 tspmo-s2 tspmo-norep-s2}; do
  out=$root/$run
  if [ -f "$out/final_eval.json" ]; then continue; fi
  if [ -f "$out/config.json" ]; then python train.py --resume "$out"; continue; fi
  arm=${run%-s*}; seed=${run##*-s}
  case $arm in
    grpo|sgrpo|tspmo) algo=$arm; extra=() ;;
    tspmo-norep) algo=tspmo; extra=(--replay-success 0 --replay-failure 0) ;;
    *) echo "unknown arm $arm"; exit 2 ;;
  esac
  python train.py --algo "$algo" --task mult --digits "$DIGITS" --mult-prompt "${PROMPT:-paper}" --model "$MODEL" \
    --lr 1e-3 --steps "$STEPS" --seed "$seed" --dtype auto --eval-every 25 --eval-n 200 --test-n 1000 \
    --save-every 5 --keep 1 --max-batch-tokens "${MAX_BATCH_TOKENS:-8192}" --out "$out" "${extra[@]}"
done
