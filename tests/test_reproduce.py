import os

import pytest

from tinyrl.config import parse_config, preset
from tinyrl.reproduce import commands, main, markdown, rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reproduce_md_is_the_generated_table():
    text = open(os.path.join(ROOT, "REPRODUCE.md")).read()
    assert markdown() in text  # regenerate with: python -m tinyrl.reproduce --markdown


def test_every_row_is_a_valid_command_that_changes_only_what_the_row_says():
    names = [r.name for r in rows()]
    assert len(names) == len(set(names)) == 8 + 10 + 2 + 12  # Tables I-II, III, IV, V
    for row in rows():
        cmds = commands(row)
        assert cmds[-1][:2] == ["python", "eval.py"] and "--task" in cmds[-1]
        if row.train is None:
            continue
        cfg, _ = parse_config(cmds[0][2:])  # train.py accepts the flags and the values are in range
        changed = {k: v for k, v in vars(cfg).items() if k in preset(cfg.algo, cfg.task)
                   and v != preset(cfg.algo, cfg.task)[k]}
        flags = {row.train[i][2:].replace("-", "_") for i in range(0, len(row.train), 2)}
        assert set(changed) <= flags, (row.name, changed)
        assert cfg.model == "Qwen/Qwen2-1.5B" and cfg.lr == 1e-4 and cfg.temperature == 0.3


def test_dry_run_prints_the_commands(capsys):
    assert main(["table2-tspmo", "--dry-run", "--", "--model", "/m"]) == 0
    out = capsys.readouterr().out
    assert "$ python train.py --algo tspmo --task mult --out runs/table2-tspmo --model /m" in out
    assert "$ python eval.py --task mult --model /m --adapter runs/table2-tspmo/best" in out
    from tinyrl.cli import UserError

    with pytest.raises(UserError, match="unknown row"):
        main(["table9-nothing"])
