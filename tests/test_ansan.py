"""AnSAN masks: dense mask vs a naive statement of the rule, causality, anchor isolation, Flex == dense, and use
through the kvcompress attention core."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask

from kvcompress import attention
from kvcompress.ansan import ansan_block_mask, ansan_mask, ansan_mask_mod
from kvcompress.testing import tiny_llama

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def naive_rule(ids: list[int], real: list[bool], anchors: set[int]) -> list[list[bool]]:
    """The DESIGN.md rule written out: anchors a0 < a1 < ... among real tokens; segment k = (a_{k-1}, a_k]."""
    n = len(ids)
    anchor_positions = [t for t in range(n) if real[t] and ids[t] in anchors]

    def segment(t):  # index k of the segment (a_{k-1}, a_k] holding real token t
        for k, a in enumerate(anchor_positions):
            if t <= a:
                return k
        return len(anchor_positions)

    out = [[False] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1):
            if not (real[i] and real[j]):
                continue
            if i in anchor_positions:
                out[i][j] = segment(j) == segment(i)
            else:
                out[i][j] = segment(j) == segment(i) or (j in anchor_positions and segment(j) < segment(i))
    return out


@st.composite
def sequences(draw):
    """Batch of token rows over a small vocabulary, random anchor ids, random (left/right/inner) padding."""
    batch = draw(st.integers(1, 3))
    n = draw(st.integers(1, 24))
    vocab = draw(st.integers(2, 8))
    ids = [[draw(st.integers(0, vocab - 1)) for _ in range(n)] for _ in range(batch)]
    real = [[draw(st.booleans()) or draw(st.booleans()) for _ in range(n)] for _ in range(batch)]
    anchors = draw(st.sets(st.integers(0, vocab - 1), min_size=1, max_size=vocab))
    return torch.tensor(ids), torch.tensor(real), sorted(anchors)


@SETTINGS
@given(sequences())
def test_dense_mask_equals_the_rule(example):
    ids, real, anchors = example
    mask = ansan_mask(ids, anchors, real.long())
    for b in range(ids.shape[0]):
        expected = torch.tensor(naive_rule(ids[b].tolist(), real[b].tolist(), set(anchors)))
        assert torch.equal(mask[b], expected), (ids[b], real[b], anchors)


@SETTINGS
@given(sequences())
def test_causal_pads_masked_and_anchors_see_no_earlier_segment(example):
    ids, real, anchors = example
    mask = ansan_mask(ids, anchors, real)
    n = ids.shape[1]
    assert not mask[:, ~torch.ones(n, n, dtype=torch.bool).tril()].any(), "not causal"
    assert not mask[~real].any() and not mask.transpose(1, 2)[~real].any(), "a pad attends or is attended"
    is_anchor = torch.isin(ids, torch.tensor(anchors)) & real
    for b in range(ids.shape[0]):
        positions = is_anchor[b].nonzero().flatten().tolist()
        for k, a in enumerate(positions):
            previous = positions[k - 1] if k else -1
            assert not mask[b, a, : previous + 1].any(), "an anchor sees a token of an earlier segment"
            # and it sees all of its own segment
            assert mask[b, a, previous + 1 : a + 1][real[b, previous + 1 : a + 1]].all()
        # real non-anchors always see themselves; real tokens are never fully masked
        assert mask[b].diagonal()[real[b]].all()


@SETTINGS
@given(sequences())
def test_pads_do_not_change_the_mask_of_real_tokens(example):
    ids, real, anchors = example
    mask = ansan_mask(ids, anchors, real)
    for b in range(ids.shape[0]):
        keep = real[b].nonzero().flatten()
        alone = ansan_mask(ids[b : b + 1, keep], anchors)[0]
        assert torch.equal(mask[b][keep][:, keep], alone)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequences())
def test_flex_mask_equals_dense(example):
    ids, real, anchors = example
    batch, n = ids.shape
    dense = ansan_mask(ids, anchors, real)
    mod = ansan_mask_mod(ids, anchors, real)
    grid_q, grid_kv = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    for b in range(batch):
        assert torch.equal(mod(torch.tensor(b), torch.tensor(0), grid_q, grid_kv), dense[b])
    block = ansan_block_mask(ids, anchors, real, block_size=8)
    assert torch.equal(create_mask(block.mask_mod, batch, 1, n, n, device="cpu")[:, 0], dense)


def test_block_mask_skips_blocks_on_long_sequences():
    """Sentences of 16 tokens, 512 tokens: most key blocks of a query block hold nothing visible."""
    ids = torch.arange(512).remainder(16).view(1, 512)  # token 15 closes every 16-token sentence
    block = ansan_block_mask(ids, [15], block_size=64)
    assert block.sparsity() > 40.0  # percent of blocks skipped (causal alone gives ~44% at 8 blocks)
    dense = ansan_mask(ids, [15])
    assert torch.equal(create_mask(block.mask_mod, 1, 1, 512, 512, device="cpu")[:, 0], dense)


def test_mask_through_the_core_equals_eager_reference():
    """model(ids, attention_mask=dense[:, None]) through the kvcompress core equals the eager path with the same
    mask; the BlockMask path gives the same logits (no grad: FlexAttention has no CPU backward)."""
    model = tiny_llama(seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 40), generator=g)
    ids[:, ::7] = 5
    real = torch.ones_like(ids)
    real[1, :6] = 0
    dense = ansan_mask(ids, [5], real)
    additive = torch.zeros(dense.shape).masked_fill(~dense, torch.finfo(torch.float32).min)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        reference = model(ids, attention_mask=additive[:, None]).logits
        attention.enable(model)
        got = model(ids, attention_mask=dense[:, None]).logits
        flex = model(ids, attention_mask=ansan_block_mask(ids, [5], real, block_size=16)).logits
        causal = model(ids).logits
    ok = real.bool()
    torch.testing.assert_close(got[ok], reference[ok], atol=1e-5, rtol=0)
    torch.testing.assert_close(flex[ok], reference[ok], atol=1e-5, rtol=0)
    assert (got[0] - causal[0]).abs().max() > 1e-3, "the AnSAN mask changed nothing"


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        ansan_mask(torch.zeros(1, 4, dtype=torch.long), [])
    with pytest.raises(ValueError, match="batch, length"):
        ansan_mask(torch.zeros(4, dtype=torch.long), [1])
    with pytest.raises(ValueError, match="shape"):
        ansan_mask(torch.zeros(1, 4, dtype=torch.long), [1], torch.ones(1, 3))
