"""Exact resume, crash safety and interrupts (issue: reliability)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = ("sec_", "peak_mem_mb")  # wall-clock and memory differ between runs; everything else must not


def run_flags(tiny_dir, out, algo, steps):
    extra = ["--replay-success", "1", "--replay-failure", "1", "--temperature", "1.0"] if algo == "tspmo" else \
        ["--alpha", "2", "--k", "4", "--p", "0.5", "--temperature", "1.0"]
    return ["--algo", algo, "--task", "mult", "--model", tiny_dir, "--out", str(out), "--steps", str(steps),
            "--group-size", "6", "--max-new-tokens", "6", "--eval-every", "2", "--eval-n", "4", "--test-n", "2",
            "--save-every", "1", "--lr", "1e-2", *extra]


def metrics(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith(VOLATILE)} for m in lines]


def adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("algo", ["tspmo", "sgrpo"])
def test_stop_and_resume_equals_uninterrupted(toy_task, tmp_path, algo, monkeypatch):
    """On the toy task rewards vary, so trees branch, replay draws successes and failures, S-GRPO selects.
    Both runs must sum in the same order, so the CPU kernels are pinned rather than measured per process."""
    pinned = os.environ.get("TINYRL_CPU_KERNELS") if os.environ.get("TINYRL_CPU_KERNELS") in ("torch", "fast") \
        else "torch"
    monkeypatch.setenv("TINYRL_CPU_KERNELS", pinned)
    flags = lambda out, steps: run_flags(toy_task, out, algo, steps) + ["--max-new-tokens", "2"]  # noqa: E731
    assert train.main(flags(tmp_path / "whole", 6)) == 0
    assert train.main(flags(tmp_path / "split", 3)) == 0  # stops after step 3 ...
    assert train.main(["--resume", str(tmp_path / "split"), "--steps", "6"]) == 0  # ... and continues to 6
    whole, split = metrics(tmp_path / "whole"), metrics(tmp_path / "split")
    assert [m["step"] for m in split] == [0, 1, 2, 3, 4, 5, 6]
    assert split == whole
    if algo == "tspmo":
        assert sum(m.get("replay_updates", 0) for m in whole) >= 6  # the replay stream was exercised
        assert any(m.get("nonzero_pairs") for m in whole)
    assert any(0 < m.get("reward_mean", 0) < 1 for m in whole)
    a, b = adapter(tmp_path / "whole" / "final"), adapter(tmp_path / "split" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # training moved the adapter
    ca = adapter(tmp_path / "whole" / "checkpoints" / "step-000006" / "adapter")
    assert all(torch.equal(ca[k], a[k]) for k in a)


def test_resume_refuses_conflicting_flags_and_existing_runs(tiny_dir, tmp_path, capsys):
    flags = run_flags(tiny_dir, tmp_path / "r", "sgrpo", 1)
    assert train.main(flags) == 0
    from tinyrl.cli import UserError

    with pytest.raises(UserError, match="already exists; continue it with --resume"):
        train.main(flags)
    with pytest.raises(UserError, match=r"--lr 0.5 \(run has 0.01\)"):
        train.main(["--resume", str(tmp_path / "r"), "--lr", "0.5"])
    with pytest.raises(UserError, match="not a tinyrl run directory"):
        train.main(["--resume", str(tmp_path)])


def test_resume_finds_the_svamp_file_at_a_new_path_but_keeps_its_checksum(toy_svamp, tmp_path):
    """Where the data lives may change between machines (like --device); what it is, its sha256, may not."""
    path, svamp = toy_svamp
    flags = ["--algo", "grpo", "--model", path, "--out", str(tmp_path / "r"), "--steps", "1", "--group-size", "2",
             "--max-new-tokens", "2", "--eval-every", "0", "--test-n", "0", "--save-every", "1", *svamp]
    assert train.main(flags) == 0
    moved = tmp_path / "moved.json"
    shutil.copy(svamp[svamp.index("--svamp-file") + 1], moved)
    from tinyrl.cli import UserError

    with pytest.raises(UserError, match="--svamp-sha256 0{64}"):
        train.main(["--resume", str(tmp_path / "r"), "--svamp-file", str(moved), "--svamp-sha256", "0" * 64])
    assert train.main(["--resume", str(tmp_path / "r"), "--svamp-file", str(moved), "--steps", "2"]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["svamp_file"] == str(moved)
    assert [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def start(tiny_dir, out, steps, *extra):
    flags = run_flags(tiny_dir, out, "tspmo", steps) + list(extra)
    return subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def steps_logged(run) -> int:
    file = run / "metrics.jsonl"
    return sum('"reward_mean"' in x for x in file.read_text().splitlines()) if file.exists() else 0


def wait_for_steps(run, n, proc, timeout=120):
    """Until metrics.jsonl holds n training steps in all (earlier processes' included)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if steps_logged(run) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_sigkill_at_any_moment_then_resume_logs_every_step_once(tiny_dir, tmp_path):
    run = tmp_path / "run"
    proc = start(tiny_dir, run, 40, "--max-new-tokens", "24", "--keep", "2")
    for delay in (0.0, 0.13, 0.29, 0.41, 0.07):  # kill at arbitrary moments, saves included (one per step)
        wait_for_steps(run, steps_logged(run) + 1, proc)  # this process has loaded and finished a step
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = subprocess.Popen([sys.executable, "train.py", "--resume", str(run)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0] + list(range(1, 41))  # every step exactly once
    assert sorted(os.listdir(run / "checkpoints")) == ["step-000039", "step-000040"]  # --keep 2
    assert (run / "final_eval.json").exists()


def test_sigint_finishes_the_step_saves_and_exits_0(tiny_dir, tmp_path):
    run = tmp_path / "run"
    proc = start(tiny_dir, run, 200, "--save-every", "1000")
    wait_for_steps(run, 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"resume with: python train.py --resume {run}" in out
    last = json.loads((run / "latest").read_text())["step"]
    logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == last and last < 200  # saved the step it finished, although --save-every is 1000
    assert train.main(["--resume", str(run), "--steps", str(last + 2)]) == 0
    logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0] + list(range(1, last + 3))


def test_second_sigint_quits_at_once_and_keeps_the_last_checkpoint(tiny_dir, tmp_path):
    run = tmp_path / "run"
    proc = start(tiny_dir, run, 200, "--max-new-tokens", "300", "--group-size", "50")  # steps of about a second
    wait_for_steps(run, 2, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # a person pressing Ctrl-C twice; signals sent together would arrive as one
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "quitting now" in err
    assert train.main(["--resume", str(run), "--steps", "4"]) == 0
    logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 3, 4]


def test_a_signal_during_set_up_exits_at_once(tiny_dir, tmp_path, monkeypatch):
    """Before the loop there is nothing to save, so SIGTERM must not wait for a step that is minutes away."""
    def endless_set_up(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # pure Python that never looks at a flag
            pass
        raise AssertionError("the signal did not stop the set-up")

    monkeypatch.setattr(train, "load_task", endless_set_up)
    with pytest.raises(SystemExit) as stopped:
        train.main(run_flags(tiny_dir, tmp_path / "run", "sgrpo", 3))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored
