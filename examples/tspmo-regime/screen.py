"""Screen (model, digits) settings for the T-SPMO regime study: at the training regime (temperature 0.3,
300 new tokens, the paper's multiplication prompt), the base model's accuracy, the share of completions
that work through steps (`tinyrl.tasks.works_through_steps`), tokens per completion, and what a T-SPMO
step costs on this machine.

    python examples/tspmo-regime/screen.py --model M --digits 2x2 [--mult-prompt partial-products] --out DIR
    python examples/tspmo-regime/screen.py --table examples/tspmo-regime/screen

Each candidate samples one completion for each of the first --n validation problems (never test), then
times one fresh T-SPMO group on the first problem: 50 completions from the sampler, and the update on
them (LoRA as the mult preset: rank 8 on q/v of the last 1/4 of the layers) with their own rewards. The step
estimate adds one replay group at half the fresh group's length, as with C_success = 1 a replay cut is
uniform over the source: step = 1.5 x sampling + update (the update is counted once: it is a
small part). Writes OUT/MODEL-DIGITS.jsonl.gz (every completion) and appends a row to OUT/screen.jsonl.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tinyrl.config import Config  # noqa: E402
from tinyrl.evaluate import evaluate, wilson_interval  # noqa: E402
from tinyrl.lora import inject_lora  # noqa: E402
from tinyrl.model import eos_ids, load_model, pad_id  # noqa: E402
from tinyrl.objectives import PrefixTree  # noqa: E402
from tinyrl.sampling import sample  # noqa: E402
from tinyrl.tasks import mult_task, works_through_steps  # noqa: E402
from tinyrl.update import tspmo_backward  # noqa: E402


def screen(args) -> dict:
    model, tokenizer = load_model(args.model, args.dtype, "cpu")
    eos, pad = eos_ids(model, tokenizer), None
    pad = pad_id(tokenizer, eos)
    task = mult_task(tokenizer, args.digits, prompt=args.mult_prompt)
    problems = task.val[: args.n]
    gen = torch.Generator().manual_seed(args.seed)
    result = evaluate(model, tokenizer, problems, eos, pad, args.batch_size, 300, temperature=0.3, generator=gen,
                      progress=sys.stderr.isatty(), desc=f"{os.path.basename(args.model)} {args.digits}")
    records = result["records"]
    for r in records:
        r["steps"] = works_through_steps(r["completion"], tuple(int(x) for x in r["id"].split("x")))
    correct, n = sum(r["correct"] for r in records), len(records)
    steps = sum(r["steps"] for r in records)

    inject_lora(model, 8, 8.0, 0.25)  # the mult preset's LoRA, for the update's cost
    first = problems[0]
    t0 = time.perf_counter()
    group = sample(model, first.prompt_ids, 50, 300, 0.3, eos, torch.Generator().manual_seed(args.seed + 1))
    t1 = time.perf_counter()
    rewards = [task.reward(tokenizer.decode(c, skip_special_tokens=True), first.answer, first.id) for c in group]
    tspmo_backward(model, first.prompt_ids, group, PrefixTree(group, rewards), pad,
                   max_batch_tokens=args.max_batch_tokens)
    t2 = time.perf_counter()
    lo, hi = wilson_interval(correct, n)
    row = {"model": os.path.basename(args.model), "digits": args.digits, "prompt": args.mult_prompt, "dtype": str(model.dtype).split(".")[-1],
           "n": n, "accuracy": correct / n, "ci95": [lo, hi], "steps_share": steps / n,
           "steps_share_ci95": list(wilson_interval(steps, n)),
           "tokens_per_completion": statistics.mean(r["tokens"] for r in records),
           "cut_at_300": sum(r["cut"] for r in records) / n, "group_seconds": t1 - t0,
           "group_tokens": sum(map(len, group)), "group_right": sum(r >= 1 for r in rewards),
           "update_seconds": t2 - t1, "step_seconds_estimate": 1.5 * (t1 - t0) + (t2 - t1),
           "threads": torch.get_num_threads(), "max_batch_tokens": args.max_batch_tokens,
           "sample_seconds": result["seconds"]}
    os.makedirs(args.out, exist_ok=True)
    name = f"{row['model'].removesuffix('.gguf')}-{args.digits}"
    name += "" if args.mult_prompt == "paper" else f"-{args.mult_prompt}"
    with gzip.open(os.path.join(args.out, f"{name}.jsonl.gz"), "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(args.out, "screen.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def passes(row: dict) -> str:
    """How the row's update was split, where it was not train.py's default (rows before the flag used it)."""
    tokens = row.get("max_batch_tokens", Config.max_batch_tokens)
    return "" if tokens == Config.max_batch_tokens else f", update in {tokens}-token passes"


def table(folder: str) -> str:
    rows = [json.loads(x) for x in open(os.path.join(folder, "screen.jsonl"))]
    lines = ["| model | digits | prompt | accuracy [95% CI] | works through steps [95% CI] | tokens / completion | cut at 300 | "
             "T-SPMO step, est. (s) | in range (3-20%, >= 50% steps) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["step_seconds_estimate"]):
        ok = 0.03 <= r["accuracy"] <= 0.20 and r["steps_share"] >= 0.5
        lines.append(f"| {r['model']} | {r['digits']} | {r.get('prompt', 'paper')} | {100 * r['accuracy']:.0f}% [{100 * r['ci95'][0]:.0f}-"
                     f"{100 * r['ci95'][1]:.0f}] | {100 * r['steps_share']:.0f}% [{100 * r['steps_share_ci95'][0]:.0f}-"
                     f"{100 * r['steps_share_ci95'][1]:.0f}] | {r['tokens_per_completion']:.0f} | "
                     f"{100 * r['cut_at_300']:.0f}% | {r['step_seconds_estimate']:.0f} ({r['dtype']}, "
                     f"{r['threads']} thread{'s' * (r['threads'] > 1)}{passes(r)}) | {'yes' if ok else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--digits")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch-tokens", type=int, default=Config.max_batch_tokens,
                   help="tokens per update pass; the 1.5B's float32 update at 8192 needs ~23 GiB (tinyrl.memory)")
    p.add_argument("--mult-prompt", default="paper", choices=["paper", "partial-products"])
    p.add_argument("--out", default="examples/tspmo-regime/screen")
    p.add_argument("--table", help="print the table of a screen folder")
    a = p.parse_args()
    if a.table:
        print(table(a.table))
    else:
        print(json.dumps(screen(a)))
