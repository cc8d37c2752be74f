"""bench/gpu_check.py, the GPU script's train.py and eval.py path, on the CPU with a tiny random-weight config."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_runs_every_algorithm_and_the_eval_engines(tiny_dir):
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--model", f"random:{tiny_dir}", "--groups", "3,3,4",
                        "--max-new-tokens", "8", "--steps", "1", "--eval-n", "4"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for algo in ("grpo", "sgrpo", "tspmo"):
        assert f"{algo} step 1: seconds " in r.stdout and "(planner: " in r.stdout
    assert "static cache: not covered" in r.stdout  # no CUDA here
    assert "tinyrl continuous (eval.py)" in r.stdout and "gpu check: every command finished" in r.stdout


def test_gpu_check_fails_when_a_command_fails(tmp_path):
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--model", f"random:{tmp_path / 'none'}",
                        "--steps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0


def test_random_model_is_the_named_config_with_any_id_decodable(tiny_dir):
    from tinyrl.model import load_model

    model, tok = load_model(f"random:{tiny_dir}", device="cpu")
    assert model.config.vocab_size == 300 and len(tok) == 300
    assert tok.decode([250, 40, 0], skip_special_tokens=True) == "<250>" + tok.decode([40])
    ids = tok.apply_chat_template([{"role": "user", "content": "2 x 3"}], add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
