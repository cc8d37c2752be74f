"""The memory planner against measured peaks (two small models, three phases, within 25%).

Each phase runs in a fresh process (tests/memory_probe.py) with glibc told to return every block over
64 KiB to the OS, so that RSS follows live tensors the way torch.cuda.max_memory_allocated does on a
GPU; otherwise RSS also counts freed blocks the allocator keeps."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tinyrl.memory import KNOWN, Shape, main, predict

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {  # each measured on one of the two CPU kernel paths (tinyrl/cpu.py), predicted for that path
    "qwen2, Qwen2's vocabulary, oneDNN packed": dict(kernels="fast", kind="qwen2", vocab_size=151936, hidden_size=256, intermediate_size=1024,
                                      num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True),
    "llama, wide layers, torch kernels": dict(kernels="torch", kind="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                               num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4,
                               tie_word_embeddings=False),
}
PHASES = [("sampling", "tspmo", 32, 160, 4096), ("update", "grpo", 12, 200, 2048), ("update", "tspmo", 12, 200, 1024)]


def measure(shape: dict, phase: str, algo: str, G: int, T: int, budget: int, kernels: str) -> dict:
    out = subprocess.run([sys.executable, os.path.join(HERE, "memory_probe.py"), json.dumps(shape), phase, algo,
                          str(G), str(T), str(budget)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TINYRL_CPU_KERNELS": kernels})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(MODELS))
def test_predictions_within_25_percent_of_measured_peaks(name):
    raw = dict(MODELS[name])
    kernels = raw.pop("kernels")
    shape = Shape(**{k: v for k, v in raw.items() if k != "kind"}, bias=raw["kind"] == "qwen2")
    for phase, algo, G, T, budget in PHASES:
        got = measure(raw, phase, algo, G, T, budget, kernels)
        q, kv = shape.hidden_size, shape.num_key_value_heads * shape.head_dim
        lora = 2 * 8 * ((shape.hidden_size + q) + (shape.hidden_size + kv))  # 2 layers (1/4 of 8), r = 8, q and v
        assert got["params"] == shape.params() + lora  # the weights term is exact
        est = predict(shape, G, T, lora_rank=8, lora_fraction=0.25, max_batch_tokens=budget, device="cpu",
                      packed=kernels == "fast" and torch.backends.mkldnn.is_available())
        predicted = (est["sampling_peak"] if phase == "sampling" else est["update_peak"]) - est["weights"]
        ratio = predicted / 2**20 / got["delta_mb"]
        print(f"{name} {phase} {algo}: measured {got['delta_mb']:.0f} MB, predicted {predicted / 2**20:.0f} MB")
        assert 0.75 <= ratio <= 1.25, (phase, algo, ratio)


def test_paper_setting_prints_an_estimate(capsys):
    assert main(["--model", "Qwen/Qwen2-1.5B", "--algo", "tspmo", "--budget-gb", "16"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "to fit in 16 GiB" in out
    assert abs(Shape(**KNOWN["Qwen/Qwen2-1.5B"]).params() - 1_543_714_304) < 1e3  # Qwen2-1.5B's parameter count
