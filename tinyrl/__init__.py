"""tinyrl: memory-efficient RL for LLM reasoning (GRPO, S-GRPO, T-SPMO; Lee & Tong, arXiv:2504.20834)."""
from tinyrl.lora import (disable_lora, inject_lora, load_adapter, lora_parameters, merge_lora, save_adapter,
                         unmerge_lora)
from tinyrl.objectives import (PrefixTree, group_advantages, grpo_loss, kl_k3, prefix_advantages, sgrpo_loss,
                               sgrpo_select, tspmo_loss)
from tinyrl.replay import Episode, ReplayBuffer
from tinyrl.sampling import generate_batch, sample
from tinyrl.tasks import parse_answer

__all__ = ["inject_lora", "lora_parameters", "disable_lora", "merge_lora", "unmerge_lora", "save_adapter",
           "load_adapter", "sample", "generate_batch", "parse_answer", "group_advantages", "kl_k3", "sgrpo_select",
           "prefix_advantages", "PrefixTree", "grpo_loss", "sgrpo_loss", "tspmo_loss", "ReplayBuffer", "Episode"]
