import json
import os

import pytest
import torch

from tinyrl.cli import UserError
from tinyrl.lora import (adapted_layers, disable_lora, inject_lora, load_adapter, lora_modules, lora_parameters,
                         merge_lora, save_adapter, unmerge_lora)

IDS = torch.tensor([[1, 5, 9, 40, 77, 3, 12]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def randomize_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_output_unchanged_at_init(tiny):
    model, _ = tiny
    before = logits(model)
    inject_lora(model, rank=4, fraction=0.5)
    assert torch.equal(logits(model), before)


def test_bf16_model_gets_float32_adapters_that_learn(tiny):
    """On a bfloat16 base the adapters stay float32 (Adam's steps survive) and the output stays bfloat16."""
    model, _ = tiny
    model.to(torch.bfloat16)
    before = logits(model)
    inject_lora(model, rank=4, fraction=0.5)
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    assert torch.equal(logits(model), before) and before.dtype == torch.bfloat16
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    for _ in range(2):  # step 1 moves B off zero, step 2 lets A's gradient through
        opt.zero_grad()
        model(IDS).logits[0, -1, 7].float().backward()
        opt.step()
    assert all(m.lora_B.abs().max() > 5e-5 for m in lora_modules(model).values())  # Adam moved B by ~lr a step
    assert not torch.equal(logits(model), before)


def test_only_lora_parameters_train(tiny):
    model, _ = tiny
    inject_lora(model, rank=4, fraction=0.5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("fraction,expected", [(1.0, [0, 1, 2, 3]), (0.5, [2, 3]), (0.25, [3]), (1 / 3, [3]),
                                               (0.01, [3])])
def test_adapters_sit_on_last_layers(tiny, fraction, expected):
    model, _ = tiny
    names = inject_lora(model, rank=2, fraction=fraction)
    assert names == [f"model.layers.{i}.self_attn.{t}" for i in expected for t in ("q_proj", "v_proj")]
    assert sorted(lora_modules(model)) == sorted(names)


def test_paper_layer_counts():
    assert len(adapted_layers(28, 1 / 4)) == 7 and len(adapted_layers(28, 1 / 3)) == 9  # Qwen2-1.5B: 7 and 9 layers
    assert adapted_layers(28, 1 / 4) == list(range(21, 28))


def test_merged_equals_unmerged(tiny):
    model, _ = tiny
    inject_lora(model, rank=4, fraction=1.0)
    randomize_b(model)
    unmerged = logits(model)
    merge_lora(model)
    assert torch.allclose(logits(model), unmerged, atol=1e-5)
    unmerge_lora(model)
    assert torch.allclose(logits(model), unmerged, atol=1e-5)


def test_disable_lora_gives_base_output(tiny):
    model, _ = tiny
    base = logits(model)
    inject_lora(model, rank=4)
    randomize_b(model)
    assert not torch.allclose(logits(model), base)
    with disable_lora(model):
        assert torch.equal(logits(model), base)
    assert not torch.allclose(logits(model), base)


def test_save_load_round_trip(tiny, tiny_dir, tmp_path):
    from tinyrl.model import load_model

    model, _ = tiny
    inject_lora(model, rank=4, fraction=0.5)
    randomize_b(model)
    save_adapter(model, str(tmp_path), base_model_name_or_path=tiny_dir)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["layers_to_transform"] == [2, 3] and cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == tiny_dir and cfg["lora_alpha"] == 4
    fresh, _ = load_model(tiny_dir, device="cpu")
    load_adapter(fresh, str(tmp_path))  # injects the adapters it describes
    assert torch.equal(logits(fresh), logits(model))


def test_peft_layout_and_maths_match_peft(tiny, tiny_dir, tmp_path):
    """PEFT (test-only reference) loads our adapter and computes the same logits; and we load PEFT's."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model, _ = tiny
    base = logits(model)
    inject_lora(model, rank=4, alpha=8, fraction=0.5)
    randomize_b(model)
    assert not torch.allclose(logits(model), base, atol=1e-3)  # the comparison below is not vacuous
    save_adapter(model, str(tmp_path / "ours"), tiny_dir)
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(tmp_path / "ours"))
    assert torch.allclose(logits(ref), logits(model), atol=1e-6)
    ref.save_pretrained(str(tmp_path / "peft"))
    assert set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))) == set(
        load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    from tinyrl.model import load_model

    fresh, _ = load_model(tiny_dir, device="cpu")
    load_adapter(fresh, str(tmp_path / "peft"))
    assert torch.allclose(logits(fresh), logits(model), atol=1e-6)


def test_mismatched_adapter_is_refused(tiny, tiny_dir, tmp_path):
    from tinyrl.model import load_model

    model, _ = tiny
    inject_lora(model, rank=4, fraction=0.5)
    save_adapter(model, str(tmp_path / "a"), tiny_dir)
    other_rank, _ = load_model(tiny_dir, device="cpu")
    inject_lora(other_rank, rank=2, fraction=0.5)
    with pytest.raises(UserError, match="r: adapter 4 vs model 2"):
        load_adapter(other_rank, str(tmp_path / "a"))
    other_layers, _ = load_model(tiny_dir, device="cpu")
    inject_lora(other_layers, rank=4, fraction=1.0)
    with pytest.raises(UserError, match="layers_to_transform"):
        load_adapter(other_layers, str(tmp_path / "a"))
    from tiny import build_model

    wider = build_model(vocab_size=300, hidden=64)  # same layer names, other shapes: another base model
    with pytest.raises(UserError, match="shape"):
        load_adapter(wider, str(tmp_path / "a"))
    with pytest.raises(UserError, match="does not exist"):
        load_adapter(model, str(tmp_path / "missing"))
    os.remove(tmp_path / "a" / "adapter_model.safetensors")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    fresh, _ = load_model(tiny_dir, device="cpu")
    with pytest.raises(UserError, match="cannot read"):
        load_adapter(fresh, str(tmp_path / "a"))


@pytest.mark.parametrize("spec", ["q,v", "k,o,down", "all-linear"])
def test_targets_match_peft_own_lora(tiny_dir, tmp_path, spec):
    """PEFT's own LoRA on the same projections (all-linear: PEFT's own "all-linear") has the same modules, and
    ours computes its logits from its adapter; PEFT computes ours from the adapter we save."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from tinyrl.lora import parse_targets
    from tinyrl.model import load_model

    targets, every = parse_targets(spec), spec == "all-linear"  # PEFT's "all-linear" takes every layer
    layers = [0, 1, 2, 3] if every else [2, 3]
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear" if every else list(targets),
        layers_to_transform=None if every else layers, init_lora_weights=False))  # random A and B: a change
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours, _ = load_model(tiny_dir, device="cpu")
    names = load_adapter(ours, str(tmp_path / "peft"))
    assert sorted({n.rsplit(".", 1)[1] for n in names}) == sorted(targets)
    assert torch.allclose(logits(ours), logits(theirs), atol=1e-5)
    fresh, _ = load_model(tiny_dir, device="cpu")
    inject_lora(fresh, rank=4, alpha=8, layers=layers, targets=targets)
    randomize_b(fresh)
    save_adapter(fresh, str(tmp_path / "ours"), tiny_dir)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_modules"] == sorted(targets)
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(tmp_path / "ours"))
    assert torch.allclose(logits(ref), logits(fresh), atol=1e-5)


def test_target_names():
    from tinyrl.lora import parse_targets

    assert parse_targets("q,v") == ("q_proj", "v_proj") == parse_targets(" v , q ")
    assert parse_targets("all-linear") == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for bad in ("", "q,x", "lm_head"):
        with pytest.raises(UserError, match="--lora-targets"):
            parse_targets(bad)
