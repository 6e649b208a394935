"""Crash-safe files: a write either happens completely or not at all, even if the process is killed (SIGKILL) or
the machine loses power in the middle. Used by the bench (results.json) and anchor training (checkpoints).

- `write_bytes` / `write_text` / `write_json`: one file. The data goes to a temporary file in the same folder,
  is flushed and fsynced, then `os.replace`d over the target (atomic on POSIX and Windows), and the folder is
  fsynced so the rename itself survives a power loss. Readers see the old file or the new one, never a part.
- `staged(folder)` / `recover(folder)`: a SET of files (a checkpoint: weights, optimizer, state) replaced together.
  The files are written under `folder/.staging`; when all are fsynced, a `COMMITTED` marker is written
  atomically, then the files are moved into `folder` one by one and the staging folder removed. A process killed
  before the marker leaves the previous set untouched (`recover` deletes the partial staging folder); killed after
  it, `recover` finishes the moves. So after `recover`, `folder` holds one complete set, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from typing import Iterator

STAGING = ".staging"
COMMITTED = "COMMITTED"


def _fsync_dir(folder: pathlib.Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably (see the module docstring)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike, data, **dumps_options) -> None:
    """`json.dumps(data, **dumps_options)` written with `write_text`."""
    write_text(path, json.dumps(data, **dumps_options))


def _fsync_tree(folder: pathlib.Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_dir(path)


def recover(folder: str | os.PathLike) -> None:
    """Finish or discard an interrupted `staged` write into `folder` (a no-op when there is none)."""
    folder = pathlib.Path(folder)
    stage = folder / STAGING
    if not stage.is_dir():
        return
    if (stage / COMMITTED).is_file():
        for path in sorted(stage.iterdir()):
            if path.name != COMMITTED:
                target = folder / path.name
                if path.is_dir() and target.is_dir():
                    shutil.rmtree(target)
                os.replace(path, target)
        _fsync_dir(folder)
    shutil.rmtree(stage)
    _fsync_dir(folder)


@contextlib.contextmanager
def staged(folder: str | os.PathLike) -> Iterator[pathlib.Path]:
    """`with staged(out) as tmp: write files into tmp` replaces those files in `out` all together.

    An exception inside the block leaves `out` unchanged (the staging folder is removed).
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recover(folder)
    stage = folder / STAGING
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _fsync_tree(stage)
    write_bytes(stage / COMMITTED, b"")
    recover(folder)
