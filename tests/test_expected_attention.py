"""ExpectedAttentionCache: the kept set is the top-k of the paper's expected-attention score recomputed here in
float64 from the model's own projections (prefill and decoding, planted twins), exactness on three architectures,
hypothesis invariants (each also run on a planted bug), per-row statistics follow their row, bad input."""


import inspect

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from kvcompress import ExpectedAttentionCache, FullCache, capture, registry
from kvcompress.cache import cache_arg
from kvcompress.testing import (
    left_padded,
    masked_reference_logits,
    max_step_error,
    tiny_gemma3,
    tiny_llama,
    tiny_qwen2,
    visibility_from_records,
)

from kept_sets import recording_kept, teacher_forced

MODEL = tiny_llama(seed=11)  # read-only across hypothesis examples; caches are built per example
PROPERTY_SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROWS = [[5, 9, 17, 33, 41, 8, 12, 99, 4, 7, 3, 50, 61, 70], [7, 3, 90, 11, 12, 13, 14]]


# --- the independent reference ---------------------------------------------------------------------------------
def _rope_tables(model):
    """Per layer: a function positions (B, N) -> (cos, sin) (B, N, d) of THAT layer's RoPE table, from the model's
    rotary module (Gemma 3: the local table on sliding layers, the global one on full layers)."""
    rotary = model.model.rotary_emb
    config = model.config.get_text_config(decoder=True)
    if "layer_type" not in inspect.signature(rotary.forward).parameters:
        return [lambda x, positions: rotary(x, positions)] * config.num_hidden_layers
    return [lambda x, positions, kind=kind: rotary(x, positions, kind) for kind in config.layer_types]


def _projections(model, fed, fed_mask, visible):
    """Per layer: pre-RoPE queries (B, Hq, N, d), RoPE-rotated keys and values (B, Hkv, N, d), float64, from the
    hidden states entering each attention in ONE cache-free forward (the model's eager attention under the
    visibility the cache produced), projected here with the layers' weights (and q/k norms where the model has
    them, Gemma 3); keys rotated at generate's positions with the layer's own RoPE table."""
    captured = {}
    attns = [layer.self_attn for layer in model.model.layers]
    hooks = [a.register_forward_pre_hook(lambda m, args, kw, l=l: captured.__setitem__(l, kw["hidden_states"]),
                                         with_kwargs=True) for l, a in enumerate(attns)]
    try:
        masked_reference_logits(model, fed, fed_mask, visible)
    finally:
        for h in hooks:
            h.remove()
    position_ids = (fed_mask.long().cumsum(-1) - 1).masked_fill(fed_mask == 0, 1)
    out = []
    for l, (attn, table) in enumerate(zip(attns, _rope_tables(model))):
        h = captured[l].double()

        def project(linear, norm=None):
            bias = None if linear.bias is None else linear.bias.double()
            x = F.linear(h, linear.weight.double(), bias).view(*fed.shape, -1, attn.head_dim)
            if norm is not None:
                x = norm(x.float()).double()  # the model's own q/k norm module (fp32 weights)
            return x.transpose(1, 2)

        q = project(attn.q_proj, getattr(attn, "q_norm", None))
        k = project(attn.k_proj, getattr(attn, "k_norm", None))
        v = project(attn.v_proj)
        cos, sin = table(h.float(), position_ids)
        _, k = apply_rotary_pos_emb(k, k, cos.double(), sin.double())
        out.append((q, k, v))
    return out


def _mean_rope_matrix(table, start, count, dim):
    """(d, d) float64 mean over positions start .. start + count - 1 of the RoPE matrix cos I + sin P of `table`
    (one entry of `_rope_tables`), P x = rotate_half(x)."""
    positions = torch.arange(start, start + count)[None]
    cos, sin = table(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = cos[0].double(), sin[0].double()  # (T, d)
    p = rotate_half(torch.eye(dim, dtype=torch.float64)).T  # column i = rotate_half(e_i)
    return torch.stack([torch.diag(c) + torch.diag(s) @ p for c, s in zip(cos, sin)]).mean(0)


def _expected_kept(model, proj, fed_mask, prompt_len, budget, n_sink, future, use_cov, use_vnorm, epsilon=0.0):
    """Simulate the paper's rule forward by forward. Returns [forward][layer][row][kv head] -> set."""
    batch, total = fed_mask.shape
    hq, hkv, dim = proj[0][0].shape[1], proj[0][1].shape[1], proj[0][0].shape[-1]
    groups = hq // hkv
    scales = [layer.self_attn.scaling for layer in model.model.layers]  # the model's own softmax scale per layer
    tables = _rope_tables(model)
    bounds = [(0, prompt_len)] + [(p, p + 1) for p in range(prompt_len, total)]
    kept = [[[set() for _ in range(hkv)] for _ in range(batch)] for _ in proj]
    out = []
    for start, stop in bounds:
        for l, (q, k, v) in enumerate(proj):
            for b in range(batch):
                real = [p for p in range(stop) if fed_mask[b, p]]
                rotation = _mean_rope_matrix(tables[l], len(real), future, dim)  # next position = real tokens so far
                scale = scales[l]
                queries = q[b][:, real[n_sink:]]  # (Hq, m, d): sink queries left out
                mean = queries.mean(dim=1)  # (Hq, d)
                centered = queries - mean[:, None]
                cov = centered.transpose(1, 2) @ centered / queries.shape[1]
                mean_f, cov_f = mean @ rotation.T, rotation @ cov @ rotation.T
                for h in range(hkv):
                    cand = sorted(kept[l][b][h] | {p for p in real if p >= start})
                    if len(cand) > budget:
                        sinks, rest = cand[:n_sink], cand[n_sink:]
                        keys = k[b, h, rest]  # (R, d)
                        probs = 0
                        for j in range(groups):
                            z = scale * keys @ mean_f[h * groups + j]
                            if use_cov:
                                z = z + 0.5 * scale**2 * ((keys @ cov_f[h * groups + j]) * keys).sum(-1)
                            probs = probs + z.softmax(-1) / groups
                        score = (probs + epsilon) * v[b, h, rest].norm(dim=-1) if use_vnorm else probs
                        top = score.argsort(descending=True)[: budget - len(sinks)]
                        cand = set(sinks) | {rest[i] for i in top.tolist()}
                    kept[l][b][h] = set(cand)
        out.append([[[set(s) for s in row] for row in layer] for layer in kept])
    return out


def check_choice(cache_cls, model, budget=6, n_sink=2, future=512, use_cov=True, use_vnorm=True, steps=5,
                 epsilon=0.0):
    """After the prefill and every decoding step, each (layer, row, kv head) keeps exactly the reference's choice."""
    ids, mask = left_padded(ROWS)
    continuation = torch.arange(100, 100 + 2 * steps).view(2, steps)
    cache = cache_cls(model, budget=budget, n_sink=n_sink, n_future_positions=future, use_covariance=use_cov,
                      use_vnorm=use_vnorm, epsilon=epsilon)
    with capture() as records:
        _, kept = teacher_forced(model, cache, ids, mask, continuation)
    fed = torch.cat([ids, continuation], dim=1)
    fed_mask = torch.cat([mask, torch.ones_like(continuation)], dim=1)
    visible = visibility_from_records(records, 2, fed.shape[1])
    proj = _projections(model, fed, fed_mask, visible)
    expected = _expected_kept(model, proj, fed_mask, ids.shape[1], budget, n_sink, future, use_cov, use_vnorm,
                              epsilon)
    assert len(kept) == len(expected) == steps + 1
    for step, (got, want) in enumerate(zip(kept, expected)):
        assert got == want, f"forward {step}"


class _RotatedQueryStatistics(ExpectedAttentionCache):
    """Planted bug: statistics of the queries as the kernel saw them (RoPE-rotated), not pre-RoPE."""

    def pre_rope_queries(self, layer, queries):
        return queries


class _NoFutureAverage(ExpectedAttentionCache):
    """Planted bug: the statistics rotated to the next position only, not averaged over the next T."""

    def future_rotation(self, layer, like):
        saved, self.n_future_positions = self.n_future_positions, 1
        try:
            return super().future_rotation(layer, like)
        finally:
            self.n_future_positions = saved


class _IgnoresValueNorm(ExpectedAttentionCache):
    """Planted bug: use_vnorm accepted but not applied."""

    def scores(self, layer, stats, candidates):
        self.use_vnorm = False
        return super().scores(layer, stats, candidates)


# On random tiny models the value norms vary far more than the expected probabilities, so with use_vnorm the
# choice is mostly the value norm's: the configurations without it are the ones that check the attention part.
@pytest.mark.parametrize(
    "make_model, kwargs",
    [
        (tiny_llama, {}),
        (tiny_llama, {"use_vnorm": False}),
        (tiny_llama, {"budget": 4, "n_sink": 0, "future": 8, "use_cov": False, "use_vnorm": False}),
        (tiny_qwen2, {"budget": 5, "n_sink": 1, "future": 64, "use_vnorm": False}),
        # Gemma 3: softmax scale 1/8 from query_pre_attn_scalar (head_dim 16 would give 1/4), q/k norms, and two
        # RoPE tables (local base on sliding layers 0 and 2, global on full layers 1 and 3)
        (tiny_gemma3, {"use_vnorm": False}),
        (tiny_gemma3, {"budget": 5, "n_sink": 1, "future": 64, "use_cov": False, "use_vnorm": False}),
        (tiny_gemma3, {}),
        (tiny_llama, {"epsilon": 0.05}),
        # an epsilon far above every probability ranks by the value norm alone; 1e39 overflows float32
        (tiny_llama, {"epsilon": 1e39}),
    ],
)
def test_kept_set_is_the_top_k_of_expected_attention(make_model, kwargs):
    check_choice(ExpectedAttentionCache, make_model(seed=11), **kwargs)


class _HeadDimScale(ExpectedAttentionCache):
    """Planted bug (issue 20, item 1): the softmax scale taken as head_dim ** -0.5, not the layer's own scaling."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._scaling = {}  # scores() then falls back to head_dim ** -0.5


class _FirstLayersRopeTable(ExpectedAttentionCache):
    """Planted bug (issue 20, item 2): layer 0's RoPE table used to rotate every layer's statistics."""

    def _mean_rotation(self, layer, like):
        return super()._mean_rotation(self.layers[0], like)  # layer 0 has seen the same tokens by now


@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("planted", [_HeadDimScale, _FirstLayersRopeTable])
def test_choice_check_catches_gemma3_scale_and_rope_table_bugs(planted, seed):
    """Both bugs leave Llama and Qwen2 unchanged (one RoPE table, scale head_dim ** -0.5); on Gemma 3 they change
    the kept tokens, and the reference (scale and RoPE table per layer, from the model) must see it."""
    model = tiny_gemma3(seed=seed)
    check_choice(ExpectedAttentionCache, model, use_vnorm=False)  # the real strategy passes
    with pytest.raises(AssertionError):
        check_choice(planted, model, use_vnorm=False)


@pytest.mark.parametrize(
    "planted, kwargs",
    [
        (_RotatedQueryStatistics, {"use_vnorm": False}),
        (_NoFutureAverage, {"use_vnorm": False}),
        (_IgnoresValueNorm, {}),
    ],
)
def test_choice_check_catches_planted_bugs(planted, kwargs):
    check_choice(ExpectedAttentionCache, MODEL, **kwargs)  # the real strategy passes
    with pytest.raises(AssertionError):
        check_choice(planted, MODEL, **kwargs)


# --- exactness against a full-sequence forward with per-layer, per-kv-head masks ----------------------------------
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2, tiny_gemma3])
@pytest.mark.parametrize("budget, n_sink, chunk", [(5, 2, None), (6, 0, 4)])
def test_each_step_equals_explicit_mask_forward(make_model, budget, n_sink, chunk):
    model = make_model(seed=2)
    ids, mask = left_padded(ROWS)
    kwargs = {} if chunk is None else {"prefill_chunk_size": chunk}
    cache = ExpectedAttentionCache(model, budget=budget, n_sink=n_sink)
    error, visible, _ = max_step_error(model, cache, ids, mask, max_new_tokens=6, **kwargs)
    assert error < 1e-4
    assert visible.dim() == 4  # (B, Hkv, N, N): the kv heads kept different tokens
    assert int(cache.kept_counts().max()) == budget


# --- hypothesis properties, each with a planted-bug twin ---------------------------------------------------------
@st.composite
def batches(draw):
    """Left-padded prompts, a continuation, and budget / n_sink / n_future_positions."""
    lengths = draw(st.lists(st.integers(1, 14), min_size=1, max_size=3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    rows = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
    ids, mask = left_padded(rows)
    continuation = torch.randint(3, 128, (len(rows), draw(st.integers(1, 6))), generator=g)
    n_sink = draw(st.integers(0, 3))
    options = {"n_sink": n_sink, "budget": n_sink + draw(st.integers(1, 5)),
               "n_future_positions": draw(st.sampled_from([1, 16, 512])), "use_covariance": draw(st.booleans())}
    return rows, ids, mask, continuation, options


def check_budget(cache_cls, rows, ids, mask, continuation, options):
    """Every layer, row and kv head keeps min(budget, real tokens seen) tokens after every forward."""
    _, kept = teacher_forced(MODEL, cache_cls(MODEL, **options), ids, mask, continuation)
    for step, per_layer in enumerate(kept):
        for per_row in per_layer:
            for b, per_head in enumerate(per_row):
                for positions in per_head:
                    assert len(positions) == min(options["budget"], len(rows[b]) + step), (step, b, positions)


def check_rows_independent(cache_cls, rows, ids, mask, continuation, options):
    """A row's logits and kept tokens in a padded batch equal those of the row alone."""
    batch_logits, batch_kept = teacher_forced(MODEL, cache_cls(MODEL, **options), ids, mask, continuation)
    for b, row in enumerate(rows):
        pad = ids.shape[1] - len(row)
        alone = torch.tensor([row])
        logits, kept = teacher_forced(MODEL, cache_cls(MODEL, **options), alone, torch.ones_like(alone),
                                       continuation[b : b + 1])
        torch.testing.assert_close(batch_logits[b], logits[0], atol=1e-5, rtol=0)
        for step in range(len(kept)):
            for layer in range(len(kept[step])):
                assert [{p - pad for p in s} for s in batch_kept[step][layer][b]] == kept[step][layer][0]


def check_large_budget_is_full_cache(cache_cls, rows, ids, mask, continuation, options):
    """With budget >= every row's length, logits equal FullCache's."""
    options = {**options, "budget": max(ids.shape[1] + continuation.shape[1], options["n_sink"] + 1)}
    got, _ = teacher_forced(MODEL, cache_cls(MODEL, **options), ids, mask, continuation)
    expected, _ = teacher_forced(MODEL, FullCache(MODEL), ids, mask, continuation)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def check_statistics_follow_their_row(cache_cls, rows, ids, mask, continuation, options):
    """Reversing the batch rows after the prefill (`reorder_cache`, as beam search does) and continuing gives the
    kept tokens of the reversed batch run from the start: the per-row query statistics move with their row."""
    if len(rows) < 2:
        return
    flip = torch.arange(len(rows) - 1, -1, -1)
    cache = cache_cls(MODEL, **options)
    with torch.no_grad():
        MODEL(ids, attention_mask=mask, **cache_arg(cache))
    cache.reorder_cache(flip)
    _, kept = _teacher_forced_after_prefill(MODEL, cache, mask[flip], continuation[flip])
    reference = cache_cls(MODEL, **options)
    _, expected = teacher_forced(MODEL, reference, ids[flip], mask[flip], continuation[flip])
    assert kept == expected[1:]


def _teacher_forced_after_prefill(model, cache, mask, continuation):
    logits = []
    with torch.no_grad(), recording_kept(model, cache) as kept:
        for t in range(continuation.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits.append(model(continuation[:, t : t + 1], attention_mask=mask, **cache_arg(cache)).logits[:, -1])
    return logits, kept


class _OneTooMany(ExpectedAttentionCache):
    def select(self, layer):
        self.budget += 1
        try:
            return super().select(layer)
        finally:
            self.budget -= 1


class _PadQueriesCounted(ExpectedAttentionCache):
    """Planted bug: the queries of pad tokens enter the statistics."""

    @staticmethod
    def real_new_tokens(layer):
        return torch.ones(layer.positions.shape[0], layer.new_tokens, dtype=torch.bool)


class _HalfBudget(ExpectedAttentionCache):
    """Planted bug: cuts to half the budget."""

    def select(self, layer):
        saved, self.budget = self.budget, max(self.n_sink + 1, self.budget // 2)
        try:
            return super().select(layer)
        finally:
            self.budget = saved


class _StatisticsStayInPlace(ExpectedAttentionCache):
    """Planted bug: per-row statistics not reordered with the rows."""

    def _reindex_rows(self, index):
        ExpectedAttentionCache.__mro__[1]._reindex_rows(self, index)


@PROPERTY_SETTINGS
@given(batches())
def test_budget_is_never_exceeded(example):
    check_budget(ExpectedAttentionCache, *example)


@PROPERTY_SETTINGS
@given(batches())
def test_batch_rows_are_independent(example):
    check_rows_independent(ExpectedAttentionCache, *example)


@PROPERTY_SETTINGS
@given(batches())
def test_budget_covering_everything_is_full_cache(example):
    check_large_budget_is_full_cache(ExpectedAttentionCache, *example)


@PROPERTY_SETTINGS
@given(batches())
def test_statistics_follow_their_row_through_reorder(example):
    check_statistics_follow_their_row(ExpectedAttentionCache, *example)


def _planted_example():
    rows = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24]]
    ids, mask = left_padded(rows)
    options = {"budget": 4, "n_sink": 1, "use_vnorm": False}
    return rows, ids, mask, torch.tensor([[30, 31, 32, 33, 34], [40, 41, 42, 43, 44]]), options


@pytest.mark.parametrize(
    "checker, planted",
    [
        (check_budget, _OneTooMany),
        (check_rows_independent, _PadQueriesCounted),
        (check_large_budget_is_full_cache, _HalfBudget),
        (check_statistics_follow_their_row, _StatisticsStayInPlace),
    ],
)
def test_properties_catch_planted_bugs(checker, planted):
    checker(ExpectedAttentionCache, *_planted_example())  # the real strategy passes
    with pytest.raises(AssertionError):
        checker(planted, *_planted_example())


# --- state: clone, pickle, reset ------------------------------------------------------------------------------------
def test_clone_and_reset_carry_or_drop_the_statistics():
    ids, mask = left_padded(ROWS)
    continuation = torch.arange(100, 110).view(2, 5)
    cache = ExpectedAttentionCache(MODEL, budget=5, n_sink=1)
    with torch.no_grad():
        MODEL(ids, attention_mask=mask, **cache_arg(cache))
    twin = cache.clone()
    _, kept = _teacher_forced_after_prefill(MODEL, cache, mask, continuation)
    _, kept_twin = _teacher_forced_after_prefill(MODEL, twin, mask, continuation)
    assert kept == kept_twin
    cache.reset()
    _, fresh = teacher_forced(MODEL, cache, ids, mask, continuation)
    _, new = teacher_forced(MODEL, ExpectedAttentionCache(MODEL, budget=5, n_sink=1), ids, mask, continuation)
    assert fresh == new


# --- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"budget": 0}, ValueError, "budget must be an integer >= 1"),
        ({"budget": 2.0}, ValueError, "budget must be an integer"),
        ({"budget": 4, "n_sink": 4}, ValueError, r"budget \(4\) must be larger than n_sink \(4\)"),
        ({"n_future_positions": 0}, ValueError, "n_future_positions must be an integer >= 1"),
        ({"n_sink": -1}, ValueError, "n_sink must be an integer >= 0"),
        ({"use_covariance": 1}, TypeError, "use_covariance must be a bool"),
        ({"use_vnorm": "yes"}, TypeError, "use_vnorm must be a bool"),
        ({"epsilon": -0.1}, ValueError, "epsilon must be a finite number >= 0"),
        ({"epsilon": float("nan")}, ValueError, "epsilon must be a finite number >= 0"),
        ({"positions": "cache"}, ValueError, "positions='original'"),
    ],
)
def test_bad_input_names_the_parameter(kwargs, error, match):
    with pytest.raises(error, match=match):
        ExpectedAttentionCache(MODEL, **kwargs)


def test_for_budget_and_registry():
    cache = registry.get("expected_attention").for_budget(MODEL, None, 9)
    assert isinstance(cache, ExpectedAttentionCache)
    assert (cache.budget, cache.n_sink, cache.n_future_positions, cache.use_covariance, cache.use_vnorm,
            cache.epsilon) == (9, 4, 512, True, True, 0.0)
    assert ExpectedAttentionCache.for_budget(MODEL, None, 1).n_sink == 0
    with pytest.raises(ValueError, match="budget"):
        ExpectedAttentionCache.for_budget(MODEL, None, 0)


def check_generate_rows_independent(cache_cls):
    """generate() gives left-padded rows position ids that skip the pads (the queries are then rotated at
    positions other than their stream positions): each row still keeps what it keeps alone."""
    ids, mask = left_padded(ROWS)
    options = {"budget": 5, "n_sink": 1, "n_future_positions": 16, "use_vnorm": False}
    cache = cache_cls(MODEL, **options)
    batch = MODEL.generate(ids, attention_mask=mask, **cache_arg(cache), max_new_tokens=5, do_sample=False,
                           pad_token_id=0)
    for b, row in enumerate(ROWS):
        pad = ids.shape[1] - len(row)
        alone = cache_cls(MODEL, **options)
        out = MODEL.generate(torch.tensor([row]), **cache_arg(alone), max_new_tokens=5, do_sample=False,
                             pad_token_id=0)
        assert out[0].tolist() == batch[b, pad:].tolist()
        for layer in range(len(cache.layers)):
            for head in range(2):
                got = [p - pad for p in cache.kept_positions(layer, head)[b]]
                assert got == alone.kept_positions(layer, head)[0], (b, layer, head)


class _FutureFromFewestRealTokens(ExpectedAttentionCache):
    """Planted bug: one future position for the whole batch, from the row with the fewest real tokens."""

    def future_rotation(self, layer, like):
        real = int(self._stats[layer.layer_idx]["real"].min())
        seen, layer.seen = layer.seen, real
        try:
            return super().future_rotation(layer, like)
        finally:
            layer.seen = seen


def test_generate_with_left_padding_keeps_what_each_row_keeps_alone():
    check_generate_rows_independent(ExpectedAttentionCache)
    with pytest.raises(AssertionError):
        check_generate_rows_independent(_FutureFromFewestRealTokens)
