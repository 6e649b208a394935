"""The CUDA path against the CPU path: every registered strategy (and the storage / allocation options) on the tiny
random Llama, Qwen2 and Gemma 3 models, same weights and inputs on both devices.

For each (architecture, strategy): `kvcompress.testing.max_step_error` on each device (the step logits of
generation with the compressing cache against one cache-free eager forward under the mask of what the cache let
each query see: exactness of the core ON that device), plus whether the two devices kept the same tokens (the
visibility of layer 0) and generated the same sequences. A strategy that cannot be built on the CPU either (it
needs inputs this harness does not give) is reported as skipped, not failed.

    python experiments/gpu/cuda_check.py out.json     # needs CUDA
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import traceback

import torch

import kvcompress.strategies  # noqa: F401  (registers the built-in strategies)
from kvcompress import registry
from kvcompress.strategies import AnchorCache, LabelWordCache, RandomKeepCache
from kvcompress.testing import CharTokenizer, left_padded, max_step_error, tiny_gemma3, tiny_llama, tiny_qwen2

EXTRA = ["kvzip:allocation=layer", "snapkv:allocation=adakv", "expected_attention:allocation=adakv",
         "sink_window:kv_bits=4", "h2o:kv_bits=4", "full:kv_bits=8"]
BUDGET = 10
TOLERANCE = 1e-4
DEVICE = os.environ.get("CHECK_DEVICE", "cuda")  # CHECK_DEVICE=cpu: a dry run of this script on a machine without CUDA


def build(spec: str, model):
    cls, options = registry.resolve(spec)
    if cls is AnchorCache:
        return AnchorCache(model, anchor_ids=[5, 17, 40])
    if cls is LabelWordCache:
        return LabelWordCache(model, keep_positions=[0, 3, 5, 8], prefix_length=12)
    if cls is RandomKeepCache:
        return RandomKeepCache(model, 4, 12, seed=0)
    return cls.for_budget(model, CharTokenizer(), BUDGET, **options)


def run(spec: str, model, ids, mask):
    torch.manual_seed(0)
    cache = build(spec, model)
    error, visible, sequences = max_step_error(model, cache, ids.to(model.device), mask.to(model.device),
                                               max_new_tokens=6)
    return error, visible.cpu(), sequences.cpu()


def main(out: str) -> int:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both devices: exactness, not speed
    torch.backends.cudnn.allow_tf32 = False
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 120, (n,), generator=generator).tolist() for n in (24, 17)]
    ids, mask = left_padded(rows)
    results = []
    for arch, make in (("llama", tiny_llama), ("qwen2", tiny_qwen2), ("gemma3", tiny_gemma3)):
        cpu_model = make()
        gpu_model = copy.deepcopy(cpu_model).to(DEVICE)
        for spec in registry.available() + EXTRA:
            row = {"arch": arch, "strategy": spec}
            t0 = time.time()
            try:
                cpu = run(spec, cpu_model, ids, mask)
            except Exception as error:  # noqa: BLE001
                row.update(status="skipped", reason=f"cpu: {type(error).__name__}: {error}"[:300])
                results.append(row)
                continue
            try:
                gpu = run(spec, gpu_model, ids, mask)
            except Exception as error:  # noqa: BLE001
                row.update(status="cuda error", reason=traceback.format_exc()[-1500:])
                results.append(row)
                print(arch, spec, "CUDA ERROR", error, flush=True)
                continue
            same_kept = cpu[1].shape == gpu[1].shape and bool((cpu[1] == gpu[1]).all())
            same_tokens = cpu[2].shape == gpu[2].shape and bool((cpu[2] == gpu[2]).all())
            ok = gpu[0] < TOLERANCE and cpu[0] < TOLERANCE
            row.update(status="ok" if ok else "inexact", cpu_error=cpu[0], cuda_error=gpu[0], same_kept=same_kept,
                       same_tokens=same_tokens, seconds=round(time.time() - t0, 2))
            results.append(row)
            print(json.dumps(row), flush=True)
    summary = {s: sum(r["status"] == s for r in results) for s in ("ok", "inexact", "cuda error", "skipped")}
    summary["kept_differs"] = [f"{r['arch']}/{r['strategy']}" for r in results if r.get("same_kept") is False]
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else DEVICE, "tolerance": TOLERANCE,
              "budget": BUDGET, "summary": summary, "results": results}
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(summary))
    return 0 if summary["cuda error"] == 0 and summary["inexact"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
