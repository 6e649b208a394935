"""LabelWordCache: keep only the label words and formatting tokens of in-context demonstrations.

"Label Words are Anchors" (Wang et al. 2023), Hidden_anchor: the demonstrations are prefilled once (every token
attends to the whole prefix before it, as in full in-context learning); then only the keys/values of the formatting
tokens ("Review:", "\\nSentiment: <label>\\n") and of the label words are kept, and the test input attends to those.

- `LabelWordCache`: the strategy; keeps given stream positions of the prefix, and everything after the prefix.
- `CompressedPrefix`: prefill a prefix once, answer many queries from copies of the compressed cache.
The positions to keep come from `kvcompress.icl_prompts` (templates and the tokenizer-aware matcher).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..cache import CompressedCache, CompressedLayer, cache_arg
from ..registry import register
from ..validate import as_int


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
        prefix_length = as_int(prefix_length, "prefix_length", minimum=1)
        n_first = as_int(n_first, "n_first", minimum=0)
        if isinstance(keep_positions, torch.Tensor):
            keep_positions = keep_positions.tolist()
        if keep_positions is None or len(keep_positions) == 0:
            raise ValueError("keep_positions is empty: nothing of the demonstrations would be kept")
        rows = [keep_positions] if not isinstance(keep_positions[0], Sequence) else list(keep_positions)
        table = torch.zeros(len(rows), prefix_length, dtype=torch.bool)
        for r, row in enumerate(rows):
            for p in row:
                name = f"each keep position (keep_positions, prefix_length={prefix_length})"
                table[r, as_int(p, name, minimum=0, maximum=prefix_length - 1)] = True
        table[:, :n_first] = True
        super().__init__(model, positions=positions)
        self.prefix_length, self.n_first = prefix_length, n_first
        self.keep_table = table  # (R, prefix_length) bool, R = 1 (shared) or the batch size

    @classmethod
    def _from_budget(cls, model, tokenizer, budget):
        raise ValueError(
            "label_words keeps the label/format tokens of a given prompt, not a token budget; build it with "
            "LabelWordCache(model, keep_positions, prefix_length) (see kvcompress.bench.icl)"
        )

    def _reindex_rows(self, index: torch.Tensor) -> None:
        super()._reindex_rows(index)
        if self.keep_table.shape[0] > 1:  # one row of keep positions per batch row: they move with the rows
            self.keep_table = self.keep_table[index.to(self.keep_table.device)]

    @property
    def kept_prefix_tokens(self) -> torch.Tensor:
        """(R,) number of prefix positions kept per row (R = 1 when rows share `keep_positions`)."""
        return self.keep_table.sum(dim=-1)

    def select(self, layer: CompressedLayer) -> torch.Tensor:
        positions = layer.positions  # (B, 1, S)
        if layer.seen < self.prefix_length:
            return layer.valid  # the prefix is not complete yet
        table = self.keep_table.to(positions.device)
        if table.shape[0] not in (1, positions.shape[0]):
            raise ValueError(f"keep_positions has {table.shape[0]} rows but the batch has {positions.shape[0]}")
        table = table.expand(positions.shape[0], -1).unsqueeze(1).expand(-1, positions.shape[1], -1)
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
