"""Tasks and the reward (paper Appendix A and B), and your own task from a JSONL file.

A task is three lists of `Problem`s (train, val, test) or, for multiplication, a function that
draws fresh training problems, and a reward. The paper's reward is 1.0 when the last integer of
the completion equals the answer; `--reward MODULE:FUNCTION` plugs in another. A new task is a
JSONL file (docs/training.md, "Your own task") or one function that returns a `Task`.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import numbers
import os
import random
import re
import sys
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

from tinyrl.cli import UserError, cache_dir


@dataclass
class Problem:
    id: str
    prompt: str  # the exact text the model sees, template applied
    prompt_ids: list[int]
    answer: int | float


def answer_chars(text: str) -> tuple[int, int] | None:
    """[start, end) in `text` of the integer the paper's reward reads (Appendix B): the LAST match of -?\\d+ once
    all commas are stripped; None when there is none."""
    kept = [i for i, ch in enumerate(text) if ch != ","]
    found = list(re.finditer(r"-?\d+", "".join(text[i] for i in kept)))
    if not found:
        return None
    return kept[found[-1].start()], kept[found[-1].end() - 1] + 1


def parse_answer(text: str) -> int | None:
    """Appendix B: strip all commas, take the LAST integer (regex -?\\d+); None when there is none."""
    span = answer_chars(text)
    return None if span is None else int(text[span[0]:span[1]].replace(",", ""))


def reward(text: str, answer: int) -> float:
    """1.0 for an exactly right final integer, else 0.0."""
    return 1.0 if parse_answer(text) == answer else 0.0


@dataclass
class Reward:
    """R(completion, answer) -> float, and its name. Calling it checks the value, so a plug-in that raises or
    returns a non-number stops the run with one line naming it and the problem."""
    fn: Callable[[str, int | float], float] = reward
    name: str = "the paper's reward (last integer == answer)"

    def __call__(self, text: str, answer: int | float, problem_id: str) -> float:
        try:
            value = self.fn(text, answer)
        except Exception as e:  # noqa: BLE001 - any failure of user code ends the run with one line
            raise UserError(f"--reward {self.name} raised {type(e).__name__} on problem {problem_id}: {e}") from None
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise UserError(f"--reward {self.name} returned {value!r} on problem {problem_id}; it must return a "
                            f"finite number")
        return float(value)


def load_reward(spec: str | None) -> Reward:
    """`module:function` (importable, from the current directory too) or `path/to/file.py:function`; None is the
    paper's reward."""
    if not spec:
        return Reward()
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise UserError(f"--reward {spec!r}: expected MODULE:FUNCTION or path/to/file.py:FUNCTION")
    if target.endswith(".py") and not os.path.isfile(target):
        raise UserError(f"--reward {spec}: file {target} does not exist")
    try:
        if target.endswith(".py"):
            loader = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(target))[0], target)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # `python path/to/train.py` puts the script's folder there, not yours
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except Exception as e:  # noqa: BLE001 - an import that fails for any reason is the user's to fix
        raise UserError(f"--reward {spec}: cannot import {target} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--reward {spec}: {target} has no function {name}")
    return Reward(fn, spec)


@dataclass
class Task:
    name: str
    train: list[Problem] | Callable[[random.Random], Problem]  # a list, or a draw of a fresh problem
    val: list[Problem]  # held out from train and test; picks the best checkpoint
    test: list[Problem]  # the paper's test set
    reward: Reward = field(default_factory=Reward)


def chat_prompt(tokenizer, system: str, user: str, assistant_prefix: str = "") -> tuple[str, list[int]]:
    """The tokenizer's chat template when it has one, else the paper's plain "System:/User:/Assistant:" text."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + assistant_prefix
        return text, tokenizer(text, add_special_tokens=False).input_ids  # the template holds its own specials
    text = f"System: {system}\nUser: {user}\nAssistant: {assistant_prefix}"
    return text, tokenizer(text).input_ids


# ---------------------------------------------------------------- multiplication (Appendix A-A)
MULT_SYSTEM = "You are a helpful AI assistant."
MULT_USER = "What's {a} multiplied by {b}? Don't use a calculator."
MULT_PREFILL = "Let's break this problem down step by step."
# DEVIATION (only when asked for, --mult-prompt partial-products): one sentence more in the user message
MULT_PROMPTS = {"paper": MULT_USER, "partial-products": MULT_USER + " Write out each partial product, then add them."}
MULT_TEST_SEED, MULT_VAL_SEED = 1234, 5678


def parse_digits(spec: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """"3x3" -> ((101, 999), (101, 999)) as in the paper; "2x1" -> ((11, 99), (2, 9)); "11-99x2-9" is explicit."""
    def one(part: str) -> tuple[int, int]:
        if re.fullmatch(r"\d+", part):
            d = int(part)
            if not 1 <= d <= 9:
                raise ValueError
            return 10 ** (d - 1) + 1, 10**d - 1  # d=3: 101..999 (Appendix A-A); d=1: 2..9
        lo, hi = (int(x) for x in part.split("-"))
        if not 0 <= lo <= hi:
            raise ValueError
        return lo, hi

    try:
        a, b = spec.lower().split("x")
        return one(a), one(b)
    except ValueError:
        raise UserError(f"--digits {spec!r}: expected AxB with digit counts (3x3, 2x1) or ranges (11-99x2-9)") from None


def intermediate_numbers(text: str, operands: tuple[int, int]) -> list[int]:
    """The distinct numbers of two or more digits in a multiplication completion that are neither an operand,
    the product nor the completion's parsed answer: the partial results it writes while working."""
    product, parsed = operands[0] * operands[1], parse_answer(text)
    skip = {*operands, product} | ({abs(parsed)} if parsed is not None else set())
    return sorted({int(x) for x in re.findall(r"\d+", text.replace(",", "")) if len(x.lstrip("0")) >= 2} - skip)


def works_through_steps(text: str, operands: tuple[int, int]) -> bool:
    """A completion works through steps when it writes at least two intermediate numbers
    (`intermediate_numbers`): e.g. 123 × 45 as 123 × 40 = 4920 and 123 × 5 = 615."""
    return len(intermediate_numbers(text, operands)) >= 2


def mult_problem(tokenizer, a: int, b: int, user: str = MULT_USER) -> Problem:
    prompt, ids = chat_prompt(tokenizer, MULT_SYSTEM, user.format(a=a, b=b), MULT_PREFILL)
    return Problem(f"{a}x{b}", prompt, ids, a * b)


def distinct_problems(a_range: tuple[int, int], b_range: tuple[int, int]) -> int:
    """How many different problems A x B the ranges hold, a pair and its swap counted once: the ordered
    pairs, less one of each swapped pair (a, b), (b, a) with a != b that both ranges' overlap holds."""
    (a_lo, a_hi), (b_lo, b_hi) = a_range, b_range
    overlap = max(0, min(a_hi, b_hi) - max(a_lo, b_lo) + 1)
    return (a_hi - a_lo + 1) * (b_hi - b_lo + 1) - overlap * (overlap - 1) // 2


def mult_ranges(digits: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """`parse_digits`, refusing ranges with fewer than 3 distinct problems (one each for train, val and test)."""
    ranges = parse_digits(digits)
    distinct = distinct_problems(*ranges)
    if distinct < 3:
        raise UserError(f"--digits {digits!r} holds {distinct} distinct problem{'s' * (distinct != 1)}; "
                        f"at least 3 are needed (one each for training, validation and test)")
    return ranges


def mult_prompt(name: str) -> str:
    if name not in MULT_PROMPTS:
        raise UserError(f"--mult-prompt {name!r}: choose {' or '.join(MULT_PROMPTS)}")
    return MULT_PROMPTS[name]


def mult_task(tokenizer, digits: str = "3x3", test_n: int = 3000, val_n: int = 500, prompt: str = "paper") -> Task:
    """A×B with operands uniform in the digit ranges. Test (fixed seed) and val are never drawn for training.

    A pair and its swap count as the same problem. When the ranges hold few problems, test and val
    each take at most a third of them, so a third is always left for training."""
    (a_lo, a_hi), (b_lo, b_hi) = mult_ranges(digits)
    user = mult_prompt(prompt)
    distinct = distinct_problems((a_lo, a_hi), (b_lo, b_hi))
    test_n, val_n = min(test_n, distinct // 3), min(val_n, distinct // 3)
    draw_pair = lambda rng: (rng.randint(a_lo, a_hi), rng.randint(b_lo, b_hi))  # noqa: E731
    key = lambda a, b: (min(a, b), max(a, b))  # noqa: E731

    held: set[tuple[int, int]] = set()

    def held_out(seed: int, n: int) -> list[tuple[int, int]]:
        rng, pairs = random.Random(seed), []
        while len(pairs) < n:  # ends: at most 2/3 of the distinct problems are ever held
            a, b = draw_pair(rng)
            if key(a, b) not in held:
                held.add(key(a, b))
                pairs.append((a, b))
        return pairs

    test = [mult_problem(tokenizer, a, b, user) for a, b in held_out(MULT_TEST_SEED, test_n)]
    val = [mult_problem(tokenizer, a, b, user) for a, b in held_out(MULT_VAL_SEED, val_n)]

    def train(rng: random.Random) -> Problem:
        while True:
            a, b = draw_pair(rng)
            if key(a, b) not in held:  # training draws never include a test or val pair
                return mult_problem(tokenizer, a, b, user)

    return Task(f"mult-{digits}", train, val, test)


# ---------------------------------------------------------------- SVAMP (Appendix A-B)
SVAMP_URL = "https://raw.githubusercontent.com/arkilpatel/SVAMP/main/SVAMP.json"
SVAMP_SHA256 = "5be77703a6d891ae476d7c082787ad361392aa02453b132516cdd5f4e7934e3e"
SVAMP_TEST_IDS = os.path.join(os.path.dirname(__file__), "data", "svamp_test_ids.txt")
SVAMP_VAL_SEED = 0


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _download(url: str, path: str, sha256: str | None) -> None:
    """Fetch `url` to `path` through a temporary file, so a broken or wrong download never lands."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            f.write(response.read())
    except OSError as e:
        raise UserError(f"could not download {url} ({e}); fetch it yourself and pass --svamp-file PATH") from None
    if sha256 and _sha256(tmp) != sha256:
        os.remove(tmp)
        raise UserError(f"the download of {url} does not have sha256 {sha256}; try again or pass --svamp-file")
    os.replace(tmp, path)


def svamp_records(path: str | None = None, sha256: str | None = SVAMP_SHA256) -> list[dict]:
    """SVAMP.json's 1000 records: from `path`, or downloaded once into the cache dir. sha256=None skips the check."""
    cached = path is None
    if cached:
        path = os.path.join(cache_dir(), "SVAMP.json")
        if not os.path.exists(path):
            _download(SVAMP_URL, path, sha256)
    if not os.path.isfile(path):
        raise UserError(f"SVAMP file {path} does not exist")
    if sha256 and (digest := _sha256(path)) != sha256:
        fix = "delete it to download it again" if cached else "pass --svamp-sha256 none to use it anyway"
        raise UserError(f"SVAMP file {path} has sha256 {digest[:12]}..., expected {sha256[:12]}... (the published "
                        f"SVAMP.json): it is damaged or another version; {fix}")
    try:
        with open(path) as f:
            records = json.load(f)
        for r in records:
            if float(r["Answer"]) != int(float(r["Answer"])) or not isinstance(r["ID"], str):
                raise ValueError(f"record {r.get('ID')} has a non-integral answer")
            if not (isinstance(r["Body"], str) and isinstance(r["Question"], str)):
                raise ValueError(f"record {r['ID']} has no text")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"SVAMP file {path} is malformed: {type(e).__name__}: {e}") from None
    return records


def svamp_problem(tokenizer, record: dict) -> Problem:
    text = record["Body"].strip() + " " + record["Question"].strip()
    prompt = f"Problem: {text}\nAnswer:"
    return Problem(record["ID"], prompt, tokenizer(prompt).input_ids, int(float(record["Answer"])))


def svamp_task(tokenizer, path: str | None = None, sha256: str | None = SVAMP_SHA256, val_n: int = 100) -> Task:
    """Test = the 300 IDs of the common split, in order; val = val_n of the other 700 (fixed seed); train = the rest."""
    records = svamp_records(path, sha256)
    with open(SVAMP_TEST_IDS) as f:
        test_ids = [line.strip() for line in f if line.strip()]
    by_id = {r["ID"]: r for r in records}
    test = [svamp_problem(tokenizer, by_id[i]) for i in test_ids if i in by_id]
    rest = [svamp_problem(tokenizer, r) for r in records if r["ID"] not in set(test_ids)]
    # DEVIATION: the paper does not say where its validation problems came from; we hold out val_n of the 700.
    val_ids = set(random.Random(SVAMP_VAL_SEED).sample([p.id for p in rest], min(val_n, len(rest) // 2)))
    return Task("svamp", [p for p in rest if p.id not in val_ids], [p for p in rest if p.id in val_ids], test)


# ---------------------------------------------------------------- your own task: JSONL (docs/training.md)
PROMPT_TEMPLATE = "Problem: {question}\nAnswer:"  # the paper's SVAMP prompt
CHAT_SYSTEM = MULT_SYSTEM  # the paper's multiplication prompt sends its system line through the chat template
SPLIT_SEED, VAL_FRACTION, TEST_FRACTION = 0, 0.1, 0.2


def gold_answer(value) -> int | float:
    """A JSONL `answer`: a number, or a text whose gold value follows its last `#### ` (GSM8K); commas removed
    (Appendix B). Integral values become ints, so the paper's reward can match them."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"answer {value!r} is neither a number nor a text")
    if isinstance(value, str):
        text = value.rsplit("#### ", 1)[-1].replace(",", "").strip()
        numbers_in = re.findall(r"-?\d+(?:\.\d+)?", text)
        if not numbers_in:
            raise ValueError(f"answer {value[-60:]!r} holds no number" + ("" if "#### " in value else
                                                                          " (and no '#### ' before one)"))
        value = float(numbers_in[0]) if "#### " in value else float(numbers_in[-1])
    if not math.isfinite(value):
        raise ValueError(f"answer {value!r} is not a finite number")
    return int(value) if float(value).is_integer() else float(value)


def read_jsonl(path: str) -> list[dict]:
    """One {"question", "answer"[, "id"]} record per line; a bad file or line is one clear error."""
    if not os.path.isfile(path):
        raise UserError(f"task file {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                if not isinstance(r, dict):
                    raise ValueError("not a JSON object")
                for key in ("question", "answer"):
                    if key not in r:
                        raise ValueError(f"no {key!r} field")
                if not isinstance(r["question"], str) or not r["question"].strip():
                    raise ValueError("'question' is not a text")
                answer = gold_answer(r["answer"])
                records.append({"id": str(r.get("id", n)), "question": r["question"], "answer": answer})
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                raise UserError(f"{path}, line {n}: {e}") from None
    if len({r["id"] for r in records}) < len(records):
        raise UserError(f"{path}: two problems share an id")
    return records


def check_prompt(template: str, prompt_mode: str) -> None:
    if "{question}" not in template:
        raise UserError(f"--prompt-template {template!r} has no {{question}} to put the problem in")
    if prompt_mode not in ("plain", "chat"):
        raise UserError(f"--prompt-mode must be plain or chat, got {prompt_mode!r}")


def jsonl_task(tokenizer, path: str, val_file: str | None = None, test_file: str | None = None,
               template: str = PROMPT_TEMPLATE, prompt_mode: str = "plain", reward_fn: Reward | None = None) -> Task:
    """Problems from JSONL files. Validation and test come from their own files when given; otherwise from a
    fixed-seed split of `path` (10% and 20%, at least one each); training takes the rest of `path`."""
    check_prompt(template, prompt_mode)
    main = read_jsonl(path)
    shuffled = random.Random(SPLIT_SEED).sample(main, len(main))
    held = {name: read_jsonl(file) if file else None for name, file in (("val", val_file), ("test", test_file))}
    for name, fraction in (("test", TEST_FRACTION), ("val", VAL_FRACTION)):
        if held[name] is None:  # taken from the main file: fixed seed, so every run and eval.py agree
            k = max(1, round(fraction * len(main)))
            held[name], shuffled = shuffled[:k], shuffled[k:]
    if not shuffled or not held["val"] or not held["test"]:
        raise UserError(f"{path} has {len(main)} problems: too few for a training split beside validation "
                        f"({len(held['val'])}) and test ({len(held['test'])}); it needs at least 3, or give "
                        f"--val-file and --test-file")

    def problem(r: dict) -> Problem:
        text = template.replace("{question}", r["question"].strip())  # replace, not format: braces stay literal
        if prompt_mode == "chat":
            prompt, ids = chat_prompt(tokenizer, CHAT_SYSTEM, text)
        else:
            prompt, ids = text, tokenizer(text).input_ids
        return Problem(r["id"], prompt, ids, r["answer"])

    train_ids = {r["id"] for r in shuffled}
    train = [problem(r) for r in main if r["id"] in train_ids]
    return Task(os.path.basename(path), train, [problem(r) for r in held["val"]], [problem(r) for r in held["test"]],
                reward_fn or Reward())


def check_task(name: str, digits: str = "3x3", svamp_file: str | None = None,
               svamp_sha256: str | None = SVAMP_SHA256, val_file: str | None = None, test_file: str | None = None,
               prompt_template: str = PROMPT_TEMPLATE, prompt_mode: str = "plain", reward: str | None = None,
               mult_prompt_name: str = "paper") -> None:
    """The checks of `load_task` that need no tokenizer (files, digits, prompt, reward plug-in), so that bad
    input fails in a second, before a model loads."""
    load_reward(reward)
    if name.endswith(".jsonl"):
        check_prompt(prompt_template, prompt_mode)
        for path in (name, val_file, test_file):
            if path:
                read_jsonl(path)
    elif name == "mult":
        mult_ranges(digits)
        mult_prompt(mult_prompt_name)
    elif name == "svamp":
        svamp_records(svamp_file, svamp_sha256)
    else:
        raise UserError(f"unknown task {name!r}; choose mult, svamp or a FILE.jsonl")


def load_task(name: str, tokenizer, digits: str = "3x3", svamp_file: str | None = None,
              svamp_sha256: str | None = SVAMP_SHA256, val_file: str | None = None, test_file: str | None = None,
              prompt_template: str = PROMPT_TEMPLATE, prompt_mode: str = "plain", reward: str | None = None,
              mult_prompt_name: str = "paper") -> Task:
    """The task named on the command line: mult, svamp or a .jsonl file, with its reward. A new task is one more
    branch here."""
    reward_fn = load_reward(reward)
    if name.endswith(".jsonl"):
        return jsonl_task(tokenizer, name, val_file, test_file, prompt_template, prompt_mode, reward_fn)
    if name == "mult":
        task = mult_task(tokenizer, digits, prompt=mult_prompt_name)
    elif name == "svamp":
        task = svamp_task(tokenizer, svamp_file, svamp_sha256)
    else:
        raise UserError(f"unknown task {name!r}; choose mult, svamp or a FILE.jsonl")
    task.reward = reward_fn
    return task


class TrainStream:
    """The order of training problems: fresh draws, or shuffled epochs over a list. Its state is plain JSON."""

    def __init__(self, task: Task, seed: int):
        self.task, self.rng = task, random.Random(seed)
        self.order: list[int] = []
        self.pos = 0

    def next(self) -> Problem:
        if callable(self.task.train):
            return self.task.train(self.rng)
        if self.pos >= len(self.order):
            self.order = list(range(len(self.task.train)))
            self.rng.shuffle(self.order)
            self.pos = 0
        self.pos += 1
        return self.task.train[self.order[self.pos - 1]]

    def state_dict(self) -> dict:
        return {"rng": rng_state(self.rng), "order": self.order, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(self.rng, state["rng"])
        self.order, self.pos = list(state["order"]), int(state["pos"])


def rng_state(rng: random.Random) -> list:
    """random.Random's state as JSON-friendly lists."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))
