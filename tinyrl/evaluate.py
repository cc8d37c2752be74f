"""Accuracy of a model on a list of problems: continuously batched greedy decoding, parse, compare."""
from __future__ import annotations

import math
import time

import torch

from tinyrl import dist
from tinyrl.sampling import generate_continuous
from tinyrl.tasks import Problem, Reward, parse_answer


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (sound near 0% and 100%, unlike p ± 2σ)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(base: list[bool], other: list[bool]) -> tuple[int, int, float]:
    """Paired comparison of two models on the same problems: (problems only `other` solves, problems only `base`
    solves, the exact two-sided McNemar p-value: a binomial test of the first count among the discordant pairs)."""
    if len(base) != len(other):
        raise ValueError("a paired test needs the same problems on both sides")
    gained = sum(o and not b for b, o in zip(base, other))
    lost = sum(b and not o for b, o in zip(base, other))
    n = gained + lost
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2 ** n
    return gained, lost, min(1.0, 2 * tail)


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
    reward: Reward = Reward(),
    threshold: float = 1.0,
) -> dict:
    """Return {"accuracy", "ci95", "n", "correct", "tokens", "seconds", "tokens_per_s", "records"}.

    Each record: id, prompt, completion, parsed (the last integer), answer, reward, correct (reward >= threshold:
    with the paper's reward, parsed == answer), tokens and cut (stopped by max_new_tokens, not an EOS); "cut"
    in the result counts those. Greedy by default (the paper does not say).
    Up to batch_size problems decode at once, a finished one's slot taking the next (`generate_continuous`).
    Under torchrun each rank takes every world-th problem and all ranks get every record, in order."""
    from tqdm.auto import tqdm

    rank, world = dist.rank(), dist.world()
    order = list(range(len(problems)))[rank::world]
    mine = [problems[i] for i in order]
    records: list[dict] = [{} for _ in mine]
    start = time.perf_counter()
    bar = tqdm(total=len(mine), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    correct = done = 0

    def record(i: int, ids: list[int]) -> None:
        nonlocal correct, done
        p, text = mine[i], tokenizer.decode(ids, skip_special_tokens=True)
        r = reward(text, p.answer, p.id)
        records[i] = {"id": p.id, "prompt": p.prompt, "completion": text, "parsed": parse_answer(text),
                      "answer": p.answer, "reward": r, "correct": r >= threshold, "tokens": len(ids),
                      "cut": not ids or ids[-1] not in eos_ids}  # cut: ended at max_new_tokens, not at an EOS
        correct, done = correct + records[i]["correct"], done + 1
        bar.update(1)
        bar.set_postfix(acc=f"{correct / done:.3f}")

    outs = generate_continuous(model, [p.prompt_ids for p in mine], max_new_tokens, eos_ids, batch_size, temperature,
                               generator, pad_id, on_done=record)
    tokens = sum(map(len, outs))
    bar.close()
    if world > 1:
        gathered = dist.gather(list(zip(order, records)))
        records = [r for _, r in sorted(gathered, key=lambda x: x[0])]
        tokens = int(dist.total(tokens))
    seconds = time.perf_counter() - start
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / max(1, len(records)), "ci95": wilson_interval(correct, len(records)),
            "n": len(records), "correct": correct, "cut": sum(r["cut"] for r in records), "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9), "records": records}
