import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the suite never reads or writes the user's cache (measured CPU kernels, downloads); subprocesses inherit this
os.environ["TINYRL_CACHE"] = tempfile.mkdtemp(prefix="tinyrl-test-cache-")

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers, one thread each (and their subprocesses)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
if os.environ.get("TINYRL_TEST_NO_ONEDNN"):  # run the suite with torch's oneDNN switched off (DEVELOPERS.md)
    torch.backends.mkldnn.enabled = False


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


@pytest.fixture
def lora_model(tiny):
    """The tiny model with non-zero LoRA adapters, so the sampler is checked on what training samples from."""
    import torch

    from tinyrl.lora import inject_lora, lora_modules

    model, tokenizer = tiny
    inject_lora(model, rank=4, fraction=0.5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    return model, tokenizer


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


@pytest.fixture(scope="session")
def toy_svamp(toy, tmp_path_factory):
    """(model folder, flags): the toy as an SVAMP-format file, so subprocesses (torchrun) get varied rewards."""
    import collections
    import hashlib
    import json

    import torch

    from tinyrl.model import load_model
    from tinyrl.sampling import sample
    from tinyrl.tasks import parse_answer, svamp_problem

    path = toy[0]
    model, tok = load_model(path, device="cpu")
    record = {"ID": "toy-0", "Body": "Write a number.", "Question": "Which?", "Answer": 0.0}
    ids = svamp_problem(tok, record).prompt_ids
    draws = sample(model, ids, 1000, 4, 1.0, [0, 2], torch.Generator().manual_seed(0))  # use --max-new-tokens 4
    counts = collections.Counter(parse_answer(tok.decode(c, skip_special_tokens=True)) for c in draws)
    answer = next(a for a, _ in counts.most_common() if a is not None)  # ~3% of samples
    records = [{**record, "ID": f"toy-{i}", "Answer": float(answer)} for i in range(10)]
    file = tmp_path_factory.mktemp("toysvamp") / "svamp.json"
    file.write_text(json.dumps(records))
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    return path, ["--task", "svamp", "--svamp-file", str(file), "--svamp-sha256", sha]
