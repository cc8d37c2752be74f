"""PORTING.md's snippets run, in order, in one namespace: the guide cannot rot."""
import os
import re

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
