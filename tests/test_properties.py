"""Property tests (hypothesis): prefix-tree advantages, parse_answer, S-GRPO selection."""
from collections import defaultdict

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyrl.objectives import prefix_advantages, sgrpo_select
from tinyrl.tasks import parse_answer

EOS = 0
tokens = st.lists(st.integers(1, 4), min_size=0, max_size=6)  # a small alphabet makes shared prefixes likely
groups = st.lists(st.tuples(tokens, st.sampled_from([0.0, 1.0])), min_size=1, max_size=12)


def node_stats(completions, rewards):
    """count, reward sum, and completions ending exactly there, for every prefix (tuple)."""
    count, total, ended = defaultdict(int), defaultdict(float), defaultdict(list)
    for y, r in zip(completions, rewards):
        for t in range(len(y) + 1):
            count[tuple(y[:t])] += 1
            total[tuple(y[:t])] += r
        ended[tuple(y)].append(r)
    return count, total, ended


@settings(max_examples=300, deadline=None)
@given(groups, st.booleans())
def test_prefix_tree_properties(group, eos_terminated):
    completions = [y + [EOS] if eos_terminated else y for y, _ in group]
    rewards = [r for _, r in group]
    adv = prefix_advantages(completions, rewards)
    edges = {tuple(y[:t + 1]) for y in completions for t in range(len(y))}
    assert len(adv) == len(edges)  # |U| = the number of trie edges
    assert all(abs(a) <= 1.0 for a in adv.values())  # 0/1 rewards: both means are in [0, 1]
    count, total, ended = node_stats(completions, rewards)
    children = defaultdict(list)
    for (p, v), a in adv.items():
        children[p].append((count[p + (v,)], a))
    for p, kids in children.items():
        weighted = sum(n * a for n, a in kids)
        # sum over children of n_c * A(c|p) = n_end * (E[R|p] - mean R of the completions that end at p)
        n_end = len(ended.get(p, []))
        expected = n_end * (total[p] / count[p] - sum(ended[p]) / n_end) if n_end else 0.0
        assert abs(weighted - expected) < 1e-9
        if eos_terminated and p and p[-1] != EOS:
            assert abs(weighted) < 1e-9  # no completion stops mid-way: the weighted advantages cancel


@settings(max_examples=100, deadline=None)
@given(st.lists(tokens, min_size=1, max_size=8), st.sampled_from([0.0, 1.0]))
def test_identical_completions_give_zero_advantages(ys, r):
    y = ys[0] + [EOS]
    assert set(prefix_advantages([y] * len(ys), [r] * len(ys)).values()) <= {0.0}
    assert set(prefix_advantages([y] * len(ys), [float(i % 2) for i in range(len(ys))]).values()) <= {0.0}


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_parse_answer_never_raises(text):
    out = parse_answer(text)
    assert out is None or isinstance(out, int)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 400), st.integers(0, 120), st.integers(0, 150), st.floats(0, 1), st.integers(0, 2**31))
def test_sgrpo_selection_respects_alpha_and_k(length, alpha, k, p, seed):
    sel = sgrpo_select(length, alpha, k, p, torch.Generator().manual_seed(seed))
    assert sel == sorted(set(sel)) and all(0 <= j < length for j in sel)
    assert sel[:min(alpha, length)] == list(range(min(alpha, length)))  # the first alpha tokens always count
    assert len(sel) <= max(min(alpha, length), k)  # never more than k beyond the first alpha
    if p == 1.0:
        assert len(sel) == min(length, max(alpha, k))
    if p == 0.0:
        assert len(sel) == min(alpha, length)


class CharTokenizer:
    """Enough of a tokenizer for the task builders: no chat template, one id per character."""
    chat_template = None

    def __call__(self, text):
        return type("Encoding", (), {"input_ids": [ord(c) for c in text]})()


def no_hang(seconds: float):
    """Fail (instead of hanging the suite) if the block runs longer than `seconds`."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def guard():
        def fail(*_):
            raise AssertionError(f"took more than {seconds} s")
        previous = signal.signal(signal.SIGALRM, fail)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return guard()


ranges = st.tuples(st.integers(0, 40), st.integers(0, 40)).map(sorted)


@settings(max_examples=120, deadline=None)
@given(ranges, ranges | st.tuples(st.integers(0, 3), st.integers(500, 5000)).map(sorted), st.randoms())
def test_every_mult_range_builds_or_is_refused(a, b, rng):
    """Small, equal, overlapping and lopsided ranges: a task whose held-out sets are disjoint thirds at most,
    whose training draws avoid them, or a clear refusal when there are too few problems."""
    from tinyrl.cli import UserError
    from tinyrl.tasks import distinct_problems, mult_task

    spec = f"{a[0]}-{a[1]}x{b[0]}-{b[1]}"
    brute = len({(min(x, y), max(x, y)) for x in range(a[0], a[1] + 1) for y in range(b[0], b[1] + 1)})
    assert distinct_problems(tuple(a), tuple(b)) == brute
    with no_hang(60):  # only a hang trips this: building any of these takes well under a second
        try:
            task = mult_task(CharTokenizer(), spec)
        except UserError as e:
            assert brute < 3 and "distinct problem" in str(e)
            return
        train = [task.train(rng) for _ in range(50)]
    key = lambda p: tuple(sorted(map(int, p.id.split("x"))))  # noqa: E731
    test, val = {key(p) for p in task.test}, {key(p) for p in task.val}
    assert len(test) == len(task.test) == min(3000, brute // 3) and len(val) == len(task.val) == min(500, brute // 3)
    assert not test & val and not {key(p) for p in train} & (test | val)
