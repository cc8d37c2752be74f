"""The CPU kernels (tinyrl/cpu.py): the same results as torch's kernels, scoped, and chosen only when measured faster."""
import json
import os

import pytest
import torch

from tinyrl import cpu
from tinyrl.cpu import Kernels, decode_attention, packed_linears
from tinyrl.sampling import forward_step, new_cache, sample

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


@pytest.fixture
def auto_mode(monkeypatch, tmp_path):
    """Measure, whatever TINYRL_CPU_KERNELS says for the rest of the suite, with an empty cache."""
    monkeypatch.setattr(cpu, "_mode", "auto")
    monkeypatch.setenv("TINYRL_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_decode_attention_equals_sdpa(dtype, mask_kind):
    """The decode attention against torch's SDPA in float64: GQA (6 heads on 2), padding masks of both kinds."""
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


def test_fast_kernels_change_no_result_and_are_scoped(lora_model):
    """Inside cpu.use(FAST): the frozen linears run on packed oneDNN weights and decode steps on
    decode_attention, the logits equal the plain ones to float32 rounding; on exit all is as before."""
    model, tokenizer = lora_model
    ids = torch.tensor([tokenizer("What's 123 multiplied by 456?").input_ids])
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    onednn = cpu.onednn_usable()
    with torch.no_grad():
        plain_cache = new_cache(model, capacity=ids.shape[1] + 1)
        plain = [forward_step(model, ids, plain_cache), forward_step(model, ids[:, :1], plain_cache)]
    with pytest.raises(RuntimeError), cpu.use(model, Kernels(True, True)), torch.no_grad():
        assert model.config._attn_implementation == "tinyrl_decode"
        assert all("forward" in vars(m) for m in linears) == onednn
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
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # the documented off switch
    try:
        with cpu.use(model, Kernels(True, False)):
            assert not any("forward" in vars(m) for m in linears)
    finally:
        torch.backends.mkldnn.enabled = before


@needs_onednn
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


def fake_probe(model, seconds):
    """A probe whose 'time' is seconds[kernels in use]: lets the tests decide what is faster."""
    linear = next(m for m in model.modules() if type(m) is torch.nn.Linear)

    def probe():
        in_use = Kernels("forward" in vars(linear), model.config._attn_implementation == "tinyrl_decode")
        return seconds[in_use]
    return probe


@needs_onednn
@pytest.mark.parametrize("seconds, expected", [
    ({Kernels(): 1.0, Kernels(True): 0.5, Kernels(False, True): 0.9, Kernels(True, True): 0.45}, Kernels(True, True)),
    ({Kernels(): 1.0, Kernels(True): 0.7, Kernels(False, True): 1.3, Kernels(True, True): 0.9}, Kernels(True)),
    ({Kernels(): 1.0, Kernels(True): 1.2, Kernels(False, True): 0.8, Kernels(True, True): 1.1}, Kernels(False, True)),
    ({Kernels(): 1.0, Kernels(True): 0.97, Kernels(False, True): 0.98, Kernels(True, True): 0.96}, Kernels()),  # < 5%
    ({Kernels(): 1.0, Kernels(True): 1.5, Kernels(False, True): 2.0, Kernels(True, True): 3.0}, Kernels()),
])
def test_choose_keeps_torch_unless_another_is_measured_faster(tiny, auto_mode, seconds, expected):
    model, _ = tiny
    picked = cpu.choose(model, "decode", fake_probe(model, seconds), list(seconds))
    assert picked == expected
    assert cpu.choose(model, "decode", lambda: pytest.fail("measured twice"), list(seconds)) == expected
    assert cpu.decisions(model)["decode"]["speedup"] == pytest.approx(1.0 / seconds[expected], rel=1e-3)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert any(m in cpu._PACKED for m in linears) == expected.linear  # no packed copies kept for nothing


@needs_onednn
def test_a_measured_choice_is_cached_per_machine_threads_and_shapes(tiny, auto_mode, monkeypatch):
    """A new process (here: a forgotten decision) reads the machine's cache instead of measuring; another
    thread count, probe shape or dispatch level is measured anew; a damaged cache file is measured over and
    rewritten."""
    model, _ = tiny
    seconds = {Kernels(): 1.0, Kernels(True): 0.5}
    never = lambda: pytest.fail("a cached choice must not be measured again")  # noqa: E731
    assert cpu.choose(model, "decode", fake_probe(model, seconds), list(seconds), "4 rows") == Kernels(True)
    cached = json.loads(open(cpu.kernel_cache_path()).read())
    assert len(cached) == 1 and list(cached.values()) == [{"linear": True, "attention": False, "speedup": 2.0}]
    key = next(iter(cached))
    assert cpu.cpu_name() in key and torch.__version__ in key and f"{torch.get_num_threads()} threads" in key
    cpu._chosen.pop(model)
    assert cpu.choose(model, "decode", never, list(seconds), "4 rows") == Kernels(True)
    assert cpu.decisions(model)["decode"]["speedup"] == 2.0
    cpu._chosen.pop(model)
    slower = {Kernels(): 1.0, Kernels(True): 1.5}
    assert cpu.choose(model, "decode", fake_probe(model, slower), list(slower), "64 rows") == Kernels()
    cpu._chosen.pop(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert cpu.choose(model, "decode", fake_probe(model, slower), list(slower), "4 rows") == Kernels()
    finally:
        torch.set_num_threads(threads)
    isa, capability = os.environ.get("ONEDNN_MAX_CPU_ISA"), torch.backends.cpu.get_cpu_capability()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41" if isa == "AVX2" else "AVX2")  # a lower dispatch: another machine
    cpu._chosen.pop(model)
    assert cpu.choose(model, "decode", fake_probe(model, slower), list(slower), "4 rows") == Kernels()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa) if isa else monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT" if capability == "AVX2" else "AVX2")
    cpu._chosen.pop(model)
    assert cpu.choose(model, "decode", fake_probe(model, slower), list(slower), "4 rows") == Kernels()
    assert len(json.loads(open(cpu.kernel_cache_path()).read())) == 5
    open(cpu.kernel_cache_path(), "w").write("{torn")
    cpu._chosen.pop(model)
    assert cpu.choose(model, "decode", fake_probe(model, slower), list(slower), "4 rows") == Kernels()
    assert len(json.loads(open(cpu.kernel_cache_path()).read())) == 1


@needs_onednn
def test_forced_modes_and_adopted_decisions(tiny, monkeypatch):
    model, _ = tiny
    candidates = [Kernels(True), Kernels(False, True)]
    never = lambda: pytest.fail("a forced mode must not measure")  # noqa: E731
    monkeypatch.setattr(cpu, "_mode", "torch")
    assert cpu.choose(model, "decode", never, candidates) == Kernels()
    monkeypatch.setattr(cpu, "_mode", "fast")
    assert cpu.choose(model, "decode", never, candidates) == Kernels(True, True)
    monkeypatch.setattr(cpu, "_mode", "auto")
    cpu.adopt(model, {"decode": {"linear": False, "attention": True, "speedup": 1.3}})  # as a resumed run does
    assert cpu.choose(model, "decode", never, candidates) == Kernels(False, True)
    assert cpu.decisions(model)["decode"]["speedup"] == 1.3  # the resumed run's final_eval.json keeps it
    monkeypatch.setattr(cpu, "_mode", None)
    monkeypatch.setenv("TINYRL_CPU_KERNELS", "fastest")
    from tinyrl.cli import UserError
    with pytest.raises(UserError, match="TINYRL_CPU_KERNELS"):
        cpu.mode()


def test_sampler_measures_once_on_real_decode_steps(lora_model, auto_mode):
    """With auto, the first sample() times each candidate on the model (one warm-up and three timed decode
    steps each), then reuses the choice; whatever it picks, greedy completions are those of torch's kernels."""
    model, tokenizer = lora_model
    prompt = tokenizer("What's 123 multiplied by 456?").input_ids
    cpu.set_mode("torch")
    try:
        expected = sample(model, prompt, 3, 12, 0.0, [0, 2])
    finally:
        cpu.set_mode("auto")
    assert "decode" not in cpu.decisions(model)
    got = sample(model, prompt, 3, 12, 0.0, [0, 2])
    measured = cpu.decisions(model)["decode"]
    assert measured["speedup"] >= 1.0 and got == expected
    assert sample(model, prompt, 3, 12, 0.0, [0, 2]) == expected and cpu.decisions(model)["decode"] == measured


class Shapes:
    hidden_size, intermediate_size = 64, 128


@pytest.mark.parametrize("requested, bf16, f32, device, expected, says", [
    ("auto", 40.0, 20.0, "cpu", "bfloat16", "--dtype auto: bfloat16 (bfloat16 40 vs float32 20 GFLOP/s"),
    ("auto", 23.0, 20.0, "cpu", "float32", "--dtype auto: float32 (bfloat16 23 vs float32 20 GFLOP/s"),  # < 1.2x
    ("auto", 21.0, 167.0, "cpu", "float32", "bfloat16 21 vs float32 167"),  # the AVX2-only Zen 3
    ("auto", None, None, "cuda", "bfloat16", None),  # a GPU: nothing to measure
    ("bfloat16", 21.0, 167.0, "cpu", "bfloat16", "warning: bfloat16 is slower than float32 on this CPU (bfloat16 21 "
                                                 "vs float32 167 GFLOP/s on this model's shapes)"),
    ("bfloat16", 40.0, 20.0, "cpu", "bfloat16", None),
    ("float32", None, None, "cpu", "float32", None),
])
def test_dtype_rule_on_fake_timings(requested, bf16, f32, device, expected, says):
    def speed(config):
        assert bf16 is not None, "measured where nothing needed measuring"
        return {"float32": f32, "bfloat16": bf16}
    dtype, line = cpu.pick_dtype(Shapes, requested, torch.device(device), speed)
    assert dtype == expected
    assert (line is None) if says is None else (says in line)


def test_linear_speed_counts_flops_and_is_cached(auto_mode):
    fake = cpu.linear_speed(Shapes, rows=8, timer=lambda dtype: 1e-3 if dtype == torch.float32 else 4e-3)
    flops = 2 * 8 * (64 * 64 + 64 * 128 + 128 * 64)
    assert fake == pytest.approx({"float32": flops / 1e-3 / 1e9, "bfloat16": flops / 4e-3 / 1e9}, rel=1e-3)
    measured = cpu.linear_speed(Shapes, rows=8)  # real: tiny shapes, milliseconds
    assert measured["float32"] > 0 and measured["bfloat16"] > 0
    assert any("dtype speed" in k for k in json.loads(open(cpu.kernel_cache_path()).read()))
    assert cpu.linear_speed(Shapes, rows=8) == measured  # the second call reads the cache


def test_train_with_dtype_auto_records_the_choice(tiny_dir, tmp_path, capsys, auto_mode):
    import train

    run = tmp_path / "run"
    assert train.main(["--model", tiny_dir, "--out", str(run), "--dtype", "auto", "--steps", "1", "--group-size",
                       "2", "--max-new-tokens", "4", "--eval-every", "0", "--test-n", "0"]) == 0
    assert "--dtype auto: " in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["dtype"] in ("float32", "bfloat16")
