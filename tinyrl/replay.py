"""T-SPMO's replay buffer (paper §III-C "Replay-Based Resampling"; docs/design.md).

Most completions of a prompt part ways within the first tokens, so the prefix tree says little
about later ones. Replay restarts generation from a random point of a past completion and builds
a fresh tree below that prefix. The buffer is bounded and FIFO; a completion is a success when
its reward is at least r. Its state is plain JSON, so a checkpoint can hold it.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import asdict, dataclass

from tinyrl.tasks import Reward, rng_state, set_rng_state


@dataclass
class Episode:
    prompt_ids: list[int]
    completion_ids: list[int]
    reward: float
    answer: int | float
    problem: str = ""  # its id, for a plug-in reward's error message


class ReplayBuffer:
    def __init__(self, capacity: int = 1000, threshold: float = 1.0, seed: int = 0):
        self.episodes: deque[Episode] = deque(maxlen=capacity)  # FIFO: the oldest leaves first
        self.threshold = threshold  # r: success iff R >= r (r = 1.0; the paper is silent)
        self.rng = random.Random(seed)

    def add(self, episode: Episode) -> None:
        if episode.completion_ids:
            self.episodes.append(episode)

    def successes(self) -> list[Episode]:
        return [e for e in self.episodes if e.reward >= self.threshold]

    def failures(self) -> list[Episode]:
        return [e for e in self.episodes if e.reward < self.threshold]

    def draw(self, n_success: int, n_failure: int) -> list[tuple[Episode, int]]:
        """C_success episodes from the successes and C_failure from the failures, each with a cut m.

        m is uniform in [0, n-1] for a completion of n tokens: prompt + its first m tokens become the
        new prefix, and the final token is never kept (our choice; docs/design.md). An empty pool gives fewer draws."""
        out = []
        for pool, count in ((self.successes(), n_success), (self.failures(), n_failure)):
            for _ in range(count if pool else 0):
                episode = self.rng.choice(pool)
                out.append((episode, self.rng.randrange(len(episode.completion_ids))))
        return out

    def __len__(self) -> int:
        return len(self.episodes)

    def state_dict(self) -> dict:
        return {"capacity": self.episodes.maxlen, "threshold": self.threshold, "rng": rng_state(self.rng),
                "episodes": [asdict(e) for e in self.episodes]}

    def load_state_dict(self, state: dict) -> None:
        self.episodes = deque((Episode(**e) for e in state["episodes"]), maxlen=state["capacity"])
        self.threshold = state["threshold"]
        set_rng_state(self.rng, state["rng"])


def replay_rewards(tokenizer, kept: list[int], continuations: list[list[int]], answer: int | float,
                   reward: Reward = Reward(), problem_id: str = "") -> list[float]:
    """Score each continuation with the kept tokens in front: text = kept part + continuation (paper §III-C)."""
    return [reward(tokenizer.decode(kept + c, skip_special_tokens=True), answer, problem_id) for c in continuations]
