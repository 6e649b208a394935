"""Do SnapKVCache and kvpress 0.5.5's SnapKVPress keep the same tokens? (prefill, one row, tiny random Llama)

Not part of CI: kvpress needs its own virtualenv (transformers < 5.3). Two steps, sharing a folder:

    python experiments/snapkv_vs_kvpress.py ours /tmp/snapkv_xcheck        # this project's venv
    /path/to/kvpress-venv/bin/python experiments/snapkv_vs_kvpress.py kvpress /tmp/snapkv_xcheck

`ours` saves the tiny model (3 layers, 4 query / 2 kv heads) and, per setting, the prompt and SnapKVCache's kept
positions per layer and kv head; `kvpress` loads the same weights, prefills under SnapKVPress with
compression_ratio = 1 - budget / n (so it keeps `budget` tokens), finds which positions it kept by matching its
compressed keys with the uncompressed ones, and prints whether the sets are identical.
"""

from __future__ import annotations

import json
import pathlib
import sys

import torch

SETTINGS = [  # (prompt length n, budget, window, kernel); kvpress pools with avg only
    (48, 24, 8, 5),
    (64, 13, 8, 5),
    (40, 30, 4, 3),
    (100, 50, 16, 7),
    (300, 150, 64, 5),  # kvpress's defaults (window 64, kernel 5)
]


def ours(folder: pathlib.Path) -> None:
    from kvcompress import SnapKVCache
    from kvcompress.testing import tiny_llama

    model = tiny_llama(seed=3)
    model.save_pretrained(folder / "model")
    results = {}
    for n, budget, window, kernel in SETTINGS:
        ids = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(n))
        cache = SnapKVCache(model, budget=budget, window=window, kernel=kernel)
        with torch.no_grad():
            model(ids, past_key_values=cache)
        kept = [[cache.kept_positions(layer, h)[0] for h in range(2)] for layer in range(3)]
        results[f"{n},{budget},{window},{kernel}"] = {"ids": ids.tolist(), "kept": kept}
    (folder / "ours.json").write_text(json.dumps(results))


def kvpress(folder: pathlib.Path) -> None:
    from kvpress import SnapKVPress
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(folder / "model", attn_implementation="eager").eval()
    for key, result in json.loads((folder / "ours.json").read_text()).items():
        n, budget, window, kernel = map(int, key.split(","))
        ids = torch.tensor(result["ids"])
        full, compressed = DynamicCache(), DynamicCache()
        with torch.no_grad():
            model(ids, past_key_values=full)
            with SnapKVPress(compression_ratio=1 - budget / n, window_size=window, kernel_size=kernel)(model):
                model(ids, past_key_values=compressed)
        differences = []
        for layer in range(len(full.layers)):
            keys, kept_keys = full.layers[layer].keys[0], compressed.layers[layer].keys[0]  # (Hkv, n | kept, d)
            for h in range(keys.shape[0]):
                positions = sorted(int((keys[h] - k).abs().sum(-1).argmin()) for k in kept_keys[h])
                if positions != result["kept"][layer][h]:
                    differences.append((layer, h, positions, result["kept"][layer][h]))
        verdict = "identical" if not differences else f"DIFFERENT {differences}"
        print(f"n={n} budget={budget} window={window} kernel={kernel}: kvpress kept {kept_keys.shape[1]}, {verdict}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("ours", "kvpress"):
        raise SystemExit("usage: snapkv_vs_kvpress.py ours|kvpress FOLDER")
    folder = pathlib.Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    (ours if sys.argv[1] == "ours" else kvpress)(folder)
