"""Beam search (num_beams > 1), issue 12 item 9: a beam is a batch row, and `reorder_cache` moves everything a row
owns (keys, values, positions, token ids, strategy state), so every beam is evicted exactly as a batch-1 cache fed
that beam's tokens would be.

References: FullCache against transformers' DynamicCache (same sequences, scores within 1e-5); an evicting cache
against an explicit-mask reference per beam: each returned beam is re-fed alone (batch 1, prompt in one forward,
then one token per step, as generate feeds it) through a fresh cache of the same strategy while recording what
every query saw, and its log-probabilities are recomputed by ONE cache-free eager forward under exactly that mask.
With length_penalty=0 a beam's score is the plain sum of its tokens' log-probabilities (min_new_tokens only sets
the EOS score to -inf after the log-softmax, so the other tokens' log-probabilities are unchanged).
"""

import pytest
import torch
from transformers import DynamicCache

from kvcompress import AnchorCache, FullCache, SinkWindowCache
from kvcompress.attention import capture
from kvcompress.testing import masked_reference_logits, visibility_from_records

BEAMS, NEW = 3, 6
PROMPTS = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33], [40, 7, 44, 11, 48, 15, 52, 19]])
ANCHORS = list(range(3, 128, 3))  # a third of the tiny vocabulary: anchors occur in most beams


def _beam_search(model, cache, prompts=PROMPTS):
    out = model.generate(prompts, past_key_values=cache, num_beams=BEAMS, num_return_sequences=BEAMS,
                         max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, length_penalty=0.0,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, out.sequences_scores


def _reference_score(model, make_cache, sequence, prompt_length):
    """Sum of the log-probabilities of `sequence`'s generated tokens under an explicit mask of what a fresh batch-1
    cache (fed like generate feeds it) let every query see; eager attention, no cache."""
    cache, fed = make_cache(model), sequence[None, :-1]
    with capture() as records, torch.no_grad():
        model(fed[:, :prompt_length], past_key_values=cache)
        for t in range(prompt_length, fed.shape[1]):
            model(fed[:, t : t + 1], past_key_values=cache)
    visible = visibility_from_records(records, 1, fed.shape[1])
    assert bool((visible == visible[:1]).all())  # these strategies keep the same tokens in every layer
    logits = masked_reference_logits(model, fed, torch.ones_like(fed), visible[0])
    logprobs = logits[0, prompt_length - 1 :].double().log_softmax(-1)
    targets = sequence[prompt_length:]
    return float(logprobs.gather(-1, targets[:, None]).sum()), int(visible[0, 0, -1].sum())


def test_full_cache_beam_search_equals_dynamic_cache(tiny_model):
    """Same sequences; same sequence scores within 1e-5 (fp32 sums of 6 log-probabilities; both through the
    kvcompress core, which gives SDPA's results for any cache)."""
    sequences, scores = _beam_search(tiny_model, FullCache(tiny_model))
    dynamic_sequences, dynamic_scores = _beam_search(tiny_model, DynamicCache(config=tiny_model.config))
    assert torch.equal(sequences, dynamic_sequences)
    torch.testing.assert_close(scores, dynamic_scores, atol=1e-5, rtol=0)


class _ReorderForgetsTokenIds(AnchorCache):
    """Planted bug: beams move but their token ids stay behind (eviction then uses another beam's ids)."""

    def _reindex_rows(self, index):
        self._memo = None


class _ReorderForgetsRows(SinkWindowCache):
    """Planted bug: reorder_cache does nothing (every beam keeps attending to its old row's keys)."""

    def reorder_cache(self, beam_idx):
        pass


STRATEGIES = {
    "sink_window": lambda m: SinkWindowCache(m, n_sink=2, window=3),
    "anchor": lambda m: AnchorCache(m, anchor_ids=ANCHORS),
    "anchor_keep_first": lambda m: AnchorCache(m, anchor_ids=ANCHORS, keep_first=2),
}
PLANTED = {
    "forgets_token_ids": lambda m: _ReorderForgetsTokenIds(m, anchor_ids=ANCHORS),
    "forgets_rows": lambda m: _ReorderForgetsRows(m, n_sink=2, window=3),
}


def _max_beam_error(model, make_cache):
    cache = make_cache(model)
    sequences, scores = _beam_search(model, cache)
    errors, kept = [], []
    for sequence, score in zip(sequences, scores):
        reference, visible_keys = _reference_score(model, make_cache, sequence, PROMPTS.shape[1])
        errors.append(abs(float(score) - reference))
        kept.append(visible_keys)
    # not vacuous: the last query of some beam saw fewer keys than the sequence had tokens (eviction happened)
    assert min(kept) < sequences.shape[1] - 1
    return max(errors)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_evicting_cache_beam_scores_equal_the_per_beam_explicit_mask_reference(tiny_model, name):
    """Tolerance 1e-4: a beam's fp32 score (batch of 6 rows, SDPA) vs an fp32 eager forward, summed in fp64."""
    assert _max_beam_error(tiny_model, STRATEGIES[name]) < 1e-4


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_reorder_bugs_are_caught_by_the_per_beam_reference(tiny_model, name):
    assert _max_beam_error(tiny_model, PLANTED[name]) > 1e-3

