"""Plot runs like the paper's Figure 1: validation accuracy and training reward against step; below them,
when the log has them, the gradient norms and the adapter's size.

    python -m tinyrl.plot runs/tspmo-mult-A runs/sgrpo-mult-B [--out curves.png] [--smooth 20]

matplotlib is optional; without it this tool says so and exits 2.
"""
from __future__ import annotations

import json
import math
import os

from tinyrl.cli import ArgParser, UserError, run_main


def read_run(run_dir: str) -> tuple[str, dict, list[dict]]:
    """(label, config or {}, metrics lines) of one run directory."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} has no metrics.jsonl; is it a tinyrl run directory?")
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    label, cfg = os.path.basename(os.path.normpath(run_dir)), {}
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
        label = f"{cfg['algo']} ({label})"
    except (OSError, ValueError, KeyError):
        pass
    return label, cfg, lines


def pyplot():
    """matplotlib.pyplot drawing to files, or a one-line error naming the package to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    return plt


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def draw_norms(ax_grad, ax_adapter, runs) -> None:
    """Whether an adapter is being erased, at a glance: the objective's gradient norm against the L2 term's
    (T-SPMO under --lam-mode loss), and the adapter's size, mean |A|, mean |B| and ||ΔW||, on log scales."""
    for i, (label, _, lines) in enumerate(runs):
        color = f"C{i}"
        for key, style, name in (("grad_norm", "-", "objective"), ("grad_norm_l2", "--", "L2 term")):
            points = [(m["step"], m[key] or math.nan) for m in lines if key in m]  # 0: a gap, not a line through
            if any(not math.isnan(v) for _, v in points):
                ax_grad.plot(*zip(*points), style, marker=".", markersize=3, color=color, label=f"{label}: {name}")
        zero = [m["step"] for m in lines if m.get("grad_norm") == 0]  # no gradient at all: marked on the axis
        if zero:
            ax_grad.plot(zero, [0.02] * len(zero), "|", color=color, markersize=8,
                         transform=ax_grad.get_xaxis_transform(), label=f"{label}: objective 0")
        for key, style, name in (("delta_w_norm", "-", "||ΔW||"), ("lora_a_abs", "--", "mean |A|"),
                                 ("lora_b_abs", ":", "mean |B|")):
            points = [(m["step"], m[key]) for m in lines if m.get(key)]
            if points:
                ax_adapter.plot(*zip(*points), style, color=color, label=f"{label}: {name}")
    ax_grad.set(xlabel="step", ylabel="gradient norm", yscale="log", title="Gradient norms (step's main update)")
    ax_adapter.set(xlabel="step", ylabel="size", yscale="log", title="Adapter size")
    for ax in (ax_grad, ax_adapter):  # below the panel, where it covers no line
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)


def draw_credit(ax, runs, smooth: int) -> None:
    """Where T-SPMO's credit sits (tinyrl.credit's columns), each a moving average over the steps that have it."""
    for i, (label, _, lines) in enumerate(runs):
        for key, style, name in (("credit_in_answer", "-", "credited pairs in the answer"),
                                 ("replay_cut_in_answer", "--", "replay cuts in the answer"),
                                 ("replay_flat", ":", "replay trees all alike")):
            points = [(m["step"], m[key]) for m in lines if m.get(key) is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, moving_average(list(values), max(1, smooth)), style, color=f"C{i}",
                        label=f"{label}: {name}")
    ax.set(xlabel="step", ylabel=f"share ({smooth}-step moving average)", ylim=(-0.05, 1.05),
           title="Where T-SPMO's credit sits")


def main(argv=None) -> int:
    p = ArgParser(description="Plot validation accuracy and training reward of tinyrl runs.")
    p.add_argument("runs", nargs="+", help="run directories (runs/NAME)")
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png of the first run)")
    p.add_argument("--smooth", type=int, default=20, help="moving-average window for the reward, in steps")
    args = p.parse_args(argv)
    plt = pyplot()
    runs = [read_run(r) for r in args.runs]
    norms = any("grad_norm" in m for _, _, lines in runs for m in lines)  # runs from before these columns lack them
    where = any("credit_in_answer" in m for _, _, lines in runs for m in lines)
    rows = 1 + norms + where
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4 * rows), squeeze=False)
    (ax_val, ax_reward), *rest = axes
    for label, _, lines in runs:
        val = [(m["step"], 100 * m["val_accuracy"]) for m in lines if "val_accuracy" in m]
        train = [(m["step"], m["reward_mean"]) for m in lines if "reward_mean" in m]
        if val:
            ax_val.plot(*zip(*val), marker="o", markersize=3, label=label)
        if train:
            steps, rewards = zip(*train)
            ax_reward.plot(steps, moving_average(list(rewards), max(1, args.smooth)), label=label)
    ax_val.set(xlabel="step", ylabel="validation accuracy (%)", title="Validation accuracy")
    ax_reward.set(xlabel="step", ylabel=f"mean reward ({args.smooth}-step moving average)", title="Training reward")
    if norms:
        draw_norms(*rest[0], runs)
    if where:
        draw_credit(rest[-1][0], runs, args.smooth)
        rest[-1][1].axis("off")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0] and ax.get_legend() is None:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = args.out or os.path.join(args.runs[0], "curves.png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
