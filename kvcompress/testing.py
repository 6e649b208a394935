"""Exactness harness shared by the tests of every strategy (and usable by users checking a new strategy).

The claim checked: generating with a compressing cache gives, at every step, the same logits as ONE
full-sequence forward of the same tokens, with no cache, under an explicit mask that shows each query exactly the
keys the cache let it see. The reference forward runs through transformers' own "eager" attention (not the
kvcompress core), so the core, the cache and the mask are all checked at once.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from .attention import capture
from .cache import cache_arg


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A small random Llama (GQA: 4 query / 2 kv heads, 3 layers) in fp32 eval mode, built from a config."""
    options = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    options.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**options)).eval()


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (B, max_len) for rows of different lengths, left padded."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = torch.tensor(row)
        mask[b, width - len(row) :] = 1
    return ids, mask


def visibility_from_records(records: list[dict], batch: int, length: int) -> torch.Tensor:
    """Per-layer visibility from `attention.capture()` records.

    Returns:
        (L, B, length, length) bool: [l, b, i, j] True when, in layer l, query at stream position i attended the key
        at stream position j.
    """
    layers = 1 + max(r["layer_idx"] for r in records)
    visible = torch.zeros(layers, batch, length, length, dtype=torch.bool)
    for record in records:
        if record["allowed"].shape[1] != 1:
            raise NotImplementedError("kv heads kept different tokens; per-head visibility is not recorded here")
        allowed = record["allowed"][:, 0].cpu()  # (B, Q, K)
        kv = record["kv_positions"][:, 0].cpu()  # (B, K)
        q_len = allowed.shape[1]
        rows = torch.arange(record["q_offset"], record["q_offset"] + q_len)
        for b in range(batch):
            hits = allowed[b].nonzero()  # (n, 2): query index, slot index
            visible[record["layer_idx"], b, rows[hits[:, 0]], kv[b, hits[:, 1]]] = True
    return visible


def generate_with_visibility(
    model: PreTrainedModel,
    cache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 8,
    **generate_kwargs,
):
    """Greedy `generate` with `cache`, recording what every query saw.

    Returns:
        sequences (B, N + T), step logits (B, T, V) (step t predicts token N + t), visibility
        (L, B, N + T - 1, N + T - 1) over the fed tokens, and the full attention mask (B, N + T).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    generate_kwargs.setdefault("pad_token_id", model.config.pad_token_id or 0)
    with capture() as records:
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            **cache_arg(cache),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **generate_kwargs,
        )
    sequences = out.sequences
    full_mask = torch.cat(
        [attention_mask, attention_mask.new_ones(sequences.shape[0], sequences.shape[1] - attention_mask.shape[1])],
        dim=1,
    )
    visible = visibility_from_records(records, sequences.shape[0], sequences.shape[1] - 1)
    return sequences, torch.stack(out.logits, dim=1), visible, full_mask


def masked_reference_logits(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """Logits (B, N, V) of one cache-free forward in which query i sees exactly the keys j with visible[b, i, j].

    Args:
        input_ids, attention_mask: (B, N); position ids follow `generate` (count of real tokens before, pads 1).
        visible: (B, N, N) bool, the same for every layer (the strategies checked keep the same tokens in every
            layer).
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    additive = torch.zeros(visible.shape, dtype=model.dtype).masked_fill(~visible, torch.finfo(model.dtype).min)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(input_ids, attention_mask=additive[:, None], position_ids=position_ids).logits
    finally:
        model.set_attn_implementation(previous)


def max_step_error(model, cache, input_ids, attention_mask=None, max_new_tokens=8, **generate_kwargs):
    """Run `generate_with_visibility` and return (max |logits - reference| over steps, visibility, sequences).

    Raises AssertionError if layers did not all see the same keys (use per-layer references then).
    """
    sequences, logits, visible, full_mask = generate_with_visibility(
        model, cache, input_ids, attention_mask, max_new_tokens, **generate_kwargs
    )
    if not bool((visible == visible[:1]).all()):
        raise AssertionError("layers kept different tokens; compare per layer")
    fed, fed_mask = sequences[:, :-1], full_mask[:, :-1]
    reference = masked_reference_logits(model, fed, fed_mask, visible[0])
    start = input_ids.shape[1] - 1
    error = (logits - reference[:, start:]).abs().max().item()
    return error, visible[0], sequences
