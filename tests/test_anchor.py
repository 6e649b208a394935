"""AnchorCache (AnLLM): exactness against a masked full forward, kept set / count invariants (hypothesis, with
planted bugs), row independence, left padding, prefill chunks, EP/AC anchor helpers, bad input."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from kvcompress import registry
from kvcompress.anchor_tokens import add_anchor_token, anchor_token_id, format_with_anchor, sentence_end_ids
from kvcompress.strategies import AnchorCache, FullCache
from kvcompress.testing import left_padded, max_step_error, tiny_llama

MODEL = tiny_llama(seed=5)
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def char_tokenizer(extra=(").", ".\n", "e.g", '?"')):
    """A character-level fast tokenizer (pad 0, bos 1, eos 2) with a few merged tokens in its vocabulary."""
    chars = ["<pad>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)] + ["\n", *extra]
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def expected_kept(ids_row: list[int], real_row: list[bool], anchors: set[int], keep_first: int,
                  segments: int = 1) -> list[int]:
    """Stream positions a row keeps: its anchors, its real tokens after the last anchor (after the `segments`-th
    last), its first keep_first."""
    real = [p for p in range(len(ids_row)) if real_row[p]]
    anchor_positions = [p for p in real if ids_row[p] in anchors]
    last = anchor_positions[-segments] if len(anchor_positions) >= segments else -1
    return [p for p in real if p in anchor_positions or p > last or p in real[:keep_first]]


def teacher_forced(model, cache, ids, mask, chunks):
    """Feed (B, N) `ids` in forwards of the given sizes; return last logits per forward and layer-0 kept
    positions after each forward (also checking every layer keeps the same)."""
    logits, kept, start = [], [], 0
    with torch.no_grad():
        for size in chunks:
            end = start + size
            out = model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache)
            logits.append(out.logits[:, -1])
            per_layer = [cache.kept_positions(layer) for layer in range(len(cache.layers))]
            assert all(p == per_layer[0] for p in per_layer), "layers keep different tokens"
            kept.append((end, per_layer[0]))
            start = end
    return torch.stack(logits, 1), kept


@st.composite
def streams(draw):
    """Left-padded rows over a small id range (so anchors occur), anchor ids, forward sizes, keep_first."""
    lengths = draw(st.lists(st.integers(1, 10), min_size=1, max_size=3))
    extra = draw(st.integers(0, 10))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    rows = [torch.randint(3, 12, (n + extra,), generator=g).tolist() for n in lengths]
    prompt_len = max(lengths)
    prompts = [r[:n] for r, n in zip(rows, lengths)]
    ids, mask = left_padded(prompts)
    tail = torch.tensor([r[n:] for r, n in zip(rows, lengths)], dtype=torch.long).view(len(rows), extra)
    ids = torch.cat([ids, tail], 1)
    mask = torch.cat([mask, torch.ones_like(tail)], 1)
    sizes, left = [prompt_len], extra
    while left:
        size = draw(st.integers(1, left))
        sizes.append(size)
        left -= size
    anchors = draw(st.sets(st.integers(3, 11), min_size=1, max_size=3))
    return ids, mask, sizes, sorted(anchors), draw(st.integers(0, 3))


def check_kept(cache_cls, ids, mask, sizes, anchors, keep_first, segments=1):
    cache = cache_cls(MODEL, anchor_ids=anchors, keep_first=keep_first, keep_segments=segments)
    _, kept = teacher_forced(MODEL, cache, ids, mask, sizes)
    for end, rows in kept:
        counts = cache.kept_counts()  # after the last forward only; checked below for the final state
        for b, positions in enumerate(rows):
            expected = expected_kept(ids[b, :end].tolist(), mask[b, :end].bool().tolist(), set(anchors), keep_first,
                                     segments)
            assert positions == expected, (end, b, positions, expected)
    final = [len(expected_kept(ids[b].tolist(), mask[b].bool().tolist(), set(anchors), keep_first, segments))
             for b in range(ids.shape[0])]
    assert counts[0].tolist() == final and bool((counts == counts[:1]).all())


class _KeepsLastAnchorOnly(AnchorCache):  # planted bug: forgets earlier anchors
    def select(self, layer):
        keep = super().select(layer)
        anchor = self.is_anchor(layer.positions)
        last = torch.where(anchor, layer.positions, -1).amax(-1, keepdim=True)
        return keep & ~(anchor & (layer.positions < last))


class _BatchWideLastAnchor(AnchorCache):  # planted bug: one last anchor for the whole batch, not per row
    def select(self, layer):
        anchor = self.is_anchor(layer.positions) & layer.valid
        last = torch.where(anchor, layer.positions, -1).amax()
        rank = layer.valid.cumsum(-1) - 1
        return layer.valid & (anchor | (layer.positions > last) | (rank < self.keep_first))


@PROPERTY_SETTINGS
@given(streams())
def test_keeps_anchors_and_tokens_after_the_last_anchor(example):
    check_kept(AnchorCache, *example)


class _SegmentsFromTheFirstAnchors(AnchorCache):  # planted bug: counts segments from the oldest anchors
    def select(self, layer):
        anchor = self.is_anchor(layer.positions) & layer.valid
        first = torch.where(anchor, layer.positions, layer.positions.amax() + 1).sort(-1).values
        k = min(self.keep_segments, first.shape[-1]) - 1
        cut = torch.where(anchor.sum(-1, keepdim=True) >= self.keep_segments, first[..., k : k + 1], -1)
        rank = layer.valid.cumsum(-1) - 1
        return layer.valid & (anchor | (layer.positions > cut) | (rank < self.keep_first))


@PROPERTY_SETTINGS
@given(streams(), st.integers(1, 3))
def test_keep_segments_keeps_the_tokens_after_the_kth_last_anchor(example, segments):
    check_kept(AnchorCache, *example, segments=segments)


def test_keep_segments_check_catches_a_planted_bug():
    ids = torch.tensor([[3, 5, 4, 5, 6, 5, 7, 8]])
    mask = torch.ones_like(ids)
    check_kept(AnchorCache, ids, mask, [4, 2, 2], [5], 0, segments=2)
    with pytest.raises(AssertionError):
        check_kept(_SegmentsFromTheFirstAnchors, ids, mask, [4, 2, 2], [5], 0, segments=2)


@pytest.mark.parametrize("bug", [_KeepsLastAnchorOnly, _BatchWideLastAnchor])
def test_kept_check_catches_planted_bugs(bug):
    ids, mask = left_padded([[3, 5, 4, 5, 6, 7], [4, 8, 5]])
    ids = torch.cat([ids, torch.tensor([[5, 9], [6, 9]])], 1)
    mask = torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], 1)
    check_kept(AnchorCache, ids, mask, [6, 1, 1], [5], 0)
    with pytest.raises(AssertionError):
        check_kept(bug, ids, mask, [6, 1, 1], [5], 0)


@PROPERTY_SETTINGS
@given(streams())
def test_rows_are_independent(example):
    ids, mask, sizes, anchors, keep_first = example
    logits, kept = teacher_forced(MODEL, AnchorCache(MODEL, anchor_ids=anchors, keep_first=keep_first), ids, mask, sizes)
    for b in range(ids.shape[0]):
        pad = int((mask[b] == 0).sum())
        if pad >= sizes[0]:
            continue
        alone = ids[b : b + 1, pad:]
        row_sizes = [sizes[0] - pad, *sizes[1:]]
        alone_logits, alone_kept = teacher_forced(
            MODEL, AnchorCache(MODEL, anchor_ids=anchors, keep_first=keep_first), alone, torch.ones_like(alone), row_sizes
        )
        torch.testing.assert_close(logits[b], alone_logits[0], atol=1e-5, rtol=0)
        for (_, rows), (_, row) in zip(kept, alone_kept):
            assert [p - pad for p in rows[b]] == row[0]


def _generated_anchor_ids(ids, mask, steps=8):
    """Ids that greedy decoding of MODEL produces (so anchors occur during generation, not only in the prompt)."""
    out = MODEL.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    new = out[:, ids.shape[1] :]
    return sorted({int(new[0, 1]), int(new[-1, 3])})


@pytest.mark.parametrize("keep_first", [0, 2])
@pytest.mark.parametrize("chunk", [None, 3])
def test_generation_is_exact_against_masked_full_forward(keep_first, chunk):
    """Every step's logits equal one cache-free forward whose mask shows each query what the cache kept, with
    left padding, a batch of 3, anchors both in the prompt and generated, optional prefill chunks."""
    rows = [[5, 17, 9, 3, 40, 41, 42, 9, 50], [60, 9, 61, 62], [70, 71, 72, 73, 74, 75]]
    ids, mask = left_padded(rows)
    anchors = sorted({9, *_generated_anchor_ids(ids, mask)})
    cache = AnchorCache(MODEL, anchor_ids=anchors, keep_first=keep_first)
    kwargs = {"prefill_chunk_size": chunk} if chunk else {}
    error, visible, sequences = max_step_error(MODEL, cache, ids, mask, max_new_tokens=10, **kwargs)
    assert error < 1e-5
    fed = sequences[:, :-1]
    n = fed.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    real = torch.cat([mask, torch.ones(3, n - mask.shape[1], dtype=torch.long)], 1).bool()
    assert (visible != (causal & real[:, None, :] & real[:, :, None])).any(), "nothing was ever evicted"
    full_mask = torch.cat([mask, torch.ones(3, sequences.shape[1] - mask.shape[1], dtype=torch.long)], 1)
    for b in range(3):
        expected = expected_kept(fed[b].tolist(), full_mask[b, :-1].bool().tolist(), set(anchors), keep_first)
        assert cache.kept_positions()[b] == expected
        generated_anchor = torch.isin(sequences[b, mask.shape[1] : -1], torch.tensor(anchors)).any()
        assert generated_anchor or b > 0  # row 0 generates an anchor (chosen so above)


def test_no_anchor_is_full_cache():
    ids, mask = left_padded([[20, 21, 22, 23], [30, 31]])
    got, _ = teacher_forced(MODEL, AnchorCache(MODEL, anchor_ids=[127]), ids, mask, [4])
    expected, _ = teacher_forced(MODEL, FullCache(MODEL), ids, mask, [4])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_ep_default_anchor_ids_from_tokenizer():
    tokenizer = char_tokenizer()
    decoded = {tokenizer.decode([i]) for i in sentence_end_ids(tokenizer)}
    assert decoded == {".", "?", "!", "\n", ").", ".\n"}  # not 'e.g' (ends in g) nor '?"' (ends in a quote)
    assert {tokenizer.decode([i]) for i in sentence_end_ids(tokenizer, endings=(".",))} == {".", ")."}
    model = tiny_llama(vocab_size=len(tokenizer))
    cache = AnchorCache(model, tokenizer)
    assert set(cache.anchor_ids.tolist()) == set(sentence_end_ids(tokenizer))
    assert registry.get("anchor") is AnchorCache


def test_ac_mode_helpers():
    tokenizer = char_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="add_anchor_token"):
        AnchorCache(model, tokenizer, mode="ac")
    token_id = add_anchor_token(model, tokenizer, init="period")
    assert token_id == len(tokenizer) - 1 == model.get_input_embeddings().weight.shape[0] - 1
    period = tokenizer.convert_tokens_to_ids(".")
    weight = model.get_input_embeddings().weight
    torch.testing.assert_close(weight[token_id], weight[period])
    assert add_anchor_token(model, tokenizer) == token_id  # idempotent
    assert anchor_token_id(tokenizer) == token_id
    text = format_with_anchor("It is. Yes! Is it? 3.14 is pi.\nNo")
    assert text == "It is.<AC> Yes!<AC> Is it?<AC> 3.14 is pi.<AC>\nNo"
    ids = torch.tensor([tokenizer.encode(text)])
    assert int((ids == token_id).sum()) == 4  # the anchor is one token
    cache = AnchorCache(model, tokenizer, mode="ac")
    assert cache.anchor_ids.tolist() == [token_id]
    with torch.no_grad():
        model(ids, past_key_values=cache)
    last = int((ids[0] == token_id).nonzero().max())
    assert cache.kept_positions()[0] == [*(ids[0] == token_id).nonzero().flatten().tolist()[:-1], *range(last, ids.shape[1])]

    mean_model = tiny_llama(vocab_size=len(char_tokenizer()))
    mean_tok = char_tokenizer()
    before = mean_model.get_input_embeddings().weight.detach().mean(0)
    new = add_anchor_token(mean_model, mean_tok, init="mean")
    torch.testing.assert_close(mean_model.get_input_embeddings().weight[new], before)


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        AnchorCache(MODEL, anchor_ids=[])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        AnchorCache(MODEL, anchor_ids=[5, 128])
    with pytest.raises(ValueError, match="outside"):
        AnchorCache(MODEL, anchor_ids=[-1])
    with pytest.raises(ValueError, match="tokenizer"):
        AnchorCache(MODEL)
    with pytest.raises(ValueError, match="mode"):
        AnchorCache(MODEL, anchor_ids=[5], mode="xx")
    with pytest.raises(ValueError, match="keep_first"):
        AnchorCache(MODEL, anchor_ids=[5], keep_first=-1)
    with pytest.raises(ValueError, match="keep_segments"):
        AnchorCache(MODEL, anchor_ids=[5], keep_segments=0)
    with pytest.raises(ValueError, match="add_anchor_token"):
        AnchorCache(MODEL, char_tokenizer(), mode="ac")
    with pytest.raises(ValueError, match="init"):
        add_anchor_token(MODEL, char_tokenizer(), init="zeros")
    with pytest.raises(ValueError, match="input ids"):
        cache = AnchorCache(MODEL, anchor_ids=[5])
        MODEL(inputs_embeds=MODEL.get_input_embeddings().weight[torch.tensor([[5, 6]])], past_key_values=cache)


def _model_with_anchor_rule(**rule):
    from kvcompress import prepare
    from kvcompress.anchor_model import set_anchor_config

    model = prepare(tiny_llama(seed=5))
    set_anchor_config(model, {"mode": "ep", "anchor_ids": [5], **rule})
    return model


def test_the_rule_a_model_carries_is_the_default_and_explicit_options_win():
    """A model whose anchor configuration carries keep_first / keep_segments (the shipped models do): AnchorCache()
    keeps by that rule; explicit options override it; without them in the configuration, the paper's rule."""
    ids = torch.tensor([[3, 4, 6, 5, 7, 8, 5, 9, 10, 5, 11, 6]])
    mask = torch.ones_like(ids)

    def kept(model, cache):
        _, trace = teacher_forced(model, cache, ids, mask, [ids.shape[1]])
        return trace[-1][1][0]

    carrying = _model_with_anchor_rule(keep_first=1, keep_segments=2)
    row, real = ids[0].tolist(), [True] * ids.shape[1]
    assert kept(carrying, AnchorCache()) == expected_kept(row, real, {5}, keep_first=1, segments=2)
    assert kept(carrying, AnchorCache(keep_first=0, keep_segments=1)) == expected_kept(row, real, {5}, 0, 1)
    assert kept(carrying, AnchorCache(keep_segments=3)) == expected_kept(row, real, {5}, keep_first=1, segments=3)
    assert expected_kept(row, real, {5}, 1, 2) != expected_kept(row, real, {5}, 0, 1)  # the case tells them apart
    assert kept(_model_with_anchor_rule(), AnchorCache()) == expected_kept(row, real, {5}, 0, 1)
    for bad in ({"keep_first": -1}, {"keep_segments": 0}, {"keep_segments": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AnchorCache(_model_with_anchor_rule(**bad))
