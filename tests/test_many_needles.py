"""The compress-once-ask-many task (`needles@L`): each question is answered from its own clone of ONE compressed
context, the compressed cache is never changed by a question, and the cost is reported per context and per
question."""

import json

import torch
from test_bench import _run_cli, tiny_dir  # noqa: F401  (fixture: a saved tiny random Llama with a BPE tokenizer)

from kvcompress.bench import metrics, tasks
from kvcompress.models import load_model


def test_every_question_is_answered_from_a_clone_of_one_compressed_context(tiny_dir, monkeypatch):
    model, tokenizer = load_model(str(tiny_dir))
    task = tasks.TASKS["needles"]
    prepared = task.prepare(tokenizer, limit=2, seed=0, length=160, options={"needles_per_context": 3})
    assert len(prepared["samples"]) == 2 and all(len(s["questions"]) == 3 for s in prepared["samples"])
    for sample in prepared["samples"]:  # every keyed needle is in its context, at a different depth
        ids = sample["prefix"][0].tolist()
        for key, number, _ in sample["questions"]:
            needle = tasks._encode(tokenizer, tasks.KEYED_NEEDLE.format(key=key, number=number))
            assert any(ids[i : i + len(needle)] == needle for i in range(len(ids)))
    built, fed = [], []
    real_prefill = metrics.prefill

    def record(model_, cache, ids):
        fed.append((cache, ids.shape[1]))
        return real_prefill(model_, cache, ids)

    monkeypatch.setattr(metrics, "prefill", record)

    def make_cache(tokens):
        from kvcompress import SinkWindowCache

        built.append(SinkWindowCache(model, n_sink=2, window=tokens // 4))
        return built[-1]

    result = task.run(model, tokenizer, make_cache, prepared, repeats=1)
    assert len(built) == 2  # one cache per context, compressed once
    assert result["n_examples"] == 6 and result["contexts"] == 2 and len(result["answers"]) == 6
    contexts = [c for c, _ in fed if any(c is b for b in built)]
    assert len(contexts) == 2  # only the context prefills went into the compressed caches
    questions = [c for c, _ in fed if not any(c is b for b in built)]
    assert len(questions) == 6 and len({id(c) for c in questions}) == 6  # each question: its own clone
    for cache in built:
        assert cache.get_seq_length() == prepared["samples"][0]["prefix"].shape[1]  # untouched by the questions
    assert result["prefill_seconds"] > 0 and result["answer_seconds"] > 0


def test_the_cli_reports_intervals_over_questions(tiny_dir, tmp_path, capsys):
    code, _ = _run_cli(["--model", str(tiny_dir), "--strategies", "full,sink_window", "--budgets", "0.5",
                        "--tasks", "needles@128", "--limit", "1", "--out", str(tmp_path), "--no-plots",
                        "--no-progress"], capsys)
    assert code == 0
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    cell = cells["needles@128|sink_window|0.5"]
    assert cell["status"] == "ok" and cell["n_examples"] == 4 and "ci" in cell
