"""Prompts for label-word anchors (Wang et al. 2023): ICL templates and the tokenizer-aware matcher.

- `IclTemplate`: formats demonstrations and queries, and returns the character spans of the kept text
  (the formatting tokens "Review:", "\\nSentiment: <label>\\n" and the label words).
- `match_anchor_tokens`: character spans -> token positions, the `keep_positions` of
  `kvcompress.strategies.LabelWordCache`.

Matching rule: a token is kept iff its character range [a, b) overlaps a kept span [s, e) (a < e and s < b). So a
label that tokenizes into several pieces keeps all of them, and a token that straddles a span boundary (a BPE merge
of demonstration text with format text) is kept. Tokens with an empty range (special tokens) are never matched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class IclTemplate:
    """The prompt format of a classification task.

    A demonstration is `f"{input_prefix} {text}{label_prefix} {label}{separator}"`, a query is
    `f"{input_prefix} {text}{label_prefix}"` (the model then predicts `" " + label`). Kept spans of a demonstration:
    `input_prefix`, and `label_prefix + " " + label + separator`.

    Args:
        input_prefix: e.g. "Review:".
        label_prefix: e.g. "\\nSentiment:".
        label_words: one word per class, class index = position in the tuple.
        separator: text closing a demonstration (default "\\n").
    """

    input_prefix: str
    label_prefix: str
    label_words: tuple[str, ...]
    separator: str = "\n"

    def __post_init__(self):
        if len(self.label_words) < 2 or len(set(self.label_words)) != len(self.label_words):
            raise ValueError(f"label_words must hold at least 2 distinct words, got {self.label_words!r}")
        if not self.input_prefix or not self.label_prefix:
            raise ValueError("input_prefix and label_prefix must be non-empty")

    def _label(self, label: int) -> str:
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(self.label_words):
            raise ValueError(f"label must be a class index in [0, {len(self.label_words)}), got {label!r}")
        return self.label_words[label]

    def demonstrations(self, demos: Sequence[tuple[str, int]]) -> tuple[str, list[tuple[int, int]]]:
        """(prompt text, kept character spans) for `demos` = [(text, class index), ...] in order."""
        if len(demos) == 0:
            raise ValueError("the demonstration set is empty: label-word compression needs at least one demonstration")
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        length = 0
        for text, label in demos:
            word = self._label(label)
            head = f"{self.input_prefix} {text}"
            tail = f"{self.label_prefix} {word}{self.separator}"
            spans.append((length, length + len(self.input_prefix)))
            spans.append((length + len(head), length + len(head) + len(tail)))
            parts += [head, tail]
            length += len(head) + len(tail)
        return "".join(parts), spans

    def query(self, text: str) -> str:
        """The test input, ending with the label prefix (the next token is the label)."""
        return f"{self.input_prefix} {text}{self.label_prefix}"

    def text_anchor(self, demos: Sequence[tuple[str, int]]) -> str:
        """Text_anchor prompt: the demonstrations with their input text removed (format and labels kept as text)."""
        text, spans = self.demonstrations(demos)
        return "".join(text[s:e] for s, e in spans)

    def find_spans(self, prompt: str, require_all_labels: bool = True) -> list[tuple[int, int]]:
        """Kept character spans in a prompt written in this template (e.g. by hand).

        Raises ValueError if the prompt holds no demonstration, if a label slot holds no label word, or (with
        `require_all_labels`) if a label word never occurs.
        """
        spans: list[tuple[int, int]] = []
        seen_labels: set[str] = set()
        start = prompt.find(self.input_prefix)
        if start < 0:
            raise ValueError(f"the prompt holds no demonstration (no {self.input_prefix!r}): empty demonstration set")
        while start >= 0:
            slot = prompt.find(self.label_prefix, start + len(self.input_prefix))
            if slot < 0:
                raise ValueError(f"demonstration at character {start} has no {self.label_prefix!r} label slot")
            after = prompt[slot + len(self.label_prefix) :]
            word = next((w for w in self.label_words if after.startswith(f" {w}{self.separator}")), None)
            if word is None:
                raise ValueError(
                    f"label word missing from the prompt: the label slot at character {slot} is followed by "
                    f"{after[:20]!r}, not one of {self.label_words}"
                )
            seen_labels.add(word)
            end = slot + len(self.label_prefix) + 1 + len(word) + len(self.separator)
            spans += [(start, start + len(self.input_prefix)), (slot, end)]
            start = prompt.find(self.input_prefix, end)
        missing = [w for w in self.label_words if w not in seen_labels]
        if require_all_labels and missing:
            raise ValueError(f"label word(s) missing from the prompt: {missing}")
        return spans


def token_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets [a, b) of `text` (no special tokens added). Needs a fast tokenizer."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as error:
        raise TypeError("the label-word matcher needs a fast tokenizer (one that returns offset mappings)") from error
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def overlapping_tokens(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """Indices of the tokens whose non-empty character range [a, b) overlaps some span [s, e) (a < e and s < b)."""
    return [
        i for i, (a, b) in enumerate(offsets) if a < b and any(a < e and s < b for s, e in spans)
    ]


@dataclass(frozen=True)
class AnchorMatch:
    """The matcher's result: `input_ids` of the prompt, their `offsets`, and the kept token `positions`."""

    input_ids: list[int]
    offsets: list[tuple[int, int]]
    positions: list[int]


def match_anchor_tokens(tokenizer, text: str, spans: Sequence[tuple[int, int]]) -> AnchorMatch:
    """Tokenize `text` and find the tokens of the kept character `spans` (overlap rule, see the module doc)."""
    if not spans:
        raise ValueError("no label/format spans given: empty demonstration set")
    for s, e in spans:
        if not 0 <= s < e <= len(text):
            raise ValueError(f"span ({s}, {e}) is empty or outside the prompt of {len(text)} characters")
    ids, offsets = token_offsets(tokenizer, text)
    return AnchorMatch(ids, offsets, overlapping_tokens(offsets, spans))
