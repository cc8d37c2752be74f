"""tinyrl's sampler against Hugging Face `generate`: one prompt, n completions, equal work.

    python bench/sampling.py [--model FILE.gguf] [--n 50] [--max-new-tokens 300] [--dtype bfloat16] [--profile]
    python bench/sampling.py --fresh [--n 50] [--max-new-tokens 64]


Both sides sample at temperature 0.3 from the same model and prompt, ignore EOS (every row runs
to max_new_tokens, so the token counts are equal) and use no top-k/top-p. Prints tokens/s and the
ratio tinyrl / HF measured in this run. On CPU a middle row runs tinyrl's sampler on torch's own
kernels (--cpu-kernels torch), to show what the sampler's design gives and what the kernel choice
adds; the last row is the sampler as shipped (auto: it measures which kernels are faster here).

--fresh times the FIRST call in a new process instead, which is what every eval.py call and short run pays:
HF generate, tinyrl with an empty kernel cache (it measures its kernels inside the call), and tinyrl again
with the cache that call filled, each in its own process after loading the model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from common import load_bench_model

from tinyrl import cpu
from tinyrl.sampling import sample, sampling_kernels


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a .gguf / folder / hub id (default: SmolLM2 GGUF if found, else random Qwen2)")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--device", default=None)
    p.add_argument("--random", help="a random-weight model of this config instead, e.g. Qwen/Qwen2-1.5B")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both samplers use it")
    p.add_argument("--profile", action="store_true", help="then: where tinyrl's sampling time goes, by operator")
    p.add_argument("--fresh", action="store_true", help="time the first call of a new process (see above)")
    p.add_argument("--child", choices=["hf", "tinyrl"], help=argparse.SUPPRESS)  # one --fresh measurement
    args = p.parse_args()
    if args.fresh:
        return fresh(args)
    model, tok, desc = load_bench_model(args.model, args.device, args.random, args.dtype)
    device = next(model.parameters()).device
    if tok is not None:
        from tinyrl.tasks import mult_problem

        prompt = mult_problem(tok, 123, 456).prompt_ids
    else:
        prompt = torch.randint(100, 30000, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    n, L = args.n, args.max_new_tokens
    print(f"model: {desc}; device {device}; CPU {cpu.cpu_name()}; torch threads {torch.get_num_threads()}")
    print(f"one prompt of {len(prompt)} tokens, n={n} completions x {L} new tokens, temperature 0.3, EOS ignored")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_tinyrl(tokens):
        out = sample(model, prompt, n, tokens, 0.3, eos_ids=[], generator=torch.Generator(device).manual_seed(0))
        return sum(map(len, out))

    def run_hf(tokens):
        ids = torch.tensor([prompt], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.3, top_k=0,
                             top_p=1.0, num_return_sequences=n, max_new_tokens=tokens, min_new_tokens=tokens,
                             eos_token_id=None, pad_token_id=0)
        return (out.shape[1] - len(prompt)) * out.shape[0]

    def run_tinyrl_default_kernels(tokens):
        cpu.set_mode("torch")
        try:
            return run_tinyrl(tokens)
        finally:
            cpu.set_mode(None)

    if args.child:  # nothing has run yet in this process: time its first call, report as JSON
        start = time.perf_counter()
        tokens = (run_hf if args.child == "hf" else run_tinyrl)(L)
        sync()
        print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - start, "kernels": cpu.describe(model)}))
        return
    runs = [("HF generate", run_hf), ("tinyrl sample", run_tinyrl)]
    if device.type == "cpu":
        runs.insert(1, ("tinyrl, torch kernels", run_tinyrl_default_kernels))
    with sampling_kernels(model, n, len(prompt) + L // 2):  # auto: measure here, on this run's shapes
        pass
    rows = []
    for name, fn in runs:
        fn(8)  # warm-up
        sync()
        start = time.perf_counter()
        tokens = fn(L)
        sync()
        seconds = time.perf_counter() - start
        rows.append((name, tokens, seconds, tokens / seconds))
    assert all(row[1] == n * L for row in rows), "unequal work"
    print(f"\n{'sampler':<24}{'tokens':>8}{'seconds':>10}{'tokens/s':>11}{'/ HF':>8}")
    for name, tokens, seconds, rate in rows:
        print(f"{name:<24}{tokens:>8}{seconds:>10.2f}{rate:>11.1f}{rate / rows[0][3]:>7.2f}x")
    print(f"\ntinyrl / HF generate: {rows[-1][3] / rows[0][3]:.2f}x")
    if device.type == "cpu":
        print(f"tinyrl / tinyrl on torch kernels: {rows[-1][3] / rows[1][3]:.2f}x; kernels chosen: {cpu.describe(model)}")
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            run_tinyrl(L)
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops)
        print("\nshare of tinyrl's sampling time (self CPU time per operator):")
        for e in ops[:6]:
            print(f"  {e.key:<52}{100 * e.self_cpu_time_total / total:>6.1f}%")


def fresh(args) -> None:
    """Each measurement in a new process; the two tinyrl ones share a kernel cache that starts empty."""
    passed = [a for a in sys.argv[1:] if a != "--fresh"]
    print(f"the first call of a fresh process: n={args.n} completions x {args.max_new_tokens} new tokens "
          f"(model load not counted); CPU {cpu.cpu_name()}")
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for name, child in [("HF generate", "hf"), ("tinyrl, empty kernel cache", "tinyrl"),
                            ("tinyrl, kernel cache filled", "tinyrl")]:
            out = subprocess.run([sys.executable, __file__, *passed, "--child", child], check=True, text=True,
                                 capture_output=True, env={**os.environ, "TINYRL_CACHE": cache}).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows.append((name, r["tokens"], r["seconds"], r["tokens"] / r["seconds"], r["kernels"]))
    print(f"\n{'first call':<30}{'tokens':>8}{'seconds':>10}{'tokens/s':>11}{'/ HF':>8}")
    for name, tokens, seconds, rate, _ in rows:
        print(f"{name:<30}{tokens:>8}{seconds:>10.2f}{rate:>11.1f}{rate / rows[0][3]:>7.2f}x")
    print(f"\nkernels: {rows[2][4]}")
    print(f"first call / HF: {rows[1][3] / rows[0][3]:.2f}x with an empty cache, {rows[2][3] / rows[0][3]:.2f}x with "
          f"it filled; the measurement costs {rows[1][2] - rows[2][2]:.1f} s")


if __name__ == "__main__":
    main()
