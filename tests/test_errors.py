"""Bad input and unsupported transformers features: clear exceptions, never wrong output."""

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from kvcompress import FullCache, SinkWindowCache, UnsupportedFeatureError, registry
from kvcompress.models import load_model
from kvcompress.testing import tiny_llama


@pytest.mark.parametrize("window", [0, -3, 2.5, None])
def test_window_below_one_is_rejected(tiny_model, window):
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        SinkWindowCache(tiny_model, window=window)


@pytest.mark.parametrize("n_sink", [-1, 1.5])
def test_negative_sinks_are_rejected(tiny_model, n_sink):
    with pytest.raises(ValueError, match="n_sink must be an integer >= 0"):
        SinkWindowCache(tiny_model, n_sink=n_sink, window=8)


def test_unknown_position_mode_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="positions must be one of"):
        SinkWindowCache(tiny_model, window=8, positions="relative")


def test_non_causal_lm_is_rejected():
    base = LlamaModel(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(TypeError, match="decoder-only causal LM"):
        FullCache(base)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        SinkWindowCache(torch.nn.Linear(2, 2), window=4)


def test_reusing_a_cache_with_another_batch_size_is_rejected(tiny_model):
    cache = SinkWindowCache(tiny_model, n_sink=1, window=4)
    tiny_model(torch.randint(3, 100, (2, 6)), past_key_values=cache)
    with pytest.raises(ValueError, match="holds a batch of 2 rows but got 3"):
        tiny_model(torch.randint(3, 100, (3, 6)), past_key_values=cache)


def test_reset_allows_a_new_batch(tiny_model):
    cache = FullCache(tiny_model)
    tiny_model(torch.randint(3, 100, (2, 6)), past_key_values=cache)
    cache.reset()
    tiny_model(torch.randint(3, 100, (3, 5)), past_key_values=cache)
    assert cache.get_seq_length() == 5 and cache.kept_counts().shape == (3, 3)


def test_crop_is_rejected(tiny_model):
    cache = FullCache(tiny_model)
    tiny_model(torch.randint(3, 100, (1, 6)), past_key_values=cache)
    assert not cache.is_croppable
    with pytest.raises(UnsupportedFeatureError, match="crop"):
        cache.crop(-2)


def test_switching_attention_away_from_the_core_is_detected(tiny_model):
    cache = FullCache(tiny_model)
    tiny_model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="not followed by the kvcompress attention core"):
        tiny_model(torch.randint(3, 100, (1, 6)), past_key_values=cache)


def test_registry_knows_the_core_strategies_and_rejects_unknown_names(tiny_model):
    assert {"full", "sink_window"} <= set(registry.available())
    assert isinstance(registry.build("sink_window", tiny_model, window=3), SinkWindowCache)
    with pytest.raises(KeyError, match="unknown strategy 'h3o'"):
        registry.get("h3o")


def test_bad_model_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load model"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="cannot load model"):
        load_model(str(tmp_path / "missing.gguf"))


def test_cache_release_removes_nothing_from_a_plain_model():
    """Building a cache switches the model to the core but leaves no hooks behind."""
    model = tiny_llama()
    FullCache(model)
    assert model.config._attn_implementation == "kvcompress"
    assert not model.get_input_embeddings()._forward_pre_hooks
