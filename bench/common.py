"""Shared by the benchmarks: pick the model they run on."""
from __future__ import annotations

import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMOLLM2_GLOBS = [os.environ.get("TINYRL_TEST_MODEL") or "", ".cache/models/*.gguf", "/work/models/*/*.gguf"]


def find_smollm2() -> str | None:
    for pattern in SMOLLM2_GLOBS:
        hits = sorted(glob.glob(pattern)) if pattern else []
        if hits:
            return hits[0]
    return None


def random_qwen2(vocab_size: int = 32000, hidden: int = 768, layers: int = 12, seed: int = 0):
    """A randomly initialised Qwen2 of about 100M parameters (nothing to download)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_bench_model(path: str | None, device: str | None = None):
    """(model, tokenizer or None, description): SmolLM2 GGUF when present, else a random ~100M Qwen2."""
    from tinyrl.model import load_model

    path = path or find_smollm2()
    if path:
        model, tok = load_model(path, device=device)
        return model, tok, f"SmolLM2-135M-Instruct ({os.path.basename(path)}, dequantized to float32)"
    model = random_qwen2()
    n = sum(p.numel() for p in model.parameters())
    return model, None, f"random Qwen2 ({n / 1e6:.0f}M parameters; SmolLM2 GGUF not found)"
