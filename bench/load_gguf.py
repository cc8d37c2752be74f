"""Loading a .gguf: tinyrl's load_model (the file parsed once) against transformers' own load (parsed three
times: tokenizer, config, weights), in one run, each in a fresh process so neither warms the other's caches.

    python bench/load_gguf.py [FILE.gguf ...]      # default: the fetched SmolLM2 and Qwen2.5-Coder-0.5B files
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys

from common import find_smollm2  # (also puts the repository on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINYRL = "from tinyrl.model import load_model; load_model({path!r})"
PLAIN = ("import os; from transformers import AutoModelForCausalLM, AutoTokenizer; d, f = os.path.split({path!r}); "
         "AutoTokenizer.from_pretrained(d, gguf_file=f); AutoModelForCausalLM.from_pretrained(d, gguf_file=f)")


def seconds(code: str) -> float:
    """Wall seconds of the load alone: the imports are timed in the same process and taken off."""
    prelude = "import time, torch, transformers, tinyrl.model; t = time.perf_counter(); "
    r = subprocess.run([sys.executable, "-c", prelude + code + "; print(time.perf_counter() - t)"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"error: the load failed: {r.stderr.strip().splitlines()[-1]}")
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    paths = sys.argv[1:] or [p for p in [find_smollm2(), *sorted(glob.glob(".cache/models/*Qwen2.5*0.5B*.gguf"))] if p]
    if not paths:
        sys.exit("error: no .gguf file given or found; run python -m tinyrl.fetch smollm2-135m first")
    print(f"{'file':48s} {'transformers s':>14s} {'tinyrl s':>9s} {'speed-up':>8s}")
    for path in paths:
        plain, ours = seconds(PLAIN.format(path=os.path.abspath(path))), seconds(TINYRL.format(path=os.path.abspath(path)))
        print(f"{os.path.basename(path):48s} {plain:14.1f} {ours:9.1f} {plain / ours:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
