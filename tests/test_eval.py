import json
import subprocess
import sys

ROOT = __file__.rsplit("/tests/", 1)[0]


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_eval_end_to_end(tiny_dir, tmp_path):
    out = tmp_path / "r.jsonl"
    r = run("eval.py", "--task", "mult", "--model", tiny_dir, "--n", "6", "--batch-size", "4",
            "--max-new-tokens", "12", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "mult-3x3 test: accuracy" in r.stdout and "95% CI" in r.stdout and "tokens/s" in r.stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 6
    assert set(lines[0]) == {"id", "prompt", "completion", "parsed", "answer", "reward", "correct", "tokens", "cut"}
    assert all(x["tokens"] <= 12 and (not x["cut"] or x["tokens"] == 12) for x in lines)  # only the limit cuts
    assert f"{sum(x['cut'] for x in lines)} cut at --max-new-tokens 12" in r.stdout
    assert all(x["correct"] == (x["parsed"] == x["answer"]) == (x["reward"] == 1.0) for x in lines)  # the paper's rule
    assert lines[0]["answer"] == eval(lines[0]["id"].replace("x", "*"))


def test_eval_bad_input_is_one_line(tiny_dir, tmp_path):
    r = run("eval.py", "--task", "mult", "--model", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run("eval.py", "--task", "mult", "--model", tiny_dir, "--adapter", str(tmp_path / "none"))
    assert r.returncode == 2 and "adapter folder" in r.stderr and "Traceback" not in r.stderr


def test_eval_follows_the_run_it_scores(tiny_dir, tmp_path):
    """The README's eval line on a run's best adapter, with none of the run's own settings repeated, gives that
    run's final test figure problem by problem; a flag given anyway wins and is named."""
    run_dir = tmp_path / "run"
    r = run("train.py", "--algo", "grpo", "--task", "mult", "--digits", "2x1", "--model", tiny_dir, "--out",
            str(run_dir), "--steps", "2", "--group-size", "3", "--max-new-tokens", "7", "--eval-every", "1",
            "--eval-n", "3", "--test-n", "6", "--lr", "1e-2")
    assert r.returncode == 0, r.stderr
    final = json.loads((run_dir / "final_eval.json").read_text())
    out = tmp_path / "again.jsonl"
    r = run("eval.py", "--task", "mult", "--model", tiny_dir, "--adapter", str(run_dir / "best"), "--n", "6",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"following the run {run_dir}" in r.stdout and "--digits 2x1" in r.stdout and "differs" not in r.stdout
    assert f"mult-2x1 test: accuracy {100 * final['accuracy']:.1f}% ({final['correct']}/6" in r.stdout
    assert "cut at --max-new-tokens 7" in r.stdout
    mine = [json.loads(x) for x in out.read_text().splitlines()]
    theirs = [json.loads(x) for x in (run_dir / "test_results.jsonl").read_text().splitlines()]
    assert [(x["id"], x["completion"]) for x in mine] == [(x["id"], x["completion"]) for x in theirs]
    r = run("eval.py", "--adapter", str(run_dir / "final"), "--n", "2", "--digits", "3x3")
    assert r.returncode == 0, r.stderr
    assert "differs from the run: --digits 3x3 (the run had 2x1)" in r.stdout and "mult-3x3 test" in r.stdout
    r = run("eval.py", "--model", tiny_dir, "--n", "2")  # no run to follow and no task
    assert r.returncode == 2 and "--task is required" in r.stderr
