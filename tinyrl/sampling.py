"""Sampling with a KV cache, written out by hand (SPEC §3): no `model.generate`.

`sample` draws n completions of ONE prompt: the prompt is prefilled once, its cache is repeated
per row, finished rows leave the batch, and at most `chunk_size` rows decode at a time.
`generate_batch` completes different prompts side by side (left padding, for evaluation).
Temperature 0 is greedy. Completions come back as token lists that keep the EOS that ended them.
"""
from __future__ import annotations

import copy
import inspect

import torch


def _cache_kwarg(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; accept either."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def forward_step(model, input_ids, cache, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Run `input_ids` (B, T) through the model, appending to `cache`; return last-position logits (B, V)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache})
    return out.logits[:, -1].float()


def pick_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: argmax at temperature 0, else a draw from softmax(logits / T)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def decode(
    model,
    cache,
    logits: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_ids: list[int],
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> list[list[int]]:
    """Decode from a filled `cache` whose next-token logits are `logits` (B, V).

    attention_mask (B, S) and positions (B,) are needed only for left-padded batches; rows that emit
    an EOS id are dropped from the batch (and the cache) at once."""
    rows = logits.shape[0]
    eos = torch.tensor(sorted(eos_ids), device=logits.device)
    alive = torch.arange(rows, device=logits.device)  # original row of each row still decoding
    completions: list[list[int]] = [[] for _ in range(rows)]
    for step in range(max_new_tokens):
        tokens = pick_tokens(logits, temperature, generator)  # (b,)
        for row, tok in zip(alive.tolist(), tokens.tolist()):
            completions[row].append(tok)
        if step == max_new_tokens - 1:
            break
        done = torch.isin(tokens, eos)
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            alive, tokens = alive[keep], tokens[keep]
            cache.batch_select_indices(keep)
            if attention_mask is not None:
                attention_mask, positions = attention_mask[keep], positions[keep]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(alive), 1)], dim=1)
            positions = positions + 1
        logits = forward_step(model, tokens[:, None], cache, attention_mask,
                              None if positions is None else positions[:, None])
    return completions


@torch.no_grad()
def sample(
    model,
    prompt_ids: list[int] | torch.Tensor,
    n: int,
    max_new_tokens: int,
    temperature: float,
    eos_ids: list[int],
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> list[list[int]]:
    """n completions of one prompt: one shared prefill, its cache repeated per row, chunks of <= chunk_size rows."""
    device = next(model.parameters()).device
    prompt = torch.as_tensor(prompt_ids, device=device).view(1, -1)  # (1, P)
    prompt_cache = new_cache(model)
    first_logits = forward_step(model, prompt, prompt_cache)  # (1, V): the prefill, done once
    chunk = chunk_size or n
    completions: list[list[int]] = []
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        cache = copy.deepcopy(prompt_cache)
        cache.batch_repeat_interleave(rows)  # (rows, heads, P, d) per layer
        completions += decode(model, cache, first_logits.expand(rows, -1), max_new_tokens, temperature,
                              eos_ids, generator)
    return completions


@torch.no_grad()
def generate_batch(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    eos_ids: list[int],
    pad_id: int,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """One completion for each of several prompts, decoded together with left padding."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p, device=device)
        mask[i, width - len(p):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, S): each prompt starts at position 0
    cache = new_cache(model)
    logits = forward_step(model, ids, cache, mask, position_ids)
    return decode(model, cache, logits, max_new_tokens, temperature, eos_ids, generator,
                  attention_mask=mask, positions=position_ids[:, -1])
