"""The bench: CLI on a tiny random model (real task data), bad-input errors, scoring through a cache."""

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from kvcompress import FullCache, SinkWindowCache
from kvcompress.bench import cli, metrics, ruler, runner
from kvcompress.testing import tiny_llama

VOCAB = 320


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved tiny random Llama with a byte-level BPE tokenizer trained here (offline, no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["Question: What is the answer? Answer: the answer is yes.", "The special magic number is 12345.",
              "Predators eat bunnies. A marsh has fog. Oak tree seeds are planted.",
              "Review: a fine film\nSentiment: positive\n", "Review: a dull film\nSentiment: negative\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    path = tmp_path_factory.mktemp("tiny")
    fast.save_pretrained(path)
    tiny_llama(vocab_size=VOCAB, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
               bos_token_id=1).save_pretrained(path)
    return path


def _run_cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr()


CELL_FIELDS = {
    "task", "strategy", "budget", "metric", "status", "accuracy", "accuracy_norm", "n_examples", "context_tokens",
    "kv_bytes", "kv_tokens_kept", "kept_fraction", "kv_bytes_fraction", "prefill_seconds", "decode_tokens_per_s",
    "peak_memory_mb", "peak_memory_kind", "peak_memory_total_mb", "process_maxrss_mb", "cpu_seconds", "budget_tokens", "seconds", "repeats",
}
ENV_FIELDS = {"python", "torch", "transformers", "git", "device", "model", "dtype", "argv", "started_at",
              "finished_at", "torch_threads"}


def test_cli_tiny_model_two_strategies_one_task(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "table.md").write_text("an experiment's own table\n")  # e.g. ruler_table.py's, in a grid's --out folder
    code, captured = _run_cli(
        ["--model", str(tiny_dir), "--strategies", "full,sink_window", "--tasks", "obqa", "--budgets", "0.5,8",
         "--limit", "3", "--repeats", "2", "--out", str(out), "--no-progress"], capsys)
    assert code == 0
    def no_constants(name):
        raise AssertionError(f"results.json holds {name}, which is not valid JSON")

    results = json.loads((out / "results.json").read_text(), parse_constant=no_constants)
    assert ENV_FIELDS <= set(results["environment"])
    assert results["environment"]["model"] == str(tiny_dir)
    cells = results["cells"]
    assert list(cells) == ["obqa|full|-", "obqa|sink_window|0.5", "obqa|sink_window|8"]
    per_token = metrics.kv_bytes_per_token(tiny_llama(vocab_size=VOCAB))  # 2 * 3 layers * 2 heads * 16 * 4
    assert per_token == 768
    for cell in cells.values():
        assert cell["status"] == "ok", cell.get("error")
        assert CELL_FIELDS <= set(cell), CELL_FIELDS - set(cell)
        assert 0.0 <= cell["accuracy"] <= 1.0 and cell["n_examples"] == 3
        assert cell["prefill_seconds"] > 0 and cell["seconds"] > 0
        assert isinstance(cell["kv_bytes"], int)
        context = cell["context_tokens"]
        assert context > 50
        # bytes held = kept tokens x bytes per token, exactly (one row, nothing else stored)
        assert cell["kv_bytes"] == round(cell["kv_tokens_kept"]) * per_token
    assert cells["obqa|full|-"]["kept_fraction"] == 1.0
    assert cells["obqa|full|-"]["kv_bytes"] == cells["obqa|full|-"]["context_tokens"] * per_token
    half = cells["obqa|sink_window|0.5"]
    assert half["budget_tokens"] == math.ceil(0.5 * half["context_tokens"])
    assert half["kv_tokens_kept"] == half["budget_tokens"]
    assert cells["obqa|sink_window|8"]["kv_bytes"] == 8 * per_token
    assert cells["obqa|sink_window|8"]["kept_fraction"] == pytest.approx(8 / context)
    # table on stdout, one row per cell
    table = [line for line in captured.out.splitlines() if line.startswith("| obqa")]
    assert len(table) == 3 and "sink_window | 8 |" in table[2]
    # the printed report is also saved beside results.json, line for line up to the file paths
    saved = (out / "report.md").read_text()
    assert captured.out.startswith(saved) and [line for line in saved.splitlines() if line.startswith("| obqa")] == table
    assert "timings are medians over 2 repeats" in saved.splitlines()[-1]
    assert captured.out[len(saved):].startswith(f"report: {out / 'report.md'}\n")
    assert (out / "table.md").read_text() == "an experiment's own table\n"  # left as it was
    png = out / "accuracy_vs_kv_kept.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_finished_cells(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--model", str(tiny_dir), "--strategies", "sink_window", "--tasks", "speed@40", "--repeats", "2",
            "--decode-tokens", "3", "--out", str(out), "--no-progress", "--no-plots"]
    assert _run_cli(base + ["--budgets", "0.5"], capsys)[0] == 0
    first = json.loads((out / "results.json").read_text())["cells"]
    cell = first["speed@40|sink_window|0.5"]
    assert cell["decode_tokens_per_s"] > 0 and cell["kv_tokens_kept"] == 20 and cell["context_tokens"] == 40
    assert _run_cli(base + ["--budgets", "0.5,10", "--resume"], capsys)[0] == 0
    second = json.loads((out / "results.json").read_text())["cells"]
    assert list(second) == ["speed@40|sink_window|0.5", "speed@40|sink_window|10"]
    assert second["speed@40|sink_window|0.5"] == cell  # not re-run
    assert second["speed@40|sink_window|10"]["kv_tokens_kept"] == 10


def test_resume_with_a_narrower_selection_keeps_the_other_finished_cells(tiny_dir, tmp_path, capsys):
    """Running one task (or budget) at a time into one folder with --resume accumulates every cell."""
    out = tmp_path / "run"
    base = ["--model", str(tiny_dir), "--strategies", "sink_window", "--tasks", "speed@40", "--repeats", "1",
            "--decode-tokens", "2", "--out", str(out), "--no-progress", "--no-plots"]
    assert _run_cli(base + ["--budgets", "0.5"], capsys)[0] == 0
    assert _run_cli(base + ["--budgets", "10", "--resume"], capsys)[0] == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert list(cells) == ["speed@40|sink_window|10", "speed@40|sink_window|0.5"]  # this run's grid first
    assert _run_cli(base + ["--budgets", "0.5"], capsys)[0] == 0  # without --resume: a fresh results.json
    assert list(json.loads((out / "results.json").read_text())["cells"]) == ["speed@40|sink_window|0.5"]


def test_a_last_resume_over_the_whole_selection_runs_nothing_and_describes_the_whole_grid(tiny_dir, tmp_path,
                                                                                         capsys):
    """experiments/long_runs.sh: processes with disjoint selections fill one folder, then a --resume run of the whole
    selection finds every cell done, runs none, and rewrites results.json in the whole grid's order and config."""
    out = tmp_path / "run"
    base = ["--model", str(tiny_dir), "--strategies", "sink_window", "--tasks", "speed@40", "--repeats", "1",
            "--decode-tokens", "2", "--out", str(out), "--no-progress", "--no-plots", "--resume"]
    assert _run_cli(base + ["--budgets", "10"], capsys)[0] == 0
    assert _run_cli(base + ["--budgets", "0.5"], capsys)[0] == 0
    parts = json.loads((out / "results.json").read_text())
    assert parts["config"]["cells"] == ["speed@40|sink_window|0.5"]  # the last part's grid
    assert _run_cli(base + ["--budgets", "0.5,10"], capsys)[0] == 0
    whole = json.loads((out / "results.json").read_text())
    assert whole["config"]["cells"] == list(whole["cells"]) == ["speed@40|sink_window|0.5", "speed@40|sink_window|10"]
    assert set(parts["cells"]) == set(whole["cells"])
    for key, cell in whole["cells"].items():  # the parts' measured timings (a re-run measures other floats)
        assert cell["decode_tokens_per_s"] == parts["cells"][key]["decode_tokens_per_s"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--strategies", "full,nope"], "unknown strategy 'nope'"),
        (["--tasks", "nope"], "unknown task 'nope'"),
        (["--budgets", "1.5"], "must be in (0, 1]"),
        (["--budgets", "0.0"], "must be in (0, 1]"),
        (["--budgets", "-0.1"], "must be in (0, 1]"),
        (["--budgets", "0"], "must be >= 1"),
        (["--budgets", "ten"], "neither a kept fraction"),
        (["--tasks", "speed@x"], "bad context length"),
    ],
)
def test_bad_arguments_exit_with_message(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--out", str(tmp_path / "o"), "--no-progress"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_model_name_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", str(tmp_path / "no-such-model"), "--tasks", "obqa", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--model" in err and "cannot load model" in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_python_m_entry_point_reports_errors():
    proc = subprocess.run([sys.executable, "-m", "kvcompress.bench", "--strategies", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown strategy 'nope'" in proc.stderr and proc.stdout == ""


def test_console_scripts_are_installed():
    """pyproject's [project.scripts]: both commands resolve to the CLI mains (they return exit codes)."""
    from importlib.metadata import entry_points

    from kvcompress import train
    from kvcompress.bench import cli

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("kvcompress")}
    assert scripts["kvcompress-bench"].load() is cli.main
    assert scripts["kvcompress-train-anchor"].load() is train.main
    assert cli.main(["--list"]) == 0


def test_parse_budget():
    assert runner.parse_budget("0.1").fraction == 0.1 and runner.parse_budget("0.1").tokens is None
    assert runner.parse_budget("256").tokens == 256
    assert runner.parse_budget("1").tokens == 1 and runner.parse_budget("1.0").fraction == 1.0
    assert runner.parse_budget("0.1").resolve(1000) == 100 and runner.parse_budget("0.1").resolve(3) == 1
    assert runner.parse_budget("256").resolve(100) == 256


def test_budget_free_strategies_run_once():
    from kvcompress.strategies import AnchorCache

    assert not FullCache.uses_budget and not AnchorCache.uses_budget and SinkWindowCache.uses_budget
    budgets = [runner.parse_budget("0.1"), runner.parse_budget("0.5")]
    cells = runner.grid([("ppl@64", None, 64)], ["full", "anchor", "sink_window"], budgets)
    assert [(c.strategy, c.budget.label) for c in cells] == [
        ("full", "-"), ("anchor", "-"), ("sink_window", "0.1"), ("sink_window", "0.5")]


def _reference_logprobs(model, ids):
    with torch.no_grad():
        return model(ids).logits.float().log_softmax(-1)[0]


def test_continuation_logprobs_match_a_full_forward():
    """Batched, right-padded scoring on a cached prefix == summed log-probs of one uncached forward."""
    model = tiny_llama(vocab_size=VOCAB)
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, VOCAB, (1, 17), generator=gen)
    queries = [[5, 6, 7], [5, 6, 7], [9]]
    conts = [[11], [12, 13, 14, 15], [20, 21]]
    cache = FullCache(model)
    metrics.prefill(model, cache, prefix)
    seen_before = cache.get_seq_length()
    scores = metrics.continuation_logprobs(model, cache, queries, conts)
    assert cache.get_seq_length() == seen_before  # the cache itself is untouched
    for query, cont, score in zip(queries, conts, scores):
        ids = torch.cat([prefix, torch.tensor([query + cont])], dim=-1)
        logprobs = _reference_logprobs(model, ids)
        start = prefix.shape[1] + len(query)
        expected = sum(logprobs[start - 1 + i, t].item() for i, t in enumerate(cont))
        assert score == pytest.approx(expected, abs=1e-4)


def test_streaming_nll_with_full_cache_equals_one_forward():
    model = tiny_llama(vocab_size=VOCAB)
    ids = torch.randint(3, VOCAB, (1, 50), generator=torch.Generator().manual_seed(1))
    total, count = metrics.streaming_nll(model, FullCache(model), ids, chunk=16)
    logprobs = _reference_logprobs(model, ids)
    expected = -logprobs[:-1].gather(-1, ids[0, 1:, None]).sum().item()
    assert count == 49
    assert total == pytest.approx(expected, rel=1e-5)
    # a compressing cache changes the result (the check above can fail)
    lossy, _ = metrics.streaming_nll(model, SinkWindowCache(model, n_sink=1, window=2), ids, chunk=16)
    assert abs(lossy - expected) > 1e-3


def test_kv_stats_equal_kept_tokens():
    model = tiny_llama(vocab_size=VOCAB)
    cache = SinkWindowCache(model, n_sink=2, window=8)
    metrics.prefill(model, cache, torch.randint(3, VOCAB, (1, 40)))
    stats = metrics.kv_stats(cache, model, 40)
    assert stats["kv_tokens_kept"] == 10 and stats["kept_fraction"] == 0.25
    assert stats["kv_bytes"] == 10 * metrics.kv_bytes_per_token(model) and stats["kv_bytes_fraction"] == 0.25


def test_kv_stats_average_layers_that_keep_different_counts():
    """Issue 20, item 3: pyramidkv keeps 30 / 20 / 10 tokens in layers 0 / 1 / 2 at a mean budget of 20, so the kept
    fraction of a 40-token context is 60 / (3 x 40) = 0.5 (the max over layers would report 0.75)."""
    from kvcompress.strategies import PyramidKVCache

    model = tiny_llama(vocab_size=VOCAB)
    cache = PyramidKVCache(model, budget=20, window=10)
    metrics.prefill(model, cache, torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2)))
    assert cache.kept_counts()[:, 0].tolist() == cache.layer_budgets == [30, 20, 10]
    stats = metrics.kv_stats(cache, model, 40)
    assert stats["kv_tokens_kept"] == 20 and stats["kept_fraction"] == 0.5
    assert stats["kv_bytes"] == 60 * metrics.kv_bytes_per_token(model) // 3 and stats["kv_bytes_fraction"] == 0.5


def test_kv_stats_average_kv_heads_that_keep_different_counts():
    """kvzip's global allocation keeps `budget` pairs per layer and kv head on average, heads keeping different
    counts: the kept fraction is that average (0.25 here), not the largest head's count (which is more)."""
    from kvcompress.strategies import KVzipCache
    from kvcompress.testing import CharTokenizer

    model = tiny_llama(vocab_size=VOCAB)
    cache = KVzipCache(model, CharTokenizer(), budget=10, n_sink=0)
    metrics.prefill(model, cache, torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3)))
    counts = torch.stack([layer.valid.sum(dim=-1)[0] for layer in cache.layers])  # (L, Hkv)
    assert counts.float().mean().item() == 10 and counts.max() > 10  # unequal heads, 10 on average
    stats = metrics.kv_stats(cache, model, 40)
    assert stats["kv_tokens_kept"] == 10 and stats["kept_fraction"] == 0.25 == stats["kv_bytes_fraction"]


def test_pyramidkv_cell_reports_the_mean_over_layers(tiny_dir, tmp_path, capsys):
    """The same through the CLI: a cell of a strategy whose layers keep different counts reports the mean over
    layers, and its kept fraction equals its KV-bytes fraction."""
    out = tmp_path / "run"
    code, _ = _run_cli(["--model", str(tiny_dir), "--strategies", "pyramidkv", "--tasks", "speed@40", "--budgets",
                        "0.5", "--repeats", "1", "--decode-tokens", "2", "--out", str(out), "--no-progress",
                        "--no-plots"], capsys)
    assert code == 0
    cell = json.loads((out / "results.json").read_text())["cells"]["speed@40|pyramidkv|0.5"]
    assert cell["status"] == "ok", cell.get("error")
    assert cell["budget_tokens"] == 20 and cell["kv_tokens_kept"] == 20 and cell["kept_fraction"] == 0.5
    assert cell["kv_bytes"] == 20 * 768 and cell["kv_bytes_fraction"] == 0.5


@pytest.mark.parametrize("fraction, context, tokens", [(0.5, 41, 21), (0.1, 1024, 103), (0.25, 10, 3),
                                                       (0.3, 7, 3), (0.001, 40, 1), (1.0, 41, 41)])
def test_a_kept_fraction_resolves_to_whole_tokens_rounding_up(fraction, context, tokens):
    """ceil(fraction x context), at least 1: a budget never keeps less than the fraction asked for (rounding down
    would give 20 of 41 at 0.5 and 102 of 1,024 at 0.1). Independent of the CLI tests, whose contexts may be even."""
    assert runner.Budget(str(fraction), fraction=fraction).resolve(context) == tokens


def test_icl_task_cells(tiny_dir, tmp_path, capsys):
    """sst2 through kvcompress.bench.icl: its own construction for label_words, the budget path for sink_window."""
    out = tmp_path / "run"
    code, _ = _run_cli(["--model", str(tiny_dir), "--strategies", "full,label_words,sink_window", "--tasks", "sst2",
                        "--budgets", "0.5", "--limit", "3", "--out", str(out), "--no-progress", "--no-plots"], capsys)
    assert code == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert set(cells) == {"sst2|full|-", "sst2|label_words|-", "sst2|sink_window|0.5"}
    for cell in cells.values():
        assert cell["status"] == "ok", cell.get("error")
        assert 0 <= cell["accuracy"] <= 1 and 0 <= cell["loyalty"] <= 1 and cell["n_examples"] == 3
        assert cell["kv_bytes"] == round(cell["kv_tokens_kept"]) * 768
    assert cells["sst2|full|-"]["kept_fraction"] == 1.0 and cells["sst2|full|-"]["loyalty"] == 1.0
    half = cells["sst2|sink_window|0.5"]
    assert half["kv_tokens_kept"] == math.ceil(0.5 * half["context_tokens"])
    assert cells["sst2|label_words|-"]["kept_fraction"] < 1.0


def test_prepare_error_becomes_that_tasks_error_cells(tiny_dir, tmp_path, capsys, monkeypatch):
    """Regression (issue 11.1): a task whose `prepare` fails (e.g. missing data) records the error in its own
    cells; the other tasks still run, the table is printed, and the exit status is non-zero."""
    from kvcompress.bench import tasks

    def broken(*args, **kwargs):
        raise FileNotFoundError("planted: no data for piqa")

    monkeypatch.setattr(tasks.TASKS["piqa"], "prepare", broken)
    out = tmp_path / "run"
    code, captured = _run_cli(["--model", str(tiny_dir), "--strategies", "full,sink_window", "--tasks", "piqa,obqa",
                               "--budgets", "0.5", "--limit", "2", "--repeats", "1", "--out", str(out),
                               "--no-progress", "--no-plots"], capsys)
    assert code != 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert list(cells) == ["piqa|full|-", "piqa|sink_window|0.5", "obqa|full|-", "obqa|sink_window|0.5"]
    for key in ("piqa|full|-", "piqa|sink_window|0.5"):
        assert cells[key]["status"] == "error"
        assert cells[key]["error"] == "FileNotFoundError: planted: no data for piqa"
    assert all(cells[key]["status"] == "ok" for key in ("obqa|full|-", "obqa|sink_window|0.5"))
    assert "| piqa | full | - | error: FileNotFoundError: planted" in captured.out
    assert "| obqa | sink_window | 0.5 | acc" in captured.out
    assert "2 cell(s) failed" in captured.err


def test_ruler_cells_both_query_modes_and_leaderboard(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, captured = _run_cli(["--model", str(tiny_dir), "--strategies", "full,sink_window", "--tasks",
                               "ruler_vt@512,ruler_niah_multikey@512", "--query", "before,after", "--budgets", "0.5",
                               "--limit", "1", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, captured.err
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert set(cells) == {f"{t}{q}|{s}" for t in ("ruler_vt@512", "ruler_niah_multikey@512") for q in ("", ":before")
                          for s in ("full|-", "sink_window|0.5")}
    for key, cell in cells.items():
        assert cell["status"] == "ok", cell.get("error")
        assert cell["query"] == ("before" if ":before" in key else "after")
        assert 0 <= cell["accuracy"] <= 1 and cell["n_examples"] == 1 and len(cell["answers"]) == 1
        # the budget follows the compressed prefix, which holds the question only in `before` mode
        assert cell["prompt_tokens"] <= 512 and cell["context_tokens"] < cell["prompt_tokens"]
        # the cap on the answer, and the tokens each answer took (a miss at the cap was cut by it)
        assert cell["answer_tokens"] == ruler.ANSWER_TOKENS[cell["task_name"].removeprefix("ruler_")]
        assert all(1 <= answer["tokens"] <= cell["answer_tokens"] for answer in cell["answers"])
    after, before = cells["ruler_vt@512|sink_window|0.5"], cells["ruler_vt@512:before|sink_window|0.5"]
    assert before["context_tokens"] > after["context_tokens"]
    assert after["kv_tokens_kept"] == math.ceil(0.5 * after["context_tokens"])
    assert "RULER avg, query after [95% CI] | RULER avg, query before [95% CI]" in captured.out
    assert (out / "leaderboard.png").is_file()


def test_score_table_puts_tasks_side_by_side():
    def cell(task, strategy, budget, **score):
        return {"status": "ok", "task": task, "strategy": strategy, "budget": budget, **score}

    results = {"cells": {str(i): c for i, c in enumerate([
        cell("ppl@2048", "sink_window", "0.1", perplexity=28.123, accuracy=None),
        cell("sst2", "sink_window", "0.1", accuracy=0.75),
        cell("sst2", "full", "-", accuracy=0.792),
        cell("ppl@2048", "full", "-", perplexity=25.5),
        cell("speed@1024", "full", "-"),  # no score: not a column
        {"status": "error", "task": "obqa", "strategy": "full", "budget": "-"},
    ])}}
    assert runner.score_table(results).splitlines() == [
        "| strategy | budget | ppl@2048 (ppl) | sst2 (acc) |",
        "|---|---|---:|---:|",
        "| full | - | 25.50 | 0.792 |",
        "| sink_window | 0.1 | 28.12 | 0.750 |",
    ]
    del results["cells"]["0"], results["cells"]["3"]
    assert runner.score_table(results) == ""  # one scored task: nothing to put side by side


def test_anchor_rows_on_an_untrained_model_are_labelled_untrained(tiny_dir, tmp_path, capsys):
    """Issue 17 item 5: the AnLLM rule on a model never anchor-trained is marked in the table (and the cell records
    it), so it is not read as the trained anchor models' result."""
    from kvcompress.bench.plots import strategy_label

    out = tmp_path / "run"
    code, captured = _run_cli(["--model", str(tiny_dir), "--strategies", "full,anchor,anchor:keep_segments=2",
                               "--tasks", "obqa", "--limit", "2", "--out", str(out), "--no-progress", "--no-plots"],
                              capsys)
    assert code == 0, captured.err
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert cells["obqa|anchor|-"]["anchor_trained"] is False
    assert cells["obqa|anchor|-"]["anchor_rule"] == {"keep_first": 0, "keep_segments": 1}  # the paper's rule
    assert cells["obqa|anchor:keep_segments=2|-"]["anchor_rule"] == {"keep_first": 0, "keep_segments": 2}
    assert "anchor_trained" not in cells["obqa|full|-"]
    rows = [line for line in captured.out.splitlines() if line.startswith("| obqa")]
    assert "| anchor (untrained) |" in rows[1] and "(untrained)" not in rows[0]
    assert strategy_label({"strategy": "anchor:model=smollm2-135m-anchor-ac", "anchor_trained": True}) == \
        "anchor:model=smollm2-135m-anchor-ac"


def test_shots_sets_the_demonstrations_and_a_resume_with_other_shots_is_refused(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--model", str(tiny_dir), "--strategies", "full", "--tasks", "boolq", "--limit", "2", "--out", str(out),
            "--no-progress", "--no-plots"]
    code, captured = _run_cli([*base, "--shots", "3"], capsys)
    assert code == 0, captured.err
    cell = json.loads((out / "results.json").read_text())["cells"]["boolq|full|-"]
    assert cell["shots"] == 3 and cell["n_examples"] == 2
    assert _run_cli([*base, "--shots", "3", "--resume"], capsys)[0] == 0  # same shots: resumes (nothing to run)
    for other in (["--shots", "4"], []):  # another count, or the task's default (2)
        with pytest.raises(SystemExit):
            cli.main([*base, *other, "--resume"])
        assert "used shots 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*base, "--shots", "-1"])


def test_answer_tokens_caps_the_ruler_answers_and_a_resume_with_another_cap_is_refused(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--model", str(tiny_dir), "--strategies", "full", "--tasks", "ruler_niah_single_number@512", "--limit",
            "2", "--out", str(out), "--no-progress", "--no-plots"]
    code, captured = _run_cli([*base, "--answer-tokens", "3"], capsys)
    assert code == 0, captured.err
    cell = json.loads((out / "results.json").read_text())["cells"]["ruler_niah_single_number@512|full|-"]
    assert cell["answer_tokens"] == 3 != ruler.ANSWER_TOKENS["niah_single_number"]
    assert all(1 <= answer["tokens"] <= 3 for answer in cell["answers"])
    assert _run_cli([*base, "--answer-tokens", "3", "--resume"], capsys)[0] == 0  # the same cap: nothing to run
    for other in (["--answer-tokens", "4"], []):  # another cap, or the kind's own (16)
        with pytest.raises(SystemExit):
            cli.main([*base, *other, "--resume"])
        assert "used answer_tokens 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*base, "--answer-tokens", "0"])


def test_share_prefill_gives_the_cells_of_a_run_without_it(tiny_dir, tmp_path, capsys):
    """--share-prefill (one prefill per sample for the cells of a task the core serves alike) changes no score, kept
    count or answer; cells that cannot share (quantized storage, n/a strategies) run alone."""
    argv = ["--model", str(tiny_dir), "--strategies", "snapkv,kvzip,h2o,sink_window:kv_bits=4,full,label_words",
            "--tasks", "ruler_niah_single_number@512,needle@512", "--query", "after,before", "--budgets", "0.25,0.5",
            "--limit", "2", "--no-progress", "--no-plots"]
    runs = {}
    for name, extra in (("alone", []), ("shared", ["--share-prefill"])):
        code, captured = _run_cli(argv + extra + ["--out", str(tmp_path / name)], capsys)
        assert code == 0, captured.err
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())["cells"]
    alone, shared = runs["alone"], runs["shared"]
    assert set(alone) == set(shared) and len(alone) == 2 * 2 * (4 * 2 + 2)
    same = ("status", "accuracy", "n_examples", "answers", "kv_bytes", "kv_tokens_kept", "kept_fraction",
            "budget_tokens", "context_tokens")
    units = {"snapkv": ["snapkv|0.25", "snapkv|0.5", "full|-"], "full": ["snapkv|0.25", "snapkv|0.5", "full|-"],
             "kvzip": ["kvzip|0.25", "kvzip|0.5"], "h2o": ["h2o|0.25", "h2o|0.5"]}
    for key, cell in alone.items():
        strategy = key.split("|")[1]
        assert cell["status"] == ("n/a" if strategy == "label_words" else "ok"), (key, cell.get("error"))
        assert {f: shared[key].get(f) for f in same} == {f: cell.get(f) for f in same}, key
        assert shared[key].get("prefill_shared_with") == units.get(strategy), key
        assert "shared_prefill_error" not in shared[key]
    assert json.loads((tmp_path / "shared" / "results.json").read_text())["config"]["share_prefill"] is True


def test_decode_together_gives_the_answers_of_decoding_one_by_one(tiny_dir, tmp_path, capsys):
    """--decode-together (a unit's caches answer in one forward per step, `CacheGroup`) gives every cell the answers
    and scores of decoding its cache alone here (a greedy token could flip only on a tie at float32's last bits;
    the qwen grid's measured flips are in docs/bench.md), journals apart from them, and no per-cell decode rate."""
    argv = ["--model", str(tiny_dir), "--strategies", "snapkv,kvzip,h2o,tova,full", "--tasks",
            "ruler_niah_single_number@512,needle@512", "--query", "after,before", "--budgets", "0.25,0.5",
            "--limit", "2", "--no-progress", "--no-plots", "--share-prefill"]
    runs = {}
    for name, extra in (("one_by_one", []), ("together", ["--decode-together"])):
        code, captured = _run_cli(argv + extra + ["--out", str(tmp_path / name)], capsys)
        assert code == 0, captured.err
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    alone, together = runs["one_by_one"]["cells"], runs["together"]["cells"]
    assert set(alone) == set(together) and len(alone) == 2 * 2 * (4 * 2 + 1)
    for key, cell in alone.items():
        mine = together[key]
        assert mine["status"] == cell["status"] == "ok", (key, mine.get("error"), mine.get("shared_prefill_error"))
        assert mine["accuracy"] == cell["accuracy"] and mine["kv_bytes"] == cell["kv_bytes"], key
        assert [a["answer"] for a in mine["answers"]] == [a["answer"] for a in cell["answers"]], key
        assert all(a["decoded_together"] == len(mine["prefill_shared_with"]) for a in mine["answers"]), key
        assert mine["decode_tokens_per_s"] is None and cell["decode_tokens_per_s"] is not None, key
    assert runs["together"]["config"]["decode_together"] is True
    journal = runner.sample_journal
    config = runner.RunConfig("m", "cpu", "float32", [], [], [], tmp_path / "j")
    fingerprints = {journal([], replace(config, decode_together=flag)).fingerprint for flag in (False, True)}
    assert len(fingerprints) == 2, "answers decoded together would resume from answers decoded one by one"


def test_a_failing_shared_unit_runs_its_cells_alone(tiny_dir, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(metrics, "prefill_shared", broken)  # the shared forward of more than one cache
    out = tmp_path / "run"
    code, captured = _run_cli(["--model", str(tiny_dir), "--strategies", "snapkv,full", "--tasks", "needle@512",
                               "--budgets", "0.5", "--limit", "2", "--no-progress", "--no-plots", "--share-prefill",
                               "--out", str(out)], capsys)
    assert code == 0, captured.err
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert len(cells) == 2
    for cell in cells.values():
        assert cell["status"] == "ok" and cell["shared_prefill_error"] == "RuntimeError: planted"
        assert "prefill_shared_with" not in cell


class Killed(BaseException):
    """What a kill does to a run: nothing in the bench catches it (KeyboardInterrupt would do, but pytest takes
    that one for itself)."""


def _killed_after(monkeypatch, samples: int | None):
    """Make the bench die (`Killed`) when it starts sample `samples` + 1 of this run, counted over all cells and units
    (None: never); returns the list of samples run (each a call of `SharedPrefillTask._run_sample`)."""
    from kvcompress.bench.tasks import SharedPrefillTask

    monkeypatch.undo()  # the real _run_sample again
    real, calls = SharedPrefillTask._run_sample, []

    def counted(self, *args, **kwargs):
        if samples is not None and len(calls) == samples:
            raise Killed
        calls.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SharedPrefillTask, "_run_sample", counted)
    return calls


def test_a_killed_run_resumes_inside_its_unit_and_equals_an_uninterrupted_one(tiny_dir, tmp_path, capsys,
                                                                                monkeypatch):
    """The sample journal: a run killed in its first unit's third sample, then resumed, runs only the samples it had
    not finished and ends with the scores, kept bytes and answers of a run never killed; the journals go once the
    cells are saved. A run without --resume does not take the journal."""
    argv = ["--model", str(tiny_dir), "--strategies", "snapkv,kvzip,full", "--tasks", "ruler_niah_single_number@512",
            "--budgets", "0.5", "--limit", "4", "--no-progress", "--no-plots", "--share-prefill"]
    code, captured = _run_cli(argv + ["--out", str(tmp_path / "whole")], capsys)
    assert code == 0, captured.err
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["cells"]
    assert not (tmp_path / "whole" / "samples").exists()

    out = tmp_path / "killed"
    calls = _killed_after(monkeypatch, 2)
    with pytest.raises(Killed):
        cli.main(argv + ["--out", str(out)])
    journals = sorted((out / "samples").glob("*.jsonl"))
    assert len(journals) == 2 and all(len(p.read_text().splitlines()) == 2 for p in journals)  # snapkv, full
    with open(journals[0], "a") as f:
        f.write('{"fingerprint": "cut short by the ki')  # a line a kill cut: skipped

    calls = _killed_after(monkeypatch, None)
    code, captured = _run_cli(argv + ["--out", str(out), "--resume"], capsys)
    assert code == 0, captured.err
    assert len(calls) == 4 - 2 + 4  # the snapkv+full unit's last two samples, then the kvzip cell's four
    resumed = json.loads((out / "results.json").read_text())["cells"]
    assert set(resumed) == set(whole)
    same = ("status", "accuracy", "n_examples", "answers", "kv_bytes", "kv_tokens_kept", "kept_fraction",
            "budget_tokens", "context_tokens", "prefill_shared_with")
    for key, cell in whole.items():
        assert {f: resumed[key].get(f) for f in same} == {f: cell.get(f) for f in same}, key
        assert resumed[key].get("resumed_samples") == (None if "kvzip" in key else 2), key
    assert not (out / "samples").exists()

    calls = _killed_after(monkeypatch, 2)  # killed again; this time the rerun is not a resume
    with pytest.raises(Killed):
        cli.main(argv + ["--out", str(out / "again")])
    calls = _killed_after(monkeypatch, None)
    code, captured = _run_cli(argv + ["--out", str(out / "again")], capsys)
    assert code == 0, captured.err
    assert len(calls) == 8
    assert all("resumed_samples" not in cell
               for cell in json.loads((out / "again" / "results.json").read_text())["cells"].values())


def test_a_unit_that_gained_a_cell_runs_only_that_cell_on_the_journaled_samples(tiny_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    """Resumed with one more strategy in the killed unit, the samples the journal holds run for the new cell alone
    (one prefill of one cache), the others for the whole unit; every cell as in a run never killed."""
    base = ["--model", str(tiny_dir), "--tasks", "needle@512", "--budgets", "0.5", "--limit", "3", "--no-progress",
            "--no-plots", "--share-prefill"]
    code, captured = _run_cli(base + ["--strategies", "snapkv,full,sink_window", "--out", str(tmp_path / "whole")],
                              capsys)
    assert code == 0, captured.err
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["cells"]
    out = tmp_path / "run"
    _killed_after(monkeypatch, 2)
    with pytest.raises(Killed):
        cli.main(base + ["--strategies", "snapkv,full", "--out", str(out)])
    prefilled = []
    calls = _killed_after(monkeypatch, None)
    monkeypatch.setattr(metrics, "prefill_caches", lambda model, caches, ids, real=metrics.prefill_caches:
                        prefilled.append(len(caches)) or real(model, caches, ids))
    code, captured = _run_cli(base + ["--strategies", "snapkv,full,sink_window", "--out", str(out), "--resume"],
                              capsys)
    assert code == 0, captured.err
    assert len(calls) == 3 and prefilled == [1, 1, 3]  # sink_window alone on the two journaled samples
    resumed = json.loads((out / "results.json").read_text())["cells"]
    for key, cell in whole.items():
        assert {f: resumed[key].get(f) for f in ("accuracy", "answers", "kv_bytes", "prefill_shared_with")} == \
            {f: cell.get(f) for f in ("accuracy", "answers", "kv_bytes", "prefill_shared_with")}, key
        assert resumed[key].get("resumed_samples") == (None if "sink_window" in key else 2), key


def test_a_journal_gives_a_sample_back_only_when_everything_matches(tmp_path):
    from kvcompress.bench.journal import SampleJournal

    entries = [{"prefill_seconds": 1.5, "seconds": 2.0, "cpu_seconds": 3.0,
                "record": {"score": 1.0, "answer": {"a": "x"}, "decode_rate": 0.1 + 0.2, "stats": {"kv_bytes": 7}}},
               {"prefill_seconds": 1.5, "seconds": 2.0, "cpu_seconds": 3.0,
                "record": {"score": 0.0, "answer": {"a": "y"}, "decode_rate": None, "stats": {"kv_bytes": 9}}}]
    keys, fingerprint = ["t|a|0.5", "t|b|0.5"], {"model": "m", "seed": 0}
    SampleJournal(tmp_path, keys, fingerprint).save(0, "d0", dict(enumerate(entries)))
    assert SampleJournal(tmp_path, keys, fingerprint).load(0, "d0") == entries  # floats exact through JSON
    assert SampleJournal(tmp_path, keys, fingerprint).load(0, "other digest") == [None, None]
    assert SampleJournal(tmp_path, keys, fingerprint).load(1, "d0") == [None, None]
    assert SampleJournal(tmp_path, keys, {"model": "m", "seed": 1}).load(0, "d0") == [None, None]
    assert SampleJournal(tmp_path, ["t|c|0.5"] + keys, fingerprint).load(0, "d0") == [None] + entries  # a new cell
    assert SampleJournal(tmp_path, keys[::-1], fingerprint).load(0, "d0") == entries[::-1]
    journal = SampleJournal(tmp_path, keys, fingerprint)
    with open(journal.paths[1], "a") as f:
        f.write('{"fingerprint": "a line a kill cut sh')
    journal.save(1, "d1", {1: entries[1]})
    assert journal.load(1, "d1") == [None, entries[1]] == SampleJournal(tmp_path, keys, fingerprint).load(1, "d1")
    assert SampleJournal(tmp_path, keys, fingerprint).load(0, "d0") == entries
    assert SampleJournal(tmp_path, keys, fingerprint, fresh=True).load(0, "d0") == [None, None]
    assert not (tmp_path / "samples").exists()


def test_a_journal_saves_when_another_process_removes_the_empty_folder(tmp_path, monkeypatch):
    """torchrun ranks share one --out: a rank's `discard` removes the samples folder once it is empty, which can fall
    between another rank's mkdir and its open (a fresh-clone run hit it: FileNotFoundError on the new journal). Here
    the folder is removed just before the first open; the save still lands."""
    import builtins

    from kvcompress.bench import journal as journal_module

    journal = journal_module.SampleJournal(tmp_path, ["t|a|0.5"], {"model": "m"})
    opened = []

    def open_after_a_discard(path, *args, **kwargs):
        if not opened:
            journal_module.discard(tmp_path, ["t|a|0.5"])  # the other rank: its cells saved, the folder empty
        opened.append(path)
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(journal_module, "open", open_after_a_discard, raising=False)
    entry = {"prefill_seconds": 1.0, "seconds": 1.0, "cpu_seconds": 1.0, "record": {"score": 1.0}}
    journal.save(0, "d0", {0: entry})
    assert len(opened) == 2  # the first open failed, the folder was made again
    monkeypatch.undo()
    assert journal_module.SampleJournal(tmp_path, ["t|a|0.5"], {"model": "m"}).load(0, "d0") == [entry]
