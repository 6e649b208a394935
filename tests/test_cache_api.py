"""CompressedCache plumbing: token ids from the model, clone, batch expansion, hook lifetime."""

import copy
import gc

import pytest
import torch

from kvcompress import CompressedCache, FullCache, H2OCache, SinkWindowCache, registry
from kvcompress.cache import cache_arg
from kvcompress.testing import CharTokenizer, left_padded, max_step_error, tiny_llama

from kept_sets import kept_sets


class _KeepEvenIds(CompressedCache):
    """Test strategy choosing tokens by id: keeps tokens with an even id (and the newest token)."""

    needs_token_ids = True

    def __init__(self, model):
        super().__init__(model)

    def select(self, layer):
        ids = self.ids_at(layer.positions)
        newest = layer.positions == layer.seen - 1
        return layer.valid & ((ids % 2 == 0) | newest)


def test_token_ids_reach_the_cache_and_drive_eviction(tiny_model):
    ids, mask = left_padded([[4, 5, 6, 7, 8, 9], [11, 12, 13]])
    cache = _KeepEvenIds(tiny_model)
    error, visible, sequences = max_step_error(tiny_model, cache, ids, mask, max_new_tokens=6)
    assert error < 1e-5
    assert torch.equal(cache.token_ids, sequences[:, :-1])
    for b in range(2):
        kept = cache.kept_positions(0)[b]
        kept_ids = sequences[b, kept]
        assert all(i % 2 == 0 for i in kept_ids[:-1].tolist())
        assert kept[-1] == sequences.shape[1] - 2


def test_clone_gives_an_independent_cache(tiny_model):
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    prefix = SinkWindowCache(tiny_model, n_sink=2, window=4)
    with torch.no_grad():
        tiny_model(ids, past_key_values=prefix)
    kept_before = prefix.kept_positions(1)
    clone = copy.deepcopy(prefix)
    follow = torch.tensor([[20, 21], [30, 31]])
    mask = torch.ones(2, 11, dtype=torch.long)
    with torch.no_grad():
        from_clone = tiny_model(follow, attention_mask=mask, past_key_values=clone).logits
        from_fresh_copy = tiny_model(follow, attention_mask=mask, past_key_values=prefix.clone()).logits
    torch.testing.assert_close(from_clone, from_fresh_copy)
    assert prefix.kept_positions(1) == kept_before and prefix.get_seq_length() == 9
    assert clone.get_seq_length() == 11


def test_clone_of_an_id_recording_cache_records_its_own_ids(tiny_model):
    cache = _KeepEvenIds(tiny_model)
    with torch.no_grad():
        tiny_model(torch.tensor([[4, 5, 6]]), past_key_values=cache)
        twin = cache.clone()
        tiny_model(torch.tensor([[8]]), attention_mask=torch.ones(1, 4, dtype=torch.long), past_key_values=twin)
    assert twin.token_ids.tolist() == [[4, 5, 6, 8]]
    assert cache.token_ids.tolist() == [[4, 5, 6]]


def test_num_return_sequences_expands_the_batch(tiny_model):
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    cache = _KeepEvenIds(tiny_model)
    out = tiny_model.generate(ids, past_key_values=cache, do_sample=True, num_return_sequences=3,
                              max_new_tokens=4, pad_token_id=0)
    assert out.shape == (6, 9)
    assert cache.kept_counts().shape == (3, 6)


def test_id_hook_is_removed_when_the_cache_is_collected(tiny_model):
    cache = _KeepEvenIds(tiny_model)
    embeddings = tiny_model.get_input_embeddings()
    assert len(embeddings._forward_pre_hooks) == 1
    del cache
    gc.collect()
    assert len(embeddings._forward_pre_hooks) == 0


def test_kept_counts_and_bytes_shrink_with_eviction(tiny_model):
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    full, window = FullCache(tiny_model), SinkWindowCache(tiny_model, n_sink=4, window=6)
    with torch.no_grad():
        tiny_model(ids, past_key_values=full)
        tiny_model(ids, past_key_values=window)
    assert full.kept_counts().unique().tolist() == [40]
    assert window.kept_counts().unique().tolist() == [10]
    assert window.kv_bytes_used() * 4 == full.kv_bytes_used() == full.kv_bytes()
    # the 40-token prefill allocated 40 slots; after eviction the window's buffer is compacted (memory given back)
    assert window.layers[0].capacity < 20 and window.kv_bytes() < full.kv_bytes() / 2


def test_the_original_still_works_after_its_clone_is_gone(tiny_model):
    """Regression (pickling support): cloning must not re-point the original's layers at the clone."""
    cache = SinkWindowCache(tiny_model, n_sink=1, window=4)
    with torch.no_grad():
        tiny_model(torch.tensor([[4, 5, 6, 7, 8, 9]]), past_key_values=cache)
        clone = cache.clone()
        del clone
        gc.collect()
        tiny_model(torch.tensor([[10]]), past_key_values=cache)
    assert cache.get_seq_length() == 7 and cache.kept_positions(0) == [[0, 3, 4, 5, 6]]


# --- issue 20, item 4: a clone owns its per-slot strategy state ----------------------------------------------------
# initializer_range 0.2: peaked, content-dependent attention. With the default init attention is near uniform, so
# H2O's accumulated scores fall with a token's age and it keeps the oldest tokens whatever its state holds.
PEAKED = tiny_llama(seed=0, initializer_range=0.2)
PROMPT = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(7))
ORIGINAL_GOES_ON = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(8))
CLONE_GOES_ON = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(9))


def _feed(model, cache, tokens):
    """Feed `tokens` (1, T) one at a time; returns the logits of every step (T, V) and the kept sets after each."""
    logits, kept = [], []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits.append(model(tokens[:, t : t + 1], **cache_arg(cache)).logits[0, -1])
            kept.append(kept_sets(cache))
    return torch.stack(logits), kept


def _owned_tensors(cache):
    """Every tensor a cache's layers hold (keys, values, slot table, per-slot state), by name, copied."""
    return {(i, name): tensor.clone() for i, layer in enumerate(cache.layers)
            for name, tensor in [("keys", layer.keys), ("values", layer.values), ("positions", layer.positions),
                                 *layer.state.items()]}


def check_clone_is_independent_of_the_original(model, make_cache, check_tensors=True):
    """A clone taken after the prefill is left bitwise unchanged while the original goes on with other tokens
    (`check_tensors`), then gives the logits and kept tokens of a fresh cache fed the prompt and the clone's tokens:
    nothing the original does after `clone()` reaches the clone (H2O's accumulated attention is per-slot state
    updated in place)."""
    cache = make_cache(model)
    with torch.no_grad():
        model(PROMPT, **cache_arg(cache))
    twin = cache.clone()
    snapshot = _owned_tensors(twin)
    _feed(model, cache, ORIGINAL_GOES_ON)
    if check_tensors:
        for key, tensor in _owned_tensors(twin).items():
            assert torch.equal(tensor, snapshot[key]), f"the original's decoding changed the clone's {key}"
    got_logits, got_kept = _feed(model, twin, CLONE_GOES_ON)
    fresh = make_cache(model)
    with torch.no_grad():
        model(PROMPT, **cache_arg(fresh))
    expected_logits, expected_kept = _feed(model, fresh, CLONE_GOES_ON)
    assert got_kept == expected_kept, "the clone kept other tokens than a fresh cache fed the same tokens"
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-6, rtol=0)


class _StateSharingClone(H2OCache):
    """Planted bug (issue 20, item 4): clone() copies the per-slot state dict but shares its tensors with the
    original (`twin.state = dict(layer.state)`)."""

    def clone(self):
        new = super().clone()
        for layer, twin in zip(self.layers, new.layers):
            twin.state = dict(layer.state)
        return new


@pytest.mark.parametrize("name", [n for n in registry.available() if registry.get(n).uses_budget])
def test_a_clone_does_not_depend_on_what_the_original_does_afterwards(name):
    tokenizer = CharTokenizer()  # a tokenizer for the strategies that encode text (KVzip's repeat prompt)
    check_clone_is_independent_of_the_original(PEAKED, lambda m: registry.get(name).for_budget(m, tokenizer, 8))


def test_planted_state_sharing_clone_is_caught():
    """Caught twice: by the snapshot (the clone's state changes) and, without it, by the clone's choices."""
    h2o = lambda m: H2OCache(m, heavy=6, recent=2)  # noqa: E731
    planted = lambda m: _StateSharingClone(m, heavy=6, recent=2)  # noqa: E731
    check_clone_is_independent_of_the_original(PEAKED, h2o)
    with pytest.raises(AssertionError, match="changed the clone's"):
        check_clone_is_independent_of_the_original(PEAKED, planted)
    with pytest.raises(AssertionError, match="the clone kept other tokens"):
        check_clone_is_independent_of_the_original(PEAKED, planted, check_tensors=False)
