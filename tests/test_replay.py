import json

from tinyrl.replay import Episode, ReplayBuffer, replay_rewards


def ep(i, reward, n=5):
    return Episode([1, 2], list(range(10 + i, 10 + i + n)), reward, answer=i)


def test_fifo_eviction():
    buf = ReplayBuffer(capacity=3)
    for i in range(5):
        buf.add(ep(i, 1.0))
    assert len(buf) == 3 and [e.answer for e in buf.episodes] == [2, 3, 4]


def test_success_failure_split_follows_threshold():
    buf = ReplayBuffer(capacity=10, threshold=0.5)
    for i, r in enumerate([0.0, 0.49, 0.5, 1.0]):
        buf.add(ep(i, r))
    assert [e.answer for e in buf.successes()] == [2, 3] and [e.answer for e in buf.failures()] == [0, 1]
    draws = buf.draw(n_success=3, n_failure=2)
    assert [e.reward >= 0.5 for e, _ in draws] == [True] * 3 + [False] * 2
    assert ReplayBuffer(threshold=1.0).draw(1, 1) == []  # empty pools give no draws


def test_cut_is_inside_the_completion_and_never_keeps_the_last_token():
    buf = ReplayBuffer(capacity=100, seed=0)
    for i, n in enumerate([1, 2, 3, 7]):
        buf.add(ep(i, 1.0, n))
    seen = {}
    for _ in range(2000):
        for e, m in buf.draw(1, 0):
            assert 0 <= m <= len(e.completion_ids) - 1
            seen.setdefault(len(e.completion_ids), set()).add(m)
    assert seen == {1: {0}, 2: {0, 1}, 3: {0, 1, 2}, 7: set(range(7))}  # uniform over [0, n-1]: all reached


def test_replay_rewards_score_kept_part_plus_continuation(tiny):
    _, tok = tiny
    kept = tok("The answer is 4", add_special_tokens=False).input_ids
    conts = [tok("2.", add_special_tokens=False).input_ids, tok("7", add_special_tokens=False).input_ids]
    assert replay_rewards(tok, kept, conts, 42) == [1.0, 0.0]  # "…is 42." is right; "2." alone would not be
    assert replay_rewards(tok, kept, conts, 47) == [0.0, 1.0]


def test_state_round_trips_through_json():
    buf = ReplayBuffer(capacity=4, seed=3)
    for i in range(6):
        buf.add(ep(i, float(i % 2)))
    buf.draw(1, 1)
    state = json.loads(json.dumps(buf.state_dict()))
    other = ReplayBuffer(capacity=99, seed=99)
    other.load_state_dict(state)
    assert other.episodes == buf.episodes and other.episodes.maxlen == 4
    assert other.draw(2, 2) == buf.draw(2, 2)


def test_replay_rewards_use_the_tasks_reward(tiny, tmp_path):
    from tinyrl.tasks import Reward

    _, tok = tiny
    conts = [tok("ab", add_special_tokens=False).input_ids, tok("abc", add_special_tokens=False).input_ids]
    by_length = Reward(lambda text, answer: len(text) / answer, "len")
    assert replay_rewards(tok, tok("x", add_special_tokens=False).input_ids, conts, 4, by_length, "p") == [0.75, 1.0]
