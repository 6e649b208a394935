"""Issue 20, items 5-9: inputs that gave a misleading result or a misleading error. Each test names its item."""

import pytest
import torch
from transformers import DynamicCache

from kvcompress import AnchorCache, ExpectedAttentionCache, FullCache, SinkWindowCache, registry
from kvcompress.testing import CharTokenizer, tiny_llama

PROMPT = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
GREEDY = dict(do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


# item 5: use_cache=False with a cache --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["full", "sink_window", "anchor"])
def test_generate_with_a_cache_and_use_cache_false_is_refused(tiny_model, name):
    """Before the fix: no error; the model wrote the prompt into the cache, generate (cache-free with
    use_cache=False) fed the whole sequence again, and the second token's logits differed by 1.97 on SmolLM2
    (from the third token on, the continuation check refused)."""
    cache = {"full": FullCache, "sink_window": lambda m: SinkWindowCache(m, n_sink=1, window=4),
             "anchor": lambda m: AnchorCache(m, anchor_ids=[5])}[name](tiny_model)
    with pytest.raises(ValueError, match="use_cache=False"):
        tiny_model.generate(PROMPT, past_key_values=cache, use_cache=False, max_new_tokens=2, **GREEDY)
    with pytest.raises(ValueError, match="use_cache=False"):
        tiny_model(PROMPT, past_key_values=cache, use_cache=False)
    assert cache.get_seq_length() == 0  # refused before the model wrote anything into it


def test_use_cache_false_without_a_cache_and_the_cache_with_use_cache_true_still_work(tiny_model):
    FullCache(tiny_model)  # switches the model to the kvcompress core
    plain = tiny_model.generate(PROMPT, use_cache=False, max_new_tokens=3, **GREEDY)
    cached = tiny_model.generate(PROMPT, past_key_values=FullCache(tiny_model), use_cache=True, max_new_tokens=3,
                                 **GREEDY)
    assert torch.equal(plain.sequences, cached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(plain.logits), atol=1e-5, rtol=0)


# item 6: a used cache given a new, LONGER prompt ---------------------------------------------------------------
def test_a_longer_new_prompt_continues_the_cache_exactly_as_dynamic_cache_does(tiny_model):
    """Documented limit (docs/errors.md, "Not detectable"): generate() feeds only the new prompt's tokens past the
    ones the cache has seen, and those ids are all any cache receives, so the cache continues as if the new prompt
    extended the old one. transformers' DynamicCache does exactly the same: same logits. (If a future version
    detects this case, this test fails and the docs must change with it.)"""
    longer = torch.randint(3, 100, (1, 10), generator=torch.Generator().manual_seed(1))

    def misuse(cache):
        tiny_model.generate(PROMPT, past_key_values=cache, max_new_tokens=2, **GREEDY)  # the cache has seen 7
        return torch.stack(tiny_model.generate(longer, past_key_values=cache, max_new_tokens=3, **GREEDY).logits)

    fresh = torch.stack(tiny_model.generate(longer, past_key_values=FullCache(tiny_model), max_new_tokens=3,
                                            **GREEDY).logits)
    ours, theirs = misuse(FullCache(tiny_model)), misuse(DynamicCache(config=tiny_model.config))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - fresh).abs().max() > 1e-3  # and it is not what the new prompt alone gives


# item 7: a non-finite epsilon ----------------------------------------------------------------------------------
@pytest.mark.parametrize("epsilon", [float("inf"), float("-inf"), float("nan"), -1e-3])
def test_expected_attention_refuses_a_non_finite_epsilon(tiny_model, epsilon):
    """Before the fix epsilon=inf was accepted; every score became inf and the cache kept the oldest tokens."""
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        ExpectedAttentionCache(tiny_model, budget=16, epsilon=epsilon)


# item 8: a cache passed to another model -----------------------------------------------------------------------
def test_a_cache_used_by_another_model_says_so(tiny_model):
    """Before the fix an AnchorCache of model A used by model B's generate raised "pass input_ids, not
    inputs_embeds" although input_ids were passed (its id hook sits on model A)."""
    other = tiny_llama(seed=1)
    FullCache(other)  # `other` runs the kvcompress core too, so only the cache's owner differs
    for cache in (AnchorCache(tiny_model, anchor_ids=[5]), FullCache(tiny_model)):
        with pytest.raises(ValueError, match="belongs to another model.*cache.attach"):
            other.generate(PROMPT, past_key_values=cache, max_new_tokens=2, **GREEDY)
        assert cache.get_seq_length() == 0
        cache.attach(other)  # moved: now it serves `other`
        other.generate(PROMPT, past_key_values=cache, max_new_tokens=2, **GREEDY)
        assert cache.get_seq_length() == 7


def test_the_owner_check_follows_clones_and_direct_base_model_calls(tiny_model):
    cache = AnchorCache(tiny_model, anchor_ids=[5])
    with torch.no_grad():
        tiny_model.model(input_ids=PROMPT, past_key_values=cache)  # the base model: still the owner
        twin = cache.clone()
        tiny_model(PROMPT[:, :2], past_key_values=twin)
    assert (cache.get_seq_length(), twin.get_seq_length()) == (6, 8)


# item 9: positions= for every strategy -------------------------------------------------------------------------
# The least each registered strategy needs to be built (beside positions=); must cover the registry.
MINIMAL = {
    "label_words": {"keep_positions": [0, 2], "prefix_length": 4},
    "hidden_random": {"n_keep": 2, "prefix_length": 4},
    "anchor": {"anchor_ids": [5]},
    "kvzip": {"tokenizer": CharTokenizer()},
}
SUPPORTS_CACHE_POSITIONS = {"full", "sink_window", "anchor", "label_words", "hidden_random", "tova"}


def _build(name, model, positions):
    return registry.build(name, model, positions=positions, **MINIMAL.get(name, {}))


@pytest.mark.parametrize("name", registry.available())
def test_every_strategy_takes_positions_original(tiny_model, name):
    cache = _build(name, tiny_model, "original")
    assert cache.position_mode == "original"
    tiny_model.generate(PROMPT, past_key_values=cache, max_new_tokens=2, **GREEDY)


@pytest.mark.parametrize("name", registry.available())
def test_positions_cache_is_supported_or_refused_naming_the_strategy(tiny_model, name):
    """Before the fix TOVA refused positions= altogether and h2o, snapkv, pyramidkv refused even "original", all
    with "unexpected keyword argument". Now: "cache" works where the strategy keeps one token set for every kv head;
    elsewhere a ValueError names the strategy and the strategies that support it."""
    if name in SUPPORTS_CACHE_POSITIONS:
        cache = _build(name, tiny_model, "cache")
        assert cache.position_mode == "cache"
        tiny_model.generate(PROMPT, past_key_values=cache, max_new_tokens=2, **GREEDY)
        return
    supported = ", ".join(sorted(SUPPORTS_CACHE_POSITIONS))
    with pytest.raises(ValueError, match=rf"^{name} does not support positions='cache'.*positions='original'.*"
                                         rf"Strategies that support positions='cache': {supported}"):
        _build(name, tiny_model, "cache")


@pytest.mark.parametrize("name", registry.available())
def test_an_unknown_position_mode_is_refused_by_every_strategy(tiny_model, name):
    with pytest.raises(ValueError, match=r"positions must be one of \('original', 'cache'\), got 'rank'"):
        _build(name, tiny_model, "rank")


def test_the_positions_tables_cover_the_registry():
    assert set(MINIMAL) <= set(registry.available())
    assert SUPPORTS_CACHE_POSITIONS <= set(registry.available())
    assert {n for n in registry.available() if registry.get(n).supports_cache_positions} == SUPPORTS_CACHE_POSITIONS


# found by the architecture sweep (item 10): a forward that fails midway ------------------------------------------
def test_a_forward_that_failed_midway_blocks_its_own_cache_not_the_next_one(tiny_model, monkeypatch):
    """Before the fix, a forward that raised between layer 0's cache update and the core (Dory's own code did, in the
    sweep) left that layer pending in the core, and the next forward of ANY cache (a fresh one, on any model)
    raised "layer 0 of a kvcompress cache was updated but not followed by the kvcompress attention core". Now only
    the failed cache refuses (reset() clears it)."""
    from kvcompress import attention

    broken = FullCache(tiny_model)
    real = attention._take_layer

    def fail(*args):
        raise RuntimeError("planted failure after the cache update, before the core takes the layer")

    monkeypatch.setattr(attention, "_take_layer", fail)
    with pytest.raises(RuntimeError, match="planted failure"):
        tiny_model(PROMPT, past_key_values=broken)
    monkeypatch.setattr(attention, "_take_layer", real)
    fresh = FullCache(tiny_model)
    tiny_model.generate(PROMPT, past_key_values=fresh, max_new_tokens=2, **GREEDY)  # unaffected
    assert fresh.get_seq_length() == 7
    with pytest.raises(RuntimeError, match=r"call cache\.reset\(\)"):
        tiny_model(PROMPT, past_key_values=broken)
    broken.reset()
    tiny_model(PROMPT, past_key_values=broken)


def test_the_masked_reference_of_a_float64_model_is_finite_with_padding():
    """kvcompress.testing hid keys with the dtype's minimum; transformers' eager attention takes its softmax in
    float32, where float64's minimum is -inf, so a padded row (a query seeing no key) turned NaN and spread through
    0 * NaN into every row of the batch (found while trying the architecture sweep in float64)."""
    from kvcompress.testing import left_padded, max_step_error

    model = tiny_llama().double()
    ids, mask = left_padded([[5, 9, 17, 33, 41, 8], [7, 3]])
    error, _, _ = max_step_error(model, SinkWindowCache(model, n_sink=1, window=2), ids, mask, max_new_tokens=3)
    assert error < 1e-6  # not NaN
