"""KnormCache: the kept set is the lowest-norm keys (checked against independently computed keys), exactness on
three architectures, hypothesis invariants (each also run on a planted bug), bad input."""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvcompress import FullCache, KnormCache, capture, registry
from kvcompress.testing import (
    left_padded,
    masked_reference_logits,
    max_step_error,
    tiny_gemma3,
    tiny_llama,
    tiny_qwen2,
    visibility_from_records,
)

from kept_sets import teacher_forced

MODEL = tiny_llama(seed=7)  # read-only across hypothesis examples; caches are built per example
PROPERTY_SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROWS = [[5, 9, 17, 33, 41, 8, 12, 99, 4, 7, 3, 50, 61, 70], [7, 3, 90, 11, 12, 13, 14]]


def _reference_key_norms(model, sequences, full_mask, visible) -> torch.Tensor:
    """(L, B, Hkv, N) float64 norms of the RoPE-rotated keys of every fed token, from ONE cache-free forward of
    the model's eager attention under the visibility the cache produced (so later layers see the same inputs as
    during generation): k_proj outputs captured by hooks, rotated in float64 at generate's position ids."""
    fed, fed_mask = sequences[:, :-1], full_mask[:, :-1]
    captured = {}
    attns = [layer.self_attn for layer in model.model.layers]
    hooks = [a.k_proj.register_forward_hook(lambda m, i, o, l=l: captured.__setitem__(l, o))
             for l, a in enumerate(attns)]
    try:
        masked_reference_logits(model, fed, fed_mask, visible)
    finally:
        for h in hooks:
            h.remove()
    position_ids = (fed_mask.long().cumsum(-1) - 1).masked_fill(fed_mask == 0, 1)
    norms = []
    for l, attn in enumerate(attns):
        k = captured[l].double().view(*fed.shape, -1, attn.head_dim).transpose(1, 2)  # (B, Hkv, N, d)
        cos, sin = model.model.rotary_emb(k.float(), position_ids)
        _, rotated = apply_rotary_pos_emb(k, k, cos.double(), sin.double())
        norms.append(rotated.norm(dim=-1))
    return torch.stack(norms)


def _expected_kept(norms, fed_mask, prompt_len, budget, n_sink, window) -> list:
    """Simulate the rule forward by forward: per layer, row and head, kept = first n_sink + last window of the
    candidates (kept before + the forward's real tokens), then the lowest norms. Returns [forward][layer][row][head]."""
    layers, batch, heads, total = norms.shape
    bounds = [(0, prompt_len)] + [(p, p + 1) for p in range(prompt_len, total)]
    kept = [[[set() for _ in range(heads)] for _ in range(batch)] for _ in range(layers)]
    out = []
    for start, stop in bounds:
        for l in range(layers):
            for b in range(batch):
                for h in range(heads):
                    cand = sorted(kept[l][b][h] | {p for p in range(start, stop) if fed_mask[b, p]})
                    if len(cand) > budget:
                        protected = set(cand[:n_sink]) | set(cand[len(cand) - window :])
                        rest = sorted((p for p in cand if p not in protected), key=lambda p: float(norms[l, b, h, p]))
                        cand = protected | set(rest[: budget - len(protected)])
                    kept[l][b][h] = set(cand)
        out.append([[[set(s) for s in row] for row in layer] for layer in kept])
    return out


def check_choice(cache_cls, budget, n_sink, window, steps=5):
    """After the prefill and every decoding step, each (layer, row, kv head) keeps exactly the tokens the rule
    picks from independently computed key norms. Teacher-forced with distinct tokens: greedy decoding of a random
    model repeats one token, whose layer-0 keys then tie in norm."""
    ids, mask = left_padded(ROWS)
    continuation = torch.arange(100, 100 + 2 * steps).view(2, steps)
    cache = cache_cls(MODEL, budget=budget, n_sink=n_sink, window=window)
    with capture() as records:
        _, kept = teacher_forced(MODEL, cache, ids, mask, continuation)
    sequences = torch.cat([ids, continuation, continuation[:, :1]], dim=1)  # the last column is never fed
    full_mask = torch.cat([mask, torch.ones_like(continuation), mask[:, :1]], dim=1)
    visible = visibility_from_records(records, 2, sequences.shape[1] - 1)
    norms = _reference_key_norms(MODEL, sequences, full_mask, visible)
    expected = _expected_kept(norms, full_mask[:, :-1], ids.shape[1], budget, n_sink, window)
    assert len(kept) == len(expected) == steps + 1
    for step, (got, want) in enumerate(zip(kept, expected)):
        assert got == want, f"forward {step}"


class _OneSetForAllHeads(KnormCache):
    """Planted bug: scores by the mean norm over kv heads (one set per layer, not per kv head)."""

    def key_norms(self, layer):
        return super().key_norms(layer).mean(dim=1, keepdim=True).expand(-1, layer.keys.shape[1], -1)


class _HighestNorm(KnormCache):
    """Planted bug: keeps the keys of HIGHEST norm."""

    def key_norms(self, layer):
        return -super().key_norms(layer)


@pytest.mark.parametrize("budget, n_sink, window", [(5, 0, 0), (6, 2, 1), (4, 1, 3)])
def test_kept_set_is_the_lowest_key_norms(budget, n_sink, window):
    check_choice(KnormCache, budget, n_sink, window)


@pytest.mark.parametrize("planted", [_OneSetForAllHeads, _HighestNorm])
def test_choice_check_catches_planted_bugs(planted):
    with pytest.raises(AssertionError):
        check_choice(planted, 5, 0, 0)


# --- exactness against a full-sequence forward with per-layer, per-kv-head masks ----------------------------------
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2, tiny_gemma3])
@pytest.mark.parametrize("budget, n_sink, window, chunk", [(5, 0, 0, None), (6, 1, 2, 4)])
def test_each_step_equals_explicit_mask_forward(make_model, budget, n_sink, window, chunk):
    model = make_model(seed=2)
    ids, mask = left_padded(ROWS)
    kwargs = {} if chunk is None else {"prefill_chunk_size": chunk}
    cache = KnormCache(model, budget=budget, n_sink=n_sink, window=window)
    error, visible, _ = max_step_error(model, cache, ids, mask, max_new_tokens=6, **kwargs)
    assert error < 1e-4
    assert visible.dim() == 4  # (B, Hkv, N, N): the kv heads kept different tokens
    assert int(cache.kept_counts().max()) == budget


# --- hypothesis properties, each with a planted-bug twin ---------------------------------------------------------
@st.composite
def batches(draw, min_len=1, max_len=14):
    """Left-padded rows of distinct tokens (no two tokens of a row tie in layer-0 key norm), a continuation."""
    lengths = draw(st.lists(st.integers(min_len, max_len), min_size=1, max_size=3))
    steps = draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    tokens = [(torch.randperm(125, generator=g)[: n + steps] + 3).tolist() for n in lengths]
    rows = [t[:n] for t, n in zip(tokens, lengths)]
    ids, mask = left_padded(rows)
    continuation = torch.tensor([t[n:] for t, n in zip(tokens, lengths)])
    n_sink, window = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    return rows, ids, mask, continuation, n_sink + window + draw(st.integers(1, 5)), n_sink, window


def check_budget(cache_cls, rows, ids, mask, continuation, budget, n_sink, window):
    """Every layer, row and kv head keeps at most `budget` tokens after every forward (and exactly
    min(budget, real tokens seen))."""
    cache = cache_cls(MODEL, budget=budget, n_sink=n_sink, window=window)
    _, kept = teacher_forced(MODEL, cache, ids, mask, continuation)
    for step, per_layer in enumerate(kept):
        for per_row in per_layer:
            for b, per_head in enumerate(per_row):
                for positions in per_head:
                    assert len(positions) == min(budget, len(rows[b]) + step), (step, b, positions)


def check_rows_independent(cache_cls, rows, ids, mask, continuation, budget, n_sink, window):
    """A row's logits and kept tokens in a padded batch equal those of the row alone."""
    batch_logits, batch_kept = teacher_forced(MODEL, cache_cls(MODEL, budget=budget, n_sink=n_sink, window=window),
                                               ids, mask, continuation)
    for b, row in enumerate(rows):
        pad = ids.shape[1] - len(row)
        alone = torch.tensor([row])
        logits, kept = teacher_forced(MODEL, cache_cls(MODEL, budget=budget, n_sink=n_sink, window=window), alone,
                                       torch.ones_like(alone), continuation[b : b + 1])
        torch.testing.assert_close(batch_logits[b], logits[0], atol=1e-5, rtol=0)
        for step in range(len(kept)):
            for layer in range(len(kept[step])):
                assert [{p - pad for p in s} for s in batch_kept[step][layer][b]] == kept[step][layer][0]


def check_large_budget_is_full_cache(cache_cls, rows, ids, mask, continuation, budget, n_sink, window):
    """With budget >= every row's length, logits equal FullCache's. (The budget must also hold n_sink + window,
    which a 1-token prompt and 1-token continuation with 1 sink and a 2-token window exceed: hypothesis found it.)"""
    longest = max(ids.shape[1] + continuation.shape[1], n_sink + window)
    got, _ = teacher_forced(MODEL, cache_cls(MODEL, budget=longest, n_sink=n_sink, window=window), ids, mask,
                             continuation)
    expected, _ = teacher_forced(MODEL, FullCache(MODEL), ids, mask, continuation)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _layer0_key_norms(model, tokens: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, T) float64 norms of layer 0's keys of `tokens`: they depend on the token alone (RoPE is a rotation),
    so they are computed from the embedding, the input norm and k_proj, with no cache and no attention."""
    layer = model.model.layers[0]
    with torch.no_grad():
        k = layer.self_attn.k_proj(layer.input_layernorm(model.model.embed_tokens(tokens))).double()
    return k.view(*tokens.shape, -1, layer.self_attn.head_dim).norm(dim=-1).transpose(1, 2)


def check_norm_state_follows_its_token(cache_cls, rows, ids, mask, continuation, budget, n_sink, window):
    """Layer 0 keeps, after every forward, exactly the tokens the rule picks from norms computed from the token
    ids alone (long prefills compact the slots, decoding reuses freed slots: a norm left behind in its old slot
    changes the choice). Returns whether the slots were compacted. Tokens must be distinct within a row."""
    cache = cache_cls(MODEL, budget=budget, n_sink=n_sink, window=window)
    _, kept = teacher_forced(MODEL, cache, ids, mask, continuation)
    sequences = torch.cat([ids, continuation, continuation[:, :1]], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(continuation), mask[:, :1]], dim=1)
    norms = _layer0_key_norms(MODEL, sequences[:, :-1]).unsqueeze(0)
    expected = _expected_kept(norms, full_mask[:, :-1], ids.shape[1], budget, n_sink, window)
    for step, (got, want) in enumerate(zip(kept, expected)):
        assert got[0] == want[0], f"forward {step}"
    return cache.layers[0].capacity < ids.shape[1]


class _OneTooMany(KnormCache):
    def select(self, layer):
        self.budget += 1
        try:
            return super().select(layer)
        finally:
            self.budget -= 1


class _SinksCountPads(KnormCache):
    """Planted bug: protects the first n_sink SLOTS (pads included) instead of the first real tokens."""

    def select(self, layer):
        keep = super().select(layer)
        slot = torch.arange(layer.used).expand_as(layer.valid)
        over = layer.valid.sum(-1, keepdim=True) > self.budget
        return keep | (layer.valid & (slot < self.n_sink + 1) & over)


class _DropsHighestAlways(KnormCache):
    """Planted bug: always drops the highest-norm token of a row holding more than one, even under budget."""

    def select(self, layer):
        keep = super().select(layer)
        norms = self.key_norms(layer).masked_fill(~layer.valid, float("-inf"))
        top = norms == norms.amax(dim=-1, keepdim=True)
        return keep & ~(top & (layer.valid.sum(-1, keepdim=True) > 1))


class _NormsBySlotIndex(KnormCache):
    """Planted bug: keeps norms in a plain per-layer tensor indexed by slot, which compaction does not move."""

    def key_norms(self, layer):
        table = self.__dict__.setdefault("_table", {})
        keys = layer.keys[:, :, : layer.used]
        old = table.get(layer.layer_idx, keys.new_zeros(*keys.shape[:2], 0))
        if old.shape[-1] < layer.used:
            old = torch.cat([old, old.new_zeros(*old.shape[:2], layer.used - old.shape[-1])], dim=-1)
        new = layer.new_slot_mask().expand(-1, keys.shape[1], -1)
        table[layer.layer_idx] = torch.where(new, keys.norm(dim=-1), old[..., : layer.used])
        return table[layer.layer_idx]


@PROPERTY_SETTINGS
@given(batches())
def test_budget_is_never_exceeded(example):
    check_budget(KnormCache, *example)


@PROPERTY_SETTINGS
@given(batches())
def test_batch_rows_are_independent(example):
    check_rows_independent(KnormCache, *example)


@PROPERTY_SETTINGS
@given(batches())
@example(([[47]], torch.tensor([[47]]), torch.tensor([[1]]), torch.tensor([[127]]), 4, 1, 2))
def test_budget_covering_everything_is_full_cache(example):
    check_large_budget_is_full_cache(KnormCache, *example)


@PROPERTY_SETTINGS
@given(batches(min_len=20, max_len=40))
def test_norm_state_follows_its_token_through_compaction(example):
    check_norm_state_follows_its_token(KnormCache, *example)


def _planted_example(long=False):
    rows = [list(range(50, 90)) if long else [5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23]]
    ids, mask = left_padded(rows)
    return rows, ids, mask, torch.tensor([[30, 31, 32, 33, 34, 35], [40, 41, 42, 43, 44, 45]]), 3, 1, 0


@pytest.mark.parametrize(
    "checker, planted, long",
    [
        (check_budget, _OneTooMany, False),
        (check_rows_independent, _SinksCountPads, False),
        (check_large_budget_is_full_cache, _DropsHighestAlways, False),
        (check_norm_state_follows_its_token, _NormsBySlotIndex, True),
    ],
)
def test_properties_catch_planted_bugs(checker, planted, long):
    assert checker(KnormCache, *_planted_example(long)) in (None, True)  # the real strategy passes
    with pytest.raises(AssertionError):
        checker(planted, *_planted_example(long))


def test_planted_example_compacts():
    assert check_norm_state_follows_its_token(KnormCache, *_planted_example(long=True))


# --- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget": 0}, "budget must be an integer >= 1"),
        ({"budget": 4.0}, "budget must be an integer"),
        ({"budget": True}, "budget must be an integer"),
        ({"n_sink": -1}, "n_sink must be an integer >= 0"),
        ({"window": "2"}, "window must be an integer"),
        ({"budget": 4, "n_sink": 2, "window": 3}, r"budget \(4\) must be at least n_sink \+ window"),
        ({"positions": "cache"}, "positions='original'"),
    ],
)
def test_bad_input_names_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KnormCache(MODEL, **kwargs)


def test_for_budget_and_registry():
    cache = registry.get("knorm").for_budget(MODEL, None, 7)
    assert isinstance(cache, KnormCache) and (cache.budget, cache.n_sink, cache.window) == (7, 0, 0)
    with pytest.raises(ValueError, match="budget"):
        KnormCache.for_budget(MODEL, None, 0)
