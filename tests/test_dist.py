"""torch.distributed with gloo on CPU: 2 processes started by torchrun from the test."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dist_probe import grads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
FAST = ["--group-size", "4", "--max-new-tokens", "6", "--eval-every", "0", "--test-n", "0", "--save-every", "1",
        "--lr", "1e-2", "--temperature", "1.0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, n=2, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.parametrize("algo", ["grpo", "sgrpo", "tspmo"])
def test_two_rank_gradient_equals_one_process(tiny_dir, tmp_path, algo):
    torchrun(os.path.join(HERE, "dist_probe.py"), tiny_dir, algo, str(tmp_path / "g.safetensors"))
    two = load_file(str(tmp_path / "g.safetensors"))
    one = grads(tiny_dir, algo)
    assert two.keys() == one.keys()
    for k in one:
        assert torch.allclose(two[k], one[k], rtol=1e-5, atol=1e-8), k
    assert any(one[k].abs().sum() > 0 for k in one)


@pytest.mark.parametrize("parallel", ["group", "prompts"])
def test_three_steps_keep_ranks_identical(toy_svamp, tmp_path, parallel):
    model, task = toy_svamp
    run = tmp_path / "run"
    torchrun("train.py", "--algo", "tspmo", "--model", model, *task, "--out", str(run), "--steps", "3",
             "--parallel", parallel, *FAST, "--max-new-tokens", "4", "--group-size", "48")
    final = json.loads((run / "final_eval.json").read_text())
    digests = final["adapter_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # bit-identical adapters on both ranks
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]  # rank 0 alone wrote, once per step
    assert any(0 < m["reward_mean"] < 1 for m in lines)  # rewards varied, so the update was not trivial
    from tinyrl import credit
    from tinyrl.objectives import PrefixTree

    for step in (1, 2, 3):  # the tree records: every rank's fresh tree, each with exactly its own credited pairs
        trees = credit.load(str(run), step)
        assert sum(t["kind"] == "fresh" for t in trees) == (1 if parallel == "group" else 2)
        for t in trees:
            tree = PrefixTree(t["completions"], t["rewards"])
            assert sorted(tree.paths[i][j] for i, j, _, _ in t["pairs"]) == \
                [v for v in range(1, len(tree) + 1) if tree.advantage(v) != 0]


def test_two_rank_checkpoint_resumes_in_one_and_in_two(toy_svamp, tmp_path):
    model, task = toy_svamp
    run = tmp_path / "run"
    torchrun("train.py", "--algo", "sgrpo", "--model", model, *task, "--out", str(run), "--steps", "2", *FAST,
             "--max-new-tokens", "4")
    r = subprocess.run([sys.executable, "train.py", "--resume", str(run), "--steps", "3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    torchrun("train.py", "--resume", str(run), "--steps", "4")
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert len(json.loads((run / "final_eval.json").read_text())["adapter_sha256_per_rank"]) == 2


def test_evaluation_under_two_ranks_equals_one_process(tiny_dir, tmp_path):
    flags = ["--task", "mult", "--model", tiny_dir, "--limit", "7", "--batch-size", "3", "--max-new-tokens", "10"]
    torchrun("eval.py", *flags, "--out", str(tmp_path / "two.jsonl"))
    r = subprocess.run([sys.executable, "eval.py", *flags, "--out", str(tmp_path / "one.jsonl")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    one = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert len(two) == 7 and [r["id"] for r in two] == [r["id"] for r in one]
    assert [r["correct"] for r in two] == [r["correct"] for r in one]
    assert [r["completion"] for r in two] == [r["completion"] for r in one]
