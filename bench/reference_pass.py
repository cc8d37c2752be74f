"""Seconds of one GRPO update with the reference pass from the trunk, against a whole second pass.

    python bench/reference_pass.py [--model FILE.gguf] [--fraction 0.33] [--rows 8] [--length 170]

The layers below the first LoRA layer compute the same for pi and pi_ref, so `grpo_backward` runs
the reference pass (beta > 0) from the policy pass's hidden state at that layer (`tinyrl.update.Trunk`).
This times `grpo_backward` on one fixed group of random completions (LoRA r 16 on q/v of the last
`--fraction` of the layers, B != 0), alternating the two ways `--repeats` times, and prints the
median of each, their ratio and the largest gradient difference. The model: a GGUF or folder
(--model), else the SmolLM2 GGUF, else a random ~100M Qwen2.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import load_bench_model

from tinyrl import update
from tinyrl.lora import inject_lora, lora_modules, lora_parameters
from tinyrl.objectives import group_advantages


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--fraction", type=float, default=1 / 3)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=170, help="completion tokens")
    p.add_argument("--prompt", type=int, default=120, help="prompt tokens")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model, _, what = load_bench_model(args.model)
    inject_lora(model, rank=16, fraction=args.fraction)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.01)
    vocab = model.get_input_embeddings().num_embeddings
    prompt = torch.randint(3, vocab, (args.prompt,), generator=g).tolist()
    completions = [torch.randint(3, vocab, (args.length,), generator=g).tolist() for _ in range(args.rows)]
    advantages = group_advantages(torch.arange(args.rows, dtype=torch.float) % 2)
    positions = [list(range(args.length))] * args.rows

    shipped = update.Trunk.__dict__["of"]

    def run(trunk: bool) -> tuple[float, list[torch.Tensor]]:
        if not trunk:  # what grpo_backward does for a model without a trunk: two whole passes
            update.Trunk.of = classmethod(lambda cls, model: None)
        try:
            for q in lora_parameters(model):
                q.grad = None
            start = time.perf_counter()
            update.grpo_backward(model, prompt, completions, advantages, positions, 0.01, 0, max_batch_tokens=4096)
            return time.perf_counter() - start, [q.grad.clone() for q in lora_parameters(model)]
        finally:
            update.Trunk.of = shipped

    print(f"{what}; LoRA r 16 on q/v of the last {args.fraction:.2f} of the layers; GRPO, beta 0.01, "
          f"{args.rows} completions of {args.length} tokens after {args.prompt}; {torch.get_num_threads()} threads")
    run(True)  # warm-up (and the CPU kernel choice, measured once)
    times, grads = {True: [], False: []}, {}
    for _ in range(args.repeats):
        for trunk in (False, True):
            sec, grads[trunk] = run(trunk)
            times[trunk].append(sec)
    diff = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-30) for a, b in zip(grads[True], grads[False]))
    whole_s, trunk_s = statistics.median(times[False]), statistics.median(times[True])
    print(f"whole reference pass: {whole_s:.2f} s; from the trunk: {trunk_s:.2f} s; "
          f"{whole_s / trunk_s:.2f}x; largest gradient difference {diff:.1e} of the largest entry")


if __name__ == "__main__":
    main()
