"""A tiny Qwen2 model and byte-level BPE tokenizer, built offline for tests (no downloads)."""
from __future__ import annotations

import os

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "System: You are a helpful AI assistant.\nUser: What's 123 multiplied by 456? Don't use a calculator.",
    "Assistant: Let's break this problem down step by step. 123 * 456 = 56088. The answer is 56088.",
    "Problem: Dan had 3 apples and bought 4 more. How many apples does he have?\nAnswer: 7",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 -5 1,234 the answer is",
    "system user assistant helpful multiplied by plus minus times equals",
]


def build_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


def build_model(vocab_size: int, seed: int = 0, layers: int = 4, hidden: int = 32, init_std: float = 0.02):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        eos_token_id=0, bos_token_id=0, pad_token_id=0, initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = [0, 2]
    return model


def save_tiny(path: str, seed: int = 0, init_std: float = 0.02) -> str:
    """Write a tiny model + tokenizer to `path` (a HF-style folder) and return it.

    init_std sets the scale of the random weights; the learning test uses a larger one, because with
    0.02 the final norm caps every logit near 0 and no policy can become confident."""
    tok = build_tokenizer()
    model = build_model(len(tok), seed=seed, init_std=init_std)
    os.makedirs(path, exist_ok=True)
    tok.save_pretrained(path)
    model.save_pretrained(path)
    return path
