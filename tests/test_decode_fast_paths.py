"""The decode-step fast paths of the attention-aware strategies (`evict` without ranking or sorting: one argmin over
scores kept up to date in per-slot state) free exactly what `select` would, and `lowest` / the lean decode
attention they rely on equal what they replace.

The reference is the same class evicting through `select` after every forward (`CompressedCache.evict`). Both are
fed the same left-padded prompts (optionally in chunks, so decoding starts from compacted or from reused slots) and
the same continuation; after every forward the kept positions of every layer, row and kv head must be equal, and
the logits too, under every storage and allocation option (the paged layout, quantized pages whose freed slots die,
demotion of freed pairs, AdaKV's shared row budget). Each strategy has planted fast-path bugs that the same check
must catch.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kept_sets import teacher_forced

from kvcompress import (
    ExpectedAttentionCache,
    H2OCache,
    KnormCache,
    PyramidKVCache,
    SnapKVCache,
    TOVACache,
    attention,
)
from kvcompress.cache import CompressedCache
from kvcompress.strategies.expected_attention import logits_of
from kvcompress.selection import STREAM_RANK, decode_stream_rank, free_one, lowest, record_stream_rank, top_k
from kvcompress.testing import left_padded, tiny_llama

# initializer_range 0.2: peaked attention, so the choices differ between tokens (4 query / 2 kv heads, 3 layers)
MODEL = tiny_llama(seed=1, initializer_range=0.2)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _options(cls, draw) -> dict:
    """Constructor options for `cls`, small enough that short prompts go over budget."""
    if cls is H2OCache:
        return {"heavy": draw(st.integers(0, 4)), "recent": draw(st.integers(1, 4))}
    if cls is TOVACache:  # the one strategy here that keeps one token set for all kv heads: positions="cache" too
        return {"budget": draw(st.integers(1, 8)), "positions": draw(st.sampled_from(["original", "cache"]))}
    if cls in (SnapKVCache, PyramidKVCache):
        window = draw(st.integers(1, 3))
        options = {"budget": window + draw(st.integers(0, 5)), "window": window,
                   "kernel": draw(st.sampled_from([1, 3, 5])), "pooling": draw(st.sampled_from(["avg", "max"]))}
        if cls is PyramidKVCache:
            options["beta"] = draw(st.sampled_from([1, 2, 20]))
        return options
    if cls is KnormCache:
        n_sink, window = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        return {"budget": n_sink + window + draw(st.integers(1, 5)), "n_sink": n_sink, "window": window}
    n_sink = draw(st.integers(0, 3))
    return {"budget": n_sink + draw(st.integers(1, 5)), "n_sink": n_sink,
            "n_future_positions": draw(st.sampled_from([1, 16, 512])), "use_covariance": draw(st.booleans()),
            "use_vnorm": draw(st.booleans())}


ADAKV = (SnapKVCache, PyramidKVCache, ExpectedAttentionCache)  # the strategies with allocation="adakv"


def _storage(cls, draw, demote: bool) -> dict:
    """Storage and allocation options, small enough to act within a few tokens: the paged layout (pages of 2 slots);
    quantized pages (kv_bits=4, group 2 = 2-slot pages, 0-2 residual tokens: pages quantize within the small
    budgets here and freed slots in them die, -2, never refilled); demotion (evicted=2: a freed pair moves to a
    low-precision store and is still attended; not with positions="cache"); AdaKV (a row's budget shared by its kv
    heads, re-split every select)."""
    options = {}
    if cls in ADAKV and draw(st.booleans()):
        options.update(allocation="adakv", alpha=draw(st.sampled_from([0.0, 0.5, 1.0])))
    layout = draw(st.sampled_from(["dense", "paged", "quantized"]))
    if layout == "paged":
        options["layout"] = "paged"
    elif layout == "quantized":
        options.update(kv_bits=4, residual=draw(st.integers(0, 2)), group=2)
    if demote and draw(st.booleans()):
        options.update(evicted=2, group=2)
    return options


@st.composite
def examples(draw, cls):
    lengths = draw(st.lists(st.integers(1, 14), min_size=1, max_size=3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    rows = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
    continuation = torch.randint(3, 128, (len(rows), draw(st.integers(1, 8))), generator=g)
    options = _options(cls, draw)
    options |= _storage(cls, draw, demote=options.get("positions") != "cache")
    return rows, continuation, draw(st.sampled_from([None, 2, 5])), options


def _through_select(cls):
    """`cls` evicting through `select` after every forward: the definition the fast path must equal."""
    return type(f"{cls.__name__}SelectEachForward", (cls,), {"evict": CompressedCache.evict})


def _run(cache_cls, rows, continuation, chunk, options):
    """Logits (B, T + 1, V) and kept sets [forward][layer][row][kv head] after every forward. `options`: the
    constructor's, and layout="paged" (2-slot pages)."""
    options = dict(options)
    if options.pop("layout", None) == "paged":
        cache_cls = type(f"Paged{cache_cls.__name__}", (cache_cls,), {"layout": "paged", "page_size": 2})
    ids, mask = left_padded(rows)
    return teacher_forced(MODEL, cache_cls(MODEL, **options), ids, mask, continuation, chunk=chunk)


def check_fast_path_equals_select(reference_cls, cache_cls, rows, continuation, chunk, options):
    expected_logits, expected_kept = _run(_through_select(reference_cls), rows, continuation, chunk, options)
    logits, kept = _run(cache_cls, rows, continuation, chunk, options)
    for forward, (got, want) in enumerate(zip(kept, expected_kept)):
        assert got == want, f"forward {forward}: kept sets differ from select's"
    # the fast path does not trim `used` after freeing the last slot as `keep_only` does, so later attention runs
    # over more (masked) slots: the same logits up to float rounding. With demotion (evicted) the demoted pairs are
    # attended after slot `used`, so they sit at other key indices and the softmax sums round differently; later
    # pairs demoted to 2 bits can carry that 1-ulp difference across a code boundary (up to 2.7e-5 seen in 40
    # examples per strategy; kept sets stay exactly equal)
    atol = 1e-4 if options.get("evicted", "drop") != "drop" else 1e-5
    torch.testing.assert_close(logits, expected_logits, atol=atol, rtol=0)


STRATEGIES = [H2OCache, TOVACache, SnapKVCache, PyramidKVCache, KnormCache, ExpectedAttentionCache]


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.__name__)
@SETTINGS
@given(data=st.data())
def test_decode_fast_path_frees_exactly_what_select_frees(cls, data):
    check_fast_path_equals_select(cls, cls, *data.draw(examples(cls)))


# --- the fast path is what runs on decode steps -------------------------------------------------------------------
@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.__name__)
def test_decode_steps_take_the_fast_path(cls, monkeypatch):
    """After a prompt over budget, no decode step calls `select` (so the check above compares the fast path), and
    a subclass that redefines `select` is evicted through it."""
    calls = []
    original = SnapKVCache.select if cls is PyramidKVCache else cls.select

    def counting(self, layer):
        calls.append(layer.new_tokens)
        return original(self, layer)

    monkeypatch.setattr(SnapKVCache if cls is PyramidKVCache else cls, "select", counting)
    rows, continuation = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]], torch.tensor([[20, 21, 22]])
    options = {"heavy": 2, "recent": 2} if cls is H2OCache else {"budget": 4}
    if cls in (SnapKVCache, PyramidKVCache):
        options["window"] = 1
    if cls is ExpectedAttentionCache:
        options["n_sink"] = 1
    _run(cls, rows, continuation, None, options)
    layers = MODEL.config.num_hidden_layers
    assert calls == [10] * layers

    calls.clear()
    _run(type("Redefined", (cls,), {"select": lambda self, layer: counting(self, layer)}), rows, continuation, None,
         options)
    assert calls == [10] * layers + [1] * (3 * layers)

    if cls in ADAKV:  # AdaKV re-splits a row's budget every step: always evicted through `select`
        calls.clear()
        _run(cls, rows, continuation, None, options | {"allocation": "adakv"})
        assert calls == [10] * layers + [1] * (3 * layers)


# --- planted fast-path bugs ---------------------------------------------------------------------------------------
class _TovaEvictsAtBudget(TOVACache):
    """Planted: frees a token already when the row holds exactly `budget` (>= instead of >)."""

    def _evict_decode_step(self, layer):
        valid = layer.valid
        free_one(layer, lowest(self.scores(layer), valid), valid.sum(dim=-1, keepdim=True) >= self.budget)


class _TovaDropsHighest(TOVACache):
    """Planted: drops the token the last query attends MOST (a sign error)."""

    def _evict_decode_step(self, layer):
        valid = layer.valid
        free_one(layer, lowest(-self.scores(layer), valid), valid.sum(dim=-1, keepdim=True) > self.budget)


class _H2OForgetsWindow(H2OCache):
    """Planted: the decode step may drop a token of the recent window."""

    def _evict_decode_step(self, layer):
        score = self._accumulate(layer)
        valid = layer.valid
        count = valid.sum(dim=-1, keepdim=True)
        free_one(layer, lowest(score, valid), count > self.heavy + self.recent, decode_stream_rank(layer, count))


class _H2ORankNotMoved(H2OCache):
    """Planted: the ranks after a freed token are not moved down, so the recent window drifts."""

    def _evict_decode_step(self, layer):
        score = self._accumulate(layer)
        valid = layer.valid
        count = valid.sum(dim=-1, keepdim=True)
        rank = decode_stream_rank(layer, count)
        free_one(layer, lowest(score, valid & (rank < count - self.recent)), count > self.heavy + self.recent)


class _SnapKVSlotOrder(SnapKVCache):
    """Planted: pools the candidates in SLOT order (their index among the row's candidate slots), not by the
    tracked stream rank (right until slots are reused)."""

    def _evict_decode_step(self, layer):
        valid = layer.valid
        count = valid.sum(dim=-1, keepdim=True)
        rank = decode_stream_rank(layer, count)
        candidates = valid & (rank < count - self.window)
        order = self.stream_index(candidates.long().cumsum(dim=-1) - 1, candidates)
        scores = self.scores(layer, order)
        dropped = lowest(scores, torch.arange(scores.shape[-1]) < count - self.window)
        slot = (order == dropped).max(dim=-1, keepdim=True).indices
        free_one(layer, slot, count > self.layer_budget(layer.layer_idx), rank)


class _PyramidUniformBudget(PyramidKVCache):
    """Planted: the decode step cuts every layer to the mean budget, not its own."""

    def _evict_decode_step(self, layer):
        budgets, self.layer_budgets = self.layer_budgets, [self.budget] * len(self.layer_budgets)
        try:
            super()._evict_decode_step(layer)
        finally:
            self.layer_budgets = budgets


class _KnormForgetsSinks(KnormCache):
    """Planted: the decode step may drop a sink."""

    def _evict_decode_step(self, layer):
        norms = self.key_norms(layer)
        valid = layer.valid
        count = valid.sum(dim=-1, keepdim=True)
        rank = decode_stream_rank(layer, count)
        free_one(layer, lowest(-norms, valid & (rank < count - self.window)), count > self.budget, rank)


class _KnormNewNormMissed(KnormCache):
    """Planted: the decode step reads the norm state without computing the new key's norm (stale or zero)."""

    def _evict_decode_step(self, layer):
        norms = layer.slot_state("knorm", heads=layer.keys.shape[1])[..., : layer.used]
        valid = layer.valid
        count = valid.sum(dim=-1, keepdim=True)
        free_one(layer, lowest(-norms, valid), count > self.budget)


class _EAStaleValueNorms(ExpectedAttentionCache):
    """Planted: the decode step does not compute the new value's norm (its slot keeps the evicted token's)."""

    def track_value_norms(self, layer, written_slot=None):
        if layer.new_tokens > 1:
            super().track_value_norms(layer, written_slot)


class _EAStatisticsSkipped(ExpectedAttentionCache):
    """Planted: the decode step's query does not join the running statistics."""

    def _evict_decode_step(self, layer):
        self._update_statistics = lambda layer, defer=False, real=None: self._stats[layer.layer_idx]
        try:
            super()._evict_decode_step(layer)
        finally:
            del self._update_statistics


def _ignoring_adakv(cls):
    """Planted: `cls`'s decode fast path also runs under allocation="adakv" (one eviction per kv head over the
    per-head budget, instead of the row's budget re-split among its heads by score)."""

    def evict(self, layer):
        if layer.new_tokens == 1 and STREAM_RANK in layer.state and layer.positions.shape[1] == layer.keys.shape[1]:
            self._evict_decode_step(layer)
        else:
            CompressedCache.evict(self, layer)
            record_stream_rank(layer)

    return type(f"{cls.__name__}IgnoresAdaKV", (cls,), {"evict": evict})


PLANTED_ROWS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22, 23]]
PLANTED_CONTINUATION = torch.tensor([[30, 31, 32, 33, 34, 35, 36, 37], [40, 41, 42, 43, 44, 45, 46, 47]])


@pytest.mark.parametrize(
    "reference, planted, chunk, options",
    [
        (TOVACache, _TovaEvictsAtBudget, None, {"budget": 5}),
        (TOVACache, _TovaDropsHighest, None, {"budget": 5}),
        (H2OCache, _H2OForgetsWindow, None, {"heavy": 2, "recent": 3}),
        (H2OCache, _H2ORankNotMoved, 3, {"heavy": 2, "recent": 3}),
        (SnapKVCache, _SnapKVSlotOrder, 3, {"budget": 6, "window": 2, "kernel": 3}),
        (PyramidKVCache, _PyramidUniformBudget, None, {"budget": 6, "window": 2, "kernel": 3, "beta": 2}),
        (KnormCache, _KnormForgetsSinks, None, {"budget": 5, "n_sink": 2}),
        (KnormCache, _KnormNewNormMissed, None, {"budget": 5}),
        (ExpectedAttentionCache, _EAStaleValueNorms, None, {"budget": 5, "n_sink": 1}),
        (ExpectedAttentionCache, _EAStatisticsSkipped, None, {"budget": 5, "n_sink": 1, "use_vnorm": False}),
        (SnapKVCache, _ignoring_adakv(SnapKVCache), None, {"budget": 6, "window": 2, "allocation": "adakv"}),
        (ExpectedAttentionCache, _ignoring_adakv(ExpectedAttentionCache), None,
         {"budget": 5, "n_sink": 1, "allocation": "adakv"}),
    ],
    ids=lambda p: p.__name__.strip("_") if isinstance(p, type) else None,
)
def test_planted_fast_path_bugs_are_caught(reference, planted, chunk, options):
    check_fast_path_equals_select(reference, reference, PLANTED_ROWS, PLANTED_CONTINUATION, chunk, options)
    with pytest.raises(AssertionError):
        check_fast_path_equals_select(reference, planted, PLANTED_ROWS, PLANTED_CONTINUATION, chunk, options)


# --- expected_attention's value norms on quantized storage -------------------------------------------------------
def check_value_norms_are_those_stored_now(cls):
    """Bug caught: expected_attention scoring by value norms kept from when each token was written, while quantized
    storage (kv_bits) has since replaced the values of old pages by their dequantized codes (`select` on main ranks
    by the norms of the values as stored now)."""
    cache = cls(MODEL, budget=5, n_sink=1, kv_bits=4, residual=0, group=2)
    ids, mask = left_padded(PLANTED_ROWS)
    teacher_forced(MODEL, cache, ids, mask, PLANTED_CONTINUATION)
    assert any(bool((layer.store.table <= -2).any()) for layer in cache.layers), "no page was quantized"
    for layer in cache.layers:
        values = layer.values[:, :, : layer.used]
        valid = layer.valid.expand(-1, values.shape[1], -1)
        stored = torch.linalg.vector_norm(values, dim=-1)
        assert torch.equal(cache.value_norms(layer)[valid], stored[valid]), layer.layer_idx


class _EANormsAtWrite(ExpectedAttentionCache):
    """Planted: value norms kept in per-slot state from when each token was written, on quantized storage too."""

    def _norms_per_slot(self):
        return True


def test_expected_attention_value_norms_are_those_stored_now():
    check_value_norms_are_those_stored_now(ExpectedAttentionCache)
    with pytest.raises(AssertionError):
        check_value_norms_are_those_stored_now(_EANormsAtWrite)


# --- lowest: the candidate top_k leaves out, with top_k's tie rule -----------------------------------------------
@st.composite
def scored_slots(draw):
    """Scores with many exact ties (a few integer values) and random candidates, (B, H, S)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 12)))
    scores = torch.randint(0, draw(st.integers(1, 4)), shape, generator=g).float()
    candidates = torch.rand(shape, generator=g) < 0.7
    return scores, candidates


def check_lowest_is_what_top_k_leaves_out(lowest_fn, scores, candidates):
    count = candidates.sum(dim=-1, keepdim=True)
    kept = top_k(scores, candidates, count - 1)
    left_out = candidates & ~kept  # exactly one slot where a row and head has candidates
    slot = lowest_fn(scores, candidates)
    has = count > 0
    assert torch.equal(left_out.gather(-1, slot) | ~has, torch.ones_like(has)), (scores, candidates, slot)


@SETTINGS
@given(scored_slots())
def test_lowest_is_the_candidate_top_k_leaves_out(example):
    check_lowest_is_what_top_k_leaves_out(lowest, *example)


def _lowest_first_tie(scores, candidates):
    """Planted: ties to the LOWER slot (a plain argmin), the opposite of what top_k keeps."""
    return torch.where(candidates, scores, float("inf")).argmin(dim=-1, keepdim=True)


def test_lowest_check_catches_the_wrong_tie_rule():
    scores, candidates = torch.tensor([[[1.0, 0.0, 2.0, 0.0]]]), torch.ones(1, 1, 4, dtype=torch.bool)
    check_lowest_is_what_top_k_leaves_out(lowest, scores, candidates)
    with pytest.raises(AssertionError):
        check_lowest_is_what_top_k_leaves_out(_lowest_first_tie, scores, candidates)


# --- the decode step's attention and observation: bitwise what the general path gives -----------------------------
def _general(query, key, value, mask, scaling):
    probs = attention.attention_probs(query, key, mask, scaling)
    return attention._mix(probs, value).to(query.dtype), probs


@st.composite
def decode_inputs(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    batch, kv_heads, groups, slots = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3])), \
        draw(st.sampled_from([1, 3])), draw(st.integers(1, 70))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    query = torch.randn(batch, kv_heads * groups, 1, 16, generator=g, dtype=dtype)
    key = torch.randn(batch, kv_heads, slots, 16, generator=g, dtype=dtype)
    value = torch.randn(batch, kv_heads, slots, 16, generator=g, dtype=dtype)
    layout = draw(st.sampled_from(["none", "causal", "shared", "per_kv_head"]))
    mask = {"none": None, "causal": True}.get(layout)
    if mask is None and layout != "none":
        heads = 1 if layout == "shared" else kv_heads
        mask = torch.rand(batch, heads, 1, slots, generator=g) < 0.6
        if draw(st.booleans()):
            mask[0] = False  # a row that sees nothing gets zeros
    return query, key, value, mask, draw(st.sampled_from([None, 0.3]))


def check_decode_attention_is_bitwise_general(fast, query, key, value, mask, scaling):
    output, probs = fast(query, key, value, mask, scaling)
    expected_output, expected_probs = _general(query, key, value, mask, scaling)
    assert torch.equal(probs, expected_probs) and torch.equal(output, expected_output)
    assert probs.dtype == expected_probs.dtype and output.dtype == query.dtype


@SETTINGS
@given(decode_inputs())
def test_decode_attention_is_bitwise_the_general_path(example):
    check_decode_attention_is_bitwise_general(attention._decode_attention, *example)


def _decode_attention_seen_rows_only(query, key, value, mask, scaling):
    """Planted: a row that sees no key attends to every key instead of getting zeros."""
    if isinstance(mask, torch.Tensor):
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return attention._decode_attention(query, key, value, mask, scaling)


def test_decode_attention_check_catches_a_planted_bug():
    g = torch.Generator().manual_seed(0)
    query, key, value = torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), \
        torch.randn(2, 2, 5, 8, generator=g)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[0] = False
    check_decode_attention_is_bitwise_general(attention._decode_attention, query, key, value, mask, None)
    with pytest.raises(AssertionError):
        check_decode_attention_is_bitwise_general(_decode_attention_seen_rows_only, query, key, value, mask, None)


# --- expected_attention's rescore_every approximation --------------------------------------------------------------
class _EARescoredReference(ExpectedAttentionCache):
    """The definition of rescore_every = N > 1, computed the long way: every decode step recomputes EVERY kept key's
    logits and probabilities exp(z_h - log Z_h), with the parameters (mu, Sigma, R) and log-normalisers of the
    layer's last rescoring (the first decode step after a forward through `select`, then every N-th decode step;
    log Z_h over the candidates of that step). The class under test keeps the scores in per-slot state instead
    and computes only the new token's."""

    def evict(self, layer):
        self._decode_step = False
        super().evict(layer)
        if not self._decode_step:
            self.__dict__.setdefault("_snapshots", {}).pop(layer.layer_idx, None)

    def _evict_decode_step(self, layer):
        self._decode_step = True
        stats = self._update_statistics(layer)
        self.track_value_norms(layer)
        valid = layer.valid
        count = valid.sum(dim=-1, keepdim=True)
        candidates, rank = valid, None
        if self.n_sink:
            rank = decode_stream_rank(layer, count)
            candidates = valid & (rank >= self.n_sink)
        keys = self.stored_keys(layer)
        snapshots = self.__dict__.setdefault("_snapshots", {})
        snapshot = snapshots.get(layer.layer_idx)
        if snapshot is None or snapshot[2] == self.rescore_every:
            parameters = self.score_parameters(layer, stats, keys)
            logits = logits_of(keys, *parameters).masked_fill(~candidates[:, :, None], float("-inf"))
            log_norm = logits.logsumexp(dim=-1, keepdim=True).nan_to_num(neginf=0.0)  # no candidates: 0
            snapshot = snapshots[layer.layer_idx] = [parameters, log_norm, 0]
        snapshot[2] += 1
        probs = (logits_of(keys, *snapshot[0]) - snapshot[1]).exp().mean(dim=2)
        over = count > self.budget
        if bool(over.any()):
            free_one(layer, lowest(self.weighted(layer, probs, candidates), candidates), over, rank)


def check_rescored_logits(cache_cls, rows, continuation, chunk, options):
    expected_logits, expected_kept = _run(_EARescoredReference, rows, continuation, chunk, options)
    logits, kept = _run(cache_cls, rows, continuation, chunk, options)
    for forward, (got, want) in enumerate(zip(kept, expected_kept)):
        assert got == want, f"forward {forward}: kept sets differ from the rescored definition's"
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)


@SETTINGS
@given(data=st.data())
def test_expected_attention_rescore_every_keeps_what_its_definition_keeps(data):
    """rescore_every = N (2-4) over left-padded batches, chunked prefills, the paged layout and demotion. Not with
    kv_bits: a page quantized between two rescorings changes its keys, whose kept logits stay those of the last
    rescoring (the docstring says so), while the long way reads the keys as stored now."""
    rows, continuation, chunk, options = data.draw(examples(ExpectedAttentionCache))
    if options.get("allocation") == "adakv" or "kv_bits" in options:
        options = {k: v for k, v in options.items() if k not in ("allocation", "alpha", "kv_bits", "residual")}
    options["rescore_every"] = data.draw(st.integers(2, 4))
    check_rescored_logits(ExpectedAttentionCache, rows, continuation, chunk, options)


class _EANeverRescores(ExpectedAttentionCache):
    """Planted: the scores of the first decode step's rescoring are reused for ever (the count never reaches N)."""

    def frozen_scores(self, layer, candidates, written_slot=None):
        memo = self._rescored.get(layer.layer_idx)
        if memo is not None:
            memo[2] = 1
        return super().frozen_scores(layer, candidates, written_slot)


class _EANewTokenUnscored(ExpectedAttentionCache):
    """Planted: between rescorings the new token's score is not recorded (its slot keeps what a freed token left)."""

    def frozen_scores(self, layer, candidates, written_slot=None):
        memo = self._rescored.get(layer.layer_idx)
        if memo is None or memo[2] >= self.rescore_every:
            return super().frozen_scores(layer, candidates, written_slot)
        memo[2] += 1
        return layer.state["expected_score"][..., : layer.used]


class _EANormaliserRecomputed(ExpectedAttentionCache):
    """Planted: between rescorings each query head's normaliser is taken over the candidates of the step (the
    previous definition), not the rescoring's."""

    def frozen_scores(self, layer, candidates, written_slot=None):
        probs = super().frozen_scores(layer, candidates, written_slot)
        memo = self._rescored[layer.layer_idx]
        if memo[2] == 1:
            return probs
        logits = logits_of(self.stored_keys(layer), *memo[0]).masked_fill(~candidates[:, :, None], float("-inf"))
        return self.weighted(layer, logits.softmax(dim=-1).nan_to_num(0.0).mean(dim=2), None)


class _EADeferredQueriesLost(ExpectedAttentionCache):
    """Planted: the decode steps' queries, deferred until the next rescoring, never reach the statistics."""

    def _update_statistics(self, layer, defer=False, real=None):
        return None if defer else super()._update_statistics(layer, real=real)


@pytest.mark.parametrize("planted", [_EANeverRescores, _EANewTokenUnscored, _EADeferredQueriesLost,
                                     _EANormaliserRecomputed],
                         ids=lambda p: p.__name__.strip("_"))
def test_planted_rescore_bugs_are_caught(planted):
    options = {"budget": 5, "n_sink": 1, "use_vnorm": False, "rescore_every": 3}
    check_rescored_logits(ExpectedAttentionCache, PLANTED_ROWS, PLANTED_CONTINUATION, None, options)
    with pytest.raises(AssertionError):
        check_rescored_logits(planted, PLANTED_ROWS, PLANTED_CONTINUATION, None, options)


def test_rescore_every_one_is_exact_and_bad_values_are_refused():
    """rescore_every=1 (the default) is the exact strategy: the same kept sets as `select` (the check above); other
    values: a clear error naming the parameter."""
    check_fast_path_equals_select(ExpectedAttentionCache, ExpectedAttentionCache, PLANTED_ROWS, PLANTED_CONTINUATION,
                                  None, {"budget": 5, "n_sink": 1, "rescore_every": 1})
    for bad in (0, -2, 1.5, True, "3"):
        with pytest.raises((ValueError, TypeError), match="rescore_every"):
            ExpectedAttentionCache(MODEL, budget=5, rescore_every=bad)
    with pytest.raises(ValueError, match="rescore_every"):
        ExpectedAttentionCache(MODEL, budget=5, rescore_every=2, allocation="adakv")


def test_a_freed_tail_in_a_quantized_page_is_never_appended_to():
    """Regression, found by the hypothesis test above: AdaKV (alpha 0) on 2-slot quantized pages freed the last
    slots of a lane inside a quantized page; `keep_only` trimmed `used` past those dead slots (-2) as if they were
    free, and the next token was written into the quantized page (RuntimeError in `QuantizedKV.write_slots`)."""
    options = {"budget": 1, "n_sink": 0, "n_future_positions": 1, "use_covariance": False, "use_vnorm": False,
               "allocation": "adakv", "alpha": 0.0, "kv_bits": 4, "residual": 0, "group": 2}
    check_fast_path_equals_select(ExpectedAttentionCache, ExpectedAttentionCache, [[98, 17, 127, 121]],
                                  torch.tensor([[16, 66]]), None, options)
