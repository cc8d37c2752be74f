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
