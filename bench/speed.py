"""Decode speed of several caches side by side, against the memory-bandwidth floor.

    python -m kvcompress.bench.speed                         # 1K..8K, dynamic/full/sink_window 10%/anchor
    python -m kvcompress.bench.speed --lengths 4096,8192,16384 --rounds 7 --threads 2 --out runs/speed

For each context length, every cache is prefilled with the same essay tokens and kept alive; then `--rounds`
rounds each decode `--steps` greedy tokens with every cache in turn (the order rotates each round), so machine
noise falls on all caches alike. Per cache: median decode step time, the bytes a step must read (weights + kept
KV), the read bandwidth measured in the same process before and after the rounds, the floor = bytes / bandwidth,
their ratio, KV bytes, and memory: the RSS growth while prefilling (peak) and what stays resident while decoding.

`dynamic` is transformers' DynamicCache on transformers' own SDPA attention (the baseline users have); every other
name is a registered kvcompress strategy on the kvcompress core, built with `for_budget` (a fraction of the
context for strategies with `uses_budget`). Beyond the model's trained context (`max_position_embeddings`),
`sink_window` switches to `positions="cache"` (StreamingLLM's re-positioning); other caches keep text positions,
which costs the same per step, so their speed (not their output) is still meaningful there.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import pathlib
import statistics
import sys
import time

import torch

from . import floor, metrics

DEFAULT_CACHES = ("dynamic", "full", "sink_window", "anchor")


def build_cache(name: str, model, tokenizer, length: int, fraction: float):
    """A fresh cache: "dynamic" (transformers' DynamicCache) or a registered strategy sized for `length`."""
    from transformers import DynamicCache

    import kvcompress.strategies  # noqa: F401  (registers the built-in strategies)
    from kvcompress import SinkWindowCache, registry

    if name == "dynamic":
        return DynamicCache(config=model.config)
    cls, options = registry.resolve(name)
    tokens = max(1, math.ceil(fraction * length)) if cls.uses_budget else None
    beyond_context = length > getattr(model.config, "max_position_embeddings", length)
    if cls is SinkWindowCache and beyond_context and "positions" not in options:
        n_sink = min(4, tokens - 1)  # storage options (kv_bits, ...) still apply: the same strategy, stored so
        return SinkWindowCache(model, n_sink=n_sink, window=tokens - n_sink, positions="cache", **options)
    return cls.for_budget(model, tokenizer, tokens, **options)


def _attention_for(name: str) -> str:
    return "sdpa" if name == "dynamic" else "kvcompress"


@torch.no_grad()
def _decode(model, cache, token: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """`steps` greedy single-token forwards from `token` (1, 1); returns (last token, seconds per step)."""
    metrics.sync(model.device)
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(token, **_cache_kw(cache), use_cache=True).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
    metrics.sync(model.device)
    return token, (time.perf_counter() - start) / steps


def _cache_kw(cache) -> dict:
    from kvcompress.cache import cache_arg

    return cache_arg(cache)


def run_length(model, tokenizer, ids: torch.Tensor, names: list[str], fraction: float, rounds: int, steps: int,
               progress=None) -> list[dict]:
    """All caches at one context length (`ids` (1, L)): prefill each, then interleaved decode rounds."""
    device = str(model.device)
    live = {}
    rows = {}
    for name in names:
        gc.collect()
        before = _rss()
        cache = build_cache(name, model, tokenizer, ids.shape[1], fraction)
        model.set_attn_implementation(_attention_for(name))
        with metrics.PeakMemory(device) as peak:
            logits, prefill_seconds = metrics.prefill(model, cache, ids)
            token, _ = _decode(model, cache, logits.argmax(-1, keepdim=True), 1)  # warm-up step
        gc.collect()
        resident = _rss() - before if model.device.type == "cpu" else None
        live[name] = [cache, token]
        rows[name] = {"cache": name, "context_tokens": ids.shape[1], "prefill_seconds": prefill_seconds,
                      "prefill_peak_mib": peak.peak_mb,
                      "decode_resident_mib": None if resident is None else resident / 2**20,
                      "step_seconds": [], "kv_bytes_per_round": []}
        if progress:
            progress()
    bandwidth = [floor.read_bandwidth(device)["bytes_per_s"]]
    matmul = [floor.matmul_seconds(model)["seconds"]]
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            cache, token = live[name]
            model.set_attn_implementation(_attention_for(name))
            rows[name]["kv_bytes_per_round"].append(floor.cache_kv_bytes(cache))
            live[name][1], seconds = _decode(model, cache, token, steps)
            rows[name]["step_seconds"].append(seconds)
        if progress:
            progress()
    bandwidth.append(floor.read_bandwidth(device)["bytes_per_s"])
    matmul.append(floor.matmul_seconds(model)["seconds"])
    weights = floor.weight_bytes(model)
    band = statistics.median(bandwidth)
    for name in names:
        row = rows[name]
        step = statistics.median(row["step_seconds"])
        kv = int(statistics.fmean(row["kv_bytes_per_round"]))
        held = live[name][0].kv_bytes() if hasattr(live[name][0], "kv_bytes") else kv
        row.update({
            "kept_tokens": _kept_tokens(live[name][0]),
            "kv_bytes": kv,
            "kv_bytes_allocated": held,
            "held_over_kept": held / kv if kv else float("nan"),
            "weight_bytes": weights,
            "step_bytes": weights + kv,
            "bandwidth_gb_s": band / 1e9,
            "bandwidth_samples_gb_s": [b / 1e9 for b in bandwidth],
            "step_ms": step * 1e3,
            "step_ms_iqr": _iqr(row["step_seconds"]) * 1e3,
            "floor_ms": (weights + kv) / band * 1e3,
            "floor_ratio": step / ((weights + kv) / band),
            "matmul_ms": statistics.median(matmul) * 1e3,
            "matmul_samples_ms": [m * 1e3 for m in matmul],
            "matmul_ratio": step / statistics.median(matmul),
            "tokens_per_s": 1 / step,
        })
    model.set_attn_implementation("kvcompress")
    del live
    gc.collect()
    return [rows[name] for name in names]


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _kept_tokens(cache) -> int:
    """Tokens kept per layer and kv head, averaged (rounded): with head-adaptive budgets (kvzip's global allocation,
    AdaKV) or per-layer ones (pyramidkv) the largest lane would overstate what the cache holds."""
    if hasattr(cache, "mean_kept_counts"):
        return round(float(cache.mean_kept_counts().mean()))
    return cache.get_seq_length()


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return max(values) - min(values)
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def add_ratios(rows: list[dict]) -> None:
    """Speed-up of each cache over `full` (or the first cache) at the same length, measured and at the floor; and
    each step over sink_window's (`step_vs_sink_window`), the cheapest compressed step, when it ran."""
    by_length: dict[int, list[dict]] = {}
    for row in rows:
        by_length.setdefault(row["context_tokens"], []).append(row)
    for group in by_length.values():
        base = next((r for r in group if r["cache"] == "full"), group[0])
        sink = next((r for r in group if r["cache"] == "sink_window"), None)
        for row in group:
            row["speedup_vs_" + base["cache"]] = base["step_ms"] / row["step_ms"]
            row["floor_speedup_vs_" + base["cache"]] = base["floor_ms"] / row["floor_ms"]
            if sink is not None:
                row["step_vs_sink_window"] = row["step_ms"] / sink["step_ms"]


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| context | cache | kept tokens | KV MiB | step ms (IQR) | floor ms | step / floor | matmul ms | "
        "step / matmul | step / sink_window | tok/s | vs full | floor vs full | prefill s | prefill peak +MiB | "
        "resident +MiB | held / kept bytes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        resident = "-" if r["decode_resident_mib"] is None else f"{r['decode_resident_mib']:.0f}"
        lines.append(
            f"| {r['context_tokens']} | {r['cache']} | {r['kept_tokens']} | {r['kv_bytes'] / 2**20:.1f} | "
            f"{r['step_ms']:.1f} ({r['step_ms_iqr']:.1f}) | {r['floor_ms']:.1f} | {r['floor_ratio']:.2f} | "
            f"{r['matmul_ms']:.1f} | {r['matmul_ratio']:.2f} | {_times(r.get('step_vs_sink_window'))} | "
            f"{r['tokens_per_s']:.1f} | "
            f"{_times(r.get('speedup_vs_full'))} | "
            f"{_times(r.get('floor_speedup_vs_full'))} | {r['prefill_seconds']:.1f} | "
            f"{r['prefill_peak_mib']:.0f} | {resident} | {r.get('held_over_kept', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def _times(ratio: float | None) -> str:
    """"1.23x", or "-" when there is no ratio (no `full` cache in the run)."""
    return "-" if ratio is None or math.isnan(ratio) else f"{ratio:.2f}x"


def plot(rows: list[dict], path: pathlib.Path) -> pathlib.Path | None:
    """Step time and floor against context length, one colour per cache."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(dict.fromkeys(r["cache"] for r in rows)):
        mine = [r for r in rows if r["cache"] == name]
        x = [r["context_tokens"] for r in mine]
        colour = f"C{i}"
        ax.plot(x, [r["step_ms"] for r in mine], "o-", color=colour, label=f"{name} step")
        ax.plot(x, [r["floor_ms"] for r in mine], "--", color=colour, alpha=0.6, label=f"{name} floor")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("decode step (ms)")
    ax.set_title("Decode step time vs the memory-bandwidth floor")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvcompress.bench.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="bundled alias (default smollm2-135m), local path or hub name")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--caches", default=",".join(DEFAULT_CACHES),
                   help="comma list: dynamic and/or registered strategy names (default %(default)s)")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="comma list of context lengths in tokens")
    p.add_argument("--fraction", type=float, default=0.1, help="kept fraction for budgeted strategies")
    p.add_argument("--rounds", type=int, default=5, help="interleaved decode rounds (medians reported; >= 5)")
    p.add_argument("--steps", type=int, default=8, help="decode steps per round")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="folder for speed.json and speed.png")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import kvcompress.strategies  # noqa: F401
    from kvcompress import registry
    from kvcompress.models import DEFAULT_MODEL, load_model

    from .tasks import _essay_ids

    names = [n.strip() for n in args.caches.split(",") if n.strip()]
    unknown = [n for n in names if n != "dynamic" and n.split(":")[0] not in registry.available()]
    if not names or unknown:
        raise SystemExit(f"--caches: unknown {unknown}; use dynamic or one of {', '.join(registry.available())}")
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--lengths must be integers, got {args.lengths!r}") from None
    if not lengths or min(lengths) < 2:
        raise SystemExit("--lengths: give context lengths >= 2")
    if not 0 < args.fraction <= 1:
        raise SystemExit(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit("--rounds and --steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, tokenizer = load_model(args.model or DEFAULT_MODEL, device=args.device, dtype=getattr(torch, args.dtype))
    essay = _essay_ids(tokenizer, max(lengths))
    metrics.prefill(model, build_cache("full", model, tokenizer, 16, 1.0), torch.tensor([essay[:16]]))  # warm-up
    total = len(lengths) * (len(names) + args.rounds)
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="speed", file=sys.stderr)
        progress = bar.update
    except ImportError:
        bar, progress = None, None
    load_before = os.getloadavg()
    started = time.time()
    rows = []
    for length in lengths:
        ids = torch.tensor([essay[:length]])
        rows += run_length(model, tokenizer, ids, names, args.fraction, args.rounds, args.steps, progress)
    if bar:
        bar.close()
    add_ratios(rows)
    environment = {
        "model": args.model or DEFAULT_MODEL, "dtype": args.dtype, "device": args.device,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "wall_seconds": time.time() - started,
        "rounds": args.rounds, "steps": args.steps, "fraction": args.fraction,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(markdown_table(rows))
    print(f"\n{environment['model']} {args.dtype} on {args.device}, torch {torch.__version__}, "
          f"{environment['torch_threads']} threads, medians of {args.rounds} rounds x {args.steps} steps; "
          f"load average before/after {load_before[0]:.2f}/{environment['loadavg_after'][0]:.2f}; "
          f"{environment['wall_seconds']:.0f} s")
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        from .runner import write_json

        write_json(out / "speed.json", {"environment": environment, "rows": rows})
        picture = plot(rows, out / "speed.png")
        print(f"results: {out / 'speed.json'}" + (f"; plot: {picture}" if picture else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
