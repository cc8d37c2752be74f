"""A plug-in reward for `--reward examples/own-task/reward.py:partial_credit`: R(completion, answer) -> float.

1.0 when the last number of the completion (decimals allowed, commas removed) equals the answer; 0.1 when
the completion ends in some other number, so a model learns the answer format before the arithmetic; else 0.
Only 1.0 counts as correct in validation and test, and as a success for T-SPMO's replay (--replay-threshold).
"""
import re


def partial_credit(completion: str, answer) -> float:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", completion.replace(",", ""))
    if not numbers:
        return 0.0
    return 1.0 if float(numbers[-1]) == float(answer) else 0.1
