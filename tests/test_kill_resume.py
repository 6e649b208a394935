"""Kill and resume without loss: the bench CLI and anchor training run as subprocesses on a tiny random model, are
SIGKILLed at seeded random moments and resumed until they finish. At every kill, every file they wrote parses
(no half-written JSON, weights or optimizer state); the final results / checkpoint equal an uninterrupted run's
(bench cells minus timing fields; checkpoint tensors exactly)."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from kvcompress import atomic
from test_bench import tiny_dir  # noqa: F401  (fixture: a saved tiny random Llama with a BPE tokenizer)
from test_train import _tiny_checkpoint

pytestmark = pytest.mark.slow

KILLS = 4
TIMING = {"seconds", "cpu_seconds", "prefill_seconds", "decode_tokens_per_s", "answer_seconds", "speedup_vs_full",
          "started_at", "peak_memory_mb", "peak_memory_kind", "peak_memory_total_mb", "process_maxrss_mb"}


def _files(folder: pathlib.Path):
    """The files a reader would open: everything except the writers' own temporary / staging files."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def check_files_parse(folder: pathlib.Path) -> None:
    """Every JSON parses (strictly), every safetensors / torch file loads; AssertionError naming the file if not."""
    for path in _files(folder):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(), parse_constant=lambda name: 1 / 0)
            elif path.suffix == ".safetensors":
                load_file(path)
            elif path.suffix == ".pt":
                torch.load(path, weights_only=True)
        except Exception as error:  # noqa: BLE001 - any failure to parse is the finding
            raise AssertionError(f"{path.name} does not parse after a kill: {type(error).__name__}: {error}")


def _snapshot(folder: pathlib.Path) -> dict:
    try:
        return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    except OSError:  # a file vanished while listing (a rename): try again next poll
        return {}


def run_with_kills(first: list[str], resume: list[str], out: pathlib.Path, seed: int) -> int:
    """Run `first`, SIGKILL it at a seeded random point, check the files, run `resume`, ... `KILLS` times, then let
    `resume` finish. Returns the number of kills that landed (the process had not finished yet).

    A random point: after the k-th change seen in `out` (k in 1..3, polled every 2 ms), plus 0-80 ms. Kills then
    land in or just after the writes, where a non-atomic writer leaves half-written files, rather than mostly
    during start-up (importing torch takes longer than a tiny run's work).
    """
    rng = random.Random(seed)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    command, landed = first, 0
    for attempt in range(KILLS + 1):
        before = _snapshot(out) if out.exists() else {}
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        if attempt < KILLS:
            changes, wanted = 0, rng.randint(1, 3)
            while proc.poll() is None and changes < wanted:
                time.sleep(0.002)
                now = _snapshot(out) if out.exists() else {}
                if now and now != before:
                    changes, before = changes + 1, now
            time.sleep(rng.uniform(0.0, 0.08))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                landed += 1
                if out.exists():
                    check_files_parse(out)
                command = resume
                continue
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr.decode()[-3000:]
        command = resume
    return landed


def _run(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]


def test_check_files_parse_catches_half_written_files(tmp_path):
    """Planted-bug twin of the check above: truncated JSON and weights are reported."""
    atomic.write_json(tmp_path / "ok.json", {"a": [1, 2, 3]})
    check_files_parse(tmp_path)
    (tmp_path / "results.json").write_text('{"cells": {"a": 1')
    with pytest.raises(AssertionError, match="results.json does not parse"):
        check_files_parse(tmp_path)
    (tmp_path / "results.json").unlink()
    from safetensors.torch import save_file

    save_file({"w": torch.ones(64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AssertionError, match="model.safetensors does not parse"):
        check_files_parse(tmp_path)


def _bench_cells(path: pathlib.Path) -> dict:
    cells = json.loads(path.read_text())["cells"]
    return {key: {k: v for k, v in cell.items() if k not in TIMING} for key, cell in cells.items()}


@pytest.mark.parametrize("seed", [0])
def test_bench_killed_and_resumed_equals_uninterrupted(tiny_dir, tmp_path, seed):
    args = ["--model", str(tiny_dir), "--strategies", "full,sink_window", "--tasks", "obqa,ppl@64",
            "--budgets", "0.5,8", "--limit", "3", "--repeats", "1", "--no-progress", "--no-plots"]
    bench = [sys.executable, "-m", "kvcompress.bench", *args]
    _run(bench + ["--out", str(tmp_path / "clean")])
    out = tmp_path / "killed"
    landed = run_with_kills(bench + ["--out", str(out)], bench + ["--out", str(out), "--resume"], out, seed)
    assert landed >= 1
    check_files_parse(out)
    clean, resumed = _bench_cells(tmp_path / "clean" / "results.json"), _bench_cells(out / "results.json")
    assert list(resumed) == list(clean) and all(cell["status"] == "ok" for cell in clean.values())
    assert resumed == clean


def _checkpoint(folder: pathlib.Path) -> tuple[dict, dict, dict]:
    state = json.loads((folder / "train_state.json").read_text())
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    weights = folder / "model.safetensors"
    return load_file(weights if weights.is_file() else folder / "adapter_model.safetensors"), optimizer, state


def _assert_same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("seed, extra", [(0, []), (1, ["--mode", "ac", "--lora-rank", "2"])])
def test_training_killed_and_resumed_equals_uninterrupted(tiny_train_dir, tmp_path, seed, extra):
    """Full fine-tuning (EP), and LoRA with the trainable <AC> row (AC): the adapter checkpoint resumes exactly."""
    model_dir, text = tiny_train_dir
    args = ["--model", str(model_dir), "--text", str(text), "--steps", "12", "--seq-len", "32", "--lr", "3e-3",
            "--warmup", "1", "--save-every", "1", "--device", "cpu", "--no-progress", *extra]
    train = [sys.executable, "-m", "kvcompress.train", *args]
    _run(train + ["--output", str(tmp_path / "clean")])
    out = tmp_path / "killed"
    landed = run_with_kills(train + ["--output", str(out)], train + ["--output", str(out), "--resume"], out, seed)
    assert landed >= 1
    check_files_parse(out)
    weights, optimizer, state = _checkpoint(out)
    clean_weights, clean_optimizer, clean_state = _checkpoint(tmp_path / "clean")
    assert state["step"] == clean_state["step"] == 12
    for saved in (state, clean_state):  # the output folder, --resume and the time spent differ by construction
        del saved["args"]["output"], saved["args"]["resume"], saved["timing"]
    _assert_same(state, clean_state, "train_state")
    _assert_same(weights, clean_weights, "weights")
    _assert_same(optimizer, clean_optimizer, "optimizer")


@pytest.fixture
def tiny_train_dir(tmp_path):
    return _tiny_checkpoint(tmp_path)
