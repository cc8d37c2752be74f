"""Hand-written LoRA on the q/v projections of the last decoder layers (Hu et al. 2021), or on others.

    h = W0·x + (alpha / r) · B·A·x        A: (r, in) Kaiming-uniform,  B: (out, r) zeros

The paper adapts q and v of the last 1/4 (mult, r=8) or 1/3 (SVAMP, r=16) of the layers; `parse_targets`
names the other projections (k, o and the MLP's gate, up, down, or all-linear). The reference
policy pi_ref is the same model with the adapters switched off (`disable_lora`): no second copy.
Adapters are saved in PEFT's on-disk layout, so PEFT and vLLM can load them, without PEFT.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from contextlib import contextmanager

import torch
from torch import nn

from tinyrl.cli import UserError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoRALinear(nn.Module):
    """An existing nn.Linear plus a trainable low-rank update. Names follow the paper and loralib."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        # float32 whatever the base dtype: bf16 adapters would lose Adam's small steps to rounding (as PEFT)
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as loralib and PEFT
        self.scaling = alpha / rank
        self.enabled = True  # False inside `disable_lora`: the reference policy
        self.merged = False  # True after `merge_lora`: B·A lives in base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        if self.enabled and not self.merged:
            h = h + ((x.float() @ self.lora_A.T @ self.lora_B.T) * self.scaling).to(h.dtype)  # h = W0x + (alpha/r)·BAx
        return h

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)


TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
           "down": "down_proj"}  # --lora-targets names -> the projections of a Qwen2/Llama decoder layer


def parse_targets(spec: str) -> tuple[str, ...]:
    """"q,v" (the paper) -> ("q_proj", "v_proj"); "all-linear" -> every projection of a layer, MLP included (as
    PEFT's target_modules="all-linear", which leaves the LM head out)."""
    names = list(TARGETS) if spec.strip() == "all-linear" else [x.strip() for x in spec.split(",") if x.strip()]
    unknown = [x for x in names if x not in TARGETS]
    if unknown or not names:
        raise UserError(f"--lora-targets {spec!r}: choose from {', '.join(TARGETS)} (comma-separated) or all-linear")
    return tuple(TARGETS[x] for x in TARGETS if x in names)  # a fixed order, whatever order they were given in


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder layers (`model.layers` for Qwen2/Llama/Mistral) and its name."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            return name, module
    raise UserError(f"cannot find the decoder layers of {type(model).__name__} (no ModuleList named 'layers')")


def adapted_layers(num_layers: int, fraction: float) -> list[int]:
    """Indices of the last max(1, round(f·L)) layers (Qwen2-1.5B: 7 for 1/4, 9 for 1/3)."""
    if not 0 < fraction <= 1:
        raise UserError(f"LoRA fraction must be in (0, 1], got {fraction}")
    n = max(1, round(fraction * num_layers))
    return list(range(num_layers - n, num_layers))


def inject_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    fraction: float = 1.0,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    layers: list[int] | None = None,
) -> list[str]:
    """Wrap `targets` in the last `fraction` of decoder layers (or exactly `layers`); return the wrapped names.

    alpha defaults to the rank (scaling 1.0, our choice; the paper gives no alpha)."""
    if rank < 1:
        raise UserError(f"LoRA rank must be >= 1, got {rank}")
    if lora_modules(model):
        raise UserError("this model already has LoRA adapters")
    prefix, blocks = decoder_layers(model)
    layers = adapted_layers(len(blocks), fraction) if layers is None else list(layers)
    if not layers or min(layers) < 0 or max(layers) >= len(blocks):
        raise UserError(f"LoRA layers {layers} do not exist in a model with {len(blocks)} layers")
    wrapped = []
    for i in layers:
        for name, module in list(blocks[i].named_modules()):
            parent_name, _, attr = name.rpartition(".")
            if attr in targets and isinstance(module, nn.Linear):
                parent = blocks[i].get_submodule(parent_name) if parent_name else blocks[i]
                setattr(parent, attr, LoRALinear(module, rank, rank if alpha is None else alpha))
                wrapped.append(f"{prefix}.{i}.{name}")
    found = {w.rsplit(".", 1)[1] for w in wrapped}
    if found != set(targets):
        raise UserError(f"LoRA targets {sorted(set(targets) - found)} are not nn.Linear modules of this model")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA matrices, A and B of every adapted module, in a fixed order."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def adapter_norms(model: nn.Module) -> dict[str, float]:
    """How big the adapter is, for the log: mean |A| and mean |B| over every entry of the LoRA matrices, and
    ||ΔW|| = Σ over adapted modules of scaling·||B·A||_F. An adapter being erased shows here first."""
    modules = list(lora_modules(model).values())
    with torch.no_grad():
        mean_abs = lambda ws: (sum(w.abs().sum() for w in ws) / sum(w.numel() for w in ws)).item()  # noqa: E731
        return {"lora_a_abs": mean_abs([m.lora_A for m in modules]),
                "lora_b_abs": mean_abs([m.lora_B for m in modules]),
                "delta_w_norm": sum(torch.linalg.matrix_norm(m.delta_weight()).item() for m in modules)}


@contextmanager
def disable_lora(model: nn.Module):
    """Inside this block the model is the base model: pi_ref."""
    modules = list(lora_modules(model).values())
    if any(m.merged for m in modules):
        raise RuntimeError("disable_lora needs unmerged adapters; call unmerge_lora first")
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, flag in zip(modules, previous):
            m.enabled = flag


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold B·A into the base weights (faster inference; same outputs)."""
    for m in lora_modules(model).values():
        if not m.merged:
            m.base_layer.weight += m.delta_weight().to(m.base_layer.weight.dtype)
            m.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora` (up to float rounding)."""
    for m in lora_modules(model).values():
        if m.merged:
            m.base_layer.weight -= m.delta_weight().to(m.base_layer.weight.dtype)
            m.merged = False


def lora_config(model: nn.Module) -> dict:
    """rank, alpha, targets and layer indices of the injected adapters, in PEFT's field names."""
    modules = lora_modules(model)
    if not modules:
        raise UserError("the model has no LoRA adapters")
    first = next(iter(modules.values()))
    rank = first.lora_A.shape[0]
    return {
        "r": rank,
        "lora_alpha": first.scaling * rank,
        "target_modules": sorted({n.rsplit(".", 1)[1] for n in modules}),
        "layers_to_transform": sorted({int(re.search(r"\.(\d+)\.", n).group(1)) for n in modules}),
    }


def save_adapter(model: nn.Module, path: str, base_model_name_or_path: str = "") -> None:
    """Write adapter_model.safetensors + adapter_config.json in PEFT's layout."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {}
    for name, m in lora_modules(model).items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        **lora_config(model),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS))
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def read_adapter_config(path: str) -> dict:
    """The adapter_config.json of an adapter folder, checked for the fields tinyrl needs."""
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isdir(path):
        raise UserError(f"adapter folder {path} does not exist")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        need = ("r", "lora_alpha", "target_modules", "layers_to_transform")
        missing = [k for k in need if k not in cfg]
        if missing:
            raise ValueError(f"missing fields {missing}")
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg_path} is missing or not a LoRA adapter config: {e}") from None
    return cfg


def load_adapter(model: nn.Module, path: str) -> list[str]:
    """Load a PEFT-layout adapter. Injects LoRA if the model has none; otherwise the adapters must match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = read_adapter_config(path)
    base = cfg.get("base_model_name_or_path") or "an unnamed base model"
    if cfg["layers_to_transform"] is None:  # PEFT's way of saying every layer
        cfg["layers_to_transform"] = list(range(len(decoder_layers(model)[1])))
    if not lora_modules(model):
        inject_lora(model, cfg["r"], cfg["lora_alpha"], targets=tuple(cfg["target_modules"]),
                    layers=cfg["layers_to_transform"])
    have = lora_config(model)
    diff = [f"{k}: adapter {cfg[k]} vs model {have[k]}" for k in ("r", "target_modules", "layers_to_transform")
            if (sorted(cfg[k]) if isinstance(cfg[k], list) else cfg[k]) != have[k]]
    if diff:
        raise UserError(f"adapter {path} does not fit this model's LoRA ({'; '.join(diff)})")
    try:
        tensors = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise UserError(f"cannot read {os.path.join(path, ADAPTER_WEIGHTS)}: {e}") from None
    modules = lora_modules(model)
    expected = {f"base_model.model.{n}.lora_{ab}.weight" for n in modules for ab in "AB"}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected)[:2], sorted(expected - set(tensors))[:2]
        raise UserError(f"adapter {path} (for {base}) has other modules than this model: "
                        f"unexpected {extra}, missing {missing}")
    with torch.no_grad():
        for name, m in modules.items():
            for ab in "AB":
                t, p = tensors[f"base_model.model.{name}.lora_{ab}.weight"], getattr(m, f"lora_{ab}")
                if t.shape != p.shape:
                    raise UserError(f"adapter {path} was trained on {base}: {name}.lora_{ab} has shape "
                                    f"{tuple(t.shape)}, this model needs {tuple(p.shape)}")
                p.copy_(t)
            m.scaling = cfg["lora_alpha"] / cfg["r"]
    return list(modules)


def adapter_digest(model: nn.Module) -> str:
    """sha256 of the LoRA weights' bytes: processes that stayed in step (torchrun ranks) have the same one."""
    h = hashlib.sha256()
    for p in lora_parameters(model):
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
