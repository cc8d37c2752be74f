"""tinyrl.credit: the recorded trees equal what the update used; the answer span; the HTML page; the CLI."""
import json
import os
import subprocess
import sys
from html.parser import HTMLParser

import pytest

import train
import tinyrl.update
from tinyrl import credit
from tinyrl.objectives import PrefixTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY = "import zlib\ndef parity(completion, answer):\n    return float(zlib.crc32(completion.encode()) % 2)\n"


@pytest.fixture(scope="module")
def tokenizer():
    from tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def shared_run(tiny_dir, tmp_path_factory):
    """One recorded two-step run for the tests that only read it."""
    return tspmo_run(tiny_dir, tmp_path_factory.mktemp("credit"))


def tspmo_run(tiny_dir, tmp_path, *extra):
    """Two T-SPMO steps whose reward (the text's checksum parity) scores distinct completions apart, so the
    trees carry credit and replay draws from both pools whatever the trajectory."""
    (tmp_path / "rw.py").write_text(PARITY)
    run = tmp_path / "run"
    assert train.main(["--algo", "tspmo", "--task", "mult", "--model", tiny_dir, "--out", str(run), "--steps", "2",
                       "--group-size", "6", "--max-new-tokens", "6", "--temperature", "1.0", "--eval-every", "0",
                       "--test-n", "0", "--replay-success", "1", "--replay-failure", "1",
                       "--reward", f"{tmp_path / 'rw.py'}:parity", *extra]) == 0
    return run


def test_records_equal_what_the_update_used(tiny_dir, tmp_path, monkeypatch):
    seen, losses = [], []
    backward, loss = tinyrl.update.tspmo_backward, tinyrl.update.tspmo_loss

    def spy_backward(model, prompt_ids, completions, tree, *args, **kwargs):
        seen.append((list(prompt_ids), [list(c) for c in completions], tree))
        return backward(model, prompt_ids, completions, tree, *args, **kwargs)

    def spy_loss(logp, advantages, *args, **kwargs):
        losses.append((len(seen) - 1, logp.detach().exp().tolist(), advantages.tolist()))
        return loss(logp, advantages, *args, **kwargs)

    monkeypatch.setattr(train, "tspmo_backward", spy_backward)
    monkeypatch.setattr(tinyrl.update, "tspmo_loss", spy_loss)
    run = tspmo_run(tiny_dir, tmp_path)
    assert credit.recorded_steps(str(run)) == [1, 2]
    records = [r for step in (1, 2) for r in credit.load(str(run), step)]
    assert len(records) == len(seen) and [r["kind"] for r in records][:1] == ["fresh"]
    assert any(r["kind"] == "replay" for r in records) and any(r["pairs"] for r in records)
    for n, (record, (prompt, completions, tree)) in enumerate(zip(records, seen)):
        kept = record["source"][: record["cut"]] if record["kind"] == "replay" else []
        assert record["prompt_ids"] + kept == prompt and record["completions"] == completions
        rebuilt = PrefixTree(record["completions"], record["rewards"])
        assert (rebuilt.parent, rebuilt.token, rebuilt.count, rebuilt.reward_sum) == \
            (tree.parent, tree.token, tree.count, tree.reward_sum)
        credited = {rebuilt.paths[i][t] for i, t, _, _ in record["pairs"]}
        assert credited == {v for v in range(1, len(rebuilt) + 1) if rebuilt.advantage(v) != 0}  # each once
        assert len(credited) == len(record["pairs"])
        for i, t, a, _ in record["pairs"]:
            assert a == rebuilt.advantage(rebuilt.paths[i][t])
        pis = [p for k, pi, _ in losses if k == n for p in pi]
        advantages = [a for k, _, adv in losses if k == n for a in adv]
        assert [p[3] for p in record["pairs"]] == pytest.approx(pis, rel=1e-6)
        assert [p[2] for p in record["pairs"]] == pytest.approx(advantages, rel=1e-6)


def test_step_columns_sit_in_metrics(shared_run):
    run = shared_run
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        for key in ("credit_position", "credit_in_answer", "replay_cut_to_answer", "replay_cut_in_answer",
                    "replay_flat"):
            assert key in line
        if line["nonzero_pairs"]:
            assert 0 <= line["credit_position"] <= 1 and 0 <= line["credit_in_answer"] <= 1


def test_no_records_flag_and_resume_truncates(tiny_dir, tmp_path):
    run = tspmo_run(tiny_dir, tmp_path, "--no-record-trees")
    assert not (run / "trees").exists()
    (run / "trees").mkdir()
    for step in (1, 2, 3):
        credit.save(str(run), step, [])
    credit.truncate(str(run), 2)
    assert credit.recorded_steps(str(run)) == [1, 2]


@pytest.mark.parametrize("text, answer", [
    ("12 * 3 = 36.", "36"), ("so 1,234 is it", "1,234"), ("it is -5", "-5"), ("56088", "56088"),
    ("the answer is 7 times 8 = 56 and 56", "56"),
])
def test_answer_span_covers_the_integer_the_reward_reads(tokenizer, text, answer):
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
    first, last = credit.answer_span(tokenizer, ids)
    texts = credit.token_texts(tokenizer, ids)
    assert "".join(texts) == text
    covered = "".join(texts[first:last])
    assert answer in covered and answer[0] in texts[first] and answer[-1] in texts[last - 1]
    start = text.rindex(answer)
    assert len("".join(texts[:first])) <= start < len("".join(texts[: first + 1]))


def test_answer_span_of_text_without_integer(tokenizer):
    assert credit.answer_span(tokenizer, tokenizer.encode("no number here")) is None
    from tinyrl.tasks import answer_chars

    assert answer_chars("a 1,2 b") == (2, 5) and answer_chars("x") is None


def hand_tree(tokenizer):
    """Three completions of one prompt: right, wrong at the answer, and one that holds a <script> tag."""
    texts = ["12 * 3 = 36", "12 * 3 = 35", "<script>alert(1)</script> 36"]
    completions = [tokenizer.encode(t) + [tokenizer.eos_token_id] for t in texts]
    rewards = [1.0, 0.0, 1.0]
    tree = PrefixTree(completions, rewards)
    pairs, seen = [], set()
    for i, path in enumerate(tree.paths):
        for t, node in enumerate(path):
            if tree.advantage(node) != 0 and node not in seen:
                seen.add(node)
                pairs.append([i, t, tree.advantage(node), 0.25 + 0.1 * len(pairs)])
    return {"kind": "fresh", "problem": "p1", "answer": 36, "prompt_ids": tokenizer.encode("12 * 3 ="),
            "completions": completions, "rewards": rewards, "pairs": pairs}


def test_columns_by_hand(tokenizer):
    record = hand_tree(tokenizer)
    # root: E = 2/3; "12..." branch (2 completions, E = 1/2): A = -1/6; "<" branch: A = +1/3; then "36" vs "35"
    # below "12 * 3 =": each +-1/2. The answer starts at " 36"/" 35", so 2 of 4 credited pairs sit in the answer.
    assert sorted(round(p[2], 4) for p in record["pairs"]) == [-0.5, -0.1667, 0.3333, 0.5]
    cols = credit.columns([record], tokenizer)
    assert cols["credit_in_answer"] == 0.5
    lengths = [len(c) for c in record["completions"]]
    assert cols["credit_position"] == pytest.approx(sum(t / (lengths[i] - 1) for i, t, _, _ in record["pairs"]) / 4)
    # the tiny tokenizer writes "12 * 3 = 36" as 1|2| |*| |3| |=| |3|6: the answer starts at token 9
    assert credit.answer_span(tokenizer, record["completions"][0]) == (9, 11)
    replay = {**record, "kind": "replay", "source": record["completions"][0], "source_reward": 1.0, "cut": 9,
              "rewards": [1.0, 1.0, 1.0], "pairs": []}
    early = {**replay, "cut": 7, "rewards": [1.0, 0.0, 1.0]}
    cols = credit.columns([record, replay, early], tokenizer)
    assert cols["replay_flat"] == 0.5 and cols["replay_cut_to_answer"] == -1 and cols["replay_cut_in_answer"] == 0.5


class Page(HTMLParser):
    """The text a browser shows (outside <style>) and every tag it meets."""

    def __init__(self):
        super().__init__()
        self.text, self.tags, self.style = "", set(), False

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.style = tag == "style"

    def handle_endtag(self, tag):
        self.style = False

    def handle_data(self, data):
        self.text += "" if self.style else data


def test_html_page_of_a_hand_built_tree(tokenizer):
    record = hand_tree(tokenizer)
    reading = credit.Reading(record, tokenizer)
    html = credit.page("hand <tree>", [reading])
    for i, t, a, pi in record["pairs"]:
        assert f'A={a:+.4f} pi={pi:.4f}' in html
        assert html.count(f"A={a:+.4f}") >= 1
    page = Page()
    page.feed(html)
    assert "<script>alert(1)</script> 36" in page.text and "hand <tree>" in page.text  # shown as text
    assert page.tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "pre", "span"}
    assert "hand &lt;tree&gt;" in html
    for fetch in ("http:", "https:", "src=", "<link", "@import", "url("):
        assert fetch not in html
    text = credit.describe_tree(reading)
    assert "2 branch points" in text and "A=+0.500" in text and "A=-0.500" in text and "A=+0.333" in text


def test_cli_step_and_summary(shared_run, tmp_path):
    run = shared_run
    r = subprocess.run([sys.executable, "-m", "tinyrl.credit", str(run), "--step", "1", "--html",
                        str(tmp_path / "p.html")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "fresh tree, problem" in r.stdout and "shared prefix" in r.stdout
    assert (tmp_path / "p.html").read_text().startswith("<!DOCTYPE html>")
    r = subprocess.run([sys.executable, "-m", "tinyrl.credit", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "2 steps recorded" in r.stdout and "| the answer |" in r.stdout


def test_run_without_records_is_one_line_exit_2(shared_run, tmp_path):
    (tmp_path / "run").mkdir()
    r = subprocess.run([sys.executable, "-m", "tinyrl.credit", str(tmp_path / "run")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no tree records" in r.stderr
    run = shared_run
    r = subprocess.run([sys.executable, "-m", "tinyrl.credit", str(run), "--step", "9"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not recorded" in r.stderr


def test_where_a_token_sits_by_hand(tokenizer):
    text = "12 * 3 = 30 + 6 = 36, so 36."
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
    record = {"kind": "fresh", "problem": "12x3", "answer": 36, "prompt_ids": [], "completions": [ids],
              "rewards": [1.0], "pairs": []}
    reading = credit.Reading(record, tokenizer)
    texts = reading.texts[0]
    kinds = {}
    for t, piece in enumerate(texts):
        kinds.setdefault(piece, []).append(reading.kind(0, t))
    assert "".join(texts) == text
    starts = [len("".join(texts[:t])) for t in range(len(texts))]
    at = lambda c: reading.kind(0, max(t for t, s in enumerate(starts) if s <= c))  # noqa: E731 - token at char c
    assert at(text.index("12")) == "number: an operand" and at(text.index("3 =")) == "number: an operand"
    assert at(text.index("30")) == "number: another (a step)" and at(text.index("6 =")) == "number: another (a step)"
    assert at(text.index("36")) == "number: the answer, written earlier"
    assert at(text.rindex("36")) == "the answer" and at(len(text) - 1) == "after the answer"
    assert at(text.index("so")) == "word" and at(text.index("*")) == "symbol/space"
    assert reading.kind(0, len(ids) - 1) == "after the answer"  # the end-of-sequence token
