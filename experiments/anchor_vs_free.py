"""Training-free strategies on the held-out perplexity of `experiments/anchor_eval.py` (the last 5 essays, first 1,024
tokens each, fed in 64-token chunks, compression after each chunk), at a fixed token budget, to set beside
AnchorCache on the same (anchor-trained) model at the same KV reduction.

    python experiments/anchor_vs_free.py smollm2-135m-anchor-ep 58 sink_window,tova,h2o out.json

KV reduction: 1 - kept / seen tokens, summed over the forwards (after each forward's compression), kept tokens
averaged over layers and kv heads.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import anchor_eval  # noqa: E402

from kvcompress.anchor_model import anchor_config  # noqa: E402
from kvcompress.models import load_model  # noqa: E402
from kvcompress.registry import get  # noqa: E402


def main() -> None:
    alias, budget, names, out = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4]
    torch.set_num_threads(1)
    model, tokenizer = load_model(alias)
    config = anchor_config(model)
    anchor_ids = torch.tensor(config["anchor_ids"] if config else [0])  # only AC models skip their anchors' targets
    ac = config is not None and config["mode"] == "ac"
    rows = {}
    for name in names:
        anchor_eval.make_cache = lambda kind, m, a, cls=get(name): cls.for_budget(m, tokenizer, budget)
        meter, start = anchor_eval.Meter(), time.time()
        ppl, n = anchor_eval.perplexity(model, tokenizer, "x", anchor_ids, 1024, 64, meter, ac=ac)
        rows[name] = {"ppl": ppl, "n": n, "kv_reduction": meter.reduction, "budget": budget}
        print(alias, name, budget, f"ppl {ppl:.2f} n {n} reduction {meter.reduction:.3f}",
              f"{time.time() - start:.0f}s", flush=True)
    pathlib.Path(out).write_text(json.dumps({"model": alias, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
