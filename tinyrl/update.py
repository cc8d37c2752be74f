"""From one sampled group to LoRA gradients: positions -> selective forward -> loss -> backward.

Memory is the point (paper §III). Three rules keep the update small:
1. Never build (batch, length, vocab) logits. The decoder gives hidden states; only the positions
   that enter the loss are gathered, and the LM head + log-softmax run there, in chunks that are
   recomputed in backward (a 151,936-word vocabulary makes logits the largest tensor by far).
2. Cut each sequence after the last position the loss needs, and pack sequences into forward
   passes under a token budget (`max_batch_tokens`): Algorithm 2's one completion per pass is
   the smallest budget; larger budgets give the same gradient with fewer passes.
3. The reference pass (LoRA off) runs under no_grad, and only when beta > 0. Layers below the
   first LoRA layer hold no autograd state: nothing there requires grad, so autograd records nothing.
   They also compute the same for pi and pi_ref, so the reference pass starts at the first LoRA layer,
   from the policy pass's hidden state there (`Trunk`): with the paper's last third, a third of a pass.
On CPU the frozen linear layers may run on oneDNN with packed weights where a measurement on the
machine says it is faster (`update_kernels`, tinyrl/cpu.py).
`shard=(rank, world)` makes each process handle its share for group-parallel training.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint

from tinyrl import cpu
from tinyrl.lora import decoder_layers, disable_lora, lora_modules
from tinyrl.objectives import PrefixTree, grpo_loss, tspmo_loss


def _head_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                   temperature: float = 1.0) -> torch.Tensor:
    logits = head(hidden).float() / temperature  # (n, V): one chunk only
    return logits.gather(-1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def selected_logprobs(
    model,
    prompt_ids: list[int],
    completions: list[list[int]],
    positions: list[list[int]],
    pad_id: int,
    head_chunk: int = 256,
    full_logits: bool = False,
    temperature: float = 1.0,
    hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """log pi(y_i[t] | prompt, y_i[:t]) for every t in positions[i], flattened in (i, t) order: (N,); pi is
    softmax(logits / temperature), the untempered policy at the default 1 (`--score-temperature`).
    `hidden` is the decoder's output (B, S, H) for these rows where it was already computed (`Trunk.top`).

    Row i is prompt + y_i[:max t]: the last target itself is never fed in. Rows are right-padded,
    which a causal model needs no mask for. full_logits=True is the naive reference that builds
    all logits; it exists to test and benchmark the selective path against."""
    device = next(model.parameters()).device
    P = len(prompt_ids)
    seqs = [torch.as_tensor(prompt_ids + y[: max(ts)], device=device) for y, ts in zip(completions, positions)]
    input_ids = pad_sequence(seqs, batch_first=True, padding_value=pad_id)  # (B, S)
    rows = torch.cat([torch.full((len(ts),), i, device=device) for i, ts in enumerate(positions)])
    cols = torch.cat([torch.as_tensor(ts, device=device) + P - 1 for ts in positions])  # logits at P-1+t predict y[t]
    targets = torch.cat([torch.as_tensor([y[t] for t in ts], device=device) for y, ts in zip(completions, positions)])
    if full_logits:
        logits = model(input_ids=input_ids).logits.float() / temperature  # (B, S, V): what the selective path avoids
        return logits.log_softmax(-1)[rows, cols].gather(-1, targets[:, None]).squeeze(1)
    if hidden is None:
        hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, S, H)
    picked = hidden[rows, cols]  # (N, H)
    head = model.get_output_embeddings()
    out = []
    for h, tgt in zip(picked.split(head_chunk), targets.split(head_chunk)):
        if torch.is_grad_enabled():  # keep only (n, H) for backward; the (n, V) chunk is recomputed
            out.append(checkpoint(_head_logprobs, h, tgt, head, temperature, use_reentrant=False))
        else:
            out.append(_head_logprobs(h, tgt, head, temperature))
    return torch.cat(out)


class Trunk:
    """The decoder layers below the first LoRA layer compute the same for pi and pi_ref. Inside `keep()`, a
    forward records the first LoRA layer's input and the keyword arguments (mask, rotary embeddings) of it
    and every later layer; `top()` then runs only those layers and the final norm from there: the
    reference pass (LoRA off) without recomputing the trunk. None for a model without LoRA or a final `norm`."""

    @classmethod
    def of(cls, model) -> "Trunk | None":
        decoder = model.base_model
        _, layers = decoder_layers(decoder)
        adapted = [i for i, layer in enumerate(layers) if lora_modules(layer)]
        norm = getattr(decoder, "norm", None)
        return cls(list(layers)[adapted[0]:], norm) if adapted and isinstance(norm, torch.nn.Module) else None

    def __init__(self, layers: list[torch.nn.Module], norm: torch.nn.Module):
        self.layers, self.norm = layers, norm
        self.hidden, self.kwargs = None, []

    @contextmanager
    def keep(self):
        def record(layer, args, kwargs):
            if not self.kwargs:
                self.hidden = (args[0] if args else kwargs["hidden_states"]).detach()
            self.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        self.hidden, self.kwargs = None, []
        hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in self.layers]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()

    def top(self) -> torch.Tensor:
        """The decoder's output (B, S, H) from the kept hidden state, through the kept layers as they are now."""
        h = self.hidden
        for layer, kwargs in zip(self.layers, self.kwargs, strict=True):
            h = layer(h, **kwargs)
            h = h[0] if isinstance(h, tuple) else h
        return self.norm(h)


def update_kernels(model, tokens: int = 256):
    """The kernels a CPU model's update runs on (`tinyrl.cpu.choose`): measured once, on a forward pass of
    `tokens` tokens and the LM head over them; elsewhere torch's own."""
    def forward():  # built and run only while the choice is being measured
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(model.device)
        with torch.no_grad():
            model.get_output_embeddings()(model.base_model(input_ids=ids).last_hidden_state)

    kernels = cpu.choose(model, "update", cpu.timed(forward), [cpu.Kernels(linear=True)], f"{tokens} tokens") \
        if cpu.is_cpu(model) else cpu.TORCH
    return cpu.use(model, kernels, backward=True)


def pack(lengths: dict[int, int], max_batch_tokens: int | None, min_fill: float = 0.75) -> list[list[int]]:
    """Group keys into forward passes of similar length under a token budget.

    Longest first; a row joins the current pass if the padded size (rows x longest) stays within
    `max_batch_tokens` and the row is at least `min_fill` of the longest, so padding wastes at most
    a quarter of the compute. A row longer than the budget runs alone."""
    order = sorted(lengths, key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        longest = lengths[batches[-1][0]] if batches else 0
        fits = batches and lengths[i] >= min_fill * longest and (
            not max_batch_tokens or (len(batches[-1]) + 1) * longest <= max_batch_tokens)
        if fits:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def grpo_backward(
    model,
    prompt_ids: list[int],
    completions: list[list[int]],
    advantages: torch.Tensor,
    positions: list[list[int]],
    beta: float,
    pad_id: int,
    clip_eps: float | None = None,
    max_batch_tokens: int | None = None,
    scale: float = 1.0,
    shard: tuple[int, int] = (0, 1),
    full_logits: bool = False,
    temperature: float = 1.0,
) -> dict:
    """Backpropagate GRPO / S-GRPO (Eq. 3 / 5) for one group; positions[i] are the tokens T_i of completion i.

    Each completion's loss is divided by |G| (Algorithm 2), times `scale` (1/prompts per step). Both the policy's
    and the reference's log-probabilities come from logits / temperature."""
    G, (rank, world) = len(completions), shard
    # DEVIATION: Algorithm 2 runs one forward+backward per completion; we pack completions into passes under
    # max_batch_tokens (a budget of one completion is Algorithm 2). The gradient is the same sum either way.
    mine = {i: len(prompt_ids) + max(positions[i]) for i in range(G) if positions[i] and i % world == rank}
    stats = {"loss": 0.0, "kl": 0.0, "tokens_in_loss": 0, "forward_tokens": 0, "forward_passes": 0}
    trunk = Trunk.of(model) if beta > 0 and not full_logits else None
    with update_kernels(model):
        for batch in pack(mine, max_batch_tokens):
            args = (prompt_ids, [completions[i] for i in batch], [positions[i] for i in batch], pad_id)
            with trunk.keep() if trunk else nullcontext():
                logp = selected_logprobs(model, *args, full_logits=full_logits, temperature=temperature)
            logp_ref = None
            if beta > 0:
                with torch.no_grad(), disable_lora(model):
                    logp_ref = selected_logprobs(model, *args, full_logits=full_logits, temperature=temperature,
                                                 hidden=trunk.top() if trunk else None)
            counts = [len(positions[i]) for i in batch]
            as_rows = lambda x: pad_sequence(x.split(counts), batch_first=True)  # (B, K)  # noqa: E731
            mask = as_rows(torch.ones_like(logp))
            loss, st = grpo_loss(as_rows(logp), None if logp_ref is None else as_rows(logp_ref),
                                 advantages[batch].to(logp.device), mask, beta, clip_eps)
            loss = loss * len(batch) / G * scale  # this slice's share of (1/|G|) Σ_i
            loss.backward()
            stats["loss"] += loss.item()
            stats["kl"] += st["kl"] * len(batch) / G
            stats["tokens_in_loss"] += st["tokens"]
            stats["forward_tokens"] += sum(mine[i] for i in batch)
            stats["forward_passes"] += 1
    return stats


def tspmo_positions(tree: PrefixTree, shard: tuple[int, int] = (0, 1)) -> tuple[list[list[int]], list[list[float]]]:
    """For each completion, the positions t whose pair (y[:t], y[t]) has A != 0 and appears first in it.

    Each needed pair is computed once, by the first completion that holds it; pairs with A = 0 add
    nothing to Eq. (10) and need no forward. With shards, whole completions go round-robin to ranks."""
    rank, world = shard
    seen: set[int] = set()
    positions, advantages = [], []
    for i, path in enumerate(tree.paths):
        ts, adv = [], []
        for t, node in enumerate(path):
            a = tree.advantage(node)
            if a != 0.0 and node not in seen:
                seen.add(node)
                if i % world == rank:
                    ts.append(t)
                    adv.append(a)
        positions.append(ts)
        advantages.append(adv)
    return positions, advantages


def tspmo_backward(
    model,
    prompt_ids: list[int],
    completions: list[list[int]],
    tree: PrefixTree,
    pad_id: int,
    log_prob: bool = False,
    max_batch_tokens: int | None = None,
    scale: float = 1.0,
    shard: tuple[int, int] = (0, 1),
    full_logits: bool = False,
    pairs: list | None = None,
    temperature: float = 1.0,
) -> dict:
    """Backpropagate T-SPMO's policy term of Eq. (10) for one prefix tree: one forward per completion that owns
    needed pairs. Eq. (10)'s λ·Σ||W||² acts once per optimizer step, after every gradient is in (`l2_gradient`).
    Given a list, `pairs` receives (completion i, position t, A(v|p), pi(v|p)) of every pair the loss used."""
    positions, advantages = tspmo_positions(tree, shard)
    mine = {i: len(prompt_ids) + max(ts) for i, ts in enumerate(positions) if ts}
    num_pairs = len(tree)
    stats = {"loss": 0.0, "num_pairs": num_pairs, "nonzero_pairs": 0, "tokens_in_loss": 0, "forward_tokens": 0,
             "forward_passes": 0}
    device = next(model.parameters()).device
    with update_kernels(model):
        for batch in pack(mine, max_batch_tokens):  # none when no pair has A != 0: no policy gradient
            logp = selected_logprobs(model, prompt_ids, [completions[i] for i in batch],
                                     [positions[i] for i in batch], pad_id, full_logits=full_logits,
                                     temperature=temperature)  # pi(v|p) of Eq. (10), from logits / temperature
            adv = torch.tensor([a for i in batch for a in advantages[i]], device=device)
            loss, _ = tspmo_loss(logp, adv, num_pairs, log_prob=log_prob)
            if pairs is not None:
                owned = [(i, t, a) for i in batch for t, a in zip(positions[i], advantages[i])]  # logp's order
                pairs += [(i, t, a, pi) for (i, t, a), pi in zip(owned, logp.detach().exp().tolist())]
            loss = loss * scale
            loss.backward()
            stats["loss"] += loss.item()
            stats["nonzero_pairs"] += len(adv)
            stats["tokens_in_loss"] += len(adv)
            stats["forward_tokens"] += sum(mine[i] for i in batch)
            stats["forward_passes"] += 1
    return stats


def make_optimizer(params: list[torch.Tensor], lr: float, lam: float, lam_mode: str) -> tuple[torch.optim.AdamW, float]:
    """AdamW over the LoRA weights, and the λ that `l2_gradient` puts in the loss. The paper's "AdamW ... β = λ =
    0.01" has two readings: λ·Σ||W||² as a term of the loss (`loss`, Eq. 10 as written; AdamW's own decay 0),
    or AdamW's decoupled weight decay λ, W <- W - lr·λ·W each step (`decoupled`, no L2 term). docs/design.md."""
    if lam_mode not in ("loss", "decoupled"):
        raise ValueError(f"lam_mode must be loss or decoupled, got {lam_mode!r}")
    decay = lam if lam_mode == "decoupled" else 0.0
    return torch.optim.AdamW(params, lr=lr, weight_decay=decay), lam - decay


def l2_gradient(params: list[torch.Tensor], lam: float) -> dict:
    """Eq. (10)'s regulariser read as a term of the loss (`--lam-mode loss`): adds d/dW λ·Σ||W||² = 2λ·W to
    each gradient, once the objective's gradients are complete (every prompt of the step, every rank).

    Returns, for the log, the norm of the objective's gradient (`grad_norm`), of the L2 gradient
    (`grad_norm_l2`) and the L2 term's value (`l2_loss`), measured apart, before they are summed."""
    with torch.no_grad():
        objective = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in objective])) \
            if objective else torch.zeros(())
        sq = sum(p.float().square().sum() for p in params)  # Σ||W||²
        if lam:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(p, alpha=2 * lam)
    return {"grad_norm": grad_norm.item(), "grad_norm_l2": 2 * lam * math.sqrt(sq.item()), "l2_loss": lam * sq.item()}
