"""The paged key/value layout (`kvcompress.storage.PagedKV`): every strategy gives the same logits and kept sets as on
the dense layout (hypothesis: padded batches, chunked prefills, per-kv-head eviction, slot reuse, beam search,
clone, pickling), and the memory a layer holds follows the pairs its kv heads keep, however different their
counts (with a planted twin that pads every head to the longest)."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcompress import (
    AnchorCache,
    CompressedCache,
    FullCache,
    H2OCache,
    KVzipCache,
    SinkWindowCache,
    SnapKVCache,
)
from kvcompress.cache import cache_arg
from kvcompress.storage import DenseKV, PagedKV, copy_in_layout
from kvcompress.testing import CharTokenizer, left_padded, tiny_llama

MODEL = tiny_llama(seed=11)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def paged(cls, page=3):
    """`cls` on the paged layout with `page` slots per page."""
    return type(f"Paged{cls.__name__}", (cls,), {"layout": "paged", "page_size": page})


class RandomPerHead(CompressedCache):
    """Test strategy: after every forward each row and kv head keeps a random subset of its tokens (by stream
    position, seeded by layer and tokens seen, so the choice never depends on where slots sit), of a size that
    differs between heads (lanes hold different counts; free slots get reused)."""

    def __init__(self, model, keep=(3, 6), seed=0):
        super().__init__(model)
        self.keep, self.seed = keep, seed

    def select(self, layer):
        valid = layer.valid.expand(-1, layer.keys.shape[1], -1)
        generator = torch.Generator().manual_seed(self.seed * 10_000 + layer.seen * 10 + layer.layer_idx)
        table = torch.rand(*valid.shape[:2], layer.seen, generator=generator)
        noise = table.gather(-1, layer.positions.expand_as(valid).clamp(min=0))
        counts = torch.tensor(self.keep).repeat(valid.shape[1])[: valid.shape[1]].view(1, -1, 1)
        ranked = noise.masked_fill(~valid, -1).argsort(dim=-1, descending=True).argsort(dim=-1)
        return valid & (ranked < counts)


MAKERS = {
    "full": lambda cls: cls(MODEL),
    "sink_window": lambda cls: cls(MODEL, n_sink=1, window=4),
    "sink_window_cache_positions": lambda cls: cls(MODEL, n_sink=1, window=4, positions="cache"),
    "h2o": lambda cls: cls(MODEL, heavy=3, recent=2),
    "snapkv": lambda cls: cls(MODEL, budget=5, window=2, kernel=3),
    "anchor": lambda cls: cls(MODEL, anchor_ids=[5, 9, 40, 41]),
    "random_per_head": lambda cls: cls(MODEL),
    "kvzip_global": lambda cls: cls(MODEL, CharTokenizer(), budget=4, chunk=5, allocation="global"),
}
CLASSES = {"full": FullCache, "sink_window": SinkWindowCache, "sink_window_cache_positions": SinkWindowCache,
           "h2o": H2OCache, "snapkv": SnapKVCache, "anchor": AnchorCache, "random_per_head": RandomPerHead,
           "kvzip_global": KVzipCache}


def dense(cls):
    return type(f"Dense{cls.__name__}", (cls,), {"layout": "dense"})


def run(cache, rows, continuation, chunk):
    """Prefill left-padded `rows` (whole or in chunks), then decode `continuation` one token at a time; returns the
    last logits of every forward and the kept positions of every layer, row and kv head after every forward."""
    ids, mask = left_padded(rows)
    logits, kept = [], []
    step = chunk or ids.shape[1]

    def snapshot():
        heads = MODEL.config.num_key_value_heads
        return [[cache.kept_positions(layer, h) for h in range(heads)] for layer in range(len(cache.layers))]

    with torch.no_grad():
        for start in range(0, ids.shape[1], step):
            out = MODEL(ids[:, start : start + step], attention_mask=mask[:, : start + step], **cache_arg(cache))
            kept.append(snapshot())
        logits.append(out.logits[:, -1])
        for t in range(continuation.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits.append(MODEL(continuation[:, t : t + 1], attention_mask=mask, **cache_arg(cache)).logits[:, -1])
            kept.append(snapshot())
    return torch.stack(logits, 1), kept


@st.composite
def examples(draw):
    lengths = draw(st.lists(st.integers(1, 13), min_size=1, max_size=3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    rows = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
    continuation = torch.randint(3, 128, (len(rows), draw(st.integers(1, 8))), generator=g)
    return rows, continuation, draw(st.sampled_from([None, 3, 5])), draw(st.sampled_from([1, 2, 4]))


def check_same_as_dense(name, rows, continuation, chunk, page):
    cls = CLASSES[name]
    got_logits, got_kept = run(MAKERS[name](paged(cls, page)), rows, continuation, chunk)
    want_logits, want_kept = run(MAKERS[name](dense(cls)), rows, continuation, chunk)
    assert got_kept == want_kept
    torch.testing.assert_close(got_logits, want_logits, atol=1e-6, rtol=0)


@SETTINGS
@given(st.sampled_from(sorted(MAKERS)), examples())
def test_paged_layout_equals_dense_layout(name, example):
    check_same_as_dense(name, *example)


_REAL_READ = PagedKV.read


def _read_through_head_zero(self, used):
    """Planted: the kernel's gather reads every kv head's slots through head 0's page table."""
    table = self.table
    self.table = table[:, :1].expand_as(table)
    try:
        return _REAL_READ(self, used)
    finally:
        self.table = table


def test_equality_check_catches_a_wrong_page_mapping(monkeypatch):
    example = ([[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]], torch.tensor([[30, 31, 32], [40, 41, 42]]), None, 3)
    check_same_as_dense("random_per_head", *example)
    monkeypatch.setattr(PagedKV, "read", _read_through_head_zero)
    with pytest.raises(AssertionError):
        check_same_as_dense("random_per_head", *example)


# --- memory follows the kept pairs ------------------------------------------------------------------------------
def held_and_needed(cache):
    """(bytes the layers' stores hold, bytes of their kept pairs, slots of padding one page per lane may add)."""
    held = cache.kv_bytes()
    needed = cache.kv_bytes_used()
    lanes = sum(layer.store.heads * layer.positions.shape[0] for layer in cache.layers)
    pair = cache.layers[0].store.pair_bytes()
    return held, needed, lanes * cache.page_size * pair


def check_memory_follows_kept_pairs(cache_cls, steps=40):
    """KVzip global on a 64-token context: heads keep very different counts; after the prefill and while decoding,
    the bytes held stay within 1.15x of the kept pairs' bytes plus at most one page per lane (and the page table)."""
    ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    cache = cache_cls(MODEL, CharTokenizer(), budget=8, chunk=32, allocation="global")
    with torch.no_grad():
        out = MODEL(ids, **cache_arg(cache))
        counts = [int(layer.valid.sum(-1).max()) for layer in cache.layers]
        lows = [int(layer.valid.sum(-1).min()) for layer in cache.layers]
        assert max(counts) > 2 * min(lows)  # the heads really keep different counts
        for step in range(steps):
            held, needed, slack = held_and_needed(cache)
            assert held <= 1.15 * needed + slack, (step, held, needed, slack)
            token = out.logits[:, -1:].argmax(-1)
            out = MODEL(token, **cache_arg(cache))


def test_head_adaptive_memory_is_real():
    check_memory_follows_kept_pairs(paged(KVzipCache, 2))


def test_memory_check_catches_padding_every_head_to_the_longest():
    """Planted: global allocation on the dense layout (every kv head padded to the longest)."""
    with pytest.raises(AssertionError):
        check_memory_follows_kept_pairs(type("DenseKVzip", (KVzipCache,), {"page_size": 2, "layout": "dense"}))


# --- batch operations, clone, pickling ---------------------------------------------------------------------------
def test_beam_search_on_paged_layout_equals_dense():
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    a = MODEL.generate(ids, **cache_arg(paged(H2OCache, 2)(MODEL, heavy=3, recent=2)), **kwargs)
    b = MODEL.generate(ids, **cache_arg(dense(H2OCache)(MODEL, heavy=3, recent=2)), **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.sequences_scores, b.sequences_scores, atol=1e-6, rtol=0)


def test_repeated_rows_get_their_own_pages():
    """batch_repeat_interleave (beam search's expansion) duplicates rows: lanes must not share pages afterwards."""
    cache = paged(FullCache, 2)(MODEL)
    with torch.no_grad():
        MODEL(torch.arange(3, 10).unsqueeze(0), **cache_arg(cache))
    cache.batch_repeat_interleave(2)
    for layer in cache.layers:
        table = layer.store.table
        owned = table[table >= 0]
        assert owned.unique().numel() == owned.numel()
        keys, _ = layer.store.read(layer.used)
        assert torch.equal(keys[0], keys[1])


def test_clone_and_pickle_of_a_paged_cache_continue_identically():
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    cache = KVzipCache(MODEL, CharTokenizer(), budget=4, allocation="global")
    with torch.no_grad():
        MODEL(ids, **cache_arg(cache))
    assert isinstance(cache.layers[0].store, PagedKV)
    twins = [cache.clone(), pickle.loads(pickle.dumps(cache)).attach(MODEL)]
    token = torch.tensor([[7], [8]])
    with torch.no_grad():
        expected = MODEL(token, **cache_arg(cache)).logits
        for twin in twins:
            torch.testing.assert_close(MODEL(token, **cache_arg(twin)).logits, expected, atol=0, rtol=0)


def test_dense_is_the_default_layout():
    cache = FullCache(MODEL)
    with torch.no_grad():
        MODEL(torch.arange(3, 8).unsqueeze(0), **cache_arg(cache))
    assert isinstance(cache.layers[0].store, DenseKV) and cache.layers[0].keys is cache.layers[0].store.keys


@pytest.mark.parametrize("to", ["dense", "paged"])
def test_a_copy_in_another_layout_holds_the_same_pairs(to):
    """`copy_in_layout` (a layer handed to a cache of another layout by `prefill_shared`): the same keys and values
    at every slot in use, pages only for those slots, and an independent copy."""
    generator = torch.Generator().manual_seed(4)
    keys, values = torch.randn(2, 3, 21, 8, generator=generator), torch.randn(2, 3, 21, 6, generator=generator)
    source = DenseKV.empty(keys, values) if to == "paged" else PagedKV.empty(keys, values, page=4)
    source.grow(30)
    source.write_range(0, keys, values)
    copy = copy_in_layout(source, to, 4, source.capacity, 21)
    assert isinstance(copy, DenseKV if to == "dense" else PagedKV) and copy.capacity >= source.capacity
    for got, want in zip(copy.read(21), (keys, values)):
        assert torch.equal(got, want)
    if to == "paged":
        assert copy.pages_in_use() == 2 * 3 * 6  # ceil(21 / 4) pages per lane, none for the slots past 21
    copy.write_range(0, keys[:, :, :1] + 1, values[:, :, :1])
    assert torch.equal(source.read(21)[0], keys)  # the source is untouched
    assert type(copy_in_layout(source, "paged" if to == "dense" else "dense", 4, 30, 21)) is type(source)
