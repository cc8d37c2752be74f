"""One flat training config: a dataclass, the paper's presets per (algo, task), and flags that override them.

Fields left at None take the preset of their (algo, task) pair (paper §IV-A and the ablations;
docs/design.md); every field is a flag (`group_size` -> `--group-size`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

from tinyrl.cli import ArgParser, UserError
from tinyrl.lora import parse_targets
from tinyrl.tasks import PROMPT_TEMPLATE, SVAMP_SHA256


def F(default, help: str):  # noqa: N802 - a field with its one-line comment, which is also its --help
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # what to train
    algo: str = F("tspmo", "grpo | sgrpo | tspmo")
    task: str = F("mult", "mult | svamp | FILE.jsonl (your own problems; docs/training.md, 'Your own task')")
    model: str = F("Qwen/Qwen2-1.5B", "hub id, local folder or .gguf file (paper: Qwen2-1.5B)")
    digits: str = F("3x3", "mult operands: 3x3 (paper: 101..999), 2x1, or ranges like 11-99x2-9")
    mult_prompt: str = F("paper", "mult: paper (the paper's prompt) | partial-products (adds 'Write out each partial "
                                  "product, then add them.' to it; not the paper)")
    svamp_file: str | None = F(None, "local SVAMP.json instead of the cached download")
    svamp_sha256: str = F(SVAMP_SHA256, "expected sha256 of the SVAMP file, or 'none'")
    val_file: str | None = F(None, "FILE.jsonl task: validation problems (default: 10%% of the task file)")
    test_file: str | None = F(None, "FILE.jsonl task: test problems (default: 20%% of the task file)")
    prompt_template: str = F(PROMPT_TEMPLATE, "FILE.jsonl task: the prompt, with {question} (default: the paper's "
                                              "SVAMP prompt)")
    prompt_mode: str = F("plain", "FILE.jsonl task: plain (the template is the prompt, as for SVAMP) | chat (the "
                                  "template is the user message of the model's chat template, as for mult)")
    reward: str | None = F(None, "MODULE:FUNCTION or path/to/file.py:FUNCTION, R(completion, answer) -> float "
                                 "(default: the paper's, last integer == answer)")
    # LoRA
    lora_rank: int = F(None, "r (paper: 8 mult, 16 svamp)")
    lora_alpha: float | None = F(None, "LoRA alpha; default = rank, i.e. scaling 1 (paper silent; docs/design.md)")
    lora_fraction: float = F(None, "adapt the last fraction of layers (paper: 1/4 mult, 1/3 svamp)")
    lora_targets: str = F("q,v", "projections to adapt in those layers: any of q,k,v,o,gate,up,down, or all-linear "
                                 "(paper: q,v)")
    # sampling
    group_size: int = F(None, "|G| completions per prompt (paper: 8 GRPO/S-GRPO, 50 T-SPMO)")
    temperature: float = F(0.3, "sampling temperature (paper: 0.3)")
    max_new_tokens: int = F(300, "completion length limit (paper: 300)")
    score_temperature: bool = F(False, "score completions under the policy they were sampled from, softmax(logits / "
                                       "temperature), in every log-probability of the update (as TRL and verl); "
                                       "default: softmax(logits) (paper silent; docs/design.md)")
    # objectives
    alpha: int = F(None, "S-GRPO: the first alpha tokens always count (paper: 50 mult, 100 svamp)")
    k: int = F(None, "S-GRPO: at most k tokens count (paper: 100)")
    p: float = F(None, "S-GRPO: later tokens count with probability P (paper silent: 0.1; docs/design.md)")
    beta: float = F(None, "KL coefficient, GRPO/S-GRPO (paper: 0.01)")
    lam: float = F(None, "T-SPMO L2 coefficient on the LoRA weights (paper: 0.01)")
    # DEVIATION: Eq. (10) writes lam·Σ||W||² into the loss; the paper also names AdamW with lam = 0.01. Under Adam the
    # L2 term erases LoRA's A at lr 1e-4 before the objective moves it (measured, docs/design.md), so the default
    # reads lam as AdamW's decoupled weight decay; --lam-mode loss keeps Eq. (10) as written.
    lam_mode: str = F("decoupled", "how lam acts (paper silent): decoupled (AdamW weight decay lam on the LoRA "
                                   "weights; the reading that learned at the paper's lr, docs/design.md) | loss "
                                   "(lam·Σ||W||² in the loss, Eq. 10 as written)")
    clip_eps: float | None = F(None, "PPO epsilon-clip of the ratio; off by default (one update per group)")
    log_prob: bool = F(False, "T-SPMO: use log pi instead of pi in Eq. (10) (not the paper)")
    # replay (T-SPMO)
    replay_success: int = F(None, "C_success replays per step (paper: 1 mult, 0 svamp)")
    replay_failure: int = F(None, "C_failure replays per step (paper: 0)")
    replay_capacity: int = F(1000, "replay buffer size, FIFO (paper silent; docs/design.md)")
    replay_threshold: float = F(1.0, "r: a completion with R >= r is a success (paper silent; docs/design.md)")
    record_trees: bool = F(True, "T-SPMO: keep each update's prefix tree in RUN/trees/ (completions, rewards, the "
                                 "credited pairs' A and pi; a few KB a step) for python -m tinyrl.credit")
    # optimisation
    steps: int = F(None, "optimizer steps (paper: mult 350 T-SPMO, 450 S-GRPO/GRPO; svamp 400, 325)")
    lr: float = F(1e-4, "AdamW learning rate (paper: 1e-4); weight decay lam under --lam-mode decoupled, else 0")
    batch_size: int = F(1, "prompts per optimizer step, by gradient accumulation (paper: 1; Table IV: 8)")
    seed: int = F(0, "seed of every random stream")
    # evaluation and the run directory
    eval_every: int = F(25, "validation accuracy every N steps (0: never)")
    eval_n: int = F(200, "validation problems per evaluation")
    eval_batch_size: int = F(64, "prompts decoded together when evaluating")
    test_n: int | None = F(None, "test problems in the final evaluation (default: all; 0: skip)")
    out: str | None = F(None, "run directory (default: runs/ALGO-TASK-TIME)")
    save_every: int = F(50, "checkpoint every N steps")
    keep: int = F(3, "keep the last K checkpoints (plus best/)")
    max_bad_steps: int = F(5, "stop after this many consecutive non-finite updates")
    # memory and speed
    chunk_size: int | None = F(None, "sampler rows decoded at once (default: all |G|)")
    static_cache: bool = F(False, "sample with fixed shapes; on CUDA under torch.compile with CUDA graphs")
    parallel: str = F("group", "under torchrun: group (split one prompt's |G|) | prompts (a prompt per rank)")
    max_batch_tokens: int = F(8192, "token budget of one training forward pass")
    dtype: str = F("float32", "float32 (paper) | bfloat16 | float16 | auto (bfloat16 where measured >= 1.2x "
                              "faster here, else float32; config.json records the choice)")
    cpu_kernels: str | None = F(None, "CPU only: auto (use oneDNN linears / two-matmul decode attention where "
                                      "measured faster here) | torch | fast (default: $TINYRL_CPU_KERNELS, else auto)")
    device: str | None = F(None, "cpu, cuda, cuda:1, ... (default: CUDA when present)")
    report_to: str = F("none", "also log the metrics to: none | tensorboard (RUN_DIR/tensorboard; needs the "
                               "tensorboard package)")


def preset(algo: str, task: str) -> dict:
    """The paper's settings for one (algo, task) pair; a FILE.jsonl task takes SVAMP's (word problems)."""
    task = "mult" if task == "mult" else "svamp"
    lora = {"mult": {"lora_rank": 8, "lora_fraction": 0.25}, "svamp": {"lora_rank": 16, "lora_fraction": 1 / 3}}
    steps = {("tspmo", "mult"): 350, ("sgrpo", "mult"): 450, ("grpo", "mult"): 450,
             ("tspmo", "svamp"): 400, ("sgrpo", "svamp"): 325, ("grpo", "svamp"): 325}
    out = {**lora[task], "steps": steps[algo, task], "alpha": 0, "k": 0, "p": 0.0, "beta": 0.0, "lam": 0.0,
           "replay_success": 0, "replay_failure": 0}
    if algo in ("grpo", "sgrpo"):
        out.update(group_size=8, beta=0.01)
    if algo == "sgrpo":
        out.update(alpha=50 if task == "mult" else 100, k=100, p=0.1)  # Table III best; P = 0.1: our choice
    if algo == "tspmo":
        out.update(group_size=50, lam=0.01, replay_success=1 if task == "mult" else 0)  # Table V best
    return out


# fields that may change when a run resumes; the others define the run and must stay as they were (where the
# SVAMP file lives may change between machines; its sha256, what the file is, may not)
RESUMABLE = {"steps", "eval_every", "save_every", "keep", "device", "max_bad_steps", "test_n", "eval_batch_size",
             "out", "parallel", "cpu_kernels", "report_to", "record_trees", "svamp_file"}


def _check(cfg: Config) -> None:
    """Refuse values the maths cannot use, naming the flag and the value given."""
    rules = [
        ("task", cfg.task in ("mult", "svamp") or cfg.task.endswith(".jsonl"), "mult, svamp or a FILE.jsonl"),
        ("group_size", cfg.group_size >= 2, ">= 2 (advantages compare completions)"),
        ("lora_rank", cfg.lora_rank >= 1, ">= 1"),
        ("lora_fraction", 0 < cfg.lora_fraction <= 1, "in (0, 1]"),
        ("temperature", cfg.temperature >= 0, ">= 0"),
        ("temperature", cfg.temperature > 0 or not cfg.score_temperature, "> 0 with --score-temperature"),
        ("max_new_tokens", cfg.max_new_tokens >= 1, ">= 1"),
        ("steps", cfg.steps >= 1, ">= 1"),
        ("alpha", cfg.alpha >= 0, ">= 0"),
        ("k", cfg.k >= 0, ">= 0"),
        ("p", 0 <= cfg.p <= 1, "in [0, 1]"),
        ("beta", cfg.beta >= 0, ">= 0"),
        ("lam", cfg.lam >= 0, ">= 0"),
        ("lr", cfg.lr > 0, "> 0"),
        ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("replay_success", cfg.replay_success >= 0, ">= 0"),
        ("replay_failure", cfg.replay_failure >= 0, ">= 0"),
        ("replay_capacity", cfg.replay_capacity >= 1, ">= 1"),
        ("eval_every", cfg.eval_every >= 0, ">= 0"),
        ("eval_n", cfg.eval_n >= 1, ">= 1"),
        ("eval_batch_size", cfg.eval_batch_size >= 1, ">= 1"),
        ("test_n", cfg.test_n is None or cfg.test_n >= 0, ">= 0"),
        ("save_every", cfg.save_every >= 1, ">= 1"),
        ("keep", cfg.keep >= 1, ">= 1"),
        ("max_bad_steps", cfg.max_bad_steps >= 1, ">= 1"),
        ("chunk_size", cfg.chunk_size is None or cfg.chunk_size >= 1, ">= 1"),
        ("max_batch_tokens", cfg.max_batch_tokens >= 1, ">= 1"),
        ("clip_eps", cfg.clip_eps is None or cfg.clip_eps > 0, "> 0"),
    ]
    for name, ok, need in rules:
        if not ok:
            raise UserError(f"--{name.replace('_', '-')} must be {need}, got {getattr(cfg, name)}")
    parse_targets(cfg.lora_targets)


def _parser() -> ArgParser:
    p = ArgParser(description="Train a LoRA policy with GRPO, S-GRPO or T-SPMO.", argument_default=argparse.SUPPRESS)
    p.add_argument("--resume", help="continue the run in this directory")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
        choices = {"algo": ["grpo", "sgrpo", "tspmo"], "prompt_mode": ["plain", "chat"],
                   "report_to": ["none", "tensorboard"],
                   "dtype": ["float32", "bfloat16", "float16", "auto"], "parallel": ["group", "prompts"],
                   "cpu_kernels": ["auto", "torch", "fast"], "lam_mode": ["loss", "decoupled"],
                   "mult_prompt": ["paper", "partial-products"]}.get(f.name)
        p.add_argument(flag, type=kind, choices=choices, help=f.metadata["help"])
    return p


def parse_config(argv: list[str] | None = None) -> tuple[Config, str | None]:
    """Config from presets + flags, or from a run directory's config.json when --resume is given.

    Returns (config, resume_dir)."""
    given = vars(_parser().parse_args(argv))
    resume = given.pop("resume", None)
    if resume:
        path = os.path.join(resume, "config.json")
        if not os.path.isfile(path):
            raise UserError(f"--resume {resume}: no config.json there, so it is not a tinyrl run directory")
        try:
            with open(path) as f:
                saved = {"lam_mode": "loss", **json.load(f)}  # runs from before --lam-mode had lam in the loss
            Config(**saved)
        except (ValueError, TypeError) as e:
            raise UserError(f"--resume {resume}: config.json is damaged or from another version ({e})") from None
        differ = [f"--{k.replace('_', '-')} {given[k]} (run has {saved.get(k)})" for k in given
                  if k not in RESUMABLE and given[k] != saved.get(k)]
        if differ:
            raise UserError(f"--resume {resume}: these flags differ from the run's config: {', '.join(differ)}")
        cfg = Config(**{**saved, **given, "out": resume})
    else:
        cfg = Config(**given)
        for name, value in preset(cfg.algo, cfg.task).items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, value)
        if cfg.lora_alpha is None:
            cfg.lora_alpha = float(cfg.lora_rank)  # scaling 1 (our choice; docs/design.md)
        if cfg.out is None:
            cfg.out = os.path.join("runs", f"{cfg.algo}-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    _check(cfg)
    return cfg, resume


def describe(cfg: Config) -> str:
    """The fields that differ from the paper's preset (or, where the paper is silent, from tinyrl's default), one
    a line, each with what it would have been; config.json keeps every field."""
    fixed = ("model", "digits", "mult_prompt", "lora_targets", "temperature", "max_new_tokens", "lr", "batch_size",
             "dtype")  # the paper's for every pair
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    paper = {**{name: defaults[name] for name in fixed}, **preset(cfg.algo, cfg.task),
             "lora_alpha": float(cfg.lora_rank)}
    lines = []
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        shown = repr(value) if isinstance(value, str) and "\n" in value else value  # one field, one line
        if f.name in paper and paper[f.name] != value:
            lines.append(f"  {f.name:<17} = {shown}   (paper: {paper[f.name]})")
        elif f.name not in (*paper, "algo", "task", "out") and defaults[f.name] not in (None, value):  # header
            lines.append(f"  {f.name:<17} = {shown}   (default: {defaults[f.name]})")
    return "\n".join(lines or ["  the paper's settings for this algorithm and task"])
