"""The three critic-free objectives as pure functions of tensors (docs/design.md).

GRPO (Eq. 2-4), S-GRPO's token selection (Algorithm 1) and loss (Eq. 5-6), and T-SPMO's prefix
tree, pair advantages and objective (Eq. 7-10). Nothing here knows about models or tinyrl types:
each loss takes log-probabilities, advantages and masks, and returns (loss, stats).
"""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Â_i = (R_i - mean R) / (std R + 1e-4), std with Bessel's correction as in TRL (Eq. 2)."""
    rewards = rewards.float()
    return (rewards - rewards.mean()) / (rewards.std(unbiased=True) + 1e-4)  # Eq. (2)


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per token: r - log r - 1, r = pi_ref / pi_theta (Eq. 4)."""
    log_ratio = logp_ref - logp
    return torch.exp(log_ratio) - log_ratio - 1  # Eq. (4)


def sgrpo_select(length: int, alpha: int, k: int, p: float, generator: torch.Generator | None = None) -> list[int]:
    """Algorithm 1: the 0-based positions of one completion's tokens that enter the S-GRPO loss.

    Position j is kept if j < alpha (our reading: the first alpha tokens); after that, while fewer
    than k are kept, each is kept with probability p; once k are kept the loop stops."""
    draws = torch.rand(length, generator=generator).tolist()  # one uniform per position, from its own stream
    selected: list[int] = []
    for j in range(length):
        if j < alpha:
            selected.append(j)
        elif len(selected) < k:
            if draws[j] < p:  # s ~ Bernoulli(P)
                selected.append(j)
        else:
            break
    return selected


def grpo_loss(
    logp: torch.Tensor,
    logp_ref: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    clip_eps: float | None = None,
    logp_old: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """-J of Eq. (3) (GRPO) or, when `mask` holds S-GRPO's selection T_i, of Eq. (5) (S-GRPO).

    logp, logp_ref, mask: (B, T), log pi of the sampled tokens and 1 where a token counts.
    advantages: (B,). Returns the mean over the B completions of each one's token mean, so a
    caller that feeds a group in slices scales each slice's loss by B_slice / |G| (Algorithm 2).
    One update per group (mu = 1) makes pi_old = pi_theta: the ratio is exactly 1 in value and
    its gradient is grad log pi; the eps-clip is an option that then changes nothing."""
    old = logp.detach() if logp_old is None else logp_old
    ratio = torch.exp(logp - old)
    adv = advantages[:, None].to(logp.dtype)
    surrogate = ratio * adv
    if clip_eps is not None:
        surrogate = torch.min(surrogate, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # PPO clip, Eq. (3)
    per_token = surrogate
    kl = torch.zeros_like(logp)
    if beta and logp_ref is not None:
        kl = kl_k3(logp, logp_ref)
        per_token = surrogate - beta * kl  # Eq. (3)/(5): A·ratio - beta·D_KL
    mask = mask.to(logp.dtype)
    counts = mask.sum(1).clamp(min=1)
    loss = -((per_token * mask).sum(1) / counts).mean()  # (1/|G|) Σ_i (1/|T_i|) Σ_{t in T_i}
    stats = {"kl": ((kl * mask).sum(1) / counts).mean().item(), "tokens": int(mask.sum().item())}
    return loss, stats


sgrpo_loss = grpo_loss  # Eq. (5) is Eq. (3) restricted to the tokens T_i chosen by `sgrpo_select`


class PrefixTree:
    """A trie over the completions of one prompt (T-SPMO). Node 0 is the root: the prompt.

    Every other node is a unique (prefix p, next token v) pair, i.e. an edge into it; it holds
    |G_{p∘v}| and the sum of R over the completions that pass through it."""

    def __init__(self, completions: list[list[int]], rewards: list[float]):
        self.children: list[dict[int, int]] = [{}]
        self.parent, self.token, self.count, self.reward_sum = [-1], [-1], [0], [0.0]
        self.paths: list[list[int]] = []  # paths[i][t] = node of (y_i[:t], y_i[t])
        for tokens, r in zip(completions, rewards):
            node, path = 0, []
            self.count[0] += 1
            self.reward_sum[0] += r
            for v in tokens:
                child = self.children[node].get(v)
                if child is None:
                    child = len(self.parent)
                    self.children[node][v] = child
                    self.children.append({})
                    self.parent.append(node)
                    self.token.append(v)
                    self.count.append(0)
                    self.reward_sum.append(0.0)
                self.count[child] += 1
                self.reward_sum[child] += r
                path.append(child)
                node = child
            self.paths.append(path)

    def __len__(self) -> int:
        return len(self.parent) - 1  # |U|: the number of edges = unique (p, v) pairs

    def expected_reward(self, node: int) -> float:
        return self.reward_sum[node] / self.count[node]  # E[R | p] = mean of R over G_p, Eq. (8)-(9)

    def advantage(self, node: int) -> float:
        return self.expected_reward(node) - self.expected_reward(self.parent[node])  # A(v|p), Eq. (7)


def prefix_advantages(completions: list[list[int]], rewards: list[float]) -> dict[tuple[tuple[int, ...], int], float]:
    """A(v|p) = E[R | p∘v] - E[R | p] for every unique (prefix, next token) pair, zeros included (Eq. 7-9).

    len() of the result is |U|. The training loop uses `PrefixTree` directly (no prefix tuples)."""
    tree = PrefixTree(completions, rewards)
    out: dict[tuple[tuple[int, ...], int], float] = {}
    for tokens, path in zip(completions, tree.paths):
        for t, node in enumerate(path):
            out.setdefault((tuple(tokens[:t]), tokens[t]), tree.advantage(node))
    return out


def tspmo_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    num_pairs: int,
    lora_weights: list[torch.Tensor] | tuple = (),
    lam: float = 0.0,
    log_prob: bool = False,
) -> tuple[torch.Tensor, dict]:
    """-J of Eq. (10): -(1/|U|) Σ_{(p,v)} pi(v|p)·A(v|p) + lam·Σ_W ||W||².

    logp: (N,) log pi(v|p) of the pairs given (those with A != 0 suffice: the others add 0);
    advantages: (N,); num_pairs: |U|, all unique pairs of the tree. The objective uses pi, not
    log pi, as written in Eq. (10); log_prob=True is the log-pi variant. Pass `lora_weights`
    once per update (not once per slice) so the L2 term counts once."""
    pi = logp if log_prob else torch.exp(logp)
    objective = (pi * advantages.to(pi.dtype)).sum() / num_pairs  # (1/|U|) Σ pi(v|p)·A(v|p), Eq. (10)
    l2 = sum((w.float() ** 2).sum() for w in lora_weights) if len(lora_weights) else torch.zeros((), device=logp.device)
    loss = -objective + lam * l2  # - J, with J's - lam Σ ||W||² term
    return loss, {"l2": l2.detach().item(), "objective": objective.item()}
