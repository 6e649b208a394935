"""What kvcompress caches can serve: `check_causal_lm` (the model), `check_quantizable` (quantized storage), and the
error for a transformers feature they cannot serve exactly (`UnsupportedFeatureError`)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class UnsupportedFeatureError(NotImplementedError):
    """A transformers feature that a compressing cache cannot serve exactly (crop, ...)."""


def check_quantizable(model, group: int) -> None:
    """ValueError unless quantized storage can serve `model`: a float dtype the quantizer handles and a `group` that
    divides the head dimension (value groups are channels of one head)."""
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % group and group < head_dim:
        raise ValueError(f"group ({group}) must divide the head dimension ({head_dim}) for quantized storage")
    dtype = next(model.parameters()).dtype
    if dtype not in QUANTIZABLE_DTYPES:
        raise ValueError(f"quantized storage (kv_bits) supports models in {[str(d) for d in QUANTIZABLE_DTYPES]}, "
                         f"this one is {dtype}")


# Architectures whose attention does what the core cannot follow and no config field tells (config.model_type ->
# why), found by the architecture sweep (`python -m kvcompress.architectures`, docs/architectures.md).
UNSERVED_ARCHITECTURES = {
    "diffllama": "its differential attention calls the attention function twice per cache update (the core evicts "
                 "after the first call)",
    "doge": "its attention builds its own dynamic mask from the values and the mask it receives (the core builds "
            "masks from the positions the cache kept)",
    "dory": "it runs its layers in loops over shared or per-loop copies of their KV (cache slots other than the "
            "attention modules' layer_idx)",
    "jetmoe": "its mixture of attention heads repeats the cached kv heads after the cache update, so per-kv-head "
              "slots and masks no longer line up with the heads attending",
}


def outside_attention_interface(name: str) -> str:
    """Why a model class without `_supports_attention_backend` is refused (also decided per class, without a model,
    by `kvcompress.architectures`)."""
    return (f"{name} does not run its attention through transformers' AttentionInterface (state-space models such as "
            "Mamba keep no per-token KV cache; older architectures have their own attention code), so kvcompress "
            "caches cannot drive it")


def check_causal_lm(model) -> None:
    """Raise TypeError unless the kvcompress core can serve every layer of `model` exactly.

    Refused: anything but a decoder-only transformers causal LM; models whose attention does not go through
    transformers' AttentionInterface (Mamba and other state-space models, older architectures); hybrid models
    whose `config.layer_types` include anything but full and sliding-window attention (linear attention, conv,
    chunked, indexed ...); attention-logit soft-capping (Gemma 2), which the core's kernels do not apply; layers
    that reuse another layer's KV (Gemma 3n / Gemma 4 KV sharing); learned attention sinks (gpt-oss); cross-attention
    layers (Mllama, BERT-style decoders with `add_cross_attention`); bidirectional attention (`is_causal` False: a
    BERT-style model without `is_decoder=True`); attention modules that do not map one to one to the cache's layers
    (recurrent or looped layers); the architectures of `UNSERVED_ARCHITECTURES`.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    name = type(model).__name__
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if model.config.is_encoder_decoder or name not in causal_classes:
        raise TypeError(f"kvcompress caches need a decoder-only causal LM (AutoModelForCausalLM); got {name}")
    if not getattr(model, "_supports_attention_backend", False):
        raise TypeError(outside_attention_interface(name))
    config = model.config.get_text_config(decoder=True)
    other_types = sorted(set(getattr(config, "layer_types", None) or ()) - set(SUPPORTED_LAYER_TYPES))
    if other_types:
        raise TypeError(
            f"{name} has layers of type {other_types}; kvcompress caches support only {list(SUPPORTED_LAYER_TYPES)} "
            "layers (hybrid linear-attention / state-space / chunked models are not supported)"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise TypeError(
            f"{name} uses attn_logit_softcapping={config.attn_logit_softcapping}; the kvcompress core does not "
            "apply attention-logit soft-capping, so its results would be wrong"
        )
    if getattr(config, "num_kv_shared_layers", 0) or "reuse" in (getattr(config, "kv_sharing_modes", None) or ()):
        raise TypeError(f"{name} shares KV between layers, which kvcompress caches do not support")
    if config.model_type in UNSERVED_ARCHITECTURES:
        raise TypeError(f"{name} cannot be served by kvcompress caches: {UNSERVED_ARCHITECTURES[config.model_type]}")
    if getattr(config, "cross_attention_layers", None) or getattr(config, "add_cross_attention", False):
        raise TypeError(f"{name} has cross-attention layers, which kvcompress caches do not support")
    # attention modules: a layer index and a softmax scale (decoder layers have the index only)
    attentions = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "scaling")]
    if any(getattr(m, "sinks", None) is not None for m in attentions):
        raise TypeError(
            f"{name} has learned attention sinks (an extra softmax logit per head, `s_aux`), which the kvcompress "
            "core does not apply, so its results would be wrong"
        )
    if any(getattr(m, "is_causal", True) is False for m in attentions):
        raise TypeError(
            f"{name} attends bidirectionally (is_causal False; a BERT-style model needs config.is_decoder=True to "
            "generate), which kvcompress caches do not support"
        )
    if sorted(m.layer_idx for m in attentions) != list(range(config.num_hidden_layers)):
        raise TypeError(
            f"{name}'s attention modules do not map one to one to its {config.num_hidden_layers} cache layers "
            "(recurrent or looped layers), which kvcompress caches do not support"
        )
