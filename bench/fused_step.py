"""Is HF's module code what a bfloat16 decode step pays for? A negative result, kept.

    python bench/fused_step.py --model .cache/models/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf \
        [--dtype bfloat16 --threads 2 --rows 16 --positions 166 --repeats 8]

One decode step of a Qwen2/Llama-family model on tinyrl's CPU kernels (oneDNN linears on packed weights,
`tinyrl.cpu.decode_attention`'s two matmuls), computed three ways (best of `repeats`, interleaved):
  hf:    through HF's modules, as tinyrl's sampler runs it (`forward_step`);
  plain: a hand-written step, no HF module calls, mask or cache objects: the same kernels, fewer ops;
  fused: as plain, with SiLU, the gate-up product and both residual adds fused into the linears as
         oneDNN post-ops (4 fewer ops a layer).
Prints each step's milliseconds and how far its logits are from hf's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import common  # (also puts the repository on sys.path)
from transformers.cache_utils import Cache

from tinyrl import cpu
from tinyrl.sampling import forward_step


def linear(layer, x, post="none", other=None):
    """layer(x) on its packed weight; post: a oneDNN post-op ("swish"), or with `other` "add" / "mul"."""
    w = cpu.packed_weight(layer)
    if other is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, w, layer.bias, post)
    return torch.ops.mkldnn._linear_pointwise(x, w, layer.bias, post, [], "")


def step(model, ids, cache: Cache, keep: torch.Tensor, positions: torch.Tensor, fused: bool) -> torch.Tensor:
    """Last-position logits of one new token per row: ids (B, 1), keep (B, L) the columns each row attends to."""
    m = model.model
    x = m.embed_tokens(ids[:, 0])  # (B, D)
    cos, sin = (t[:, :1] for t in m.rotary_emb(x[:, None], positions))  # (B, 1, head_dim), broadcast over heads
    B, norm = x.shape[0], lambda x, n: F.rms_norm(x, (x.shape[-1],), n.weight, n.variance_epsilon)
    for i, layer in enumerate(m.layers):
        a, mlp = layer.self_attn, layer.mlp
        h = norm(x, layer.input_layernorm)
        q, k, v = (linear(p, h).view(B, -1, a.head_dim) for p in (a.q_proj, a.k_proj, a.v_proj))
        half = a.head_dim // 2
        q, k = (t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin for t in (q, k))
        keys, values = cache.update(k[:, :, None], v[:, :, None], i)  # (B, kv_heads, L, head_dim)
        s = q.view(B, keys.shape[1], -1, a.head_dim).float() @ keys.float().transpose(-1, -2) * a.scaling
        o = (s.masked_fill(~keep[:, None, None], float("-inf")).softmax(-1) @ values.float()).reshape(B, -1).to(x.dtype)
        x = linear(a.o_proj, o, "add", x) if fused else x + linear(a.o_proj, o)
        h = norm(x, layer.post_attention_layernorm)
        if fused:
            x = linear(mlp.down_proj, linear(mlp.up_proj, h, "mul", linear(mlp.gate_proj, h, "swish")), "add", x)
        else:
            x = x + linear(mlp.down_proj, F.silu(linear(mlp.gate_proj, h)) * linear(mlp.up_proj, h))
    return linear(model.lm_head, norm(x, m.norm)).float()


def main():
    args, model, prompt, tokens = common.one_decode_step(__doc__.splitlines()[0])
    rows, P = args.rows, args.positions
    keep, positions = torch.ones(rows, P + 1, dtype=torch.bool), torch.full((rows, 1), P)

    def way(run):
        def prepare(filled):
            cache = Cache(layers=[layer.repeat_rows(rows, P + 1) for layer in filled.layers])
            return lambda: run(cache)
        return prepare

    ways = {"hf": way(lambda c: forward_step(model, tokens, c, keep, positions)),
            "plain": way(lambda c: step(model, tokens, c, keep, positions, fused=False)),
            "fused": way(lambda c: step(model, tokens, c, keep, positions, fused=True))}
    common.report_steps(args, *common.time_steps(args, model, prompt, ways), "hf")


if __name__ == "__main__":
    main()
