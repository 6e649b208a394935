"""The bench grid: every (task, strategy, budget) cell, results.json, resume, environment, markdown table.

Strategies come from `kvcompress.registry` and are built with `cls.for_budget(model, tokenizer, tokens)`, so any
registered strategy joins the bench without changes here. A strategy with `uses_budget = False` keeps what it keeps
whatever the budget: it runs once per task, budget "-".
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from kvcompress import atomic
from kvcompress.anchor_model import anchor_config
from kvcompress.strategies import AnchorCache
from kvcompress.strategies.anchor import anchor_rule

from . import leaderboard, metrics, stats
from .journal import SampleJournal
from .journal import discard as discard_journals
from .plots import strategy_label
from .tasks import Icl, SharedPrefillTask, Task

RESULTS = "results.json"


# ------------------------------------------------------------------------------------------------------------
# Budgets


@dataclass(frozen=True)
class Budget:
    """A KV budget: a kept fraction of the task's context (0 < f <= 1) or a fixed number of tokens (>= 1)."""

    label: str
    fraction: float | None = None
    tokens: int | None = None

    def resolve(self, context_tokens: int) -> int | None:
        """Tokens to keep for a context of `context_tokens` (None: the strategy's own size)."""
        if self.tokens is not None:
            return self.tokens
        if self.fraction is not None:
            return max(1, math.ceil(self.fraction * context_tokens))
        return None


NO_BUDGET = Budget("-")


def parse_budget(text: str) -> Budget:
    """"0.1" (a fraction: has a "." or an exponent, in (0, 1]) or "256" (tokens, integer >= 1).

    Raises ValueError with the reason otherwise.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty budget")
    if re_int(text):
        tokens = int(text)
        if tokens < 1:
            raise ValueError(f"budget {text!r}: a token count must be >= 1 (or give a kept fraction in (0, 1])")
        return Budget(text, tokens=tokens)
    try:
        fraction = float(text)
    except ValueError:
        raise ValueError(
            f"budget {text!r} is neither a kept fraction in (0, 1] (like 0.1) nor a token count (like 256)"
        ) from None
    if not (0.0 < fraction <= 1.0) or math.isnan(fraction):
        raise ValueError(f"budget {text!r}: a kept fraction must be in (0, 1]; for a token count give an integer")
    return Budget(text, fraction=fraction)


def re_int(text: str) -> bool:
    return text.lstrip("+-").isdigit()


# ------------------------------------------------------------------------------------------------------------
# The grid


@dataclass
class Cell:
    task_label: str
    task: Task
    length: int | None
    strategy: str
    budget: Budget

    @property
    def key(self) -> str:
        return f"{self.task_label}|{self.strategy}|{self.budget.label}"


def grid(tasks: list[tuple[str, Task, int | None]], strategies: list[str], budgets: list[Budget]) -> list[Cell]:
    from kvcompress import registry

    cells = []
    for label, task, length in tasks:
        for name in strategies:
            for budget in budgets if registry.resolve(name)[0].uses_budget else [NO_BUDGET]:
                cells.append(Cell(label, task, length, name, budget))
    return cells


@dataclass
class RunConfig:
    model_name: str
    device: str
    dtype: str
    tasks: list[tuple[str, Task, int | None]]
    strategies: list[str]
    budgets: list[Budget]
    out: pathlib.Path
    limits: dict[str, int | None] = field(default_factory=dict)  # task name -> examples (None: all)
    seed: int = 0
    repeats: int = 3
    resume: bool = False
    options: dict = field(default_factory=dict)
    progress: bool = True
    preset: str = "quick"
    share_prefill: bool = False  # one prefill per sample for the cells of a task that can share it (`share_units`)
    decode_together: bool = False  # then those cells' caches answer together (`CacheGroup`), not one by one


def run(config: RunConfig, model, tokenizer) -> dict:
    """Run every cell not already finished (with `resume`), saving after each cell; returns the results dict.

    One process: results.json is rewritten after each cell. Several (`torch.distributed` initialised, e.g. under
    torchrun; see `init_distributed`): the cells still to run are dealt out round-robin by rank, each rank saves
    its own finished cells to `results.rank<R>.json` after each cell, and at the end the ranks exchange their
    cells (`all_gather_object`) and rank 0 writes the merged results.json and removes the rank files. Every rank
    returns the same merged dict. `--resume` reads results.json and any rank files a killed run left, so no
    finished cell runs twice, whatever the number of processes before and now. Before the final write the merged
    cells get their 95% intervals (`stats.annotate`) and results["ties"] the tie verdicts (`leaderboard.ties`).
    """
    from tqdm.auto import tqdm

    import kvcompress.strategies  # noqa: F401  (registers the built-in strategies)
    from kvcompress import registry

    rank, world = process_rank()
    config.out.mkdir(parents=True, exist_ok=True)
    path = config.out / RESULTS
    on_disk_at_start = finished_cells(config.out)  # cells written after this are another process's (save_results)
    finished = copy.deepcopy(on_disk_at_start) if config.resume else {}  # own copies: annotate() edits these
    if world > 1:
        torch.distributed.barrier()  # every rank has read the old files before any rank writes
    results = {"environment": environment(config), "config": describe(config), "cells": dict(finished)}
    cells = grid(config.tasks, config.strategies, config.budgets)
    results["config"]["cells"] = [c.key for c in cells]
    pending = [c for c in cells if c.key not in finished]
    units = share_units(pending, _shared_forward_key(model, tokenizer) if config.share_prefill else None)
    units = units[rank::world]
    mine = [cell for unit in units for cell in unit]
    done: dict[str, dict] = {}  # this process's cells of this run
    prepared: dict[tuple[str, str], object] = {}  # (task label, model) -> the task's data
    models = {config.model_name: (model, tokenizer)}  # a strategy spec's model=ALIAS rows run on that model
    if mine:
        _warm_up(model, tokenizer)
    bar = tqdm(total=len(mine), disable=not config.progress or rank != 0, unit="cell", dynamic_ncols=True)
    try:
        for unit in units:
            cell = unit[0]
            bar.set_description(cell.key if len(unit) == 1 else f"{cell.task_label}|{len(unit)} cells, one prefill")
            cls, options = registry.resolve(cell.strategy)
            name = options.pop("model", None) or config.model_name
            if name not in models:
                models[name] = _load(name, config)
            cell_model, cell_tokenizer = models[name]
            data = (cell.task_label, name)
            if data not in prepared:  # per model: its tokenizer may differ (an AC model's inserts <AC>)
                prepared[data] = prepare_task(cell, cell_tokenizer, config)
            if isinstance(prepared[data], PrepareError):  # the task's data could not be prepared
                outcome = [prepared[data].cell(c) for c in unit]
            elif len(unit) == 1:
                outcome = [run_cell(cell, (cls, options), cell_model, cell_tokenizer, prepared[data], config,
                                    progress=_sample_counter(bar, prepared[data]))]
            else:  # cells on the run's model (share_units)
                outcome = run_shared_cells(unit, cell_model, cell_tokenizer, prepared[data], config,
                                           progress=_sample_counter(bar, prepared[data]))
            for c, result in zip(unit, outcome):
                if not isinstance(prepared[data], PrepareError):
                    result["model"] = name
                result["rank"] = rank  # the process that ran it (0 without torchrun)
                done[c.key] = result
            results["environment"]["finished_at"] = _now()
            if world > 1:
                write_json(config.out / f"results.rank{rank}.json", {"rank": rank, "world_size": world,
                                                                     "cells": done})
            else:
                results["cells"].update(done)
                save_results(path, results, done, on_disk_at_start)
            discard_journals(config.out, [c.key for c in unit if done[c.key].get("status") in ("ok", "n/a")])
            bar.update(len(unit))
    finally:
        bar.close()
    if world > 1:
        everyone: list[dict] = [{} for _ in range(world)]
        torch.distributed.all_gather_object(everyone, done)
        for part in everyone:
            results["cells"].update(part)
    # this run's grid first, in grid order, then what earlier runs into this folder finished (--resume keeps it all)
    grid_keys = [c.key for c in cells if c.key in results["cells"]]
    earlier = sorted(set(results["cells"]) - set(grid_keys))
    results["cells"] = {key: results["cells"][key] for key in grid_keys + earlier}
    stats.annotate(results)
    results["ties"] = {"definition": leaderboard.TIES_NOTE, "groups": leaderboard.ties(results)}
    if rank == 0:
        results["environment"]["finished_at"] = _now()
        save_results(path, results, done if world == 1 else results["cells"], on_disk_at_start)
        for leftover in config.out.glob("results.rank*.json"):  # merged into results.json now
            leftover.unlink()
    if world > 1:
        torch.distributed.barrier()  # results.json is complete before any rank returns
    return results


def _sample_counter(bar, prepared):
    """A task's progress callback showing "sample k/n" (needle, RULER: their units run long) or "step k" beside the
    cell bar."""
    total = len(prepared["samples"]) if isinstance(prepared, dict) and "samples" in prepared else None
    done = [0]
    bar.set_postfix_str("")  # the last unit's count

    def step():
        done[0] += 1
        bar.set_postfix_str(f"sample {done[0]}/{total}" if total else f"step {done[0]}")

    return step


def finished_cells(out: pathlib.Path) -> dict[str, dict]:
    """The finished ("ok" or "n/a") cells in `out`: results.json, then the rank files of a multi-process run that
    was stopped before its merge (`results.rank<R>.json`)."""
    found: dict[str, dict] = {}
    for path in [out / RESULTS] + sorted(out.glob("results.rank*.json")):
        if path.is_file():
            found.update(json.loads(path.read_text()).get("cells", {}))
    return {key: cell for key, cell in found.items() if cell.get("status") in ("ok", "n/a")}


# ------------------------------------------------------------------------------------------------------------
# Several processes (torch.distributed)


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless a torch.distributed process group is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: str) -> str:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1 in the environment); returns the device
    this process runs on.

    Backend: gloo on CPU, nccl on CUDA, where each process takes the GPU of its LOCAL_RANK (`--device cuda`) so
    every process holds one model on its own GPU; an explicit `cuda:N` is kept (all ranks on GPU N). With
    WORLD_SIZE unset or 1 nothing happens.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    cuda = device.startswith("cuda")
    if cuda and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if cuda:
        torch.cuda.set_device(torch.device(device))  # nccl's object collectives use the current device
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def close_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _warm_up(model, tokenizer) -> None:
    """One short forward first, so the first cell's timing and memory do not include one-off allocations."""
    ids = tokenizer("Warm-up: the quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        model(ids.to(model.device), use_cache=False)


@dataclass
class PrepareError:
    """A task whose `prepare` raised: each of its cells becomes an "error" cell with this message."""

    message: str

    def cell(self, cell: Cell) -> dict:
        return {"task": cell.task_label, "task_name": cell.task.name, "context_length": cell.length,
                "strategy": cell.strategy, "budget": cell.budget.label, "metric": cell.task.metric,
                "started_at": _now(), "status": "error", "error": self.message, "stage": "prepare"}


def _load(name: str, config: RunConfig):
    """(model, tokenizer) of a strategy spec's `model=` (a bundled alias, path or hub name), as the run's model."""
    from kvcompress.models import load_model

    return load_model(name, device=config.device, dtype=getattr(torch, config.dtype))


def prepare_task(cell: Cell, tokenizer, config: RunConfig):
    """`cell.task.prepare(...)`, or a PrepareError: one task that cannot load its data must not stop the grid."""
    try:
        return cell.task.prepare(tokenizer, limit=config.limits.get(cell.task.name), seed=config.seed,
                                 length=cell.length, options=config.options)
    except Exception as error:  # noqa: BLE001 - recorded in that task's cells, the run goes on
        return PrepareError(f"{type(error).__name__}: {error}")


class NotApplicable(Exception):
    """The strategy cannot be built for this task (its `for_budget` refused with a ValueError)."""


def run_cell(cell: Cell, strategy: tuple[type, dict], model, tokenizer, prepared, config: RunConfig,
             progress=None) -> dict:
    """One (task, strategy, budget) measurement; an exception is recorded in the cell, not raised. `strategy`: the
    cache class and its options (`registry.resolve` of the cell's strategy spec, e.g. "kvzip:allocation=layer").

    Status: "ok"; "n/a" when the strategy's `for_budget` refuses (e.g. label_words outside ICL tasks: it is built
    from an ICL prompt, not a budget); "error" with the message otherwise.
    """

    cls, options = strategy

    def make_cache(context_tokens: int):
        try:
            return cls.for_budget(model, tokenizer, cell.budget.resolve(context_tokens), **options)
        except ValueError as error:
            raise NotApplicable(str(error)) from error

    base = _cell_base(cell, cls, options, model)
    torch.manual_seed(config.seed)
    cpu_start = time.process_time()
    try:
        with metrics.PeakMemory(model.device) as memory, metrics.stopwatch() as wall:
            if isinstance(cell.task, Icl):
                result = run_icl_cell(cell, model, tokenizer, prepared, make_cache)
            else:  # needle and RULER resume inside the cell (their sample journal)
                journal = {"journal": sample_journal([cell], config)} if isinstance(cell.task, SharedPrefillTask) \
                    else {}
                result = cell.task.run(model, tokenizer, make_cache, prepared, repeats=config.repeats,
                                       progress=progress, **journal)
    except NotApplicable as error:
        return {**base, "status": "n/a", "error": str(error)}
    except Exception as error:  # noqa: BLE001 - one failing strategy/task pair must not stop the grid
        return {**base, "status": "error", "error": f"{type(error).__name__}: {error}"}
    return _cell_result(cell, base, result, memory, wall[0], time.process_time() - cpu_start, config)


def share_units(cells: list[Cell], key=None) -> list[list[Cell]]:
    """The cells to run, in order, as units: the cells with the same `key(cell)` (not None) form one unit, run by
    `run_shared_cells`; every other cell is a unit of its own. No key: every cell alone."""
    units: list[list[Cell]] = []
    shared: dict = {}
    for cell in cells:
        group = key(cell) if key is not None else None
        if group is not None and group in shared:
            shared[group].append(cell)
            continue
        units.append([cell])
        if group is not None:
            shared[group] = units[-1]
    return units


def _shared_forward_key(model, tokenizer):
    """`share_units`' key for `--share-prefill`: (task, `kvcompress.shared_prefill.forward_key`) for a cell whose task
    can share prefills (`SharedPrefillTask`) and whose strategy runs on the run's model and builds (a cache built
    at the task's length tells its key); None for any other cell (it runs alone: an n/a strategy records why)."""
    from kvcompress import registry
    from kvcompress.shared_prefill import forward_key, shareable_storage

    def key(cell: Cell):
        if not isinstance(cell.task, SharedPrefillTask):
            return None
        cls, options = registry.resolve(cell.strategy)
        if "model" in options:
            return None
        try:
            cache = cls.for_budget(model, tokenizer, cell.budget.resolve(cell.length or 1024), **options)
        except ValueError:
            return None
        return (cell.task_label, forward_key(cache, 2)) if shareable_storage(cache) else None

    return key


def run_shared_cells(cells: list[Cell], model, tokenizer, prepared, config: RunConfig, progress=None) -> list[dict]:
    """Cells of one task (strategies, budgets) whose caches the core serves alike, each sample prefilled ONCE for all
    of them (`SharedPrefillTask.run_shared`, `kvcompress.shared_prefill.prefill_shared`: every cache ends bitwise as
    its own prefill would leave it, so the scores are those of `run_cell`). Each cell records `prefill_shared_with` (the
    unit's strategy|budget labels); its `prefill_seconds` is the shared prefill (the forward and every cut), and
    `seconds`, `cpu_seconds` and the peak memory are the unit's. With `config.decode_together` the caches of a
    sample then answer together, one forward per step (`kvcompress.cache_group.CacheGroup`; the model's linear layers
    run on all rows at once, so the logits may differ in the last bits from decoding one by one, and a greedy token
    may flip where two logits tie that closely); each answer says `decoded_together`. If the unit fails, its cells
    run one by one (`run_cell`), each recording the unit's error as `shared_prefill_error`."""
    from kvcompress import registry

    strategies = [registry.resolve(cell.strategy) for cell in cells]
    task = cells[0].task

    def make_caches(context_tokens: int):
        return [cls.for_budget(model, tokenizer, cell.budget.resolve(context_tokens), **options)
                for cell, (cls, options) in zip(cells, strategies)]

    bases = [_cell_base(cell, cls, options, model) for cell, (cls, options) in zip(cells, strategies)]
    torch.manual_seed(config.seed)
    cpu_start = time.process_time()
    try:
        with metrics.PeakMemory(model.device) as memory, metrics.stopwatch() as wall:
            results = task.run_shared(model, tokenizer, make_caches, prepared, count=len(cells), progress=progress,
                                      journal=sample_journal(cells, config), together=config.decode_together)
    except Exception as error:  # noqa: BLE001 - the cells alone say which one fails, and how
        alone = [run_cell(cell, strategy, model, tokenizer, prepared, config)
                 for cell, strategy in zip(cells, strategies)]
        return [{**cell, "shared_prefill_error": f"{type(error).__name__}: {error}"} for cell in alone]
    cpu = time.process_time() - cpu_start
    labels = [f"{cell.strategy}|{cell.budget.label}" for cell in cells]
    return [{**_cell_result(cell, base, result, memory, wall[0], cpu, config), "prefill_shared_with": labels}
            for cell, base, result in zip(cells, bases, results)]


def sample_journal(cells: list[Cell], config: RunConfig) -> SampleJournal:
    """The journal of `cells` run together (`kvcompress.bench.journal`): a killed run resumes at their first
    unfinished sample. Its records are reused only for the same model, dtype, device, seed and task options."""
    fingerprint = {"model": config.model_name, "dtype": config.dtype, "device": config.device, "seed": config.seed,
                   "options": config.options}
    if config.decode_together:  # answers may differ in the last bits from those decoded one by one: not mixed
        fingerprint["decode"] = "together"
    return SampleJournal(config.out, [cell.key for cell in cells], fingerprint, fresh=not config.resume)


def _cell_base(cell: Cell, cls: type, options: dict, model) -> dict:
    base = {"task": cell.task_label, "task_name": cell.task.name, "context_length": cell.length,
            "strategy": cell.strategy, "cache_class": cls.__name__, "budget": cell.budget.label,
            "budget_fraction": cell.budget.fraction, "budget_tokens_fixed": cell.budget.tokens,
            "metric": cell.task.metric, "started_at": _now()}
    if issubclass(cls, AnchorCache):  # tables mark the AnLLM rule on a model never anchor-trained
        base["anchor_trained"] = anchor_config(model) is not None
        base["anchor_rule"] = anchor_rule(model, options.get("keep_first"), options.get("keep_segments"))
    return base


def _cell_result(cell: Cell, base: dict, result: dict, memory, seconds: float, cpu_seconds: float,
                 config: RunConfig) -> dict:
    context = result.get("context_tokens")
    result.setdefault("decode_tokens_per_s", None)
    result.setdefault("prefill_seconds", None)
    return {
        **base,
        **result,
        "budget_tokens": cell.budget.resolve(context) if context else None,
        "peak_memory_mb": memory.peak_mb,
        "peak_memory_kind": memory.kind,
        "peak_memory_total_mb": memory.peak_total_mb,
        "process_maxrss_mb": metrics.process_maxrss_mb(),
        "seconds": seconds + result.get("resumed_seconds", 0.0),  # a resumed cell: the runs' sum
        "cpu_seconds": cpu_seconds + result.get("resumed_cpu_seconds", 0.0),
        "repeats": config.repeats,
        "status": "ok",
    }


def run_icl_cell(cell: Cell, model, tokenizer, task, make_cache) -> dict:
    """ICL classification through `kvcompress.bench.icl`: its own construction for the methods it knows (full,
    label_words, hidden_random), else `make_cache` (the cell's strategy and budget) for the demonstrations."""
    icl = cell.task.module()
    name = cell.strategy
    methods = [name] if name in icl.METHODS else {name: make_cache}
    prefixes, info = icl.build_prefixes(model, tokenizer, task, methods)  # for the exact KV bytes
    prefix = prefixes[name]
    kv = metrics.kv_stats(prefix.cache, model, info["prefix_tokens"])
    evaluated = icl.evaluate_icl(model, tokenizer, task, methods=methods, progress=False)
    out, reference = evaluated[name], evaluated["full"]["predictions"]
    return {
        "accuracy": out["accuracy"],
        "loyalty": out["loyalty"],
        "n_examples": out["n_examples"],
        "example_correct": stats.flags(p == gold for p, (_, gold) in zip(out["predictions"], task.examples)),
        "example_loyal": stats.flags(p == f for p, f in zip(out["predictions"], reference)),
        "context_tokens": info["prefix_tokens"],
        "answer_seconds": out["answer_seconds"],
        "speedup_vs_full": out.get("speedup"),
        **kv,
    }


# ------------------------------------------------------------------------------------------------------------
# Environment and files


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> dict:
    import kvcompress

    root = pathlib.Path(kvcompress.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(dirty) if commit else None}


def environment(config: RunConfig) -> dict:
    import transformers

    import kvcompress

    device = torch.device(config.device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvcompress": getattr(kvcompress, "__version__", None),
        "git": git_commit(),
        "device": config.device,
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "world_size": process_rank()[1],  # processes that shared the grid (torchrun), one model each
        "distributed_backend": torch.distributed.get_backend() if process_rank()[1] > 1 else None,
        "model": config.model_name,
        "dtype": config.dtype,
        "argv": sys.argv,
        "started_at": _now(),
        "finished_at": None,
    }


def describe(config: RunConfig) -> dict:
    return {
        "preset": config.preset,
        "tasks": [label for label, _, _ in config.tasks],
        "strategies": config.strategies,
        "budgets": [b.label for b in config.budgets],
        "limits": config.limits,
        "seed": config.seed,
        "repeats": config.repeats,
        "options": config.options,
        "share_prefill": config.share_prefill,
        "decode_together": config.decode_together,
        "score": "accuracy: argmax of the summed log-likelihood of each answer (lm-eval acc); accuracy_norm: "
        "divided by the answer's UTF-8 byte length (acc_norm)",
    }


def _clean(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def save_results(path: pathlib.Path, results: dict, mine: dict[str, dict], at_start: dict[str, dict]) -> None:
    """Write `results` to `path` (results.json) without losing the cells another process wrote there meanwhile (two
    runs given the same --out): under an exclusive lock on `path`.lock, the finished cells in the file that are not
    as they were when this run started (`at_start`: written since, by another process) join `results["cells"]`,
    then this run's own cells `mine` take precedence, then the file is replaced atomically. What the file held at
    the start stays only through `results` (with --resume; without it the run starts a fresh file). Cells keep
    the order this run gives them; the others follow. (No lock where fcntl is missing: the last writer wins.)"""
    with _locked(path.with_name(path.name + ".lock")):
        others = {k: v for k, v in finished_cells(path.parent).items() if k not in mine and at_start.get(k) != v}
        results["cells"] = {**results["cells"], **others, **mine}
        write_json(path, results)


@contextlib.contextmanager
def _locked(lock_path: pathlib.Path):
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json(path: pathlib.Path, data: dict) -> None:
    """Strict JSON (NaN/inf as null), written atomically and durably (`kvcompress.atomic`)."""
    atomic.write_json(path, _clean(data), indent=1, allow_nan=False)


# ------------------------------------------------------------------------------------------------------------
# Table


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


INTERVAL_NOTE = (
    "[a, b]: 95% interval: Wilson for accuracies over right/wrong examples (needle, multiple choice, ICL, RULER "
    "tasks with one expected string) and, on the effective sample size, for the other RULER tasks and the RULER "
    "average; percentile bootstrap over windows for perplexity (bench/stats.py). vs full: the paired difference to "
    "`full` on the same examples (Newcombe's paired interval for right/wrong outcomes and, generalised, for other "
    "RULER scores; a paired bootstrap for perplexity). No interval: the cell has no "
    "per-example data (written by an older version) or too few examples (a bootstrap needs 2).")


def _n_label(cells: list[dict]) -> str:
    counts = sorted({c.get("n_examples") for c in cells if c.get("n_examples") is not None})
    if not counts:
        return ""
    return f", n={counts[0]}" if len(counts) == 1 else f", n={counts[0]}-{counts[-1]}"


def score_table(results: dict) -> str:
    """Scores side by side: one row per strategy and budget (`full` first), one column per scored task (accuracy,
    or perplexity marked "ppl": lower is better; the header gives the examples per cell, n), each score with its
    95% interval when the cell has one; "-" where a cell is missing. "" when fewer than two tasks were scored."""
    cells = [c for c in results["cells"].values() if c.get("status") == "ok"
             and (c.get("accuracy") is not None or c.get("perplexity") is not None)]
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    if len(tasks) < 2:
        return ""
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for cell in cells:
        rows.setdefault((strategy_label(cell), cell["budget"]), {})[cell["task"]] = cell
    metric = {t: "ppl" if any(c["task"] == t and c.get("perplexity") is not None for c in cells) else "acc"
              for t in tasks}
    header = [f"{t} ({metric[t]}{_n_label([c for c in cells if c['task'] == t])})" for t in tasks]
    lines = ["| strategy | budget | " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(tasks)]
    for (strategy, budget), by_task in sorted(rows.items(), key=lambda item: (item[0][0] != "full", item[0])):
        values = []
        for task in tasks:
            cell = by_task.get(task)
            if cell is None:
                values.append("-")
            elif metric[task] == "ppl":
                values.append(stats.with_interval(cell["perplexity"], cell.get("ci", {}).get("perplexity"), ".2f"))
            else:
                values.append(stats.with_interval(cell["accuracy"], cell.get("ci", {}).get("accuracy"), ".3f"))
        lines.append(f"| {strategy} | {budget} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    """One row per cell: score with its 95% interval, the paired difference to `full`, examples, KV kept, KV
    bytes, timings, memory."""
    lines = [
        "| task | strategy | budget | score [95% CI] | vs full [95% CI] | n | kept frac | KV MiB | KV bytes frac "
        "| prefill s | decode tok/s | peak +MiB |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in results["cells"].values():
        if cell.get("status") == "n/a":
            continue
        if cell.get("status") != "ok":
            lines.append(f"| {cell['task']} | {strategy_label(cell)} | {cell['budget']} | error: "
                         f"{cell.get('error', '')[:60].replace('|', '/')} | | | | | | | | |")
            continue
        metric = stats.score_metric(cell)
        interval = cell.get("ci", {}).get(metric)
        if metric == "perplexity":
            score = "ppl " + stats.with_interval(cell["perplexity"], interval, ".2f")
        elif metric == "accuracy":
            score = "acc " + stats.with_interval(cell["accuracy"], interval, ".3f")
            if cell.get("accuracy_norm") is not None:
                score += f" (norm {cell['accuracy_norm']:.3f})"
        else:
            score = "-"
        diff = stats.difference_text(cell.get("vs_full", {}).get(metric), ".2f" if metric == "perplexity" else ".3f")
        kv = cell.get("kv_bytes")
        lines.append(
            f"| {cell['task']} | {strategy_label(cell)} | {cell['budget']} | {score} | {diff} | "
            f"{_fmt(cell.get('n_examples'), 'd')} | "
            f"{_fmt(cell.get('kept_fraction'), '.3f')} | {_fmt(None if kv is None else kv / 2**20, '.2f')} | "
            f"{_fmt(cell.get('kv_bytes_fraction'), '.3f')} | {_fmt(cell.get('prefill_seconds'), '.2f')} | "
            f"{_fmt(cell.get('decode_tokens_per_s'), '.1f')} | {_fmt(cell.get('peak_memory_mb'), '.0f')} |"
        )
    skipped = [c for c in results["cells"].values() if c.get("status") == "n/a"]
    if skipped:
        pairs = sorted({f"{c['strategy']} on {c['task_name']}" for c in skipped})
        lines.append("")
        lines.append(f"not applicable (the strategy cannot be built for a budget on that task): {', '.join(pairs)}")
    lines += ["", INTERVAL_NOTE]
    return "\n".join(lines)
