"""Measure a model's accuracy on multiplication, SVAMP or your own JSONL task, optionally with a LoRA adapter.

    python eval.py --adapter runs/NAME/best --n 40           # the run's task, model, digits, token limit, prompt...
    python eval.py --task mult --model Qwen/Qwen2-1.5B --n 3000   # a model without an adapter
"""
from __future__ import annotations

import json
import os

import torch

from tinyrl import cpu, dist
from tinyrl.cli import ArgParser, UserError, run_main
from tinyrl.evaluate import evaluate
from tinyrl.lora import load_adapter, read_adapter_config
from tinyrl.model import check_model, eos_ids, load_model, pad_id
from tinyrl.tasks import PROMPT_TEMPLATE, SVAMP_SHA256, check_task, load_task


# eval.py flag -> the run's config.json field: with --adapter from a run, the run's value is the default
FOLLOWED = {"task": "task", "model": "model", "digits": "digits", "max_new_tokens": "max_new_tokens",
            "prompt_template": "prompt_template", "prompt_mode": "prompt_mode", "reward": "reward", "dtype": "dtype",
            "svamp_file": "svamp_file", "svamp_sha256": "svamp_sha256", "val_file": "val_file",
            "test_file": "test_file", "threshold": "replay_threshold", "batch_size": "eval_batch_size",
            "mult_prompt": "mult_prompt"}
DEFAULTS = {"task": None, "model": "Qwen/Qwen2-1.5B", "digits": "3x3", "max_new_tokens": 300,
            "prompt_template": PROMPT_TEMPLATE, "prompt_mode": "plain", "reward": None, "dtype": "float32",
            "svamp_file": None, "svamp_sha256": SVAMP_SHA256, "val_file": None, "test_file": None, "threshold": 1.0,
            "batch_size": 32, "mult_prompt": "paper"}


def run_config(adapter: str | None) -> tuple[str | None, dict]:
    """The training run an adapter came from (RUN/best, RUN/final, RUN/checkpoints/step-N/adapter): its folder and
    config.json, or (None, {}) for an adapter from elsewhere."""
    folder = os.path.abspath(adapter) if adapter else None
    for _ in range(3 if folder else 0):
        folder = os.path.dirname(folder)
        path = os.path.join(folder, "config.json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    cfg = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(cfg, dict) and "algo" in cfg and "task" in cfg:
                return folder, cfg
    return None, {}


def parse_args(argv=None):
    p = ArgParser(description=__doc__.strip().splitlines()[0],
                  epilog="With --adapter from a training run (RUN/best, RUN/final, a checkpoint's adapter), the run's "
                         "task, model, digits, token limit, prompt, reward, dtype and batch size are the defaults; "
                         "a flag given here wins, and eval.py says where it differs from the run.")
    p.add_argument("--task", help="mult | svamp | FILE.jsonl (one {question, answer} per line); default: the run's")
    p.add_argument("--model", help="hub id, local folder, or .gguf file (default: the run's, else Qwen/Qwen2-1.5B)")
    p.add_argument("--adapter", help="a LoRA adapter folder (PEFT layout), e.g. runs/NAME/best")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--n", "--limit", dest="n", type=int,
                   help="evaluate only the first N problems of the split (under torchrun write --limit: "
                        "torchrun takes --n for one of its own flags)")
    p.add_argument("--batch-size", type=int,
                   help="problems decoded at once (default: the run's --eval-batch-size, else 32); in bfloat16 the "
                        "batch shape changes rounding")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--max-new-tokens", type=int, help="default: the run's, else 300")
    p.add_argument("--seed", type=int, default=0, help="sampling seed when --temperature > 0")
    p.add_argument("--out", help="write one JSON line per problem here")
    p.add_argument("--digits", help="mult operand sizes: 3x3, 2x1, or ranges like 11-99x2-9 (default: the run's, "
                                    "else 3x3)")
    p.add_argument("--mult-prompt", choices=["paper", "partial-products"],
                   help="mult: the paper's prompt, or one asking for the partial products (default: the run's)")
    p.add_argument("--svamp-file", help="a local SVAMP.json instead of the cached download")
    p.add_argument("--svamp-sha256", help="expected hash of the SVAMP file, or 'none'")
    p.add_argument("--val-file", help="FILE.jsonl task: validation problems (default: 10%% of the task file)")
    p.add_argument("--test-file", help="FILE.jsonl task: test problems (default: 20%% of the task file)")
    p.add_argument("--prompt-template", help="FILE.jsonl task: the prompt, with {question}")
    p.add_argument("--prompt-mode", choices=["plain", "chat"],
                   help="FILE.jsonl task: plain text, or the user message of the model's chat template")
    p.add_argument("--reward", help="MODULE:FUNCTION or path/to/file.py:FUNCTION (default: the paper's reward); "
                                    "a problem counts as correct when its reward reaches --threshold")
    p.add_argument("--threshold", type=float, help="reward that counts as correct (default: the run's, else 1.0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"],
                   help="default: the run's, else float32; auto: bfloat16 where measured >= 1.2x faster than "
                        "float32 here (always on a GPU)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when present)")
    p.add_argument("--cpu-kernels", choices=["auto", "torch", "fast"],
                   help="CPU only: auto (faster kernels where measured faster here) | torch | fast "
                        "(default: $TINYRL_CPU_KERNELS, else auto)")
    args = p.parse_args(argv)
    args.run, cfg = run_config(args.adapter)
    args.notes = []
    for name, field in FOLLOWED.items():
        given, theirs = getattr(args, name), cfg.get(field, DEFAULTS[name])
        if given is None:
            setattr(args, name, theirs if field in cfg else DEFAULTS[name])
        elif field in cfg and given != theirs:
            args.notes.append(f"--{name.replace('_', '-')} {given} (the run had {theirs})")
    if args.task is None:
        p.error("--task is required (mult, svamp or a FILE.jsonl) unless --adapter comes from a training run")
    for name in ("n", "batch_size", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    if args.task not in ("mult", "svamp") and not args.task.endswith(".jsonl"):
        p.error(f"--task must be mult, svamp or a FILE.jsonl, got {args.task!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run:
        print(f"following the run {args.run}: --task {args.task} --digits {args.digits} --model {args.model} "
              f"--dtype {args.dtype} --max-new-tokens {args.max_new_tokens}"
              + (f"; differs from the run: {', '.join(args.notes)}" if args.notes else ""))
    cpu.set_mode(args.cpu_kernels)
    if args.out and os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder; give a file name such as results.jsonl")
    sha256 = None if args.svamp_sha256.lower() == "none" else args.svamp_sha256
    check_task(args.task, args.digits, args.svamp_file, sha256, args.val_file, args.test_file, args.prompt_template,
               args.prompt_mode, args.reward, args.mult_prompt)
    check_model(args.model)
    if args.adapter:
        read_adapter_config(args.adapter)  # bad input fails above, before the model loads
    _, _, device = dist.setup(args.device)  # under torchrun the problems are split across ranks
    model, tokenizer = load_model(args.model, args.dtype, device)
    if args.adapter:
        load_adapter(model, args.adapter)
    task = load_task(args.task, tokenizer, args.digits, args.svamp_file, sha256, args.val_file, args.test_file,
                     args.prompt_template, args.prompt_mode, args.reward, args.mult_prompt)
    problems = getattr(task, args.split)[: args.n]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    eos = eos_ids(model, tokenizer)
    result = evaluate(model, tokenizer, problems, eos, pad_id(tokenizer, eos), args.batch_size,
                      args.max_new_tokens, args.temperature, generator, progress=dist.rank() == 0,
                      desc=f"{task.name} {args.split}", reward=task.reward, threshold=args.threshold)
    if dist.rank() != 0:
        return 0
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            for r in result["records"]:
                f.write(json.dumps(r) + "\n")
    lo, hi = result["ci95"]
    print(f"{task.name} {args.split}: accuracy {100 * result['accuracy']:.1f}% "
          f"({result['correct']}/{result['n']}, 95% CI {100 * lo:.1f}-{100 * hi:.1f}%)  "
          f"{result['tokens_per_s']:.1f} tokens/s over {result['seconds']:.1f}s; {result['cut']} cut at "
          f"--max-new-tokens {args.max_new_tokens}"
          + (f"  -> {args.out}" if args.out else ""))
    if cpu.is_cpu(model):
        print(f"CPU kernels: {cpu.describe(model)}")
    return 0


if __name__ == "__main__":
    run_main(main)
