#!/usr/bin/env bash
# The GPU check, for a session that is lent a GPU: what a GPU user runs, at Qwen2-1.5B's shapes with random
# weights (built from the config alone; nothing is downloaded), the paper's settings, float32.
#   1. the memory planner's prediction and the measured peak of one update of each algorithm, selective vs
#      full logits (|G| = 8 / 8 / 50, 300 tokens);
#   2. sampling tokens/s, 50 completions x 300 tokens: tinyrl vs HF generate;
#   3. bench/gpu_check.py: train.py, 3 steps of each algorithm (and T-SPMO with --static-cache), each step's
#      seconds and peak memory beside the planner's; eval.py's engine vs HF generate on 64 problems.
# Run from the repository root: bash bench/gpu_paper.sh (about 5 minutes on an H100; docs/performance.md).
# Exits non-zero if any command fails.
set -euo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m tinyrl.memory --model Qwen/Qwen2-1.5B --algo tspmo
python bench/update_memory.py --shape Qwen/Qwen2-1.5B --max-batch-tokens 8192 --device cuda
python bench/sampling.py --random Qwen/Qwen2-1.5B --device cuda --n 50 --max-new-tokens 300
python bench/gpu_check.py --model random:Qwen/Qwen2-1.5B
