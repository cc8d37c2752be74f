"""The kernels under a decode step, on this machine: why the sampler is as fast as it is.

    python bench/decode_kernels.py [--rows 50] [--positions 330] [--model M]

1. Matrix multiplies of a decode step (SmolLM2-135M's shapes, or those of `--model`, `rows` tokens at
   once) in float32 and bfloat16, against a square 2048 matmul in the same dtype: torch's F.linear (MKL
   for float32) against oneDNN with the weight packed in advance (what `tinyrl.cpu.packed_linears` uses).
   GFLOP/s, and in brackets the GB/s of weights read, beside one row through 1 GiB of weights (the
   memory's limit).
2. Attention for one new token per row (SmolLM2's 9 heads on 3 key/value heads, or the model's; head dim
   64, `positions` keys): torch's SDPA against tinyrl's `decode_attention`, in both dtypes. Prints the ratios.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from common import seconds  # (also puts the repository on sys.path)

from tinyrl.cpu import decode_attention, packed_linear, packed_weight

SHAPES = {"q/o_proj": (576, 576), "k/v_proj": (192, 576), "gate/up_proj": (1536, 576), "down_proj": (576, 1536),
          "lm_head": (49152, 576)}  # (out, in) of SmolLM2-135M's layers
HEADS = (9, 3, 64)  # SmolLM2-135M's query heads, key/value heads, head dim


def model_shapes(name: str):
    """(out, in) of the linear layers of a model's decoder, and its (heads, key/value heads, head dim)."""
    from tinyrl.model import load_model

    c = load_model(name)[0].config
    d, heads, kv = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    shapes = {"q/o_proj": (d, d), "k/v_proj": (kv * head_dim, d), "gate/up_proj": (c.intermediate_size, d),
              "down_proj": (d, c.intermediate_size), "lm_head": (c.vocab_size, d)}
    return shapes, (heads, kv, head_dim)


def memory_limit() -> float:
    """GB/s of weights read by one row through 1 GiB of packed float32 weights (each call reads them all once)."""
    big = torch.nn.Linear(2 ** 12, 2 ** 16, bias=False)
    x, packed = torch.randn(1, 2 ** 12), packed_weight(big)
    with torch.no_grad():
        return 2 ** 30 / seconds(lambda: packed_linear(big, packed, None, x), repeats=5) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50)
    p.add_argument("--positions", type=int, default=330)
    p.add_argument("--model", help="a model (.gguf / folder / hub id) whose shapes to time instead of SmolLM2-135M's")
    args = p.parse_args()
    M, L = args.rows, args.positions
    shapes, (heads, kv, head_dim) = model_shapes(args.model) if args.model else (SHAPES, HEADS)
    dtypes = (torch.float32, torch.bfloat16)
    print(f"torch threads {torch.get_num_threads()}; {M} rows\n")
    print(f"the memory's limit: one row through 1 GiB of packed float32 weights reads {memory_limit():.1f} GB/s\n")
    print("GFLOP/s of F.linear (torch) and of oneDNN on a packed weight (packed) (GB/s of weights read):")
    columns = [f"{str(d)[6:]} {kernel}" for d in dtypes for kernel in ("torch", "packed")]
    print(f"{'matmul (out x in)':<28}" + "".join(f"{c:>17}" for c in columns))
    n = 2048
    for name, (out, inp) in [("square 2048", (n, n)), *shapes.items()]:
        rows = n if name.startswith("square") else M
        rates = []
        # a decode step reads each weight once: cycle through copies of ~256 MB in all, so none is read from cache
        copies = 1 if name.startswith("square") else min(64, max(1, 2 ** 26 // (out * inp)))
        for dtype in dtypes:
            x = torch.randn(rows, inp, dtype=dtype)
            layers = [torch.nn.Linear(inp, out, bias=False, dtype=dtype) for _ in range(copies)]
            packed = [packed_weight(layer) for layer in layers]
            turn = itertools.cycle(range(copies))
            with torch.no_grad():
                for fn in (lambda: F.linear(x, layers[next(turn)].weight),
                           lambda: packed_linear(layers[i := next(turn)], packed[i], None, x)):
                    s = seconds(fn)
                    rates.append(f"{2 * rows * out * inp / s / 1e9:.0f} ({out * inp * x.element_size() / s / 1e9:.1f})")
        print(f"{name + f' ({out}x{inp})':<28}" + "".join(f"{r:>17}" for r in rates))

    print(f"\n{'attention, 1 query, ' + str(L) + ' keys':<34}{'SDPA ms':>10}{'tinyrl ms':>11}{'SDPA / tinyrl':>15}")
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv
    for dtype in dtypes:
        q = torch.randn(M, heads, 1, head_dim, dtype=dtype)
        k, v = (torch.randn(M, kv, L + 64, head_dim, dtype=dtype)[:, :, :L] for _ in range(2))  # views into a larger cache
        sdpa = seconds(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        ours = seconds(lambda: decode_attention(module, q, k, v, None))
        print(f"{str(dtype)[6:]:<34}{1e3 * sdpa:>10.2f}{1e3 * ours:>11.2f}{sdpa / ours:>14.1f}x")


if __name__ == "__main__":
    main()
