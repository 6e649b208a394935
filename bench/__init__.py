"""The benchmark suite: `python -m kvcompress.bench` or `kvcompress-bench` (see docs/bench.md).

Modules: `cli` (command line), `runner` (the grid, results.json, resume), `tasks` (real-data tasks), `metrics`
(scoring through a cache, KV bytes, timing, memory), `plots`. Nothing heavy is imported here.
"""
