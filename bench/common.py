"""Shared by the benchmarks: pick the model they run on."""
from __future__ import annotations

import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMOLLM2_GLOBS = [os.environ.get("TINYRL_TEST_MODEL") or "", ".cache/models/*SmolLM2*.gguf", "/work/models/*/*SmolLM2*.gguf"]


def seconds(fn, repeats: int = 30, device=None) -> float:
    """Mean seconds of one fn() call, after three warm-up calls (synchronising CUDA if device is one)."""
    import time

    import torch

    sync = torch.cuda.synchronize if device is not None and torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def find_smollm2() -> str | None:
    for pattern in SMOLLM2_GLOBS:
        hits = sorted(glob.glob(pattern)) if pattern else []
        if hits:
            return hits[0]
    return None


def random_qwen2(shape: str | None = None, seed: int = 0, device: str | None = None):
    """A randomly initialised Qwen2 (nothing to download): about 100M parameters, or a config that
    tinyrl.memory knows by name (e.g. "Qwen/Qwen2-1.5B"), built directly on the device."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tinyrl.memory import KNOWN

    if shape:
        k = {key: v for key, v in KNOWN[shape].items() if key != "bias"}
        cfg = Qwen2Config(**k, max_position_embeddings=32768)
    else:
        cfg = Qwen2Config(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                          tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = Qwen2ForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_bench_model(path: str | None, device: str | None = None, random_shape: str | None = None,
                     dtype: str = "float32"):
    """(model, tokenizer or None, description): a random Qwen2 of `random_shape` if given, else the SmolLM2
    GGUF when present, else a random ~100M Qwen2; in `dtype`."""
    import torch

    from tinyrl.model import load_model, pick_device

    path = None if random_shape else (path or find_smollm2())
    if path:
        model, tok = load_model(path, dtype=dtype, device=device)
        return model, tok, f"{os.path.basename(path)} (in {dtype})"
    model = random_qwen2(random_shape, device=str(pick_device(device))).to(getattr(torch, dtype))
    n = sum(p.numel() for p in model.parameters())
    return model, None, f"random Qwen2 {random_shape or ''} ({n / 1e6:.0f}M parameters, random weights, {dtype})"


def one_decode_step(description: str):
    """The set-up of the benches that time one decode step (attention_variants.py, fused_step.py): their flags
    (--model, --dtype, --threads, --rows, --positions, --repeats), the model on the CPU, and random ids:
    (args, model, prompt (1, positions), tokens (rows, 1))."""
    import argparse

    import torch

    from tinyrl.model import load_model

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--positions", type=int, default=166)
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=args.dtype, device="cpu")
    g = torch.Generator().manual_seed(0)
    prompt, tokens = torch.randint(1000, (1, args.positions), generator=g), torch.randint(1000, (args.rows, 1), generator=g)
    return args, model, prompt, tokens


def report_steps(args, times: dict, logits: dict, reference: str) -> None:
    """Print each way's best step time (the first repeat is a warm-up) and how far its logits are from `reference`'s."""
    print(f"{args.dtype}, {args.rows} rows x {args.positions} positions, {args.threads} threads, "
          f"best of {args.repeats - 1} after a warm-up")
    width = max(map(len, times))
    for name, t in times.items():
        diff = (logits[name] - logits[reference]).abs().max().item()
        same = (logits[name].argmax(-1) == logits[reference].argmax(-1)).float().mean().item()
        print(f"{name:{width}s} {min(t[1:]) * 1e3:7.1f} ms   max |logit - {reference}'s| {diff:.3g}   "
              f"argmax as {reference}'s: {same:.0%}")


def time_steps(args, model, prompt, ways: dict) -> tuple[dict, dict]:
    """Time one decode step of `model` (on tinyrl's CPU kernels) several ways, interleaved, `args.repeats` times.
    ways: name -> prepare(filled), where `filled` is a 1-row cache holding `prompt`; prepare builds that way's
    cache untimed and returns the step to time, a call that returns logits. Returns ({name: seconds}, {name: logits})."""
    import time

    import torch

    from tinyrl import cpu
    from tinyrl.sampling import forward_step, new_cache

    times: dict[str, list[float]] = {name: [] for name in ways}
    logits = {}
    with torch.no_grad(), cpu.use(model, cpu.Kernels(True, True)):
        filled = new_cache(model, args.positions)
        forward_step(model, prompt, filled)
        for _ in range(args.repeats):
            for name, prepare in ways.items():
                step = prepare(filled)
                start = time.perf_counter()
                logits[name] = step()
                times[name].append(time.perf_counter() - start)
    return times, logits
