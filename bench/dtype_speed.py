"""bfloat16 against float32 on this CPU: what `--dtype auto` measures, and what it costs a whole evaluation.

    python bench/dtype_speed.py [--model FILE.gguf] [--rows 1 50 64 256] [--eval-n 32] [--max-new-tokens 64]

1. F.linear GFLOP/s in each dtype on the model's own layer shapes (q, gate, down projections) at each row
   count, and the bf16/f32 ratio; `--dtype auto` takes bfloat16 only where the ratio at 64 rows is >= 1.2.
2. With --eval-n > 0, eval.py's engine (continuous batching, greedy) on the first multiplication test
   problems in each dtype: wall seconds and the ratio, so the kernel figure can be checked against a real run.
Run it with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` to see an AVX2-only CPU's figures anywhere.
"""
from __future__ import annotations

import argparse
import time

import torch
from common import find_smollm2  # (also puts the repository on sys.path)

from tinyrl import cpu
from tinyrl.model import eos_ids, load_model, pad_id
from tinyrl.sampling import generate_continuous
from tinyrl.tasks import load_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", help="a .gguf / folder / hub id (default: the SmolLM2 GGUF if found)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 50, 64, 256])
    p.add_argument("--eval-n", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--digits", default="2x1")
    args = p.parse_args()
    name = args.model or find_smollm2()
    model, tok = load_model(name, "float32", "cpu")
    print(f"{name}; {cpu.cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| rows | float32 GFLOP/s | bfloat16 GFLOP/s | bf16 / f32 |\n|---|---|---|---|")
    for rows in args.rows:
        s = cpu.linear_speed(model.config, rows, cached=False)  # measured now, whatever the cache says
        print(f"| {rows} | {s['float32']:g} | {s['bfloat16']:g} | {s['bfloat16'] / s['float32']:.2f} |")
    chosen, line = cpu.pick_dtype(model.config, "auto", torch.device("cpu"))
    print(line.strip())
    if not args.eval_n:
        return
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        task = load_task("mult", tok, args.digits)
        eos = eos_ids(model, tok)
        prompts = [q.prompt_ids for q in task.test[: args.eval_n]]
        start = time.perf_counter()
        outs = generate_continuous(model, prompts, args.max_new_tokens, eos, 16, 0.0, None, pad_id(tok, eos))
        seconds[dtype] = time.perf_counter() - start
        print(f"eval, {args.eval_n} problems, {args.max_new_tokens} new tokens, {str(dtype)[6:]}: "
              f"{seconds[dtype]:.1f} s, {sum(map(len, outs))} tokens")
    print(f"eval speed bf16 / f32: {seconds[torch.float32] / seconds[torch.bfloat16]:.2f}")


if __name__ == "__main__":
    main()
