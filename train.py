"""Train a LoRA policy with GRPO, S-GRPO or T-SPMO (Lee & Tong, arXiv:2504.20834).

    python train.py --algo tspmo --task mult     # the paper's preset; every config field is a flag
    python train.py --resume runs/NAME           # continue a stopped run exactly where it stopped

One visible loop: sample -> reward -> advantages -> loss -> step -> log -> checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time

import torch

from tinyrl import dist
from tinyrl.checkpoint import (append_jsonl, latest_checkpoint, load_checkpoint, publish_dir, save_checkpoint,
                               truncate_jsonl, write_json_atomic)
from tinyrl.cli import UserError, run_main
from tinyrl.config import Config, describe, parse_config
from tinyrl.evaluate import evaluate
from tinyrl.lora import adapter_digest, inject_lora, load_adapter, lora_parameters, save_adapter
from tinyrl.model import eos_ids, load_model, pad_id
from tinyrl.objectives import PrefixTree, group_advantages, sgrpo_select
from tinyrl.replay import Episode, ReplayBuffer, replay_rewards
from tinyrl.sampling import sample
from tinyrl.tasks import TrainStream, load_task, reward, rng_state, set_rng_state
from tinyrl.update import grpo_backward, tspmo_backward


class StopFlag:
    """SIGINT or SIGTERM asks the loop to finish its step, save and exit 0; a second SIGINT quits at once."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            sys.stderr.write("\nsecond interrupt: quitting now; the last checkpoint is intact\n")
            os._exit(130)
        self.requested = True
        sys.stderr.write("\nstopping after this step (Ctrl-C again to quit at once)\n")


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # so each phase's seconds are its own
    return time.perf_counter()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def finite_step(optimizer, params, loss: float) -> bool:
    """optimizer.step() unless the loss or a gradient is NaN/inf; then the update is dropped."""
    ok = math.isfinite(loss) and all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ok


def train(cfg: Config, resume: str | None, stop: StopFlag) -> int:
    """The whole run: set-up, the loop, the final test evaluation. Returns the exit code."""
    run = cfg.out
    rank, world = dist.rank(), dist.world()
    main_rank = rank == 0  # only rank 0 prints and writes
    say = print if main_rank else (lambda *a, **k: None)
    if not resume and os.path.isdir(run) and os.listdir(run):
        raise UserError(f"run directory {run} already exists; continue it with --resume {run} or pick another --out")
    dist.barrier()  # every rank has checked before rank 0 creates the directory
    say(f"tinyrl: {cfg.algo} on {cfg.task}, run directory {run}" + (f", {world} ranks ({cfg.parallel}-parallel)"
                                                                     if world > 1 else "") + f"\n{describe(cfg)}")

    model, tokenizer = load_model(cfg.model, cfg.dtype, cfg.device)
    device = next(model.parameters()).device
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # LoRA's A init
    wrapped = inject_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_fraction)
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # SPEC §6: regularise with beta/lam only
    task = load_task(cfg.task, tokenizer, cfg.digits, cfg.svamp_file,
                     None if cfg.svamp_sha256.lower() == "none" else cfg.svamp_sha256)
    eos = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer, eos)
    n_train = "unlimited draws" if callable(task.train) else len(task.train)
    say(f"  device {device}; LoRA on {len(wrapped)} modules of layers "
          f"{sorted({int(n.split('.')[2]) for n in wrapped})}; {sum(p.numel() for p in params):,} trainable weights; "
          f"{task.name}: train {n_train}, val {len(task.val)}, test {len(task.test)}; EOS ids {eos}")

    # every random stream is its own and is saved in each checkpoint, so a resumed run repeats exactly;
    # the others are the same on every rank, the sampler's is per rank
    sampler_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * rank)
    select_gen = torch.Generator().manual_seed(cfg.seed + 1)  # S-GRPO's token selection (Algorithm 1)
    stream = TrainStream(task, cfg.seed + 2)
    replay = ReplayBuffer(cfg.replay_capacity, cfg.replay_threshold, cfg.seed + 3)
    state = {"step": 0, "best_val": None, "best_step": None, "bad_steps": 0, "skipped_steps": 0}

    ckpt = latest_checkpoint(run) if resume else None
    if ckpt:
        saved, rng = load_checkpoint(ckpt, model, optimizer)
        state = saved["trainer"]
        if f"sampler.{rank}" in rng:
            sampler_gen.set_state(rng[f"sampler.{rank}"])
        else:  # resumed with more ranks than the run had: a fresh stream for this rank
            sampler_gen.manual_seed(cfg.seed + 1000 * rank + state["step"])
        select_gen.set_state(rng["select"])
        torch.set_rng_state(rng["torch"])
        set_rng_state(random, saved["python_rng"])
        stream.load_state_dict(saved["stream"])
        replay.load_state_dict(saved["replay"])
        say(f"  resumed from {ckpt} at step {state['step']}")
    metrics_path, samples_path = os.path.join(run, "metrics.jsonl"), os.path.join(run, "samples.jsonl")
    if main_rank:
        os.makedirs(run, exist_ok=True)
        write_json_atomic(os.path.join(run, "config.json"), vars(cfg))
        last_logged = state["step"] if ckpt else -1  # without a checkpoint the run starts over, step-0 eval included
        truncate_jsonl(metrics_path, last_logged)
        truncate_jsonl(samples_path, last_logged)

    def checkpoint(step: int) -> None:
        samplers = dist.gather([sampler_gen.get_state().cpu()])  # every rank's stream, saved by rank 0
        if main_rank:
            save_checkpoint(run, step, model, optimizer, {
                "trainer": state, "python_rng": rng_state(random), "stream": stream.state_dict(),
                "replay": replay.state_dict()}, {**{f"sampler.{r}": g for r, g in enumerate(samplers)},
                                                 "select": select_gen.get_state(), "torch": torch.get_rng_state()},
                cfg.keep, cfg.model)
        dist.barrier()

    def validate(step: int) -> dict:
        result = evaluate(model, tokenizer, task.val[: cfg.eval_n], eos, pad, cfg.eval_batch_size,
                          cfg.max_new_tokens, progress=sys.stderr.isatty() and main_rank, desc=f"val @ step {step}")
        if state["best_val"] is None or result["accuracy"] > state["best_val"]:
            state["best_val"], state["best_step"] = result["accuracy"], step
            if main_rank:
                save_adapter(model, os.path.join(run, ".tmp-best"), cfg.model)
                publish_dir(os.path.join(run, ".tmp-best"), os.path.join(run, "best"))
        return {"val_accuracy": result["accuracy"], "val_ci95": [round(x, 4) for x in result["ci95"]],
                "val_n": result["n"], "sec_eval": round(result["seconds"], 3)}

    if state["step"] == 0 and cfg.eval_every:
        line = {"step": 0, **validate(0)}  # the base model's accuracy starts the curve
        if main_rank:
            append_jsonl(metrics_path, [line])

    # group-parallel: the ranks share one prompt's |G| completions and each backpropagates its shard of the loss;
    # prompt-parallel: each rank takes its own prompt and the whole group (an effective batch of `world`)
    group_parallel = cfg.parallel == "group"
    shard = (rank, world) if group_parallel else (0, 1)
    scale = 1 / (cfg.batch_size * (1 if group_parallel else world))

    def draw_group(prompt_ids: list[int], n: int, max_new_tokens: int, split: bool) -> list[list[int]]:
        """n completions of one prompt; with split, each rank samples its share and all ranks get all of them."""
        if not split:
            return sample(model, prompt_ids, n, max_new_tokens, cfg.temperature, eos, sampler_gen, cfg.chunk_size,
                          cfg.static_cache)
        mine = sample(model, prompt_ids, dist.share(n, rank, world), max_new_tokens, cfg.temperature, eos,
                      sampler_gen, cfg.chunk_size, cfg.static_cache)
        return dist.gather(mine)

    def tspmo_update(prompt_ids, completions, rewards, shard, scale) -> dict:
        tree = PrefixTree(completions, rewards)  # advantages A(v|p), Eq. (7)-(9)
        return tspmo_backward(model, prompt_ids, completions, tree, cfg.lam, params, pad, cfg.log_prob,
                              cfg.max_batch_tokens, scale=scale, shard=shard)

    from tqdm.auto import tqdm

    recent: list[float] = []
    bar = tqdm(range(state["step"] + 1, cfg.steps + 1), initial=state["step"], total=cfg.steps, desc=cfg.algo,
               dynamic_ncols=True, disable=not sys.stderr.isatty())
    for step in bar:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        line: dict = {"step": step}
        sec = dict.fromkeys(("sample", "reward", "loss", "optim", "replay"), 0.0)
        totals: dict = {}
        rewards_seen, samples = [], []
        for _ in range(cfg.batch_size):  # gradient accumulation over prompts (Table IV); paper: 1
            problems = [stream.next() for _ in range(1 if group_parallel else world)]  # the same on every rank
            problem = problems[0 if group_parallel else rank]
            t0 = clock(device)
            completions = draw_group(problem.prompt_ids, cfg.group_size, cfg.max_new_tokens,  # 1. sample
                                     split=group_parallel)
            t1 = clock(device)
            texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
            rewards = [reward(text, problem.answer) for text in texts]  # 2. reward
            t2 = clock(device)
            if cfg.algo == "tspmo":  # 3. advantages and 4. loss -> backward
                stats = tspmo_update(problem.prompt_ids, completions, rewards, shard, scale)
                episodes = [Episode(problem.prompt_ids, c, r, problem.answer) for c, r in zip(completions, rewards)]
                for episode in episodes if group_parallel else dist.gather(episodes):  # the same buffer on every rank
                    replay.add(episode)
            else:
                advantages = group_advantages(torch.tensor(rewards))  # Eq. (2)
                positions = [list(range(len(c))) if cfg.algo == "grpo"
                             else sgrpo_select(len(c), cfg.alpha, cfg.k, cfg.p, select_gen) for c in completions]
                stats = grpo_backward(model, problem.prompt_ids, completions, advantages, positions, cfg.beta, pad,
                                      cfg.clip_eps, cfg.max_batch_tokens, scale=scale, shard=shard)
            t3 = clock(device)
            sec["sample"], sec["reward"], sec["loss"] = sec["sample"] + t1 - t0, sec["reward"] + t2 - t1, \
                sec["loss"] + t3 - t2
            for key, value in stats.items():
                totals[key] = totals.get(key, 0) + value
            rewards_seen += rewards if group_parallel else dist.gather(rewards)
            samples += [{"step": step, "problem": problem.id, "answer": problem.answer, "completion": text,
                         "reward": r} for text, r in list(zip(texts, rewards))[:2]]
            totals["completion_tokens"] = totals.get("completion_tokens", 0) + sum(map(len, completions))

        additive = ("loss", "kl", "tokens_in_loss", "forward_tokens", "forward_passes", "nonzero_pairs") + \
            (() if group_parallel else ("num_pairs",))  # in group mode every rank holds the same tree
        totals.update({k: dist.total(v) for k, v in totals.items() if k in additive})
        t4 = clock(device)
        dist.all_reduce_grads(params)  # each rank's loss carries the global 1/|G| or 1/|U|: sum, don't average
        ok = finite_step(optimizer, params, totals["loss"])  # 5. step (a non-finite update is dropped)
        sec["optim"] = clock(device) - t4

        replay_scores, replay_updates = [], 0
        if cfg.algo == "tspmo" and ok:  # replay: extra T-SPMO updates below a kept prefix (SPEC §5.4)
            t5 = clock(device)
            for episode, m in dist.broadcast(replay.draw(cfg.replay_success, cfg.replay_failure)):  # rank 0's draw
                kept = episode.completion_ids[:m]
                prefix = episode.prompt_ids + kept
                # our choice (paper silent): kept part + continuation stay within max_new_tokens
                continuations = draw_group(prefix, cfg.group_size, cfg.max_new_tokens - m, split=True)
                rewards = replay_rewards(tokenizer, kept, continuations, episode.answer)
                stats = tspmo_update(prefix, continuations, rewards, (rank, world), 1.0)
                dist.all_reduce_grads(params)
                ok = finite_step(optimizer, params, dist.total(stats["loss"])) and ok
                replay_scores += rewards
                replay_updates += 1
            sec["replay"] = clock(device) - t5

        state["bad_steps"] = 0 if ok else state["bad_steps"] + 1
        state["skipped_steps"] += not ok
        state["step"] = step
        recent = (recent + [sum(rewards_seen) / len(rewards_seen)])[-20:]
        line.update({  # 6. log
            "reward_mean": sum(rewards_seen) / len(rewards_seen),
            "accuracy": sum(r >= cfg.replay_threshold for r in rewards_seen) / len(rewards_seen),
            "loss": totals["loss"], "tokens_in_loss": totals["tokens_in_loss"],
            "forward_tokens": totals["forward_tokens"], "forward_passes": totals["forward_passes"],
            "completion_len": totals["completion_tokens"] / len(rewards_seen),
            **({"kl": totals["kl"] / cfg.batch_size / (1 if group_parallel else world)} if "kl" in totals else {}),
            **({"num_pairs": totals["num_pairs"], "nonzero_pairs": totals["nonzero_pairs"],
                "replay_updates": replay_updates,
                "replay_reward_mean": sum(replay_scores) / len(replay_scores) if replay_scores else None}
               if cfg.algo == "tspmo" else {}),
            "skipped": not ok, **{f"sec_{k}": round(v, 4) for k, v in sec.items()},
            "peak_mem_mb": round(peak_memory_mb(device), 1),
        })
        if cfg.eval_every and step % cfg.eval_every == 0:
            line.update(validate(step))
        if main_rank:
            append_jsonl(metrics_path, [line])
            append_jsonl(samples_path, samples)
        bar.set_postfix(reward=f"{sum(recent) / len(recent):.3f}",
                        val="-" if state["best_val"] is None else f"{line.get('val_accuracy', state['best_val']):.3f}")
        if not sys.stderr.isatty():
            say(f"step {step}/{cfg.steps} reward {line['reward_mean']:.3f} loss {line['loss']:.4g}"
                + (f" val {line['val_accuracy']:.3f}" if "val_accuracy" in line else ""), flush=True)

        too_bad = state["bad_steps"] >= cfg.max_bad_steps  # the same on every rank: it follows all-reduced values
        stopping = dist.any_rank(stop.requested)  # all ranks stop after the same step
        if step % cfg.save_every == 0 or step == cfg.steps or stopping or too_bad:
            checkpoint(step)  # 7. checkpoint
        if too_bad:
            say(f"stopping: {state['bad_steps']} updates in a row had a NaN/inf loss or gradient; "
                f"checkpoint saved. Lower --lr, or check the model with eval.py", file=sys.stderr)
            return 3
        if stopping:
            say(f"stopped after step {step}; resume with: python train.py --resume {run}")
            return 0
    bar.close()

    if main_rank:
        save_adapter(model, os.path.join(run, "final"), cfg.model)
    final = {"adapter": "final", "steps": cfg.steps, "best_step": state["best_step"], "best_val": state["best_val"],
             "skipped_steps": state["skipped_steps"],
             "adapter_sha256_per_rank": dist.gather([adapter_digest(model)])}  # equal unless the ranks diverged
    if cfg.test_n != 0:
        if state["best_step"] is not None:
            dist.barrier()  # rank 0 has written best/
            load_adapter(model, os.path.join(run, "best"))  # the paper reports its best-validation checkpoint
            final["adapter"] = "best"
        result = evaluate(model, tokenizer, task.test[: cfg.test_n], eos, pad, cfg.eval_batch_size,
                          cfg.max_new_tokens, progress=sys.stderr.isatty() and main_rank, desc="test")
        records = result.pop("records")
        final.update(split="test", **result)
        if main_rank:
            with open(os.path.join(run, "test_results.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        lo, hi = result["ci95"]
        say(f"test accuracy ({final['adapter']} adapter): {100 * result['accuracy']:.1f}% "
            f"({result['correct']}/{result['n']}, 95% CI {100 * lo:.1f}-{100 * hi:.1f}%)")
    if main_rank:
        write_json_atomic(os.path.join(run, "final_eval.json"), final)
        shutil.rmtree(os.path.join(run, ".tmp-best"), ignore_errors=True)
    say(f"done: {run} (plot it with: python -m tinyrl.plot {run})")
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg, resume = parse_config(argv)
    _, _, cfg.device = dist.setup(cfg.device)  # torchrun: one process per GPU (or CPU rank); else a no-op
    stop = StopFlag()
    try:
        return train(cfg, resume, stop)
    finally:
        stop.restore()


if __name__ == "__main__":
    run_main(main, oom_hint="--chunk-size (sampling) or --max-batch-tokens (update)")
