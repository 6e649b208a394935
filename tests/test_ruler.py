"""kvcompress.bench.ruler: RULER-style generators (deterministic per seed, exact token budget, answers really in the
context, checked by independent counting) and the scorer on known strings; the bench task's query modes."""

import collections
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kvcompress.bench import ruler, tasks

ESSAYS = tasks.essays_text()


def _tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on the essays (offline, fast): the generators work with any tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([ESSAYS[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


TOK = _tokenizer()


@pytest.mark.parametrize("kind", ruler.KINDS)
def test_deterministic_per_seed_and_seeds_differ(kind):
    a, b = (ruler.generate(kind, TOK, 600, seed=3, essays=ESSAYS) for _ in range(2))
    other = ruler.generate(kind, TOK, 600, seed=4, essays=ESSAYS)
    assert (a.context, a.question, a.answer_prefix, a.answers) == (b.context, b.question, b.answer_prefix, b.answers)
    assert other.answers != a.answers


@pytest.mark.parametrize("kind", ruler.KINDS)
@pytest.mark.parametrize("length", [600, 1200])
def test_prompt_fits_the_token_budget(kind, length):
    sample = ruler.generate(kind, TOK, length, seed=0, essays=ESSAYS)
    counted = sum(len(TOK(part, add_special_tokens=False).input_ids)
                  for part in (sample.context, sample.question, sample.answer_prefix))
    assert counted == sample.tokens
    assert (1 - ruler.LENGTH_TOLERANCE) * length <= sample.tokens <= length


def _needles(context: str) -> list[tuple[str, str]]:
    return re.findall(r"One of the special magic \w+ for ([\w-]+) is: ([\w-]+)\.", context)


@pytest.mark.parametrize("kind, n_needles, n_answers", [
    ("niah_single_number", 1, 1), ("niah_single_word", 1, 1), ("niah_single_uuid", 1, 1), ("niah_multikey", 4, 1),
    ("niah_multivalue", 4, 4), ("niah_multiquery", 4, 4)])
def test_niah_needles_are_in_the_context_and_the_answers_are_their_values(kind, n_needles, n_answers):
    for seed in range(3):
        sample = ruler.generate(kind, TOK, 800, seed=seed, essays=ESSAYS)
        needles = _needles(sample.context)
        assert len(needles) == n_needles and len(sample.answers) == n_answers
        asked = re.search(r"for (.+) mentioned", sample.question).group(1).replace(", and ", ", ").split(", ")
        assert sorted(sample.answers) == sorted(value for key, value in needles if key in asked)
        if kind == "niah_multikey":  # three distractor keys, none of them asked
            assert len({key for key, _ in needles}) == 4 and len(asked) == 1
        if kind == "niah_single_uuid":
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", sample.answers[0])


def test_vt_answers_are_the_chain_that_holds_the_value():
    sample = ruler.generate("vt", TOK, 800, seed=1, essays=ESSAYS)
    value = re.search(r"assigned the value (\d+)", sample.question).group(1)
    assignments = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", sample.context))
    resolved = {}
    for name in assignments:  # follow each chain independently of the generator
        target = assignments[name]
        while target.startswith("VAR "):
            target = assignments[target[4:]]
        resolved[name] = target
    assert sorted(sample.answers) == sorted(n for n, v in resolved.items() if v == value) and len(sample.answers) == 5


def test_cwe_and_fwe_answers_are_the_most_frequent_words_counted_independently():
    cwe = ruler.generate("cwe", TOK, 1500, seed=2, essays=ESSAYS)
    counts = collections.Counter(re.findall(r"^\d+\. (\w+)$", cwe.context, flags=re.M))
    top = [w for w, c in counts.most_common() if c == counts.most_common(1)[0][1]]
    assert sorted(top) == sorted(cwe.answers) and len(top) == 10
    assert min(counts[w] for w in cwe.answers) > 3 and max(c for w, c in counts.items() if w not in top) == 3
    fwe = ruler.generate("fwe", TOK, 1500, seed=2, essays=ESSAYS)
    text = fwe.context.split("coded words. ", 1)[1]
    ranked = [w for w, _ in collections.Counter(w for w in text.split() if w != "....").most_common(3)]
    assert ranked == fwe.answers


def test_score_on_known_strings():
    assert ruler.score("The special magic numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert ruler.score("The special magic number is 1234567.", ["1234567", "7654321"]) == 0.5
    assert ruler.score("BRAVE-OTTER", ["brave-otter"]) == 1.0  # case-insensitive, as RULER
    assert ruler.score("nothing here", ["MTOWO", "GPPQP", "UHPQG", "ORCMA"]) == 0.0
    with pytest.raises(ValueError, match="answers"):
        ruler.score("x", [])


def test_cut_short_tells_a_first_attempt_cut_off_from_a_wrong_one():
    assert ruler.cut_short(":\n\n1. The magic number for dazzling-mitten is 4931", ["4931027"])
    assert ruler.cut_short("The special magic word is BRAV", ["brave-otter"])  # case-insensitive, as `score`
    assert ruler.cut_short("is 49 ", ["4931027"])  # trailing space
    assert not ruler.cut_short(":\n\n1. 9892\n2. 9893", ["9893205"])  # a wrong attempt, then a second start
    assert not ruler.cut_short("1. 493127\n2. 49", ["4931027"])
    assert not ruler.cut_short("the number is 4", ["4931027"])  # one character: chance
    assert not ruler.cut_short("the number is 4931027", ["4931027"])  # whole: a right answer, not a cut one
    assert not ruler.cut_short("the number is 5931", ["4931027"])
    assert ruler.cut_short("values: 1234567 and 76", ["1234567", "7654321"])  # the second of several, begun


def test_bad_input_names_the_parameter():
    with pytest.raises(ValueError, match="unknown RULER kind"):
        ruler.generate("qa", TOK, 1000, 0, ESSAYS)
    with pytest.raises(ValueError, match="length"):
        ruler.generate("vt", TOK, 100, 0, ESSAYS)
    with pytest.raises(ValueError, match="query mode"):
        tasks.parse_task("ruler_vt@1024:sideways", {})
    with pytest.raises(ValueError, match="no query mode"):
        tasks.parse_task("ppl@1024:before", {})


def test_query_modes_split_the_same_tokens_at_a_different_point():
    """`after` compresses the context only; `before` the context and the question. Same ids in the same order."""
    specs = {label: task for label, task, _ in tasks.parse_task("ruler_niah_multikey@600", {}, ("after", "before"))}
    assert set(specs) == {"ruler_niah_multikey@600", "ruler_niah_multikey@600:before"}
    after = specs["ruler_niah_multikey@600"].prepare(TOK, limit=1, seed=0, length=600, options={})["samples"][0]
    before = specs["ruler_niah_multikey@600:before"].prepare(TOK, limit=1, seed=0, length=600, options={})["samples"][0]
    assert torch.equal(torch.cat([after["prefix"], after["tail"]], 1), torch.cat([before["prefix"], before["tail"]], 1))
    sample = ruler.generate("niah_multikey", TOK, 600, 0, ESSAYS)
    context, question, answer_prefix = ruler.prompt_tokens(TOK, sample)
    assert after["prefix"].shape[1] == len(context) and before["prefix"].shape[1] == len(context) + len(question)
    assert before["tail"].shape[1] == len(answer_prefix)


@pytest.mark.integration
def test_lengths_in_the_bundled_models_tokens(smollm2):
    _, tokenizer = smollm2
    for length in (2048, 4096, 8192):
        for kind in ruler.KINDS:
            sample = ruler.generate(kind, tokenizer, length, seed=0, essays=ESSAYS)
            assert sum(map(len, ruler.prompt_tokens(tokenizer, sample))) == sample.tokens
            assert (1 - ruler.LENGTH_TOLERANCE) * length <= sample.tokens <= length, (kind, length, sample.tokens)


def _cell(kind, strategy, budget, query, score, kept):
    return {"status": "ok", "task_name": f"ruler_{kind}", "context_length": 4096, "query": query,
            "strategy": strategy, "budget": budget, "accuracy": score, "kept_fraction": kept, "n_examples": 1}


def test_leaderboard_averages_the_tasks_every_row_has():
    from kvcompress.bench import leaderboard

    cells = [_cell("vt", "full", "-", "after", 1.0, 1.0), _cell("cwe", "full", "-", "after", 0.5, 1.0),
             _cell("fwe", "full", "-", "after", 0.0, 1.0),  # the other rows lack fwe (a partial run)
             _cell("vt", "sink_window", "0.1", "after", 0.0, 0.1), _cell("cwe", "sink_window", "0.1", "after", 0.2, 0.1),
             _cell("vt", "sink_window", "0.1", "before", 1.0, 0.1), _cell("cwe", "sink_window", "0.1", "before", 0.4, 0.1),
             {"status": "error", "task_name": "ruler_fwe", "strategy": "sink_window", "budget": "0.1"}]
    results = {"cells": {str(i): c for i, c in enumerate(cells)}, "environment": {"model": "m"}}
    rows = {(r["strategy"], r["query"]): r for r in leaderboard.ruler_rows(results)}
    assert rows[("full", "after")]["average"] == pytest.approx(0.75)  # fwe shown, not averaged
    assert rows[("sink_window", "after")]["average"] == pytest.approx(0.1)
    assert rows[("sink_window", "before")]["average"] == pytest.approx(0.7)
    table = leaderboard.leaderboard_table(results)
    assert "| 4096 | sink_window | 0.1 | 0.100 | 10.0 | 70.0 |" in table
    assert "| 4096 | full | - | 1.000 | 75.0 | - |" in table
    assert "| **75.0** | 2 | 1 |" in leaderboard.ruler_table(results)


def test_leaderboard_average_interval_is_wilson_at_the_effective_size():
    """Two tasks answered right 30 of 30 times: the average's interval is Wilson's at 60 samples, [0.940, 1], not
    the zero-width [1, 1] a percentile bootstrap gives."""
    from kvcompress.bench import leaderboard, stats

    def answered(kind, scores):
        cell = _cell(kind, "full", "-", "after", sum(scores) / len(scores), 1.0)
        cell.update(n_examples=len(scores), answers=[{"score": s, "expected": ["x"]} for s in scores])
        return cell

    results = {"cells": {"a": answered("niah_single_word", [1.0] * 30), "b": answered("niah_multikey", [1.0] * 30)},
               "environment": {"model": "m"}}
    (row,) = leaderboard.ruler_rows(results)
    assert (row["ci"]["low"], row["ci"]["high"]) == stats.wilson(60, 60)
    assert row["ci"]["low"] == pytest.approx(0.9398, abs=1e-4)
