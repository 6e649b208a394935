"""kvcompress.bench.icl: task loaders on the shared data, the evaluation (checked against an explicit-mask forward),
bad input, and one integration run on SmolLM2."""

import importlib.resources
import json
import pathlib
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kvcompress.bench import icl
from kvcompress.icl_prompts import IclTemplate, match_anchor_tokens, token_offsets
from kvcompress.strategies.sink_window import SinkWindowCache
from kvcompress.testing import masked_reference_logits, tiny_llama

TEMPLATE = icl.TEMPLATES["sst2"]


def _tokenizer() -> PreTrainedTokenizerFast:
    rng = random.Random(1)
    words = "good bad movie plot fun dull great awful film".split()
    corpus = [TEMPLATE.demonstrations([(" ".join(rng.choices(words, k=rng.randint(1, 5))), rng.randint(0, 1))])[0]
              for _ in range(200)]
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 style: " positive" apart
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


TOKENIZER = _tokenizer()
MODEL = tiny_llama(seed=7, vocab_size=len(TOKENIZER))
TASK = icl.IclTask(
    "sst2", TEMPLATE,
    demonstrations=[("a great fun film , good plot and acting", 1), ("dull plot , bad movie and awful acting", 0),
                    ("awful acting , dull film", 0)],
    examples=[("good movie", 1), ("bad film", 0), ("great plot", 1), ("dull dull", 0), ("fun", 1)],
)


# --- loaders ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, classes, test_size", [("sst2", 2, 1821), ("trec", 6, 500), ("agnews", 4, 7600)])
def test_loader_counts_and_seeds(name, classes, test_size):
    task = icl.load_icl_task(name, k_per_class=2, seed=0, limit=50)
    assert len(task.examples) == 50 and task.info["test_size"] == test_size
    assert sorted(y for _, y in task.demonstrations) == sorted(list(range(classes)) * 2)
    assert all(text and 0 <= y < classes for text, y in task.examples + task.demonstrations)
    again = icl.load_icl_task(name, k_per_class=2, seed=0, limit=50)
    other = icl.load_icl_task(name, k_per_class=2, seed=1, limit=50)
    assert again.demonstrations == task.demonstrations
    assert other.demonstrations != task.demonstrations and other.examples == task.examples
    if name == "agnews":  # demonstrations come from the test file: never from the evaluated rows
        assert not set(task.demonstrations) & set(task.examples)


def test_trec_all_500_and_prompt_format():
    task = icl.load_icl_task("trec", seed=0)
    assert len(task.examples) == 500 and len(task.demonstrations) == 6
    text, spans = task.template.demonstrations(task.demonstrations[:1])
    question, label = task.demonstrations[0]
    assert text == f"Question: {question}\nAnswer Type: {icl.TEMPLATES['trec'].label_words[label]}\n"
    assert task.template.query("Why?") == "Question: Why?\nAnswer Type:"
    assert task.template.text_anchor(task.demonstrations[:1]) == "".join(text[s:e] for s, e in spans)


def test_bundled_data_is_package_data(monkeypatch):
    """Regression (issue 11.1): the data ships inside kvcompress.bench; no ../shared, no environment variable."""
    monkeypatch.delenv("KVCOMPRESS_DATA", raising=False)
    folder = icl.resolve_data_dir()
    package = importlib.resources.files("kvcompress.bench")
    assert str(folder) == str(package.joinpath("data", "icl"))
    assert "shared" not in pathlib.Path(str(folder)).parts
    names = {entry.name for entry in folder.iterdir()}
    assert {"SOURCE.md", "sst2_stsa.binary.train", "sst2_stsa.binary.test", "trec_train.txt", "trec_test.txt",
            "agnews_test.csv"} <= names
    assert "Apache-2.0" in folder.joinpath("SOURCE.md").read_text(encoding="utf-8")


def test_data_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir="):
        icl.resolve_data_dir(tmp_path / "nowhere")
    assert icl.resolve_data_dir(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="sst2_stsa.binary.train"):
        icl.load_icl_task("sst2", data_dir=tmp_path)


def test_loader_bad_input():
    with pytest.raises(ValueError, match="empty demonstration set"):
        icl.load_icl_task("sst2", k_per_class=0)
    with pytest.raises(ValueError, match="unknown ICL task"):
        icl.load_icl_task("imdb")


# --- evaluation ---------------------------------------------------------------------------------------------------
def test_evaluate_icl_metrics_and_exactness():
    results = icl.evaluate_icl(MODEL, TOKENIZER, TASK, progress=False)
    assert set(results) == set(icl.METHODS)
    gold = [y for _, y in TASK.examples]
    full = results["full"]["predictions"]
    for name, r in results.items():
        assert r["accuracy"] == sum(p == g for p, g in zip(r["predictions"], gold)) / len(gold)
        assert r["loyalty"] == sum(p == f for p, f in zip(r["predictions"], full)) / len(gold)
        assert r["answer_seconds"] > 0 and r["n_examples"] == len(gold)
    assert results["full"]["loyalty"] == 1.0 and results["full"]["kv_kept_fraction"] == 1.0
    text, spans = TEMPLATE.demonstrations(TASK.demonstrations)
    match = match_anchor_tokens(TOKENIZER, text, spans)
    assert results["label_words"]["kv_tokens_kept"] == len(match.positions) == results["hidden_random"]["kv_tokens_kept"]
    assert results["label_words"]["kv_kept_fraction"] == len(match.positions) / len(match.input_ids) < 1
    anchor_ids = token_offsets(TOKENIZER, TEMPLATE.text_anchor(TASK.demonstrations))[0]
    assert results["text_anchor"]["kv_tokens_kept"] == len(anchor_ids)

    # Hidden_anchor's prediction = argmax over label first tokens of an explicit-mask forward over the kept tokens
    labels = icl.label_token_ids(TOKENIZER, TEMPLATE)
    p = len(match.input_ids)
    for (text_in, _), predicted in zip(TASK.examples, results["label_words"]["predictions"]):
        query = token_offsets(TOKENIZER, TEMPLATE.query(text_in))[0]
        ids = torch.tensor([match.input_ids + query])
        visible = torch.ones(1, ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        dropped = [i for i in range(p) if i not in match.positions]
        visible[0, p:, dropped] = False
        logits = masked_reference_logits(MODEL, ids, torch.ones_like(ids), visible)[0, -1]
        assert int(logits[labels].argmax()) == predicted


def test_evaluate_icl_any_strategy_and_errors():
    out = icl.evaluate_icl(MODEL, TOKENIZER, TASK, methods={"sink_window": lambda n: SinkWindowCache(MODEL, 2, 4)},
                           progress=False)
    assert set(out) == {"full", "sink_window"} and out["sink_window"]["kv_tokens_kept"] == 6
    with pytest.raises(TypeError, match="unknown ICL method"):
        icl.evaluate_icl(MODEL, TOKENIZER, TASK, methods=["nope"], progress=False)
    shared_first = IclTemplate("Review:", "\nSentiment:", ("goodish", "goodness"))
    with pytest.raises(ValueError, match="first token"):
        icl.label_token_ids(TOKENIZER, shared_first)
    empty = icl.IclTask("sst2", TEMPLATE, demonstrations=[], examples=TASK.examples)
    with pytest.raises(ValueError, match="empty"):
        icl.evaluate_icl(MODEL, TOKENIZER, empty, progress=False)


def test_markdown_table_aggregates_seeds():
    def run(acc):
        r = {"accuracy": acc, "loyalty": 1.0, "kv_kept_fraction": 0.5, "kv_tokens_kept": 10, "speedup": 2.0,
             "n_examples": 4}
        return {"full": r, "label_words": {**r, "loyalty": 0.5}}

    table = icl.markdown_table({"sst2|0": run(0.5), "sst2|1": run(0.75)})
    assert "| sst2 | Full ICL | 2 | 4 | 62.5 ± 17.7 | 100.0 ± 0.0 | 50.0 | 10 | 2.00x |" in table
    assert "| sst2 | Hidden_anchor | 2 | 4 | 62.5 ± 17.7 | 50.0 ± 0.0 |" in table


# --- the real model -----------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_matcher_and_label_tokens(smollm2):
    model, tokenizer = smollm2
    for name, template in icl.TEMPLATES.items():
        task = icl.load_icl_task(name, seed=0, limit=2)
        icl.label_token_ids(tokenizer, template)  # distinct first tokens
        text, spans = template.demonstrations(task.demonstrations)
        match = match_anchor_tokens(tokenizer, text, spans)
        kept_text = "".join(tokenizer.decode([match.input_ids[i]]) for i in match.positions)
        assert kept_text == template.text_anchor(task.demonstrations)  # SmolLM2 splits at the span edges
    task = icl.load_icl_task("sst2", seed=0, limit=3)
    results = icl.evaluate_icl(model, tokenizer, task, progress=False)
    assert results["label_words"]["kv_kept_fraction"] < 0.5 and results["full"]["loyalty"] == 1.0
    # exactness on the real model: Hidden_anchor's query logits = an explicit-mask forward over the kept tokens
    prefixes, info = icl.build_prefixes(model, tokenizer, task, ["label_words"])
    query = token_offsets(tokenizer, task.template.query(task.examples[0][0]))[0]
    kept = prefixes["label_words"].cache.kept_positions(0)[0]
    ids = torch.tensor([prefixes["label_words"].prefix_ids[0].tolist() + query])
    p = info["prefix_tokens"]
    visible = torch.ones(1, ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    visible[0, p:, [i for i in range(p) if i not in kept]] = False
    reference = masked_reference_logits(model, ids, torch.ones_like(ids), visible)[0, -1]
    logits = prefixes["label_words"].next_token_logits(torch.tensor([query]))[0]
    assert (logits - reference).abs().max().item() < 1e-4


def test_hidden_random_draws_non_anchor_positions():
    prefixes, info = icl.build_prefixes(MODEL, TOKENIZER, TASK, ["label_words", "hidden_random"])
    anchors = set(prefixes["label_words"].cache.kept_positions(0)[0])
    drawn = set(prefixes["hidden_random"].cache.kept_positions(0)[0])
    assert info["random_excludes_anchors"] and len(drawn) == len(anchors) == info["anchor_tokens"]
    assert drawn & anchors == {0}  # the first token (sink) plus non-anchor tokens only
    short = icl.IclTask("sst2", TEMPLATE, [("fun", 1), ("dull", 0)], TASK.examples)
    prefixes, info = icl.build_prefixes(MODEL, TOKENIZER, short, ["hidden_random"])
    assert not info["random_excludes_anchors"] and prefixes["hidden_random"].kv_tokens == info["anchor_tokens"]


def test_cli_table_only_merges_json_files(tmp_path, capsys):
    r = {"accuracy": 0.5, "loyalty": 1.0, "kv_kept_fraction": 1.0, "kv_tokens_kept": 8, "speedup": 1.0, "n_examples": 2}
    (tmp_path / "a.json").write_text(json.dumps({"runs": {"trec|0": {"full": r}}}))
    (tmp_path / "b.json").write_text(json.dumps({"runs": {"trec|1": {"full": {**r, "accuracy": 1.0}}}}))
    assert icl.main(["--table-only", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert "| trec | Full ICL | 2 | 2 | 75.0 ± 35.4 |" in capsys.readouterr().out
