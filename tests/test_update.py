"""The update path on a real (tiny) model: gradient signs, selective head == full logits, no autograd below LoRA."""
import pytest
import torch

from tinyrl import cpu
from tinyrl.lora import inject_lora, lora_modules, lora_parameters
from tinyrl.objectives import PrefixTree, group_advantages, sgrpo_select, tspmo_loss
from tinyrl import update
from tinyrl.lora import disable_lora
from tinyrl.update import (Trunk, grpo_backward, l2_gradient, make_optimizer, pack, selected_logprobs, tspmo_backward,
                           tspmo_positions)

PROMPT = [1, 40, 41, 42, 43, 44]


@pytest.fixture
def model(tiny):
    m, _ = tiny
    inject_lora(m, rank=4, fraction=0.5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0, so gradients reach A too and LoRA on/off differ
        for mod in lora_modules(m).values():
            mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.05)
    return m


def first_token_probs(model, tokens):
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([PROMPT])).logits[0, -1].float(), -1)[tokens]


def sgd_step(model, lr=0.05):
    with torch.no_grad():
        for p in lora_parameters(model):
            p -= lr * p.grad
            p.grad = None


@pytest.mark.parametrize("algo", ["grpo", "sgrpo", "tspmo"])
def test_one_step_raises_good_token_and_lowers_bad(model, algo):
    good, bad = 50, 60
    completions = [[good, 7, 8, 0], [bad, 7, 8, 0], [good, 9, 0], [bad, 9, 0]]
    rewards = [1.0, 0.0, 1.0, 0.0]
    before = first_token_probs(model, [good, bad])
    if algo == "tspmo":
        tree = PrefixTree(completions, rewards)
        tspmo_backward(model, PROMPT, completions, tree, pad_id=0)
    else:
        sel = torch.Generator().manual_seed(0)
        positions = [list(range(len(c))) if algo == "grpo" else sgrpo_select(len(c), 1, 2, 0.5, sel)
                     for c in completions]
        assert all(0 in ts for ts in positions)
        grpo_backward(model, PROMPT, completions, group_advantages(torch.tensor(rewards)), positions, beta=0.01,
                      pad_id=0)
    sgd_step(model)
    after = first_token_probs(model, [good, bad])
    assert after[0] > before[0] and after[1] < before[1]


def test_lam_in_the_loss_gives_eq10s_gradient(model):
    """--lam-mode loss: the policy term's backward plus `l2_gradient` equal autograd through Eq. (10) as written,
    -(1/|U|) Σ pi·A + lam·Σ||W||² over every LoRA matrix (the gradients training had before the modes existed)."""
    g = torch.Generator().manual_seed(3)
    completions = [torch.randint(3, 299, (n,), generator=g).tolist() for n in (6, 5, 8)]
    completions[1] = completions[0][:2] + completions[1]
    tree, params, lam = PrefixTree(completions, [1.0, 0.0, 1.0]), lora_parameters(model), 0.01
    positions, advantages = tspmo_positions(tree)
    needed = [i for i, ts in enumerate(positions) if ts]
    logp = selected_logprobs(model, PROMPT, [completions[i] for i in needed], [positions[i] for i in needed], 0)
    adv = torch.tensor([a for i in needed for a in advantages[i]])
    objective = torch.autograd.grad(tspmo_loss(logp, adv, len(tree))[0], params, retain_graph=True)
    expected = torch.autograd.grad(tspmo_loss(logp, adv, len(tree), params, lam)[0], params)  # Eq. (10) whole
    zero(model)
    tspmo_backward(model, PROMPT, completions, tree, pad_id=0)
    norms = l2_gradient(params, lam)
    assert all(torch.allclose(p.grad, e, rtol=1e-5, atol=1e-9) for p, e in zip(params, expected))
    assert norms["grad_norm"] == pytest.approx(torch.linalg.vector_norm(torch.cat([o.flatten() for o in objective])).item(),
                                               rel=1e-5)
    weights = torch.cat([p.detach().flatten() for p in params])
    assert norms["grad_norm_l2"] == pytest.approx(2 * lam * weights.norm().item(), rel=1e-5)
    assert norms["l2_loss"] == pytest.approx(lam * weights.square().sum().item(), rel=1e-5)


def test_lam_with_no_policy_gradient_still_acts_in_loss_mode(model):
    completions, rewards = [[5, 0], [5, 0]], [1.0, 1.0]  # every A = 0: only the L2 term acts
    zero(model)
    tspmo_backward(model, PROMPT, completions, PrefixTree(completions, rewards), pad_id=0)
    norms = l2_gradient(lora_parameters(model), 0.1)
    assert norms["grad_norm"] == 0.0
    assert all(torch.allclose(p.grad, 0.2 * p) for p in lora_parameters(model))  # d/dW of lam·||W||² = 2·lam·W


def toy_objective(w: torch.Tensor) -> torch.Tensor:
    return ((w - torch.linspace(-1, 1, w.numel())) ** 2).sum() * 1e-3  # any smooth loss with a nonzero gradient


@pytest.mark.parametrize("lam_mode", ["loss", "decoupled"])
def test_lam_modes_equal_torch_adamw_step_for_step(lam_mode):
    """decoupled = torch.optim.AdamW(weight_decay=lam) on the objective alone; loss = AdamW(weight_decay=0) on the
    objective + lam·||W||², differentiated by autograd. 30 steps, compared after each."""
    lr, lam = 1e-2, 0.05
    w = torch.nn.Parameter(torch.linspace(0.5, -0.3, 6))
    ref = torch.nn.Parameter(w.detach().clone())
    opt, lam_in_loss = make_optimizer([w], lr, lam, lam_mode)
    ref_opt = torch.optim.AdamW([ref], lr=lr, weight_decay=lam if lam_mode == "decoupled" else 0.0)
    for _ in range(30):
        toy_objective(w).backward()
        l2_gradient([w], lam_in_loss)
        opt.step()
        opt.zero_grad()
        (toy_objective(ref) + (lam * (ref ** 2).sum() if lam_mode == "loss" else 0)).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert torch.allclose(w, ref, rtol=1e-6, atol=1e-8)
    assert opt.param_groups[0]["weight_decay"] == (lam if lam_mode == "decoupled" else 0.0)


def test_lam_in_the_loss_erases_an_adapter_that_gets_no_policy_gradient():
    """The mechanism of docs/design.md, by hand. B = 0 at initialisation, so A's only gradient is 2·lam·A. Adam's
    first step is lr·g/(|g| + eps) = lr, whatever lam; later steps stay <= lr as |g| shrinks. At the paper's lr 1e-4
    and lam 0.01, an A entry of Qwen2-1.5B's mean size (1/(2·sqrt(1536)) = 0.0128) loses ~lr a step at first and is
    under a tenth of itself by step 200. The decoupled reading multiplies it by (1 - lr·lam) a step instead."""
    lr, lam, a0 = 1e-4, 0.01, 1 / (2 * 1536 ** 0.5)
    for lam_mode in ("loss", "decoupled"):
        a = torch.nn.Parameter(torch.full((8,), a0, dtype=torch.float64))  # float64: no rounding in the hand check
        opt, lam_in_loss = make_optimizer([a], lr, lam, lam_mode)
        values = []
        for _ in range(200):
            a.grad = torch.zeros_like(a)  # backward reaches A, but while B = 0 its policy gradient is 0
            l2_gradient([a], lam_in_loss)
            opt.step()
            values.append(a[0].item())
        if lam_mode == "loss":
            g = 2 * lam * a0
            assert values[0] == pytest.approx(a0 - lr * g / (g + 1e-8), rel=1e-6)  # step 1: exactly lr
            steps = [x - y for x, y in zip([a0] + values, values)]
            assert all(0 < s <= lr * 1.0001 for s in steps)  # shrinks every step, never by more than lr
            assert a0 - values[49] > 0.8 * 50 * lr  # ~lr a step over the first 50
            assert values[-1] < 0.1 * a0  # erased by step 200
        else:
            assert values[-1] == pytest.approx(a0 * (1 - lr * lam) ** 200, rel=1e-6)


def grads(model):
    return [p.grad.clone() for p in lora_parameters(model)]


def zero(model):
    for p in lora_parameters(model):
        p.grad = None


def backward_once(model, algo, full_logits=False, **kw) -> tuple[float, list[torch.Tensor]]:
    """One update of `algo` on a fixed group with shared prefixes: (loss, LoRA gradients)."""
    g = torch.Generator().manual_seed(1)
    completions = [torch.randint(3, 299, (n,), generator=g).tolist() for n in (9, 4, 12, 7)]
    completions[1] = completions[0][:2] + completions[1]  # shared prefixes make a real tree
    rewards = [1.0, 0.0, 0.0, 1.0]
    zero(model)
    if algo == "tspmo":
        stats = tspmo_backward(model, PROMPT, completions, PrefixTree(completions, rewards), 0,
                               max_batch_tokens=30, full_logits=full_logits, **kw)
    else:
        sel = torch.Generator().manual_seed(0)
        positions = [list(range(len(c))) if algo == "grpo" else sgrpo_select(len(c), 2, 4, 0.5, sel)
                     for c in completions]
        stats = grpo_backward(model, PROMPT, completions, group_advantages(torch.tensor(rewards)), positions,
                              0.01, 0, max_batch_tokens=30, full_logits=full_logits, **kw)
    return stats["loss"], grads(model)


@pytest.mark.parametrize("algo", ["grpo", "sgrpo", "tspmo"])
def test_selective_loss_equals_full_logits_loss(model, algo):
    (loss_sel, g_sel), (loss_full, g_full) = backward_once(model, algo), backward_once(model, algo, full_logits=True)
    assert loss_sel == pytest.approx(loss_full, rel=1e-5, abs=1e-8)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g_sel, g_full))
    assert any(a.abs().sum() > 0 for a in g_sel)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("algo", ["grpo", "sgrpo", "tspmo"])
def test_update_on_packed_cpu_kernels_equals_torch_kernels(model, algo, monkeypatch):
    """On CPU the update runs frozen layers on oneDNN (packed W forward, packed W^T backward): same loss and
    gradients as torch's own kernels, and the packed backward really ran."""
    calls = []
    backward = cpu._PackedLinear.backward
    monkeypatch.setattr(cpu._PackedLinear, "backward",
                        staticmethod(lambda ctx, grad: calls.append(ctx.layer) or backward(ctx, grad)))
    monkeypatch.setattr(cpu, "_mode", "fast")
    loss_packed, g_packed = backward_once(model, algo)
    assert model.lm_head in calls and len(set(calls)) > 1  # the LM head and the layers above the first LoRA layer
    monkeypatch.setattr(cpu, "_mode", "torch")
    calls.clear()
    loss_torch, g_torch = backward_once(model, algo)
    assert not calls
    assert loss_packed == pytest.approx(loss_torch, rel=1e-5, abs=1e-8)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g_packed, g_torch))
    assert not any("forward" in vars(m) for m in model.modules())  # the layers are as they were


def test_selected_logprobs_match_full_forward(model):
    completions, positions = [[5, 6, 7, 8], [9, 10]], [[0, 3], [1]]
    got = selected_logprobs(model, PROMPT, completions, positions, pad_id=0)
    expected = []
    for y, ts in zip(completions, positions):
        with torch.no_grad():
            logp = model(torch.tensor([PROMPT + y])).logits[0].float().log_softmax(-1)
        expected += [logp[len(PROMPT) - 1 + t, y[t]] for t in ts]
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)


def test_frozen_layers_below_lora_hold_no_autograd_state(model):
    outputs = {}
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(
        i, out[0] if isinstance(out, tuple) else out)) for i, layer in enumerate(model.model.layers)]
    logp = selected_logprobs(model, PROMPT, [[5, 6, 7]], [[0, 1, 2]], pad_id=0)
    for h in hooks:
        h.remove()
    assert logp.requires_grad
    assert [outputs[i].grad_fn is None for i in range(4)] == [True, True, False, False]  # LoRA on layers 2, 3


def test_reference_pass_from_the_trunk_equals_a_whole_pass(model):
    """pi_ref's log-probabilities from the policy pass's hidden state at the first LoRA layer (layers 2, 3 here)
    equal a whole reference pass, and the layers below are not run again."""
    completions, positions = [[5, 6, 7, 8], [9, 10]], [[0, 1, 3], [1]]
    with torch.no_grad(), disable_lora(model):
        whole = selected_logprobs(model, PROMPT, completions, positions, pad_id=0)
    trunk = Trunk.of(model)
    assert trunk.layers == list(model.model.layers)[2:]
    with trunk.keep():
        policy = selected_logprobs(model, PROMPT, completions, positions, pad_id=0)
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args, i=i: calls.append(i))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad(), disable_lora(model):
        ref = selected_logprobs(model, PROMPT, completions, positions, pad_id=0, hidden=trunk.top())
    for h in hooks:
        h.remove()
    assert calls == [2, 3]
    assert torch.equal(ref, whole)
    assert not torch.allclose(policy, whole)  # the adapters change the policy: the two passes differ above
    with torch.random.fork_rng():  # a fresh model draws its weights: keep the other tests' random numbers
        assert Trunk.of(type(model)(model.config)) is None  # no LoRA, no trunk


@pytest.mark.parametrize("algo", ["grpo", "sgrpo"])
def test_grpo_update_with_the_trunk_equals_two_whole_passes(model, algo, monkeypatch):
    with_trunk = backward_once(model, algo)
    monkeypatch.setattr(update.Trunk, "of", classmethod(lambda cls, model: None))
    without = backward_once(model, algo)
    assert with_trunk[0] == pytest.approx(without[0], rel=1e-6, abs=1e-9)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(with_trunk[1], without[1]))


def test_tspmo_positions_own_each_pair_once():
    completions = [[1, 2, 3], [1, 2, 4], [1, 5], [1, 2, 3]]
    tree = PrefixTree(completions, [1.0, 0.0, 1.0, 1.0])
    positions, advantages = tspmo_positions(tree)
    # (,1) has A = 0 (everyone starts with 1); (1,2) vs (1,5) and (12,3) vs (12,4) branch
    assert positions == [[1, 2], [2], [1], []]
    assert advantages[0] == [pytest.approx(2 / 3 - 3 / 4), pytest.approx(1 - 2 / 3)]
    shards = [tspmo_positions(tree, (r, 2))[0] for r in (0, 1)]
    assert shards == [[[1, 2], [], [1], []], [[], [2], [], []]]  # every pair on exactly one rank


def test_pack_respects_the_token_budget():
    lengths = {0: 10, 1: 30, 2: 12, 3: 9, 4: 40}
    batches = pack(lengths, max_batch_tokens=40)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 40
        assert min(lengths[i] for i in b) >= 0.75 * max(lengths[i] for i in b)  # padding wastes <= 1/4
    assert pack(lengths, None) == [[4, 1], [2, 0, 3]]
    assert pack({0: 10, 1: 10, 2: 10}, None) == [[0, 1, 2]]


def tempered_logprobs(model, completions, positions, temperature):
    """log softmax(logits / T) of each selected token, from one full forward per completion (with grad)."""
    out = []
    for y, ts in zip(completions, positions):
        logp = (model(torch.tensor([PROMPT + y])).logits[0].float() / temperature).log_softmax(-1)
        out += [logp[len(PROMPT) - 1 + t, y[t]] for t in ts]
    return torch.stack(out)


def test_selected_logprobs_at_a_temperature_equal_tempered_log_softmax(model):
    completions, positions = [[5, 6, 7, 8], [9, 10]], [[0, 3], [1]]
    for t in (0.3, 2.0):
        got = selected_logprobs(model, PROMPT, completions, positions, pad_id=0, temperature=t)
        with torch.no_grad():
            assert torch.allclose(got, tempered_logprobs(model, completions, positions, t), atol=1e-5)
    assert not torch.allclose(got, selected_logprobs(model, PROMPT, completions, positions, pad_id=0), atol=1e-3)


def test_tspmo_pi_is_the_tempered_policy(model):
    completions = [[5, 6, 7], [5, 8, 9], [11, 12]]
    tree, pairs, t = PrefixTree(completions, [1.0, 0.0, 1.0]), [], 0.3
    zero(model)
    stats = tspmo_backward(model, PROMPT, completions, tree, 0, pairs=pairs, temperature=t)
    logp = tempered_logprobs(model, [completions[i] for i, *_ in pairs], [[p[1]] for p in pairs], t)
    assert [p[3] for p in pairs] == pytest.approx(logp.exp().tolist(), rel=1e-5)
    want = grads(model)
    zero(model)
    loss, _ = tspmo_loss(logp, torch.tensor([p[2] for p in pairs]), len(tree))  # Eq. (10) on tempered pi
    loss.backward()
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(want, grads(model)))


def test_grpo_policy_and_kl_terms_use_the_tempered_policy(model):
    from tinyrl.lora import disable_lora
    from tinyrl.objectives import grpo_loss

    completions, t, beta = [[5, 6, 7], [8, 9], [10, 11, 12, 13]], 0.3, 0.5
    positions = [list(range(len(c))) for c in completions]
    advantages = group_advantages(torch.tensor([1.0, 0.0, 1.0]))
    zero(model)
    stats = grpo_backward(model, PROMPT, completions, advantages, positions, beta, 0, temperature=t)
    want = grads(model)
    zero(model)
    rows = lambda x: torch.nn.utils.rnn.pad_sequence(x.split([len(p) for p in positions]), batch_first=True)  # noqa
    with torch.no_grad(), disable_lora(model):
        ref = tempered_logprobs(model, completions, positions, t)
    mask = rows(torch.ones(sum(map(len, positions))))
    loss, st = grpo_loss(rows(tempered_logprobs(model, completions, positions, t)), rows(ref), advantages, mask, beta)
    loss.backward()
    # the loss is a small difference of O(1) terms (the advantages sum to 0): float32 rounding is absolute here
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    assert stats["kl"] == pytest.approx(st["kl"], rel=1e-4)
    assert st["kl"] > 0  # the adapter is on: the KL term is not vacuous
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(want, grads(model)))


@pytest.mark.parametrize("algo", ["grpo", "tspmo"])
def test_temperature_one_is_the_untempered_update(model, algo):
    (loss_off, g_off), (loss_one, g_one) = backward_once(model, algo), backward_once(model, algo, temperature=1.0)
    assert loss_off == loss_one and all(torch.equal(a, b) for a, b in zip(g_off, g_one))
    loss_t, _ = backward_once(model, algo, temperature=0.3)
    assert loss_t != pytest.approx(loss_off, rel=1e-3)  # the temperature does act
