"""Hand-worked examples for the objectives (docs/design.md): every expected number is computed by hand below."""
import math

import pytest
import torch

from tinyrl.objectives import (PrefixTree, group_advantages, grpo_loss, kl_k3, prefix_advantages, sgrpo_loss,
                               sgrpo_select, tspmo_loss)


@pytest.mark.parametrize("length,alpha,k,p,expected", [
    (10, 3, 5, 1.0, [0, 1, 2, 3, 4]),  # alpha first, then every token until |T| = k, then stop
    (10, 3, 5, 0.0, [0, 1, 2]),  # P = 0: nothing after the first alpha
    (10, 20, 5, 0.5, list(range(10))),  # alpha >= length: every token
    (10, 3, 0, 1.0, [0, 1, 2]),  # k = 0: only the first alpha
    (10, 0, 4, 1.0, [0, 1, 2, 3]),
    (10, 5, 3, 1.0, [0, 1, 2, 3, 4]),  # alpha > k: the first alpha still all count
    (10, 0, 0, 1.0, []),
    (0, 50, 100, 0.1, []),
])
def test_sgrpo_select_hand_worked(length, alpha, k, p, expected):
    assert sgrpo_select(length, alpha, k, p, torch.Generator().manual_seed(0)) == expected


def test_sgrpo_select_is_seeded_and_random_after_alpha():
    pick = lambda seed: sgrpo_select(300, 50, 100, 0.1, torch.Generator().manual_seed(seed))  # noqa: E731
    assert pick(0) == pick(0) and pick(0) != pick(1)
    sel = pick(0)
    assert sel[:50] == list(range(50)) and 50 < len(sel) <= 100 and all(j > 49 for j in sel[50:])


def test_group_advantages_2x3():
    adv = group_advantages(torch.tensor([1.0, 0.0]))
    std = math.sqrt((0.5 ** 2 + 0.5 ** 2) / (2 - 1))  # Bessel: divide by n - 1
    assert torch.allclose(adv, torch.tensor([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)]))
    adv3 = group_advantages(torch.tensor([1.0, 1.0, 1.0]))
    assert torch.equal(adv3, torch.zeros(3))  # equal rewards: no signal


def test_kl_k3():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.equal(kl_k3(logp, logp), torch.zeros(3))
    ref = torch.tensor([-1.5, -1.0, -0.5])
    kl = kl_k3(logp, ref)
    assert kl[0].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1) and kl[1].item() == pytest.approx(math.e - 2)
    assert (kl[:2] > 0).all() and kl[2] == 0


def test_grpo_loss_2x3_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, -9.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, -0.5], [-0.2, -2.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # completion 2 has 2 tokens
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    beta = 0.01
    k = lambda lp, lr: math.exp(lr - lp) - (lr - lp) - 1  # noqa: E731
    row1 = [-(a - beta * k(-1.0, -1.5)), -(a - beta * k(-2.0, -2.0)), -(a - beta * k(-0.5, -0.5))]
    row2 = [-(-a - beta * k(-0.2, -0.2)), -(-a - beta * k(-3.0, -2.0))]
    expected = (sum(row1) / 3 + sum(row2) / 2) / 2
    loss, stats = grpo_loss(logp, ref, torch.tensor([a, -a]), mask, beta)
    assert loss.item() == pytest.approx(expected, abs=1e-7)  # ±Â cancel: compare absolutely
    assert stats["tokens"] == 5
    loss.backward()
    # d loss / d logp[0,0] = -(1/2)(1/3)(a - beta * d k3/d logp), d k3/d logp = 1 - exp(ref - logp)
    assert logp.grad[0, 0].item() == pytest.approx(-(a - beta * (1 - math.exp(-0.5))) / 6, rel=1e-5)
    assert logp.grad[1, 2].item() == 0.0  # masked out


def test_clip_changes_nothing_on_policy():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    l1, _ = grpo_loss(logp, None, torch.tensor([1.0]), torch.ones(1, 2), 0.0)
    g1 = torch.autograd.grad(l1, logp)[0]
    l2, _ = grpo_loss(logp, None, torch.tensor([1.0]), torch.ones(1, 2), 0.0, clip_eps=0.2)
    g2 = torch.autograd.grad(l2, logp)[0]
    assert l1.item() == l2.item() and torch.equal(g1, g2)
    old = torch.tensor([[-1.5, -2.0]])  # off-policy: the ratio of token 0 is e^0.5 > 1.2 and gets clipped
    l3, _ = grpo_loss(logp, None, torch.tensor([1.0]), torch.ones(1, 2), 0.0, clip_eps=0.2, logp_old=old)
    g3 = torch.autograd.grad(l3, logp)[0]
    assert g3[0, 0] == 0 and g3[0, 1] != 0


def test_sgrpo_with_every_token_selected_equals_grpo():
    torch.manual_seed(0)
    logp, ref = -torch.rand(3, 7), -torch.rand(3, 7)
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0]))
    full = torch.ones(3, 7)
    chosen = torch.zeros(3, 7)
    for i in range(3):
        chosen[i, sgrpo_select(7, 100, 100, 0.1, torch.Generator().manual_seed(i))] = 1
    assert torch.equal(chosen, full)
    assert sgrpo_loss(logp, ref, adv, chosen, 0.01)[0].item() == grpo_loss(logp, ref, adv, full, 0.01)[0].item()


# A hand-built tree: branching at depth 0 and 2, identical completions (y1, y5), a completion that
# is a prefix of others (y6, truncated without EOS), EOS-ended completions (token 0), a single path (y7).
TREE = [
    ([1, 2, 3, 0], 1.0),  # y1
    ([1, 2, 4, 0], 0.0),  # y2
    ([1, 5, 0], 1.0),  # y3
    ([6, 0], 0.0),  # y4
    ([1, 2, 3, 0], 1.0),  # y5 = y1
    ([1, 2], 0.0),  # y6: truncated, a prefix of y1, y2, y5
    ([7, 8, 9], 1.0),  # y7: alone on its branch, truncated
]


def test_prefix_advantages_hand_built_tree():
    adv = prefix_advantages([c for c, _ in TREE], [r for _, r in TREE])
    root = 4 / 7  # E[R] over all 7
    expected = {
        ((), 1): 3 / 5 - root,  # G_(1) = y1 y2 y3 y5 y6: 3 of 5 succeed
        ((), 6): 0 - root,
        ((), 7): 1 - root,
        ((1,), 2): 2 / 4 - 3 / 5,  # G_(1,2) = y1 y2 y5 y6
        ((1,), 5): 1 - 3 / 5,
        ((1, 2), 3): 1 - 2 / 4,
        ((1, 2), 4): 0 - 2 / 4,
        ((1, 2, 3), 0): 0.0,  # single child: E[R|p∘v] = E[R|p]
        ((1, 2, 4), 0): 0.0,
        ((1, 5), 0): 0.0,
        ((6,), 0): 0.0,
        ((7,), 8): 0.0,
        ((7, 8), 9): 0.0,
    }
    assert adv.keys() == expected.keys()
    for key, value in expected.items():
        assert adv[key] == pytest.approx(value, abs=1e-12), key
    assert len(adv) == 13 == len(PrefixTree([c for c, _ in TREE], [r for _, r in TREE]))  # |U| = unique pairs


def test_identical_completions_give_zero_advantages():
    adv = prefix_advantages([[3, 4, 0]] * 5, [1.0, 1.0, 1.0, 1.0, 1.0])
    assert len(adv) == 3 and set(adv.values()) == {0.0}
    adv = prefix_advantages([[3, 4, 0], [3, 4, 0]], [1.0, 0.0])  # same tokens, different rewards
    assert set(adv.values()) == {0.0}


def test_tspmo_loss_by_hand_and_lambda_term():
    logp = torch.log(torch.tensor([0.5, 0.25]))
    loss, _ = tspmo_loss(logp, torch.tensor([0.4, -0.2]), num_pairs=10)
    assert loss.item() == pytest.approx(-(0.5 * 0.4 + 0.25 * -0.2) / 10)
    w = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [-1.0]])]
    loss, stats = tspmo_loss(torch.zeros(0), torch.zeros(0), num_pairs=10, lora_weights=w, lam=0.01)
    assert loss.item() == pytest.approx(0.01 * (1 + 4 + 9 + 1)) and stats["l2"] == pytest.approx(15.0)
    loss, _ = tspmo_loss(logp, torch.tensor([0.4, -0.2]), num_pairs=10, log_prob=True)
    assert loss.item() == pytest.approx(-(math.log(0.5) * 0.4 + math.log(0.25) * -0.2) / 10)
