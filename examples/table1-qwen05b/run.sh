#!/usr/bin/env bash
# Table I in kind: GRPO, S-GRPO and T-SPMO on SVAMP with Qwen2.5-Coder-0.5B-Instruct at the paper's SVAMP
# presets, unchanged: LoRA r 16 on q/v of the last 1/3 of the layers, temperature 0.3, 300 new tokens, lr 1e-4,
# lambda as the default reading sets it (AdamW decoupled decay 0.01, T-SPMO), beta 0.01 (GRPO, S-GRPO);
#   grpo   |G| 8, 325 steps
#   sgrpo  |G| 8, (alpha, k) = (100, 100), 325 steps
#   tspmo  |G| 50, no replay, 400 steps
# One seed each. Validation on 100 held-out training problems every 25 steps; the best adapter is tested
# on all 300 test problems. --dtype auto picks bfloat16 only where this CPU computes it natively; once one
# run exists, the others take its dtype, so all three share one.
#
#   python -m tinyrl.fetch qwen2.5-coder-0.5b
#   RUNS="tspmo grpo" OMP_NUM_THREADS=1 SVAMP_FILE=SVAMP.json examples/table1-qwen05b/run.sh
#   RUNS=base examples/table1-qwen05b/run.sh      # the base model on the 300 test problems, for the paired tests
#
# Re-running resumes a stopped run and skips finished ones. Then:
#   python -m tinyrl.compare examples/table1-qwen05b/{grpo,sgrpo,tspmo} --base examples/table1-qwen05b/base_test.jsonl --out examples/table1-qwen05b/compare.png
set -euo pipefail
model=${MODEL:-.cache/models/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf}
root=${ROOT:-examples/table1-qwen05b}
svamp=()
if [ -n "${SVAMP_FILE:-}" ]; then svamp=(--svamp-file "$SVAMP_FILE"); fi
dtype_of() { python -c "import json, sys; print(json.load(open(sys.argv[1]))['dtype'])" "$1"; }
dtype=auto
for cfg in "$root"/{grpo,sgrpo,tspmo}/config.json; do
  if [ -f "$cfg" ]; then dtype=$(dtype_of "$cfg"); break; fi
done
for run in ${RUNS:-tspmo grpo sgrpo}; do
  out=$root/$run
  if [ "$run" = base ]; then
    [ -f "$root/base_test.jsonl" ] || python eval.py --task svamp --model "$model" "${svamp[@]}" --dtype "$dtype" \
      --batch-size 64 --out "$root/base_test.jsonl"
    continue
  fi
  if [ -f "$out/final_eval.json" ]; then continue; fi
  if [ -f "$out/config.json" ]; then python train.py --resume "$out" "${svamp[@]}"; continue; fi
  python train.py --algo "$run" --task svamp --model "$model" "${svamp[@]}" --dtype "$dtype" \
    --eval-n 100 --save-every 5 --keep 1 --out "$out"
  dtype=$(dtype_of "$out/config.json")
done
