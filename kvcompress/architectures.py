"""Which causal-LM architectures of the installed transformers the kvcompress core serves, checked on tiny models.

    python -m kvcompress.architectures                       # sweep every architecture, print the table
    python -m kvcompress.architectures --write docs/architectures.md
    python -m kvcompress.architectures llama qwen3 gemma2    # some model types only

The list comes from transformers itself: every model type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` (what
`AutoModelForCausalLM` builds). For each:

- refused: `check_causal_lm` (what every kvcompress cache calls when built) raises TypeError for it, up front, with a
  message naming the class and the reason: its attention does not go through transformers' `AttentionInterface`
  (the class-level flag `_supports_attention_backend`; decided without building a model), or a feature the core
  cannot serve (found on the tiny model's config and modules).
- served: a tiny random model of the architecture in float32 (`tiny_model`: the default config with small sizes)
  passes both checks on a left-padded batch of two prompts longer than the tiny sliding window (8):
  greedy generation with `FullCache` gives the logits of transformers' `DynamicCache()` (on the model's SDPA path,
  eager where it has none; built without the config, so it keeps every token as FullCache does: built from a
  config with a `sliding_window` it drops old keys even where the model's masks do not, e.g. Moshi), and
  `SnapKVCache` (per-kv-head eviction, observation window) gives, at every step, the logits of one cache-free
  forward through the model's own eager attention under an explicit per-layer mask of the keys each query saw
  (`kvcompress.testing.max_step_error`). Both within `TOLERANCE`.
- wrong: served, but a check fails. A bug: the architecture must be fixed in the core or refused up front (the
  tests assert there is none).
- not checked: no tiny model could be built from the config (the reason says why: composite multimodal configs,
  validators, sizes). Caches still refuse such a model up front if `check_causal_lm` finds a reason.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import sys
import warnings
from dataclasses import dataclass

import torch
import transformers
from transformers import DynamicCache, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .cache import cache_arg
from .model_checks import check_causal_lm, outside_attention_interface
from .testing import left_padded, max_step_error

# float32, as the rest of the suite: the core (SDPA) and the references (SDPA / eager) differ by rounding, ~1e-7;
# a wrong mask, scale or rotation shows at 1e-3 and above. (float64 would not be tighter: transformers' eager
# attention takes its softmax in float32, where float64's mask minimum becomes -inf and padded rows turn NaN.)
TOLERANCE = 1e-5
MAX_PARAMETERS = 3_000_000  # a tiny model; larger means some size field was not shrunk (checked on the meta device)
ROWS = [[5, 9, 17, 33, 41, 8, 12, 99, 4, 7, 3, 21, 50, 13], [7, 3, 90, 11, 9, 40]]  # 14 and 6 tokens, left padded
NEW_TOKENS = 4

# Size fields of the tiny config, set where the architecture's config has them (names differ between families).
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=8,
    n_embd=64, n_layer=4, n_head=4, n_positions=512, n_ctx=512, n_inner=128, ffn_dim=128, num_layers=4, d_model=64,
    num_heads=4, word_embed_proj_dim=64, rotary_dim=8,
    moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    shared_expert_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    dff=128, ffn_hidden_size=128, expert_ffn_hidden_size=32, zero_expert_num=1, moe_topk=2, shape_vocab_size=32,
    pronunciation_vocab_size=32, vocab_size_per_layer_input=128, hidden_size_per_layer_input=8,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, is_decoder=True,
)


@dataclass
class Verdict:
    """The outcome for one model type. `error_*`: max |difference| of the two checks (served / wrong only)."""

    model_type: str
    class_name: str
    status: str  # "served", "refused", "wrong", "not checked"
    reason: str = ""
    error_full_vs_dynamic: float | None = None
    error_vs_masked_reference: float | None = None


def causal_lm_architectures() -> dict[str, str]:
    """model type -> causal-LM class name, as transformers' `AutoModelForCausalLM` maps them (sorted by type)."""
    return dict(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))


def _config_fields(config_class) -> set[str]:
    """The fields a config class knows: its constructor's parameters and its default instance's attributes."""
    fields = set(inspect.signature(config_class.__init__).parameters)
    with contextlib.suppress(Exception):
        fields |= set(vars(config_class()))
    return fields


def tiny_model(model_type: str, seed: int = 0) -> PreTrainedModel:
    """A small random model of `model_type` in float32 eval mode, from the default config with the `TINY` sizes it
    has. Raises (any exception) when the config or the model cannot be built that small."""
    model_class = getattr(transformers, causal_lm_architectures()[model_type])
    config_class = model_class.config_class
    fields = _config_fields(config_class)
    options = {key: value for key, value in TINY.items() if key in fields}
    if "kv_lora_rank" in fields:  # multi-head latent attention: per-query-head keys, RoPE on qk_rope_head_dim
        options["num_key_value_heads"] = options["num_attention_heads"]
        options["head_dim"] = options["qk_rope_head_dim"]
    try:
        config = config_class(**options)
    except Exception:  # noqa: BLE001 - some configs validate that they have no grouped-query attention: try once
        if options.get("num_key_value_heads") == options.get("num_attention_heads"):
            raise
        config = config_class(**{**options, "num_key_value_heads": options.get("num_attention_heads")})
    with torch.device("meta"):
        parameters = sum(p.numel() for p in model_class(config).parameters())
    if parameters > MAX_PARAMETERS:
        raise ValueError(f"the tiny config still has {parameters / 1e6:.1f}M parameters (a size field not shrunk)")
    torch.manual_seed(seed)
    model = model_class(config).eval()
    if hasattr(model, "set_default_language"):  # X-MOD: language adapters
        model.set_default_language(next(iter(config.languages)))
    return model


def _greedy_logits(model, cache, ids, mask) -> torch.Tensor:
    out = model.generate(ids, attention_mask=mask, **cache_arg(cache), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    return torch.stack(out.logits, 1)


def check_architecture(model_type: str) -> Verdict:
    """Refused, served, wrong or not checked (see the module docstring)."""
    from .strategies import FullCache, SnapKVCache

    class_name = causal_lm_architectures()[model_type]
    verdict = Verdict(model_type, class_name, "not checked")
    if not getattr(getattr(transformers, class_name), "_supports_attention_backend", False):
        verdict.status, verdict.reason = "refused", outside_attention_interface(class_name)
        return verdict
    try:
        model = tiny_model(model_type)
    except Exception as error:  # noqa: BLE001 - any failure to build a tiny model is "not checked", with its reason
        verdict.reason = f"no tiny model: {type(error).__name__}: {_first_line(error)}"
        return verdict
    try:
        check_causal_lm(model)
    except TypeError as error:
        verdict.status, verdict.reason = "refused", str(error)
        return verdict
    ids, mask = left_padded(ROWS)
    try:
        model.set_attn_implementation("sdpa" if model._supports_sdpa else "eager")
        expected = _greedy_logits(model, DynamicCache(), ids, mask)  # without config: keeps every token
        got = _greedy_logits(model, FullCache(model), ids, mask)
        verdict.error_full_vs_dynamic = (got - expected).abs().max().item()
        verdict.error_vs_masked_reference = max_step_error(
            model, SnapKVCache(model, budget=6, window=2), ids, mask, max_new_tokens=NEW_TOKENS)[0]
    except Exception as error:  # noqa: BLE001 - a served architecture that fails is "wrong", with the error
        verdict.status, verdict.reason = "wrong", f"{type(error).__name__}: {_first_line(error)}"
        return verdict
    exact = verdict.error_full_vs_dynamic < TOLERANCE and verdict.error_vs_masked_reference < TOLERANCE  # NaN fails
    if not exact:
        verdict.status = "wrong"
        verdict.reason = (f"FullCache vs DynamicCache {verdict.error_full_vs_dynamic:.1e}, SnapKV vs masked reference "
                          f"{verdict.error_vs_masked_reference:.1e} (tolerance {TOLERANCE:.0e})")
    else:
        verdict.status = "served"
    return verdict


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def sweep(model_types: list[str] | None = None) -> list[Verdict]:
    """`check_architecture` for `model_types` (default: every causal-LM model type of the installed transformers),
    with transformers' warnings and log output silenced."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return [check_architecture(t) for t in (model_types or list(causal_lm_architectures()))]
    finally:
        transformers.logging.set_verbosity(verbosity)


STATUS_ORDER = ("served", "refused", "not checked", "wrong")


def markdown(verdicts: list[Verdict]) -> str:
    """The table of docs/architectures.md: status and reason per model type (no timings or error sizes, which vary
    with the machine: the errors of served types are below `TOLERANCE` by definition)."""
    counts = ", ".join(f"{sum(v.status == s for v in verdicts)} {s}" for s in STATUS_ORDER)
    lines = [
        f"transformers {transformers.__version__}, {len(verdicts)} causal-LM model types: {counts}.",
        "",
        "| model type | class | status | reason |",
        "|---|---|---|---|",
    ]
    for v in sorted(verdicts, key=lambda v: (STATUS_ORDER.index(v.status), v.model_type)):
        lines.append(f"| {v.model_type} | {v.class_name} | {v.status} | {v.reason.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


START, END = "<!-- architectures:start -->", "<!-- architectures:end -->"


def replace_table(text: str, table: str) -> str:
    """`text` with the part between the START / END markers replaced by `table` (markers appended if missing)."""
    if START not in text or END not in text:
        return f"{text.rstrip()}\n\n{START}\n{table}{END}\n"
    head, rest = text.split(START, 1)
    return f"{head}{START}\n{table}{END}{rest.split(END, 1)[1]}"


def table_in(text: str) -> str:
    """The table between the markers of `text` ('' when there are none)."""
    if START not in text or END not in text:
        return ""
    return text.split(START, 1)[1].split(END, 1)[0].lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcompress.architectures", description=__doc__.split("\n")[0])
    parser.add_argument("model_types", nargs="*", help="model types to check (default: all)")
    parser.add_argument("--write", metavar="PATH", help="write the table into this markdown file, between markers")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.model_types) - set(causal_lm_architectures()))
    if unknown:
        parser.error(f"unknown causal-LM model type(s) {unknown}; see transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    table = markdown(sweep(args.model_types or None))
    if args.write:
        from pathlib import Path

        path = Path(args.write)
        path.write_text(replace_table(path.read_text() if path.exists() else "", table))
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
