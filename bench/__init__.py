"""The benchmark suite: `python -m kvcompress.bench` (see README)."""
