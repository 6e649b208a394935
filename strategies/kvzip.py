"""KVzipCache: query-agnostic eviction by context reconstruction (KVzip, Kim et al. 2025, arXiv 2505.23416)."""

from __future__ import annotations

import torch
from einops import reduce

from .. import attention
from ..cache import CompressedCache, CompressedLayer, cache_arg
from ..registry import register
from ..selection import first, top_k
from ..validate import as_int

ALLOCATIONS = ("layer", "global")
NORMALIZATIONS = ("context", "chunk")
REPEAT_FIRST = "\n\nRepeat the previous context exactly."
REPEAT_NEXT = "\n\nRepeat the part of the previous context exactly, starting with"
STATE = "kvzip_score"


@register("kvzip")
class KVzipCache(CompressedCache):
    """KVzip: every kept pair is scored by the attention it receives while the model repeats the context.

    Paper: Jang-Hyun Kim, Jinuk Kim, Sangwoo Kwon, Jae W. Lee, Sangdoo Yun, Hyun Oh Song, "KVzip: Query-Agnostic KV
    Cache Compression with Context Reconstruction", NeurIPS 2025, arXiv 2505.23416.

    When to cut: the first forward of more than one token (the context) is reconstructed and cut. Tokens fed after a
    cut (a question, generated tokens, a next turn) are kept unscored until more than `slack` of them are held: the
    forward that takes a row past `slack` (a prefill chunk, a question, a decode step) reconstructs them and cuts the
    row back to the budget. So a context compressed once answers a question as the paper and kvpress do (the
    question is not compressed; cutting it to the context's budget answered 1 of 18 RULER needles on qwen2.5-0.5b
    at 10% kept where keeping it answers 11, docs/kvzip.md "The question cut"), and a cache holds at most
    `budget + slack` pairs per layer and kv head (global: on average) through any decoding or chat.

    Reconstruction: the tokens not scored yet are re-fed to the model in chunks of `chunk` tokens, each after a
    repeat prompt: chunk 0 as `REPEAT_FIRST + suffix + chunk`, chunk i > 0 as
    `REPEAT_NEXT + <the previous chunk's last `overlap` tokens> + suffix + chunk` (suffix: the chat template's
    assistant turn start when the tokenizer has one, else "\\n"; kvpress's prompts). Each reconstruction forward
    runs through this cache: its queries attend to every kept pair plus the forward's own tokens (causal, exact
    softmax of the core), and each scored pair's score becomes the largest attention probability it received from
    any reconstruction query of any query head of its kv group (`observe_max_received`: blockwise, never a full
    queries x keys matrix). The probabilities are those the model attends with (`normalize="context"`: softmax
    over every kept pair and the forward's own tokens), or with `normalize="chunk"` the paper's chunked scoring (as
    kvpress's KVzipPress): each query's attention renormalised over the first `n_sink` tokens, the chunk it
    reconstructs and the forward's own tokens, and only the chunk's pairs scored by it. The reconstruction's own
    keys and values are freed after each chunk and the cache's seen count restored: the context's KV is never
    changed by it. Then every layer is cut:
    - `allocation="layer"`: each kv head of each layer keeps its `budget` best-scored pairs;
    - `allocation="global"` (the paper's): the `budget x layers x kv heads` best pairs of each row over ALL layers
      and kv heads are kept, so layers and heads keep different counts; the cache then stores keys and values in
      pages per (row, kv head) (`kvcompress.storage.PagedKV`), so the memory held follows the pairs kept.
    The first `n_sink` real tokens of each row are always kept (kvpress's safeguard). `value_norm=True` (KVzip+)
    multiplies each score by the L2 norm of the pair's value. A pair's score is the largest attention it received
    from ANY reconstruction query since it entered the cache: pairs kept by an earlier cut keep their score and
    take the max with what the later reconstruction queries give them.

    Decoding: generated tokens are kept (as in the paper and kvpress) until more than `slack` unscored tokens are
    held; the step that passes it reconstructs them (with the question before them) and cuts back to the budget.

    Deviations from the paper (and its code, github.com/snu-mllab/KVzip):
    - The paper scores only the prefilled context, once; here tokens fed after it are scored too, `slack` at a
      time, so the memory stays bounded however long the cache is used.
    - By default (`normalize="context"`) attention probabilities are normalised over every pair the
      reconstruction query sees (all kept pairs and its own chunk), which is what the model attends with, and a
      pair takes the max over the queries of every chunk; the paper and kvpress's KVzipPress normalise over the
      sinks, the chunk being scored and the repeat tokens only, and score a chunk's pairs from its own
      reconstruction alone (`normalize="chunk"`; the two agree for a context of one chunk).
    - Rows of a batch are reconstructed together (left-padded); kvpress supports batch size 1.
    - Budgets are token counts per layer and kv head (global: the same total), not ratios.
    Deviations from kvpress 0.5.5's KVzipPress: it masks evicted pairs (fake keys) instead of freeing them, with
    `layerwise=False` = our "global"; it excludes the chat-template prefix of the context from reconstruction
    (scored 0 unless a sink); it scores sinks 1.0 instead of always keeping them; sliding-window layers of Gemma 3 are
    not compressed there (here they are scored like any layer: pairs outside their window receive no attention,
    which is true of every future query too).

    Args:
        model: the causal LM this cache serves (reconstruction runs forwards of it).
        tokenizer: encodes the repeat prompts.
        budget: pairs kept per row, layer and kv head (global: that many on average).
        allocation: "global" (default, the paper's) or "layer".
        chunk: context tokens per reconstruction forward (>= 1; the paper's 2,048).
        value_norm: KVzip+ (score x value norm).
        n_sink: first real tokens of each row always kept (>= 0).
        overlap: tokens of the previous chunk repeated in the prompt of the next (>= 0).
        slack: unscored tokens (questions, generated tokens) a cut row holds beyond its budget before they are
            reconstructed and cut (>= 0; 0: every forward after the first cut reconstructs and cuts).
        normalize: "context" (default: the model's own softmax) or "chunk" (the paper's chunked scoring).
        positions: "original" only (the choice is per kv head).
    """

    uses_budget = True
    needs_token_ids = True
    supports_cache_positions = False  # kv heads keep different pairs
    # what the reconstruction and the choice of rows to cut read
    deferred_settings = ("chunk", "overlap", "slack", "normalize")

    def __init__(self, model, tokenizer=None, budget: int = 1024, allocation: str = "global", chunk: int = 2048,
                 value_norm: bool = False, n_sink: int = 4, overlap: int = 8, slack: int = 256,
                 normalize: str = "context", positions: str = "original"):
        budget = as_int(budget, "budget", minimum=1)
        chunk = as_int(chunk, "chunk", minimum=1)
        n_sink, overlap = as_int(n_sink, "n_sink", minimum=0), as_int(overlap, "overlap", minimum=0)
        slack = as_int(slack, "slack", minimum=0)
        if not isinstance(allocation, str) or allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if not isinstance(normalize, str) or normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if not isinstance(value_norm, bool):
            raise TypeError(f"value_norm must be True or False, got {value_norm!r}")
        if tokenizer is None:
            raise ValueError("KVzipCache needs the tokenizer (tokenizer=...) to encode its repeat prompts")
        super().__init__(model, positions=positions)
        self.budget, self.allocation, self.chunk = budget, allocation, chunk
        self.value_norm, self.n_sink, self.overlap, self.slack = value_norm, n_sink, overlap, slack
        self.normalize = normalize
        self.prompt_first = tokenizer.encode(REPEAT_FIRST, add_special_tokens=False)
        self.prompt_next = tokenizer.encode(REPEAT_NEXT, add_special_tokens=False)
        self.suffix = tokenizer.encode(_assistant_suffix(tokenizer), add_special_tokens=False)
        self._scored: torch.Tensor | None = None  # (B,) per row: stream positions below were scored by a cut (0: none)
        self._reconstructing: int | None = None  # while reconstructing: where the repeat tokens start
        self._next_position: torch.Tensor | None = None  # (B,) RoPE position the next token of each row gets
        self._rows_to_cut: torch.Tensor | None = None  # (B,) bool: rows scored by prepare_deferred, not yet cut
        self._scope: tuple[torch.Tensor, ...] | None = None  # normalize="chunk", reconstructing: `_chunk_scope`

    @classmethod
    def _from_budget(cls, model, tokenizer, budget: int | None, **options) -> KVzipCache:
        """`budget` pairs per layer and kv head (global: that many on average); `options`: the constructor's
        (allocation, chunk, value_norm, n_sink, overlap, slack, normalize)."""
        return cls(model, tokenizer, **options) if budget is None else cls(model, tokenizer, budget=budget, **options)

    @property
    def observe_max_received(self) -> bool:
        """Only the reconstruction forwards' attention scores pairs: the core observes nothing in the others (the
        prefill, a question, decode steps), which saves it computing the probabilities twice there."""
        return getattr(self, "_reconstructing", None) is not None

    def max_received_scope(self, kv_positions: torch.Tensor) -> torch.Tensor | None:
        """normalize="chunk": (B, Hp, K) the sinks, the chunk being reconstructed and the forward's own tokens (the
        stream positions below `sink_end`, in [chunk_start, chunk_end), and from the repeat tokens' start on);
        None otherwise."""
        if self._scope is None:
            return None
        sink_end, chunk_start, chunk_end = (bound.to(kv_positions.device).view(-1, 1, 1) for bound in self._scope)
        real = kv_positions >= 0
        return real & ((kv_positions < sink_end) | ((kv_positions >= chunk_start) & (kv_positions < chunk_end))
                       | (kv_positions >= self._reconstructing))

    def storage_layout(self) -> str:
        return self.layout or ("paged" if self.allocation == "global" else "dense")  # global: heads keep unequal counts

    # hooks ------------------------------------------------------------------------------------------------------
    def before_forward(self, args: tuple, kwargs: dict) -> None:
        """Record each row's next RoPE position: after `position_ids` when given (generate), else after the stream
        positions the model uses without them."""
        if self._reconstructing is not None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        inputs = ids if ids is not None else kwargs.get("inputs_embeds")
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.numel():
            self._next_position = position_ids[:, -1].expand(inputs.shape[0]).clone() + 1
        else:
            self._next_position = torch.full((inputs.shape[0],), self.get_seq_length() + inputs.shape[1])

    def evict(self, layer: CompressedLayer) -> None:
        """Outside reconstruction nothing is evicted here (cuts happen in `after_forward`); during it, the scored
        pairs take the max of their score and the attention they just received."""
        if self._reconstructing is None:
            return
        heads = layer.keys.shape[1]
        received = reduce(layer.observation.max_received, "b (h g) s -> b h s", "max", h=heads)
        score = self._scores(layer)
        scored = (layer.positions >= 0) & (layer.positions < self._reconstructing)
        score.copy_(torch.where(scored, torch.maximum(score, received), score))

    def after_forward(self) -> None:
        """Reconstruct and cut the rows due for it (`prepare_deferred`; deciding per row keeps a padded batch equal
        to its rows run alone)."""
        if self._reconstructing is not None:
            return
        self.prepare_deferred()
        self.finish_deferred()

    def prepare_deferred(self) -> None:
        """The reconstruction (budget-independent; `prefill_shared` runs it once for every budget): scores the rows
        to cut and records them in `_rows_to_cut` (B,) bool, or None when no row is to be cut. A row is cut when
        this forward brought it more than one real token and it was never cut (its context), or when it holds more
        than `slack` unscored tokens."""
        layer = self.layers[0]
        positions = layer.positions[:, 0]  # (B, used): every kv head holds every token fed since the last cut
        if self._scored is None:
            self._scored = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
        new = (positions >= layer.seen - layer.new_tokens).sum(dim=-1)  # real tokens of this forward, per row
        unscored = (positions >= self._scored.view(-1, 1)).sum(dim=-1)
        rows = ((new > 1) & (self._scored == 0)) | (unscored > self.slack)
        self._rows_to_cut = rows if bool(rows.any()) else None
        if self._rows_to_cut is not None:
            with torch.no_grad(), attention.capture_paused():
                self._reconstruct(self._model_ref(), rows)

    def finish_deferred(self) -> None:
        """The cut of the rows `prepare_deferred` scored, to this cache's budget."""
        rows, self._rows_to_cut = self._rows_to_cut, None
        if rows is not None:
            self._cut(rows)
            self._scored = torch.where(rows, self.get_seq_length(), self._scored)

    # scoring ------------------------------------------------------------------------------------------------------
    def _scores(self, layer: CompressedLayer) -> torch.Tensor:
        """(B, Hkv, used) view of the layer's per-slot score state."""
        return layer.slot_state(STATE, heads=layer.keys.shape[1])[..., : layer.used]

    def _unscored_positions(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """For each row where `rows` (B,) is True, the stream positions of its real tokens not scored yet, sorted
        (every layer and kv head still holds them: nothing is evicted between cuts); empty for the other rows."""
        positions = self.layers[0].positions[:, 0]  # (B, used)
        return [positions[b][positions[b] >= self._scored[b]].sort().values if rows[b] else positions[b, :0]
                for b in range(positions.shape[0])]

    def _unscored_tokens(self, fresh: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ids at each row's positions `fresh` (`_unscored_positions`), per row."""
        return [self.token_ids[b, row] for b, row in enumerate(fresh)]

    def _chunk_scope(self, fresh: list[torch.Tensor], index: int) -> tuple[torch.Tensor, ...]:
        """normalize="chunk": per row, (sink_end, chunk_start, chunk_end) stream-position bounds (B,) each of the
        sinks (the first `n_sink` real tokens held) and of chunk `index` of the row's unscored positions `fresh`
        (an empty range for a row without that chunk)."""
        held = self.layers[0].positions[:, 0]  # (B, used); sinks are never evicted, so every layer holds them
        bounds = torch.zeros(len(fresh), 3, dtype=torch.long)
        for b, row in enumerate(fresh):
            real = held[b][held[b] >= 0].sort().values
            if self.n_sink and real.numel():
                bounds[b, 0] = real[min(self.n_sink, real.numel()) - 1] + 1
            piece = row[index * self.chunk : (index + 1) * self.chunk]
            if piece.numel():
                bounds[b, 1], bounds[b, 2] = piece[0], piece[-1] + 1
        return bounds.unbind(dim=1)

    def _fresh(self, layer: CompressedLayer, rows: torch.Tensor) -> torch.Tensor:
        """(B, Hp, used) bool: the slots holding unscored tokens of the `rows` being cut."""
        return (layer.positions >= self._scored.view(-1, 1, 1)) & rows.view(-1, 1, 1)

    def _reconstruct(self, model, rows: torch.Tensor) -> None:
        """Score the unscored tokens of `rows`: one forward per chunk index, rows left-padded together."""
        fresh = self._unscored_positions(rows)
        tokens = self._unscored_tokens(fresh)
        for layer in self.layers:  # unscored pairs start from 0 (their slots may hold an evicted pair's score)
            score = self._scores(layer)
            score.masked_fill_(self._fresh(layer, rows).expand_as(score), 0.0)
        chunks = max((len(r) + self.chunk - 1) // self.chunk for r in tokens)
        start = self.get_seq_length()
        try:
            for index in range(chunks):
                self._scope = self._chunk_scope(fresh, index) if self.normalize == "chunk" else None
                self._reconstruct_chunk(model, [self._repeat_sequence(row, index) for row in tokens], start)
        finally:
            self._scope = None

    def _repeat_sequence(self, row: torch.Tensor, index: int) -> list[int]:
        piece = row[index * self.chunk : (index + 1) * self.chunk].tolist()
        if not piece:
            return []
        if index == 0:
            prompt = self.prompt_first
        else:
            previous = row[max(0, index * self.chunk - self.overlap) : index * self.chunk].tolist()
            prompt = self.prompt_next + previous
        return prompt + self.suffix + piece

    def _reconstruct_chunk(self, model, sequences: list[list[int]], start: int) -> None:
        """One reconstruction forward (rows left-padded), then its pairs freed and the cache's counts restored."""
        width = max(len(s) for s in sequences)
        batch = len(sequences)
        device = self.layers[0].positions.device
        ids = torch.zeros(batch, width, dtype=torch.long)
        new_mask = torch.zeros(batch, width, dtype=torch.long)
        for b, sequence in enumerate(sequences):
            if sequence:
                ids[b, width - len(sequence):] = torch.tensor(sequence)
                new_mask[b, width - len(sequence):] = 1
        offsets = (new_mask.cumsum(-1) - 1).clamp(min=0)
        position_ids = self._next_position.view(-1, 1).cpu() + offsets
        mask = torch.cat([torch.ones(batch, start, dtype=torch.long), new_mask], dim=1)
        forward_tokens = [layer.new_tokens for layer in self.layers]
        token_ids = self.token_ids
        self._reconstructing = start
        try:
            model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                             position_ids=position_ids.to(device), use_cache=True, **cache_arg(self))
        finally:
            self._reconstructing = None
            self.token_ids = token_ids
            for layer, tokens in zip(self.layers, forward_tokens):
                if layer.is_initialized and layer.seen > start:
                    layer.keep_only(layer.positions < start)  # free the repeat tokens' pairs
                    layer.seen, layer.new_tokens = start, tokens

    # cutting ------------------------------------------------------------------------------------------------------
    def _final_scores(self, layer: CompressedLayer) -> torch.Tensor:
        """(B, Hkv, used) score of each slot for the cut: -inf for free slots, +inf for sinks."""
        score = self._scores(layer).clone()
        if self.value_norm:
            score = score * layer.values[:, :, : layer.used].norm(dim=-1)
        valid = layer.valid.expand_as(score)
        score = score.masked_fill(first(layer, self.n_sink).expand_as(score), float("inf"))
        return score.masked_fill(~valid, float("-inf"))

    def _cut(self, rows: torch.Tensor) -> None:
        """Cut the `rows` (B,) bool to the budget; the other rows keep everything."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        scores = [self._final_scores(layer) for layer in layers]
        if self.allocation == "layer":
            keeps = [top_k(score, layer.valid, self.budget) for layer, score in zip(layers, scores)]
        else:
            keeps = global_top(scores, self.budget * sum(s.shape[1] for s in scores))
        for layer, keep in zip(layers, keeps):
            valid = layer.valid.expand_as(keep)
            keep = torch.where(rows.view(-1, 1, 1), keep & valid, valid)
            if not bool(torch.equal(keep, valid)):
                layer.keep_only(keep)

    def reset(self) -> None:
        super().reset()
        self._scored, self._reconstructing, self._next_position, self._rows_to_cut = None, None, None, None
        self._scope = None

    def _reindex_rows(self, index: torch.Tensor) -> None:
        super()._reindex_rows(index)
        for name in ("_scored", "_next_position"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[index.to(value.device)])


def global_top(scores: list[torch.Tensor], total: int) -> list[torch.Tensor]:
    """Per row, the `total` best slots over every layer and head: scores[l] (B, Hkv, S_l) (-inf never chosen) ->
    keep masks of the same shapes. Ties go to the earlier layer, then head, then slot (a stable sort)."""
    flat = torch.cat([s.flatten(1) for s in scores], dim=1)  # (B, sum Hkv * S_l)
    order = flat.argsort(dim=1, descending=True, stable=True)[:, : min(total, flat.shape[1])]
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True) & (flat > float("-inf"))
    keeps, offset = [], 0
    for s in scores:
        size = s[0].numel()
        keeps.append(chosen[:, offset : offset + size].view_as(s))
        offset += size
    return keeps


def _assistant_suffix(tokenizer) -> str:
    """Text between a user turn's content and the assistant's reply in the tokenizer's chat template ("\\n" without
    a template), as kvpress builds it."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "\n"
    marker = "\n" + "#" * 13
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "dummy context" + marker}],
                                             add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this turn: fall back as without one
        return "\n"
    return text.split(marker, 1)[1] if marker in text else "\n"
