"""`AnchorCache()` with no arguments on a model that carries its anchor configuration (saved by
`kvcompress-train-anchor`, loaded with `load_model`), the AC tokenizer that inserts `<AC>`, and the errors for models
and arguments that do not fit."""

import pytest
import torch
from test_train import _args, _tiny_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvcompress import AnchorCache, prepare, train
from kvcompress.anchor_model import anchor_config
from kvcompress.anchor_tokens import AC_TOKEN, anchor_token_id
from kvcompress.cache import cache_arg
from kvcompress.models import load_model
from kvcompress.testing import tiny_llama


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny EP (full fine-tuning) and AC (LoRA + <AC> row) anchor checkpoints, two steps each."""
    tmp = tmp_path_factory.mktemp("anchor")
    model_dir, text = _tiny_checkpoint(tmp)
    train.run(_args(model_dir, text, tmp / "ep", 2))
    train.run(_args(model_dir, text, tmp / "ac", 2, "--mode", "ac", "--lora-rank", "2"))
    return {"ep": tmp / "ep", "ac": tmp / "ac", "base": model_dir}


def _generate(model, tokenizer, cache, text="It sat. The cat ran. A dog", **kwargs):
    ids = tokenizer(text, return_tensors="pt").input_ids
    out = model.generate(ids, **cache_arg(cache), max_new_tokens=4, do_sample=False, pad_token_id=0, **kwargs)
    return ids, out


@pytest.mark.parametrize("mode", ["ep", "ac"])
def test_anchor_cache_without_arguments_uses_the_models_anchors(trained, mode):
    model, tokenizer = load_model(str(trained[mode]))
    config = anchor_config(model)
    assert config["mode"] == mode
    cache = AnchorCache()
    assert not cache.is_bound
    ids, out = _generate(model, tokenizer, cache)
    explicit = AnchorCache(model, anchor_ids=config["anchor_ids"])
    _, expected = _generate(model, tokenizer, explicit)
    assert torch.equal(out, expected)
    assert cache.mode == mode and cache.anchor_ids.tolist() == sorted(config["anchor_ids"])
    assert cache.kept_positions(0) == explicit.kept_positions(0)
    assert cache.kept_counts()[0, 0] < cache.get_seq_length()  # the prompt's sentences were compressed


def test_the_ac_tokenizer_inserts_anchors_and_decoding_can_hide_them(trained):
    model, tokenizer = load_model(str(trained["ac"]))
    ac = anchor_token_id(tokenizer)
    ids = tokenizer("It sat. The cat ran. A dog", return_tensors="pt").input_ids[0].tolist()
    assert ids.count(ac) == 2  # after "sat." and "ran."
    assert ac not in tokenizer.encode("No sentence end here")
    assert AC_TOKEN not in tokenizer.decode(ids, skip_special_tokens=True)
    tokenizer.insert_anchors = False
    assert ac not in tokenizer("It sat. The cat ran.").input_ids


def test_a_generated_anchor_is_compressed_on(trained):
    """The model emits <AC> (forced here at the second step): after it is fed, the cache holds the anchors and what
    follows the last one, so the generated sentence before it is dropped."""
    model, tokenizer = load_model(str(trained["ac"]))
    ac = anchor_token_id(tokenizer)

    def force_anchor(batch_id, sent):
        return [ac] if sent.shape[-1] == prompt_len + 1 else list(range(model.config.vocab_size))

    cache = AnchorCache()
    ids = tokenizer("It sat. The cat", return_tensors="pt").input_ids
    prompt_len = ids.shape[1]
    out = model.generate(ids, **cache_arg(cache), max_new_tokens=4, do_sample=False, pad_token_id=0,
                         prefix_allowed_tokens_fn=force_anchor)
    assert out[0, prompt_len + 1] == ac
    kept = cache.kept_positions(0)[0]
    assert prompt_len + 1 in kept and not {prompt_len - 1, prompt_len} & set(kept)  # "cat" + 1st token dropped


def test_an_unprepared_model_gets_a_clear_error(trained):
    model = AutoModelForCausalLM.from_pretrained(str(trained["ep"]))
    tokenizer = AutoTokenizer.from_pretrained(str(trained["ep"]))
    with pytest.raises(RuntimeError, match=r"load_model.*kvcompress\.prepare\(model\)"):
        _generate(model, tokenizer, AnchorCache())
    prepare(model)
    _generate(model, tokenizer, AnchorCache())  # works once prepared


def test_a_model_without_anchor_configuration_says_what_to_pass(trained):
    model, tokenizer = load_model(str(trained["base"]))
    with pytest.raises(ValueError, match=r"carries no anchor configuration.*AnchorCache\(model, tokenizer\)"):
        _generate(model, tokenizer, AnchorCache())
    with pytest.raises(ValueError, match="carries no anchor configuration"):
        AnchorCache(model)
    AnchorCache(model, tokenizer)  # as before: the tokenizer's sentence ends


def test_bad_mode_and_mismatched_anchors_are_refused(trained):
    with pytest.raises(ValueError, match=r"mode must be one of \('ep', 'ac'\), got 'xx'"):
        AnchorCache(mode="xx")
    model, tokenizer = load_model(str(trained["ac"]))
    with pytest.raises(ValueError, match="anchor-trained in AC mode but AnchorCache\\(mode='ep'\\)"):
        AnchorCache(model, mode="ep")
    with pytest.raises(ValueError, match="anchor-trained in AC mode"):
        _generate(model, tokenizer, AnchorCache(mode="ep"))
    other = AutoTokenizer.from_pretrained(str(trained["base"]))
    other.add_tokens(["<other>"], special_tokens=True)  # <AC> gets the next id: not the model's
    other.add_tokens([AC_TOKEN], special_tokens=True)
    with pytest.raises(ValueError, match="the tokenizer gives '<AC>' the id .* but the model was trained with"):
        AnchorCache(model, other)


def test_a_random_model_keeps_working_with_explicit_anchors():
    model = tiny_llama()
    cache = AnchorCache(model, anchor_ids=[5])
    model(torch.tensor([[3, 5, 7, 8]]), **cache_arg(cache))
    assert cache.kept_positions(0) == [[1, 2, 3]]
