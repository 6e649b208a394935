"""Measurements shared by the bench tasks: log-likelihood scoring through a cache, KV statistics, timing, memory.

Everything here works with any `CompressedCache` (the bench builds caches through `cls.for_budget`), so a new
strategy is measured exactly like the others.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from kvcompress.cache import cache_arg
from kvcompress.shared_prefill import prefill_shared

# ------------------------------------------------------------------------------------------------------------
# KV statistics


def kv_bytes_per_token(model) -> int:
    """Bytes one token costs in a full KV cache of `model`: keys + values over all layers, in the model dtype."""
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 1
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element


def kv_stats(cache, model, seen_tokens: int) -> dict:
    """What `cache` holds after `seen_tokens` real tokens (batch of one row).

    Returns:
        kv_bytes: exact bytes of the kept keys and values (`cache.kv_bytes_used()`).
        kv_bytes_allocated: bytes of the slot buffers (`cache.kv_bytes()`: capacity, free slots included).
        kv_tokens_kept: kept tokens per layer and kv head, averaged over layers and kv heads.
        kept_fraction: kv_tokens_kept / seen_tokens.
        kv_bytes_fraction: kv_bytes / bytes a full cache would hold for `seen_tokens` (equals kept_fraction when
            the cache stores nothing but the kept tokens).
    """
    kept = cache.mean_kept_counts()[:, 0].mean().item()
    full = kv_bytes_per_token(model) * seen_tokens
    nbytes = int(cache.kv_bytes_used())
    return {
        "kv_bytes": nbytes,
        "kv_bytes_allocated": int(cache.kv_bytes()),
        "kv_tokens_kept": kept,
        "kept_fraction": kept / seen_tokens if seen_tokens else float("nan"),
        "kv_bytes_fraction": nbytes / full if full else float("nan"),
    }


def mean_stats(stats: Sequence[dict]) -> dict:
    """Average `kv_stats` dicts over samples (kv_bytes stays an integer: the rounded mean)."""
    if not stats:
        return {}
    out = {key: statistics.fmean(s[key] for s in stats) for key in stats[0]}
    for key in ("kv_bytes", "kv_bytes_allocated"):
        if key in out:
            out[key] = int(round(out[key]))
    return out


# ------------------------------------------------------------------------------------------------------------
# Forward passes through a cache


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels (CUDA) so wall-clock timings are real."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(model, cache, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Feed `ids` (1, n) into `cache` in one forward. Returns (logits of the last position (1, V), seconds)."""
    sync(model.device)
    start = time.perf_counter()
    logits = model(ids.to(model.device), **cache_arg(cache), use_cache=True, logits_to_keep=1).logits
    sync(model.device)
    return logits[:, -1].float(), time.perf_counter() - start


@torch.no_grad()
def prefill_caches(model, caches: Sequence, ids: torch.Tensor) -> float:
    """Feed `ids` (1, n) into every cache of `caches` (fresh caches): one plain forward for one cache, else
    `kvcompress.shared_prefill.prefill_shared` (one forward per group of caches the core serves alike; each cache
    ends bitwise as its own forward would leave it). Returns the seconds of it all (the forwards and every cut)."""
    if len(caches) == 1:
        return prefill(model, caches[0], ids)[1]
    sync(model.device)
    start = time.perf_counter()
    prefill_shared(model, list(caches), ids.to(model.device), logits_to_keep=1)
    sync(model.device)
    return time.perf_counter() - start


@torch.no_grad()
def continuation_logprobs(
    model, cache, queries: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
) -> list[float]:
    """Sum of log-probabilities of each continuation given the cached prefix and its query.

    Row i is `queries[i] + continuations[i]`; the rows run as ONE right-padded batch on a clone of `cache`
    (repeated per row), so every row sees the same compressed prefix and `cache` itself is not changed. Each
    query needs at least one token (its last logit predicts the continuation's first token).

    Returns:
        one float per row: sum_t log p(continuation_t | prefix, query, continuation_<t).
    """
    rows = [list(q) + list(c) for q, c in zip(queries, continuations)]
    width = max(len(r) for r in rows)
    batch = len(rows)
    ids = torch.zeros(batch, width, dtype=torch.long)
    real = torch.zeros(batch, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        real[i, : len(row)] = 1
    work = cache.clone()
    work.batch_repeat_interleave(batch)
    past = work.get_seq_length()
    mask = torch.cat([torch.ones(batch, past, dtype=torch.long), real], dim=-1)
    logits = model(
        ids.to(model.device), attention_mask=mask.to(model.device), **cache_arg(work), use_cache=True
    ).logits.float()
    scores = []
    for i, (query, cont) in enumerate(zip(queries, continuations)):
        start = len(query)
        predicting = logits[i, start - 1 : start - 1 + len(cont)].log_softmax(-1)
        target = torch.tensor(list(cont), device=predicting.device)
        scores.append(predicting.gather(-1, target[:, None]).sum().item())
    return scores


@torch.no_grad()
def greedy_decode(model, cache, first_logits: torch.Tensor, steps: int) -> tuple[list[int], float]:
    """Greedy tokens after a prefill whose last logits are `first_logits` (1, V).

    The first token comes from `first_logits`; each of the `steps` forwards feeds one token. Returns (the
    `steps` + 1 generated ids, seconds spent in the `steps` single-token forwards).
    """
    rows, seconds = greedy_decode_rows(model, cache, first_logits, steps)
    return rows[0], seconds


@torch.no_grad()
def greedy_decode_rows(model, cache, first_logits: torch.Tensor, steps: int) -> tuple[list[list[int]], float]:
    """`greedy_decode` for every row of `cache` (a batch, or a `CacheGroup`): `first_logits` (B, V). Returns (B
    lists of `steps` + 1 ids, seconds spent in the `steps` forwards)."""
    token = first_logits.argmax(-1, keepdim=True).to(model.device)  # (B, 1)
    out = [token]
    sync(model.device)
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(token, **cache_arg(cache), use_cache=True).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        out.append(token)
    sync(model.device)
    return torch.cat(out, dim=1).tolist(), time.perf_counter() - start


@torch.no_grad()
def streaming_nll(model, cache, ids: torch.Tensor, chunk: int, skip: Sequence[int] = ()) -> tuple[float, int]:
    """Negative log-likelihood of `ids` (1, n) fed in chunks of `chunk` tokens through `cache`.

    Each chunk attends to what the cache kept of the earlier chunks plus itself (the cache evicts after every
    forward), so a compressing cache is in effect from the second chunk on. Tokens whose id is in `skip` are fed
    but not scored (an AC model's `<AC>` anchors, which its tokenizer inserts: predicting them is not the text's
    perplexity). Returns (summed NLL of the scored tokens among 1..n-1, their number).
    """
    total, count, previous = 0.0, 0, None
    skip = torch.tensor(list(skip), dtype=torch.long)
    for start in range(0, ids.shape[1], chunk):
        part = ids[:, start : start + chunk].to(model.device)
        logits = model(part, **cache_arg(cache), use_cache=True).logits[0].float()
        logprobs = logits.log_softmax(-1)
        targets = part[0]
        scored = ~torch.isin(targets, skip.to(targets.device))
        if previous is not None and bool(scored[0]):
            total -= previous[int(targets[0])].item()
            count += 1
        if part.shape[1] > 1:
            keep = scored[1:]
            total -= logprobs[:-1].gather(-1, targets[1:, None])[keep].sum().item()
            count += int(keep.sum())
        previous = logprobs[-1]
    return total, count


# ------------------------------------------------------------------------------------------------------------
# Timing and memory


def median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else None


class PeakMemory:
    """Peak memory of a block of work.

    CPU: the highest process RSS during the block minus the RSS at entry. On Linux it is read exactly, with no
    thread: the kernel's RSS high-water mark (`VmHWM` in /proc/self/status) is reset at entry (writing 5 to
    /proc/self/clear_refs) and read at exit; blocks may nest (an inner block's reset first folds the high-water mark
    so far into every open outer block, and its peak folds into them at exit). Elsewhere (no /proc, or the reset
    refused) a thread samples the RSS every `interval` seconds. (The process high-water mark `ru_maxrss` cannot be
    reset, so it cannot give a per-cell peak; it is reported separately as `process_maxrss_mb`.) CUDA:
    `torch.cuda.max_memory_allocated` after a reset, minus the allocation at entry.
    """

    _open_exact: list[PeakMemory] = []  # the blocks reading the kernel's high-water mark, outermost first

    def __init__(self, device: torch.device | str, interval: float = 0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_mb: float | None = None
        self.peak_total_mb: float | None = None  # CPU: highest RSS (whole process); CUDA: max allocated
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "rss_delta"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _rss()
        self._peak = self._base
        high_water = _rss_high_water()
        if high_water is not None and _reset_rss_high_water():
            for outer in self._open_exact:
                outer._peak = max(outer._peak, high_water)
            self._open_exact.append(self)
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_total_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.peak_mb = self.peak_total_mb - self._base / 2**20
            return
        if self._thread is None:
            self._peak = max(self._peak, _rss_high_water() or 0, _rss())
            self._open_exact.remove(self)
            for outer in self._open_exact:
                outer._peak = max(outer._peak, self._peak)
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss())
        self.peak_mb = (self._peak - self._base) / 2**20
        self.peak_total_mb = self._peak / 2**20


def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux fallback: /proc/self/statm (pages)
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_high_water() -> int | None:
    """The kernel's RSS high-water mark of this process in bytes (Linux `VmHWM`), None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_high_water() -> bool:
    """Reset `VmHWM` to the current RSS (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def process_maxrss_mb() -> float:
    """The process RSS high-water mark (MiB), from getrusage: never decreases, so it is per-run, not per-cell."""
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as t: ...` then `t[0]` is the elapsed seconds."""
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)
