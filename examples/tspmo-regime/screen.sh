#!/usr/bin/env bash
# The screening of the T-SPMO regime study: every (model, digits) candidate, cheapest model first, then the table.
#   OMP_NUM_THREADS=1 examples/tspmo-regime/screen.sh          # MODELS / DIGITS narrow it down
#   PROMPT=partial-products examples/tspmo-regime/screen.sh    # the second screening: the prompt asks for them
#   MAX_BATCH_TOKENS=4096 MODELS=Qwen2.5-Coder-1.5B-Instruct-Q4_K_M ...   # the 1.5B's update in halves: fits 24 GiB
set -euo pipefail
out=${OUT:-examples/tspmo-regime/screen}
prompt=${PROMPT:-paper}
for model in ${MODELS:-SmolLM2-135M-Instruct.Q4_1 Qwen2.5-Coder-0.5B-Instruct-Q4_K_M Qwen2.5-Coder-1.5B-Instruct-Q4_K_M}; do
  for digits in ${DIGITS:-2x2 3x2 3x3}; do
    if [ -f "$out/screen.jsonl" ] && grep -q "\"model\": \"$model.gguf\", \"digits\": \"$digits\", \"prompt\": \"$prompt\"" "$out/screen.jsonl"; then
      continue  # screened already
    fi
    python examples/tspmo-regime/screen.py --model ".cache/models/$model.gguf" --digits "$digits" \
      --mult-prompt "$prompt" --max-batch-tokens "${MAX_BATCH_TOKENS:-8192}" --out "$out"
  done
done
python examples/tspmo-regime/screen.py --table "$out"
