#!/usr/bin/env bash
# The GPU check of the performance issue, for a session that is lent a GPU (one H200 here):
# a random-weight Qwen2-1.5B (config only; nothing is downloaded), the paper's settings.
#   1. peak GPU memory of one update of each algorithm, selective vs full logits (|G| = 8 / 8 / 50, 300 tokens);
#   2. sampling tokens/s, 50 completions x 300 tokens: tinyrl vs HF generate.
# Target: T-SPMO |G|=50 <= 16 GB peak. Run from the repository root: bash bench/gpu_paper.sh
set -euo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m tinyrl.memory --model Qwen/Qwen2-1.5B --algo tspmo
python bench/update_memory.py --shape Qwen/Qwen2-1.5B --max-batch-tokens 8192 --device cuda
python bench/sampling.py --random Qwen/Qwen2-1.5B --device cuda --n 50 --max-new-tokens 300
