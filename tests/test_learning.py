"""End-to-end learning: train.py's own loop raises a tiny model's reward under each objective on CPU.

The toy task asks for the integer that the random tiny model already writes most often (a few
percent of samples); the reward is the paper's (last integer == answer). A rise from that base rate
to several times it within a few hundred steps shows that the signs and the plumbing are right.
"""
import json

import pytest

import train
from tinyrl.tasks import Task

# toy settings: a high lr and temperature 1 so that a few hundred tiny steps suffice
SETTINGS = {
    "grpo": ["--group-size", "8", "--steps", "300"],
    "sgrpo": ["--group-size", "8", "--steps", "300", "--alpha", "1", "--k", "2", "--p", "0.5"],
    # lam 0: at a toy lr of 3e-2, Adam turns the pure 2·lam·A gradient (B = 0 at init, so A gets no
    # policy gradient yet) into steps of size lr that zero LoRA's A within a few steps; the lam term has
    # its own test in test_update.py. Completions of 2 tokens: at temperature 1 the 32 samples share
    # no prefixes, so the tree credits only the first token, which must then decide the answer.
    "tspmo": ["--group-size", "32", "--steps", "150", "--lam", "0"],
}


@pytest.mark.parametrize("algo", ["grpo", "sgrpo", "tspmo"])
@pytest.mark.parametrize("seed", [0])
def test_reward_rises(toy, algo, seed, tmp_path, monkeypatch):
    path, problem, base_rate = toy
    monkeypatch.setattr(train, "load_task", lambda *a, **k: Task("toy", lambda rng: problem, [problem], [problem]))
    code = train.main(["--algo", algo, "--model", path, "--out", str(tmp_path / "run"), "--lr", "3e-2",
                       "--temperature", "1.0", "--max-new-tokens", "2", "--lora-fraction", "1.0",
                       "--eval-every", "0", "--test-n", "0", "--save-every", "1000", "--seed", str(seed),
                       *SETTINGS[algo]])
    assert code == 0
    rewards = [json.loads(line)["reward_mean"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    last = sum(rewards[-len(rewards) // 5:]) / (len(rewards) // 5)
    print(f"{algo}: base rate {base_rate:.3f}, mean reward over the last fifth of training {last:.3f}")
    assert last > max(4 * base_rate, base_rate + 0.15)
