"""RULER-style synthetic long-context tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), generated offline and deterministically from a seed.

Pure functions: `generate(kind, tokenizer, length, seed, essays)` builds one `Sample` whose prompt is at most
`length` tokens of `tokenizer` (and within `LENGTH_TOLERANCE` of it), and `score(prediction, answers)` is RULER's
`string_match_all`: the fraction of the expected strings found (case-insensitive) in the generated text. The bench
task that feeds them through a compressed cache is `kvcompress.bench.tasks.Ruler`.

Kinds (RULER's names in brackets; templates follow RULER's `synthetic.yaml`):

| kind | RULER | haystack | what is asked | answers |
|---|---|---|---|---|
| niah_single_number | niah_single_2 | essays | the value of one key | one 7-digit number |
| niah_single_word | (niah, word values) | essays | the value of one key | one adjective-noun word |
| niah_single_uuid | niah_single_3 | essays | the value of one key | one UUID |
| niah_multikey | niah_multikey_1 | essays + 3 distractor keys | the value of one key | one number |
| niah_multivalue | niah_multivalue | essays | all 4 values of one key | 4 numbers |
| niah_multiquery | niah_multiquery | essays | the values of 4 keys | 4 numbers |
| vt | vt (1 chain, 4 hops) | RULER's noise sentences | the variables holding a value | 5 names |
| cwe | cwe (freq 30 vs 3 at >= 4K) | a numbered word list (essay words) | the 10 most common words | 10 words |
| fwe | fwe (Zipf alpha 2) | coded words | the 3 most frequent coded words | 3 words |

A sample is split into `context` (instruction + haystack: what a query-agnostic cache compresses), `question` and
`answer_prefix`; `tasks.Ruler` places the question before or after the compression point (`--query`).
Deviations from RULER: plain text prompts (no chat template), smaller answer budgets (`ANSWER_TOKENS`, for CPU
cost), and the keys/words come from a small built-in word list instead of the `wonderwords` package.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from dataclasses import dataclass, field

KINDS = ("niah_single_number", "niah_single_word", "niah_single_uuid", "niah_multikey", "niah_multivalue",
         "niah_multiquery", "vt", "cwe", "fwe")
# Greedy answer budget per kind, in tokens (RULER: niah 128, vt 30, cwe 120, fwe 50).
ANSWER_TOKENS = {"niah_single_number": 16, "niah_single_word": 16, "niah_single_uuid": 40, "niah_multikey": 16,
                 "niah_multivalue": 48, "niah_multiquery": 48, "vt": 30, "cwe": 64, "fwe": 32}
LENGTH_TOLERANCE = 0.02  # a generated prompt has between (1 - 0.02) * length and length tokens

_ADJECTIVES = ("abrasive adorable aloof ancient bashful bitter brave breezy brisk calm clever clumsy crisp curious "
               "dapper dazzling eager elastic fancy fierce fragile gentle gloomy graceful grumpy hollow humble icy "
               "jagged jolly lively lofty lucky mellow mighty misty nimble noisy obedient odd polite quaint quick "
               "rapid rustic shaggy shiny silent sleepy sly smooth sour spiky stormy sturdy swift tame tender tidy "
               "vivid wary witty zany").split()
_NOUNS = ("anchor apricot badger basket beacon beetle biscuit blanket bramble canoe cactus camel candle carrot "
          "castle cello comet copper cricket dolphin falcon ferret fiddle garnet glacier harbor hazel helmet "
          "kettle lantern lemon lizard magnet maple meadow mitten nectar otter paddle pebble pecan pepper "
          "pillow pumpkin quilt raven ribbon saddle salmon sparrow spindle teapot thistle tulip violin walnut "
          "whistle willow yacht").split()
_VT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass
class Sample:
    """One generated example. `context + question + answer_prefix` is the whole prompt (plain text);
    `answers` are the strings `score` looks for; `tokens` is the prompt's token count under the tokenizer used."""

    kind: str
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    tokens: int = 0
    info: dict = field(default_factory=dict)


def score(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_all: the fraction of `answers` found in `prediction` (case-insensitive), in [0, 1]."""
    if not answers:
        raise ValueError("answers must hold at least one expected string")
    text = prediction.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def cut_short(prediction: str, answers: list[str]) -> bool:
    """Whether `prediction` ends in the first k >= 2 characters (not all) of an expected answer whose first 2
    characters occur nowhere else in it (case-insensitive, as `score`): a first attempt at the answer cut off by the
    answer budget ("... is 4931" for 4931027), not a wrong attempt followed by a second ("1. 9892 2. 9893"). Telling
    for a miss that took the whole budget."""
    text = prediction.rstrip().lower()
    return any(text.endswith(answer[:k]) and text.count(answer[:2]) == 1
               for answer in map(str.lower, answers) for k in range(2, len(answer)))


def prompt_tokens(tokenizer, sample: Sample) -> list[list[int]]:
    """Token ids of [context, question, answer_prefix], each tokenized on its own (as the bench feeds them)."""
    return [tokenizer(part, add_special_tokens=(i == 0)).input_ids
            for i, part in enumerate((sample.context, sample.question, sample.answer_prefix))]


def generate(kind: str, tokenizer, length: int, seed: int, essays: str) -> Sample:
    """One sample of `kind` whose prompt has at most `length` tokens (and at least (1 - LENGTH_TOLERANCE) * length).

    `essays` is the haystack text (the bundled Paul Graham essays; any long English text works). The same
    (kind, tokenizer, length, seed, essays) always gives the same sample. Raises ValueError for an unknown `kind`
    or a `length` too short for the task.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown RULER kind {kind!r}; choose from {', '.join(KINDS)}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 256:
        raise ValueError(f"length must be an integer >= 256 tokens, got {length!r}")
    build = _builder(kind, tokenizer, seed, essays, length)

    def count(size: int) -> int:
        return sum(len(ids) for ids in prompt_tokens(tokenizer, build(size)))

    low, high = 1, 2
    while count(high) <= length:  # grow until too long, then bisect on the haystack size
        low, high = high, high * 2
    if count(low) > length:
        raise ValueError(f"length={length} is too short for RULER task {kind!r}")
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if count(mid) <= length else (low, mid)
    sample = build(low)
    sample.tokens = count(low)
    if sample.tokens < (1 - LENGTH_TOLERANCE) * length:
        raise ValueError(f"could not fit RULER task {kind!r} to {length} tokens (got {sample.tokens})")
    return sample


# ------------------------------------------------------------------------------------------------------------
# Builders: seed -> (haystack size -> Sample). Everything random is drawn before the size is known, so every size
# of one seed has the same needles, keys and words (the bisection only changes the amount of filler).


def _builder(kind: str, tokenizer, seed: int, essays: str, length: int):
    rng = random.Random(f"{kind}:{seed}")
    if kind.startswith("niah"):
        return _niah(kind, rng, tokenizer, essays[: 12 * length])  # >= length tokens for any BPE tokenizer
    if kind == "vt":
        return _vt(rng)
    if kind == "cwe":  # RULER's 30 repeats of each common word at >= 4K; fewer for shorter prompts (>= 6 > 3)
        return _cwe(rng, essays, freq_common=max(6, min(30, 30 * length // 4096)))
    return _fwe(rng)


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _value(kind: str, rng: random.Random) -> str:
    if kind == "niah_single_word":
        return _key(rng)
    if kind == "niah_single_uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return str(rng.randint(1_000_000, 9_999_999))


def _niah(kind: str, rng: random.Random, tokenizer, essays: str):
    noun = {"niah_single_word": "words", "niah_single_uuid": "uuids"}.get(kind, "numbers")
    keys = []
    while len(keys) < 4:
        key = _key(rng)
        if key not in keys:
            keys.append(key)
    if kind == "niah_multivalue":
        needles = [(keys[0], _value(kind, rng)) for _ in range(4)]
        queried = keys[:1]
    elif kind in ("niah_multikey", "niah_multiquery"):
        needles = [(key, _value(kind, rng)) for key in keys]
        queried = keys[:1] if kind == "niah_multikey" else keys
    else:
        needles = [(keys[0], _value(kind, rng))]
        queried = keys[:1]
    rng.shuffle(needles)
    depths = sorted(rng.random() for _ in needles)
    answers = [value for key, value in needles if key in queried]
    haystack_ids = tokenizer(essays, add_special_tokens=False).input_ids
    query = queried[0] if len(queried) == 1 else ", ".join(queried[:-1]) + ", and " + queried[-1]

    def build(size: int) -> Sample:
        text = tokenizer.decode(haystack_ids[:size])
        for (key, value), depth in reversed(list(zip(needles, depths))):  # from the end: earlier offsets stay valid
            at = _sentence_end(text, int(depth * len(text)))
            text = text[:at] + f" One of the special magic {noun} for {key} is: {value}." + text[at:]
        context = (f"Some special magic {noun} are hidden within the following text. Make sure to memorize it. "
                   f"I will quiz you about the {noun} afterwards.\n{text}\n")
        return Sample(kind, context, f"What are all the special magic {noun} for {query} mentioned in the "
                      "provided text?", f" The special magic {noun} for {query} mentioned in the provided text are",
                      answers, info={"needles": needles, "depths": depths})

    return build


def _sentence_end(text: str, at: int) -> int:
    """The offset just after the first sentence end ('.', '?', '!') at or after `at` (or `at` if none is near)."""
    match = re.compile(r"[.?!]").search(text, at, at + 400)
    return match.end() if match else at


def _vt(rng: random.Random):
    names = []
    while len(names) < 5:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
    slots = sorted(rng.random() for _ in chain)

    def build(size: int) -> Sample:
        noise = _VT_NOISE.split(". ")
        sentences = [noise[i % len(noise)].rstrip(".") + "." for i in range(size)]
        for statement, slot in reversed(list(zip(chain, slots))):
            sentences.insert(int(slot * size), statement)
        context = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                   + " ".join(sentences) + "\n")
        return Sample("vt", context, f"Question: Find all variables that are assigned the value {value} in the "
                      "text above.", " Answer: According to the chain(s) of variable assignment in the text "
                      f"above, 5 variables are assigned the value {value}, they are:", list(names),
                      info={"chain": chain})

    return build


def _cwe(rng: random.Random, essays: str, common: int = 10, freq_common: int = 30, freq_rare: int = 3):
    vocabulary = sorted({w for w in re.findall(r"[a-z]+", essays.lower()) if 4 <= len(w) <= 10})
    words = rng.sample(vocabulary, len(vocabulary))
    top, rest = words[:common], words[common:]
    shuffle_seed = rng.getrandbits(32)

    def build(size: int) -> Sample:
        if size > len(rest) * freq_rare:
            raise ValueError("the essays hold too few distinct words for this length")
        rare = [w for w in rest[: -(-size // freq_rare)] for _ in range(freq_rare)][:size]  # size rare lines
        shuffled = _shuffled(top * freq_common + rare, shuffle_seed)
        listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(shuffled))
        context = ("Below is a numbered list of words. In these words, some appear more often than others. "
                   f"Memorize the ones that appear most often.\n{listing}\n")
        return Sample("cwe", context, f"Question: What are the {common} most common words in the above list?",
                      f" Answer: The top {common} words that appear most often in the list are:", list(top))

    return build


def _shuffled(items: list[str], seed: int) -> list[str]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def _fwe(rng: random.Random, alpha: float = 2.0, vocab_size: int = 1000):
    vocabulary = []
    seen = set()
    while len(vocabulary) < vocab_size:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6)))
        if word not in seen:
            seen.add(word)
            vocabulary.append(word)
    vocabulary[0] = "...."  # RULER: the most frequent "word" is noise dots, not an answer
    weights = [1 / (rank ** alpha) for rank in range(1, vocab_size + 1)]
    stream = rng.choices(vocabulary, weights=weights, k=20_000)

    def build(size: int) -> Sample:
        if size > len(stream):
            raise ValueError("length too large for the fwe generator")
        words = stream[:size]
        counts = {w: words.count(w) for w in vocabulary[:8]}
        ranked = sorted((w for w in counts if w != "...."), key=lambda w: (-counts[w], vocabulary.index(w)))
        context = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                   f"frequently appeared coded words. {' '.join(words)}\n")
        return Sample("fwe", context, "Question: Do not provide any explanation. Please ignore the dots '....'. "
                      "What are the three most frequently appeared words in the above coded text?",
                      " Answer: According to the coded text above, the three most frequently appeared words are:",
                      ranked[:3], info={"counts": counts})

    return build
