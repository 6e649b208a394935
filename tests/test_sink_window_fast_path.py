"""SinkWindowCache's decode fast path (`evict` without ranking) frees exactly what `select` would.

The reference is the same cache evicting through `select` after every forward. Both are fed the same left-padded
prompts (optionally in chunks) and the same continuation; after every forward the kept positions of every layer,
row and the logits must be equal. Two planted fast-path bugs must fail the same check.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kept_sets import teacher_forced

from kvcompress import SinkWindowCache
from kvcompress.cache import CompressedCache
from kvcompress.testing import left_padded, tiny_llama

MODEL = tiny_llama(seed=7)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class SelectEachForward(SinkWindowCache):
    evict = CompressedCache.evict


class _FastPathForgetsSinks(SinkWindowCache):
    """Planted: the decode step frees the oldest kept token, sinks included."""

    def _evict_oldest_non_sink(self, layer):
        positions = layer.positions
        protected = positions < 0
        over = (~protected).sum(dim=-1, keepdim=True) > self.window + self.n_sink
        oldest = positions.masked_fill(protected, torch.iinfo(torch.long).max).argmin(dim=-1, keepdim=True)
        layer.free_slots(oldest, over)


class _FastPathIgnoresCount(SinkWindowCache):
    """Planted: the decode step always frees a token, even in a row still under its budget (short padded rows)."""

    def _evict_oldest_non_sink(self, layer):
        positions = layer.positions
        protected = (positions < 0) | layer.slot_state("sink", dtype=torch.bool)[..., : layer.used]
        oldest = positions.masked_fill(protected, torch.iinfo(torch.long).max).argmin(dim=-1, keepdim=True)
        layer.free_slots(oldest, torch.ones_like(oldest, dtype=torch.bool))


def _run(cache_cls, rows, continuation, n_sink, window, chunk, positions):
    """Feed the prompt (in chunks of `chunk` tokens, or whole) then the continuation one token at a time.
    Returns the logits (B, T + 1, V) and the kept sets of every layer, row and kv head after every forward."""
    ids, mask = left_padded(rows)
    cache = cache_cls(MODEL, n_sink=n_sink, window=window, positions=positions)
    return teacher_forced(MODEL, cache, ids, mask, continuation, chunk=chunk)


@st.composite
def examples(draw):
    lengths = draw(st.lists(st.integers(1, 14), min_size=1, max_size=3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    rows = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
    continuation = torch.randint(3, 128, (len(rows), draw(st.integers(1, 10))), generator=g)
    return (rows, continuation, draw(st.integers(0, 4)), draw(st.integers(1, 8)),
            draw(st.sampled_from([None, 2, 5])), draw(st.sampled_from(["original", "cache"])))


def check_fast_path_equals_select(cache_cls, rows, continuation, n_sink, window, chunk, positions):
    expected_logits, expected_kept = _run(SelectEachForward, rows, continuation, n_sink, window, chunk, positions)
    logits, kept = _run(cache_cls, rows, continuation, n_sink, window, chunk, positions)
    assert kept == expected_kept
    torch.testing.assert_close(logits, expected_logits, atol=1e-6, rtol=0)


@SETTINGS
@given(examples())
def test_decode_fast_path_frees_exactly_what_select_frees(example):
    check_fast_path_equals_select(SinkWindowCache, *example)


def test_fast_path_runs_on_decode_steps():
    """The check above compares something: after the prompt, decode steps take the fast path (no ranking)."""
    calls = []

    class Counting(SinkWindowCache):
        def _evict_oldest_non_sink(self, layer):
            calls.append(layer.layer_idx)
            super()._evict_oldest_non_sink(layer)

    _run(Counting, [[5, 6, 7, 8, 9, 10, 11, 12]], torch.tensor([[20, 21, 22]]), 2, 3, None, "original")
    assert len(calls) == 3 * MODEL.config.num_hidden_layers


@pytest.mark.parametrize("planted", [_FastPathForgetsSinks, _FastPathIgnoresCount])
def test_planted_fast_path_bugs_are_caught(planted):
    example = ([[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23]], torch.tensor([[30, 31, 32, 33], [40, 41, 42, 43]]),
               2, 4, None, "original")
    check_fast_path_equals_select(SinkWindowCache, *example)
    with pytest.raises(AssertionError):
        check_fast_path_equals_select(planted, *example)
