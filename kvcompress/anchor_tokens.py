"""Anchor tokens for AnLLM (Pang et al. 2024): EP (sentence ends) and AC (a dedicated `<AC>` token).

EP rule used here: an anchor is every ordinary (non-special) vocabulary token whose decoded text, with trailing
spaces and tabs removed, ends in ".", "?", "!" or "\\n" (so "." and also merged BPE tokens such as ".\\n", ")."
"?\\"" is not included: it ends in a quote). Deviation: the official AnLLM-EP models use only the token "."; a
wider set closes more sentences (more compression) and also fires on "e.g." or "3." inside sentences. Pass
`endings=(".",)` for a rule closer to the paper, or explicit ids to `AnchorCache`.

AC: `add_anchor_token` adds `<AC>` as a special token, resizes the embeddings and initialises the new row(s);
`format_with_anchor` appends the token after every sentence of a text.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

SENTENCE_ENDINGS = (".", "?", "!", "\n")
AC_TOKEN = "<AC>"
AC_INITS = ("period", "mean")


def sentence_end_ids(tokenizer, endings: Iterable[str] = SENTENCE_ENDINGS) -> list[int]:
    """Ids of the non-special tokens of `tokenizer` whose decoded text (trailing spaces/tabs stripped) ends with
    one of `endings`. Raises ValueError if there is none."""
    endings = tuple(endings)
    special = set(tokenizer.all_special_ids)
    ids = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id]).rstrip(" \t")
        if text.endswith(endings):
            ids.append(token_id)
    if not ids:
        raise ValueError(f"no token of this tokenizer ends with any of {endings!r}; pass anchor_ids explicitly")
    return ids


def anchor_token_id(tokenizer, token: str = AC_TOKEN) -> int:
    """Id of the AC anchor token; ValueError if it was not added with `add_anchor_token`."""
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise ValueError(
            f"the tokenizer has no anchor token {token!r}: call kvcompress.anchor_tokens.add_anchor_token(model, "
            "tokenizer) first (AC mode), or use mode='ep'"
        )
    return vocab[token]


def add_anchor_token(model, tokenizer, token: str = AC_TOKEN, init: str = "period") -> int:
    """Add the AC anchor token to `tokenizer` and `model` (in place) and return its id. Idempotent.

    Args:
        init: how the new input embedding row (and output row, if untied) starts: "period" = copy of the "."
            token's row (the official AnLLM code; default: the model first treats <AC> like a sentence end) or
            "mean" = the mean of all rows (the paper's text).
    """
    if init not in AC_INITS:
        raise ValueError(f"init must be one of {AC_INITS}, got {init!r}")
    if token in tokenizer.get_vocab():
        token_id = tokenizer.get_vocab()[token]
        if token_id < model.get_input_embeddings().weight.shape[0]:
            return token_id
    else:
        tokenizer.add_tokens([token], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    old = model.get_input_embeddings().weight.shape[0]
    if token_id >= old:
        model.resize_token_embeddings(token_id + 1, mean_resizing=False)
    period = tokenizer.encode(".", add_special_tokens=False)
    with torch.no_grad():
        for matrix in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}.values():
            weight = matrix.weight
            if init == "period" and len(period) == 1:
                weight[token_id] = weight[period[0]]
            else:
                weight[token_id] = weight[:old].mean(dim=0)
    return token_id


_SENTENCE_END = re.compile(r"([.!?]+[\"')\]]*)(?=\s|$)")


def format_with_anchor(text: str, token: str = AC_TOKEN) -> str:
    """`text` with `token` appended right after every sentence end: a run of ".", "!" or "?" (plus closing
    quotes or brackets) followed by whitespace or the end of the text. "It is. Yes!" -> "It is.<AC> Yes!<AC>"."""
    return _SENTENCE_END.sub(lambda m: m.group(1) + token, text)


class InsertsAnchors:
    """Mixin for a tokenizer of an AC-trained model: `tokenizer(text)` and `tokenizer.encode(text)` insert `<AC>` after
    every sentence of plain text (`format_with_anchor`) before tokenizing, so an AC model gets its anchors without
    the user writing them. `decode(..., skip_special_tokens=True)` hides them again (`<AC>` is a special token).
    Text that already holds the token, pre-split words and token ids are left as they are; set
    `tokenizer.insert_anchors = False` to turn it off. Applied by `insert_anchors(tokenizer)`."""

    insert_anchors = True
    anchor_token = AC_TOKEN

    def _with_anchors(self, text):
        if not self.insert_anchors:
            return text
        if isinstance(text, str):
            return text if self.anchor_token in text else format_with_anchor(text, self.anchor_token)
        if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
            return [self._with_anchors(t) for t in text]
        return text

    def __call__(self, text=None, *args, **kwargs):
        if not kwargs.get("is_split_into_words"):
            text = self._with_anchors(text)
        return super().__call__(text, *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        if not kwargs.get("is_split_into_words"):
            text = self._with_anchors(text)
        return super().encode(text, *args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        """Saved as the plain tokenizer class (reloadable with AutoTokenizer; `insert_anchors` is not saved)."""
        cls = type(self)
        self.__class__ = cls.__mro__[2]
        try:
            return self.save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = cls


def insert_anchors(tokenizer, token: str = AC_TOKEN):
    """Make `tokenizer` (in place; it must already know `token`) insert `token` after every sentence of the plain text
    it tokenizes (`InsertsAnchors`). Returns the tokenizer."""
    anchor_token_id(tokenizer, token)
    if not isinstance(tokenizer, InsertsAnchors):
        base = type(tokenizer)
        tokenizer.__class__ = type(f"AnchorInserting{base.__name__}", (InsertsAnchors, base), {})
    tokenizer.anchor_token = token
    return tokenizer
