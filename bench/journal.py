"""Per-sample records of the cells being run, so a killed bench resumes inside a cell, not at its start.

`--resume` skips the cells results.json holds; a cell is written there only when all its samples are done. On the
long tasks (a RULER-4K unit of shared-prefill cells on qwen2.5-0.5b: about an hour at 1 thread) a kill lost the whole
unit. The runner therefore hands each `SharedPrefillTask` (needle, RULER) a `SampleJournal` for the cells it runs:
after each sample the task appends that sample's record for each cell to `<out>/samples/<cell>.jsonl`, and a later
run with `--resume` takes the samples found there instead of running them again. Journals are per cell, so a unit
may differ from the one that wrote them (a strategy added to the run, a code change that shares a forward with
more caches): each sample is run for the unit's cells that lack it, prefilled together. Once the cell is saved in
results.json its journal is deleted (`discard`).

A record is reused only when everything it depends on is the same: the cell key (task with its length and query
mode, strategy spec, budget), the run's `fingerprint` (model, dtype, device, seed, task options) and the sample's
digest (its token ids and expected answers, `tasks.sample_digest`). A line cut short by a kill is skipped. JSON keeps
every float exactly, so a resumed cell's scores, kept bytes and answers are those of an uninterrupted run; its
timings are the sum of the runs' (the cell says how many samples it resumed).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re

FOLDER = "samples"
ENTRY = ("prefill_seconds", "seconds", "cpu_seconds", "record")  # what a cell's line keeps of a sample


def journal_path(out: pathlib.Path, cell_key: str) -> pathlib.Path:
    """`<out>/samples/<readable cell key>-<hash>.jsonl` (the hash keeps keys that read alike apart)."""
    readable = re.sub(r"[^A-Za-z0-9@=.,+-]+", "_", cell_key)[:120]
    return out / FOLDER / f"{readable}-{hashlib.sha256(cell_key.encode()).hexdigest()[:10]}.jsonl"


def entries(path: pathlib.Path) -> list[dict]:
    """The whole lines of a journal file (none if it is missing): each a dict with at least "fingerprint", "index"
    and "digest"; a line cut short by a kill, or not a journal entry, is skipped."""
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:  # none yet, or deleted meanwhile by a process that saved its cell
        return out
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            if isinstance(entry, dict) and all(key in entry for key in ("fingerprint", "index", "digest")):
                out.append(entry)
        except ValueError:
            continue
    return out


class SampleJournal:
    """The journal of the cells `cell_keys` (one unit: the cells whose samples are run together, one record per cell
    per sample, in this order), under `out`. `fresh=True` (a run without --resume) starts their journals empty."""

    def __init__(self, out: pathlib.Path, cell_keys: list[str], fingerprint: dict, *, fresh: bool = False):
        self.paths = [journal_path(out, key) for key in cell_keys]
        self.fingerprint = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
        if fresh:
            discard(out, cell_keys)
        self._found = [self._read(path) for path in self.paths]

    def _read(self, path: pathlib.Path) -> dict[tuple[int, str], dict]:
        return {(entry["index"], entry["digest"]): entry for entry in entries(path)
                if entry["fingerprint"] == self.fingerprint}

    def load(self, index: int, digest: str) -> list[dict | None]:
        """Sample `index` with `digest` as each cell's journal holds it (None where it does not): an entry
        {"prefill_seconds", "seconds", "cpu_seconds", "record"} per cell (`SharedPrefillTask._run_sample`)."""
        entries = [found.get((index, digest)) for found in self._found]
        return [None if entry is None else {name: entry[name] for name in ENTRY} for entry in entries]

    def save(self, index: int, digest: str, entries: dict[int, dict]) -> None:
        """Append sample `index`'s entry of each cell in `entries` (cell position -> entry as `load` gives it),
        flushed to disk before returning."""
        for position, entry in entries.items():
            path = self.paths[position]
            line = {"fingerprint": self.fingerprint, "index": index, "digest": digest,
                    **{name: entry[name] for name in ENTRY}}
            with _open_to_append(path) as f:
                f.seek(0, os.SEEK_END)
                if f.tell():  # a line a kill cut short ends without a newline: this one starts after it
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                f.write((json.dumps(line) + "\n").encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            self._found[position][(index, digest)] = line


def _open_to_append(path: pathlib.Path):
    """`path` opened "a+b", its folder made first. Another process's `discard` (torchrun ranks, or runs sharing an
    --out) may remove the folder, empty, between the mkdir and the open: then both are tried again."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return open(path, "a+b")
        except FileNotFoundError:
            continue


def discard(out: pathlib.Path, cell_keys: list[str]) -> None:
    """Delete the journals of `cell_keys` (cells saved in results.json), and the folder once empty."""
    for key in cell_keys:
        journal_path(out, key).unlink(missing_ok=True)
    folder = out / FOLDER
    if folder.is_dir() and not any(folder.iterdir()):
        try:
            folder.rmdir()
        except OSError:  # another process wrote into it meanwhile
            pass
