"""python -m tinyrl.compare: grouping, mean ± sd worked by hand, partial runs, the figure, real tiny runs."""
import json
import os
import subprocess
import sys

import train
from test_train import FAST
from tinyrl.compare import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(root, name, algo, seed, val, test=None, sec=1.0, tokens=None, rewards=(0.5, 0.5), **cfg):
    """A run directory written by hand: val = {step: accuracy}; two steps of `sec` seconds each, with mean
    rewards `rewards`."""
    run = root / name
    run.mkdir()
    config = {"algo": algo, "task": "mult", "seed": seed, "out": str(run), "group_size": 4, "batch_size": 1,
              "lr": 1e-3, "save_every": 10, "keep": 3, **cfg}
    (run / "config.json").write_text(json.dumps(config))
    lines = [{"step": 0, "val_accuracy": val.pop(0), "sec_eval": 60.0}]
    for step in (1, 2):
        line = {"step": step, "reward_mean": rewards[step - 1], "completion_len": 1000.0, "sec_sample": sec / 2,
                "sec_loss": sec / 2, "peak_mem_mb": 1024.0 * step}
        if tokens is not None:
            line["sampled_tokens"] = tokens
        if step in val:  # train.py logs a step's validation on the step's own line
            line.update(val_accuracy=val[step], sec_eval=60.0)
        lines.append(line)
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if test is not None:
        (run / "final_eval.json").write_text(json.dumps({"accuracy": test, "best_step": 2, "seconds": 60.0}))
    return str(run)


def add_to_steps(run, *columns):
    """Give a fake run's steps 1, 2, ... these columns, and the adapter columns the norm rows come with."""
    path = os.path.join(run, "metrics.jsonl")
    lines = [json.loads(x) for x in open(path)]
    for line, extra in zip(lines[1:], columns):
        line.update(delta_w_norm=0.1, lora_a_abs=0.01, lora_b_abs=0.001, **extra)
    with open(path, "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)


def rows(text):
    """{row name: [cells]} of the printed Markdown table, and the header."""
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in text.strip().splitlines()]
    return {line[0]: line[1:] for line in lines[2:]}, lines[0][1:]


def test_table_groups_by_algorithm_and_gives_mean_and_sd(tmp_path, capsys):
    runs = [fake_run(tmp_path, "t0", "tspmo", 0, {0: 0.1, 2: 0.30}, test=0.25, sec=4.0, group_size=50),
            fake_run(tmp_path, "g0", "grpo", 0, {0: 0.1, 2: 0.10}, test=0.10, tokens=5000, rewards=(0.0, 0.25)),
            fake_run(tmp_path, "g1", "grpo", 1, {0: 0.1, 2: 0.30}, test=0.20, tokens=7000),
            fake_run(tmp_path, "t1", "tspmo", 1, {0: 0.1, 2: 0.50}, sec=4.0, group_size=50),  # stopped before its test evaluation
            ]
    assert main(runs) == 0
    table, header = rows(capsys.readouterr().out)
    assert header == ["GRPO", "T-SPMO"]  # seed and out are not settings; |G| follows the algorithm
    assert table["seeds"] == ["0, 1", "0, 1"]
    assert table["validation, base model (step 0) %"] == ["10.0 ± 0.0", "10.0 ± 0.0"]
    # GRPO at step 2: 10% and 30% -> mean 20, sample sd sqrt(((10-20)^2 + (30-20)^2) / 1) = 14.1
    assert table["validation @ step 2 %"] == ["20.0 ± 14.1", "40.0 ± 14.1"]
    assert table["test, best adapter %"] == ["15.0 ± 7.1", "25.0 (n=1)"]
    assert table["test per seed %"] == ["10.0 / 20.0", "25.0 / -"]
    assert table["seconds per step"] == ["1.0 ± 0.0", "4.0 ± 0.0"]  # the validation's 60 s are not a step's
    assert table["wall-clock, evaluation min"] == ["3.0 ± 0.0", "2.5 ± 0.7"]  # 2 or 3 evaluations + test
    # GRPO logs sampled_tokens (2 steps x 5000 or 7000); T-SPMO's old-style logs give completions only
    # (2 steps x 1000 tokens x |G| = 50), a lower bound since its replay continuations are missing
    assert table["sampled tokens, thousands"] == ["12.0 ± 2.8", ">= 100.0 ± 0.0"]
    assert table["peak memory GiB"] == ["2.00 ± 0.00", "2.00 ± 0.00"]
    # g0's steps: mean rewards 0 (all wrong) and 0.25 -> 12.5% reward, half its steps alike; g1: 50%, none
    assert table["training reward, mean over steps %"] == ["31.2 ± 26.5", "50.0 ± 0.0"]
    assert table["steps where every sample scored alike %"] == ["25.0 ± 35.4", "0.0 ± 0.0"]


def test_every_differing_setting_splits_groups(tmp_path, capsys):
    runs = [fake_run(tmp_path, "a", "sgrpo", 0, {0: 0.1}, lr=1e-3), fake_run(tmp_path, "b", "sgrpo", 1, {0: 0.2}, lr=1e-4),
            fake_run(tmp_path, "c", "sgrpo", 2, {0: 0.3}, lr=1e-4)]
    assert main(runs) == 0
    table, header = rows(capsys.readouterr().out)
    assert header == ["lr=0.0001", "lr=0.001"] and table["seeds"] == ["1, 2", "0"]


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "tinyrl.compare", str(tmp_path / "empty")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no metrics.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_a_glob_over_a_study_skips_its_files(tmp_path, capsys):
    run = fake_run(tmp_path, "g0", "grpo", 0, {0: 0.1, 2: 0.2}, test=0.2)
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    assert main([run, str(tmp_path / "run.sh")]) == 0
    out = capsys.readouterr()
    assert "skipping 1 file(s)" in out.err and rows(out.out)[0]["seeds"] == ["0"]


def test_on_real_tiny_runs_with_figure_and_without_matplotlib(tiny_dir, tmp_path):
    runs = []
    for algo in ("grpo", "tspmo"):
        for seed in (0, 1):
            out = tmp_path / f"{algo}-s{seed}"
            assert train.main(["--algo", algo, "--model", tiny_dir, "--out", str(out), "--task", "mult",
                               "--seed", str(seed), "--lam-mode", "loss", *FAST]) == 0  # an L2 row to check
            runs.append(str(out))
    png = tmp_path / "compare.png"
    r = subprocess.run([sys.executable, "-m", "tinyrl.compare", *runs, "--out", str(png)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    table, header = rows(r.stdout.split("wrote")[0])
    assert header == ["GRPO", "T-SPMO"] and table["seeds"] == ["0, 1", "0, 1"]
    assert list(table).count("validation @ step 1 %") == 1 and "-" not in table["test per seed %"][0]
    step1 = next(json.loads(x) for x in open(os.path.join(runs[0], "metrics.jsonl")) if json.loads(x)["step"] == 1)
    assert table["‖ΔW‖ / mean abs(A) / mean abs(B) @ step 1"][0] == \
        " / ".join(f"{step1[k]:.3g}" for k in ("delta_w_norm", "lora_a_abs", "lora_b_abs"))  # GRPO, seed 0
    l2 = table["gradient norm, L2 term (mean)"]
    assert l2[0] == "0" and float(l2[1]) > 0  # lambda acts on T-SPMO only
    assert png.read_bytes()[:4] == b"\x89PNG"
    no_mpl = "import sys; sys.modules['matplotlib'] = None; from tinyrl.compare import main; from tinyrl.cli import " \
             f"run_main; run_main(lambda: main({runs + ['--out', str(tmp_path / 'x.png')]!r}))"
    r = subprocess.run([sys.executable, "-c", no_mpl], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "pip install matplotlib" in r.stderr and "Traceback" not in r.stderr
    assert "| seeds | 0, 1 | 0, 1 |" in r.stdout  # the table printed before the figure failed


def test_mcnemar_by_hand():
    from tinyrl.evaluate import mcnemar

    # 5 problems only the new model solves, none it loses: p = 2 * 0.5^5 = 0.0625
    assert mcnemar([False] * 5 + [True] * 3, [True] * 8) == (5, 0, 0.0625)
    # 9 gained, 1 lost: p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    base = [False] * 9 + [True] + [True] * 4 + [False] * 6
    other = [True] * 9 + [False] + [True] * 4 + [False] * 6
    assert mcnemar(base, other) == (9, 1, 22 / 1024)
    assert mcnemar([True, False], [True, False]) == (0, 0, 1.0)  # no discordant pair: no evidence either way


def test_paired_test_against_the_base_model(tmp_path, capsys):
    run = fake_run(tmp_path, "t0", "tspmo", 0, {0: 0.1, 2: 0.3}, test=0.5)
    final = json.loads(open(os.path.join(run, "final_eval.json")).read())
    (tmp_path / "t0" / "final_eval.json").write_text(json.dumps({**final, "correct": 5, "n": 10}))
    run_right = [True] * 5 + [False] * 5
    base_right = [False] * 4 + [True] * 2 + [False] * 4  # gained 0-3 (4), lost 5 (1): +4/-1
    (tmp_path / "t0" / "test_results.jsonl").write_text(
        "".join(json.dumps({"id": f"p{i}", "correct": c}) + "\n" for i, c in enumerate(run_right)))
    base = tmp_path / "base.jsonl"
    base.write_text("".join(json.dumps({"id": f"p{i}", "correct": c}) + "\n" for i, c in enumerate(base_right)))
    assert main([run, "--base", str(base)]) == 0
    table, _ = rows(capsys.readouterr().out)
    assert table["vs base, same problems (McNemar)"] == ["+4/-1, p=0.38"]  # 2 * (1 + 5) / 32 = 0.375
    assert table["base model, test % [95% CI]"] == ["20.0 [5.7-51.0]"]
    assert table["test per seed, % [95% CI]"] == ["50.0 [23.7-76.3]"]
    base.write_text(json.dumps({"id": "other", "correct": True}) + "\n")
    r = subprocess.run([sys.executable, "-m", "tinyrl.compare", run, "--base", str(base)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "different problems" in r.stderr and "Traceback" not in r.stderr


def test_each_method_is_paired_with_earlier_ones_seed_by_seed(tmp_path, capsys):
    def results(name, right, ids=None):
        ids = ids or [f"p{i}" for i in range(len(right))]
        (tmp_path / name / "test_results.jsonl").write_text(
            "".join(json.dumps({"id": i, "correct": c}) + "\n" for i, c in zip(ids, right)))

    runs = [fake_run(tmp_path, "g0", "grpo", 0, {0: 0.1}, test=0.2),
            fake_run(tmp_path, "t0", "tspmo", 0, {0: 0.1}, test=0.5),
            fake_run(tmp_path, "t1", "tspmo", 1, {0: 0.1}, test=0.5),  # no GRPO seed 1 to pair with
            fake_run(tmp_path, "s0", "sgrpo", 0, {0: 0.1}, test=0.1)]
    results("g0", [False] * 4 + [True] * 2 + [False] * 4)
    results("t0", [True] * 5 + [False] * 5)  # against g0: gained 0-3 (4), lost 5 (1): +4/-1
    results("t1", [True] * 5 + [False] * 5)
    results("s0", [True] + [False] * 9, ids=[f"q{i}" for i in range(10)])  # another split
    assert main(runs) == 0
    table, header = rows(capsys.readouterr().out)
    assert header == ["GRPO", "S-GRPO", "T-SPMO"]
    assert table["vs GRPO, same seed and problems (McNemar)"] == ["", "other problems", "+4/-1, p=0.38 / -"]
    assert table["vs S-GRPO, same seed and problems (McNemar)"] == ["", "", "other problems / -"]


def test_replay_gradient_row_appears_once_logged(tmp_path, capsys):
    t, g = fake_run(tmp_path, "t0", "tspmo", 0, {0: 0.1}), fake_run(tmp_path, "g0", "grpo", 0, {0: 0.1})
    assert main([t, g]) == 0
    assert not any("replay" in name for name in rows(capsys.readouterr().out)[0])  # runs from before the column
    add_to_steps(t, {"replay_grad_norm": 0.004}, {"replay_grad_norm": 0.0})  # step 2's replay had no gradient
    assert main([t, g]) == 0
    table, header = rows(capsys.readouterr().out)
    assert header == ["GRPO", "T-SPMO"]
    assert table["gradient norm, replay updates (mean over steps with one)"] == ["-", "0.004"]


def test_gradient_norm_is_a_dash_where_the_logs_lack_it_and_0_where_it_was_0(tmp_path, capsys):
    old, new = fake_run(tmp_path, "old", "grpo", 0, {0: 0.1}), fake_run(tmp_path, "new", "tspmo", 0, {0: 0.1})
    add_to_steps(new, {"grad_norm": 0.5, "grad_norm_l2": 0.0}, {"grad_norm": 0.0, "grad_norm_l2": 0.0})
    assert main([old, new]) == 0
    table, header = rows(capsys.readouterr().out)
    assert header == ["GRPO", "T-SPMO"]
    assert table["gradient norm, objective (mean over steps with one)"] == ["-", "0.5"]
    assert table["gradient norm, L2 term (mean)"] == ["-", "0"]


def test_credit_rows_mean_over_steps_with_a_value(tmp_path, capsys):
    t, g = fake_run(tmp_path, "t0", "tspmo", 0, {0: 0.1}), fake_run(tmp_path, "g0", "grpo", 0, {0: 0.1})
    keys = ("credit_in_answer", "credit_position", "replay_cut_in_answer", "replay_flat")
    # step 2 has no fresh credit
    add_to_steps(t, dict(zip(keys, (0.25, 0.5, 0.0, 1.0))), dict(zip(keys, (None, None, 1.0, 0.0))))
    assert main([t, g]) == 0
    table, header = rows(capsys.readouterr().out)
    assert header == ["GRPO", "T-SPMO"]
    assert table["credited pairs in the final answer %, fresh trees"] == ["-", "25"]
    assert table["credited pair position, 0 first token to 1 last"] == ["-", "0.5"]
    assert table["replay cuts at or after the answer's first token %"] == ["-", "50"]  # zeros count
    assert table["replay trees with every continuation alike %"] == ["-", "50"]


def test_plot_leaves_a_gap_at_zero_gradient_steps_and_marks_them():
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tinyrl.plot import draw_norms

    lines = [{"step": s, "grad_norm": g, "grad_norm_l2": 0.0, "delta_w_norm": 1.0, "lora_a_abs": 0.1,
              "lora_b_abs": 0.01} for s, g in [(1, 0.2), (2, 0.0), (3, 0.0), (4, 0.3)]]
    fig, (ax_grad, ax_adapter) = plt.subplots(1, 2)
    draw_norms(ax_grad, ax_adapter, [("run", {}, lines)])
    drawn = {line.get_label(): line for line in ax_grad.get_lines()}
    ys = drawn["run: objective"].get_ydata()
    assert ys[0] == 0.2 and math.isnan(ys[1]) and math.isnan(ys[2]) and ys[3] == 0.3  # no line from 1 to 4
    assert list(drawn["run: objective 0"].get_xdata()) == [2, 3]
    assert "run: L2 term" not in drawn  # all zero: nothing to draw on a log scale
    plt.close(fig)


def test_a_field_older_runs_lack_takes_its_default(tmp_path, capsys):
    old = fake_run(tmp_path, "old", "sgrpo", 0, {0: 0.1, 2: 0.2}, test=0.2)
    new = fake_run(tmp_path, "new", "sgrpo", 1, {0: 0.1, 2: 0.3}, test=0.3, lora_targets="q,v", mult_prompt="paper",
                   lam_mode="loss")
    wide = fake_run(tmp_path, "wide", "sgrpo", 0, {0: 0.1, 2: 0.4}, test=0.4, lora_targets="all-linear",
                    lam_mode="loss")
    assert main([old, new, wide]) == 0
    table, header = rows(capsys.readouterr().out)
    assert header == ["lora_targets=all-linear", "lora_targets=q,v"]  # the old run groups with the new q,v one
    assert table["seeds"] == ["0", "0, 1"]


def test_lam_mode_splits_no_groups_where_lam_is_0(tmp_path, capsys):
    runs = [fake_run(tmp_path, f"r{i}", "tspmo", i, {0: 0.1, 2: 0.2}, test=0.2, lam=lam, lam_mode=mode)
            for i, (lam, mode) in enumerate([(0.0, "loss"), (0.0, "decoupled"), (0.01, "decoupled"),
                                              (0.01, "loss")])]
    assert main(runs) == 0
    _, header = rows(capsys.readouterr().out)
    assert header == ["lam=0.0", "lam=0.01 lam_mode=decoupled", "lam=0.01 lam_mode=loss"]
