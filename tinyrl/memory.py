"""Predict tinyrl's peak memory per phase from a model config alone (no weights are loaded).

    python -m tinyrl.memory --model Qwen/Qwen2-1.5B --algo tspmo [--group-size 50 --max-new-tokens 300 ...]
    python -m tinyrl.memory --model M --algo sgrpo --budget-gb 16     # also suggest settings that fit

Phases: the weights; sampling (weights + KV cache of one chunk of rows + the logits of one step);
the update (weights + LoRA state + the activations autograd keeps in the LoRA layers for one
forward pass of --max-batch-tokens + one layer's transient work + one LM-head chunk). What autograd
keeps per token in a LoRA layer follows from which tensors each op saves when only LoRA trains:
frozen linears save nothing (their weight needs no gradient); RMSNorm saves its input and its
normalised output, LoRA its input, SDPA q, k, v and the output, the MLP the gate and up outputs
and SiLU(gate). With `--device cpu` both phases also count oneDNN's packed copy of the linear
weights, and the update a packed W^T of the layers it backpropagates through: the most the CPU
kernels can take (tinyrl/cpu.py), held only where this machine's measurement chose them.
`tests/test_memory.py` checks the predictions against measured peaks.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tinyrl.cli import ArgParser, UserError, run_main
from tinyrl.lora import parse_targets

GiB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEAD_CHUNK = 256  # rows of the LM head at once (tinyrl.update.selected_logprobs)
PROMPT_TOKENS = 64  # a typical prompt: the mult chat template is ~60 tokens, SVAMP ~50

# Offline fallbacks for the paper's model family (from their config.json on the hub).
KNOWN = {
    "Qwen/Qwen2-0.5B": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                            num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, bias=True),
    "Qwen/Qwen2-1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                            num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, bias=True),
    "Qwen/Qwen2-7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, bias=True),
}


@dataclass
class Shape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    bias: bool  # q/k/v biases (Qwen2)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def params(self) -> int:
        H, I, L, V = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        layer = H * q + 2 * H * kv + q * H + 3 * H * I + 2 * H + (q + 2 * kv if self.bias else 0)
        return V * H * (1 if self.tie_word_embeddings else 2) + L * layer + H


def shape_from_config(cfg) -> Shape:
    """A Shape from a transformers config (or anything with the same attribute names)."""
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return Shape(text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers,
                 text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                 bool(getattr(text, "tie_word_embeddings", False)),
                 bool(getattr(text, "attention_bias", False)) or text.model_type == "qwen2")


def load_shape(model: str) -> Shape:
    """The model's Shape from its config alone: a local folder, a .gguf header, the hub, or KNOWN."""
    from tinyrl.model import RANDOM

    model = model.removeprefix(RANDOM)  # a random-weight model has the shapes of the config it names
    if model in KNOWN and not os.path.exists(model):
        return Shape(**KNOWN[model])
    from transformers import AutoConfig

    path, kwargs = os.path.expanduser(model), {}
    if path.endswith(".gguf"):
        path, kwargs["gguf_file"] = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    try:
        return shape_from_config(AutoConfig.from_pretrained(path, **kwargs))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the config of {model!r}: {str(e).splitlines()[0]}; known offline: "
                        f"{', '.join(KNOWN)}") from None


def predict(shape: Shape, group_size: int, max_new_tokens: int, lora_rank: int, lora_fraction: float,
            dtype: str = "float32", chunk_size: int | None = None, max_batch_tokens: int = 8192,
            prompt_tokens: int = PROMPT_TOKENS, device: str = "cuda", packed: bool | None = None,
            lora_targets: tuple[str, ...] = ("q_proj", "v_proj")) -> dict[str, float]:
    """Bytes of each item and the peak of each phase (the algorithm enters through group_size only).

    packed: count oneDNN's packed weights (CPU only; default: on a CPU, the most the kernels can take)."""
    b = BYTES[dtype]
    H, I, V, L = shape.hidden_size, shape.intermediate_size, shape.vocab_size, shape.num_hidden_layers
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    n_lora = max(1, round(lora_fraction * L))
    weights = shape.params() * b
    # each projection: (input, output) size, and which input it reads (projections that share one share it)
    proj = {"q_proj": (H, q, "attn"), "k_proj": (H, kv, "attn"), "v_proj": (H, kv, "attn"), "o_proj": (q, H, "o"),
            "gate_proj": (H, I, "mlp"), "up_proj": (H, I, "mlp"), "down_proj": (I, H, "down")}
    lora_params = n_lora * lora_rank * sum(proj[t][0] + proj[t][1] for t in lora_targets)  # A and B of each
    lora_state = lora_params * 4 * 4  # float32 in any dtype: weights, gradients, two AdamW moments

    seq = prompt_tokens + max_new_tokens
    rows = min(chunk_size or group_size, group_size)
    kv_cache = 2 * L * kv * seq * rows * b  # keys and values of every layer, preallocated
    step_logits = rows * V * (4 + 4 + 4 + 8 + 8)  # logits, logits / T, softmax, float64 copy, its cumsum
    # on CPU, oneDNN's packed copy of every nn.Linear weight (tinyrl.cpu.packed_linears), LM head included; the
    # update also packs W^T where an input needs a gradient: from the first LoRA layer's o_proj up, and the LM head
    layer_linears = H * q + 2 * H * kv + q * H + 3 * H * I
    cpu = device == "cpu" and (packed is None or packed)
    packed = (L * layer_linears + V * H) * b * cpu
    packed_t = (n_lora * layer_linears - (H * q + 2 * H * kv) + V * H) * b * cpu
    sampling = weights + lora_state + kv_cache + step_logits + packed

    tokens = min(max(1, max_batch_tokens // seq), group_size) * seq  # rows of one forward pass x their length
    # saved per token in a LoRA layer (counted with torch.autograd.graph.saved_tensors_hooks): the two norm
    # inputs (2H), q and the attention output (2q), k and v (2kv), gate, up, SiLU(gate) (3I); and, in float32
    # whatever the dtype, a rank-r product per adapted projection and the LoRA inputs: in a float32 model each
    # input once (the attention's own output is saved already), else one float32 copy per adapted projection.
    # Measured for q and v only (docs/performance.md); the other projections follow the same rule.
    inputs = {"attn": H, "o": 0, "mlp": H, "down": I}
    lora_inputs = sum(inputs[k] for k in {proj[t][2] for t in lora_targets}) if b == 4 else \
        sum(proj[t][0] for t in lora_targets)
    saved_per_token = (2 * H + 2 * q + 2 * kv + 3 * I) * b + (lora_inputs + len(lora_targets) * lora_rank) * 4
    activations = n_lora * saved_per_token * tokens
    transient = tokens * (3 * I + 2 * H) * b  # one layer's working tensors (and its gradients in backward)
    head = HEAD_CHUNK * V * 4 * 4  # one chunk's recomputed logits, exp inside logsumexp, softmax, logits' gradient
    # the reference pass (beta > 0) runs after the policy forward has freed its working tensors: no extra term
    update = weights + lora_state + activations + transient + head + packed + packed_t
    return {"weights": weights, "lora_state": lora_state, "kv_cache": kv_cache, "step_logits": step_logits,
            "packed_weights": packed + packed_t,
            "activations": activations, "update_transient": transient + head, "sampling_peak": sampling,
            "update_peak": update, "peak": max(sampling, update), "forward_tokens": tokens, "rows": rows}


def suggest(shape: Shape, budget_bytes: float, **kw) -> tuple[int, int] | None:
    """The largest --chunk-size and --max-batch-tokens whose predicted phases fit in the budget."""
    chunk = next((c for c in range(kw["group_size"], 0, -1)
                  if predict(shape, **{**kw, "chunk_size": c})["sampling_peak"] <= budget_bytes), None)
    tokens = next((t for t in (32768, 16384, 8192, 4096, 2048, 1024, 512)
                   if predict(shape, **{**kw, "max_batch_tokens": t})["update_peak"] <= budget_bytes), None)
    return (chunk, tokens) if chunk and tokens else None


def cost_note(cfg) -> str | None:
    """For a run about to start on a CPU with a large model: what it will cost, before anything is loaded.
    Memory is the planner's prediction; time a rough guess from FLOPs at 100 GFLOP/s per core."""
    import torch

    if torch.cuda.is_available() and (cfg.device is None or cfg.device.startswith("cuda")):
        return None
    try:
        shape = load_shape(cfg.model)
    except UserError:
        return None
    P = shape.params()
    dtype = "float32" if cfg.dtype == "auto" else cfg.dtype  # auto is measured once the model loads: plan for more
    est = predict(shape, cfg.group_size, cfg.max_new_tokens, cfg.lora_rank, cfg.lora_fraction, dtype,
                  cfg.chunk_size, cfg.max_batch_tokens, device="cpu", lora_targets=parse_targets(cfg.lora_targets))
    tokens = cfg.group_size * cfg.max_new_tokens * cfg.batch_size * (1 + cfg.replay_success + cfg.replay_failure)
    flops = tokens * 2 * P * (1 + 2 * cfg.lora_fraction + (cfg.beta > 0))  # sample, update through LoRA, reference
    seconds = flops / (100e9 * torch.get_num_threads())
    if seconds < 60:
        return None
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    of_ram = f" of this machine's {ram / GiB:.0f}" if ram else ""
    return (f"  note: no GPU. On this CPU ({torch.get_num_threads()} threads) this run needs about "
            f"{est['peak'] / GiB:.1f}{of_ram} GiB (python -m tinyrl.memory) and roughly {seconds / 60:.0f} min a step, "
            f"{seconds * cfg.steps / 3600:.0f} h for {cfg.steps} steps.\n"
            f"  To see tinyrl learn on a CPU in 15 minutes, run the CPU demo in the README (SmolLM2-135M, 2x1 digits).\n")


def main(argv=None) -> int:
    from tinyrl.config import preset

    p = ArgParser(description="Predict tinyrl's peak memory per phase from a model config (no weights loaded).")
    p.add_argument("--model", default="Qwen/Qwen2-1.5B")
    p.add_argument("--algo", default="tspmo", choices=["grpo", "sgrpo", "tspmo"])
    p.add_argument("--task", default="mult", choices=["mult", "svamp"])
    p.add_argument("--group-size", type=int)
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-fraction", type=float)
    p.add_argument("--lora-targets", default="q,v", help="any of q,k,v,o,gate,up,down, or all-linear (paper: q,v)")
    p.add_argument("--chunk-size", type=int)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--dtype", default="float32", choices=list(BYTES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu adds the packed weights of oneDNN")
    p.add_argument("--budget-gb", type=float, help="suggest --chunk-size / --max-batch-tokens that fit this many GiB")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args(argv)
    paper = preset(args.algo, args.task)
    kw = dict(group_size=args.group_size or paper["group_size"], max_new_tokens=args.max_new_tokens,
              lora_rank=args.lora_rank or paper["lora_rank"], lora_fraction=args.lora_fraction or paper["lora_fraction"],
              dtype=args.dtype, chunk_size=args.chunk_size, max_batch_tokens=args.max_batch_tokens, device=args.device,
              lora_targets=parse_targets(args.lora_targets))
    shape = load_shape(args.model)
    est = predict(shape, **kw)
    if args.json:
        print(json.dumps(est))
        return 0
    g = lambda x: f"{x / GiB:7.2f} GiB"  # noqa: E731
    print(f"{args.model}: {shape.params() / 1e9:.2f}B parameters, {args.dtype}; {args.algo} on {args.task}, "
          f"|G|={kw['group_size']}, {args.max_new_tokens} new tokens, LoRA r={kw['lora_rank']} on "
          f"{args.lora_targets} of the last {max(1, round(kw['lora_fraction'] * shape.num_hidden_layers))} layers")
    print(f"  weights                         {g(est['weights'])}")
    print(f"  LoRA weights + grads + AdamW    {g(est['lora_state'])}")
    print(f"  sampling: KV cache ({est['rows']} rows)    {g(est['kv_cache'])}")
    print(f"  sampling: one step's logits     {g(est['step_logits'])}")
    if est["packed_weights"]:
        print(f"  packed weights, W and W^T (CPU) {g(est['packed_weights'])}")
    print(f"  update: saved activations       {g(est['activations'])}   ({est['forward_tokens']} tokens a pass)")
    print(f"  update: transient + LM head     {g(est['update_transient'])}")
    print(f"  peak while sampling             {g(est['sampling_peak'])}")
    print(f"  peak while updating             {g(est['update_peak'])}")
    print(f"  predicted peak                  {g(est['peak'])}")
    if args.budget_gb:
        fit = suggest(shape, args.budget_gb * GiB, **kw)
        if fit is None:
            print(f"  nothing fits in {args.budget_gb} GiB: the weights and one sequence need more; try --dtype bfloat16")
        else:
            print(f"  to fit in {args.budget_gb:g} GiB: --chunk-size {fit[0]} --max-batch-tokens {fit[1]}")
    return 0


if __name__ == "__main__":
    run_main(main)
