"""Checkpoints: atomic publication, recovery after a kill at each point of a save, no pickle, disk full."""
import errno
import gzip
import json
import os
import pathlib
import pickle
import re
import shutil

import pytest
import torch

import train
from tinyrl.checkpoint import latest_checkpoint, load_checkpoint, publish_dir, recover_dir, save_checkpoint
from tinyrl.cli import UserError
from tinyrl.lora import inject_lora, lora_parameters

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def setup(tiny):
    model, _ = tiny
    inject_lora(model, rank=2, fraction=0.5)
    opt = torch.optim.AdamW(lora_parameters(model), lr=0.1)
    for p in lora_parameters(model):
        p.grad = torch.randn_like(p)
    opt.step()
    return model, opt


def save(run, step, model, opt, keep=3):
    return save_checkpoint(str(run), step, model, opt, {"note": step}, {"g": torch.Generator().get_state()}, keep)


def test_round_trip_and_keep(setup, tmp_path, tiny_dir):
    model, opt = setup
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, opt, keep=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-000003", "step-000004"]
    assert latest_checkpoint(str(tmp_path)).endswith("step-000004")
    from tinyrl.model import load_model

    fresh, _ = load_model(tiny_dir, device="cpu")
    inject_lora(fresh, rank=2, fraction=0.5)
    opt2 = torch.optim.AdamW(lora_parameters(fresh), lr=0.1)
    state, rng = load_checkpoint(latest_checkpoint(str(tmp_path)), fresh, opt2)
    assert state["note"] == 4 and state["step"] == 4 and torch.equal(rng["g"], torch.Generator().get_state())
    for a, b in zip(lora_parameters(model), lora_parameters(fresh)):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(setup, tmp_path):
    model, opt = setup
    save(tmp_path, 1, model, opt)
    # killed after writing the temporary folder, before publishing it
    shutil.copytree(tmp_path / "checkpoints" / "step-000001", tmp_path / "checkpoints" / ".tmp-step-000002")
    (tmp_path / "checkpoints" / ".tmp-step-000002" / "state.json").write_text("{torn")
    assert latest_checkpoint(str(tmp_path)).endswith("step-000001")
    # killed between publish_dir's two renames (replacing an existing folder)
    final = tmp_path / "best"
    (tmp_path / ".tmp-best").mkdir()
    (tmp_path / ".tmp-best" / "f").write_text("new")
    final.mkdir()
    (final / "f").write_text("old")
    os.rename(final, str(final) + ".old")  # the first rename happened, the second did not
    recover_dir(str(final))
    assert (final / "f").read_text() == "old"
    publish_dir(str(tmp_path / ".tmp-best"), str(final))
    assert (final / "f").read_text() == "new" and not os.path.exists(str(final) + ".old")
    # a torn or missing `latest` pointer: the newest complete checkpoint is used
    save(tmp_path, 3, model, opt)
    (tmp_path / "latest").write_text('{"checkpoint": "checkpoints/step-0000')
    assert latest_checkpoint(str(tmp_path)).endswith("step-000003")
    os.remove(tmp_path / "latest")
    assert latest_checkpoint(str(tmp_path)).endswith("step-000003")


def test_disk_full_keeps_the_previous_checkpoint_and_says_so(setup, tmp_path, monkeypatch):
    model, opt = setup
    save(tmp_path, 1, model, opt)
    import tinyrl.checkpoint as ck

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(UserError, match=r"disk is full.*step-000001 is intact"):
        save(tmp_path, 2, model, opt)
    assert latest_checkpoint(str(tmp_path)).endswith("step-000001")
    assert not any(d.startswith(".tmp") for d in os.listdir(tmp_path / "checkpoints"))


def test_saved_state_loads_with_pickle_disabled(toy_task, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert train.main(["--algo", "tspmo", "--model", toy_task, "--out", str(run), "--steps", "2", "--group-size", "4",
                       "--max-new-tokens", "2", "--eval-every", "1", "--eval-n", "1", "--test-n", "1"]) == 0
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".jsonl", ".safetensors", ".gz", ""}  # "" is the latest pointer
    assert all(p.name.endswith(".json.gz") for p in files if p.suffix == ".gz")  # T-SPMO's tree records
    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("pickle used")))
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("torch.load used")))
    for p in files:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            load_file(str(p))
        elif p.suffix in (".json", ""):
            json.loads(p.read_text())
        elif p.suffix == ".gz":
            json.loads(gzip.decompress(p.read_bytes()))
    monkeypatch.undo()  # model loading itself may use anything; the resume below reads our files
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: (_ for _ in ()).throw(AssertionError("pickle used")))
    assert train.main(["--resume", str(run), "--steps", "3"]) == 0


def test_no_torch_load_without_weights_only():
    sources = list((ROOT / "tinyrl").glob("*.py")) + [ROOT / "train.py", ROOT / "eval.py"]
    for path in sources:
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, (path, call)
        assert "import pickle" not in path.read_text() and "pickle.load" not in path.read_text(), path


def test_nan_updates_are_skipped_counted_and_stop_the_run(toy_task, tmp_path, capsys):
    """lr 1e30 makes the first update blow the LoRA weights up (λ in the loss: every step has a gradient, even
    one whose completions all score alike); every later loss is non-finite."""
    run = tmp_path / "run"
    code = train.main(["--algo", "tspmo", "--model", toy_task, "--out", str(run), "--steps", "20", "--group-size", "4",
                       "--max-new-tokens", "2", "--eval-every", "0", "--test-n", "0", "--lr", "1e30",
                       "--max-bad-steps", "3", "--lam-mode", "loss"])
    assert code == 3 and "3 updates in a row had a NaN/inf" in capsys.readouterr().err
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped"] for m in lines] == [False, True, True, True]
    assert all(m.keys() == lines[0].keys() for m in lines)  # a dropped update logs the same columns (replay's too)
    assert json.loads((run / "latest").read_text())["step"] == 4  # stopped with a checkpoint
    state = json.loads((run / "checkpoints" / "step-000004" / "state.json").read_text())["trainer"]
    assert state["skipped_steps"] == 3 and state["bad_steps"] == 3


def test_finite_step_drops_non_finite_gradients():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    assert not train.finite_step(opt, [p], 0.5) and torch.equal(p.data, torch.ones(3)) and p.grad is None
    p.grad = torch.ones(3)
    assert not train.finite_step(opt, [p], float("inf"))
    p.grad = torch.ones(3)
    assert train.finite_step(opt, [p], 0.5) and torch.equal(p.data, torch.zeros(3))
