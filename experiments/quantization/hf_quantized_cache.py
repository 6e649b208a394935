"""transformers' own QuantizedCache (quanto / HQQ backends) on the token ids the bench scores (docs/quantization.md).

Runs in a SEPARATE virtualenv (the backends are no project dependency):

    python3 -m venv /work/quant-venv && . /work/quant-venv/bin/activate
    pip install torch==2.13.0 && pip install transformers==5.24.0 optimum-quanto hqq
    pip install --no-deps -e <kvcompress checkout> && pip install --no-deps -r requirements-offline.txt
    pip install gguf peft psutil tqdm
    OMP_NUM_THREADS=1 nice -n 5 python experiments/quantization/hf_quantized_cache.py --threads 1 \
        --reference runs/quant-2026-11-30/results.json --out runs/quant-2026-11-30/hf_quantized_cache.json

1. Perplexity at 2,048 tokens: the bench's own ppl@2048 windows (`kvcompress.bench.tasks.TASKS["ppl"].prepare`,
   seed 0, `--windows` of them, the same call the bench makes with `--limit`), streamed in 128-token chunks through
   `metrics.streaming_nll` exactly as the bench does, with QuantizedCache(backend, nbits) on transformers' SDPA
   attention. The sha256 of the windows' token ids is printed and stored, so identity with the bench's cells can be
   checked (`--reference`: the bench results.json whose `ppl@2048|full|-` cell, fp32 FullCache on the same windows,
   is the paired reference; its window NLLs give the per-window ratio).
2. Bytes: everything the cache holds after a window: the backend's packed codes, scales and zero points (the
   tensors inside quanto's QBitsTensor / HQQ's meta) plus the full-precision residual, relative to an fp32 cache
   of the same tokens.
3. Decode step at `--decode-length` tokens: one DynamicCache prefill of the essay tokens the speed bench uses; each
   QuantizedCache is filled from that prefill's keys and values layer by layer (`layer.update`, which is what its
   first forward does: a prefill attends in full precision and quantizes everything it stores), so all caches hold
   the same context; then `--rounds` interleaved rounds of `--steps` greedy steps per cache (order rotated each
   round), median step time per cache, DynamicCache (fp32, SDPA) as the baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import statistics
import sys
import time

import torch


def tensor_bytes(obj) -> int:
    """Bytes of the storage behind `obj`: a plain tensor, a tensor subclass (quanto's QTensors: the inner tensors
    of `__tensor_flatten__`, recursively), a tuple/list/dict of those (HQQ's (codes, meta)), else 0."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, name)) for name in names)
        return obj.nbytes
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    return 0


def cache_bytes(cache) -> int:
    """Quantized states plus the full-precision residual, over all layers."""
    total = 0
    for layer in cache.layers:
        total += tensor_bytes(getattr(layer, "_quantized_keys", None)) + tensor_bytes(
            getattr(layer, "_quantized_values", None))
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.nbytes
    return total


def fp32_bytes(model, tokens: int) -> int:
    from kvcompress.bench.metrics import kv_bytes_per_token

    return kv_bytes_per_token(model) * tokens  # the bench's denominator (model dtype: fp32 here)


def make_cache(model, backend: str, bits: int | None):
    from transformers import DynamicCache, QuantizedCache

    if backend == "dynamic":
        return DynamicCache(config=model.config)
    return QuantizedCache(backend=backend, config=model.config, nbits=bits)


def label(backend: str, bits: int | None) -> str:
    return "DynamicCache fp32" if backend == "dynamic" else f"QuantizedCache {backend} int{bits}"


def perplexity(model, tokenizer, configs, windows: int, length: int, reference: dict | None) -> tuple[list, str]:
    from kvcompress.bench import metrics
    from kvcompress.bench.stats import perplexity_interval
    from kvcompress.bench.tasks import TASKS

    prepared = TASKS["ppl"].prepare(tokenizer, limit=windows, seed=0, length=length, options={})
    digest = hashlib.sha256(torch.cat(prepared["segments"], 1).numpy().tobytes()).hexdigest()
    print(f"ppl@{length}: {windows} windows, token ids sha256 {digest}", flush=True)
    rows = []
    for backend, bits in configs:
        nll, tokens, nbytes, seconds = [], [], [], []
        for segment in prepared["segments"]:
            cache = make_cache(model, backend, bits)
            start = time.perf_counter()
            total, n = metrics.streaming_nll(model, cache, segment, prepared["chunk"])
            seconds.append(time.perf_counter() - start)
            nll.append(total)
            tokens.append(n)
            nbytes.append(cache_bytes(cache))
        row = {"cache": label(backend, bits), "backend": backend, "bits": bits, "n_windows": len(nll),
               "perplexity": math.exp(sum(nll) / sum(tokens)), "window_nll": nll, "window_tokens": tokens,
               "kv_bytes": int(statistics.fmean(nbytes)),
               "kv_bytes_fraction": statistics.fmean(nbytes) / fp32_bytes(model, length),
               "seconds_per_window": statistics.median(seconds)}
        found = perplexity_interval(nll, tokens)
        if found:
            row["ci"] = list(found)
        if reference:
            ratio = [math.exp(a / t - b / t) for a, b, t in zip(nll, reference["window_nll"], tokens)]
            row["window_ppl_ratio_vs_fp32_full"] = ratio
            row["ppl_ratio_vs_fp32_full"] = row["perplexity"] / reference["perplexity"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("window_nll", "window_tokens")}), flush=True)
    return rows, digest


@torch.no_grad()
def decode_speed(model, tokenizer, configs, length: int, rounds: int, steps: int) -> list[dict]:
    from transformers import DynamicCache

    from kvcompress.bench import metrics
    from kvcompress.bench.tasks import _essay_ids

    ids = torch.tensor([_essay_ids(tokenizer, length)[:length]])
    prefill = DynamicCache(config=model.config)
    logits = model(ids, past_key_values=prefill, use_cache=True).logits[:, -1]
    first = logits.argmax(-1, keepdim=True)
    live = {}
    for backend, bits in configs:
        if backend == "dynamic":
            cache = prefill
        else:
            cache = make_cache(model, backend, bits)
            for index, layer in enumerate(prefill.layers):
                cache.layers[index].update(layer.keys.clone(), layer.values.clone())
        live[label(backend, bits)] = {"cache": cache, "token": first, "steps": []}
    names = list(live)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            entry = live[name]
            token = entry["token"]
            metrics.sync(model.device)
            start = time.perf_counter()
            for _ in range(steps):
                token = model(token, past_key_values=entry["cache"], use_cache=True).logits[:, -1].argmax(
                    -1, keepdim=True)
            entry["steps"].append((time.perf_counter() - start) / steps)
            entry["token"] = token
    base = statistics.median(live[names[0]]["steps"])
    rows = []
    for name in names:
        step = statistics.median(live[name]["steps"])
        rows.append({"cache": name, "context_tokens": length, "step_ms": step * 1e3,
                     "step_ms_samples": [s * 1e3 for s in live[name]["steps"]], "step_vs_first": step / base,
                     "kv_bytes": cache_bytes(live[name]["cache"]),
                     "kv_bytes_fraction": cache_bytes(live[name]["cache"]) / fp32_bytes(
                         model, live[name]["cache"].get_seq_length())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ppl-caches", default="quanto:4,quanto:2", help="backend:bits list for perplexity")
    p.add_argument("--speed-caches", default="dynamic,quanto:4,quanto:2,hqq:4,hqq:2",
                   help="dynamic and/or backend:bits for the decode step (the first one is the baseline)")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--decode-length", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reference", default=None, help="bench results.json holding ppl@LENGTH|full|- (same windows)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    import transformers
    from kvcompress.models import load_model

    hf_logging.disable_progress_bar()

    def parse(text):
        out = []
        for item in filter(None, (s.strip() for s in text.split(","))):
            backend, _, bits = item.partition(":")
            out.append((backend, int(bits) if bits else None))
        return out

    model, tokenizer = load_model()
    model.set_attn_implementation("sdpa")
    reference = None
    if args.reference:
        cell = json.loads(pathlib.Path(args.reference).read_text())["cells"].get(f"ppl@{args.length}|full|-")
        if cell and len(cell.get("window_nll", [])) == args.windows:
            reference = cell
    load_before = os.getloadavg()
    started = time.time()
    ppl_rows, digest = perplexity(model, tokenizer, parse(args.ppl_caches), args.windows, args.length, reference) \
        if args.ppl_caches else ([], None)
    speed_rows = decode_speed(model, tokenizer, parse(args.speed_caches), args.decode_length, args.rounds,
                              args.steps) if args.speed_caches else []
    import importlib.metadata as md

    versions = {}
    for package in ("optimum-quanto", "hqq"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    environment = {"torch": torch.__version__, "transformers": transformers.__version__, **versions,
                   "threads": torch.get_num_threads(), "loadavg_before": load_before,
                   "loadavg_after": os.getloadavg(), "wall_seconds": time.time() - started,
                   "ppl_token_ids_sha256": digest, "reference": args.reference if reference else None,
                   "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv[1:]}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment, "perplexity": ppl_rows, "decode": speed_rows}, indent=1))
    print(f"load average before/after {load_before[0]:.2f}/{environment['loadavg_after'][0]:.2f}; "
          f"{environment['wall_seconds']:.0f} s; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
