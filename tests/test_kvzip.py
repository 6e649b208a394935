"""KVzipCache: the kept set is KVzip's choice (scores recomputed in float64 from transformers' eager attention over
the same visible keys, reconstruction forwards rebuilt independently), at the prefill, while decoding and at a later
multi-token forward; exactness on padded GQA Llama, Gemma 3 (sliding layers) and Qwen2; hypothesis invariants with
planted-bug twins; compress once and answer from clones; bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_snapkv import reference_probs, snapshot

from kvcompress import FullCache, KVzipCache, capture, registry
from kvcompress.cache import cache_arg
from kvcompress.strategies import kvzip
from kvcompress.testing import (
    CharTokenizer,
    left_padded,
    max_step_error,
    tiny_gemma3,
    tiny_llama,
    tiny_qwen2,
    visibility_from_records,
)

MODEL = tiny_llama(seed=5)
MODEL64 = tiny_llama(seed=5).double()  # the choice tests: no near-ties between the core's and eager's scores
PROPERTY_SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXACT = 1e-4


class CharTokenizer:
    """One token per character (ids 3..122); no chat template, so the repeat suffix is "\\n"."""

    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(c) % 120 for c in text]


TOKENIZER = CharTokenizer()


def make(model, **options):
    return KVzipCache(model, TOKENIZER, **options)


# --- driving a cache -------------------------------------------------------------------------------------------------
def drive(model, cache, ids, mask, continuation, question, after_prefill=None):
    """Prefill `ids` (B, P) (left-padded), feed `continuation` (B, T) one token per forward, then `question` (B, Q)
    as one forward, then the question's first token again as one more decode step, at the position ids `generate`
    uses. Returns the last logits of every forward (B, F, V), the kept sets after every forward (`snapshot`), the
    capture records and each forward's (start, stop) stream positions."""
    logits, kept, forwards = [], [], []
    fed_mask = mask
    pieces = [ids] + [continuation[:, t : t + 1] for t in range(continuation.shape[1])] + [question, question[:, :1]]
    start = 0
    with capture() as records, torch.no_grad():
        for piece in pieces:
            if start:
                fed_mask = torch.cat([fed_mask, torch.ones_like(piece)], dim=1)
            positions = (fed_mask.long().cumsum(-1) - 1).masked_fill(fed_mask == 0, 1)[:, start:]
            out = model(piece, attention_mask=fed_mask, position_ids=positions, **cache_arg(cache))
            logits.append(out.logits[:, -1])
            kept.append(snapshot(cache))
            forwards.append((start, start + piece.shape[1]))
            if not start and after_prefill is not None:
                after_prefill(cache)
            start += piece.shape[1]
    return torch.stack(logits, 1), kept, records, forwards


# --- the independent reference ---------------------------------------------------------------------------------------
def repeat_sequences(tokens: list[int], chunk: int, overlap: int) -> list[list[int]]:
    """KVzip's reconstruction inputs for one row's unscored token ids (kvpress's prompts, written out here)."""
    first = TOKENIZER.encode("\n\nRepeat the previous context exactly.")
    following = TOKENIZER.encode("\n\nRepeat the part of the previous context exactly, starting with")
    out = []
    for i in range(0, len(tokens), chunk):
        prompt = first if i == 0 else following + tokens[max(0, i - overlap) : i]
        out.append(prompt + TOKENIZER.encode("\n") + tokens[i : i + chunk])
    return out


def _value_norms(model, fed, fed_mask, visible):
    """Per layer, (B, Hkv, N) L2 norm of every token's value vector in a cache-free eager forward."""
    config = model.config
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    dim = getattr(config, "head_dim", None) or dim
    norms = {}
    hooks = [layer.self_attn.v_proj.register_forward_hook(
        lambda mod, args, out, i=i: norms.__setitem__(i, out.view(*out.shape[:2], heads, dim).norm(dim=-1)))
        for i, layer in enumerate(model.model.layers)]
    try:
        reference_probs(model, fed, fed_mask, visible)
    finally:
        for hook in hooks:
            hook.remove()
    return [norms[i].transpose(1, 2) for i in range(len(norms))]


def reference_scores(model, cache, fed, fed_mask, records, held, scored_from, seen, known):
    """KVzip scores of one cut, recomputed: scores[l][b][g] = {position: score} for every held token (held[l][g][b]:
    what the layer holds before the cut): the largest attention it received from a reconstruction query of this cut
    or (`known`, tokens scored by earlier cuts) of an earlier one. The tokens at positions >= `scored_from` are
    reconstructed, from one eager float64 forward per chunk of
    [everything fed so far, reconstruction chunk], whose fed rows see what the cache showed them (`records`) and whose
    reconstruction rows see the held tokens (within a sliding layer's window) plus the chunk's own earlier tokens.
    normalize="chunk" (the paper's chunked scoring): each reconstruction query's probabilities are divided by their
    sum over the row's first `n_sink` held tokens, the chunk's tokens and the reconstruction's own tokens, and only
    those keys take a score from it. `scored_from[b]` is None for a row that is not cut (nothing reconstructed)."""
    config = model.config
    layers, heads, batch = config.num_hidden_layers, config.num_key_value_heads, fed.shape[0]
    groups = config.num_attention_heads // heads
    types = getattr(config, "layer_types", None) or ["full_attention"] * layers
    fresh = [[] if scored_from[b] is None else sorted(p for p in held[0][0][b] if p >= scored_from[b])
             for b in range(batch)]
    sequences = [repeat_sequences(fed[b, fresh[b]].tolist(), cache.chunk, cache.overlap) for b in range(batch)]
    scores = [[[{p: known[layer][b][g].get(p, 0.0) for p in held[layer][g][b]} for g in range(heads)]
               for b in range(batch)] for layer in range(layers)]
    past = visibility_from_records(records, batch, seen)
    if past.dim() == 4:
        past = past.unsqueeze(2).expand(-1, -1, heads, -1, -1)
    norms = None
    for index in range(max(len(s) for s in sequences)):
        chunk = [s[index] if index < len(s) else [] for s in sequences]
        width = max(len(c) for c in chunk)
        rec = torch.zeros(batch, width, dtype=torch.long)
        rec_mask = torch.zeros(batch, width, dtype=torch.long)
        for b, c in enumerate(chunk):
            if c:
                rec[b, width - len(c):], rec_mask[b, width - len(c):] = torch.tensor(c), 1
        ids = torch.cat([fed[:, :seen], rec], dim=1)
        mask = torch.cat([fed_mask[:, :seen], rec_mask], dim=1)
        n = seen + width
        visible = torch.zeros(layers, batch, heads, n, n, dtype=torch.bool)
        visible[..., :seen, :seen] = past
        for layer in range(layers):
            window = config.sliding_window if types[layer] == "sliding_attention" else n
            for b in range(batch):
                real = [seen + j for j in range(width) if rec_mask[b, j]]
                for g in range(heads):
                    for i in real:
                        keys = [p for p in held[layer][g][b] if i - p < window]
                        keys += [j for j in real if j <= i and i - j < window]
                        visible[layer, b, g, i, keys] = True
        probs = reference_probs(model, ids, mask, visible)
        if cache.normalize == "chunk":
            for b in range(batch):
                scope = torch.zeros(n, dtype=torch.bool)
                scope[sorted(held[0][0][b])[: cache.n_sink]] = True
                scope[fresh[b][index * cache.chunk : (index + 1) * cache.chunk]] = True
                scope[seen:] = True
                for layer in range(layers):
                    inside = probs[layer][b] * scope
                    probs[layer][b] = inside / inside.sum(dim=-1, keepdim=True).clamp_min(1e-300)
        if cache.value_norm and norms is None:
            norms = _value_norms(model, ids, mask, visible)
        for layer in range(layers):
            for b in range(batch):
                queries = [seen + j for j in range(width) if rec_mask[b, j]]
                if not queries:
                    continue
                for g in range(heads):
                    tokens = sorted(held[layer][g][b])
                    block = probs[layer][b, g * groups : (g + 1) * groups][:, queries][:, :, tokens]
                    best = block.amax(dim=(0, 1))
                    for p, value in zip(tokens, best.tolist()):
                        scores[layer][b][g][p] = max(scores[layer][b][g][p], value)
    return scores, norms


def check_cut(cache, held, kept_after, scores, cut):
    """For each row b with cut[b], `kept_after[l][g][b]` is a top choice of `held` by `scores`: the first `n_sink`
    real tokens, then the best others, `budget` per layer / kv head (layer) or `budget x layers x heads` per row
    (global); every kept score >= every dropped score (ties may go either way)."""
    layers, heads, batch = len(held), len(held[0]), len(held[0][0])
    for b in (b for b in range(batch) if cut[b]):
        entries = []  # (score, layer, head, position)
        for layer in range(layers):
            for g in range(heads):
                tokens = sorted(held[layer][g][b])
                sinks = set(tokens[: cache.n_sink])
                for p in tokens:
                    entries.append((float("inf") if p in sinks else scores[layer][b][g][p], layer, g, p))
        groups = [entries] if cache.allocation == "global" else \
            [[e for e in entries if (e[1], e[2]) == key] for key in {(e[1], e[2]) for e in entries}]
        quota = cache.budget * (layers * heads if cache.allocation == "global" else 1)
        for group in groups:
            kept = [e for e in group if e[3] in kept_after[e[1]][e[2]][b]]
            dropped = [e for e in group if e[3] not in kept_after[e[1]][e[2]][b]]
            assert len(kept) == min(quota, len(group)), (b, len(kept), quota, len(group))
            if kept and dropped:
                worst, best = min(e[0] for e in kept), max(e[0] for e in dropped)
                assert worst >= best - 1e-9 * max(1.0, abs(best)), (b, worst, best)


def due_for_a_cut(new: list[int], held: list[int], scored_from: int, cut_before: bool, slack: int) -> bool:
    """KVzip's rule, written out: a row is cut after its first forward of more than one token (its context), then
    whenever it holds more than `slack` tokens not scored by a cut (positions >= `scored_from`)."""
    return (len(new) > 1 and not cut_before) or sum(p >= scored_from for p in held) > slack


def check_choice(model, cache, rows, continuation, question, after_prefill=None):
    """Every kept set of `drive` (prefill, decode steps, question) equals KVzip's choice: a cut where
    `due_for_a_cut` says so, else nothing evicted (the forward's tokens join every layer and head)."""
    ids, mask = left_padded(rows)
    _, kept, records, forwards = drive(model, cache, ids, mask, continuation, question, after_prefill)
    fed = torch.cat([ids, continuation, question, question[:, :1]], dim=1)
    fed_mask = torch.cat([mask, torch.ones_like(continuation), torch.ones_like(question), mask[:, :1] * 0 + 1], dim=1)
    layers, heads, batch = len(kept[0]), len(kept[0][0]), fed.shape[0]
    known = [[[{} for _ in range(heads)] for _ in range(batch)] for _ in range(layers)]  # attention scores so far
    norms = None  # value norms (KVzip+), per layer (B, Hkv, N)
    scored_from, cut_before, previous = [0] * batch, [False] * batch, None
    for f, (start, stop) in enumerate(forwards):
        new = [[p for p in range(start, stop) if fed_mask[b, p]] for b in range(batch)]
        held = [[[sorted(set(previous[layer][g][b] if previous else []) | set(new[b])) for b in range(batch)]
                 for g in range(heads)] for layer in range(layers)]
        cut = [due_for_a_cut(new[b], held[0][0][b], scored_from[b], cut_before[b], cache.slack) for b in range(batch)]
        for b in range(batch):
            if not cut[b]:
                assert all(kept[f][layer][g][b] == held[layer][g][b] for layer in range(layers) for g in range(heads)), \
                    f"forward {f} evicted from row {b}, which was not due for a cut"
        if any(cut):
            forward_records = [r for r in records if r["q_offset"] < stop]
            rows_from = [scored_from[b] if cut[b] else None for b in range(batch)]
            known, norms_now = reference_scores(model, cache, fed, fed_mask, forward_records, held, rows_from, stop,
                                                known)
            norms = norms_now if norms_now is not None else norms
            final = known
            if cache.value_norm:  # KVzip+: the attention score times the value's norm
                final = [[[{p: v * float(norms[layer][b, g, p]) for p, v in known[layer][b][g].items()}
                           for g in range(heads)] for b in range(batch)] for layer in range(layers)]
            check_cut(cache, held, kept[f], final, cut)
            scored_from = [stop if cut[b] else scored_from[b] for b in range(batch)]
            cut_before = [cut_before[b] or cut[b] for b in range(batch)]
        previous = kept[f]


ROWS = [[5, 9, 17, 33, 6, 70, 12, 91, 44, 8, 63, 21, 50, 7, 29], [40, 11, 73, 18, 96, 25, 60, 14, 81]]
CONTINUATION = torch.tensor([[31, 32, 33], [41, 42, 43]])
QUESTION = torch.tensor([[100, 101, 102, 103, 104], [110, 111, 112, 113, 114]])


@pytest.mark.parametrize("options", [
    dict(budget=5, chunk=6, n_sink=1, slack=0),  # cuts after every forward
    dict(budget=4, chunk=64, n_sink=2, value_norm=True, slack=2),  # the third decode step and the question cut
    dict(budget=5, chunk=7, n_sink=1, overlap=3, allocation="global", slack=4),  # the question cuts
    dict(budget=5, chunk=6, n_sink=1),  # the default slack: the prefill alone cuts
    dict(budget=5, chunk=6, n_sink=2, normalize="chunk", slack=2),  # the paper's chunked scoring
    dict(budget=4, chunk=4, n_sink=1, overlap=2, normalize="chunk", allocation="global", slack=3),
])
def test_kept_set_is_kvzips_choice_at_prefill_decoding_and_a_later_forward(options):
    check_choice(MODEL64, make(MODEL64, **options), ROWS, CONTINUATION, QUESTION)


def test_kept_set_is_kvzips_choice_on_sliding_window_layers():
    model = tiny_gemma3(seed=2).double()  # sliding window 8 < the 15-token prompt: reconstruction sees only the tail
    for allocation in ("layer", "global"):
        check_choice(model, make(model, budget=5, chunk=6, n_sink=1, allocation=allocation, slack=2), ROWS,
                     CONTINUATION, QUESTION)


class _SummedOverQueries(KVzipCache):
    """Planted: accumulates the SUM of the attention over the reconstruction queries (H2O's score) instead of the
    max."""

    observe_received = True

    def evict(self, layer):
        if self._reconstructing is not None:
            layer.observation.max_received = layer.observation.received
        super().evict(layer)


class _MeanOverGroup(KVzipCache):
    """Planted: averages over the kv group's query heads instead of taking their max."""

    def evict(self, layer):
        if self._reconstructing is not None:
            obs = layer.observation
            groups = obs.max_received.shape[1] // layer.keys.shape[1]
            obs.max_received = obs.max_received.view(obs.max_received.shape[0], -1, groups, obs.max_received.shape[-1]
                                                     ).mean(dim=2, keepdim=True).expand(-1, -1, groups, -1).flatten(1, 2)
        super().evict(layer)


class _ChunkScopeIgnored(KVzipCache):
    """Planted: normalize="chunk" scoring with the model's own softmax over every key (the default's)."""

    def max_received_scope(self, kv_positions):
        return None


class _ChunkScopeWithoutSinks(KVzipCache):
    """Planted: normalize="chunk" renormalising over the chunk and the repeat tokens, without the sinks."""

    def _chunk_scope(self, fresh, index):
        sink_end, start, end = super()._chunk_scope(fresh, index)
        return torch.zeros_like(sink_end), start, end


class _NoRepeatPrompt(KVzipCache):
    """Planted: re-feeds the context without the repeat instruction."""

    def _repeat_sequence(self, row, index):
        return row[index * self.chunk : (index + 1) * self.chunk].tolist()


def poison_free_slots(cache):
    """Write a huge score into every free slot's state, as a pair evicted from it could have left."""
    for layer in cache.layers:
        score = cache._scores(layer)
        score.masked_fill_((layer.positions < 0).expand_as(score), 1e9)
        layer.slot_state(kvzip.STATE)[..., layer.used :] = 1e9


def test_a_reused_slot_starts_from_a_zero_score():
    """Slots freed by a cut are refilled by generated tokens: their scores start from 0, whatever the slot held."""
    check_choice(MODEL64, make(MODEL64, budget=5, chunk=6, n_sink=1, slack=3), ROWS, CONTINUATION, QUESTION,
                 after_prefill=poison_free_slots)
    with pytest.raises(AssertionError):
        check_choice(MODEL64, _StaleScores(MODEL64, TOKENIZER, budget=5, chunk=6, n_sink=1, slack=3), ROWS,
                     CONTINUATION, QUESTION, after_prefill=poison_free_slots)


class _StaleScores(KVzipCache):
    """Planted: a reused slot starts from the score of the pair evicted from it."""

    def _reconstruct(self, model, rows):
        tokens = self._unscored_tokens(self._unscored_positions(rows))
        start = self.get_seq_length()
        for index in range(max((len(r) + self.chunk - 1) // self.chunk for r in tokens)):
            self._reconstruct_chunk(model, [self._repeat_sequence(row, index) for row in tokens], start)


class _GlobalCutPerLayer(KVzipCache):
    """Planted: allocation="global" cut per layer (the same count in every layer)."""

    def _cut(self, rows):
        allocation, self.allocation = self.allocation, "layer"
        try:
            super()._cut(rows)
        finally:
            self.allocation = allocation


class _IgnoresSlack(KVzipCache):
    """Planted: never cuts again after the context (generated tokens and questions pile up past `slack`)."""

    def prepare_deferred(self):
        slack, self.slack = self.slack, 10**9
        try:
            super().prepare_deferred()
        finally:
            self.slack = slack


class _CutsEveryMultiTokenForward(KVzipCache):
    """Planted: the earlier rule: a question cuts the cache back to the budget however short it is."""

    def prepare_deferred(self):
        slack = self.slack
        if self.layers[0].new_tokens > 1:
            self.slack = 1
        try:
            super().prepare_deferred()
        finally:
            self.slack = slack


@pytest.mark.parametrize("planted, options", [
    (_IgnoresSlack, dict(budget=5, chunk=6, n_sink=1, slack=2)),
    (_CutsEveryMultiTokenForward, dict(budget=5, chunk=6, n_sink=1)),
    (_SummedOverQueries, dict(budget=5, chunk=6, n_sink=1)),
    (_MeanOverGroup, dict(budget=5, chunk=6, n_sink=1)),
    (_NoRepeatPrompt, dict(budget=5, chunk=6, n_sink=1)),
    (_ChunkScopeIgnored, dict(budget=5, chunk=6, n_sink=2, normalize="chunk")),
    (_ChunkScopeWithoutSinks, dict(budget=6, chunk=6, n_sink=2, normalize="chunk")),
    (_GlobalCutPerLayer, dict(budget=5, chunk=7, n_sink=1, allocation="global")),
])
def test_choice_check_catches_planted_bugs(planted, options):
    with pytest.raises(AssertionError):
        check_choice(MODEL64, planted(MODEL64, TOKENIZER, **options), ROWS, CONTINUATION, QUESTION)


# --- exact attention ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("allocation", ["layer", "global"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3, tiny_qwen2], ids=["llama", "gemma3", "qwen2"])
def test_each_step_equals_explicit_mask_forward(build, allocation):
    model = build(seed=1)
    ids, mask = left_padded(ROWS)
    cache = make(model, budget=5, chunk=6, allocation=allocation)
    error, visible, _ = max_step_error(model, cache, ids, mask, max_new_tokens=5)
    assert error < EXACT
    assert cache.get_seq_length() == ids.shape[1] + 4  # the reconstruction forwards left no trace
    assert visible.dim() == 4  # kv heads kept different pairs


# --- hypothesis properties, each with a planted-bug twin ------------------------------------------------------------
@st.composite
def batches(draw):
    lengths = draw(st.lists(st.integers(1, 14), min_size=1, max_size=3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    rows = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
    continuation = torch.randint(3, 128, (len(rows), draw(st.integers(1, 4))), generator=g)
    question = torch.randint(3, 128, (len(rows), draw(st.integers(2, 5))), generator=g)
    options = dict(budget=draw(st.integers(1, 8)), chunk=draw(st.integers(1, 9)), n_sink=draw(st.integers(0, 2)),
                   allocation=draw(st.sampled_from(["layer", "global"])), slack=draw(st.integers(0, 6)))
    return rows, continuation, question, options


def check_budget(cache_cls, rows, continuation, question, options):
    """After a cut (`due_for_a_cut`) each layer and kv head (layer) or each row over all layers and heads (global)
    holds at most its budget; any other forward adds exactly its tokens and evicts nothing; so the cache never holds
    more than budget + slack (per layer and head, or on average)."""
    ids, mask = left_padded(rows)
    cache = cache_cls(MODEL, TOKENIZER, **options)
    _, kept, _, forwards = drive(MODEL, cache, ids, mask, continuation, question)
    fed_mask = torch.cat([mask, torch.ones(len(rows), forwards[-1][1] - ids.shape[1], dtype=mask.dtype)], dim=1)
    layers, heads = len(kept[0]), len(kept[0][0])
    scored_from, cut_before = [0] * len(rows), [False] * len(rows)
    for f, (start, stop) in enumerate(forwards):
        for b in range(len(rows)):
            counts = [len(kept[f][layer][g][b]) for layer in range(layers) for g in range(heads)]
            before = [kept[f - 1][layer][g][b] if f else [] for layer in range(layers) for g in range(heads)]
            new = [p for p in range(start, stop) if fed_mask[b, p]]
            budget = options["budget"]
            if due_for_a_cut(new, sorted(set(before[0]) | set(new)), scored_from[b], cut_before[b], options["slack"]):
                scored_from[b], cut_before[b] = stop, True
            else:
                assert all(set(new) <= set(k) for k in (kept[f][layer][g][b] for layer in range(layers)
                                                          for g in range(heads))), (f, b)
                assert counts == [len(k) + len(new) for k in before], (f, b, counts)
                budget += options["slack"]
            if options["allocation"] == "global":
                assert sum(counts) <= budget * layers * heads, (f, b, counts)
            else:
                assert max(counts) <= budget, (f, b, counts)


def check_large_budget_is_full_cache(cache_cls, rows, continuation, question, options):
    """With a budget covering every token, logits equal FullCache's: reconstruction leaves the context's KV intact."""
    ids, mask = left_padded(rows)
    options = {**options, "budget": ids.shape[1] + continuation.shape[1] + question.shape[1]}
    got = drive(MODEL, cache_cls(MODEL, TOKENIZER, **options), ids, mask, continuation, question)[0]
    expected = drive(MODEL, FullCache(MODEL), ids, mask, continuation, question)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def check_rows_independent(cache_cls, rows, continuation, question, options):
    """A row's logits and kept sets in a padded batch equal those of the row run alone (layer allocation; global
    allocation is per row too)."""
    ids, mask = left_padded(rows)
    batch_logits, batch_kept, _, _ = drive(MODEL, cache_cls(MODEL, TOKENIZER, **options), ids, mask, continuation,
                                           question)
    for b, row in enumerate(rows):
        pad = ids.shape[1] - len(row)
        alone = torch.tensor([row])
        logits, kept, _, _ = drive(MODEL, cache_cls(MODEL, TOKENIZER, **options), alone, torch.ones_like(alone),
                                   continuation[b : b + 1], question[b : b + 1])
        torch.testing.assert_close(batch_logits[b], logits[0], atol=1e-5, rtol=0)
        for f in range(len(kept)):
            for layer in range(len(kept[f])):
                for g in range(len(kept[f][layer])):
                    assert [p - pad for p in batch_kept[f][layer][g][b]] == kept[f][layer][g][0], (b, f, layer, g)


class _OneOverBudget(KVzipCache):
    def _cut(self, rows):
        self.budget += 1
        try:
            super()._cut(rows)
        finally:
            self.budget -= 1


class _OneUnderBudget(KVzipCache):
    def _cut(self, rows):
        self.budget -= 1
        try:
            super()._cut(rows)
        finally:
            self.budget += 1


class _PadsReconstruct(KVzipCache):
    """Planted: a shorter row's padding is fed as real tokens in the reconstruction forward."""

    def _reconstruct_chunk(self, model, sequences, start):
        width = max(len(s) for s in sequences)
        super()._reconstruct_chunk(model, [[3] * (width - len(s)) + s for s in sequences], start)


def planted_example():
    return ROWS, CONTINUATION, QUESTION, dict(budget=4, chunk=5, n_sink=1, allocation="layer", slack=2)


@PROPERTY_SETTINGS
@given(batches())
def test_budget_holds_after_each_cut_and_other_forwards_keep_their_tokens(example):
    check_budget(KVzipCache, *example)


@PROPERTY_SETTINGS
@given(batches())
def test_budget_covering_everything_is_full_cache(example):
    check_large_budget_is_full_cache(KVzipCache, *example)


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_batch_rows_are_independent(example):
    check_rows_independent(KVzipCache, *example)


@pytest.mark.parametrize("checker, planted", [
    (check_budget, _OneOverBudget),
    (check_large_budget_is_full_cache, _OneUnderBudget),
    (check_rows_independent, _PadsReconstruct),
])
def test_properties_catch_planted_bugs(checker, planted):
    checker(KVzipCache, *planted_example())
    with pytest.raises(AssertionError):
        checker(planted, *planted_example())


# --- compress once, ask many ------------------------------------------------------------------------------------------
def test_clones_of_one_compressed_context_answer_like_fresh_compressions():
    """A context compressed once answers several questions from clones exactly as a fresh compression of the same
    context would, and the compressed original is untouched by its clones."""
    context = torch.tensor([ROWS[0]])
    questions = [torch.tensor([[100, 101, 102, 103]]), torch.tensor([[7, 8, 9]])]
    compressed = make(MODEL, budget=5, chunk=6)
    with torch.no_grad():
        MODEL(context, **cache_arg(compressed))
        before = snapshot(compressed)
        for question in questions:
            clone = compressed.clone()
            ids = torch.cat([context, question], dim=1)
            got = MODEL.generate(ids, **cache_arg(clone), max_new_tokens=4, do_sample=False, pad_token_id=0)
            fresh = make(MODEL, budget=5, chunk=6)
            MODEL(context, **cache_arg(fresh))
            expected = MODEL.generate(ids, **cache_arg(fresh), max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(got, expected)
            assert snapshot(clone) == snapshot(fresh)
        assert snapshot(compressed) == before and compressed.get_seq_length() == context.shape[1]


# --- construction and bad input ------------------------------------------------------------------------------------------
def test_registered_with_budget_and_defaults():
    cache = KVzipCache.for_budget(MODEL, TOKENIZER, 64)
    assert registry.get("kvzip") is KVzipCache and cache.uses_budget
    assert (cache.budget, cache.allocation, cache.chunk, cache.n_sink, cache.value_norm) == (64, "global", 2048, 4, False)
    assert cache.storage_layout() == "paged" and KVzipCache(MODEL, TOKENIZER, allocation="layer").storage_layout() == "dense"


@pytest.mark.parametrize("options, error, message", [
    (dict(chunk=0), ValueError, r"chunk must be an integer >= 1, got 0"),
    (dict(chunk=-3), ValueError, r"chunk must be an integer >= 1, got -3"),
    (dict(allocation="foo"), ValueError, r"allocation must be one of \('layer', 'global'\), got 'foo'"),
    (dict(normalize="softmax"), ValueError, r"normalize must be one of \('context', 'chunk'\), got 'softmax'"),
    (dict(budget=0), ValueError, r"budget must be an integer >= 1, got 0"),
    (dict(value_norm=1), TypeError, r"value_norm must be True or False"),
    (dict(positions="cache"), ValueError, r"kvzip does not support positions='cache'"),
])
def test_bad_input_names_the_parameter(options, error, message):
    with pytest.raises(error, match=message):
        make(MODEL, **options)


def test_tokenizer_is_required():
    with pytest.raises(ValueError, match="tokenizer"):
        KVzipCache(MODEL)


def test_budget_larger_than_the_context_keeps_everything():
    ids = torch.tensor([ROWS[1]])
    cache = make(MODEL, budget=100)
    with torch.no_grad():
        MODEL(ids, **cache_arg(cache))
    assert cache.kept_counts()[:, 0].tolist() == [ids.shape[1]] * 3


def test_empty_context_is_a_clear_error():
    with pytest.raises(ValueError, match="empty input"):
        MODEL(torch.zeros(1, 0, dtype=torch.long), **cache_arg(make(MODEL)))


def test_a_row_that_is_all_padding():
    """An all-pad row has nothing to reconstruct; the other row is compressed exactly as alone."""
    ids, mask = left_padded([ROWS[0], [1]])
    mask[1] = 0
    cache = make(MODEL, budget=4, chunk=6)
    alone = make(MODEL, budget=4, chunk=6)
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        MODEL(ids, attention_mask=mask, position_ids=positions, **cache_arg(cache))
        MODEL(torch.tensor([ROWS[0]]), **cache_arg(alone))
    assert snapshot(cache)[0][0][0] == snapshot(alone)[0][0][0]
    assert all(not row for layer in snapshot(cache) for head in layer for row in head[1:])


def test_reconstruction_inputs_follow_kvpress():
    cache = make(MODEL, chunk=4, overlap=2)
    row = torch.arange(10, 20)
    assert cache._repeat_sequence(row, 0) == TOKENIZER.encode(kvzip.REPEAT_FIRST + "\n") + list(range(10, 14))
    assert cache._repeat_sequence(row, 2) == TOKENIZER.encode(kvzip.REPEAT_NEXT) + [16, 17] + \
        TOKENIZER.encode("\n") + [18, 19]
    assert cache._repeat_sequence(row, 3) == []
