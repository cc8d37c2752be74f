import hashlib
import json
import random

import pytest

from tinyrl.cli import UserError
from tinyrl.tasks import (SVAMP_TEST_IDS, TrainStream, intermediate_numbers, mult_task, parse_answer, parse_digits,
                          reward, svamp_records, svamp_task, works_through_steps)


def test_parse_answer():
    assert parse_answer("The product is 1,234.") == 1234
    assert parse_answer("12 * 3 = 36, so the answer is 36") == 36
    assert parse_answer("first 5, then 7 and finally 1,000,000") == 1000000  # commas go before the regex
    assert parse_answer("no number here") is None
    assert parse_answer("") is None
    assert parse_answer("It dropped to -42 degrees") == -42
    assert parse_answer("5 - 8 = -3") == -3
    assert parse_answer("3.5") == 5  # the LAST integer (Appendix B): decimals are not special
    assert reward("so 56,088", 56088) == 1.0 and reward("56088 or 1", 56088) == 0.0 and reward("none", 1) == 0.0


def test_parse_digits():
    assert parse_digits("3x3") == ((101, 999), (101, 999))  # Appendix A-A
    assert parse_digits("2x1") == ((11, 99), (2, 9))
    assert parse_digits("11-20x3-4") == ((11, 20), (3, 4))
    for bad in ("3", "axb", "0x3", "5-1x2", "3x3x3"):
        with pytest.raises(UserError):
            parse_digits(bad)


def test_mult_test_set_fixed_and_disjoint_from_training(tiny):
    _, tok = tiny
    task, again = mult_task(tok), mult_task(tok)
    assert len(task.test) == 3000 and len(task.val) == 500
    assert [p.id for p in task.test] == [p.id for p in again.test]  # the same on every run
    held = {tuple(sorted(map(int, p.id.split("x")))) for p in task.test + task.val}
    assert len(held) == 3500  # no repeats, val disjoint from test
    rng = random.Random(0)
    for _ in range(20000):
        p = task.train(rng)
        a, b = map(int, p.id.split("x"))
        assert tuple(sorted((a, b))) not in held and 101 <= a <= 999 and 101 <= b <= 999
        assert p.answer == a * b
    small = mult_task(tok, "2x1")
    assert len(small.test) == 89 * 8 // 3 and len(small.val) == 89 * 8 // 3  # capped: a third stays for training
    rng = random.Random(1)
    held_small = {p.id for p in small.test + small.val}
    assert all(small.train(rng).id not in held_small for _ in range(2000))


def test_chat_template_and_plain_prompts(tiny):
    _, tok = tiny
    p = mult_task(tok).test[0]
    a, b = p.id.split("x")
    assert p.prompt == ("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n"
                        f"What's {a} multiplied by {b}? Don't use a calculator.<|im_end|>\n<|im_start|>assistant\n"
                        "Let's break this problem down step by step.")
    assert tok.decode(p.prompt_ids) == p.prompt and p.prompt_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    tok.chat_template = None
    q = mult_task(tok).test[0]
    assert q.prompt == (f"System: You are a helpful AI assistant.\nUser: What's {a} multiplied by {b}? "
                        "Don't use a calculator.\nAssistant: Let's break this problem down step by step.")


def write_svamp(path, n_test=3, n_train=8):
    test_ids = open(SVAMP_TEST_IDS).read().split()[:n_test]
    records = [{"ID": i, "Body": f" Dan had {k} apples . ", "Question": " How many now? ", "Equation": "x",
                "Answer": float(k), "Type": "Addition"} for k, i in enumerate(test_ids)]
    records += [{"ID": f"train-{k}", "Body": f"Ann has {k} pens.", "Question": "How many?", "Equation": "x",
                 "Answer": float(k), "Type": "Addition"} for k in range(n_train)]
    path.write_text(json.dumps(records))
    return hashlib.sha256(path.read_bytes()).hexdigest(), test_ids


def test_svamp_split_and_prompt(tiny, tmp_path):
    _, tok = tiny
    sha, test_ids = write_svamp(tmp_path / "svamp.json")
    task = svamp_task(tok, str(tmp_path / "svamp.json"), sha256=sha, val_n=2)
    assert [p.id for p in task.test] == test_ids  # in the order of the carried test-ID list
    assert len(task.val) == 2 and len(task.train) == 6
    assert not {p.id for p in task.train} & {p.id for p in task.val}
    assert task.test[1].prompt == "Problem: Dan had 1 apples . How many now?\nAnswer:"
    assert task.test[1].answer == 1 and isinstance(task.test[1].answer, int)
    assert tok.decode(task.test[1].prompt_ids) == task.test[1].prompt
    stream = TrainStream(task, seed=0)
    epoch = [stream.next().id for _ in range(6)]
    assert sorted(epoch) == sorted(p.id for p in task.train)  # one epoch visits each training problem once


def test_svamp_errors(tmp_path):
    sha, _ = write_svamp(tmp_path / "svamp.json")
    with pytest.raises(UserError, match="sha256"):
        svamp_records(str(tmp_path / "svamp.json"))  # the fixture is not the real SVAMP.json
    with pytest.raises(UserError, match="does not exist"):
        svamp_records(str(tmp_path / "nope.json"), sha256=None)
    (tmp_path / "bad.json").write_text('[{"ID": "x", "Body": "b"}]')
    with pytest.raises(UserError, match="malformed"):
        svamp_records(str(tmp_path / "bad.json"), sha256=None)
    (tmp_path / "bad2.json").write_text("{not json")
    with pytest.raises(UserError, match="malformed"):
        svamp_records(str(tmp_path / "bad2.json"), sha256=None)
    assert len(svamp_records(str(tmp_path / "svamp.json"), sha256=sha)) == 11


def test_train_stream_state_round_trips(tiny):
    _, tok = tiny
    task = mult_task(tok, "2x2")
    a = TrainStream(task, seed=3)
    [a.next() for _ in range(5)]
    state = json.loads(json.dumps(a.state_dict()))
    b = TrainStream(task, seed=99)
    b.load_state_dict(state)
    assert [a.next().id for _ in range(5)] == [b.next().id for _ in range(5)]


@pytest.mark.parametrize("text, numbers", [
    ("897 × 67 = 60003", []),  # one line: operands and the answer only
    ("So, the final answer is 60,099.", []),
    ("136 × (100 − 6) = 13600 − 816 = 12784", [13600, 816, 100]),  # a shortcut writes steps too
    ("123 × 40 = 4920 and 123 × 5 = 615, so 4920 + 615 = 5535", [40, 615, 4920]),  # nor is the product 5535
    ("123 × 45: 123 × 4 = 492, 4920 + 615 = 5537", [492, 615, 4920]),  # a wrong answer (5537) is not one
    ("We need 3 and 5 and 07", []),  # one digit (07 counts as 7) is not a step
    ("```python\nprint(123 * 45)\n```", []),
])
def test_intermediate_numbers_by_hand(text, numbers):
    assert intermediate_numbers(text, (123, 45) if "123" in text else (136, 94) if "136" in text else (897, 67)) \
        == sorted(numbers)


def test_works_through_steps_needs_two():
    assert not works_through_steps("123 × 45 is about 6000; it is 5535", (123, 45))  # 6000 only
    assert works_through_steps("123 × 40 = 4920; 123 × 5 = 615; total 5535", (123, 45))
    assert not works_through_steps("897 × 67 = 60003", (897, 67))


def test_partial_products_prompt_adds_one_sentence(tiny):
    _, tok = tiny
    paper, asked = mult_task(tok, "2x2").test[0], mult_task(tok, "2x2", prompt="partial-products").test[0]
    assert paper.id == asked.id and paper.answer == asked.answer  # the same problems
    assert asked.prompt == paper.prompt.replace("Don't use a calculator.",
                                                "Don't use a calculator. Write out each partial product, then add them.")
    with pytest.raises(UserError, match="--mult-prompt"):
        mult_task(tok, "2x2", prompt="other")
