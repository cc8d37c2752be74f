"""Load a Hugging Face causal LM and its tokenizer: hub id, local folder, or a `.gguf` file.

The base weights are frozen (only LoRA trains); float32 by default, as in the paper.
`eos_ids` collects every id that ends a completion: for Qwen2 both `<|endoftext|>` and `<|im_end|>`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sys
import urllib.parse

import torch

from tinyrl.cli import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present, else CPU; an explicit `device` ("cpu", "cuda:1", ...) wins."""
    if device:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {device} asked for CUDA, but torch sees no GPU here")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith(".gguf") or name.count("/") > 1 or os.sep + os.sep in name


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the model hub answers a TCP connection (a proxy in the environment is trusted to). Without
    this check, an offline machine spends about a minute in retries before transformers gives up."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def gguf_read_once():
    """Within this block, `gguf.GGUFReader` parses each file once. transformers reads a .gguf's header three
    times for one model (tokenizer, config, weights), and on Qwen2's 151,936-token vocabulary each read takes
    about as long as de-quantizing every weight; the reader only maps the file, so one can serve all three.
    transformers' own "Converting and de-quantizing" progress bar (a few seconds, hundreds of lines in a log)
    is switched off in the block."""
    import functools

    import gguf
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    original, readers, bar = gguf.GGUFReader, {}, getattr(hf_gguf, "tqdm", None)

    def reader(path, mode="r"):
        key = (os.path.abspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader, hf_gguf.tqdm = reader, functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        gguf.GGUFReader, hf_gguf.tqdm = original, bar


RANDOM = "random:"  # --model random:Qwen/Qwen2-1.5B: that config with random weights (`random_model`)
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def char_tokenizer(vocab_size: int):
    """A tokenizer that needs no file: Qwen2's three special tokens, one token per printable ASCII character,
    and `<N>` for every other id up to vocab_size, so any sampled id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    vocab.update({f"<{i}>": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # every character is a token
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], pad_token=specials[0],
                                   additional_special_tokens=specials[1:], chat_template=CHAT_TEMPLATE)


def random_model(name: str, dtype: str, device: torch.device):
    """(model, tokenizer) for `random:NAME`: a causal LM with random weights (seed 0) built from a config alone,
    NAME one that `tinyrl.memory` knows offline (Qwen/Qwen2-0.5B, Qwen/Qwen2-1.5B, Qwen/Qwen2-7B) or a folder
    holding a config.json, with `char_tokenizer`. Nothing is downloaded: it measures speed and memory at a
    model's real shapes on new hardware (bench/gpu_check.py). Its completions are noise."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

    from tinyrl.memory import KNOWN

    if os.path.isdir(name):
        config = AutoConfig.from_pretrained(name)
    else:
        config = Qwen2Config(**{k: v for k, v in KNOWN[name].items() if k != "bias"}, max_position_embeddings=32768)
    if dtype in ("auto", "bfloat16"):
        from tinyrl.cpu import pick_dtype

        dtype, _ = pick_dtype(config, dtype, device)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.generation_config.eos_token_id = [0, 2]
    return model, char_tokenizer(config.vocab_size)


def check_model(name: str) -> None:
    """What can be checked of --model without loading it: a path that exists, and gguf's packages for a .gguf."""
    if name.startswith(RANDOM):
        from tinyrl.memory import KNOWN

        if not (name[len(RANDOM):] in KNOWN or os.path.isdir(name[len(RANDOM):])):
            raise UserError(f"--model {name}: after random: give one of {', '.join(KNOWN)} or a folder with a "
                            f"config.json")
        return
    path = os.path.expanduser(name)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise UserError(f"model file {name} does not exist")
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(f"loading a .gguf file needs {' and '.join(missing)}: pip install gguf accelerate")
    elif not os.path.exists(path) and _looks_like_path(name):
        raise UserError(f"model path {name} does not exist")


def _source(name: str) -> tuple[str, dict, str]:
    """Where `from_pretrained` finds a model: (folder or hub id, its keyword arguments, a note when offline)."""
    check_model(name)
    path, kwargs = os.path.expanduser(name), {}
    if path.endswith(".gguf"):
        path, kwargs["gguf_file"] = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    offline = ""
    if not os.path.exists(path) and not os.environ.get("HF_HUB_OFFLINE") and not hub_reachable():
        kwargs["local_files_only"], offline = True, " (the hub is unreachable from here, so only the local cache was tried)"
    return path, kwargs, offline


def load_tokenizer(name: str):
    """The tokenizer of a model (hub id, folder or .gguf file) without its weights: for tools that only decode."""
    from transformers import AutoTokenizer

    path, kwargs, offline = _source(name)
    try:
        with gguf_read_once() if "gguf_file" in kwargs else contextlib.nullcontext():
            return AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as e:
        raise UserError(f"could not load the tokenizer of {name!r}: {str(e).strip().splitlines()[0]}{offline}. "
                        f"Pass a local folder or .gguf file with --model") from None


def load_model(name: str, dtype: str = "float32", device: str | None = None):
    """Return (model, tokenizer) with every base weight frozen and the model in eval mode.

    dtype "auto" is measured on the model's shapes (`cpu.pick_dtype`: bfloat16 on a GPU; on a CPU only
    where it is >= 1.2x faster); `model.dtype` tells what was chosen. The choice, and a warning for a
    bfloat16 that is slower on this CPU than float32, are printed."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if dtype not in (*DTYPES, "auto"):
        raise UserError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    dev = pick_device(device)
    if name.startswith(RANDOM):
        check_model(name)
        model, tokenizer = random_model(name[len(RANDOM):], dtype, dev)
        return _frozen(model.to(dev)), tokenizer
    path, kwargs, offline = _source(name)
    model_kwargs: dict = {}
    if "gguf_file" in kwargs:
        try:  # newer transformers can keep GGUF blocks packed in its own layers; LoRA needs plain nn.Linear
            from transformers import GgufConfig
            model_kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers always dequantize
            pass
    try:
        with gguf_read_once() if "gguf_file" in kwargs else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            if dtype in ("auto", "bfloat16"):
                from tinyrl.cpu import pick_dtype

                dtype, note = pick_dtype(AutoConfig.from_pretrained(path, **kwargs), dtype, dev)
                if note:
                    print(note, file=sys.stderr if note.startswith("warning") else sys.stdout, flush=True)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **kwargs, **model_kwargs)
    except OSError as e:  # hub unreachable, unknown repo, or a folder without model files
        where = "folder" if os.path.isdir(path) else "hub id"
        first = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not load model {name!r} ({where}): {first}{offline}. Pass a local folder or .gguf file with --model"
        ) from None
    if not eos_ids(model, tokenizer):
        raise UserError(f"the tokenizer of {name} has no EOS token, so completions could never end")
    return _frozen(model.to(dev)), tokenizer


def _frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS, `<|im_end|>` and `<|endoftext|>` where the vocabulary
    has them (Qwen2's chat and base models each end with one of the two), and the generation config's EOS list."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] + [vocab.get(t) for t in ("<|im_end|>", "<|endoftext|>")]
    gen = getattr(model, "generation_config", None)
    gen_eos = getattr(gen, "eos_token_id", None)
    ids += gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    return sorted({int(i) for i in ids if i is not None})


def pad_id(tokenizer, eos: list[int]) -> int:
    """The padding id: the tokenizer's own, else the first EOS id (padding is always masked out)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
