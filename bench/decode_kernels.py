"""The kernels under a decode step, on this machine: why the sampler is as fast as it is.

    python bench/decode_kernels.py [--rows 50] [--positions 330]

1. Matrix multiplies of a decode step (SmolLM2-135M's shapes, `rows` tokens at once) in float32 and
   bfloat16, against a square 2048 matmul in the same dtype: torch's F.linear (MKL for float32)
   against oneDNN with the weight packed in advance (what `tinyrl.cpu.packed_linears` uses).
2. Attention for one new token per row (9 heads on 3 key/value heads, head dim 64, `positions` keys):
   torch's SDPA against tinyrl's `decode_attention`, in both dtypes. Prints the ratios.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import seconds  # (also puts the repository on sys.path)

from tinyrl.cpu import decode_attention, packed_linear, packed_weight

SHAPES = {"q/o_proj": (576, 576), "k/v_proj": (192, 576), "gate/up_proj": (1536, 576), "down_proj": (576, 1536),
          "lm_head": (49152, 576)}  # (out, in) of SmolLM2-135M's layers


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50)
    p.add_argument("--positions", type=int, default=330)
    args = p.parse_args()
    M, L = args.rows, args.positions
    dtypes = (torch.float32, torch.bfloat16)
    print(f"torch threads {torch.get_num_threads()}; {M} rows\n")
    print("GFLOP/s of F.linear (torch) and of oneDNN on a packed weight (packed):")
    columns = [f"{str(d)[6:]} {kernel}" for d in dtypes for kernel in ("torch", "packed")]
    print(f"{'matmul (out x in)':<28}" + "".join(f"{c:>17}" for c in columns))
    n = 2048
    for name, (out, inp) in [("square 2048", (n, n)), *SHAPES.items()]:
        rows = n if name.startswith("square") else M
        rates = []
        for dtype in dtypes:
            x, layer = torch.randn(rows, inp, dtype=dtype), torch.nn.Linear(inp, out, bias=False, dtype=dtype)
            packed = packed_weight(layer)
            with torch.no_grad():
                for fn in (lambda: F.linear(x, layer.weight), lambda: packed_linear(layer, packed, None, x)):
                    rates.append(2 * rows * out * inp / seconds(fn) / 1e9)
        print(f"{name + f' ({out}x{inp})':<28}" + "".join(f"{r:>17.0f}" for r in rates))

    print(f"\n{'attention, 1 query, ' + str(L) + ' keys':<34}{'SDPA ms':>10}{'tinyrl ms':>11}{'SDPA / tinyrl':>15}")
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    for dtype in dtypes:
        q = torch.randn(M, 9, 1, 64, dtype=dtype)
        k, v = (torch.randn(M, 3, L + 64, 64, dtype=dtype)[:, :, :L] for _ in range(2))  # views into a larger cache
        sdpa = seconds(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        ours = seconds(lambda: decode_attention(module, q, k, v, None))
        print(f"{str(dtype)[6:]:<34}{1e3 * sdpa:>10.2f}{1e3 * ours:>11.2f}{sdpa / ours:>14.1f}x")


if __name__ == "__main__":
    main()
