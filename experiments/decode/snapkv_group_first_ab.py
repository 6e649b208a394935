"""SnapKV's decode step with the group mean taken before the stream move and pooling (strategies/snapkv.py, average
pooling) against the order it replaced (every query head moved and pooled, then averaged; patched back in as the
registered subclass `snapkv_pool_every_head`), beside sink_window, in ONE process: `benchmarks/decode_cpu_time.py`
(CPU time of the thread, torch on one thread, interleaved rounds) with that subclass registered.

    OMP_NUM_THREADS=1 python experiments/decode/snapkv_group_first_ab.py --caches sink_window,snapkv_pool_every_head,snapkv \
        --lengths 4096,8192 --rounds 9 --out OUT.json
"""
import pathlib
import runpy
import sys

import torch

from kvcompress import registry
from kvcompress.selection import per_kv_head
from kvcompress.strategies.snapkv import SnapKVCache, to_stream


@registry.register("snapkv_pool_every_head")
class SnapKVPoolEveryHead(SnapKVCache):
    """SnapKV as before the change: every query head moved to stream order and pooled, then the group mean."""

    def scores(self, layer, order: torch.Tensor) -> torch.Tensor:
        mean = layer.observation.probs.mean(dim=2)
        return per_kv_head(self.pool(to_stream(mean, order)), layer.keys.shape[1])


if __name__ == "__main__":
    script = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "decode_cpu_time.py"
    sys.argv[0] = str(script)
    runpy.run_path(str(script), run_name="__main__")
