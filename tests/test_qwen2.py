"""The paper's model family on a real checkpoint: Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, Qwen2
tokenizer and ChatML template), from `python -m tinyrl.fetch qwen2.5-coder-0.5b`.

Skipped unless TINYRL_TEST_QWEN2 points at the .gguf file; .ci/run fetches it (see DEVELOPERS.md)."""
import json
import os

import pytest
import torch

MODEL = os.environ.get("TINYRL_TEST_QWEN2")
pytestmark = pytest.mark.skipif(not MODEL, reason="set TINYRL_TEST_QWEN2 to the Qwen2.5-Coder-0.5B .gguf file")


@pytest.fixture(scope="module")
def qwen():
    from tinyrl.model import load_model

    return load_model(MODEL, device="cpu")


@pytest.fixture(scope="module")
def qwen_dir(qwen, tmp_path_factory):
    """The dequantized model as a safetensors folder: loads in seconds, where the GGUF takes ~30 s each time."""
    path = tmp_path_factory.mktemp("qwen") / "model"
    model, tokenizer = qwen
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def test_eos_ids_and_chat_template(qwen):
    from tinyrl.model import eos_ids
    from tinyrl.tasks import mult_task

    model, tokenizer = qwen
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 24
    vocab = tokenizer.get_vocab()
    assert {vocab["<|im_end|>"], vocab["<|endoftext|>"]} <= set(eos_ids(model, tokenizer))
    problem = mult_task(tokenizer, "3x3", test_n=3, val_n=3).test[0]
    a, b = problem.id.split("x")
    assert problem.prompt == ("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n"
                              f"What's {a} multiplied by {b}? Don't use a calculator.<|im_end|>\n"
                              "<|im_start|>assistant\nLet's break this problem down step by step.")
    assert tokenizer.decode(problem.prompt_ids) == problem.prompt  # the template's specials are single tokens


def remove_lora(model, names):
    """The base model again, for the next test."""
    for name in names:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, model.get_submodule(name).base_layer)


@pytest.mark.parametrize("fraction, layers", [(1 / 4, 6), (1 / 3, 8)])
def test_lora_on_q_and_v_of_the_papers_last_layers(qwen, fraction, layers):
    from tinyrl.lora import inject_lora

    names = inject_lora(qwen[0], rank=8, fraction=fraction)
    remove_lora(qwen[0], names)
    assert sorted({int(n.split(".")[2]) for n in names}) == list(range(24 - layers, 24))
    assert sorted({n.rpartition(".")[2] for n in names}) == ["q_proj", "v_proj"] and len(names) == 2 * layers


def test_greedy_sampler_equals_hf_generate_and_adapter_loads_in_peft(qwen, qwen_dir, tmp_path):
    """On the multiplication preset's adapter (last 1/4 of the layers), with non-zero B."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from tinyrl.lora import inject_lora, lora_modules, save_adapter
    from tinyrl.model import eos_ids
    from tinyrl.sampling import generate_batch, sample
    from tinyrl.tasks import mult_task

    model, tokenizer = qwen
    names = inject_lora(model, rank=8, fraction=1 / 4)
    try:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.01)
        eos = eos_ids(model, tokenizer)
        problems = mult_task(tokenizer, "2x2", test_n=3, val_n=3).test[:2]
        expected = [model.generate(torch.tensor([p.prompt_ids]), max_new_tokens=24, do_sample=False, eos_token_id=eos,
                                   pad_token_id=eos[0])[0, len(p.prompt_ids):].tolist() for p in problems]
        assert sample(model, problems[0].prompt_ids, 2, 24, 0.0, eos) == [expected[0]] * 2
        assert generate_batch(model, [p.prompt_ids for p in problems], 24, 0.0, eos, eos[0]) == expected
        save_adapter(model, str(tmp_path / "a"), MODEL)
        ids = problems[0].prompt_ids
        ours = logits(model, ids)
        ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen_dir), str(tmp_path / "a"))
        assert torch.allclose(logits(ref, ids), ours, atol=1e-3, rtol=1e-4)
    finally:
        remove_lora(model, names)


@pytest.mark.parametrize("algo", ["grpo", "sgrpo", "tspmo"])
def test_one_training_step(qwen_dir, algo, tmp_path, monkeypatch):
    import train

    monkeypatch.setenv("TINYRL_CPU_KERNELS", os.environ.get("TINYRL_CPU_KERNELS") or "torch")  # skip measuring

    run = tmp_path / algo
    code = train.main(["--algo", algo, "--task", "mult", "--digits", "2x1", "--model", qwen_dir, "--out", str(run),
                       "--steps", "1", "--group-size", "4", "--max-new-tokens", "16", "--eval-every", "0",
                       "--test-n", "0", "--lr", "1e-3"])
    assert code == 0
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["step"] == 1 and not line["skipped"] and line["forward_passes"] >= 0
