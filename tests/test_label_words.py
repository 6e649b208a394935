"""LabelWordCache / RandomKeepCache / the label-word matcher: exactness against an explicit-mask forward, hypothesis
properties (each checker also run on a planted bug), copying a compressed prefix, bad input."""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, trainers
from transformers import PreTrainedTokenizerFast

from kvcompress import registry
from kvcompress.attention import capture
from kvcompress.icl_prompts import IclTemplate, match_anchor_tokens, overlapping_tokens
from kvcompress.strategies.label_words import CompressedPrefix, LabelWordCache
from kvcompress.strategies.random_keep import RandomKeepCache
from kvcompress.testing import masked_reference_logits, tiny_llama, visibility_from_records

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEMPLATE = IclTemplate("Review:", "\nSentiment:", ("negative", "positive"))
WORDS = "good bad movie plot fun dull great awful film acting a the".split()


def _bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-free BPE trained offline WITHOUT a pre-tokenizer, so merges cross word, space and newline
    boundaries (e.g. one token 'Review: good' or 'e\\nSentiment: po'): the hard case for the matcher."""
    rng = random.Random(0)
    corpus = [
        TEMPLATE.demonstrations([(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))), rng.randint(0, 1))])[0]
        for _ in range(300)
    ]
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    alphabet = [chr(c) for c in range(32, 127)] + ["\n"]
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["[UNK]"], initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


TOKENIZER = _bpe_tokenizer()
MODEL = tiny_llama(seed=5, vocab_size=len(TOKENIZER))  # read-only across examples


def _visibility_after_prefix(model, cache, prefix, query):
    """Prefill `prefix` (B, P) into `cache`, then feed `query` (B, q) under capture.

    Returns (query logits (B, q, V), visibility (L, B, P+q, P+q) with the prefix rows causal-full)."""
    with torch.no_grad():
        model(prefix, past_key_values=cache)
        with capture() as records:
            logits = model(query, past_key_values=cache).logits
    batch, p, q = prefix.shape[0], prefix.shape[1], query.shape[1]
    visible = visibility_from_records(records, batch, p + q)
    visible[:, :, :p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
    return logits, visible


def _expected_visibility(p, q, kept_rows):
    """(B, P+q, P+q): prefix rows causal; query row i sees kept prefix positions and query positions <= i."""
    visible = torch.ones(len(kept_rows), p + q, p + q, dtype=torch.bool).tril()
    for b, kept in enumerate(kept_rows):
        dropped = torch.ones(p, dtype=torch.bool)
        dropped[list(kept)] = False
        visible[b, p:, :p] &= ~dropped
    return visible


# --- exactness ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_rows", [1, 2])
def test_query_logits_equal_explicit_mask_forward(batch_rows):
    g = torch.Generator().manual_seed(1)
    p, q = 30, 7
    prefix = torch.randint(3, len(TOKENIZER), (batch_rows, p), generator=g)
    query = torch.randint(3, len(TOKENIZER), (batch_rows, q), generator=g)
    kept_rows = [[0, 3, 4, 11, 20, 29], [1, 2, 5, 17]][:batch_rows]
    cache = LabelWordCache(MODEL, kept_rows if batch_rows > 1 else kept_rows[0], prefix_length=p)
    logits, visible = _visibility_after_prefix(MODEL, cache, prefix, query)
    assert torch.equal(visible[0], _expected_visibility(p, q, kept_rows))
    ids = torch.cat([prefix, query], dim=1)
    reference = masked_reference_logits(MODEL, ids, torch.ones_like(ids), visible[0])
    assert (logits - reference[:, p:]).abs().max().item() < 1e-5
    # and the check can fail: the reference over the full (uncompressed) prefix differs
    full = masked_reference_logits(MODEL, ids, torch.ones_like(ids), _expected_visibility(p, q, [range(p)] * batch_rows))
    assert (logits - full[:, p:]).abs().max().item() > 1e-3


def test_generate_from_compressed_prefix_equals_explicit_mask():
    """Greedy decoding through `generate(past_key_values=...)` (CompressedPrefix.generate) stays exact."""
    g = torch.Generator().manual_seed(2)
    p, q, steps = 25, 5, 4
    prefix = torch.randint(3, len(TOKENIZER), (1, p), generator=g)
    query = torch.randint(3, len(TOKENIZER), (1, q), generator=g)
    kept = [0, 2, 9, 10, 24]
    compressed = CompressedPrefix(MODEL, LabelWordCache(MODEL, kept, p), prefix)
    out = compressed.generate(query, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    fed = out.sequences[:, :-1]
    visible = _expected_visibility(p, fed.shape[1] - p, [kept])
    reference = masked_reference_logits(MODEL, fed, torch.ones_like(fed), visible)
    logits = torch.stack(out.logits, dim=1)
    assert (logits - reference[:, p + q - 1 :]).abs().max().item() < 1e-5
    assert compressed.cache.kept_positions(0) == [kept]  # the shared prefix cache was not touched


def test_chunked_prefill_compresses_once():
    """Feeding the prefix in two chunks gives the same query logits as one forward (eviction waits for it)."""
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, len(TOKENIZER), (1, 20), generator=g)
    query = torch.randint(3, len(TOKENIZER), (1, 4), generator=g)
    kept = [0, 5, 6, 19]
    one = LabelWordCache(MODEL, kept, 20)
    two = LabelWordCache(MODEL, kept, 20)
    with torch.no_grad():
        MODEL(prefix, past_key_values=one)
        MODEL(prefix[:, :12], past_key_values=two)
        assert two.kept_positions(0) == [list(range(12))]
        MODEL(prefix[:, 12:], past_key_values=two)
        a = MODEL(query, past_key_values=one).logits
        b = MODEL(query, past_key_values=two).logits
    assert (a - b).abs().max().item() < 1e-5


def test_compressed_prefix_copies_per_query():
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(3, len(TOKENIZER), (1, 16), generator=g)
    queries = [torch.randint(3, len(TOKENIZER), (1, n), generator=g) for n in (3, 6, 3)]
    compressed = CompressedPrefix(MODEL, LabelWordCache(MODEL, [0, 4, 15], 16), prefix)
    answers = [compressed.next_token_logits(q) for q in queries]
    assert compressed.cache.kept_positions(0) == [[0, 4, 15]] and compressed.cache.get_seq_length() == 16
    fresh = CompressedPrefix(MODEL, LabelWordCache(MODEL, [0, 4, 15], 16), prefix)
    for q, a in zip(queries, answers):
        assert torch.allclose(fresh.next_token_logits(q), a, atol=1e-6)
    assert not torch.allclose(answers[0], answers[1])
    assert compressed.kv_tokens == 3


# --- properties ---------------------------------------------------------------------------------------------------
def check_never_sees_dropped(cache_factory, p, q, kept, seed):
    """Every layer: query row i sees exactly the kept prefix positions and query positions <= i; every layer keeps
    exactly the kept prefix positions plus the query."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, len(TOKENIZER), (1, p), generator=g)
    query = torch.randint(3, len(TOKENIZER), (1, q), generator=g)
    cache = cache_factory(p)
    _, visible = _visibility_after_prefix(MODEL, cache, prefix, query)
    expected = _expected_visibility(p, q, [kept])[0]
    for layer in range(visible.shape[0]):
        assert torch.equal(visible[layer, 0, p:], expected[p:]), layer
        assert cache.kept_positions(layer) == [sorted(kept) + list(range(p, p + q))], layer


@st.composite
def keep_sets(draw):
    p = draw(st.integers(1, 40))
    kept = sorted(draw(st.sets(st.integers(0, p - 1), min_size=1, max_size=p)))
    return p, draw(st.integers(1, 6)), kept, draw(st.integers(0, 3)), draw(st.integers(0, 10_000))


@SETTINGS
@given(keep_sets())
def test_property_query_never_sees_a_dropped_position(case):
    p, q, kept, n_first, seed = case
    expected = sorted(set(kept) | set(range(min(n_first, p))))
    check_never_sees_dropped(lambda length: LabelWordCache(MODEL, kept, length, n_first=n_first), p, q, expected, seed)


class _LeakyCache(LabelWordCache):
    """Planted bug: also keeps the prefix position just before the last one."""

    def select(self, layer):
        return super().select(layer) | (layer.positions == self.prefix_length - 2)


def test_property_checker_catches_a_leak():
    with pytest.raises(AssertionError):
        check_never_sees_dropped(lambda length: _LeakyCache(MODEL, [0], length), 10, 3, [0], 0)


@SETTINGS
@given(st.integers(2, 40), st.data())
def test_property_random_keep(p, data):
    exclude = sorted(data.draw(st.sets(st.integers(0, p - 1), max_size=p - 1)))
    available = [x for x in range(1, p) if x not in exclude]
    n_keep = data.draw(st.integers(1, 1 + len(available)))
    seed = data.draw(st.integers(0, 100))
    cache = RandomKeepCache(MODEL, n_keep, p, seed=seed, exclude=exclude)
    chosen = cache.keep_table[0].nonzero().flatten().tolist()
    assert len(chosen) == n_keep and chosen[0] == 0
    assert not set(chosen[1:]) & set(exclude)
    again = RandomKeepCache(MODEL, n_keep, p, seed=seed, exclude=exclude).keep_table
    assert torch.equal(again, cache.keep_table)  # seeded
    check_never_sees_dropped(lambda length: cache, p, 2, chosen, seed)


# --- the matcher --------------------------------------------------------------------------------------------------
label_words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=14)
demo_text = st.lists(st.sampled_from(WORDS + ["zq", "xylo", "Review", "Sentiment:"]), min_size=0, max_size=6).map(" ".join)


@st.composite
def demonstration_sets(draw):
    words = tuple(draw(st.lists(label_words, min_size=2, max_size=4, unique=True)))
    template = IclTemplate("Review:", "\nSentiment:", words)
    demos = draw(st.lists(st.tuples(demo_text, st.integers(0, len(words) - 1)), min_size=1, max_size=4))
    return template, demos


def check_matcher(match, text, spans):
    """Kept tokens are exactly those sharing a character with a span, and they cover every span character."""
    covered = set().union(*(range(s, e) for s, e in spans))
    expected = [i for i, (a, b) in enumerate(match.offsets) if covered & set(range(a, b))]
    assert match.positions == expected
    kept_chars = set().union(*(range(*match.offsets[i]) for i in match.positions))
    assert covered <= kept_chars


@SETTINGS
@given(demonstration_sets())
def test_property_matcher_and_cache_keep_exactly_label_and_format_tokens(case):
    template, demos = case
    text, spans = template.demonstrations(demos)
    assert [text[s:e] for s, e in spans] == [
        piece for _, y in demos for piece in ("Review:", f"\nSentiment: {template.label_words[y]}\n")
    ]
    match = match_anchor_tokens(TOKENIZER, text, spans)
    check_matcher(match, text, spans)
    assert TOKENIZER.decode(match.input_ids) .replace(" ", "") == text.replace(" ", "")
    # the cache keeps exactly the matcher's positions after the prefill
    cache = LabelWordCache(MODEL, match.positions, len(match.input_ids))
    with torch.no_grad():
        MODEL(torch.tensor([match.input_ids]), past_key_values=cache)
    assert all(cache.kept_positions(layer) == [match.positions] for layer in range(len(cache.layers)))
    # find_spans recovers the same spans from the text alone
    assert template.find_spans(text, require_all_labels=False) == spans


def test_matcher_keeps_multi_piece_labels_and_boundary_merges():
    template = IclTemplate("Review:", "\nSentiment:", ("qzxwvk", "positive"))
    text, spans = template.demonstrations([("good film", 1), ("bad", 0)])
    match = match_anchor_tokens(TOKENIZER, text, spans)
    pieces = TOKENIZER.convert_ids_to_tokens(match.input_ids)
    label = text.index("qzxwvk")
    label_tokens = [i for i, (a, b) in enumerate(match.offsets) if a < label + 6 and label < b]
    assert len(label_tokens) > 1 and set(label_tokens) <= set(match.positions)  # several pieces, all kept
    straddling = [i for i, (a, b) in enumerate(match.offsets)
                  if any(a < s < b or a < e < b for s, e in spans)]
    assert straddling, pieces  # this tokenizer merges across the span boundary...
    assert set(straddling) <= set(match.positions)  # ...and such a token is kept
    dropped = [i for i in range(len(pieces)) if i not in match.positions]
    assert dropped and all("Sentiment" not in pieces[i] for i in dropped)


def test_matcher_checker_catches_a_dropped_piece():
    text, spans = TEMPLATE.demonstrations([("good film", 1)])
    match = match_anchor_tokens(TOKENIZER, text, spans)
    broken = type(match)(match.input_ids, match.offsets, match.positions[:-1])
    with pytest.raises(AssertionError):
        check_matcher(broken, text, spans)


def test_overlap_rule_on_offsets():
    offsets = [(0, 3), (3, 7), (7, 7), (7, 12), (12, 13)]
    assert overlapping_tokens(offsets, [(5, 8)]) == [1, 3]  # straddling tokens kept, empty token never
    assert overlapping_tokens(offsets, [(3, 7)]) == [1]  # touching at a boundary is not overlapping
    assert overlapping_tokens(offsets, []) == []


# --- bad input ----------------------------------------------------------------------------------------------------
def test_empty_demonstration_set_errors():
    with pytest.raises(ValueError, match="empty"):
        TEMPLATE.demonstrations([])
    with pytest.raises(ValueError, match="empty"):
        TEMPLATE.find_spans("no demonstrations here")
    with pytest.raises(ValueError, match="empty"):
        match_anchor_tokens(TOKENIZER, "Review: x", [])
    with pytest.raises(ValueError, match="empty"):
        LabelWordCache(MODEL, [], prefix_length=5)


def test_label_word_missing_errors():
    with pytest.raises(ValueError, match="label word missing"):
        TEMPLATE.find_spans("Review: good\nSentiment: great\n")
    with pytest.raises(ValueError, match=r"missing from the prompt: \['negative'\]"):
        TEMPLATE.find_spans("Review: good\nSentiment: positive\n")
    with pytest.raises(ValueError, match="class index"):
        TEMPLATE.demonstrations([("good", 2)])
    with pytest.raises(ValueError, match="distinct"):
        IclTemplate("Review:", "\nSentiment:", ("good", "good"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="prefix_length"):
        LabelWordCache(MODEL, [0], prefix_length=0)
    with pytest.raises(ValueError, match="keep position"):
        LabelWordCache(MODEL, [0, 5], prefix_length=5)
    with pytest.raises(ValueError, match="n_first"):
        LabelWordCache(MODEL, [0], prefix_length=5, n_first=-1)
    with pytest.raises(ValueError, match="outside"):
        match_anchor_tokens(TOKENIZER, "abc", [(1, 9)])
    with pytest.raises(ValueError, match="cannot draw"):
        RandomKeepCache(MODEL, 5, 4)
    with pytest.raises(ValueError, match="not a token budget"):
        registry.get("label_words").for_budget(MODEL, TOKENIZER, 10)
    with pytest.raises(ValueError, match="rows"):
        cache = LabelWordCache(MODEL, [[0], [1], [2]], prefix_length=4)
        MODEL(torch.ones(2, 4, dtype=torch.long), past_key_values=cache)
    tensor_rows = LabelWordCache(MODEL, torch.tensor([[0, 2], [1, 3]]), prefix_length=4).keep_table
    assert tensor_rows.tolist() == [[True, False, True, False], [False, True, False, True]]
    assert registry.get("label_words") is LabelWordCache and registry.get("hidden_random") is RandomKeepCache
