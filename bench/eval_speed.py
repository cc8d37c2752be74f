"""Greedy evaluation engines on the same problems: eval.py's continuous batching against HF `generate` in
static batches and tinyrl's static-batch `generate_batch`.

    python bench/eval_speed.py [--model FILE.gguf] [--svamp-file SVAMP.json] [--n 64] [--batch-size 16]
                               [--max-new-tokens 200] [--dtype bfloat16] [--digits 2x1] [--split val]

For each task (SVAMP when --svamp-file is given, then multiplication), the first n problems of the
split are decoded greedily with the same token limit and EOS ids by:
- HF generate, static batches of batch-size (left-padded; a batch runs until its longest row ends);
- tinyrl generate_batch, the same static batches;
- tinyrl generate_continuous (what eval.py and in-training validation run): a finished row's slot
  takes the next problem at once (--sorted: also with the problems sorted by prompt length).
Prints wall seconds, generated tokens (up to and including the EOS), tokens/s and the speed-up over
HF, the decode steps each engine ran, their mean rows (a static batch keeps finished rows until its
longest ends) and seconds, the prefill passes and their seconds, and how many completions differ from HF's
and from generate_batch's; then the most any scheduler at this batch size could gain on eval.py's steps (a
fit of a step's seconds as fixed + per row, with every slot busy on every step and prefill free), and
where one decode step's time goes (1 row and batch-size rows, on the kernels eval.py chose): the linear
layers, the LM head, attention, and the rest (norms, residuals, Python).
--profile: where eval.py's time goes, by operator, on the first 2 x batch-size problems (the profiler's
records of a whole 64-problem run of a 0.5B model filled 24 GiB).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass, field

import torch
from common import load_bench_model  # (also puts the repository on sys.path)

from tinyrl import cpu
from tinyrl.model import eos_ids, pad_id
from tinyrl.sampling import forward_step, generate_batch, generate_continuous, new_cache, sampling_kernels
from tinyrl.tasks import load_task


def cut(ids: list[int], eos: list[int]) -> list[int]:
    """Tokens up to and including the first EOS id."""
    return next((ids[: i + 1] for i, t in enumerate(ids) if t in eos), ids)


def hf_static(model, prompts, max_new_tokens, eos, pad, batch_size):
    out = []
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b:b + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        gen = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad, top_k=None, top_p=None, temperature=None)
        out += [cut(row[width:].tolist(), eos) for row in gen]
    return out


def tinyrl_static(model, prompts, max_new_tokens, eos, pad, batch_size):
    return [c for b in range(0, len(prompts), batch_size)
            for c in generate_batch(model, prompts[b:b + batch_size], max_new_tokens, 0.0, eos, pad)]


def tinyrl_continuous(model, prompts, max_new_tokens, eos, pad, batch_size):
    return generate_continuous(model, prompts, max_new_tokens, eos, batch_size, pad_id=pad)


def tinyrl_continuous_sorted(model, prompts, max_new_tokens, eos, pad, batch_size):
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outs = generate_continuous(model, [prompts[i] for i in order], max_new_tokens, eos, batch_size, pad_id=pad)
    return [c for _, c in sorted(zip(order, outs))]


@dataclass
class Forwards:
    """The forward calls an engine made: decode steps (one token per row), their rows and seconds; prefills."""
    rows: list = field(default_factory=list)  # of every decode step
    step_s: list = field(default_factory=list)  # seconds of every decode step
    prefills: int = 0
    prefill_s: float = 0.0


@contextlib.contextmanager
def counting_steps(model, counts: Forwards):
    """Within the block, every forward call on `model` is counted into `counts`."""
    forward = model.forward

    def counted(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        seconds = time.perf_counter() - start
        if ids is not None and ids.shape[1] == 1:
            counts.rows.append(ids.shape[0])
            counts.step_s.append(seconds)
        elif ids is not None:
            counts.prefills += 1
            counts.prefill_s += seconds
        return out

    model.forward = counted
    try:
        yield
    finally:
        del model.forward


def step_parts(model, rows: int, positions: int, repeats: int = 20) -> dict[str, float]:
    """Mean milliseconds of one decode step of `rows` rows over `positions` cached positions, on the kernels
    eval.py chooses at that shape, split by forward hooks: "linears" (every nn.Linear but the LM head), "lm_head",
    "attention" (the attention modules less their q/k/v/o linears: rotary, cache write, attention proper) and
    "rest" (norms, MLP activation, rotary angles, residuals, embedding, Python)."""
    spent = {"linears": 0.0, "lm_head": 0.0, "attention modules": 0.0, "projections": 0.0}
    started: dict[torch.nn.Module, float] = {}

    def timed(module, parts: list[str]) -> list:
        def pre(mod, args):
            started[mod] = time.perf_counter()

        def post(mod, args, out):
            for part in parts:
                spent[part] += time.perf_counter() - started[mod]
        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    vocab = model.get_input_embeddings().num_embeddings
    tokens = torch.randint(vocab, (rows, 1), generator=torch.Generator().manual_seed(1))
    prompt = torch.randint(vocab, (1, positions), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), sampling_kernels(model, rows, positions):
        prefilled = new_cache(model, positions)
        forward_step(model, prompt, prefilled)

        def steps() -> float:  # mean seconds of a step, after three warm-ups
            total = 0.0
            for i in range(repeats + 3):
                cache = type(prefilled)(layers=[layer.repeat_rows(rows, positions + 1) for layer in prefilled.layers])
                if i == 3:
                    spent.update(dict.fromkeys(spent, 0.0))
                start = time.perf_counter()
                forward_step(model, tokens, cache)
                total += (time.perf_counter() - start) * (i >= 3)
            return total / repeats

        step = 1000 * steps()  # without hooks: they slow every module call a little
        head, hooks = model.get_output_embeddings(), []
        for name, m in model.named_modules():
            if m is head:
                hooks += timed(m, ["lm_head"])
            elif isinstance(m, torch.nn.Linear):
                hooks += timed(m, ["linears", "projections"] if ".self_attn." in name else ["linears"])
            elif name.endswith(".self_attn"):
                hooks += timed(m, ["attention modules"])
        try:
            steps()
        finally:
            for h in hooks:
                h.remove()
    ms = {k: 1000 * v / repeats for k, v in spent.items()}
    attention = ms["attention modules"] - ms["projections"]
    return {"step": step, "linears": ms["linears"], "lm_head": ms["lm_head"], "attention": attention,
            "rest": step - ms["linears"] - ms["lm_head"] - attention}


ENGINES = [("HF generate, static batches", hf_static), ("tinyrl generate_batch, static", tinyrl_static),
           ("tinyrl continuous (eval.py)", tinyrl_continuous)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a .gguf / folder / hub id (default: the SmolLM2 GGUF if found)")
    p.add_argument("--svamp-file", help="a local SVAMP.json: adds the SVAMP rows")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--digits", default="2x1", help="the multiplication rows' digits, or 'none' to leave them out")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--sorted", action="store_true", help="add a row: continuous, problems sorted by prompt length")
    p.add_argument("--profile", action="store_true", help="then: eval.py's engine under torch.profiler, by operator")
    args = p.parse_args()
    engines = ENGINES + [("tinyrl continuous, sorted by length", tinyrl_continuous_sorted)] * args.sorted
    model, tok, desc = load_bench_model(args.model, "cpu", None, args.dtype)
    if tok is None:
        raise SystemExit("needs a real model with a tokenizer: pass --model (the SmolLM2 GGUF, see DEVELOPERS.md)")
    eos = eos_ids(model, tok)
    pad = pad_id(tok, eos)
    print(f"model: {desc}; torch threads {torch.get_num_threads()}; greedy, batch size {args.batch_size}, "
          f"at most {args.max_new_tokens} new tokens")
    tasks = ([("svamp", load_task("svamp", tok, svamp_file=args.svamp_file))] if args.svamp_file else []) + \
        ([(f"mult {args.digits}", load_task("mult", tok, args.digits))] if args.digits != "none" else [])
    for name, task in tasks:
        problems = getattr(task, args.split)[: args.n]
        prompts = [q.prompt_ids for q in problems]
        generate_continuous(model, prompts[: args.batch_size], 4, eos, args.batch_size, pad_id=pad)  # warm-up; CPU kernels measured
        print(f"\n{name}, {args.split} split: {len(prompts)} problems, prompts of {min(map(len, prompts))}-"
              f"{max(map(len, prompts))} tokens")
        print(f"{'engine':<38}{'seconds':>9}{'tokens':>8}{'tokens/s':>10}{'vs HF':>8}{'steps':>7}{'rows':>6}"
              f"{'decode s':>10}{'prefills':>10}{'prefill s':>11}{'differ: HF':>12}{'generate_batch':>16}")
        results = []
        for label, engine in engines:
            counts = Forwards()
            start = time.perf_counter()
            with counting_steps(model, counts):
                outs = engine(model, prompts, args.max_new_tokens, eos, pad, args.batch_size)
            results.append((outs, time.perf_counter() - start, counts))
            (hf, hf_seconds, _), static = results[0], results[min(1, len(results) - 1)][0]
            seconds, tokens = results[-1][1], sum(map(len, outs))
            differ = [sum(a != b for a, b in zip(outs, ref)) for ref in (hf, static)]
            print(f"{label:<38}{seconds:>9.1f}{tokens:>8}{tokens / seconds:>10.1f}{hf_seconds / seconds:>7.2f}x"
                  f"{len(counts.rows):>7}{sum(counts.rows) / max(1, len(counts.rows)):>6.1f}{sum(counts.step_s):>10.1f}"
                  f"{counts.prefills:>10}{counts.prefill_s:>11.1f}"
                  f"{differ[0]:>12}{differ[1]:>16}")
        outs, _, counts = results[2]  # eval.py's engine
        if len(set(counts.rows)) > 1:  # a fit of seconds = fixed + per_row * rows needs steps of two sizes at least
            per_row, fixed = statistics.linear_regression(counts.rows, counts.step_s)  # least squares
            full = -(-sum(len(c) - 1 for c in outs) // args.batch_size)  # decode steps if every slot were always busy
            best = full * (fixed + per_row * args.batch_size)
            print(f"eval.py's decode step: {fixed * 1000:.1f} ms + {per_row * 1000:.2f} ms a row (fit over its "
                  f"{len(counts.rows)} steps); with every slot busy on every step and prefill free it would take "
                  f"{best:.1f} s: no scheduler at batch size {args.batch_size} on these steps passes "
                  f"{hf_seconds / best:.2f}x HF")
            tail = [r for r in counts.rows if r < args.batch_size]  # the batch shrinks once all have started
            print(f"after the last problem started: {len(tail)} of its {len(counts.rows)} decode steps, "
                  f"{sum(tail) / max(1, len(tail)):.1f} rows on average")
        positions = max(map(len, prompts)) + args.max_new_tokens // 2  # the shape eval.py's kernels are chosen on
        for rows in (1, args.batch_size):
            ms = step_parts(model, rows, positions)
            print(f"a decode step of {rows} row{'s' * (rows > 1)} over {positions} positions: {ms['step']:.1f} ms "
                  f"= linears {ms['linears']:.1f} + LM head {ms['lm_head']:.1f} + attention {ms['attention']:.1f} "
                  f"+ the rest {ms['rest']:.1f} (norms, residuals, Python)")
        print(f"cut at {args.max_new_tokens} tokens: {sum(len(c) == args.max_new_tokens for c in hf)} of {len(hf)} (HF); "
              f"CPU kernels (each engine's probe shape): {cpu.describe(model)}")
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                first = prompts[: 2 * args.batch_size]
                tinyrl_continuous(model, first, args.max_new_tokens, eos, pad, args.batch_size)
            ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in ops)
            print(f"share of eval.py's time on the first {len(first)} problems (self CPU time per operator):")
            for e in ops[:10]:
                print(f"  {e.key:<52}{100 * e.self_cpu_time_total / total:>6.1f}%")


if __name__ == "__main__":
    main()
