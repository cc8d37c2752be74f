"""Faster CPU kernels, used only where a measurement on this machine says they are faster.

Nothing here runs on a GPU; a reader porting the GPU path can skip this file. Two kernels can
beat torch's defaults on some CPUs and lose on others:
- frozen `nn.Linear` layers on oneDNN with the weight packed in advance (`packed_linears`). On an
  AMD EPYC, torch's float32 F.linear goes to MKL's AVX2 code and oneDNN's AVX-512 code ran
  SmolLM2's decode shapes 1.5-3x faster; on an Intel Xeon with AMX, MKL was faster than oneDNN.
- attention of one new token per row as two float32 matmuls (`decode_attention`): 4x faster than
  SDPA's single-query kernel in bfloat16 on the AMD machine, 2.7x slower on the Intel one.
Both compute the same products summed in another order, not at a lower precision.

So neither is a fixed default. `choose(model, phase, probe, candidates)` times each candidate on
the model's own shapes the first time a phase runs ("decode": a sampler step; "update": a forward
pass of training length) and keeps torch's path unless another is at least 5% faster. The choice
is kept for the process, in training checkpoints (a resumed run keeps it), and in a cache file per
machine (`kernel_cache_path()`: keyed by CPU model, torch version, thread count, the model's shapes
and the probe's), so a new process on the same machine does not pay the measurement again; delete
the file to measure again. Override with
`--cpu-kernels` or the environment variable TINYRL_CPU_KERNELS: auto (measure, the default) |
torch (never use these kernels) | fast (always use them, where the build supports them).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tinyrl.cli import UserError, cache_dir

MODES = ("auto", "torch", "fast")
MARGIN = 0.95  # another kernel must take at most 95% of torch's time to be chosen


@dataclass(frozen=True)
class Kernels:
    linear: bool = False  # frozen nn.Linear layers on oneDNN, packed weights
    attention: bool = False  # decode steps through decode_attention instead of SDPA

    def __str__(self) -> str:
        parts = ["oneDNN linears"] * self.linear + ["two-matmul decode attention"] * self.attention
        return " + ".join(parts) or "torch's kernels"


TORCH = Kernels()
_mode: str | None = None  # set by --cpu-kernels; None: the environment variable, else auto
_chosen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {phase: (Kernels, speed-up over torch's)}


def set_mode(mode: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"cpu kernels mode must be one of {MODES}, got {mode!r}")
    global _mode
    _mode = mode


def mode() -> str:
    value = _mode or os.environ.get("TINYRL_CPU_KERNELS") or "auto"
    if value not in MODES:
        raise UserError(f"TINYRL_CPU_KERNELS={value!r}: choose one of {', '.join(MODES)}")
    return value


def is_cpu(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "cpu"


def onednn_usable() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def choose(model: nn.Module, phase: str, probe: Callable[[], float], candidates: list[Kernels],
           shape: str = "") -> Kernels:
    """The kernels `phase` runs on for this CPU model: measured once (best of 3 timed probe() calls per
    candidate, interleaved, after one warm-up each), then remembered, in the process and in the machine's
    cache file (`shape` names the probe's size). probe() returns its own seconds."""
    if not is_cpu(model) or mode() == "torch":
        return TORCH
    if mode() == "fast":
        return Kernels(any(c.linear for c in candidates), any(c.attention for c in candidates))
    record = _chosen.setdefault(model, {})
    key = cache_key(model, phase, shape)
    if phase not in record and (hit := read_cache().get(key)):
        record[phase] = (Kernels(hit["linear"], hit["attention"]), hit["speedup"])
    if phase not in record:
        candidates = [TORCH] + [c for c in candidates if c != TORCH]
        times: dict[Kernels, float] = {}
        for c in candidates:  # warm-up: packs the weights once
            with use(model, c):
                probe()
        for _ in range(3):
            for c in candidates:
                with use(model, c):
                    times[c] = min(times.get(c, float("inf")), probe())
        best = min(candidates, key=times.__getitem__)
        if times[best] > MARGIN * times[TORCH]:
            best = TORCH
        if not best.linear:
            unpack(model)  # the packed copies made for the measurement would only take memory
        record[phase] = (best, round(times[TORCH] / times[best], 3))
        write_cache(key, {"linear": best.linear, "attention": best.attention, "speedup": record[phase][1]})
    return record[phase][0]


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> list[str]:
    """What a measurement on this machine depends on besides the model: the CPU, the instruction set torch and
    oneDNN dispatch to (ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA can lower it), torch, the thread count."""
    return [cpu_name(), f"dispatch {torch.backends.cpu.get_cpu_capability()}",
            f"oneDNN ISA {os.environ.get('ONEDNN_MAX_CPU_ISA', 'max')}", f"torch {torch.__version__}",
            f"{torch.get_num_threads()} threads"]


def cache_key(model: nn.Module, phase: str, shape: str = "") -> str:
    """What a measured choice depends on: the machine, the model's shapes, the probe's."""
    c = model.config
    dims = [getattr(c, k, None) for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "vocab_size")]
    return "|".join(map(str, [*machine(), f"oneDNN {onednn_usable()}", *dims, next(model.parameters()).dtype,
                              c._attn_implementation, phase, shape]))


def kernel_cache_path() -> str:
    return os.path.join(cache_dir(), "cpu_kernels.json")


def read_cache() -> dict:
    try:
        with open(kernel_cache_path()) as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):  # none yet, or damaged: measure (and rewrite it)
        return {}


def write_cache(key: str, decision: dict) -> None:
    """Add one decision; a cache that cannot be written only costs the next process a measurement."""
    path = kernel_cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({**read_cache(), key: decision}, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


def decisions(model: nn.Module) -> dict[str, dict]:
    """What `choose` picked for each phase of this model, and the measured speed-up over torch's kernels
    (JSON-friendly; saved in checkpoints and printed by train.py and eval.py)."""
    return {phase: {"linear": k.linear, "attention": k.attention, "speedup": speedup}
            for phase, (k, speedup) in _chosen.get(model, {}).items()}


def adopt(model: nn.Module, saved: dict[str, dict]) -> None:
    """Reuse earlier decisions (a resumed run keeps the kernels it started with) instead of measuring again."""
    _chosen[model] = {phase: (Kernels(d["linear"], d["attention"]), d.get("speedup")) for phase, d in saved.items()}


def describe(model: nn.Module) -> str:
    """One line for the log: what each phase runs on, and why."""
    if mode() != "auto":
        return f"{mode()} (set by --cpu-kernels or TINYRL_CPU_KERNELS)"
    parts = [f"{phase}: {Kernels(d['linear'], d['attention'])}"
             + (f" ({d['speedup']:.2f}x torch's)" if d["speedup"] and (d["linear"] or d["attention"]) else "")
             for phase, d in decisions(model).items()]
    return "; ".join(parts) + f" (measured on this machine, kept in {kernel_cache_path()})" if parts \
        else "not measured yet"


@contextlib.contextmanager
def use(model: nn.Module, kernels: Kernels, backward: bool = False):
    """Within the block, `model` computes on `kernels` (a CPU model; elsewhere nothing changes)."""
    swap = kernels.attention and is_cpu(model) and model.config._attn_implementation == "sdpa"
    if swap:
        model.config._attn_implementation = "tinyrl_decode"
    try:
        with packed_linears(model, backward) if kernels.linear else contextlib.nullcontext():
            yield
    finally:
        if swap:
            model.config._attn_implementation = "sdpa"


# ---------------------------------------------------------------- oneDNN linears on packed weights
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


def unpack(model: nn.Module) -> None:
    """Drop the packed copies of this model's weights."""
    for m in model.modules():
        _PACKED.pop(m, None)


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

    The packed copy is kept with the layer (`packed_weight`); with backward=True, layers whose input
    needs a gradient also pack W^T, which is freed on exit. Trainable layers, models on other
    devices, and torch builds without oneDNN are left as they are; so is everything when
    `torch.backends.mkldnn.enabled = False`."""
    layers = []
    if is_cpu(model) and onednn_usable():
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


# ---------------------------------------------------------------- decode-step attention
def decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention for one new token per row as two float32 matmuls; every other call goes to HF's SDPA.

    query (B, H, 1, d), key/value (B, kv_heads, L, d), attention_mask None or (B, 1, 1, L), bool (True =
    attend) or additive. The result is the exact attention rounded once to the model's dtype."""
    if query.shape[2] != 1 or dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    B, H, _, d = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(B, kv_heads, H // kv_heads, d).float()  # GQA: the heads that share a key/value head
    scores = q @ key.float().transpose(-1, -2) * (d ** -0.5 if scaling is None else scaling)  # (B, kv, H/kv, L)
    if attention_mask is not None:
        mask = attention_mask[..., -key.shape[2]:]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    out = scores.softmax(-1) @ value.float()  # (B, kv, H/kv, d)
    return out.reshape(B, 1, H, d).to(value.dtype), None  # HF's layout: (B, q_len, H, d)


AttentionInterface.register("tinyrl_decode", decode_attention)
AttentionMaskInterface.register("tinyrl_decode", sdpa_mask)


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """fn as a probe for `choose`: returns the seconds one call took."""
    def probe() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return probe


# ---------------------------------------------------------------- bfloat16 or float32, by measurement
BF16_MARGIN = 1.2  # `--dtype auto` takes bfloat16 on a CPU only where it is at least this much faster


def linear_speed(config, rows: int = 64, timer: Callable[[torch.dtype], float] | None = None,
                 cached: bool = True) -> dict[str, float]:
    """GFLOP/s of F.linear in float32 and in bfloat16 on one decoder layer's shapes of `config` (q, gate, down
    projections, `rows` rows: a decode step of a group, or an evaluation batch): best of 3 after a warm-up.
    Kept in the machine's cache file like the kernel choice (CPUs without native bfloat16 run it ~8x slower)."""
    h, i = config.hidden_size, config.intermediate_size
    shapes = [(h, h), (h, i), (i, h)]  # (in, out)
    flops = sum(2 * rows * a * b for a, b in shapes)
    key = "|".join(map(str, [*machine(), "dtype speed", rows, *shapes]))
    if timer is None and cached and (hit := read_cache().get(key)):
        return hit

    def measure(dtype: torch.dtype) -> float:
        g = torch.Generator().manual_seed(0)
        pairs = [(torch.randn(rows, a, generator=g).to(dtype), torch.randn(b, a, generator=g).to(dtype)) for a, b in shapes]
        best = float("inf")
        with torch.no_grad():
            for attempt in range(4):  # the first is a warm-up
                start = time.perf_counter()
                for x, w in pairs:
                    F.linear(x, w)
                if attempt:
                    best = min(best, time.perf_counter() - start)
        return best

    seconds = {name: (timer or measure)(dtype) for name, dtype in (("float32", torch.float32),
                                                                    ("bfloat16", torch.bfloat16))}
    speed = {name: float(f"{flops / s / 1e9:.3g}") for name, s in seconds.items()}
    if timer is None:
        write_cache(key, speed)
    return speed


def pick_dtype(config, requested: str, device: torch.device, speed=linear_speed) -> tuple[str, str | None]:
    """The dtype to load in, and a line to print (or None). `auto`: bfloat16 on a GPU; on a CPU bfloat16 only
    where it is measured >= 1.2x float32's speed, else float32. An explicit bfloat16 that is slower here gets
    a warning line with both figures."""
    if device.type != "cpu" or requested not in ("auto", "bfloat16"):
        return ("bfloat16" if requested == "auto" else requested), None
    s = speed(config)
    figures = f"bfloat16 {s['bfloat16']:g} vs float32 {s['float32']:g} GFLOP/s on this model's shapes"
    if requested == "bfloat16":
        if s["bfloat16"] < s["float32"]:
            return "bfloat16", (f"warning: bfloat16 is slower than float32 on this CPU ({figures}); --dtype auto or "
                                f"float32 would be faster")
        return "bfloat16", None
    chosen = "bfloat16" if s["bfloat16"] >= BF16_MARGIN * s["float32"] else "float32"
    return chosen, f"  --dtype auto: {chosen} ({figures}; bfloat16 needs {BF16_MARGIN}x)"
