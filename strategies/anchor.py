"""AnchorCache: AnLLM anchor-based KV compression (Pang et al. 2024), EP and AC modes."""

from __future__ import annotations

import torch

from ..anchor_model import PAPER_RULE, anchor_config
from ..anchor_tokens import AC_TOKEN, anchor_token_id, sentence_end_ids
from ..cache import CompressedCache, CompressedLayer
from ..registry import register
from ..validate import as_int, as_token_ids

MODES = ("ep", "ac")


def anchor_rule(model, keep_first: int | None = None, keep_segments: int | None = None) -> dict[str, int]:
    """{"keep_first": ..., "keep_segments": ...} an AnchorCache uses on `model`: the explicit values, else those the
    model's anchor configuration carries, else the paper's rule (0, 1)."""
    carried = anchor_config(model) or {}
    explicit = {"keep_first": keep_first, "keep_segments": keep_segments}
    return {k: explicit[k] if explicit[k] is not None else carried.get(k, paper) for k, paper in PAPER_RULE.items()}


@register("anchor")
class AnchorCache(CompressedCache):
    """Keeps, per row, every anchor token plus the tokens after the row's last anchor (plus `keep_first`; with
    `keep_segments=k`, the tokens after its k-th last anchor).

    Semantics: after every forward (prefix, prefill chunk or decode step) each row keeps the real tokens that are
    anchors, the real tokens after its last anchor, and its first `keep_first` real tokens; pads are dropped. A
    forward without an anchor drops nothing (everything since the last anchor is kept), so this is the paper's
    rule "compress after the prefix and whenever an anchor is fed". A generated anchor is fed in the NEXT forward,
    so it is compressed after that one. Tokens of one forward all see each other (plain causal attention inside
    a forward; the AnSAN mask is for training, `kvcompress.ansan`). The choice is by position, so every layer
    keeps the same tokens. Keys keep their original RoPE positions by default, as in the official code.

    Which tokens are anchors, in order of precedence: `anchor_ids`; the anchor configuration an anchor-trained model
    carries (`kvcompress.anchor_model.anchor_config`: mode and ids saved by `kvcompress-train-anchor`, e.g. the
    aliases `smollm2-135m-anchor-ep` / `-ac`); the tokenizer's defaults for `mode` (EP: sentence ends; AC: `<AC>`).

    `AnchorCache()` with no model: the cache binds to the model of the first forward that uses it (models from
    `kvcompress.models.load_model`, or `kvcompress.prepare(model)`), which must carry an anchor configuration:
    `model.generate(input_ids, past_key_values=AnchorCache())`.

    Args:
        model: the causal LM this cache serves (its input embeddings get a pre-hook recording token ids), or None.
        tokenizer: needed for the default anchors of an untrained model (EP: `anchor_tokens.sentence_end_ids`; AC:
            the `<AC>` id); for an anchor-trained model it is checked against the model's configuration.
        anchor_ids: explicit anchor token ids: one integer (Python, numpy or 0-d torch), a 1-D integer tensor /
            numpy array, or a list of integers; non-empty, all < vocab size.
        mode: "ep" (anchors are sentence ends; deviation: the official EP models use only ".") or "ac" (the
            dedicated token added by `anchor_tokens.add_anchor_token`); default: the model's configuration, else "ep".
        keep_first: number of first real tokens always kept (attention-sink style); 0 in the paper.
        keep_segments: how many of the newest segments stay whole: the tokens after the row's k-th last anchor
            are kept (1 is the paper's rule: the current, unfinished sentence; 2 also keeps the last finished
            sentence in full). A deviation for k > 1, measured in docs/anchor.md.
            Default of both (None): the model's anchor configuration when it carries them (the shipped
            `smollm2-135m-anchor-*` models carry keep_first=1, keep_segments=2, their measured best rule), else
            the paper's rule (0 and 1). Pass keep_first=0, keep_segments=1 for the paper's rule on any model.
        positions: "original" (default) or "cache" (see `CompressedCache`).
    """

    needs_token_ids = True

    def __init__(
        self,
        model=None,
        tokenizer=None,
        anchor_ids=None,
        mode: str | None = None,
        keep_first: int | None = None,
        keep_segments: int | None = None,
        ac_token: str = AC_TOKEN,
        positions: str = "original",
    ):
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if keep_first is not None:
            keep_first = as_int(keep_first, "keep_first", minimum=0)
        if keep_segments is not None:
            keep_segments = as_int(keep_segments, "keep_segments", minimum=1)
        if anchor_ids is not None:
            anchor_ids = sorted(set(as_token_ids(anchor_ids, "anchor_ids")))
            if not anchor_ids:
                raise ValueError("anchor_ids is empty: AnchorCache needs at least one anchor token id")
        self._options = dict(tokenizer=tokenizer, anchor_ids=anchor_ids, mode=mode, ac_token=ac_token)
        self.keep_first, self.keep_segments = keep_first, keep_segments  # None until bound: see _bind
        self._memo: tuple | None = None  # (seen, positions of layer 0) -> keep, shared by all layers
        if model is not None:
            self._bind(model)
        super().__init__(model, positions=positions)

    def _bind(self, model) -> None:
        """Resolve mode and anchor ids for `model` (see the class docstring); ValueError when they conflict or
        cannot be found."""
        tokenizer, anchor_ids, mode, ac_token = (self._options[k] for k in ("tokenizer", "anchor_ids", "mode",
                                                                             "ac_token"))
        config = anchor_config(model)
        if config is not None:
            if mode is not None and mode != config["mode"]:
                raise ValueError(f"this model was anchor-trained in {config['mode'].upper()} mode but "
                                 f"AnchorCache(mode={mode!r}) asks for {mode.upper()} anchors; omit mode (or pass "
                                 f"mode={config['mode']!r})")
            mode = config["mode"]
            if tokenizer is not None and mode == "ac":
                token_id = anchor_token_id(tokenizer, config.get("ac_token", ac_token))
                if [token_id] != list(config["anchor_ids"]):
                    raise ValueError(f"the tokenizer gives {config.get('ac_token', ac_token)!r} the id {token_id} but "
                                     f"the model was trained with anchor id {config['anchor_ids']}: use the tokenizer "
                                     "saved with the model")
            anchor_ids = anchor_ids or sorted(config["anchor_ids"])
        rule = anchor_rule(model, self.keep_first, self.keep_segments)
        self.keep_first, self.keep_segments = rule["keep_first"], rule["keep_segments"]
        mode = mode or "ep"
        if anchor_ids is None:
            if tokenizer is None:
                raise ValueError(
                    f"{type(model).__name__} carries no anchor configuration (it was not trained with "
                    "kvcompress-train-anchor), so AnchorCache needs its anchors: AnchorCache(model, tokenizer) for "
                    "the tokenizer's sentence ends (EP), or anchor_ids=[...]; or load an anchor-trained model "
                    "(load_model('smollm2-135m-anchor-ep'))"
                )
            anchor_ids = sentence_end_ids(tokenizer) if mode == "ep" else [anchor_token_id(tokenizer, ac_token)]
            anchor_ids = sorted(set(anchor_ids))
        vocab = model.get_input_embeddings().weight.shape[0]
        outside = [i for i in anchor_ids if not 0 <= i < vocab]
        if outside:
            raise ValueError(f"anchor_ids {outside[:5]} are outside the model's vocabulary [0, {vocab})")
        self.mode = mode
        self.anchor_ids = torch.tensor(anchor_ids, dtype=torch.long)
        self._options = None  # resolved; the tokenizer is not kept (clones and pickles stay small)

    @classmethod
    def _from_budget(cls, model, tokenizer, budget: int | None, **options) -> AnchorCache:
        """The model's own anchors when it is anchor-trained, else EP mode with the tokenizer's sentence ends; its size
        follows the text, not `budget`. `options`: the constructor's (e.g. "anchor:keep_first=1:keep_segments=2")."""
        return cls(model, tokenizer=tokenizer, **options)

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
        anchor_positions = torch.where(anchor, positions, -1)
        k = self.keep_segments  # cut (B, 1, 1): the k-th last anchor, -1 where a row has fewer (it keeps everything)
        if anchor_positions.shape[-1] >= k:
            cut = anchor_positions.topk(k, dim=-1).values[..., -1:]
        else:
            cut = torch.full_like(anchor_positions[..., :1], -1)
        keep = valid & (anchor | (positions > cut) | (layer.stream_rank() < self.keep_first))
        self._memo = (layer.seen, positions.clone(), keep)
        return keep

    def reset(self) -> None:
        super().reset()
        self._memo = None

    def _reindex_rows(self, index: torch.Tensor) -> None:
        super()._reindex_rows(index)
        self._memo = None  # its keep mask is per row
