"""Accuracy of a model on a list of problems: batched greedy decoding, parse, compare."""
from __future__ import annotations

import math
import time

import torch

from tinyrl import dist
from tinyrl.sampling import generate_batch
from tinyrl.tasks import Problem, parse_answer


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (sound near 0% and 100%, unlike p ± 2σ)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(
    model,
    tokenizer,
    problems: list[Problem],
    eos_ids: list[int],
    pad_id: int,
    batch_size: int = 32,
    max_new_tokens: int = 300,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> dict:
    """Return {"accuracy", "ci95", "n", "correct", "tokens", "seconds", "tokens_per_s", "records"}.

    Each record: id, prompt, completion, parsed, answer, correct. Greedy by default (the paper does not say).
    Under torchrun each rank takes every world-th problem and all ranks get every record, in order."""
    from tqdm.auto import tqdm

    rank, world = dist.rank(), dist.world()
    order = list(range(len(problems)))[rank::world]
    mine = [problems[i] for i in order]
    records, tokens, start = [], 0, time.perf_counter()
    bar = tqdm(total=len(mine), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for i in range(0, len(mine), batch_size):
        batch = mine[i:i + batch_size]
        outs = generate_batch(model, [p.prompt_ids for p in batch], max_new_tokens, temperature, eos_ids, pad_id,
                              generator)
        for p, ids in zip(batch, outs):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            parsed = parse_answer(text)
            records.append({"id": p.id, "prompt": p.prompt, "completion": text, "parsed": parsed,
                             "answer": p.answer, "correct": parsed == p.answer})
            tokens += len(ids)
        correct = sum(r["correct"] for r in records)
        bar.update(len(batch))
        bar.set_postfix(acc=f"{correct / len(records):.3f}")
    bar.close()
    if world > 1:
        gathered = dist.gather(list(zip(order, records)))
        records = [r for _, r in sorted(gathered, key=lambda x: x[0])]
        tokens = int(dist.total(tokens))
    seconds = time.perf_counter() - start
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / max(1, len(records)), "ci95": wilson_interval(correct, len(records)),
            "n": len(records), "correct": correct, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9), "records": records}
