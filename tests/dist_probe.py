"""Run under torchrun by test_dist.py: LoRA gradients of one fixed group, sharded and all-reduced; rank 0 saves them.

    torchrun --nproc_per_node 2 tests/dist_probe.py MODEL_DIR ALGO OUT.safetensors
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def grads(model_dir: str, algo: str, shard=(0, 1)) -> dict[str, torch.Tensor]:
    """The LoRA gradients of a fixed group under one shard (tests call it with (0, 1) for the reference)."""
    from tinyrl.lora import inject_lora, lora_modules, lora_parameters
    from tinyrl.model import load_model
    from tinyrl.objectives import PrefixTree, group_advantages, sgrpo_select
    from tinyrl.update import grpo_backward, tspmo_backward

    model, _ = load_model(model_dir, device="cpu")
    torch.manual_seed(0)
    inject_lora(model, rank=4, fraction=0.5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    completions = [torch.randint(3, 299, (n,), generator=g).tolist() for n in (9, 4, 12, 7, 5)]
    completions[1] = completions[0][:3] + completions[1]
    completions[4] = completions[0][:5] + completions[4]
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0]
    prompt = [1, 40, 41, 42]
    if algo == "tspmo":
        tspmo_backward(model, prompt, completions, PrefixTree(completions, rewards), 0, shard=shard)
    else:
        sel = torch.Generator().manual_seed(0)
        positions = [list(range(len(c))) if algo == "grpo" else sgrpo_select(len(c), 2, 4, 0.5, sel)
                     for c in completions]
        grpo_backward(model, prompt, completions, group_advantages(torch.tensor(rewards)), positions, 0.01, 0,
                      shard=shard)
    from tinyrl import dist

    dist.all_reduce_grads(lora_parameters(model))
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    from safetensors.torch import save_file

    from tinyrl import dist

    rank, world, _ = dist.setup("cpu")
    out = grads(sys.argv[1], sys.argv[2], shard=(rank, world))
    if rank == 0:
        save_file(out, sys.argv[3])
    dist.finish(0)
