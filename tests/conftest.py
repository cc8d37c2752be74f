import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Qwen2 model + byte-level BPE tokenizer saved as a HF folder (built offline, once)."""
    from tiny import save_tiny

    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture
def tiny(tiny_dir):
    """(model, tokenizer) loaded the way users load theirs: frozen, eval mode, CPU."""
    from tinyrl.model import load_model

    return load_model(tiny_dir, device="cpu")
