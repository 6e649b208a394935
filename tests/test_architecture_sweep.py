"""Issue 20, item 10: every causal-LM architecture of the installed transformers is served exactly or refused up
front with an error naming it (`kvcompress.architectures`), and docs/architectures.md says which.

The whole sweep (~200 model types, ~40 s on 2 cores) is `slow`; the fast tests check a sample of served and
refused architectures, each refusal rule, and two planted bugs the sweep must catch.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers
from transformers.masking_utils import causal_mask_function

from kvcompress import FullCache, architectures, attention, model_checks

DOC = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"

# model type -> (status, a phrase of the reason); chosen to cover every refusal rule and the main served families
SAMPLE = {
    "llama": ("served", ""),
    "mistral": ("served", ""),  # sliding window on every layer (tiny config: 8)
    "qwen3": ("served", ""),
    "gemma3_text": ("served", ""),  # sliding + full layers, two RoPE tables, query_pre_attn_scalar
    "phi3": ("served", ""),
    "gpt_neox": ("served", ""),  # partial rotary
    "cohere": ("served", ""),
    "gpt2": ("served", ""),  # absolute positions; the base model is `transformer`
    "opt": ("served", ""),  # the causal LM calls its decoder, not its base model's forward
    "deepseek_v3": ("served", ""),  # multi-head latent attention
    "mixtral": ("served", ""),  # mixture of experts
    "bert": ("served", ""),  # a BERT-style decoder (is_decoder=True)
    "moshi": ("served", ""),  # its config has a sliding_window its masks ignore
    "mamba": ("refused", "does not run its attention through transformers' AttentionInterface"),
    "gemma2": ("refused", "attn_logit_softcapping"),
    "llama4_text": ("refused", "chunked_attention"),
    "gpt_oss": ("refused", "learned attention sinks"),
    "mllama": ("refused", "cross-attention layers"),
    "hrm_text": ("refused", "do not map one to one"),
    "diffllama": ("refused", "calls the attention function twice"),
    "jetmoe": ("refused", "repeats the cached kv heads"),
    "doge": ("refused", "its own dynamic mask"),
    "dory": ("refused", "runs its layers in loops"),
}


def _doc_version() -> str:
    first = architectures.table_in(DOC.read_text()).splitlines()[0]
    return first.split(",")[0].removeprefix("transformers ")


def _doc_rows() -> dict[str, list[str]]:
    """model type -> [class, status, reason] from the table in docs/architectures.md."""
    rows = {}
    for line in architectures.table_in(DOC.read_text()).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("model type", "---"):
            rows[cells[0]] = cells[1:]
    return rows


SAME_VERSION = _doc_version() == transformers.__version__
needs_doc_version = pytest.mark.skipif(
    not SAME_VERSION, reason=f"docs/architectures.md was generated on transformers {_doc_version()}"
)


@pytest.mark.parametrize("model_type", sorted(SAMPLE))
def test_sample_is_served_exactly_or_refused_naming_the_class(model_type):
    if model_type not in architectures.causal_lm_architectures():
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    status, phrase = SAMPLE[model_type]
    verdict = architectures.check_architecture(model_type)
    assert verdict.status == status, verdict
    if status == "served":
        assert verdict.error_full_vs_dynamic < architectures.TOLERANCE
        assert verdict.error_vs_masked_reference < architectures.TOLERANCE
    else:
        assert phrase in verdict.reason and verdict.class_name in verdict.reason
    if SAME_VERSION:
        assert _doc_rows()[model_type] == [verdict.class_name, verdict.status, verdict.reason]


@pytest.mark.parametrize("model_type", sorted(t for t, (s, _) in SAMPLE.items() if s == "refused" and t != "mamba"))
def test_every_cache_refuses_a_refused_architecture_when_built(model_type):
    """Refused up front: building any cache raises the TypeError the sweep reports, before any forward."""
    if model_type not in architectures.causal_lm_architectures():
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    model = architectures.tiny_model(model_type)
    with pytest.raises(TypeError, match=SAMPLE[model_type][1]):
        FullCache(model)


def test_a_bidirectional_bert_is_refused():
    """BERT-style causal-LM classes attend bidirectionally unless config.is_decoder (the sweep sets it)."""
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, is_decoder=False))
    with pytest.raises(TypeError, match="BertLMHeadModel attends bidirectionally"):
        FullCache(model)


def test_attention_sinks_reaching_the_core_are_refused():
    """Safety net behind the up-front refusal: a model passing learned sinks (`s_aux`) to the core gets an error."""
    query = key = value = torch.zeros(1, 2, 3, 4)
    module = torch.nn.Module()
    module.config, module.training = transformers.PretrainedConfig(), False
    with pytest.raises(NotImplementedError, match="learned attention sinks"):
        attention.kvcompress_attention(module, query, key, value, None, s_aux=torch.zeros(2))


# --- planted bugs the sweep must catch ---------------------------------------------------------------------------
def test_the_sweep_catches_a_core_that_ignores_sliding_windows(monkeypatch):
    assert architectures.check_architecture("mistral").status == "served"
    real = attention._mask_for
    monkeypatch.setattr(attention, "_mask_for", lambda spec, *args: real(
        dataclasses.replace(spec, mask_function=causal_mask_function), *args))
    verdict = architectures.check_architecture("mistral")
    assert verdict.status == "wrong" and verdict.error_full_vs_dynamic > 1e-3, verdict


def test_the_sweep_catches_an_architecture_served_without_its_refusal(monkeypatch):
    """Planted: JetMoe taken off the refusal list. It then runs, and the per-kv-head check shows it is wrong."""
    monkeypatch.delitem(model_checks.UNSERVED_ARCHITECTURES, "jetmoe")
    verdict = architectures.check_architecture("jetmoe")
    assert verdict.status == "wrong", verdict


# --- the whole sweep and the document ----------------------------------------------------------------------------
@needs_doc_version
def test_the_document_lists_every_causal_lm_of_transformers():
    assert sorted(_doc_rows()) == sorted(architectures.causal_lm_architectures())


@pytest.mark.slow
def test_every_architecture_is_served_or_refused_and_the_document_is_current():
    verdicts = architectures.sweep()
    assert [v for v in verdicts if v.status == "wrong"] == []
    if SAME_VERSION:
        assert architectures.markdown(verdicts) == architectures.table_in(DOC.read_text()), (
            "docs/architectures.md is stale: python -m kvcompress.architectures --write docs/architectures.md")
