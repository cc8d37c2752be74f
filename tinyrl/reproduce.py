"""One command per row of the paper's Tables I-V: train (paper presets + the row's change), then evaluate.

    python -m tinyrl.reproduce --list                 # every row, with the paper's number
    python -m tinyrl.reproduce table2-tspmo           # run one row: train.py, then eval.py on the test set
    python -m tinyrl.reproduce table2-tspmo --dry-run # print its commands
    python -m tinyrl.reproduce --markdown             # the table of REPRODUCE.md

Ablation rows reuse the step count of their (algo, task) pair (paper §IV-C). Extra flags after
`--` go to train.py (e.g. `-- --model /path/to/Qwen2-1.5B`).
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass

from tinyrl.cli import ArgParser, UserError, run_main


@dataclass
class Row:
    name: str
    table: str
    task: str
    setting: str  # what the row changes, in the paper's words
    paper: float  # the paper's test accuracy (%)
    train: list[str] | None  # train.py flags; None: the base model, evaluation only


def rows() -> list[Row]:
    out = []
    for table, task in (("table1", "svamp"), ("table2", "mult")):
        numbers = {"svamp": (45.0, 46.7, 70.3, 71.6), "mult": (3.9, 4.4, 22.9, 70.0)}[task]
        out.append(Row(f"{table}-base", table, task, "Base Qwen2-1.5B", numbers[0], None))
        for algo, paper in zip(("grpo", "sgrpo", "tspmo"), numbers[1:]):
            out.append(Row(f"{table}-{algo}", table, task, algo.upper().replace("SG", "S-G").replace("TS", "T-S"),
                           paper, ["--algo", algo, "--task", task]))
    table3 = [((0, 100), 66.0, 13.0), ((50, 100), 70.0, 22.9), ((100, 100), 70.3, 12.7), ((25, 50), 68.7, 12.6),
              ((0, 25), 69.0, 20.9)]
    for (alpha, k), svamp, mult in table3:
        for task, paper in (("svamp", svamp), ("mult", mult)):
            out.append(Row(f"table3-{task}-a{alpha}-k{k}", "table3", task, f"S-GRPO (alpha, k) = ({alpha}, {k})",
                           paper, ["--algo", "sgrpo", "--task", task, "--alpha", str(alpha), "--k", str(k)]))
    for task, paper, steps in (("svamp", 62.7, 41), ("mult", 15.0, 56)):  # 325 / 8 and 450 / 8 steps
        out.append(Row(f"table4-{task}-batch8", "table4", task, "S-GRPO, effective batch 8 (same problems seen)",
                       paper, ["--algo", "sgrpo", "--task", task, "--batch-size", "8", "--steps", str(steps)]))
    table5 = [((50, 1, 1), 71.0, 62.0), ((50, 1, 0), 70.0, 70.0), ((50, 0, 1), 68.7, 24.5), ((50, 0, 0), 71.6, 19.5),
              ((25, 1, 1), 70.0, 47.8), ((8, 1, 1), 69.3, 11.1)]
    for (g, cs, cf), svamp, mult in table5:
        for task, paper in (("svamp", svamp), ("mult", mult)):
            out.append(Row(f"table5-{task}-g{g}-s{cs}-f{cf}", "table5", task,
                           f"T-SPMO (|G|, C_success, C_failure) = ({g}, {cs}, {cf})", paper,
                           ["--algo", "tspmo", "--task", task, "--group-size", str(g), "--replay-success", str(cs),
                            "--replay-failure", str(cf)]))
    return out


def commands(row: Row, extra: list[str] = ()) -> list[list[str]]:
    """The row's train.py and eval.py command lines."""
    run = f"runs/{row.name}"
    evaluate = ["python", "eval.py", "--task", row.task, *_model_flag(extra)]
    if row.train is None:
        return [evaluate + ["--out", f"{run}.jsonl"]]
    return [["python", "train.py", *row.train, "--out", run, *extra],
            evaluate + ["--adapter", f"{run}/best", "--out", f"{run}/test.jsonl"]]


def _model_flag(extra) -> list[str]:
    extra = list(extra)
    return ["--model", extra[extra.index("--model") + 1]] if "--model" in extra else []


def markdown() -> str:
    lines = ["| row | table | task | setting | paper (%) | commands | tinyrl (%) |", "|---|---|---|---|---|---|---|"]
    for row in rows():
        cmds = "<br>".join(f"`{shlex.join(c)}`" for c in commands(row))
        lines.append(f"| `{row.name}` | {row.table[5:]} | {row.task} | {row.setting} | {row.paper} | {cmds} | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = ArgParser(description="Reproduce a row of the paper's tables.")
    p.add_argument("row", nargs="?", help="a row name from --list")
    p.add_argument("--list", action="store_true")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    by_name = {r.name: r for r in rows()}
    if args.markdown:
        print(markdown(), end="")
        return 0
    if args.list or not args.row:
        for r in rows():
            print(f"{r.name:<28} {r.task:<6} paper {r.paper:>5}%  {r.setting}")
        return 0
    if args.row not in by_name:
        raise UserError(f"unknown row {args.row!r}; python -m tinyrl.reproduce --list shows them")
    for cmd in commands(by_name[args.row], extra):
        print("$", shlex.join(cmd), flush=True)
        if not args.dry_run:
            code = subprocess.call([sys.executable, *cmd[1:]])
            if code:
                return code
    return 0


if __name__ == "__main__":
    run_main(main)
