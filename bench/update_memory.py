"""Peak memory of one update: tinyrl's selective LM head against a full-logits version of the same loss.

    python bench/update_memory.py [--hidden 256 --layers 8 --max-new-tokens 300 --max-batch-tokens 4096]

GRPO (|G|=8), S-GRPO (|G|=8, alpha=50, k=100, P=0.1) and T-SPMO (|G|=50) on a random Qwen2 with
Qwen2's vocabulary (151,936), completions of 300 tokens. Each configuration runs in its own
subprocess and reports its peak: RSS on CPU (VmHWM minus the RSS after loading the model), or
torch.cuda.max_memory_allocated on a GPU. Both sides use the same packing and the same loss.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

QWEN2_VOCAB = 151936


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def completions_with_shared_prefixes(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """n completions that branch off 4 base sequences at uniform depths, so the prefix tree has
    non-zero advantages all along the 300 tokens, as a low-temperature policy's samples do."""
    g = torch.Generator().manual_seed(seed)
    bases = [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(4)]
    out = []
    for i in range(n):
        cut = int(torch.randint(0, length, (1,), generator=g))
        out.append(bases[i % 4][:cut] + torch.randint(3, vocab, (length - cut,), generator=g).tolist())
    return out


def one(args) -> dict:
    """Run one update in this process and return its measurements."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tinyrl.lora import inject_lora, lora_parameters
    from tinyrl.objectives import PrefixTree, group_advantages, sgrpo_select
    from tinyrl.update import grpo_backward, tspmo_backward

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.shape:  # e.g. Qwen/Qwen2-1.5B with random weights, built directly on the device
        from common import random_qwen2

        model = random_qwen2(args.shape, device=str(device))
    else:
        cfg = Qwen2Config(vocab_size=QWEN2_VOCAB, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=2,
                          tie_word_embeddings=True)
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg).to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
    inject_lora(model, rank=8, fraction=0.25)  # the paper's mult LoRA
    G = 50 if args.algo == "tspmo" else 8
    completions = completions_with_shared_prefixes(G, args.max_new_tokens, QWEN2_VOCAB, seed=1)
    rewards = [float(i % 3 == 0) for i in range(G)]
    prompt = list(range(100, 160))
    full = args.mode == "full"
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_mb("VmRSS")
    start = time.perf_counter()
    if args.algo == "tspmo":
        stats = tspmo_backward(model, prompt, completions, PrefixTree(completions, rewards), 0.01,
                               lora_parameters(model), 0, max_batch_tokens=args.max_batch_tokens, full_logits=full)
    else:
        sel = torch.Generator().manual_seed(0)
        positions = [list(range(len(c))) if args.algo == "grpo" else sgrpo_select(len(c), 50, 100, 0.1, sel)
                     for c in completions]
        stats = grpo_backward(model, prompt, completions, group_advantages(torch.tensor(rewards)), positions, 0.01,
                              0, max_batch_tokens=args.max_batch_tokens, full_logits=full)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = rss_mb("VmHWM")
    return {"algo": args.algo, "mode": args.mode, "peak_mb": peak, "update_mb": peak - base, "base_mb": base,
            "seconds": time.perf_counter() - start, "tokens_in_loss": stats["tokens_in_loss"],
            "forward_tokens": stats["forward_tokens"], "device": device.type}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--max-batch-tokens", type=int, default=4096)
    p.add_argument("--device")
    p.add_argument("--shape", help="a random-weight model of this config, e.g. Qwen/Qwen2-1.5B (see tinyrl.memory)")
    p.add_argument("--algo", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.algo:  # the child: one configuration
        print(json.dumps(one(args)))
        return
    common = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--max-new-tokens",
              str(args.max_new_tokens), "--max-batch-tokens", str(args.max_batch_tokens)]
    if args.device:
        common += ["--device", args.device]
    if args.shape:
        common += ["--shape", args.shape]
    model = args.shape or f"Qwen2 with vocab {QWEN2_VOCAB}, hidden {args.hidden}, {args.layers} layers"
    print(f"random-weight {model}, LoRA r=8 on the last 1/4; completions of {args.max_new_tokens} tokens; "
          f"--max-batch-tokens {args.max_batch_tokens}")
    rows = {}
    for algo in ("grpo", "sgrpo", "tspmo"):
        for mode in ("full", "selective"):
            out = subprocess.run([sys.executable, __file__, "--algo", algo, "--mode", mode, *common],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{algo}/{mode} failed:\n{out.stderr[-2000:]}")
            rows[algo, mode] = json.loads(out.stdout.strip().splitlines()[-1])
    unit = "peak RSS above the loaded model" if rows["grpo", "full"]["device"] == "cpu" else "peak CUDA allocation"
    print(f"\n{'algo':<7}{'tokens in loss':>15}{'full-logits MB':>16}{'selective MB':>14}{'ratio':>8}"
          f"{'full s':>8}{'sel. s':>8}   ({unit})")
    for algo in ("grpo", "sgrpo", "tspmo"):
        f, s = rows[algo, "full"], rows[algo, "selective"]
        print(f"{algo:<7}{s['tokens_in_loss']:>15}{f['update_mb']:>16.0f}{s['update_mb']:>14.0f}"
              f"{s['update_mb'] / f['update_mb']:>8.2f}{f['seconds']:>8.1f}{s['seconds']:>8.1f}"
              + (f"   selective peak {s['peak_mb'] / 1024:.1f} GiB" if s["device"] == "cuda" else ""))


if __name__ == "__main__":
    main()
