"""CacheGroup: batch-1 caches decoded in one forward, row i for member i, each exactly as it would decode alone.

The models are float64 here, so the one difference a group makes (the linear layers' products over B rows instead of
one, summed in another order by BLAS) stays at 1e-15 and every kept set must match exactly."""

import pytest
import torch
from transformers import DynamicCache

import kvcompress.strategies  # noqa: F401  (registers the built-in strategies)
from kvcompress import registry
from kvcompress.cache import cache_arg
from kvcompress.cache_group import CacheGroup, _GroupLayer
from kvcompress.shared_prefill import prefill_shared
from kvcompress.testing import CharTokenizer, tiny_gemma3, tiny_llama, tiny_qwen2

from kept_sets import kept_sets

TOKENIZER = CharTokenizer()
LLAMA = tiny_llama(seed=3, initializer_range=0.2).double()  # peaked attention: strategies disagree on what to keep
BUDGETED = [n for n in registry.available() if registry.get(n).uses_budget]
# kvzip with slack 3: its decode steps reconstruct and cut (after_forward) inside the group's forwards
SPECS = BUDGETED + ["full", "kvzip:allocation=layer:slack=3", "snapkv:allocation=adakv"]
LOGITS_TOLERANCE = 1e-9


def _caches(model, specs, budget=70):
    out = []
    for spec in specs:
        cls, options = registry.resolve(spec)
        out.append(cls.for_budget(model, TOKENIZER, budget if cls.uses_budget else None, **options))
    return out


def _inputs(seed: int, prompt: int = 150, tail: int = 5):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, prompt), generator=generator), torch.randint(3, 128, (1, tail), generator=generator)


@torch.no_grad()
def _decode_alone_and_together(model, specs, steps: int = 8, seed: int = 0, leave=None):
    """Two sets of caches prefilled alike; a question then `steps` greedy steps, the first set one cache at a time,
    the second as a CacheGroup (row i taking member i's own greedy token). `leave`: {step: rows} dropped from the
    group (and from the alone set) before that step. Returns the (logits, kept sets) of each cache after each
    forward, alone and together."""
    prompt, tail = _inputs(seed)
    alone, members = _caches(model, specs), _caches(model, specs)
    prefill_shared(model, alone, prompt)
    prefill_shared(model, members, prompt)
    records_alone = {i: [] for i in range(len(specs))}
    records_together = {i: [] for i in range(len(specs))}
    group, running = CacheGroup(members), list(range(len(specs)))
    tokens_alone, tokens_together = {}, {}
    for i in running:
        logits = model(tail, **cache_arg(alone[i])).logits[:, -1]
        records_alone[i].append((logits, kept_sets(alone[i])))
        tokens_alone[i] = logits.argmax(-1, keepdim=True)
    logits = model(tail.expand(len(running), -1), **cache_arg(group)).logits[:, -1]
    for row, i in enumerate(running):
        records_together[i].append((logits[row : row + 1], kept_sets(members[i])))
        tokens_together[i] = logits[row : row + 1].argmax(-1, keepdim=True)
    for step in range(steps):
        if leave and step in leave:
            group = group.without([running.index(i) for i in leave[step]])
            running = [i for i in running if i not in leave[step]]
        for i in running:
            logits = model(tokens_alone[i], **cache_arg(alone[i])).logits[:, -1]
            records_alone[i].append((logits, kept_sets(alone[i])))
            tokens_alone[i] = logits.argmax(-1, keepdim=True)
        logits = model(torch.cat([tokens_together[i] for i in running]), **cache_arg(group)).logits[:, -1]
        for row, i in enumerate(running):
            records_together[i].append((logits[row : row + 1], kept_sets(members[i])))
            tokens_together[i] = logits[row : row + 1].argmax(-1, keepdim=True)
    return records_alone, records_together, alone, members


def _check_same(specs, records_alone, records_together, alone, members):
    for i, spec in enumerate(specs):
        assert len(records_alone[i]) == len(records_together[i]), spec
        for step, ((la, ka), (lt, kt)) in enumerate(zip(records_alone[i], records_together[i])):
            assert torch.allclose(la, lt, rtol=0, atol=LOGITS_TOLERANCE), f"{spec}: other logits at forward {step}"
            assert ka == kt, f"{spec}: other kept sets after forward {step}"
        assert (alone[i].token_ids is None) == (members[i].token_ids is None), spec
        assert alone[i].token_ids is None or torch.equal(alone[i].token_ids, members[i].token_ids), spec
        assert alone[i].kv_bytes() == members[i].kv_bytes(), spec


def test_every_strategy_decodes_in_a_group_as_alone():
    records = _decode_alone_and_together(LLAMA, SPECS)
    _check_same(SPECS, *records)
    kvzip = SPECS.index("kvzip:allocation=layer:slack=3")
    assert records[2][kvzip].kept_counts().max() < records[2][SPECS.index("full")].kept_counts().min(), \
        "the kvzip member did not cut during the decode: the test does not reach its after_forward"


@pytest.mark.parametrize("make_model", [tiny_gemma3, tiny_qwen2], ids=["gemma3", "qwen2"])
def test_group_on_sliding_layers_and_biased_projections(make_model):
    model = make_model(seed=1, initializer_range=0.2).double()
    specs = ["full", "snapkv", "sink_window", "h2o", "kvzip"]
    _check_same(specs, *_decode_alone_and_together(model, specs, steps=5, seed=4))


def test_rows_leave_the_group():
    specs = ["snapkv", "tova", "full", "sink_window"]
    records = _decode_alone_and_together(LLAMA, specs, steps=6, leave={2: [1], 4: [0, 3]})
    _check_same(specs, *records)
    assert [len(records[1][i]) for i in range(4)] == [5, 3, 7, 5]  # forwards each member took part in


def test_a_member_decodes_alone_after_the_group():
    prompt, tail = _inputs(5)
    alone, members = _caches(LLAMA, ["snapkv", "h2o"]), _caches(LLAMA, ["snapkv", "h2o"])
    prefill_shared(LLAMA, alone, prompt)
    prefill_shared(LLAMA, members, prompt)
    with torch.no_grad():
        LLAMA(tail.expand(2, -1), **cache_arg(CacheGroup(members)))
        for cache in alone:
            LLAMA(tail, **cache_arg(cache))
        for a, m in zip(alone, members):
            assert torch.allclose(LLAMA(tail[:, :1], **cache_arg(a)).logits, LLAMA(tail[:, :1], **cache_arg(m)).logits,
                                  rtol=0, atol=LOGITS_TOLERANCE)
            assert kept_sets(a) == kept_sets(m)


def test_generate_with_a_group_continues_each_member_as_alone():
    """`model.generate(ids (B, L), cache=group)`: generate feeds the tokens past those the members have seen, then
    steps; each row's tokens are those of generate on its member alone (clones of one cache asked different
    questions of one length, and caches of other strategies)."""
    prompt, _ = _inputs(7, prompt=120)
    questions = torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(8))
    snapkv = _caches(LLAMA, ["snapkv"])[0]
    prefill_shared(LLAMA, [snapkv], prompt)
    members = [snapkv.clone(), snapkv.clone(), *_caches(LLAMA, ["tova", "full"])]
    prefill_shared(LLAMA, members[2:], prompt)
    alone = [member.clone() for member in members]
    ids = torch.cat([prompt.expand(4, -1), questions], dim=1)
    together = LLAMA.generate(ids, **cache_arg(CacheGroup(members)), max_new_tokens=8, do_sample=False)
    for row, cache in enumerate(alone):
        mine = LLAMA.generate(ids[row : row + 1], **cache_arg(cache), max_new_tokens=8, do_sample=False)
        assert torch.equal(together[row : row + 1], mine), f"row {row}"
        assert kept_sets(cache) == kept_sets(members[row]), f"row {row}"
    assert len({tuple(row.tolist()) for row in together[:, -8:]}) > 1, "every row the same: the test shows nothing"


def test_planted_twin_rows_handed_to_the_wrong_members_is_caught(monkeypatch):
    """A group that feeds member i the row of member B-1-i: the equality check above must fail."""
    update = _GroupLayer.update

    def swapped(self, key_states, value_states, *args, **kwargs):
        return update(self, key_states.flip(0), value_states.flip(0), *args, **kwargs)

    monkeypatch.setattr(_GroupLayer, "update", swapped)
    specs = ["snapkv", "full", "tova"]
    with pytest.raises(AssertionError):
        _check_same(specs, *_decode_alone_and_together(LLAMA, specs, steps=3))


def _prefilled(specs, prompt_length=60):
    caches = _caches(LLAMA, specs, budget=30)
    prefill_shared(LLAMA, caches, _inputs(2, prompt=prompt_length)[0])
    return caches


def test_bad_members_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="at least one cache"):
        CacheGroup([])
    with pytest.raises(TypeError, match=r"members\[1\] is a DynamicCache"):
        CacheGroup([_prefilled(["full"])[0], DynamicCache()])
    cache = _prefilled(["snapkv"])[0]
    with pytest.raises(ValueError, match=r"members\[1\] appears twice"):
        CacheGroup([cache, cache])
    with pytest.raises(ValueError, match="same number of tokens"):
        CacheGroup([cache, _prefilled(["tova"], prompt_length=61)[0]])
    other_model = tiny_llama(seed=4).double()
    foreign = registry.get("full").for_budget(other_model, TOKENIZER, None)
    with pytest.raises(ValueError, match="another model"):
        CacheGroup([cache, foreign])
    batched = registry.get("full").for_budget(LLAMA, TOKENIZER, None)
    with torch.no_grad():
        LLAMA(torch.randint(3, 128, (2, 60)), **cache_arg(batched))
    with pytest.raises(ValueError, match="holds 2 rows"):
        CacheGroup([cache, batched])
    with pytest.raises(ValueError, match="no model"):
        CacheGroup([registry.get("full")(None)])


def test_bad_forwards_through_a_group_are_refused():
    group = CacheGroup(_prefilled(["snapkv", "full"]))
    with torch.no_grad(), pytest.raises(ValueError, match="takes 2 input rows"):
        LLAMA(torch.randint(3, 128, (3, 1)), **cache_arg(group))
    with torch.no_grad(), pytest.raises(ValueError, match="output_attentions"):
        LLAMA(torch.randint(3, 128, (2, 1)), output_attentions=True, **cache_arg(group))
    for refused in (group.reset, lambda: group.crop(1), lambda: group.reorder_cache(torch.tensor([1, 0]))):
        with pytest.raises(NotImplementedError, match="CacheGroup"):
            refused()
    assert group.without([0, 1]) is None and group.without([1]).members == group.members[:1]
