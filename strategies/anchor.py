"""AnchorCache: AnLLM anchor-based KV compression (Pang et al. 2024), EP and AC modes."""

from __future__ import annotations

import torch

from ..anchor_tokens import AC_TOKEN, anchor_token_id, sentence_end_ids
from ..cache import CompressedCache, CompressedLayer
from ..registry import register
from ..validate import as_int, as_token_ids

MODES = ("ep", "ac")


@register("anchor")
class AnchorCache(CompressedCache):
    """Keeps, per row, every anchor token plus the tokens after the row's last anchor (plus `keep_first`).

    Semantics: after every forward (prefix, prefill chunk or decode step) each row keeps the real tokens that are
    anchors, the real tokens after its last anchor, and its first `keep_first` real tokens; pads are dropped. A
    forward without an anchor drops nothing (everything since the last anchor is kept), so this is the paper's
    rule "compress after the prefix and whenever an anchor is fed". A generated anchor is fed in the NEXT forward,
    so it is compressed after that one. Tokens of one forward all see each other (plain causal attention inside
    a forward; the AnSAN mask is for training, `kvcompress.ansan`). The choice is by position, so every layer
    keeps the same tokens. Keys keep their original RoPE positions by default, as in the official code.

    Args:
        model: the causal LM this cache serves (its input embeddings get a pre-hook recording token ids).
        tokenizer: needed for the default anchors (EP: `anchor_tokens.sentence_end_ids`; AC: the `<AC>` id).
        anchor_ids: explicit anchor token ids (override the tokenizer's defaults): one integer (Python, numpy or
            0-d torch), a 1-D integer tensor / numpy array, or a list of integers; non-empty, all < vocab size.
        mode: "ep" (anchors are sentence ends; deviation: the official EP models use only ".") or "ac" (the
            dedicated token added by `anchor_tokens.add_anchor_token`).
        keep_first: number of first real tokens always kept (attention-sink style); 0 as in the paper.
        positions: "original" (default) or "cache" (see `CompressedCache`).
    """

    needs_token_ids = True

    def __init__(
        self,
        model,
        tokenizer=None,
        anchor_ids=None,
        mode: str = "ep",
        keep_first: int = 0,
        ac_token: str = AC_TOKEN,
        positions: str = "original",
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        keep_first = as_int(keep_first, "keep_first", minimum=0)
        vocab = model.get_input_embeddings().weight.shape[0]
        if anchor_ids is None:
            if tokenizer is None:
                raise ValueError("AnchorCache needs anchor_ids or a tokenizer to derive them from")
            anchor_ids = sentence_end_ids(tokenizer) if mode == "ep" else [anchor_token_id(tokenizer, ac_token)]
        anchor_ids = sorted(set(as_token_ids(anchor_ids, "anchor_ids")))
        if not anchor_ids:
            raise ValueError("anchor_ids is empty: AnchorCache needs at least one anchor token id")
        outside = [i for i in anchor_ids if not 0 <= i < vocab]
        if outside:
            raise ValueError(f"anchor_ids {outside[:5]} are outside the model's vocabulary [0, {vocab})")
        super().__init__(model, positions=positions)
        self.mode, self.keep_first = mode, keep_first
        self.anchor_ids = torch.tensor(anchor_ids, dtype=torch.long)
        self._memo: tuple | None = None  # (seen, positions of layer 0) -> keep, shared by all layers

    @classmethod
    def _from_budget(cls, model, tokenizer, budget: int | None) -> AnchorCache:
        """EP mode with the tokenizer's sentence-end anchors; its size follows the text, not `budget`."""
        return cls(model, tokenizer=tokenizer)

    def is_anchor(self, positions: torch.Tensor) -> torch.Tensor:
        """Bool, same shape as `positions` ((B, S) or (B, H, S); -1 = empty): the tokens there are anchors."""
        ids = self.ids_at(positions)
        return torch.isin(ids, self.anchor_ids.to(ids.device)) & (positions >= 0)

    def select(self, layer: CompressedLayer) -> torch.Tensor:
        positions = layer.positions  # (B, 1, S): every layer writes and frees the same slots
        memo = self._memo
        if memo is not None and memo[0] == layer.seen and torch.equal(memo[1], positions):
            return memo[2]
        valid = positions >= 0
        anchor = self.is_anchor(positions) & valid
        last_anchor = torch.where(anchor, positions, -1).amax(dim=-1, keepdim=True)  # (B, 1, 1), -1: none
        keep = valid & (anchor | (positions > last_anchor) | (layer.stream_rank() < self.keep_first))
        self._memo = (layer.seen, positions.clone(), keep)
        return keep

    def reset(self) -> None:
        super().reset()
        self._memo = None

    def _reindex_rows(self, index: torch.Tensor) -> None:
        super()._reindex_rows(index)
        self._memo = None  # its keep mask is per row
