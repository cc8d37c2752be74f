"""Measure tinyrl's peak memory per phase in a fresh process (run by test_memory.py; prints JSON).

    python tests/memory_probe.py SHAPE_JSON PHASE ALGO G T MAX_BATCH_TOKENS
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def main():
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from tinyrl.lora import inject_lora, lora_parameters
    from tinyrl.objectives import group_advantages
    from tinyrl.sampling import sample
    from tinyrl.update import grpo_backward

    shape, phase, algo = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    G, T, budget = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    kind = shape.pop("kind")
    common = dict(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                  intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_hidden_layers"],
                  num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_key_value_heads"],
                  tie_word_embeddings=shape["tie_word_embeddings"])
    cfg = Qwen2Config(**common) if kind == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(0)
    model = (Qwen2ForCausalLM if kind == "qwen2" else LlamaForCausalLM)(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    inject_lora(model, rank=8, fraction=0.25)
    torch.optim.AdamW(lora_parameters(model))  # state is created lazily; LoRA state is tiny anyway
    prompt = list(range(10, 74))  # 64 tokens, the planner's typical prompt
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(3, cfg.vocab_size, (T,), generator=g).tolist() for _ in range(G)]
    def run(m, prompt, completions):  # the phase, as measured
        if phase == "sampling":
            sample(m, prompt, len(completions), len(completions[0]), 0.3, eos_ids=[], generator=g)
        else:
            grpo_backward(m, prompt, completions, group_advantages(torch.rand(len(completions))),
                          [list(range(len(c))) for c in completions], 0.01 if algo != "tspmo" else 0.0, 0,
                          max_batch_tokens=budget)

    # warm up a tiny model of the same kind first: the kernels' code pages and one-time buffers (which differ
    # between CPUs) then sit in the baseline, so the delta counts tensors only, as the planner does
    small = type(model)(type(cfg)(**{**common, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                     "num_attention_heads": 4, "num_key_value_heads": 2})).eval()
    small.requires_grad_(False)
    inject_lora(small, rank=8, fraction=0.25)
    run(small, prompt[:4], [[5, 6], [7, 8]])
    del small
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = rss_mb("VmRSS")
    run(model, prompt, completions)
    print(json.dumps({"delta_mb": rss_mb("VmHWM") - base, "params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
