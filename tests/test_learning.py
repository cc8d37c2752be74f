"""End-to-end learning: train.py's own loop raises a tiny model's reward under each objective on CPU.

The toy task asks for the integer that the random tiny model already writes most often (a few
percent of samples); the reward is the paper's (last integer == answer). A rise from that base rate
to several times it shows that the signs and the plumbing are right.

One seed's trajectory is not a test: another CPU sums in another order, draws part after a few
steps, and single runs of these settings ranged from 0.25 to 0.8 (a run with |G| = 8 could also
stall at the base rate for 200 steps). So each algorithm runs three seeds and the test asks the
mean over them to clear the bar, which the slowest single run seen (0.25) clears by a margin.
"""
import json

import pytest

import train
from tinyrl.tasks import Task

SEEDS = (0, 1, 2)
# toy settings: a high lr and temperature 1 so that a hundred-odd tiny steps suffice; |G| = 16 so that a
# group with a success (and a non-zero advantage) comes early at a base rate of a few percent
SETTINGS = {
    "grpo": ["--group-size", "16", "--steps", "150"],
    "sgrpo": ["--group-size", "16", "--steps", "150", "--alpha", "1", "--k", "2", "--p", "0.5"],
    # lam 0: at a toy lr of 3e-2, Adam turns the pure 2·lam·A gradient (B = 0 at init, so A gets no
    # policy gradient yet) into steps of size lr that zero LoRA's A within a few steps; the lam term has
    # its own test in test_update.py. Completions of 2 tokens: at temperature 1 the 32 samples share
    # no prefixes, so the tree credits only the first token, which must then decide the answer.
    "tspmo": ["--group-size", "32", "--steps", "80", "--lam", "0"],
}


@pytest.mark.parametrize("algo", ["grpo", "sgrpo", "tspmo"])
def test_reward_rises(toy, algo, tmp_path, monkeypatch):
    path, problem, base_rate = toy
    monkeypatch.setattr(train, "load_task", lambda *a, **k: Task("toy", lambda rng: problem, [problem], [problem]))
    finals = []
    for seed in SEEDS:
        run = tmp_path / f"run-{seed}"
        code = train.main(["--algo", algo, "--model", path, "--out", str(run), "--lr", "3e-2",
                           "--temperature", "1.0", "--max-new-tokens", "2", "--lora-fraction", "1.0",
                           "--eval-every", "0", "--test-n", "0", "--save-every", "1000", "--seed", str(seed),
                           *SETTINGS[algo]])
        assert code == 0
        rewards = [json.loads(line)["reward_mean"] for line in open(run / "metrics.jsonl")]
        finals.append(sum(rewards[-len(rewards) // 5:]) / (len(rewards) // 5))  # the last fifth of training
    mean = sum(finals) / len(finals)
    print(f"{algo}: base rate {base_rate:.3f}; mean reward over the last fifth, per seed "
          f"{', '.join(f'{f:.3f}' for f in finals)}; mean {mean:.3f}")
    assert mean > max(4 * base_rate, base_rate + 0.15)
