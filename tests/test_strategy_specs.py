"""Strategy specs with options ("kvzip:allocation=layer", "snapkv:kv_bits=4"): parsing, for_budget with options,
the bench CLI's --kv-bits expansion, and clear errors."""

import pytest

from kvcompress import AnchorCache, KVzipCache, SinkWindowCache, registry
from kvcompress.bench import cli
from kvcompress.testing import CharTokenizer, tiny_llama

MODEL = tiny_llama()


def test_specs_parse_names_and_typed_options():
    assert registry.parse_spec("full") == ("full", {})
    assert registry.parse_spec("kvzip:allocation=layer:chunk=512:value_norm=true") == (
        "kvzip", {"allocation": "layer", "chunk": 512, "value_norm": True})
    assert registry.parse_spec("snapkv:kv_bits=none") == ("snapkv", {"kv_bits": None})
    assert registry.resolve("sink_window:kv_bits=4") == (SinkWindowCache, {"kv_bits": 4})


@pytest.mark.parametrize("spec, error", [("nope", KeyError), ("kvzip:allocation", ValueError),
                                         ("kvzip:=3", ValueError)])
def test_bad_specs_are_refused(spec, error):
    with pytest.raises(error):
        registry.parse_spec(spec)


def test_for_budget_routes_storage_and_strategy_options():
    cache = KVzipCache.for_budget(MODEL, CharTokenizer(), 8, allocation="layer", kv_bits=4, group=8)
    assert (cache.allocation, cache.budget, cache.kv_bits, cache.group) == ("layer", 8, 4, 8)
    quantized = SinkWindowCache.for_budget(MODEL, None, 8, kv_bits=2)
    assert quantized.kv_bits == 2 and quantized.window == 4
    with pytest.raises(ValueError, match=r"SinkWindowCache takes no options \['allocation'\] with a budget"):
        SinkWindowCache.for_budget(MODEL, None, 8, allocation="global")
    anchor = AnchorCache.for_budget(MODEL, None, 8, anchor_ids=[5], keep_first=1, keep_segments=2)
    assert (anchor.keep_first, anchor.keep_segments) == (1, 2)
    with pytest.raises(TypeError, match="keep_last"):
        AnchorCache.for_budget(MODEL, None, 8, anchor_ids=[5], keep_last=1)


def test_cli_expands_kv_bits_and_checks_specs(capsys):
    assert cli.main(["--strategies", "full,sink_window", "--kv-bits", "none,4", "--tasks", "ppl@64", "--plan"]) == 0
    plan = capsys.readouterr().out
    assert "4 strategies (full, full:kv_bits=4, sink_window, sink_window:kv_bits=4)" in plan
    assert "| ppl@64 | 6 | 1 |" in plan  # full x2 without a budget, sink_window x2 at two budgets
    with pytest.raises(SystemExit):
        cli.main(["--strategies", "full", "--kv-bits", "3", "--plan"])
    with pytest.raises(SystemExit):
        cli.main(["--strategies", "kvzip:allocation", "--plan"])


def test_presets_add_the_trained_anchor_rows_when_their_adapters_are_installed(tmp_path, monkeypatch):
    import kvcompress.anchor_model as anchor_model

    monkeypatch.setattr(anchor_model, "ADAPTER_ROOT", tmp_path)
    assert cli.trained_anchor_rows(None) == []
    (tmp_path / "smollm2-135m-anchor-ac").mkdir()
    (tmp_path / "smollm2-135m-anchor-ac" / "adapter_model.safetensors").write_bytes(b"x")
    assert cli.trained_anchor_rows(None) == ["anchor:model=smollm2-135m-anchor-ac"]
    assert cli.trained_anchor_rows("qwen2.5-0.5b") == []  # rows of another model only beside the default one
