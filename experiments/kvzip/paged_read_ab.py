"""KVzip's decode step at 4K, 10% kept: PagedKV's page-order read (storage.py) against the row gather it replaced
(one index per slot, patched back in for that cache's steps only), beside sink_window; CPU time of the thread, torch
on one thread, interleaved rounds of 8 greedy steps in one process.

    OMP_NUM_THREADS=1 python experiments/kvzip/paged_read_ab.py ROUNDS OUT.json
"""
import json, statistics, sys, time, torch
from kvcompress.bench.speed import _cache_kw, build_cache
from kvcompress.bench.tasks import _essay_ids
from kvcompress.models import load_model
from kvcompress import storage
torch.set_num_threads(1)
new_read = storage.PagedKV.read
def old_read(self, used):
    slots = torch.arange(used, device=self.table.device).view(1, 1, -1).expand(*self.table.shape[:2], used)
    rows = self._physical(slots)
    return storage._gather_rows(self.key_pool, rows), storage._gather_rows(self.value_pool, rows)
model, tok = load_model(); model.set_attn_implementation("kvcompress")
ids = torch.tensor([_essay_ids(tok, 4096)[:4096]])
rounds, steps = int(sys.argv[1]), 8
names = ["sink_window", "kvzip(page read)", "kvzip(row read)"]
live, samples = {}, {n: [] for n in names}
with torch.no_grad():
    for n in names:
        storage.PagedKV.read = old_read if "row" in n else new_read
        cache = build_cache(n.split("(")[0], model, tok, ids.shape[1], 0.1)
        tokn = model(ids, **_cache_kw(cache)).logits[:, -1:].argmax(-1)
        tokn = model(tokn, **_cache_kw(cache)).logits[:, -1:].argmax(-1)
        live[n] = [cache, tokn]
    for r in range(rounds):
        for n in names[r % 3:] + names[:r % 3]:
            storage.PagedKV.read = old_read if "row" in n else new_read
            cache, tokn = live[n]
            for _ in range(steps):
                t0 = time.thread_time()
                tokn = model(tokn, **_cache_kw(cache)).logits[:, -1:].argmax(-1)
                samples[n].append(time.thread_time() - t0)
            live[n][1] = tokn
base = statistics.median(samples["sink_window"])
rows = []
for n in names:
    q = statistics.quantiles(samples[n], n=4); m = statistics.median(samples[n])
    rows.append(dict(cache=n, step_cpu_ms=m * 1e3, iqr_ms=(q[2] - q[0]) * 1e3, ratio=m / base, n_steps=len(samples[n])))
    print(f"| {n} | {m*1e3:.1f} ({(q[2]-q[0])*1e3:.1f}) | {m/base:.2f}x |")
import os
print("load", os.getloadavg())
json.dump(dict(rows=rows, load=os.getloadavg(), rounds=rounds, steps=steps), open(sys.argv[2], "w"), indent=1)
