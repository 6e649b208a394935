"""Anchor-trained models: the anchor configuration a model carries, and LoRA anchor adapters merged into a base.

A model trained by `kvcompress-train-anchor` carries its anchor configuration in its config
(`config.kvcompress_anchor`, saved in config.json or beside a LoRA adapter as `anchor.json`):

    {"mode": "ep" | "ac", "anchor_ids": [int, ...], "ac_token": "<AC>" (AC only), "ac_init": "period" | "mean",
     "base": the model the run started from, "tokens": tokens trained on, ...,
     "keep_first": int >= 0, "keep_segments": int >= 1 (optional: the AnchorCache rule measured best for this
     model; absent, AnchorCache uses the paper's rule, 0 and 1)}

`AnchorCache()` without arguments reads it from the model it serves (`anchor_config`). The shipped adapters
(`kvcompress/anchors/<alias>/`: `adapter_config.json`, `adapter_model.safetensors`, `anchor.json`) are merged
into their base model by `merge_adapter`; `kvcompress.models.load_model` does that for the aliases
`smollm2-135m-anchor-ep` and `smollm2-135m-anchor-ac`.
"""

from __future__ import annotations

import json
import pathlib

import torch

CONFIG_KEY = "kvcompress_anchor"
ANCHOR_FILE = "anchor.json"
MODES = ("ep", "ac")
# the AnchorCache rule options a model's configuration may carry, at the paper's values (also each one's minimum)
PAPER_RULE = {"keep_first": 0, "keep_segments": 1}
ADAPTER_ROOT = pathlib.Path(__file__).parent / "anchors"


def anchor_config(model) -> dict | None:
    """The anchor configuration `model` carries (a dict as above), or None for a model never anchor-trained.
    Raises ValueError if the stored configuration is malformed."""
    config = model.config.get_text_config(decoder=True) if hasattr(model, "config") else None
    value = getattr(config, CONFIG_KEY, None) or getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("mode") not in MODES or not value.get("anchor_ids"):
        raise ValueError(f"the model's config.{CONFIG_KEY} is malformed (needs mode in {MODES} and anchor_ids): "
                         f"{value!r}")
    for key, minimum in PAPER_RULE.items():
        if key in value and (type(value[key]) is not int or value[key] < minimum):
            raise ValueError(f"the model's config.{CONFIG_KEY}[{key!r}] must be an integer >= {minimum}, got "
                             f"{value[key]!r}")
    return value


def set_anchor_config(model, config: dict) -> None:
    """Store `config` in `model.config` (saved with it by `save_pretrained`)."""
    setattr(model.config, CONFIG_KEY, dict(config))


def adapter_dir(alias: str) -> pathlib.Path:
    """The shipped adapter folder of an anchor alias (`smollm2-135m-anchor-ep` -> kvcompress/anchors/...)."""
    return ADAPTER_ROOT / alias


def read_anchor_file(folder: pathlib.Path) -> dict:
    path = pathlib.Path(folder) / ANCHOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not an anchor adapter folder")
    return json.loads(path.read_text())


def merge_adapter(model, tokenizer, folder: pathlib.Path):
    """`model` (the adapter's base, as loaded) with the LoRA anchor adapter in `folder` merged in: AC adapters
    first add `<AC>` to model and tokenizer exactly as training did. Returns the merged plain model, carrying its
    anchor configuration. Needs `peft`."""
    from peft import PeftModel

    from .anchor_tokens import add_anchor_token

    config = read_anchor_file(folder)
    if config["mode"] == "ac":
        token_id = add_anchor_token(model, tokenizer, token=config["ac_token"], init=config.get("ac_init", "period"))
        if [token_id] != list(config["anchor_ids"]):
            raise ValueError(f"the tokenizer gives {config['ac_token']!r} the id {token_id}, but the adapter in "
                             f"{folder} was trained with anchor_ids {config['anchor_ids']}")
    with torch.no_grad():
        merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    set_anchor_config(merged, config)
    return merged
