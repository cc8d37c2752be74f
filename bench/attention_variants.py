"""Does the decode attention's dtype handling cost a bfloat16 decode step anything? A negative result, kept.

    python bench/attention_variants.py --model .cache/models/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf \
        [--dtype bfloat16 --threads 2 --rows 16 --positions 166 --repeats 8]

One decode step of the model (bfloat16 unless --dtype) on oneDNN linears and `tinyrl.cpu.decode_attention`'s two
matmuls, with the keys and values and the products in four arrangements (best of `repeats`, interleaved):
  A: a bfloat16 cache converted to float32 on every step, both products in float32 (what tinyrl does);
  B: a float32 cache (converted once, as written), both products in float32 (bitwise A's logits);
  C: float32 keys, bfloat16 values, the probabilities rounded to bfloat16 before the second product
     (as torch's CPU flash attention does for bfloat16);
  D: a bfloat16 cache, keys converted per step, the second product as in C.
Prints each step's milliseconds and how far its logits are from A's.
"""
from __future__ import annotations

import common  # (also puts the repository on sys.path)
from transformers import AttentionInterface
from transformers.cache_utils import Cache

from tinyrl import cpu
from tinyrl.sampling import PreallocatedLayer, forward_step


def attention(low_precision_values: bool):
    def attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if query.shape[2] != 1:  # the prefill: as tinyrl
            return cpu.decode_attention(module, query, key.to(query.dtype), value.to(query.dtype), attention_mask,
                                        dropout, scaling, **kwargs)
        B, H, _, d = query.shape
        kv = key.shape[1]
        scores = query.reshape(B, kv, H // kv, d).float() @ key.float().transpose(-1, -2) * d ** -0.5
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask[..., -key.shape[2]:], float("-inf"))
        p = scores.softmax(-1)
        out = p.to(value.dtype) @ value if low_precision_values else p @ value.float()
        return out.reshape(B, 1, H, d).to(query.dtype), None
    return attend


class FloatKeys(PreallocatedLayer):  # C: keys in float32, values in the model's dtype
    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.k_buf = self.k_buf.float()


def main():
    args, model, prompt, tokens = common.one_decode_step(__doc__.splitlines()[0])
    rows, P = args.rows, args.positions

    def way(low_precision_values: bool, layout: str | None):
        def prepare(filled):
            AttentionInterface.register("tinyrl_decode", attention(low_precision_values))
            if layout == "keys":
                cache = Cache(layers=[FloatKeys(P + 1) for _ in filled.layers])
                for layer, src in zip(cache.layers, filled.layers):
                    layer.update(src.keys.expand(rows, -1, -1, -1), src.values.expand(rows, -1, -1, -1))
            else:
                cache = Cache(layers=[layer.repeat_rows(rows, P + 1) for layer in filled.layers])
                if layout == "f32":
                    for layer in cache.layers:
                        layer.k_buf, layer.v_buf = layer.k_buf.float(), layer.v_buf.float()
                        layer.keys, layer.values = layer.k_buf[:, :, :P], layer.v_buf[:, :, :P]
            return lambda: forward_step(model, tokens, cache)
        return prepare

    ways = {"A": way(False, None), "B": way(False, "f32"), "C": way(True, "keys"), "D": way(True, None)}  # the docstring's
    times, logits = common.time_steps(args, model, prompt, ways)
    AttentionInterface.register("tinyrl_decode", cpu.decode_attention)
    common.report_steps(args, times, logits, "A")


if __name__ == "__main__":
    main()
