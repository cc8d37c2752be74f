"""The per-run figures of docs/qwen.md, from each run's metrics.jsonl and latest checkpoint (a run may still be going):

    python examples/table2-qwen05b/progress.py examples/table2-qwen05b-3x2/*/

Per run: steps done; groups whose rewards were all equal (reward_mean 0 or 1, exact for the 0/1 reward:
no policy gradient), and how many of them were all right; the mean training reward; sampled tokens (sum of
sampled_tokens); seconds a step (mean of the sec_* fields but sec_eval); the replay's mean seconds; ||dW|| every
50 steps; validation accuracy with its 95% interval; CPU hours so far (training and validation).

Then where the gradient came from: the objective's gradient norm over the steps whose group had a signal
(0 < reward_mean < 1); for T-SPMO the tree's pairs a step and how many carry a non-zero advantage; and,
from the optimizer state of the latest checkpoint, AdamW's update count and sqrt(sum of v-hat), the
gradient norm its steps divide by (v-hat: the bias-corrected running mean of squared gradients, over
every update, T-SPMO's replay updates included). For a T-SPMO run from before replay_grad_norm was
logged, the replay updates' gradient norm this implies (v-hat's exponential weights taken as equal).
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tinyrl.cli import run_main  # noqa: E402
from tinyrl.plot import read_run  # noqa: E402


def adam_scale(run: str) -> tuple[int, float] | None:
    """AdamW's update count and sqrt(sum of v-hat) from the latest checkpoint's optimizer state."""
    from safetensors.torch import load_file
    try:  # not tinyrl.checkpoint.latest_checkpoint: its recovery may rename folders of a run still going
        with open(os.path.join(run, "latest")) as f:
            ckpt = os.path.join(run, json.load(f)["checkpoint"])
    except OSError:
        return None
    tensors = load_file(os.path.join(ckpt, "state.safetensors"))
    with open(os.path.join(ckpt, "state.json")) as f:
        beta2 = json.load(f)["optimizer"]["param_groups"][0]["betas"][1]
    updates = int(tensors["optim.0.step"])
    v = sum(t.double().sum().item() for k, t in tensors.items() if k.endswith("exp_avg_sq"))
    return updates, (v / (1 - beta2 ** updates)) ** 0.5


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
        signal = [r for r in steps if 0 < r["reward_mean"] < 1 and "grad_norm" in r]
        if signal:
            print(f"  gradient norm over the {len(signal)} steps with a signal: mean "
                  f"{statistics.mean(r['grad_norm'] for r in signal):.3g}; mean reward there "
                  f"{statistics.mean(r['reward_mean'] for r in signal):.3f}, median "
                  f"{statistics.median(r['reward_mean'] for r in signal):.3f}")
        replayed = [r for r in steps if r.get("replay_updates")]
        if replayed:
            print(f"  replay in {len(replayed)} steps; its continuations' mean reward "
                  f"{statistics.mean(r['replay_reward_mean'] for r in replayed):.3f}")
        pairs = [r for r in steps if r.get("nonzero_pairs")]
        if pairs:
            nonzero = [r["nonzero_pairs"] for r in pairs]
            print(f"  tree pairs a step: median {statistics.median(r['num_pairs'] for r in steps):.0f}; non-zero in the "
                  f"{len(pairs)} steps with any: median {statistics.median(nonzero):.0f} ({min(nonzero)}-{max(nonzero)})")
        scale = adam_scale(run)
        if scale is None:
            print("  optimizer: no checkpoint")
            continue
        updates, rms = scale
        print(f"  optimizer: {updates} AdamW updates; sqrt(sum of v-hat) {rms:.3g}")
        fresh = [r["grad_norm"] for r in steps if r.get("grad_norm")]
        replays = updates - len(fresh)
        if pairs and replays > 0 and "replay_grad_norm" not in steps[-1]:
            # v-hat is about the mean squared gradient norm over all updates, so what the logged fresh updates
            # do not explain came from the unlogged replay updates
            squares = sum(g * g for g in fresh)
            replay_rms = max(0.0, (rms * rms * updates - squares) / replays) ** 0.5
            print(f"  {len(fresh)} fresh updates, {replays} replay: sqrt(sum of v-hat) from the fresh ones alone "
                  f"{(squares / updates) ** 0.5:.2g}; replay gradient norm about {replay_rms:.2g} (root mean square), "
                  f"{replay_rms / (squares / len(fresh)) ** 0.5:.0f}x the fresh ones'; fresh share of the summed norms "
                  f"{100 * sum(fresh) / (sum(fresh) + replays * replay_rms):.0f}%")


if __name__ == "__main__":
    run_main(main)
