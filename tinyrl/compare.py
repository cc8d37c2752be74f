"""Compare runs across seeds, like the paper's Tables I-II and Figure 1 with error bars.

    python -m tinyrl.compare runs/grpo-s0 runs/grpo-s1 runs/tspmo-s0 ... [--out compare.png]

Runs are grouped by algorithm and by every other config field that differs between runs of the same
algorithm, apart from the seed and the run's own bookkeeping (`out`, `save_every`, `keep`); a field
that only follows the algorithm (its preset |G|, beta or lambda) does not split groups. For each group it prints a
Markdown table: the seeds, validation accuracy at every evaluation step and at each run's last one as
mean ± sd over seeds (sd with n - 1; a cell over fewer runs says how many), the best adapter's test
accuracy (mean ± sd and per seed), and what the runs cost: seconds per step, wall-clock, sampled
tokens, peak memory. `--out` also draws validation accuracy against step, one line per group with
the spread over seeds (min to max) as a band and the base model's accuracy as a dashed line.
`--base FILE.jsonl` (the base model on the same test problems: `eval.py ... --out FILE.jsonl`) adds the base's
test accuracy and, for each run, a paired test against it on the same problems (problems gained and lost,
exact McNemar p), read from the run's test_results.jsonl. With several groups, each run is also paired
with the same seed's run of every earlier column on the same problems. Every test accuracy has its 95%
Wilson interval.
matplotlib is optional: without it the table still prints, and asking for a figure exits 2.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys

from tinyrl.cli import ArgParser, UserError, run_main
from tinyrl.config import Config
from tinyrl.evaluate import mcnemar, wilson_interval
from tinyrl.plot import pyplot, read_run

NOT_A_SETTING = {"seed", "out", "save_every", "keep", "record_trees"}
FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not None}
ALGO_NAMES = {"grpo": "GRPO", "sgrpo": "S-GRPO", "tspmo": "T-SPMO"}


class Run:
    """One run directory: its config, the per-step metrics, validation points and final test result."""

    def __init__(self, path: str):
        _, self.cfg, self.lines = read_run(path)
        if not self.cfg:
            raise UserError(f"{path} has no readable config.json; is it a tinyrl run directory?")
        # a field added after the run was made had its default then (and runs from before --lam-mode had lam in
        # the loss, as --resume reads them), so an old run groups with a new one of the same settings
        self.cfg = {**FIELD_DEFAULTS, "lam_mode": "loss", **self.cfg}
        if not self.cfg.get("lam"):  # how lambda acts is no setting where lambda is 0
            del self.cfg["lam_mode"]
        self.path = path
        self.val = {m["step"]: m["val_accuracy"] for m in self.lines if "val_accuracy" in m}
        self.steps = [m for m in self.lines if "reward_mean" in m]
        self.step_seconds = [sum(v for k, v in m.items() if k.startswith("sec_") and k != "sec_eval")
                             for m in self.steps]  # a validation logged on a step's line is not the step's time
        self.final = None
        try:
            with open(os.path.join(path, "final_eval.json")) as f:
                final = json.load(f)
            self.final = final if "accuracy" in final else None
        except FileNotFoundError:
            pass  # still running, or stopped
        except ValueError:
            raise UserError(f"{path}/final_eval.json is not valid JSON") from None
        try:
            self.results = read_results(os.path.join(path, "test_results.jsonl"))  # {problem id: correct}
        except FileNotFoundError:
            self.results = None  # still running, or stopped before its test

    def eval_seconds(self) -> float:
        return sum(m.get("sec_eval", 0.0) for m in self.lines) + (self.final or {}).get("seconds", 0.0)

    def sampled_tokens(self) -> tuple[float, bool]:
        """Tokens sampled over the run, and whether that is exact. Runs logged before `sampled_tokens`
        existed give completions only (exact for GRPO and S-GRPO; T-SPMO's replay is missing)."""
        total, exact = 0.0, True
        for m in self.steps:
            if "sampled_tokens" in m:
                total += m["sampled_tokens"]
            else:
                total += m["completion_len"] * self.cfg["group_size"] * self.cfg.get("batch_size", 1)
                exact = exact and self.cfg["algo"] != "tspmo"
        return total, exact


def read_results(path: str) -> dict[str, bool]:
    """{problem id: correct} from per-problem records (eval.py --out, a run's test_results.jsonl)."""
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        return {str(r["id"]): bool(r["correct"]) for r in records}
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: expected one JSON record with 'id' and 'correct' per line "
                        f"(eval.py --out writes them)") from None


def ci(correct: int, n: int) -> str:
    lo, hi = wilson_interval(correct, n)
    return f"{100 * correct / max(1, n):.1f} [{100 * lo:.1f}-{100 * hi:.1f}]"


def paired(run: Run, ref: dict[str, bool] | None, ref_name: str = "") -> str:
    """'+gained/-lost, p=...' of the run's best adapter against `ref` ({problem id: correct}: the base model,
    or another run) on the same test problems; '-' while either has no results. Different problems are an
    error against the base (ref_name says which file) and a cell that says so against another run."""
    if run.results is None or ref is None:
        return "-"
    if set(run.results) != set(ref):
        if not ref_name:
            return "other problems"
        raise UserError(f"{run.path}/test_results.jsonl and {ref_name} hold different problems; evaluate the base "
                        f"on the run's test split (same --task, --digits and --n)")
    ids = sorted(ref)
    gained, lost, p = mcnemar([ref[i] for i in ids], [run.results[i] for i in ids])
    return f"+{gained}/-{lost}, p={p:.2g}"


def group_runs(runs: list[Run]) -> tuple[list[str], dict[tuple, list[Run]]]:
    """(the config fields that tell groups apart, {their values: runs}), groups in algorithm order."""
    fields = sorted({k for r in runs for k in r.cfg} - NOT_A_SETTING - {"algo"})

    def splits(k: str, runs: list[Run]) -> bool:
        return len({json.dumps(r.cfg.get(k)) for r in runs}) > 1

    algos = {r.cfg.get("algo") for r in runs}
    # a field that only follows the algorithm (its preset: |G|, beta, lambda, ...) does not split further
    differing = (["algo"] if len(algos) > 1 else []) + \
        [k for k in fields if any(splits(k, [r for r in runs if r.cfg.get("algo") == a]) for a in algos)]
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(r.cfg.get(k) for k in differing), []).append(r)
    order = list(ALGO_NAMES)

    def key(item):
        values = dict(zip(differing, item[0]))
        algo = values.get("algo")
        return (order.index(algo) if algo in order else len(order), json.dumps(item[0]))

    return differing, dict(sorted(groups.items(), key=key))


def label(fields: list[str], values: tuple) -> str:
    parts = [ALGO_NAMES.get(v, v) if k == "algo" else f"{k}={v}" for k, v in zip(fields, values) if v is not None]
    return " ".join(str(p) for p in parts) or "all runs"


def mean_sd(values: list[float], scale: float = 1.0, digits: int = 1, of: int | None = None) -> str:
    """'m ± sd' (sample sd), 'm' for one value, '-' for none; '(n=k)' when fewer than `of` values."""
    if not values:
        return "-"
    values = [v * scale for v in values]
    text = f"{statistics.mean(values):.{digits}f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.{digits}f}"
    if of is not None and len(values) < of:
        text += f" (n={len(values)})"
    return text


def table(fields: list[str], groups: dict[tuple, list[Run]], base: dict[str, bool] | None = None) -> str:
    """The comparison as a Markdown table: one column per group, one row per quantity."""
    cols = list(groups.values())
    eval_steps = sorted({s for runs in cols for r in runs for s in r.val})
    rows = [("seeds", [", ".join(str(r.cfg.get("seed")) for r in runs) for runs in cols]),
            ("steps run", [mean_sd([len(r.steps) for r in runs], digits=0) for runs in cols])]
    for s in eval_steps:
        name = "validation, base model (step 0)" if s == 0 else f"validation @ step {s}"
        rows.append((name + " %", [mean_sd([r.val[s] for r in runs if s in r.val], 100, of=len(runs))
                                   for runs in cols]))
    rows.append(("validation, last evaluation %",
                 [mean_sd([r.val[max(r.val)] for r in runs if r.val], 100, of=len(runs)) for runs in cols]))
    rows.append(("test, best adapter %",
                 [mean_sd([r.final["accuracy"] for r in runs if r.final], 100, of=len(runs)) for runs in cols]))
    rows.append(("test per seed %", [" / ".join(f"{100 * r.final['accuracy']:.1f}" if r.final else "-"
                                                for r in runs) for runs in cols]))
    rows.append(("test per seed, % [95% CI]", [" / ".join(ci(r.final["correct"], r.final["n"]) if r.final and "n" in r.final
                                                        else "-" for r in runs) for runs in cols]))
    if base is not None:
        rows.append(("base model, test % [95% CI]", [ci(sum(base.values()), len(base))] * len(cols)))
        rows.append(("vs base, same problems (McNemar)",
                     [" / ".join(paired(r, base, "--base") for r in runs) for runs in cols]))
    names = [label(fields, values) for values in groups]
    for i, ref_runs in enumerate(cols[:-1]):  # each method against each earlier column, seed by seed
        refs = {r.cfg.get("seed"): r.results for r in ref_runs}
        rows.append((f"vs {names[i]}, same seed and problems (McNemar)",
                     ["" if j <= i else " / ".join(paired(r, refs.get(r.cfg.get("seed"))) for r in runs)
                      for j, runs in enumerate(cols)]))
    rows.append(("best step", [" / ".join(str(r.final.get("best_step")) if r.final else "-" for r in runs)
                               for runs in cols]))
    rows.append(("training reward, mean over steps %",
                 [mean_sd([statistics.mean(m["reward_mean"] for m in r.steps) for r in runs if r.steps], 100)
                  for runs in cols]))
    # the paper's reward is 0 or 1, so a step's mean of 0 or 1 means every sample scored alike: no reward
    # signal (a --reward of your own may score otherwise, so its runs get no figure)
    rows.append(("steps where every sample scored alike %",
                 [mean_sd([statistics.mean(m["reward_mean"] in (0.0, 1.0) for m in r.steps) for r in runs
                           if r.steps and r.cfg.get("reward") is None], 100) for runs in cols]))
    if any("delta_w_norm" in m for runs in cols for r in runs for m in r.steps):  # logs from before lack them
        rows += adapter_rows(cols, eval_steps)
    rows.append(("seconds per step", [mean_sd([statistics.mean(r.step_seconds) for r in runs if r.steps])
                                      for runs in cols]))
    rows.append(("wall-clock, training min", [mean_sd([sum(r.step_seconds) / 60 for r in runs]) for runs in cols]))
    rows.append(("wall-clock, evaluation min", [mean_sd([r.eval_seconds() / 60 for r in runs]) for runs in cols]))
    tokens = [[r.sampled_tokens() for r in runs] for runs in cols]
    rows.append(("sampled tokens, thousands", [("" if all(e for _, e in t) else ">= ")
                                               + mean_sd([n / 1000 for n, _ in t]) for t in tokens]))
    rows.append(("peak memory GiB", [mean_sd([max(m.get("peak_mem_mb", 0) for m in r.steps) / 1024
                                              for r in runs if r.steps], digits=2) for runs in cols]))
    header = ["", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([name, *cells]) + " |" for name, cells in rows]
    return "\n".join(lines)


def adapter_rows(cols: list[list[Run]], eval_steps: list[int]) -> list[tuple[str, list[str]]]:
    """Whether an adapter grows or is erased: ||ΔW|| / mean |A| / mean |B| at each evaluation step (the first
    seed's run, to 3 significant digits), and the gradient norms of the objective and of the L2 term."""
    def at(r: Run, s: int) -> str:
        m = next((m for m in r.steps if m["step"] == s and "delta_w_norm" in m), None)
        return "-" if m is None else " / ".join(f"{m[k]:.3g}" for k in ("delta_w_norm", "lora_a_abs", "lora_b_abs"))

    def mean_of(runs: list[Run], key: str) -> str:
        values = [m[key] for r in runs for m in r.steps if m.get(key)]  # steps with no gradient are left out
        if values:
            return f"{statistics.mean(values):.3g}"
        return "0" if any(key in m for r in runs for m in r.steps) else "-"  # logs from before lack the key

    rows = [(f"‖ΔW‖ / mean abs(A) / mean abs(B) @ step {s}", [at(runs[0], s) for runs in cols])
            for s in eval_steps if s > 0]
    rows.append(("gradient norm, objective (mean over steps with one)", [mean_of(runs, "grad_norm") for runs in cols]))
    rows.append(("gradient norm, L2 term (mean)", [mean_of(runs, "grad_norm_l2") for runs in cols]))
    logged = [any("replay_grad_norm" in m for r in runs for m in r.steps) for runs in cols]  # T-SPMO, newer runs
    if any(logged):
        rows.append(("gradient norm, replay updates (mean over steps with one)",
                     [mean_of(runs, "replay_grad_norm") if has else "-" for runs, has in zip(cols, logged)]))
    if any("credit_in_answer" in m for runs in cols for r in runs for m in r.steps):  # T-SPMO, newer runs
        rows += credit_rows(cols)
    return rows


def credit_rows(cols: list[list[Run]]) -> list[tuple[str, list[str]]]:
    """Where T-SPMO's credit sat (tinyrl.credit's columns): each a mean over the steps that have a value."""
    def mean_of(runs: list[Run], key: str, scale: float = 1) -> str:
        values = [m[key] for r in runs for m in r.steps if m.get(key) is not None]
        return f"{scale * statistics.mean(values):.3g}" if values else "-"

    return [(name, [mean_of(runs, key, scale) for runs in cols]) for name, key, scale in (
        ("credited pairs in the final answer %, fresh trees", "credit_in_answer", 100),
        ("credited pair position, 0 first token to 1 last", "credit_position", 1),
        ("replay cuts at or after the answer's first token %", "replay_cut_in_answer", 100),
        ("replay trees with every continuation alike %", "replay_flat", 100))]


def figure(fields: list[str], groups: dict[tuple, list[Run]], out: str) -> None:
    """Validation accuracy against step: mean over seeds, min-max band, base model dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    base = [r.val[0] for runs in groups.values() for r in runs if 0 in r.val]
    for values, runs in groups.items():
        steps = sorted({s for r in runs for s in r.val})
        points = [[100 * r.val[s] for r in runs if s in r.val] for s in steps]
        line, = ax.plot(steps, [statistics.mean(p) for p in points], marker="o", markersize=3,
                        label=f"{label(fields, values)} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        ax.fill_between(steps, [min(p) for p in points], [max(p) for p in points], color=line.get_color(),
                        alpha=0.2, linewidth=0)
    if base:
        ax.axhline(100 * statistics.mean(base), color="gray", linestyle="--", linewidth=1, label="base model")
    ax.set(xlabel="step", ylabel="validation accuracy (%)",
           title="Validation accuracy: mean over seeds, band = min to max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = ArgParser(description="Compare tinyrl runs across seeds: a table of accuracies and costs, and a figure.")
    p.add_argument("runs", nargs="+", help="run directories (runs/NAME); grouped by the config fields that differ; "
                                           "files are skipped, so a glob over a study's folder works")
    p.add_argument("--out", help="also draw validation accuracy against step into this PNG (needs matplotlib)")
    p.add_argument("--base", help="the base model's per-problem test results (eval.py --out FILE.jsonl): adds a "
                                  "paired test of each run against it")
    args = p.parse_args(argv)
    files = [r for r in args.runs if os.path.isfile(r)]  # a study's script or figure, matched by its folder's glob
    if files:
        print(f"skipping {len(files)} file(s), not run directories: {', '.join(files)}", file=sys.stderr)
    runs = [Run(r) for r in args.runs if r not in files]
    if not runs:
        raise UserError("no run directories given")
    fields, groups = group_runs(runs)
    base = None
    if args.base:
        try:
            base = read_results(args.base)
        except OSError as e:
            raise UserError(f"--base {args.base}: {e.strerror}") from None
    print(table(fields, groups, base))
    if args.out:
        figure(fields, groups, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
