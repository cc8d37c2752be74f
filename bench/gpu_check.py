"""What a GPU user runs, on a random-weight model at the paper's shapes: train.py for a few steps of each
algorithm, and eval.py's engine against HF generate. Prints every figure with its name; exits 1 on any failure.

    python bench/gpu_check.py                                  # Qwen2-1.5B's shapes, the paper's settings, CUDA
    python bench/gpu_check.py --model random:FOLDER --groups 3,3,4 --max-new-tokens 8 --eval-n 4   # (the CPU test)

Each run is `python train.py --model random:... --algo A --group-size G --max-new-tokens L --steps S --dtype
float32`, with the paper's presets otherwise (LoRA r = 8 on q/v of the last 1/4 of the layers, replay (1, 0)),
and the reward bench/parity.py (a random model's noise scores half right, so each update has a gradient and
T-SPMO's trees have credit, as in training). For each step it prints the seconds and the peak memory
(train.py's peak_mem_mb: CUDA's max_memory_allocated, or the process's peak RSS on a CPU) beside the
planner's prediction (tinyrl.memory.predict, the figure `python -m tinyrl.memory` prints). With CUDA it also
runs T-SPMO with --static-cache (the torch.compile + CUDA graphs sampler). Then bench/eval_speed.py on
--eval-n multiplication problems: eval.py's continuous batching against HF generate in static batches.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        print(f"FAILED: {' '.join(cmd)}", flush=True)
        sys.exit(1)


def main() -> int:
    import torch

    from tinyrl.config import preset
    from tinyrl.memory import GiB, load_shape, predict

    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", default="random:Qwen/Qwen2-1.5B")
    p.add_argument("--groups", default="8,8,50", help="|G| of GRPO, S-GRPO, T-SPMO (paper: 8,8,50)")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--eval-n", type=int, default=64)
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    shape = load_shape(a.model)
    out = tempfile.mkdtemp(prefix="tinyrl-gpu-check-")
    runs = list(zip(("grpo", "sgrpo", "tspmo"), map(int, a.groups.split(",")), ([],) * 3))
    if cuda:
        runs.append(("tspmo", runs[-1][1], ["--static-cache"]))
    else:
        print("static cache: not covered (torch.compile with CUDA graphs needs CUDA)")
    for algo, group, extra in runs:
        name = algo + ("-static" if extra else "")
        run([sys.executable, "train.py", "--algo", algo, "--task", "mult", "--model", a.model, "--group-size",
             str(group), "--max-new-tokens", str(a.max_new_tokens), "--steps", str(a.steps), "--dtype", "float32",
             "--eval-every", "0", "--test-n", "0", "--save-every", str(a.steps), "--reward", "bench/parity.py:parity",
             "--out", os.path.join(out, name), *extra])
        paper = preset(algo, "mult")
        est = predict(shape, group, a.max_new_tokens, paper["lora_rank"], paper["lora_fraction"], "float32",
                      device="cuda" if cuda else "cpu")
        with open(os.path.join(out, name, "metrics.jsonl")) as f:
            lines = [json.loads(x) for x in f]
        for m in lines:
            seconds = sum(v for k, v in m.items() if k.startswith("sec_"))
            print(f"{name} step {m['step']}: seconds {seconds:.1f}, peak memory {m['peak_mem_mb'] / 1024:.2f} GiB "
                  f"(planner: {est['peak'] / GiB:.3f} GiB), sampled tokens {m['sampled_tokens']}, "
                  f"reward {m['reward_mean']:.2f}", flush=True)
    run([sys.executable, "bench/eval_speed.py", "--model", a.model, "--n", str(a.eval_n), "--batch-size", "16",
         "--max-new-tokens", str(a.max_new_tokens), "--digits", "3x3"])
    print("gpu check: every command finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
