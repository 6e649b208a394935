"""LabelWordCache: keep only the label words and formatting tokens of in-context demonstrations.

"Label Words are Anchors" (Wang et al. 2023), Hidden_anchor: the demonstrations are prefilled once (every token
attends to the whole prefix before it, as in full in-context learning); then only the keys/values of the formatting
tokens ("Review:", "\\nSentiment: <label>\\n") and of the label words are kept, and the test input attends to those.

Pieces:
- `IclTemplate`: formats demonstrations and queries, and returns the character spans of the kept text.
- `match_anchor_tokens`: the tokenizer-aware matcher, character spans -> token positions (rule below).
- `LabelWordCache`: the strategy; keeps given stream positions of the prefix, and everything after the prefix.
- `CompressedPrefix`: prefill a prefix once, answer many queries from copies of the compressed cache.

Matching rule: a token is kept iff its character range [a, b) overlaps a kept span [s, e) (a < e and s < b). So a
label that tokenizes into several pieces keeps all of them, and a token that straddles a span boundary (a BPE merge
of demonstration text with format text) is kept. Tokens with an empty range (special tokens) are never matched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..cache import CompressedCache, CompressedLayer, cache_arg
from ..registry import register


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


@register("label_words")
class LabelWordCache(CompressedCache):
    """Keeps, of the first `prefix_length` stream positions (the demonstrations), only `keep_positions` and the
    first `n_first` positions; every position from `prefix_length` on (the test input, generated tokens) is kept.

    Eviction waits until the whole prefix has been seen (so a prefix fed in chunks is compressed once, as if fed in
    one forward): every demonstration token attends to the full prefix before it, the query only to what is kept.
    The same positions are kept in every layer. Deviation from the paper: none in the kept set; the paper's
    Hidden_anchor also keeps the KV (not recomputed) of the kept tokens, as here.

    Args:
        model: the causal LM this cache serves.
        keep_positions: stream positions (columns of the fed input, pads included) to keep: one sequence for every
            row, or one per batch row (lists or a 1-D/2-D long tensor). Usually `match_anchor_tokens(...).positions`.
        prefix_length: number of stream positions of the compressed prefix (>= 1).
        n_first: also keep the first `n_first` positions (attention sinks); default 0.
        positions: "original" (default) or "cache" (see `CompressedCache`).
    """

    def __init__(self, model, keep_positions, prefix_length: int, n_first: int = 0, positions: str = "original"):
        if isinstance(prefix_length, bool) or not isinstance(prefix_length, int) or prefix_length < 1:
            raise ValueError(f"prefix_length must be an integer >= 1, got {prefix_length!r}")
        if isinstance(n_first, bool) or not isinstance(n_first, int) or n_first < 0:
            raise ValueError(f"n_first must be an integer >= 0, got {n_first!r}")
        if isinstance(keep_positions, torch.Tensor):
            keep_positions = keep_positions.tolist()
        if keep_positions is None or len(keep_positions) == 0:
            raise ValueError("keep_positions is empty: nothing of the demonstrations would be kept")
        rows = [keep_positions] if not isinstance(keep_positions[0], Sequence) else list(keep_positions)
        table = torch.zeros(len(rows), prefix_length, dtype=torch.bool)
        for r, row in enumerate(rows):
            for p in row:
                if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < prefix_length:
                    raise ValueError(f"keep position {p!r} is not an integer in [0, prefix_length={prefix_length})")
                table[r, p] = True
        table[:, :n_first] = True
        super().__init__(model, positions=positions)
        self.prefix_length, self.n_first = prefix_length, n_first
        self.keep_table = table  # (R, prefix_length) bool, R = 1 (shared) or the batch size

    @classmethod
    def for_budget(cls, model, tokenizer, budget):
        raise ValueError(
            "label_words keeps the label/format tokens of a given prompt, not a token budget; build it with "
            "LabelWordCache(model, keep_positions, prefix_length) (see kvcompress.bench.icl)"
        )

    @property
    def kept_prefix_tokens(self) -> torch.Tensor:
        """(R,) number of prefix positions kept per row (R = 1 when rows share `keep_positions`)."""
        return self.keep_table.sum(dim=-1)

    def select(self, layer: CompressedLayer) -> torch.Tensor:
        positions = layer.positions
        if layer.seen < self.prefix_length:
            return layer.valid  # the prefix is not complete yet
        table = self.keep_table.to(positions.device)
        if table.shape[0] not in (1, positions.shape[0]):
            raise ValueError(f"keep_positions has {table.shape[0]} rows but the batch has {positions.shape[0]}")
        table = table.expand(positions.shape[0], -1)
        in_prefix = (positions >= 0) & (positions < self.prefix_length)
        chosen = table.gather(-1, positions.clamp(0, self.prefix_length - 1))
        return layer.valid & (~in_prefix | chosen)


class CompressedPrefix:
    """A prefix (e.g. the demonstrations) prefilled once into `cache`; each query is answered from a copy of the
    compressed cache (`cache.clone()`), never by recomputing the prefix.

    Args:
        model: the causal LM.
        cache: a fresh kvcompress cache (LabelWordCache, FullCache, ...).
        prefix_ids: (B, P) long input ids of the prefix.
    """

    def __init__(self, model, cache: CompressedCache, prefix_ids: torch.Tensor):
        if prefix_ids.ndim != 2 or prefix_ids.shape[-1] == 0:
            raise ValueError(f"prefix_ids must be (B, P) with P >= 1, got shape {tuple(prefix_ids.shape)}")
        if cache.get_seq_length() != 0:
            raise ValueError("the cache must be fresh (it has already seen tokens)")
        self.model, self.cache, self.prefix_ids = model, cache, prefix_ids
        with torch.no_grad():
            model(prefix_ids, **cache_arg(cache), use_cache=True)

    @property
    def kv_tokens(self) -> int:
        """Tokens kept by layer 0 of the compressed prefix (row 0)."""
        return int(self.cache.kept_counts()[0, 0])

    def next_token_logits(self, query_ids: torch.Tensor) -> torch.Tensor:
        """(B, V) logits for the token after `query_ids` (B, q), attending to the compressed prefix."""
        cache = self.cache.clone()
        with torch.no_grad():
            return self.model(query_ids, **cache_arg(cache), use_cache=True).logits[:, -1]

    def generate(self, query_ids: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        """`model.generate` on prefix + query from a copy of the compressed cache; returns the sequences."""
        ids = torch.cat([self.prefix_ids, query_ids], dim=-1)
        generate_kwargs.setdefault("attention_mask", torch.ones_like(ids))
        return self.model.generate(ids, **cache_arg(self.cache.clone()), **generate_kwargs)
