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

from tinyrl import cpu, credit, dist
from tinyrl.checkpoint import (TensorBoard, append_jsonl, latest_checkpoint, load_checkpoint, publish_dir,
                               save_checkpoint, truncate_jsonl, write_json_atomic)
from tinyrl.cli import UserError, run_main
from tinyrl.config import Config, describe, parse_config
from tinyrl.evaluate import evaluate
from tinyrl.memory import cost_note
from tinyrl.lora import (adapter_digest, adapter_norms, inject_lora, load_adapter, lora_parameters, parse_targets,
                         save_adapter)
from tinyrl.model import check_model, eos_ids, load_model, pad_id
from tinyrl.objectives import PrefixTree, group_advantages, sgrpo_select
from tinyrl.replay import Episode, ReplayBuffer, replay_rewards
from tinyrl.sampling import sample
from tinyrl.tasks import TrainStream, check_task, load_task, rng_state, set_rng_state
from tinyrl.update import grpo_backward, l2_gradient, make_optimizer, tspmo_backward


class StopFlag:
    """SIGINT or SIGTERM. Before the loop (loading, set-up) there is nothing to save: exit at once. In the
    loop: finish the step, save and exit 0; a second SIGINT quits at once."""

    def __init__(self):
        self.requested = self.armed = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if not self.armed:
            sys.stderr.write(f"\n{signal.Signals(signum).name} before training started: nothing to save, exiting\n")
            raise SystemExit(128 + signum)
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


class Trainer:
    """Everything one run holds: the model and its optimizer, the task, every random stream, the replay
    buffer, the run directory. The loop in `train` calls its methods, one per phase of a step."""

    def __init__(self, cfg: Config, resume: str | None):
        self.cfg, self.run = cfg, cfg.out
        self.rank, self.world = dist.rank(), dist.world()
        self.main_rank = self.rank == 0  # only rank 0 prints and writes
        self.say = print if self.main_rank else (lambda *a, **k: None)
        if not resume and os.path.isdir(self.run) and os.listdir(self.run):
            raise UserError(f"run directory {self.run} already exists; continue it with --resume {self.run} "
                            f"or pick another --out")
        dist.barrier()  # every rank has checked before rank 0 creates the directory
        check_task(cfg.task, cfg.digits, cfg.svamp_file, None if cfg.svamp_sha256.lower() == "none" else
                   cfg.svamp_sha256, cfg.val_file, cfg.test_file, cfg.prompt_template, cfg.prompt_mode, cfg.reward,
                   cfg.mult_prompt)
        check_model(cfg.model)  # bad input fails above, in a second, before the model loads
        self.say(f"tinyrl: {cfg.algo} on {cfg.task}, run directory {self.run}"
                 + (f", {self.world} ranks ({cfg.parallel}-parallel)" if self.world > 1 else "") + f"\n{describe(cfg)}")
        self.say(cost_note(cfg) or "", end="")

        self.model, self.tokenizer = load_model(cfg.model, cfg.dtype, cfg.device)
        cfg.dtype = str(self.model.dtype).removeprefix("torch.")  # auto: what was measured faster; a resume keeps it
        self.device = next(self.model.parameters()).device
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # LoRA's A init
        wrapped = inject_lora(self.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_fraction,
                              parse_targets(cfg.lora_targets))
        self.params = lora_parameters(self.model)
        # lam acts in the loss (l2_gradient, each step) or as AdamW's decoupled decay; beta is in the loss
        self.optimizer, self.lam_in_loss = make_optimizer(self.params, cfg.lr, cfg.lam, cfg.lam_mode)
        self.task = load_task(cfg.task, self.tokenizer, cfg.digits, cfg.svamp_file,
                              None if cfg.svamp_sha256.lower() == "none" else cfg.svamp_sha256, cfg.val_file,
                              cfg.test_file, cfg.prompt_template, cfg.prompt_mode, cfg.reward, cfg.mult_prompt)
        self.eos = eos_ids(self.model, self.tokenizer)
        self.pad = pad_id(self.tokenizer, self.eos)
        n_train = "unlimited draws" if callable(self.task.train) else len(self.task.train)
        val, test = self.task.val, self.task.test
        n_test = "none" if cfg.test_n == 0 else f"{len(test[: cfg.test_n])} of {len(test)}"
        self.say(f"  device {self.device}; LoRA on {len(wrapped)} modules of layers "
                 f"{sorted({int(n.split('.')[2]) for n in wrapped})}; {sum(p.numel() for p in self.params):,} "
                 f"trainable weights; {self.task.name}: train {n_train}, val "
                 f"{f'{len(val[: cfg.eval_n])} of {len(val)}' if cfg.eval_every else 'none'}, test {n_test}; "
                 f"EOS ids {self.eos}")

        # every random stream is its own and is saved in each checkpoint, so a resumed run repeats exactly;
        # the others are the same on every rank, the sampler's is per rank
        self.sampler_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1000 * self.rank)
        self.select_gen = torch.Generator().manual_seed(cfg.seed + 1)  # S-GRPO's token selection (Algorithm 1)
        self.stream = TrainStream(self.task, cfg.seed + 2)
        self.replay = ReplayBuffer(cfg.replay_capacity, cfg.replay_threshold, cfg.seed + 3)
        self.state = {"step": 0, "best_val": None, "best_step": None, "bad_steps": 0, "skipped_steps": 0}
        ckpt = latest_checkpoint(self.run) if resume else None
        if ckpt:
            self.restore(ckpt)
        self.metrics_path = os.path.join(self.run, "metrics.jsonl")
        self.samples_path = os.path.join(self.run, "samples.jsonl")
        last_logged = self.state["step"] if ckpt else -1  # no checkpoint: start over, step-0 eval included
        self.board = TensorBoard(self.run, last_logged) if cfg.report_to == "tensorboard" and self.main_rank else None
        if self.main_rank:
            os.makedirs(self.run, exist_ok=True)
            write_json_atomic(os.path.join(self.run, "config.json"), vars(cfg))
            truncate_jsonl(self.metrics_path, last_logged)
            truncate_jsonl(self.samples_path, last_logged)
            credit.truncate(self.run, last_logged)
        # group-parallel: the ranks share one prompt's |G| completions and each backpropagates its shard of the
        # loss; prompt-parallel: each rank takes its own prompt and the whole group (an effective batch of `world`)
        self.group_parallel = cfg.parallel == "group"
        self.shard = (self.rank, self.world) if self.group_parallel else (0, 1)
        self.scale = 1 / (cfg.batch_size * (1 if self.group_parallel else self.world))
        self.score_t = cfg.temperature if cfg.score_temperature else 1.0  # the update's log pi: logits / score_t

    def restore(self, ckpt: str) -> None:
        saved, rng = load_checkpoint(ckpt, self.model, self.optimizer)
        self.state = saved["trainer"]
        if f"sampler.{self.rank}" in rng:
            self.sampler_gen.set_state(rng[f"sampler.{self.rank}"])
        else:  # resumed with more ranks than the run had: a fresh stream for this rank
            self.sampler_gen.manual_seed(self.cfg.seed + 1000 * self.rank + self.state["step"])
        self.select_gen.set_state(rng["select"])
        torch.set_rng_state(rng["torch"])
        set_rng_state(random, saved["python_rng"])
        self.stream.load_state_dict(saved["stream"])
        self.replay.load_state_dict(saved["replay"])
        cpu.adopt(self.model, self.state.get("cpu_kernels", {}))  # the kernels it measured, so sums stay in order
        self.say(f"  resumed from {ckpt} at step {self.state['step']}")

    def checkpoint(self, step: int) -> None:
        samplers = dist.gather([self.sampler_gen.get_state().cpu()])  # every rank's stream, saved by rank 0
        self.state["cpu_kernels"] = cpu.decisions(self.model)
        if self.main_rank:
            save_checkpoint(self.run, step, self.model, self.optimizer, {
                "trainer": self.state, "python_rng": rng_state(random), "stream": self.stream.state_dict(),
                "replay": self.replay.state_dict()}, {**{f"sampler.{r}": g for r, g in enumerate(samplers)},
                                                      "select": self.select_gen.get_state(),
                                                      "torch": torch.get_rng_state()},
                self.cfg.keep, self.cfg.model)
        dist.barrier()

    def evaluate(self, problems, desc: str) -> dict:
        return evaluate(self.model, self.tokenizer, problems, self.eos, self.pad, self.cfg.eval_batch_size,
                        self.cfg.max_new_tokens, progress=sys.stderr.isatty() and self.main_rank, desc=desc,
                        reward=self.task.reward, threshold=self.cfg.replay_threshold)

    def validate(self, step: int) -> dict:
        """Validation accuracy; a new best saves the adapter to best/."""
        result = self.evaluate(self.task.val[: self.cfg.eval_n], f"val @ step {step}")
        if self.state["best_val"] is None or result["accuracy"] > self.state["best_val"]:
            self.state["best_val"], self.state["best_step"] = result["accuracy"], step
            if self.main_rank:
                save_adapter(self.model, os.path.join(self.run, ".tmp-best"), self.cfg.model)
                publish_dir(os.path.join(self.run, ".tmp-best"), os.path.join(self.run, "best"))
        return {"val_accuracy": result["accuracy"], "val_ci95": [round(x, 4) for x in result["ci95"]],
                "val_n": result["n"], "sec_eval": round(result["seconds"], 3)}

    def sample(self, prompt_ids: list[int], n: int, max_new_tokens: int, split: bool) -> list[list[int]]:
        """n completions of one prompt; with split, each rank samples its share and all ranks get all of them."""
        cfg = self.cfg
        if not split:
            return sample(self.model, prompt_ids, n, max_new_tokens, cfg.temperature, self.eos, self.sampler_gen,
                          cfg.chunk_size, cfg.static_cache)
        mine = sample(self.model, prompt_ids, dist.share(n, self.rank, self.world), max_new_tokens, cfg.temperature,
                      self.eos, self.sampler_gen, cfg.chunk_size, cfg.static_cache)
        return dist.gather(mine)

    def tspmo_update(self, prompt_ids, completions, rewards, shard, scale, about: dict) -> dict:
        """T-SPMO: advantages A(v|p) from the prefix tree (Eq. 7-9), then Eq. (10) backpropagated. The tree's
        completions, rewards and credited pairs join this step's records (`tinyrl.credit`), with `about` it."""
        tree, pairs = PrefixTree(completions, rewards), []
        stats = tspmo_backward(self.model, prompt_ids, completions, tree, self.pad, self.cfg.log_prob,
                               self.cfg.max_batch_tokens, scale=scale, shard=shard, pairs=pairs,
                               temperature=self.score_t)
        mine = dist.gather(pairs) if shard[1] > 1 else pairs  # split over ranks: each computed its share of pairs
        self.trees.append({**about, "completions": completions, "rewards": rewards, "pairs": mine})
        return stats

    def grpo_update(self, prompt_ids, completions, rewards) -> dict:
        """GRPO (every token) or S-GRPO (Algorithm 1's subset): group advantages (Eq. 2), Eq. (3)/(5) backpropagated."""
        cfg = self.cfg
        advantages = group_advantages(torch.tensor(rewards))
        positions = [list(range(len(c))) if cfg.algo == "grpo" else sgrpo_select(len(c), cfg.alpha, cfg.k, cfg.p,
                                                                                 self.select_gen)
                     for c in completions]
        return grpo_backward(self.model, prompt_ids, completions, advantages, positions, cfg.beta, self.pad,
                             cfg.clip_eps, cfg.max_batch_tokens, scale=self.scale, shard=self.shard,
                             temperature=self.score_t)

    def optimizer_step(self, loss: float) -> tuple[bool, dict]:
        """Sum the ranks' gradients (each loss carries the global 1/|G| or 1/|U|), add the L2 term's gradient under
        --lam-mode loss, then step unless non-finite. Returns that and the loss, gradient norms for the log."""
        dist.all_reduce_grads(self.params)
        norms = l2_gradient(self.params, self.lam_in_loss)
        loss += norms.pop("l2_loss")
        return finite_step(self.optimizer, self.params, loss), {"loss": loss, **norms}

    def replay_updates(self, draws: list[tuple[Episode, int]]) -> tuple[bool, dict]:
        """T-SPMO replay (paper §III-C): extra updates on fresh continuations below a kept prefix of a past
        completion, one per (episode, cut) drawn. Returns whether all were finite, and their log fields."""
        scores, norms, pairs, tokens, ok = [], [], 0, 0, True
        for episode, m in draws:
            kept = episode.completion_ids[:m]
            prefix = episode.prompt_ids + kept
            # our choice (paper silent): kept part + continuation stay within max_new_tokens
            continuations = self.sample(prefix, self.cfg.group_size, self.cfg.max_new_tokens - m, split=True)
            rewards = replay_rewards(self.tokenizer, kept, continuations, episode.answer, self.task.reward,
                                     episode.problem)
            stats = self.tspmo_update(prefix, continuations, rewards, (self.rank, self.world), 1.0, {
                "kind": "replay", "problem": episode.problem, "answer": episode.answer,
                "prompt_ids": episode.prompt_ids, "source": episode.completion_ids,
                "source_reward": episode.reward, "cut": m})
            step_ok, step_norms = self.optimizer_step(dist.total(stats["loss"]))
            ok, scores, norms = ok and step_ok, scores + rewards, norms + [step_norms["grad_norm"]]
            pairs += dist.total(stats["nonzero_pairs"])
            tokens += sum(map(len, continuations))
        return ok, {"replay_updates": len(norms), "replay_reward_mean": sum(scores) / len(scores) if scores else None,
                    "replay_grad_norm": sum(norms) / len(norms) if norms else None,  # objective's, as grad_norm
                    "replay_nonzero_pairs": pairs, "replay_tokens": tokens}

    def step(self, step: int) -> tuple[dict, list[dict]]:
        """One optimizer step (plus T-SPMO's replay updates): returns its metrics line and two samples per prompt."""
        cfg, device, group_parallel = self.cfg, self.device, self.group_parallel
        sec = dict.fromkeys(("sample", "reward", "loss", "optim", "replay"), 0.0)
        totals: dict = {}
        rewards_seen, samples, self.trees, alike = [], [], [], 0
        for _ in range(cfg.batch_size):  # gradient accumulation over prompts (Table IV); paper: 1
            problems = [self.stream.next() for _ in range(1 if group_parallel else self.world)]  # same on every rank
            problem = problems[0 if group_parallel else self.rank]
            t0 = clock(device)
            completions = self.sample(problem.prompt_ids, cfg.group_size, cfg.max_new_tokens, split=group_parallel)
            t1 = clock(device)
            texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
            rewards = [self.task.reward(text, problem.answer, problem.id) for text in texts]
            t2 = clock(device)
            if cfg.algo == "tspmo":
                stats = self.tspmo_update(problem.prompt_ids, completions, rewards, self.shard, self.scale, {
                    "kind": "fresh", "problem": problem.id, "answer": problem.answer, "prompt_ids": problem.prompt_ids})
                episodes = [Episode(problem.prompt_ids, c, r, problem.answer, problem.id)
                            for c, r in zip(completions, rewards)]
                for episode in episodes if group_parallel else dist.gather(episodes):  # same buffer on every rank
                    self.replay.add(episode)
            else:
                stats = self.grpo_update(problem.prompt_ids, completions, rewards)
            t3 = clock(device)
            sec["sample"] += t1 - t0
            sec["reward"] += t2 - t1
            sec["loss"] += t3 - t2
            for key, value in stats.items():
                totals[key] = totals.get(key, 0) + value
            rewards_seen += rewards if group_parallel else dist.gather(rewards)
            alike += len(set(rewards)) == 1  # every completion scored alike: no reward signal in this group
            samples += [{"step": step, "problem": problem.id, "answer": problem.answer, "completion": text,
                         "reward": r} for text, r in list(zip(texts, rewards))[:2]]
            totals["completion_tokens"] = totals.get("completion_tokens", 0) + sum(map(len, completions))

        additive = ("loss", "kl", "tokens_in_loss", "forward_tokens", "forward_passes", "nonzero_pairs") + \
            (() if group_parallel else ("num_pairs", "completion_tokens"))  # in group mode every rank holds all
        totals.update({k: dist.total(v) for k, v in totals.items() if k in additive})
        t4 = clock(device)
        ok, norms = self.optimizer_step(totals["loss"])  # a non-finite update is dropped
        sec["optim"] = clock(device) - t4
        replay = {}
        if cfg.algo == "tspmo":
            t5 = clock(device)
            # no replay after a dropped update; its log columns are written all the same
            draws = dist.broadcast(self.replay.draw(cfg.replay_success, cfg.replay_failure)) if ok else []
            replay_ok, replay = self.replay_updates(draws)
            ok = ok and replay_ok
            sec["replay"] = clock(device) - t5
            if not group_parallel:  # each rank built its own prompt's fresh tree: rank 0 records them all
                self.trees = dist.gather([t for t in self.trees if t["kind"] == "fresh"]) + \
                    [t for t in self.trees if t["kind"] == "replay"]
            replay.update(credit.columns(self.trees, self.tokenizer))  # where this step's credit sits
            if cfg.record_trees and self.main_rank:
                credit.save(self.run, step, self.trees)

        self.state["bad_steps"] = 0 if ok else self.state["bad_steps"] + 1
        self.state["skipped_steps"] += not ok
        self.state["step"] = step
        n = len(rewards_seen)
        line = {
            "step": step, "reward_mean": sum(rewards_seen) / n,
            "accuracy": sum(r >= cfg.replay_threshold for r in rewards_seen) / n,
            **norms, "tokens_in_loss": totals["tokens_in_loss"],
            "forward_tokens": totals["forward_tokens"], "forward_passes": totals["forward_passes"],
            "completion_len": totals["completion_tokens"] / n,
            "groups_alike": alike if group_parallel else int(dist.total(alike)),
            "sampled_tokens": totals["completion_tokens"] + replay.pop("replay_tokens", 0),
            **({"kl": totals["kl"] / cfg.batch_size / (1 if group_parallel else self.world)} if "kl" in totals else {}),
            **({"num_pairs": totals["num_pairs"], "nonzero_pairs": totals["nonzero_pairs"], **replay}
               if cfg.algo == "tspmo" else {}),
            **adapter_norms(self.model), "skipped": not ok, **{f"sec_{k}": round(v, 4) for k, v in sec.items()},
            "peak_mem_mb": round(peak_memory_mb(device), 1),
        }
        return line, samples

    def log(self, line: dict, samples: list[dict] = ()) -> None:
        if self.main_rank:
            append_jsonl(self.metrics_path, [line])
            append_jsonl(self.samples_path, list(samples))
            if self.board:
                self.board.log(line)

    def finish(self) -> None:
        """Save the final adapter; evaluate the best-validation adapter on the test split."""
        cfg, state = self.cfg, self.state
        if self.main_rank:
            save_adapter(self.model, os.path.join(self.run, "final"), cfg.model)
        final = {"adapter": "final", "steps": cfg.steps, "best_step": state["best_step"],
                 "best_val": state["best_val"], "skipped_steps": state["skipped_steps"],
                 "adapter_sha256_per_rank": dist.gather([adapter_digest(self.model)]),  # equal unless ranks diverged
                 "cpu_kernels": cpu.decisions(self.model)}
        if cfg.test_n != 0:
            if state["best_step"] is not None:
                dist.barrier()  # rank 0 has written best/
                load_adapter(self.model, os.path.join(self.run, "best"))  # the paper reports its best checkpoint
                final["adapter"] = "best"
            result = self.evaluate(self.task.test[: cfg.test_n], "test")
            records = result.pop("records")
            final.update(split="test", **result)
            if self.main_rank:
                with open(os.path.join(self.run, "test_results.jsonl"), "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
            lo, hi = result["ci95"]
            self.say(f"test accuracy ({final['adapter']} adapter): {100 * result['accuracy']:.1f}% "
                     f"({result['correct']}/{result['n']}, 95% CI {100 * lo:.1f}-{100 * hi:.1f}%)")
        if self.main_rank:
            write_json_atomic(os.path.join(self.run, "final_eval.json"), final)
            if self.board:
                self.board.close()
            shutil.rmtree(os.path.join(self.run, ".tmp-best"), ignore_errors=True)
        self.say(f"done: {self.run} (plot it with: python -m tinyrl.plot {self.run})")


def percent(line: dict) -> str:
    """A validation accuracy as the console prints every accuracy: percent, with the counts."""
    n = line["val_n"]
    return f"{100 * line['val_accuracy']:.1f}% ({round(line['val_accuracy'] * n)}/{n})"


def train(cfg: Config, resume: str | None, stop: StopFlag) -> int:
    """The whole run: set-up, the loop, the final test evaluation. Returns the exit code."""
    from tqdm.auto import tqdm

    t = Trainer(cfg, resume)
    if t.state["step"] == 0 and cfg.eval_every:
        base = t.validate(0)  # the base model's accuracy starts the curve
        t.log({"step": 0, **base})
        t.say(f"step 0 (the base model) val {percent(base)}", flush=True)
    stop.armed = True  # from here a signal finishes the step and saves
    recent: list[float] = []
    bar = tqdm(range(t.state["step"] + 1, cfg.steps + 1), initial=t.state["step"], total=cfg.steps, desc=cfg.algo,
               dynamic_ncols=True, disable=not sys.stderr.isatty())
    for step in bar:
        if t.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(t.device)
        line, samples = t.step(step)  # sample -> reward -> advantages -> loss -> backward -> step (-> replay)
        if cfg.eval_every and step % cfg.eval_every == 0:
            line.update(t.validate(step))
        t.log(line, samples)
        if step == 1 and cpu.is_cpu(t.model):
            t.say(f"  CPU kernels: {cpu.describe(t.model)}")
        recent = (recent + [line["reward_mean"]])[-20:]
        bar.set_postfix(reward=f"{sum(recent) / len(recent):.3f}", val="-" if t.state["best_val"] is None
                        else f"{100 * line.get('val_accuracy', t.state['best_val']):.1f}%")
        if not sys.stderr.isatty():
            t.say(f"step {step}/{cfg.steps} reward {line['reward_mean']:.3f} loss {line['loss']:.4g}"
                  + (" (every completion scored alike: no reward signal)" if line["groups_alike"] == cfg.batch_size
                     * (1 if t.group_parallel else t.world) else "")
                  + (f" val {percent(line)}" if "val_accuracy" in line else ""), flush=True)

        too_bad = t.state["bad_steps"] >= cfg.max_bad_steps  # the same on every rank: it follows all-reduced values
        stopping = dist.any_rank(stop.requested)  # all ranks stop after the same step
        if step % cfg.save_every == 0 or step == cfg.steps or stopping or too_bad:
            t.checkpoint(step)
        if too_bad:
            t.say(f"stopping: {t.state['bad_steps']} updates in a row had a NaN/inf loss or gradient; "
                  f"checkpoint saved. Lower --lr, or check the model with eval.py", file=sys.stderr)
            return 3
        if stopping:
            t.say(f"stopped after step {step}; resume with: python train.py --resume {t.run}")
            return 0
    bar.close()
    t.finish()
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg, resume = parse_config(argv)
    cpu.set_mode(cfg.cpu_kernels)
    _, _, cfg.device = dist.setup(cfg.device)  # torchrun: one process per GPU (or CPU rank); else a no-op
    stop = StopFlag()
    try:
        return train(cfg, resume, stop)
    finally:
        stop.restore()


if __name__ == "__main__":
    run_main(main, oom_hint="--chunk-size (sampling) or --max-batch-tokens (update)")
