"""Peak memory of one update: measured, beside the planner's prediction, and against a full-logits version.

    python bench/update_memory.py [--hidden 256 --layers 8 --max-new-tokens 300 --max-batch-tokens 4096]
    python bench/update_memory.py --model .cache/models/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf \
        --dtype bfloat16 --modes selective --cpu-kernels fast       # the paper's layer shapes, real weights

GRPO (|G|=8), S-GRPO (|G|=8, alpha=50, k=100, P=0.1) and T-SPMO (|G|=50) with completions of 300
tokens after a 64-token prompt, LoRA r=8 on q/v of the last quarter of the layers (the paper's mult
setting). The model: a random Qwen2 with Qwen2's vocabulary (151,936), a random model of a known
shape (--shape), or a real checkpoint (--model: hub id, folder or .gguf). Each configuration runs in
its own subprocess, with glibc returning freed blocks over 64 KiB to the OS so that RSS follows live
tensors. On a CPU it reports the peak RSS during the update (the peak is reset after loading) and
that peak above the RSS of the loaded model; on a GPU, torch.cuda.max_memory_allocated. The
"planner" column is `python -m tinyrl.memory`'s update peak for the same config and kernels.
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

    from tinyrl import cpu
    from tinyrl.lora import inject_lora
    from tinyrl.memory import predict, shape_from_config
    from tinyrl.objectives import PrefixTree, group_advantages, sgrpo_select
    from tinyrl.update import grpo_backward, tspmo_backward

    cpu.set_mode(args.cpu_kernels)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model:
        from tinyrl.model import load_model

        model, _ = load_model(args.model, args.dtype, str(device))
    elif args.shape:  # e.g. Qwen/Qwen2-1.5B with random weights, built directly on the device
        from common import random_qwen2

        model = random_qwen2(args.shape, device=str(device)).to(getattr(torch, args.dtype))
    else:
        cfg = Qwen2Config(vocab_size=QWEN2_VOCAB, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=2,
                          tie_word_embeddings=True)
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg).to(device, getattr(torch, args.dtype)).eval()
        for p in model.parameters():
            p.requires_grad_(False)
    inject_lora(model, rank=8, fraction=0.25)  # the paper's mult LoRA
    G = 50 if args.algo == "tspmo" else 8
    vocab = model.get_input_embeddings().num_embeddings
    completions = completions_with_shared_prefixes(G, args.max_new_tokens, vocab, seed=1)
    rewards = [float(i % 3 == 0) for i in range(G)]
    prompt = list(range(100, 164))  # 64 tokens, the planner's typical prompt
    full = args.mode == "full"
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: loading (e.g. dequantizing a GGUF) peaks higher
            f.write("5")
        base = rss_mb("VmRSS")
    start = time.perf_counter()
    if args.algo == "tspmo":
        stats = tspmo_backward(model, prompt, completions, PrefixTree(completions, rewards), 0,
                               max_batch_tokens=args.max_batch_tokens, full_logits=full)
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
    # "fast" packs the weights; so does "auto" while it measures (whatever it then keeps): the planner's default
    packed = device.type == "cpu" and cpu.mode() != "torch" and cpu.onednn_usable()
    planned = predict(shape_from_config(model.config), G, args.max_new_tokens, 8, 0.25, args.dtype,
                      max_batch_tokens=args.max_batch_tokens, prompt_tokens=len(prompt), device=device.type,
                      packed=packed)
    return {"algo": args.algo, "mode": args.mode, "peak_mb": peak, "update_mb": peak - base, "base_mb": base,
            "planned_mb": planned["update_peak"] / 2**20, "packed": bool(packed),
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
    p.add_argument("--model", help="a real checkpoint instead: hub id, folder or .gguf")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cpu-kernels", default="auto", choices=["auto", "torch", "fast"])
    p.add_argument("--modes", default="full,selective", help="full (logits of every position) and/or selective")
    p.add_argument("--algos", default="grpo,sgrpo,tspmo")
    p.add_argument("--algo", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.algo:  # the child: one configuration
        print(json.dumps(one(args)))
        return
    common = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--max-new-tokens",
              str(args.max_new_tokens), "--max-batch-tokens", str(args.max_batch_tokens), "--dtype", args.dtype,
              "--cpu-kernels", args.cpu_kernels]
    for flag in ("device", "shape", "model"):
        if getattr(args, flag):
            common += [f"--{flag}", getattr(args, flag)]
    model = args.model or "random-weight " + (args.shape or f"Qwen2, vocab {QWEN2_VOCAB}, hidden {args.hidden}, "
                                                             f"{args.layers} layers")
    print(f"{model}, {args.dtype}, LoRA r=8 on the last 1/4; completions of {args.max_new_tokens} tokens; "
          f"--max-batch-tokens {args.max_batch_tokens}; CPU kernels {args.cpu_kernels}")
    algos, modes = args.algos.split(","), args.modes.split(",")
    rows = {}
    for algo in algos:
        for mode in modes:
            out = subprocess.run([sys.executable, __file__, "--algo", algo, "--mode", mode, *common],
                                 capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
            if out.returncode != 0:
                sys.exit(f"{algo}/{mode} failed:\n{out.stderr[-2000:]}")
            rows[algo, mode] = json.loads(out.stdout.strip().splitlines()[-1])
            r = rows[algo, mode]
            print(f"  {algo} {mode}: peak {r['peak_mb'] / 1024:.2f} GiB, {r['update_mb']:.0f} MB above the loaded "
                  f"model, {r['seconds']:.1f} s", flush=True)
    cuda = rows[algos[0], modes[0]]["device"] == "cuda"
    print(f"\n{'algo':<7}{'mode':<11}{'tokens in loss':>15}{'loaded GiB':>11}{'peak GiB':>10}{'planner GiB':>12}"
          f"{'planner/peak':>13}{'update MB':>11}{'seconds':>9}   "
          f"({'CUDA allocation' if cuda else 'RSS; update MB = peak above the loaded model'})")
    for (algo, mode), r in rows.items():
        planned = f"{r['planned_mb'] / 1024:>12.2f}{r['planned_mb'] / r['peak_mb']:>13.2f}" if mode == "selective" \
            else f"{'-':>12}{'-':>13}"  # the planner models tinyrl's selective LM head
        print(f"{algo:<7}{mode:<11}{r['tokens_in_loss']:>15}{r['base_mb'] / 1024:>11.2f}{r['peak_mb'] / 1024:>10.2f}"
              f"{planned}{r['update_mb']:>11.0f}{r['seconds']:>9.1f}")
    if "full" in modes and "selective" in modes:
        print("\nselective / full-logits update MB: " + ", ".join(
            f"{a} {rows[a, 'selective']['update_mb'] / rows[a, 'full']['update_mb']:.2f}" for a in algos))


if __name__ == "__main__":
    main()
