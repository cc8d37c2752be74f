"""Smoke: train.py runs every algo x task on the tiny model and writes every artifact; eval.py loads the result."""
import json
import os
import re
import subprocess
import sys

import pytest

import train
from test_tasks import write_svamp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--steps", "2", "--group-size", "3", "--max-new-tokens", "8", "--eval-every", "1", "--eval-n", "3",
        "--test-n", "3", "--save-every", "1", "--eval-batch-size", "2"]


def task_flags(task, tmp_path):
    if task == "mult":
        return ["--task", "mult"]
    sha, _ = write_svamp(tmp_path / "svamp.json")
    return ["--task", "svamp", "--svamp-file", str(tmp_path / "svamp.json"), "--svamp-sha256", sha]


@pytest.mark.parametrize("task", ["mult", "svamp"])
@pytest.mark.parametrize("algo", ["grpo", "sgrpo", "tspmo"])
def test_two_steps_write_every_artifact(tiny_dir, tmp_path, algo, task, capsys):
    run = tmp_path / "run"
    assert train.main(["--algo", algo, "--model", tiny_dir, "--out", str(run), *task_flags(task, tmp_path), *FAST]) == 0
    printed = capsys.readouterr().out
    # the screen shows what differs from the paper (|G| here) and not what does not (lr 1e-4); config.json has all
    assert "group_size        = 3   (paper: " in printed and "\n  lr " not in printed
    assert "step 0 (the base model) val " in printed and "val 3 of " in printed and "test 3 of " in printed
    assert re.search(r"step 0 \(the base model\) val \d+\.\d% \(\d/3\)", printed)  # percent with counts, as test
    if task == "mult":  # a tiny random model never writes a 3x3 product: every group scores alike
        assert "(every completion scored alike: no reward signal)" in printed
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["algo"] == algo and cfg["group_size"] == 3 and cfg["lora_rank"] == (8 if task == "mult" else 16)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    for m in lines[1:]:
        for key in ("reward_mean", "accuracy", "loss", "tokens_in_loss", "sec_sample", "sec_reward", "sec_loss",
                    "sec_optim", "peak_mem_mb", "val_accuracy", "grad_norm", "grad_norm_l2", "lora_a_abs", "lora_b_abs",
                    "delta_w_norm"):
            assert key in m, key
        sampled = m["completion_len"] * 3  # |G| = 3
        if algo == "tspmo":
            assert {"num_pairs", "nonzero_pairs", "replay_updates", "replay_nonzero_pairs"} <= m.keys()
            assert m["sampled_tokens"] >= sampled - 1e-6  # plus the replay continuations
        else:
            assert m["sampled_tokens"] == pytest.approx(sampled)
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and {"completion", "reward", "answer"} <= samples[0].keys()
    for adapter in ("best", "final", "checkpoints/step-000002/adapter"):
        assert (run / adapter / "adapter_model.safetensors").exists() and (run / adapter / "adapter_config.json").exists()
    assert json.loads((run / "latest").read_text())["checkpoint"] == "checkpoints/step-000002"
    final = json.loads((run / "final_eval.json").read_text())
    assert final["split"] == "test" and final["n"] == 3 and "accuracy" in final and "ci95" in final
    assert len((run / "test_results.jsonl").read_text().splitlines()) == 3


def test_eval_loads_the_trained_adapter_and_plot_draws_it(tiny_dir, tmp_path):
    run = tmp_path / "run"
    assert train.main(["--algo", "tspmo", "--model", tiny_dir, "--out", str(run), "--task", "mult", *FAST]) == 0
    r = subprocess.run([sys.executable, "eval.py", "--task", "mult", "--model", tiny_dir, "--adapter",
                        str(run / "best"), "--n", "3", "--max-new-tokens", "8"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "accuracy" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "tinyrl.plot", str(run), str(run), "--out", str(tmp_path / "p.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    no_mpl = "import sys; sys.modules['matplotlib'] = None; from tinyrl.plot import main; from tinyrl.cli import " \
             f"run_main; run_main(lambda: main([{str(run)!r}]))"
    r = subprocess.run([sys.executable, "-c", no_mpl], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "pip install matplotlib" in r.stderr and "Traceback" not in r.stderr


def test_lam_mode_is_saved_honoured_on_resume_and_logged(tiny_dir, tmp_path, capsys):
    """--lam-mode decoupled (the default): AdamW decays the LoRA weights, no L2 gradient; the mode defines the run,
    so a resume keeps it, refuses another, and a run from before the flag existed resumes as it ran (lam in the
    loss); --lam-mode loss logs the L2 gradient."""
    run = tmp_path / "run"
    flags = ["--algo", "tspmo", "--model", tiny_dir, "--out", str(run), "--task", "mult", *FAST]
    assert train.main(flags) == 0
    assert json.loads((run / "config.json").read_text())["lam_mode"] == "decoupled"  # the default
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]
    assert all(m["grad_norm_l2"] == 0.0 and m["lora_a_abs"] > 0 and m["delta_w_norm"] >= 0 for m in lines)
    assert train.main(["--resume", str(run), "--steps", "3"]) == 0
    state = json.loads((run / "checkpoints" / "step-000003" / "state.json").read_text())
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.01]  # the tspmo preset's lam
    cfg, _ = train.parse_config(["--resume", str(run)])
    assert cfg.lam_mode == "decoupled"
    with pytest.raises(train.UserError, match="--lam-mode loss"):
        train.parse_config(["--resume", str(run), "--lam-mode", "loss"])
    saved = json.loads((run / "config.json").read_text())
    del saved["lam_mode"]
    (run / "config.json").write_text(json.dumps(saved))
    assert train.parse_config(["--resume", str(run)])[0].lam_mode == "loss"

    loss_run = tmp_path / "loss"
    assert train.main([*flags[:5], str(loss_run), *flags[6:], "--lam-mode", "loss"]) == 0
    lines = [json.loads(x) for x in (loss_run / "metrics.jsonl").read_text().splitlines()][1:]
    assert all(m["grad_norm_l2"] > 0 for m in lines)  # lam = 0.01 in the loss: 2·lam·||W||


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replay_logs_a_gradient_exactly_when_its_tree_has_credit(tiny_dir, tmp_path, seed):
    """A reward from the text's checksum parity scores distinct completions apart, so replay has both pools
    and most replay trees branch on reward: whatever the trajectory, some replay update has non-zero pairs."""
    (tmp_path / "rw.py").write_text("import zlib\n"
                                    "def parity(completion, answer):\n    return float(zlib.crc32(completion.encode()) % 2)\n")
    run = tmp_path / "run"
    assert train.main(["--algo", "tspmo", "--task", "mult", "--model", tiny_dir, "--out", str(run), "--steps", "3",
                       "--group-size", "4", "--max-new-tokens", "4", "--temperature", "1.0", "--eval-every", "0",
                       "--test-n", "0", "--replay-success", "1", "--replay-failure", "1", "--seed", str(seed),
                       "--reward", f"{tmp_path / 'rw.py'}:parity"]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    replayed = [m for m in lines if m.get("replay_updates")]
    assert replayed and any(m["replay_nonzero_pairs"] for m in replayed)
    assert all((m["replay_grad_norm"] > 0) == (m["replay_nonzero_pairs"] > 0) for m in replayed)


def test_lora_targets_and_score_temperature_are_kept_by_the_run(tiny_dir, tmp_path):
    run = tmp_path / "run"
    flags = ["--algo", "sgrpo", "--task", "mult", "--model", tiny_dir, "--out", str(run), "--group-size", "3",
             "--max-new-tokens", "6", "--eval-every", "0", "--test-n", "0", "--lora-targets", "all-linear",
             "--score-temperature"]
    assert train.main([*flags, "--steps", "1"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["lora_targets"] == "all-linear" and cfg["score_temperature"] is True
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"])
    with pytest.raises(Exception, match="differ from the run"):
        train.main(["--resume", str(run), "--steps", "2", "--lora-targets", "q,v"])
    assert train.main(["--resume", str(run), "--steps", "2"]) == 0  # keeps all-linear: its checkpoint loads
    r = subprocess.run([sys.executable, "eval.py", "--adapter", str(run / "final"), "--n", "2"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # the adapter's config names its targets
