import pytest
import torch

from tinyrl.sampling import forward_step, generate_batch, generate_continuous, new_cache, sample

EOS = [0, 2]


def hf_greedy(model, prompt, max_new_tokens, eos=EOS):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(tokenizer):
    return [tokenizer(t).input_ids for t in ("What's 123 multiplied by 456?", "Problem: Dan had 3 apples",
                                             "7", "the answer is 1,234 apples and -5 more")]


def test_greedy_sample_equals_hf_generate(lora_model):
    model, tokenizer = lora_model
    for p in prompts(tokenizer):
        expected = hf_greedy(model, p, 40)
        assert sample(model, p, n=3, max_new_tokens=40, temperature=0.0, eos_ids=EOS) == [expected] * 3


def test_generate_batch_equals_hf_generate(lora_model):
    model, tokenizer = lora_model
    ps = prompts(tokenizer)
    assert len({len(p) for p in ps}) > 1  # left padding is exercised
    assert generate_batch(model, ps, 40, 0.0, EOS, pad_id=0) == [hf_greedy(model, p, 40) for p in ps]


def test_kv_cache_logits_equal_full_forward(lora_model):
    model, tokenizer = lora_model
    ids = torch.tensor([prompts(tokenizer)[0] + [5, 9, 40, 77, 3]])
    with torch.no_grad():
        full = model(ids).logits[0].float()  # (T, V)
        cache = new_cache(model)
        stepped = [forward_step(model, ids[:, :4], cache)[0]]
        for t in range(4, ids.shape[1]):
            stepped.append(forward_step(model, ids[:, t:t + 1], cache)[0])
    assert torch.allclose(torch.stack(stepped), full[3:], atol=1e-5)


def test_same_seed_same_samples(lora_model):
    model, tokenizer = lora_model
    p = prompts(tokenizer)[0]
    draw = lambda seed: sample(model, p, 6, 30, 1.0, EOS, generator=torch.Generator().manual_seed(seed))  # noqa
    first = draw(0)
    assert draw(0) == first
    assert draw(1) != first
    assert len({tuple(c) for c in first}) > 1  # temperature 1 really samples


def test_rows_stop_at_any_eos_id(lora_model):
    model, tokenizer = lora_model
    p = prompts(tokenizer)[1]
    free = hf_greedy(model, p, 30, eos=[])  # the greedy path with no stopping
    for stop in (free[3], free[7]):  # pretend a token on the path is an EOS id, next to the real ones
        eos = [0, stop]
        out = sample(model, p, 2, 30, 0.0, eos)
        assert out == [free[: free.index(stop) + 1]] * 2  # ends right after the EOS, which is kept
    many = sample(model, p, 20, 30, 1.0, [free[3], 0, 2], generator=torch.Generator().manual_seed(0))
    for c in many:
        assert all(t not in (free[3], 0, 2) for t in c[:-1])
        assert c[-1] in (free[3], 0, 2) or len(c) == 30
    assert any(len(c) < 30 for c in many)


def test_chunked_equals_unchunked(lora_model):
    model, tokenizer = lora_model
    p = prompts(tokenizer)[2]
    whole = sample(model, p, 7, 25, 0.0, EOS)
    assert sample(model, p, 7, 25, 0.0, EOS, chunk_size=3) == whole
    assert sample(model, p, 7, 25, 0.0, EOS, chunk_size=1) == whole
    assert len(whole) == 7


def test_pick_tokens_draws_from_softmax_over_temperature():
    from tinyrl.sampling import pick_tokens

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0], [0.0, 0.0, 0.0, 0.0, 5.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([pick_tokens(logits, 0.7, g) for _ in range(20000)])  # (N, 2)
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=5).float() / len(draws)
        expected = torch.softmax(logits[row] / 0.7, -1)
        assert torch.allclose(freq, expected, atol=0.01), (freq, expected)  # 4 sigma of binomial noise
    assert (draws[:, 0] != 4).all()  # a token with probability ~1e-19 is not drawn
    assert torch.equal(pick_tokens(logits, 0.0), torch.tensor([0, 4]))


def test_static_shapes_decode_equals_dynamic(lora_model):
    """The fixed-shape path (for CUDA graphs; eager on CPU) gives the same completions as the default one."""
    model, tokenizer = lora_model
    p = prompts(tokenizer)[1]
    assert sample(model, p, 4, 30, 0.0, EOS, static=True) == sample(model, p, 4, 30, 0.0, EOS)
    assert sample(model, p, 5, 30, 0.0, EOS, chunk_size=2, static=True) == sample(model, p, 5, 30, 0.0, EOS)
    # with temperature > 0 it draws for every row, finished or not, so its stream is its own: check it repeats
    seeded = lambda: sample(model, p, 6, 30, 1.0, EOS, torch.Generator().manual_seed(3), static=True)  # noqa: E731
    first = seeded()
    assert seeded() == first and len(first) == 6
    assert any(len(c) < 30 for c in first)  # rows that end early are cut at their EOS, which is kept
    assert all(c[-1] in EOS for c in first if len(c) < 30) and all(t not in EOS for c in first for t in c[:-1])


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_continuous_batching_equals_one_prompt_at_a_time(lora_model, batch_size):
    """Prompts of 1-30 tokens, rows ending by EOS (frequent tokens made EOS ids) or by the token limit, slots
    refilled mid-decode; batch size 1 decodes long enough to drop unused columns from the cache."""
    import collections
    import random

    model, _ = lora_model
    rng = random.Random(0)
    ps = [[rng.randrange(3, 200) for _ in range(rng.randint(1, 30))] for _ in range(23)]
    ps[1] = [rng.randrange(3, 200) for _ in ps[0]]  # equal lengths: the very first prefill holds two rows
    free = [generate_batch(model, [p], 25, 0.0, EOS, pad_id=0)[0] for p in ps]
    common = [t for t, _ in collections.Counter(t for c in free for t in c[1:]).most_common(3)]
    eos = EOS + common[::2]
    alone = [generate_batch(model, [p], 25, 0.0, eos, pad_id=0)[0] for p in ps]
    assert len({len(c) for c in alone}) > 3 and any(c[-1] in eos for c in alone)  # rows end at different times
    done = []
    got = generate_continuous(model, ps, 25, eos, batch_size, on_done=lambda i, c: done.append(i))
    assert got == alone
    assert sorted(done) == list(range(len(ps)))
