import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Qwen2 model + byte-level BPE tokenizer saved as a HF folder (built offline, once)."""
    from tiny import save_tiny

    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture
def tiny(tiny_dir):
    """(model, tokenizer) loaded the way users load theirs: frozen, eval mode, CPU."""
    from tinyrl.model import load_model

    return load_model(tiny_dir, device="cpu")


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """(model folder, Problem, base rate): a tiny model whose weights can grow confident (init_std 0.2) and a
    one-problem task asking for the integer it already writes most often, a few percent of the time."""
    import collections

    import torch

    from tiny import save_tiny
    from tinyrl.model import load_model
    from tinyrl.sampling import sample
    from tinyrl.tasks import Problem, parse_answer

    prompt = "Problem: Write a number.\nAnswer:"
    path = save_tiny(str(tmp_path_factory.mktemp("toy") / "model"), init_std=0.2)
    model, tok = load_model(path, device="cpu")
    ids = tok(prompt).input_ids
    draws = sample(model, ids, 400, 2, 1.0, [0, 2], torch.Generator().manual_seed(0))
    counts = collections.Counter(parse_answer(tok.decode(c, skip_special_tokens=True)) for c in draws)
    answer, hits = next((a, n) for a, n in counts.most_common() if a is not None)
    return path, Problem("toy", prompt, ids, answer), hits / len(draws)


@pytest.fixture
def toy_task(toy, monkeypatch):
    """train.py's load_task replaced by the toy task; returns the model folder."""
    import train
    from tinyrl.tasks import Task

    path, problem, _ = toy
    monkeypatch.setattr(train, "load_task", lambda *a, **k: Task("toy", lambda rng: problem, [problem], [problem]))
    return path
