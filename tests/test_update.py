"""The update path on a real (tiny) model: gradient signs, selective head == full logits, no autograd below LoRA."""
import pytest
import torch

from tinyrl import cpu
from tinyrl.lora import inject_lora, lora_modules, lora_parameters
from tinyrl.objectives import PrefixTree, group_advantages, sgrpo_select
from tinyrl.update import grpo_backward, pack, selected_logprobs, tspmo_backward, tspmo_positions

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
        tspmo_backward(model, PROMPT, completions, tree, lam=0.0, lora_weights=[], pad_id=0)
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


def test_lambda_term_shrinks_lora_weights(model):
    completions, rewards = [[5, 0], [5, 0]], [1.0, 1.0]  # every A = 0: only the L2 term acts
    norm = sum((p ** 2).sum() for p in lora_parameters(model)).item()
    tspmo_backward(model, PROMPT, completions, PrefixTree(completions, rewards), lam=0.1,
                   lora_weights=lora_parameters(model), pad_id=0)
    for p in lora_parameters(model):
        assert torch.allclose(p.grad, 0.2 * p)  # d/dW of lam·||W||² = 2·lam·W
    sgd_step(model)
    assert sum((p ** 2).sum() for p in lora_parameters(model)).item() < norm


def grads(model):
    return [p.grad.clone() for p in lora_parameters(model)]


def zero(model):
    for p in lora_parameters(model):
        p.grad = None


def backward_once(model, algo, full_logits=False) -> tuple[float, list[torch.Tensor]]:
    """One update of `algo` on a fixed group with shared prefixes: (loss, LoRA gradients)."""
    g = torch.Generator().manual_seed(1)
    completions = [torch.randint(3, 299, (n,), generator=g).tolist() for n in (9, 4, 12, 7)]
    completions[1] = completions[0][:2] + completions[1]  # shared prefixes make a real tree
    rewards = [1.0, 0.0, 0.0, 1.0]
    zero(model)
    if algo == "tspmo":
        stats = tspmo_backward(model, PROMPT, completions, PrefixTree(completions, rewards), 0.01,
                               lora_parameters(model), 0, max_batch_tokens=30, full_logits=full_logits)
    else:
        sel = torch.Generator().manual_seed(0)
        positions = [list(range(len(c))) if algo == "grpo" else sgrpo_select(len(c), 2, 4, 0.5, sel)
                     for c in completions]
        stats = grpo_backward(model, PROMPT, completions, group_advantages(torch.tensor(rewards)), positions,
                              0.01, 0, max_batch_tokens=30, full_logits=full_logits)
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
