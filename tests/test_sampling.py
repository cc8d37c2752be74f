import pytest
import torch

from tinyrl.lora import inject_lora, lora_modules
from tinyrl.model import packed_linears
from tinyrl.sampling import cpu_kernels, decode_attention, forward_step, generate_batch, new_cache, sample

EOS = [0, 2]


def hf_greedy(model, prompt, max_new_tokens, eos=EOS):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(tokenizer):
    return [tokenizer(t).input_ids for t in ("What's 123 multiplied by 456?", "Problem: Dan had 3 apples",
                                             "7", "the answer is 1,234 apples and -5 more")]


@pytest.fixture
def lora_model(tiny):
    """The tiny model with non-zero LoRA adapters, so the sampler is checked on what training samples from."""
    model, tokenizer = tiny
    inject_lora(model, rank=4, fraction=0.5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    return model, tokenizer


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_decode_attention_equals_sdpa(dtype, mask_kind):
    """The CPU decode attention against torch's SDPA in float64: GQA (6 heads on 2), padding masks of both kinds."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 6, 1, 16, generator=g).to(dtype)
    k, v = (torch.randn(5, 2, 9, 16, generator=g).to(dtype) for _ in range(2))
    keep = torch.ones(5, 1, 1, 9, dtype=torch.bool)
    keep[1, ..., :3] = keep[4, ..., :1] = False  # left padding in two rows
    mask = {None: None, "bool": keep, "float": torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, -1e9)}[mask_kind]
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    out, _ = decode_attention(module, q, k, v, mask)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(3, 1), v.double().repeat_interleave(3, 1),
        attn_mask=None if mask_kind is None else keep)
    assert out.dtype == dtype and out.shape == (5, 1, 6, 16)
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # bfloat16: the exact result, rounded once
    assert torch.allclose(out.double(), expected.transpose(1, 2), atol=tol, rtol=tol)


def test_cpu_kernels_change_no_result_and_are_scoped(lora_model):
    """Inside cpu_kernels: the frozen linears run on packed oneDNN weights and decode steps on
    decode_attention, the logits equal the plain ones to float32 rounding; on exit all is as before."""
    model, tokenizer = lora_model
    ids = torch.tensor([prompts(tokenizer)[0]])
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    with torch.no_grad():
        plain_cache = new_cache(model, capacity=ids.shape[1] + 1)
        plain = [forward_step(model, ids, plain_cache), forward_step(model, ids[:, :1], plain_cache)]
    with pytest.raises(RuntimeError), cpu_kernels(model), torch.no_grad():
        assert model.config._attn_implementation == "tinyrl_decode"
        assert all("forward" in vars(m) for m in linears) == torch.backends.mkldnn.is_available()
        cache = new_cache(model, capacity=ids.shape[1] + 1)
        fast = [forward_step(model, ids, cache), forward_step(model, ids[:, :1], cache)]  # prefill, one decode step
        for a, b in zip(fast, plain):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        with torch.enable_grad():  # autograd on: the plain path, so gradients stay right
            x = torch.randn(2, linears[0].in_features, requires_grad=True)
            linears[0](x).sum().backward()
            assert torch.allclose(x.grad, linears[0].weight.sum(0).expand(2, -1))
        raise RuntimeError
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in vars(m) for m in linears)
    torch.backends.mkldnn.enabled = False  # the documented off switch
    try:
        with cpu_kernels(model):
            assert not any("forward" in vars(m) for m in linears)
    finally:
        torch.backends.mkldnn.enabled = True


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_packed_weights_follow_every_change_of_the_weight():
    """The packed copy is kept with the layer; an in-place edit (merge_lora), a new Parameter or a
    swapped .data must each be seen, or the layer would compute with stale weights."""
    layer = torch.nn.Linear(8, 4).requires_grad_(False)
    x = torch.randn(3, 8)
    changes = [lambda: layer.weight.mul_(2),
               lambda: setattr(layer, "weight", torch.nn.Parameter(torch.randn(4, 8), requires_grad=False)),
               lambda: setattr(layer.weight, "data", torch.randn(4, 8))]
    with torch.no_grad():
        for change in [lambda: None, *changes]:
            change()
            with packed_linears(layer):
                assert "forward" in vars(layer)
                assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-6)


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
