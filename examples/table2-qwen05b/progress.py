"""The progress table of docs/qwen.md, from each run's metrics.jsonl (a run may still be going):

    python examples/table2-qwen05b/progress.py examples/table2-qwen05b-3x2/*/

Per run: steps done; groups whose rewards were all equal (reward_mean 0 or 1, exact for the 0/1 reward:
no policy gradient), and how many of them were all right; the mean training reward; sampled tokens (sum of
sampled_tokens); seconds a step (mean of the sec_* fields but sec_eval); the replay's mean seconds; ||dW|| every
50 steps; validation accuracy with its 95% interval; CPU hours so far (training and validation).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tinyrl.cli import run_main  # noqa: E402
from tinyrl.plot import read_run  # noqa: E402


def main() -> None:
    for run in sys.argv[1:]:
        _, _, rows = read_run(run)
        steps = [r for r in rows if "reward_mean" in r and r["step"] > 0]
        if not steps:
            print(f"{run}: no steps yet")
            continue
        equal = [r for r in steps if r["reward_mean"] in (0.0, 1.0)]
        seconds = [sum(v for k, v in r.items() if k.startswith("sec_") and k != "sec_eval") for r in steps]
        evals = [(r["step"], r["val_accuracy"], r.get("val_ci95")) for r in rows if "val_accuracy" in r]
        print(f"{run}: {steps[-1]['step']} steps")
        print(f"  all rewards equal: {len(equal)} groups ({sum(r['reward_mean'] == 1.0 for r in equal)} all right); "
              f"mean reward {sum(r['reward_mean'] for r in steps) / len(steps):.4f}")
        print(f"  sampled tokens {sum(r['sampled_tokens'] for r in steps):,}; {sum(seconds) / len(seconds):.0f} s a step "
              f"(replay {sum(r.get('sec_replay', 0) for r in steps) / len(steps):.0f} s)")
        print("  ||dW||: " + ", ".join(f"{r['delta_w_norm']:.3f} at {r['step']}" for r in steps if r["step"] % 50 == 0))
        print("  validation: " + ", ".join(f"{100 * a:.1f}% at {s}" + (f" [{100 * c[0]:.1f}-{100 * c[1]:.1f}]" if c else "")
                                            for s, a, c in evals))
        print(f"  CPU hours: {(sum(seconds) + sum(r.get('sec_eval', 0) for r in rows)) / 3600:.2f}")


if __name__ == "__main__":
    run_main(main)
