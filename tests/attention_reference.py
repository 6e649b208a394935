"""Test helpers for attention-aware strategies (H2O, TOVA): run a cache token by token, and recompute, independently
of the kvcompress core, the attention probabilities its queries had.

The reference probabilities come from ONE cache-free forward through transformers' own eager attention
(`output_attentions=True`), each layer under an explicit mask of exactly the keys that layer (and kv head) attended
during the cached run (`kvcompress.testing.visibility_from_records`), so they are what the strategy's scores
should have been computed from.
"""

from __future__ import annotations

import torch

from kvcompress import H2OCache, cache_arg, capture
from kvcompress.testing import _reference_attention, visibility_from_records


def teacher_forced(model, cache, ids, mask, continuation):
    """Feed `ids` (B, N) with `mask`, then `continuation` (B, T) one token per forward (direct model() calls).

    Returns a dict:
        logits: (B, T + 1, V) last logits of every forward.
        kept: kept[forward][layer][row][kv head], the sorted kept stream positions (after eviction).
        states: per forward, per layer, (positions (B, Hp, S), scores (B, Hkv, S)) after eviction for an
            H2OCache (its accumulated attention per slot), else None.
        fed: (B, N + T) the tokens fed; fed_mask: (B, N + T); visible: the per-layer visibility of every query,
            (L, B, N + T, N + T) or (L, B, Hkv, N + T, N + T) (see `visibility_from_records`).
        ends: the stream index of the last query of every forward (N - 1, N, ..., N + T - 1).
    """
    kv_heads = model.config.num_key_value_heads
    logits, kept, states = [], [], []
    with torch.no_grad(), capture() as records:
        for step in range(continuation.shape[1] + 1):
            tokens = ids if step == 0 else continuation[:, step - 1 : step]
            if step:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(tokens, attention_mask=mask, **cache_arg(cache))
            logits.append(out.logits[:, -1])
            per_head = [[cache.kept_positions(layer, head) for head in range(kv_heads)]
                        for layer in range(len(cache.layers))]
            kept.append([[[heads[h][b] for h in range(kv_heads)] for b in range(ids.shape[0])] for heads in per_head])
            if isinstance(cache, H2OCache):
                states.append([(cache.layers[layer].positions.clone(), cache.scores(layer).clone())
                               for layer in range(len(cache.layers))])
            else:
                states.append(None)
    fed = torch.cat([ids, continuation], dim=1)
    fed_mask = mask
    visible = visibility_from_records(records, fed.shape[0], fed.shape[1])
    ends = list(range(ids.shape[1] - 1, fed.shape[1]))
    return dict(logits=torch.stack(logits, 1), kept=kept, states=states, fed=fed, fed_mask=fed_mask,
                visible=visible, ends=ends)


def reference_probabilities(model, fed, fed_mask, visible) -> list[torch.Tensor]:
    """Per layer (B, Hq, N, N) float32 softmax probabilities of one eager, cache-free forward of `fed` in which
    layer l (kv head h) shows query i exactly the keys j with visible[l, b, (h,) i, j]. Rows of pad queries are
    zeroed (the core gives a query that sees no key no attention at all).

    Independent of the kvcompress core: transformers' eager attention, the model's own RoPE and scaling.
    """
    config = model.config.get_text_config(decoder=True)
    if visible.dim() == 4:
        visible = visible.unsqueeze(2)
    elif visible.shape[2] != 1:
        visible = visible.repeat_interleave(config.num_attention_heads // visible.shape[2], dim=2)
    position_ids = (fed_mask.long().cumsum(-1) - 1).masked_fill(fed_mask == 0, 1)
    hidden = torch.finfo(model.dtype).min
    masks = [torch.zeros(v.shape, dtype=model.dtype).masked_fill(~v, hidden) for v in visible]
    with _reference_attention(model, masks), torch.no_grad():
        out = model(fed, attention_mask=masks[0][:, :1], position_ids=position_ids, output_attentions=True)
    real_query = fed_mask.bool()[:, None, :, None]
    return [a.float() * real_query for a in out.attentions]


def check_top_k(kept: list[int], candidates: list[int], score: dict[int, float], k: int, tol: float, where: str):
    """`kept` must be a top-k of `candidates` by `score` (ties within `tol` may go either way): the right count,
    and no dropped candidate scoring more than `tol` above a kept one."""
    kept, candidates = set(kept), set(candidates)
    assert kept <= candidates, f"{where}: kept {sorted(kept - candidates)} that were not held"
    assert len(kept) == min(k, len(candidates)), f"{where}: kept {len(kept)} of {len(candidates)}, k={k}"
    dropped = candidates - kept
    if kept and dropped:
        low = min(score[j] for j in kept)
        high = max(score[j] for j in dropped)
        assert high <= low + tol, (
            f"{where}: dropped position {max(dropped, key=score.get)} (score {high:.6f}) but kept "
            f"{min(kept, key=score.get)} (score {low:.6f})"
        )
