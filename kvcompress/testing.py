"""Exactness harness shared by the tests of every strategy (and usable by users checking a new strategy).

The claim checked: generating with a compressing cache gives, at every step, the same logits as ONE
full-sequence forward of the same tokens, with no cache, under an explicit mask that shows each query exactly the
keys the cache let it see. The reference forward runs through transformers' own "eager" attention (not the
kvcompress core), with one explicit mask PER LAYER (layers may keep different tokens; sliding-window layers see a
window), so the core, the cache and the masks are all checked at once.

Tiny random models built from configs (no download) cover the architectures the core must handle: Llama (GQA),
Gemma 3 (sliding-window and full layers, two RoPE bases, `query_pre_attn_scalar`, q/k norms) and Qwen2 (q/k/v
biases).
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager

import torch
from transformers import (
    AttentionInterface,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from .attention import capture
from .cache import cache_arg

REFERENCE_IMPLEMENTATION = "kvcompress_reference"
_reference = threading.local()  # .masks: list of (B, 1, N, N) additive masks, one per layer, during a reference forward


# Shared config of the tiny random test models: 3 layers, GQA 4 query / 2 kv heads, hidden 64.
_TINY = dict(
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


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A small random Llama (GQA: 4 query / 2 kv heads, 3 layers) in fp32 eval mode, built from a config."""
    options = {**_TINY, **overrides}
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**options)).eval()


def tiny_gemma3(seed: int = 0, **overrides) -> Gemma3ForCausalLM:
    """A small random Gemma 3 in fp32 eval mode: 4 layers (sliding, full, sliding, full), sliding_window 8 (so short
    prompts exceed it), GQA 4 / 2 heads of dim 16, `query_pre_attn_scalar` 64 (softmax scale 1/8, not 1/4 as the
    head dim would give), q/k RMS norms, RoPE base 10,000 on sliding layers and 1,000,000 on full layers."""
    options = {
        **_TINY,
        "num_hidden_layers": 4,
        "head_dim": 16,
        "query_pre_attn_scalar": 64,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        **overrides,
    }
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(Gemma3TextConfig(**options)).eval()


def tiny_qwen2(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """A small random Qwen2 in fp32 eval mode: 3 layers, GQA 4 / 2 heads, biases on q/k/v (Qwen2's default)."""
    options = {**_TINY, **overrides}
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**options)).eval()
    with torch.no_grad():  # random biases (the default init zeroes them, which would hide a core that drops them)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    return model


class CharTokenizer:
    """A stand-in tokenizer for tiny random models: one token per character (ids 3..122), no chat template. Enough
    for strategies that encode a fixed prompt (KVzip's repeat instruction)."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + ord(c) % 120 for c in text]


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
        (L, B, length, length) bool when every kv head kept the same tokens: [l, b, i, j] True when, in layer l,
        query at stream position i attended the key at stream position j. (L, B, Hkv, length, length) bool when
        some layer kept different tokens per kv head ([l, b, h, i, j]: through kv head h).
    """
    layers = 1 + max(r["layer_idx"] for r in records)
    # a head axis when some record's mask or slot positions have one (a mask without a head axis, e.g. a decode
    # step that sees every slot, applies to every kv head's own positions)
    heads = max(max(r["allowed"].shape[1], 1 if r["kv_positions"] is None else r["kv_positions"].shape[1])
                for r in records)
    visible = torch.zeros(layers, batch, heads, length, length, dtype=torch.bool)
    for record in records:
        allowed = record["allowed"].cpu()  # (B, 1 or Hkv, Q, K)
        kv = record["kv_positions"].cpu()  # (B, 1 or Hkv, K)
        q_len = allowed.shape[2]
        rows = torch.arange(record["q_offset"], record["q_offset"] + q_len)
        for h in range(heads):
            head_allowed, head_kv = allowed[:, min(h, allowed.shape[1] - 1)], kv[:, min(h, kv.shape[1] - 1)]
            for b in range(batch):
                hits = head_allowed[b].nonzero()  # (n, 2): query index, slot index
                visible[record["layer_idx"], b, h, rows[hits[:, 0]], head_kv[b, hits[:, 1]]] = True
    return visible[:, :, 0] if heads == 1 else visible


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
    generate_kwargs.setdefault("pad_token_id", getattr(model.config, "pad_token_id", None) or 0)
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


def _per_layer_eager(module, query, key, value, attention_mask, *args, **kwargs):
    """Attention function of the reference forward: the model's own eager attention (from its modeling module),
    with the explicit mask of `module.layer_idx` instead of the one transformers passes."""
    masks = getattr(_reference, "masks", None)
    if masks is None:
        raise RuntimeError(f"{REFERENCE_IMPLEMENTATION!r} attention runs only inside masked_reference_logits")
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise TypeError(f"{type(module).__name__} has no eager_attention_forward in its modeling module")
    return eager(module, query, key, value, masks[module.layer_idx], *args, **kwargs)


@contextmanager
def _reference_attention(model: PreTrainedModel, masks: list[torch.Tensor]):
    """Run `model` on transformers' eager attention with `masks[l]` in layer l, for the duration of the block."""
    AttentionInterface.register(REFERENCE_IMPLEMENTATION, _per_layer_eager)
    previous = model.config._attn_implementation
    _reference.masks = masks
    model.set_attn_implementation(REFERENCE_IMPLEMENTATION)
    try:
        yield
    finally:
        _reference.masks = None
        model.set_attn_implementation(previous)


def hidden_score(dtype: torch.dtype) -> float:
    """The additive mask value of a hidden key: the dtype's most negative number, but no lower than float32's
    (eager attention often takes the softmax in float32: float64's minimum would become -inf there, and a query
    seeing no key, a pad, would turn NaN and spread through 0 * NaN)."""
    return max(torch.finfo(dtype).min, torch.finfo(torch.float32).min)


def masked_reference_logits(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """Logits (B, N, V) of one cache-free forward in which, in layer l, query i sees exactly the keys j with
    visible[l, b, i, j].

    The forward runs the model's own eager attention (not the kvcompress core), each layer under its own additive
    mask (0 visible, `hidden_score` hidden); nothing else of the model changes (RoPE, scaling, norms, biases are the
    model's).

    Args:
        input_ids, attention_mask: (B, N); position ids follow `generate` (count of real tokens before, pads 1).
        visible: (L, B, N, N) bool, one visibility per layer; (L, B, Hkv, N, N), one per layer and kv head (query
            head h uses kv head h // (Hq / Hkv)); or (B, N, N), the same for every layer.
    """
    config = model.config.get_text_config(decoder=True)
    layers = config.num_hidden_layers
    if visible.dim() == 3:
        visible = visible.unsqueeze(0).expand(layers, -1, -1, -1)
    if visible.dim() not in (4, 5) or visible.shape[0] != layers:
        raise ValueError(
            f"visible must be (B, N, N), ({layers}, B, N, N) or ({layers}, B, Hkv, N, N), got {tuple(visible.shape)}"
        )
    if visible.dim() == 4:
        visible = visible.unsqueeze(2)
    elif visible.shape[2] != 1:  # per kv head -> per query head
        visible = visible.repeat_interleave(config.num_attention_heads // visible.shape[2], dim=2)
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    hidden = hidden_score(model.dtype)
    device = input_ids.device  # the visibility comes from `capture` records on the CPU; the model may be on a GPU
    masks = [torch.zeros(v.shape, dtype=model.dtype, device=device).masked_fill(~v.to(device), hidden)
             for v in visible]
    with _reference_attention(model, masks), torch.no_grad():
        # the 4-D mask passed here only stops transformers from building its own; each layer uses masks[l]
        return model(input_ids, attention_mask=masks[0][:, :1], position_ids=position_ids).logits


def model_attention_pattern(model: PreTrainedModel, attention_mask: torch.Tensor) -> torch.Tensor:
    """What the model itself lets each query see, from its config alone (independent of the core).

    Args:
        attention_mask: (B, N) 2-D padding mask (1 real, 0 pad).

    Returns:
        (L, B, N, N) bool: [l, b, i, j] True when j <= i, token j is real and, in a sliding-window layer of window
        w, i - j < w (transformers' `sliding_window_overlay`). Layer types come from `config.layer_types` (else
        all sliding when `config.sliding_window` is set, all full otherwise); other types raise ValueError.
    """
    config = model.config.get_text_config(decoder=True)
    layers = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * layers
    n = attention_mask.shape[-1]
    positions = torch.arange(n, device=attention_mask.device)
    distance = positions.view(n, 1) - positions.view(1, n)  # i - j
    real_key = attention_mask.bool()[:, None, :]  # (B, 1, N)
    patterns = []
    for layer_type in types:
        if layer_type == "full_attention":
            allowed = distance >= 0
        elif layer_type == "sliding_attention":
            allowed = (distance >= 0) & (distance < config.sliding_window)
        else:
            raise ValueError(f"model_attention_pattern does not know layer type {layer_type!r}")
        patterns.append(allowed[None] & real_key)
    return torch.stack(patterns)


def observed_attention_pattern(model: PreTrainedModel, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor) -> torch.Tensor:
    """(L, B, N, N) bool: [l, b, i, j] True when, in one cache-free forward on the model's own eager attention and
    masks (position ids as `generate` gives them), query i of layer l gives key j a nonzero probability in some
    head. Independent of the kvcompress core; a visible key whose probability underflows to 0 is missed, so use it
    to widen `model_attention_pattern`, not instead of it."""
    previous = model.config._attn_implementation
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    return torch.stack([(probs > 0).any(dim=1) for probs in out.attentions])


def max_step_error(model, cache, input_ids, attention_mask=None, max_new_tokens=8, **generate_kwargs):
    """Run `generate_with_visibility` and compare every step's logits with ONE cache-free forward whose layer l
    shows each query exactly the keys that layer attended during generation (per-layer masks: layers may keep
    different tokens, sliding-window layers see their window).

    Returns:
        (max |logits - reference| over steps, visibility (B, N, N) of layer 0 ((B, Hkv, N, N) when kv heads kept
        different tokens), sequences (B, N + 1)); the visibility of every layer is in `generate_with_visibility`'s
        output.

    Raises AssertionError if a real query saw a key outside the model's own pattern (`model_attention_pattern`:
    causal, sliding window, padding, from the config; where the config claims less than the model attends, the
    keys the model's own eager attention gives a nonzero probability, `observed_attention_pattern`): compression
    may hide keys, never show more. The reference uses the recorded visibility, so this check is what catches a
    core that ignores a layer's mask function.
    """
    sequences, logits, visible, full_mask = generate_with_visibility(
        model, cache, input_ids, attention_mask, max_new_tokens, **generate_kwargs
    )
    fed, fed_mask = sequences[:, :-1], full_mask[:, :-1]
    real_query = fed_mask.bool().cpu()[None, :, :, None]  # the checks run on the CPU, where `visible` is
    pattern = model_attention_pattern(model, fed_mask.cpu())
    if visible.dim() == 5:  # per kv head: check every head against the model's pattern
        real_query, pattern = real_query.unsqueeze(2), pattern.unsqueeze(2)
    outside = visible & real_query & ~pattern
    if bool(outside.any()):  # the config may not tell (Moshi has a sliding_window its masks ignore): ask the model
        observed = observed_attention_pattern(model, fed, fed_mask).cpu()
        outside = outside & ~(observed.unsqueeze(2) if visible.dim() == 5 else observed)
    if bool(outside.any()):
        layer, row, *_, query, key = outside.nonzero()[0].tolist()
        raise AssertionError(
            f"layer {layer}, row {row}: query {query} saw key {key}, which is not in the model's own attention "
            "pattern (causal, sliding window, padding)"
        )
    reference = masked_reference_logits(model, fed, fed_mask, visible)
    start = input_ids.shape[1] - 1
    error = (logits - reference[:, start:]).abs().max().item()
    return error, visible[0], sequences
