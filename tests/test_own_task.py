"""Your own task: a JSONL file of {question, answer}, a prompt template, a plug-in reward, TensorBoard."""
import json

import pytest

import eval as eval_cli
import train
from test_errors import in_process
from tinyrl.cli import UserError
from tinyrl.tasks import PROMPT_TEMPLATE, Reward, gold_answer, jsonl_task, load_reward, read_jsonl

FAST = ["--steps", "2", "--group-size", "3", "--max-new-tokens", "8", "--eval-every", "1", "--eval-n", "2",
        "--save-every", "1", "--eval-batch-size", "2"]


def write_jsonl(path, n, start=0, gsm8k=False):
    with open(path, "w") as f:
        for i in range(start, start + n):
            answer = f"{i} apples and {i} pears make {2 * i}.\n#### {2 * i:,}" if gsm8k else 2 * i
            f.write(json.dumps({"question": f"What is {i} plus {i}?", "answer": answer}) + "\n")
    return str(path)


def test_answers_as_numbers_and_as_gsm8k_text():
    assert gold_answer(72) == 72 and isinstance(gold_answer(72.0), int) and gold_answer(2.5) == 2.5
    assert gold_answer("Natalia sold 48/2 = 24 clips in May.\n#### 72") == 72  # the number after the last '#### '
    assert gold_answer("so 1,000 in all\n#### 1,234") == 1234  # commas removed (Appendix B)
    assert gold_answer("#### -3") == -3 and gold_answer("18") == 18 and gold_answer("it is 3.5 m") == 3.5
    for bad in ("no number", "the total is\n#### none", True, None, [1]):
        with pytest.raises(ValueError):
            gold_answer(bad)


def test_read_jsonl_ids_and_each_bad_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"question": "a?", "answer": 1, "id": "q-a"}\n\n{"question": "b?", "answer": "x\\n#### 2"}\n')
    assert read_jsonl(str(path)) == [{"id": "q-a", "question": "a?", "answer": 1},
                                     {"id": "3", "question": "b?", "answer": 2}]  # line number when no id
    for text, message in [('{"question": "a?", "answer": 1}\nnot json\n', "line 2: Expecting value"),
                          ('{"answer": 1}\n', "line 1: no 'question' field"),
                          ('{"question": "a?"}\n', "line 1: no 'answer' field"),
                          ('{"question": "a?", "answer": "none"}\n', "line 1: answer 'none' holds no number"),
                          ('[1, 2]\n', "line 1: not a JSON object"),
                          ('{"question": "a?", "answer": 1, "id": 7}\n{"question": "b?", "answer": 1, "id": 7}\n',
                           "two problems share an id")]:
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            read_jsonl(str(path))
    with pytest.raises(UserError, match="does not exist"):
        read_jsonl(str(tmp_path / "none.jsonl"))


def test_splits_from_one_file_and_from_separate_files(tiny, tmp_path):
    _, tok = tiny
    task = jsonl_task(tok, write_jsonl(tmp_path / "all.jsonl", 50))
    assert (len(task.train), len(task.val), len(task.test)) == (35, 5, 10)  # 70 / 10 / 20 %
    ids = [p.id for p in task.train + task.val + task.test]
    assert sorted(ids, key=int) == [str(i) for i in range(1, 51)]  # disjoint, nothing lost
    again = jsonl_task(tok, str(tmp_path / "all.jsonl"))
    assert [p.id for p in again.test] == [p.id for p in task.test] and [p.id for p in again.val] == [p.id for p in task.val]
    sep = jsonl_task(tok, str(tmp_path / "all.jsonl"), val_file=write_jsonl(tmp_path / "v.jsonl", 4, 100),
                     test_file=write_jsonl(tmp_path / "t.jsonl", 6, 200, gsm8k=True))
    assert (len(sep.train), len(sep.val), len(sep.test)) == (50, 4, 6)
    assert sep.test[0].answer == 400 and "What is 200 plus 200?" in sep.test[0].prompt
    only_test = jsonl_task(tok, str(tmp_path / "all.jsonl"), test_file=str(tmp_path / "t.jsonl"))
    assert (len(only_test.train), len(only_test.val), len(only_test.test)) == (45, 5, 6)
    assert len(jsonl_task(tok, write_jsonl(tmp_path / "3.jsonl", 3)).train) == 1
    with pytest.raises(UserError, match="has 2 problems: too few"):
        jsonl_task(tok, write_jsonl(tmp_path / "2.jsonl", 2))


def test_prompt_modes(tiny, tmp_path):
    _, tok = tiny
    path = write_jsonl(tmp_path / "t.jsonl", 10)
    plain = jsonl_task(tok, path).test[0]
    assert plain.prompt == PROMPT_TEMPLATE.replace("{question}", plain.prompt[len("Problem: "):-len("\nAnswer:")])
    assert plain.prompt.startswith("Problem: What is ") and plain.prompt_ids == tok(plain.prompt).input_ids
    own = jsonl_task(tok, path, template="Q: {question} {braces stay} A:").test[0]
    assert own.prompt.startswith("Q: What is ") and own.prompt.endswith("{braces stay} A:")
    chat = jsonl_task(tok, path, template="{question}", prompt_mode="chat").test[0]
    if getattr(tok, "chat_template", None):  # the tiny tokenizer has none: the paper's plain chat layout
        assert "What is" in chat.prompt and chat.prompt_ids == tok(chat.prompt, add_special_tokens=False).input_ids
    else:
        assert chat.prompt.startswith("System: You are a helpful AI assistant.\nUser: What is ")
        assert chat.prompt.endswith("\nAssistant: ")
    with pytest.raises(UserError, match="has no {question}"):
        jsonl_task(tok, path, template="Solve it:")


def test_plug_in_rewards(tmp_path, monkeypatch):
    (tmp_path / "myreward.py").write_text(
        "def close(completion, answer):\n    return 1.0 if str(answer) in completion else 0.25\n"
        "def broken(completion, answer):\n    raise KeyError('boom')\n"
        "def words(completion, answer):\n    return 'yes'\n"
        "def nan(completion, answer):\n    return float('nan')\n")
    by_path = load_reward(f"{tmp_path / 'myreward.py'}:close")
    assert by_path("it is 12", 12, "p1") == 1.0 and by_path("it is 13", 12, "p1") == 0.25
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("myreward:close")("12", 12, "p") == 1.0  # an importable module
    assert load_reward(None)("so 12", 12, "p") == 1.0 and load_reward(None)("so 13", 12, "p") == 0.0
    with pytest.raises(UserError, match=r"--reward myreward:broken raised KeyError on problem 7: 'boom'"):
        load_reward("myreward:broken")("x", 1, "7")
    for name in ("words", "nan"):
        with pytest.raises(UserError, match=f"--reward myreward:{name} returned .* on problem 7; it must return"):
            load_reward(f"myreward:{name}")("x", 1, "7")
    for spec, message in [("myreward", "expected MODULE:FUNCTION"), ("nosuchmod:f", "cannot import nosuchmod"),
                          ("myreward:absent", "myreward has no function absent"),
                          (f"{tmp_path / 'none.py'}:f", "none.py does not exist")]:
        with pytest.raises(UserError, match=message):
            load_reward(spec)
    assert isinstance(load_reward(None), Reward)


def reward_file(tmp_path):
    (tmp_path / "rw.py").write_text("calls = 0\n"
                                    "def half(completion, answer):\n    return 0.5\n"
                                    "def fails_on_step_2(completion, answer):\n"
                                    "    global calls\n    calls += 1\n"
                                    "    if calls > 3:\n        raise ValueError('bad')\n    return 1.0\n")
    return tmp_path / "rw.py"


def test_training_and_eval_on_a_jsonl_task_with_a_plug_in_reward(tiny_dir, tmp_path, capsys):
    data, rw = write_jsonl(tmp_path / "t.jsonl", 20), reward_file(tmp_path)
    run = tmp_path / "run"
    assert train.main(["--algo", "sgrpo", "--model", tiny_dir, "--task", data, "--reward", f"{rw}:half",
                       "--out", str(run), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "t.jsonl: train 14, val 2 of 2, test 4 of 4" in printed
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["task"] == data and cfg["reward"] == f"{rw}:half" and cfg["lora_rank"] == 16  # SVAMP's preset
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward_mean"] for m in lines[1:]] == [0.5, 0.5]  # the plug-in is what the log records
    assert all(m["val_accuracy"] == 0.0 for m in lines)  # 0.5 never reaches the success threshold 1.0
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["reward"] for s in samples} == {0.5}
    results = [json.loads(x) for x in (run / "test_results.jsonl").read_text().splitlines()]
    assert len(results) == 4 and all(r["reward"] == 0.5 and not r["correct"] for r in results)
    assert eval_cli.main(["--task", data, "--model", tiny_dir, "--adapter", str(run / "best"), "--reward",
                          f"{rw}:half", "--threshold", "0.5", "--max-new-tokens", "4"]) == 0
    assert "t.jsonl test: accuracy 100.0% (4/4" in capsys.readouterr().out


def test_a_failing_reward_stops_the_run_and_keeps_the_checkpoint(tiny_dir, tmp_path, capsys):
    data, rw = write_jsonl(tmp_path / "t.jsonl", 20), reward_file(tmp_path)
    run = tmp_path / "run"
    flags = ["--algo", "grpo", "--model", tiny_dir, "--task", data, "--reward", f"{rw}:fails_on_step_2",
             "--out", str(run), *FAST, "--eval-every", "0"]
    line = in_process(train.main, flags, capsys)  # 3 completions score on step 1, the 4th call raises
    assert "--reward" in line and "fails_on_step_2 raised ValueError on problem" in line and ": bad" in line
    assert json.loads((run / "latest").read_text())["step"] == 1  # step 1's checkpoint, intact
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.parametrize("case", ["missing", "not json", "no answer", "no number", "too few"])
def test_bad_task_files_write_nothing(tiny_dir, tmp_path, capsys, case):
    path = tmp_path / "t.jsonl"
    text = {"missing": None, "not json": '{"question": "a?", "answer": 1}\n{oops\n', "no answer": '{"question": "a"}\n',
            "no number": '{"question": "a?", "answer": "#### x"}\n', "too few": '{"question": "a?", "answer": 1}\n'}[case]
    if text is not None:
        path.write_text(text)
    message = {"missing": "does not exist", "not json": "line 2:", "no answer": "line 1: no 'answer' field",
               "no number": "holds no number", "too few": "too few for a training split"}[case]
    run = tmp_path / "run"
    assert message in in_process(train.main, ["--model", tiny_dir, "--task", str(path), "--out", str(run), *FAST],
                                 capsys)
    assert not run.exists()
    assert message in in_process(eval_cli.main, ["--model", tiny_dir, "--task", str(path)], capsys)


def test_tensorboard_mirrors_metrics(tiny_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    flags = ["--algo", "tspmo", "--model", tiny_dir, "--task", "mult", "--out", str(run), *FAST, "--test-n", "2",
             "--report-to", "tensorboard"]
    assert train.main(flags) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward_mean", "loss", "grad_norm", "delta_w_norm", "val_accuracy"):
        logged = {(m["step"], round(m[key], 5)) for m in lines if key in m}
        assert {(e.step, round(e.value, 5)) for e in events.Scalars(key)} == logged, key

    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    line = in_process(train.main, [*flags[:7], str(tmp_path / "other"), *flags[8:]], capsys)
    assert "pip install tensorboard" in line and not (tmp_path / "other").exists()


def test_reward_module_found_in_the_current_directory(tiny_dir, tmp_path):
    """`--reward mymod:fn` run as `python path/to/eval.py` from the folder that holds mymod.py."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    write_jsonl(tmp_path / "t.jsonl", 10)
    (tmp_path / "mymod.py").write_text("def fn(completion, answer):\n    return 1.0\n")
    r = subprocess.run([sys.executable, os.path.join(root, "eval.py"), "--task", "t.jsonl", "--reward", "mymod:fn",
                        "--model", tiny_dir, "--max-new-tokens", "2"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "t.jsonl test: accuracy 100.0% (2/2" in r.stdout, r.stderr
