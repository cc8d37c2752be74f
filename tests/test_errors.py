"""Bad input gets one clear line on stderr, exit code 2, and no traceback (issue: reliability).

A few cases run as real subprocesses; the full list goes through the same entry point in-process
(run_main(lambda: main(argv))), which is what `python train.py ...` executes."""
import json
import os
import subprocess
import sys

import pytest
import torch

import eval as eval_cli
import train
from test_tasks import write_svamp
from tinyrl.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--steps", "1", "--group-size", "2", "--max-new-tokens", "4", "--eval-every", "0", "--test-n", "0"]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


def in_process(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(argv))
    assert e.value.code == 2
    return one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("args,message", [
    (["--algo", "ppo"], "argument --algo: invalid choice: 'ppo'"),
    (["--frobnicate", "1"], "unrecognized arguments: --frobnicate"),
    (["--group-size", "1"], "--group-size must be >= 2"),
])
def test_real_cli_subprocess(tiny_dir, args, message):
    r = subprocess.run([sys.executable, "train.py", "--model", tiny_dir, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and message in one_error_line(r.stderr)


@pytest.mark.parametrize("args,message", [
    (["--task", "gsm8k"], "--task must be mult, svamp or a FILE.jsonl, got gsm8k"),
    (["--algo", "ppo"], "invalid choice: 'ppo'"),
    (["--group-size", "1"], "--group-size must be >= 2 (advantages compare completions), got 1"),
    (["--k", "-1"], "--k must be >= 0, got -1"),
    (["--p", "1.5"], "--p must be in [0, 1], got 1.5"),
    (["--p", "-0.1"], "--p must be in [0, 1], got -0.1"),
    (["--lora-fraction", "0"], "--lora-fraction must be in (0, 1], got 0"),
    (["--lora-fraction", "1.5"], "--lora-fraction must be in (0, 1], got 1.5"),
    (["--lora-rank", "0"], "--lora-rank must be >= 1, got 0"),
    (["--temperature", "-1"], "--temperature must be >= 0, got -1"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--digits", "3by3"], "--digits '3by3': expected AxB"),
    (["--digits", "1-1x1-1"], "--digits '1-1x1-1' holds 1 distinct problem; at least 3 are needed"),
    (["--cpu-kernels", "turbo"], "argument --cpu-kernels: invalid choice: 'turbo'"),
])
def test_bad_flags(tiny_dir, tmp_path, capsys, args, message):
    line = in_process(train.main, ["--model", tiny_dir, "--out", str(tmp_path / "r"), *FAST, *args], capsys)
    assert message in line


def test_missing_model_and_unreachable_hub(tmp_path, capsys):
    assert "model path /no/such/model does not exist" in in_process(train.main, ["--model", "/no/such/model"], capsys)
    assert "model file x.gguf does not exist" in in_process(eval_cli.main, ["--task", "mult", "--model", "x.gguf"], capsys)
    # HF_HUB_OFFLINE is read when huggingface_hub is imported, so this case needs a fresh process
    r = subprocess.run([sys.executable, "train.py", "--model", "nobody/no-such-model", "--out", str(tmp_path / "r")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = one_error_line(r.stderr)
    assert r.returncode == 2 and "could not load model 'nobody/no-such-model' (hub id)" in line
    assert "Pass a local folder" in line
    # a hub that refuses connections (port 9 on this machine): one quick check, then the local cache only,
    # instead of about a minute of retries
    r = subprocess.run([sys.executable, "eval.py", "--task", "mult", "--model", "nobody/no-such-model"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": ""})
    assert r.returncode == 2 and "the hub is unreachable from here" in one_error_line(r.stderr)


def test_bad_adapters(tiny_dir, tmp_path, capsys):
    from tiny import build_model
    from tinyrl.lora import inject_lora, save_adapter

    base = ["--task", "mult", "--model", tiny_dir, "--n", "1", "--max-new-tokens", "2", "--adapter"]
    assert "adapter folder" in in_process(eval_cli.main, base + [str(tmp_path / "none")], capsys)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "adapter_config.json").write_text("{not json")
    assert "not a LoRA adapter config" in in_process(eval_cli.main, base + [str(tmp_path / "corrupt")], capsys)
    wide = build_model(300, hidden=64)
    inject_lora(wide, rank=4, fraction=0.5)
    save_adapter(wide, str(tmp_path / "wide"), "some/other-model")
    line = in_process(eval_cli.main, base + [str(tmp_path / "wide")], capsys)
    assert "was trained on some/other-model" in line and "shape" in line
    run = tmp_path / "run"  # an adapter of another rank / layer set than the run being resumed
    assert train.main(["--model", tiny_dir, "--out", str(run), *FAST]) == 0
    cfg = json.loads((run / "checkpoints" / "step-000001" / "adapter" / "adapter_config.json").read_text())
    cfg["r"] = 2
    (run / "checkpoints" / "step-000001" / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    assert "r: adapter 2 vs model 8" in in_process(train.main, ["--resume", str(run), "--steps", "2"], capsys)


def test_bad_svamp_files(tiny_dir, tmp_path, capsys):
    base = ["--task", "svamp", "--model", tiny_dir, "--out", str(tmp_path / "r"), *FAST, "--svamp-file"]
    assert "SVAMP file" in in_process(train.main, base + [str(tmp_path / "none.json")], capsys)
    (tmp_path / "bad.json").write_text('[{"ID": "x"}]')
    assert "is malformed" in in_process(train.main, base + [str(tmp_path / "bad.json"), "--svamp-sha256", "none"],
                                        capsys)
    write_svamp(tmp_path / "s.json")
    assert "has sha256" in in_process(train.main, base + [str(tmp_path / "s.json")], capsys)


def test_tokenizer_without_eos(tmp_path, capsys):
    """A Llama-type folder whose tokenizer and configs name no EOS (a Qwen2 tokenizer always gets one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["What is 12 times 3"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "m")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=None,
                                         bos_token_id=None, pad_token_id=None))
    model.generation_config.eos_token_id = model.generation_config.bos_token_id = None
    model.save_pretrained(tmp_path / "m")
    line = in_process(eval_cli.main, ["--task", "mult", "--model", str(tmp_path / "m")], capsys)
    assert "has no EOS token" in line


def test_existing_run_and_conflicting_resume(tiny_dir, tmp_path, capsys):
    argv = ["--model", tiny_dir, "--out", str(tmp_path / "r"), *FAST]
    assert train.main(argv) == 0
    assert "already exists; continue it with --resume" in in_process(train.main, argv, capsys)
    line = in_process(train.main, ["--resume", str(tmp_path / "r"), "--group-size", "4", "--lr", "0.1"], capsys)
    assert "--group-size 4 (run has 2)" in line and "--lr 0.1 (run has 0.0001)" in line
    (tmp_path / "r" / "config.json").write_text("{torn")
    assert "config.json" in in_process(train.main, ["--resume", str(tmp_path / "r")], capsys)


def test_disk_full_during_save(tiny_dir, tmp_path, capsys, monkeypatch):
    import errno

    import tinyrl.checkpoint as ck

    assert train.main(["--model", tiny_dir, "--out", str(tmp_path / "r"), *FAST]) == 0

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    line = in_process(train.main, ["--resume", str(tmp_path / "r"), "--steps", "2"], capsys)
    assert "the disk is full" in line and "step-000001 is intact" in line


def test_cuda_out_of_memory_names_the_flags(tiny_dir, capsys, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train", oom)
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train.main(["--model", tiny_dir]), oom_hint="--chunk-size (sampling) or --max-batch-tokens")
    assert e.value.code == 2
    assert "--chunk-size" in one_error_line(capsys.readouterr().err)


def test_eval_bad_numbers(tiny_dir, capsys):
    assert "--n must be >= 1" in in_process(eval_cli.main, ["--task", "mult", "--model", tiny_dir, "--n", "0"], capsys)
    assert "--temperature must be >= 0" in in_process(
        eval_cli.main, ["--task", "mult", "--model", tiny_dir, "--temperature", "-1"], capsys)


@pytest.mark.parametrize("flags, message", [
    (["--task", "mult", "--digits", "3y3"], "--digits '3y3'"),
    (["--task", "mult", "--digits", "1-1x1-2"], "distinct problem"),
    (["--task", "BROKEN"], "line 2"),
    (["--task", "mult", "--reward", "no_such_module_here:fn"], "cannot import"),
    (["--task", "mult", "--model", "./no/such/model"], "does not exist"),
    (["--task", "mult", "--model", "nothing.gguf"], "does not exist"),
])
def test_input_is_checked_before_the_model_loads(tiny_dir, tmp_path, monkeypatch, capsys, flags, message):
    """Each of these fails at once with its one line as all the screen shows: the model never loads (its loader
    is replaced by one that fails the test) and no config is printed before the error."""
    broken = tmp_path / "t.jsonl"
    broken.write_text('{"question": "1 + 1?", "answer": 2}\n{"question": oops}\n')
    flags = [str(broken) if f == "BROKEN" else f for f in flags]
    model = [] if "--model" in flags else ["--model", tiny_dir]
    for cli in (train, eval_cli):
        monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    for main, extra in ((train.main, ["--out", str(tmp_path / "run"), *FAST]), (eval_cli.main, ["--n", "2"])):
        with pytest.raises(SystemExit) as e:
            run_main(lambda: main([*flags, *model, *extra]))
        out, err = capsys.readouterr()
        assert e.value.code == 2 and message in one_error_line(err) and out == ""
    assert not (tmp_path / "run").exists()


def test_eval_checks_the_adapter_before_the_model_loads(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(eval_cli, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    err = in_process(eval_cli.main, ["--task", "mult", "--model", tiny_dir, "--adapter", str(tmp_path / "x")], capsys)
    assert "adapter folder" in err
