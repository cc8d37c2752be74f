#!/usr/bin/env bash
# Two settings researchers bring from PEFT and TRL, each against the committed runs of
# examples/compare-smollm2-2x1/ (the same command, seeds 0-2, paired seed by seed):
#   sgrpo-all-linear-sN   S-GRPO with LoRA rank 8 on every projection (--lora-targets all-linear) vs sgrpo-sN (q,v)
#   tspmo-score-temp-sN   T-SPMO scoring under softmax(logits / 0.3) (--score-temperature)   vs tspmo-sN
#   OMP_NUM_THREADS=1 RUNS="sgrpo-all-linear-s0" examples/targets-temperature-smollm2-2x1/run.sh
# Re-running resumes a stopped run and skips finished ones. Then, for example:
#   python -m tinyrl.compare examples/compare-smollm2-2x1/sgrpo-s* examples/targets-temperature-smollm2-2x1/sgrpo-*
set -euo pipefail
model=${MODEL:-.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}
root=${ROOT:-examples/targets-temperature-smollm2-2x1}
for run in ${RUNS:-sgrpo-all-linear-s0 tspmo-score-temp-s0 sgrpo-all-linear-s1 tspmo-score-temp-s1 sgrpo-all-linear-s2 tspmo-score-temp-s2}; do
  out=$root/$run
  if [ -f "$out/final_eval.json" ]; then continue; fi
  if [ -f "$out/config.json" ]; then python train.py --resume "$out"; continue; fi
  seed=${run##*-s}
  case $run in
    sgrpo-all-linear-*) flags=(--algo sgrpo --lora-targets all-linear) ;;
    tspmo-score-temp-*) flags=(--algo tspmo --score-temperature) ;;
  esac
  python train.py "${flags[@]}" --task mult --digits 2x1 --model "$model" --max-new-tokens 128 \
    --lr 1e-3 --lam 0 --steps 60 --eval-every 20 --eval-n 237 --save-every 5 --keep 1 --seed "$seed" --out "$out"
done
