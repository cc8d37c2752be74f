"""PORTING.md's snippets run, in order, in one namespace, and each piece runs with only the files it lists."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_porting_snippets_run():
    text = open(os.path.join(ROOT, "PORTING.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "PORTING.md", "exec"), namespace)
    assert len(namespace["completions"]) == 8 and len(namespace["buffer"]) == 8
    assert all(p.grad is None or p.grad.abs().sum() > 0 for p in namespace["lora_parameters"](namespace["model"]))


TINY = ("from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        "model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,"
        " num_attention_heads=4, num_key_value_heads=2)).eval().requires_grad_(False)\n")
# piece -> (the other files PORTING.md says it needs, code that uses it)
PIECES = {
    "objectives.py": ([], "from tinyrl.objectives import PrefixTree\n"
                          "assert len(PrefixTree([[1, 2], [1, 3]], [1.0, 0.0])) == 3\n"),
    "lora.py": (["cli.py"], TINY + "from tinyrl.lora import inject_lora\nfrom tinyrl.cli import UserError\n"
                "inject_lora(model, rank=4, fraction=0.5)\ntry:\n    inject_lora(model, rank=4)\n"
                "except UserError:\n    pass\nelse:\n    raise AssertionError\n"),
    "sampling.py": (["cpu.py", "cli.py"], TINY + "import torch\nfrom tinyrl.sampling import sample\n"
                    "out = sample(model, [1, 2, 3], 4, 5, 0.3, [0], torch.Generator().manual_seed(0))\n"
                    "assert len(out) == 4\n"),
    "replay.py": (["tasks.py", "cli.py"], "from tinyrl.replay import Episode, ReplayBuffer, replay_rewards\n"
                  "b = ReplayBuffer(seed=0)\nb.add(Episode([1], [2, 3], 1.0, 5))\n"
                  "b.load_state_dict(b.state_dict())\nclass Tok:\n"
                  "    def decode(self, ids, skip_special_tokens=True):\n        return ' '.join(map(str, ids))\n"
                  "assert replay_rewards(Tok(), [5], [[0], [7]], 0) == [1.0, 0.0]\n"),
    "update.py": (["objectives.py", "lora.py", "cpu.py", "cli.py"], TINY + "from tinyrl.lora import inject_lora\n"
                  "from tinyrl.objectives import PrefixTree\nfrom tinyrl.update import tspmo_backward\n"
                  "inject_lora(model, rank=4, fraction=0.5)\ncs = [[5, 6, 0], [5, 7, 0]]\n"
                  "stats = tspmo_backward(model, [1, 2], cs, PrefixTree(cs, [1.0, 0.0]), 0)\n"
                  "assert stats['nonzero_pairs'] == 2\n"),
}


def test_porting_table_is_the_tested_one():
    text = open(os.path.join(ROOT, "PORTING.md")).read()
    for piece, (needs, _) in PIECES.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{piece}` |"))
        assert sorted(re.findall(r"`(\w+\.py)`", row.split("|")[2])) == sorted(needs), piece


@pytest.mark.parametrize("piece", PIECES)
def test_each_piece_runs_with_only_the_files_porting_lists(piece, tmp_path):
    needs, code = PIECES[piece]
    (tmp_path / "tinyrl").mkdir()
    (tmp_path / "tinyrl" / "__init__.py").write_text("")
    for name in [piece, *needs]:
        shutil.copy(os.path.join(ROOT, "tinyrl", name), tmp_path / "tinyrl" / name)
    script = (f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nimport tinyrl\n"
              f"assert tinyrl.__file__.startswith({str(tmp_path)!r}), tinyrl.__file__\n" + code)
    env = {**os.environ, "TINYRL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_requirements_agree_with_pyproject():
    import tomllib

    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    lines = lambda name: sorted(line.split("#")[0].strip() for line in open(os.path.join(ROOT, name))  # noqa: E731
                                if line.split("#")[0].strip())
    assert lines("requirements.txt") == sorted(project["dependencies"])
    extras = project["optional-dependencies"]
    assert lines("requirements-dev.txt") == sorted(d for d in extras["dev"] + extras["gguf"] + extras["plot"] +
                                                   extras["tensorboard"] if not d.startswith("tinyrl"))
