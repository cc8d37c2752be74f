"""Load a Hugging Face causal LM and its tokenizer: hub id, local folder, or a `.gguf` file.

The base weights are frozen (only LoRA trains, SPEC §2); float32 by default as in the paper.
`eos_ids` collects every id that ends a completion (SPEC §3): for Qwen2 both
`<|endoftext|>` and `<|im_end|>`. On CPU, `packed_linears` runs the frozen linear layers on oneDNN.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from tinyrl.cli import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present, else CPU; an explicit `device` ("cpu", "cuda:1", ...) wins."""
    if device:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {device} asked for CUDA, but torch sees no GPU here")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith(".gguf") or name.count("/") > 1 or os.sep + os.sep in name


def load_model(name: str, dtype: str = "float32", device: str | None = None):
    """Return (model, tokenizer) with every base weight frozen and the model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    dev = pick_device(device)
    path = os.path.expanduser(name)
    kwargs: dict = {}
    model_kwargs: dict = {}
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise UserError(f"model file {name} does not exist")
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(f"loading a .gguf file needs {' and '.join(missing)}: pip install gguf accelerate")
        path, kwargs["gguf_file"] = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        try:  # newer transformers can keep GGUF blocks packed in its own layers; LoRA needs plain nn.Linear
            from transformers import GgufConfig
            model_kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers always dequantize
            pass
    elif not os.path.exists(path) and _looks_like_path(name):
        raise UserError(f"model path {name} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **kwargs, **model_kwargs)
    except OSError as e:  # hub unreachable, unknown repo, or a folder without model files
        where = "folder" if os.path.isdir(path) else "hub id"
        first = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not load model {name!r} ({where}): {first}. Offline? Pass a local folder or .gguf file with --model"
        ) from None
    model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if not eos_ids(model, tokenizer):
        raise UserError(f"the tokenizer of {name} has no EOS token, so completions could never end")
    return model, tokenizer


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS, `<|im_end|>`, and the generation config's EOS list."""
    ids = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    ids.append(im_end)
    gen = getattr(model, "generation_config", None)
    gen_eos = getattr(gen, "eos_token_id", None)
    ids += gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    return sorted({int(i) for i in ids if i is not None})


def pad_id(tokenizer, eos: list[int]) -> int:
    """The padding id: the tokenizer's own, else the first EOS id (padding is always masked out)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]


_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # nn.Linear -> (weight ref, its state, packed)


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packed_weight(layer: nn.Linear) -> torch.Tensor:
    """The layer's weight in oneDNN's packed layout, packed once and again only if the weight changes."""
    w = layer.weight
    state = (w.data_ptr(), w._version, w.dtype)  # changed by .data swaps, in-place edits, casts
    ref, seen, packed = _PACKED.get(layer, (None, None, None))
    if ref is None or ref() is not w or seen != state:  # ref(): a new Parameter
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())
        _PACKED[layer] = (weakref.ref(w), state, packed)
    return packed


class _PackedLinear(torch.autograd.Function):
    """x W^T + b on the packed W; backward gives x its gradient on a packed W^T (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x, layer, packed, transposed):
        ctx.layer, ctx.transposed = layer, transposed
        return _onednn_linear(x, packed, layer.bias)

    @staticmethod
    def backward(ctx, grad):
        if ctx.layer not in ctx.transposed:  # packed on first use: only layers above the first LoRA layer need it
            w_t = ctx.layer.weight.detach().t().contiguous()
            ctx.transposed[ctx.layer] = torch.ops.mkldnn._reorder_linear_weight(w_t)
        return _onednn_linear(grad, ctx.transposed[ctx.layer], None), None, None, None


def packed_linear(layer: nn.Linear, packed: torch.Tensor, transposed: dict | None, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` on the packed weight. An input that needs a gradient gets it through `_PackedLinear` when
    `transposed` (a store for packed W^T) is given, else through plain F.linear."""
    if torch.is_grad_enabled() and x.requires_grad:
        if transposed is None:
            return F.linear(x, layer.weight, layer.bias)
        return _PackedLinear.apply(x, layer, packed, transposed)
    return _onednn_linear(x, packed, layer.bias)


@contextlib.contextmanager
def packed_linears(model: nn.Module, backward: bool = False):
    """Within the block, a CPU model's frozen nn.Linear layers compute on oneDNN with packed weights.

    torch's float32 F.linear calls MKL, which takes its AVX2 code on AMD CPUs: at SmolLM2's decode
    shapes it reached 84-167 GFLOP/s on this repository's AMD machine, where oneDNN's AVX-512 code
    reached 244-424 (bench/decode_kernels.py). The results are the same float32 (or bf16) products
    summed in another order, not a lower precision. The packed copy of the weights is kept with the
    layer (`packed_weight`); with backward=True, layers whose input needs a gradient also pack W^T,
    which is freed on exit. Trainable layers, models on other devices, and torch builds without
    oneDNN are left as they are; `torch.backends.mkldnn.enabled = False` turns it off."""
    layers = []
    if next(model.parameters()).device.type == "cpu" and torch.backends.mkldnn.is_available() \
            and torch.backends.mkldnn.enabled:
        layers = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in vars(m)
                  and not m.weight.requires_grad and (m.bias is None or not m.bias.requires_grad)
                  and m.weight.dtype in (torch.float32, torch.bfloat16)]
    try:
        packed = [packed_weight(layer) for layer in layers]
    except (RuntimeError, NotImplementedError):  # a build whose oneDNN cannot pack these weights: plain torch
        layers, packed = [], []
    transposed = {} if backward else None
    for layer, weight in zip(layers, packed):
        layer.forward = functools.partial(packed_linear, layer, weight, transposed)  # shadows nn.Linear.forward
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
