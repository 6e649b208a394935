"""Issue 17: the anchor-trained SmolLM2-135M models ship in the package (kvcompress/anchors/<alias>/, LoRA
adapters) and work with `AnchorCache()` and no arguments; the adapter is really applied (under AnchorCache the
trained model predicts held-out text better than the untrained one, which is what the training was for)."""

import json
import math

import pytest
import torch

from kvcompress import AnchorCache
from kvcompress.anchor_model import adapter_dir, anchor_config
from kvcompress.bench.metrics import streaming_nll
from kvcompress.models import load_model
from kvcompress.train import heldout_files

ALIASES = ("smollm2-135m-anchor-ac", "smollm2-135m-anchor-ep")


@pytest.mark.parametrize("alias", ALIASES)
def test_the_adapters_ship_with_their_record_and_stay_small(alias):
    folder = adapter_dir(alias)
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "anchor.json", "train_state.json"} <= set(files)
    assert sum(files.values()) < 12.5e6  # both together within the 25 MB
    record = json.loads((folder / "train_state.json").read_text())
    anchor = json.loads((folder / "anchor.json").read_text())
    assert anchor["mode"] == alias.rsplit("-", 1)[1] and anchor["lora_rank"] == 8
    assert (anchor["keep_first"], anchor["keep_segments"]) == (1, 2)  # the rule measured in docs/anchor.md
    assert record["tokens"] == anchor["tokens"] >= 1_000_000  # the minimum: 1M tokens of training
    assert len(record["losses"]) == record["step"] and record["finished"] in (True, False)


def _heldout_nll(model, tokenizer, cache_factory, skip=()):
    text = heldout_files()[0].read_text(encoding="utf-8")
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)[:320]])
    total, count = streaming_nll(model, cache_factory(model, tokenizer), ids, 64, skip)
    return total / count


@pytest.mark.integration
@pytest.mark.slow
def test_trained_ep_model_beats_the_untrained_one_under_anchor_cache():
    base, base_tokenizer = load_model()
    untrained = _heldout_nll(base, base_tokenizer, lambda m, t: AnchorCache(m, t))
    del base
    model, tokenizer = load_model("smollm2-135m-anchor-ep")
    assert anchor_config(model)["mode"] == "ep"
    trained = _heldout_nll(model, tokenizer, lambda m, t: AnchorCache(keep_first=0, keep_segments=1))
    # the paper's rule for both (the shipped default rule helps the untrained model too, docs/anchor.md);
    # measured 2026-11-30 on 320 tokens of the first held-out essay: see docs/anchor.md for the full evaluation
    assert trained < untrained - 0.3, (math.exp(trained), math.exp(untrained))


@pytest.mark.integration
@pytest.mark.slow
def test_ac_model_inserts_its_anchor_and_compresses_on_it_with_no_arguments():
    model, tokenizer = load_model("smollm2-135m-anchor-ac")
    config = anchor_config(model)
    assert config["mode"] == "ac"
    ids = tokenizer("The tower is tall. It is in Paris. It was finished in", return_tensors="pt").input_ids
    assert int((ids == config["anchor_ids"][0]).sum()) == 2  # <AC> after each of the two sentences
    cache = AnchorCache()
    out = model.generate(ids, past_key_values=cache, max_new_tokens=3, do_sample=False)
    assert (cache.keep_first, cache.keep_segments) == (1, 2)  # the shipped model's rule, from its configuration
    kept = int(cache.kept_counts().max())
    assert kept < out.shape[1] - 1  # it compressed: the first sentences were folded into their anchors
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert "<AC>" not in text and text.startswith("The tower is tall. It is in Paris.")
