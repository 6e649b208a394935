"""The bench end to end on a tiny random model: intervals in results.json, the tables and the plot data; cells of
older versions; the paper preset; several processes under torchrun against one process ("rank" and the timings
are the fields allowed to differ)."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest

from kvcompress.bench import cli, leaderboard, plots, runner, stats, tasks
from test_bench import _run_cli, tiny_dir  # noqa: F401  (fixture: a saved tiny random Llama with a BPE tokenizer)

TIMING = {"rank", "seconds", "cpu_seconds", "prefill_seconds", "decode_tokens_per_s", "answer_seconds",
          "speedup_vs_full", "started_at", "peak_memory_mb", "peak_memory_kind", "peak_memory_total_mb",
          "process_maxrss_mb"}
PER_EXAMPLE = ("example_correct", "example_loyal", "window_nll", "window_tokens", "answers")


def _scores(cells: dict) -> dict:
    """Cells without the fields that vary from run to run (timings, memory, dates)."""
    return {key: {k: v for k, v in cell.items() if k not in TIMING} for key, cell in cells.items()}


def test_intervals_reach_results_json_the_tables_and_the_plot_data(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, captured = _run_cli(["--model", str(tiny_dir), "--strategies", "full,sink_window,snapkv", "--tasks",
                               "piqa,needle@256,ppl@256,sst2", "--budgets", "0.5", "--limit", "4", "--repeats", "1",
                               "--out", str(out), "--no-progress"], capsys)
    assert code == 0, captured.err
    results = json.loads((out / "results.json").read_text())
    cells = results["cells"]
    methods = {"piqa": "wilson", "needle@256": "wilson", "ppl@256": "bootstrap_windows", "sst2": "wilson"}
    for key, cell in cells.items():
        assert cell["status"] == "ok", cell.get("error")
        metric = stats.score_metric(cell)
        ci = cell["ci"][metric]
        assert ci["method"] == methods[cell["task"]] and ci["n"] == 4 and ci["confidence"] == 0.95
        assert ci["low"] <= cell[metric] <= ci["high"]
        # the table prints the JSON's interval
        assert stats.with_interval(cell[metric], ci, ".2f" if metric == "perplexity" else ".3f") in captured.out
        if cell["strategy"] == "full":
            assert "vs_full" not in cell
        else:
            diff = cell["vs_full"][metric]
            assert diff["method"] == ("paired_bootstrap" if metric == "perplexity" else "newcombe_paired")
            assert diff["low"] <= diff["difference"] <= diff["high"]
            spec = ".2f" if metric == "perplexity" else ".3f"
            assert f"| {stats.difference_text(diff, spec)} | 4 |" in captured.out
    assert cells["sst2|snapkv|0.5"]["ci"]["loyalty"]["method"] == "wilson"
    assert cells["sst2|full|-"]["ci"]["loyalty"]["low"] > 0.3  # full agrees with itself: 4/4
    # the plot draws the same intervals
    series = plots.score_series(results)
    for task, by_strategy in series.items():
        for strategy, points in by_strategy.items():
            for point in points:
                cell = cells[f"{task}|{strategy}|{point['budget']}"]
                interval = cell["ci"][point["metric"]]
                assert (point["low"], point["high"]) == (interval["low"], interval["high"])
            bars = plots.error_bars(points)
            assert all(b >= 0 for row in bars for b in row) and any(b > 0 for row in bars for b in row)
    assert (out / "accuracy_vs_kv_kept.png").is_file()
    # the tie verdicts: in results.json and printed
    groups = {(g["task"], g["budget"]) for g in results["ties"]["groups"]}
    assert groups == {("piqa", "0.5"), ("needle@256", "0.5"), ("ppl@256", "0.5"), ("sst2", "0.5")}
    assert "| task | budget | best | tied with the best" in captured.out and "contains 0" in captured.out
    assert "examples per cell (n): piqa 4, needle@256 4, ppl@256 4, sst2 4" in captured.out
    assert "piqa (acc, n=4)" in captured.out


def test_results_json_is_reproducible(tiny_dir, tmp_path, capsys):
    """The same grid twice: the same scores, intervals and tie verdicts (the bootstrap seed is fixed)."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert _run_cli(["--model", str(tiny_dir), "--strategies", "full,sink_window,tova", "--tasks", "ppl@256",
                         "--budgets", "0.5", "--limit", "5", "--repeats", "1", "--out", str(out), "--no-progress",
                         "--no-plots"], capsys)[0] == 0
        runs.append(json.loads((out / "results.json").read_text()))
    assert _scores(runs[0]["cells"]) == _scores(runs[1]["cells"])
    assert runs[0]["ties"] == runs[1]["ties"]
    assert runs[0]["cells"]["ppl@256|tova|0.5"]["ci"]["perplexity"]["low"] < runs[0]["cells"]["ppl@256|tova|0.5"][
        "perplexity"]


def test_cells_of_older_versions_print_without_an_interval(tiny_dir, tmp_path, capsys):
    """A results.json written before per-example outcomes were stored: --resume keeps its cells, and the tables,
    the tie table and the plot print them without an interval instead of failing."""
    out = tmp_path / "run"
    argv = ["--model", str(tiny_dir), "--strategies", "full,sink_window,snapkv", "--tasks", "piqa,needle@256",
            "--budgets", "0.5", "--limit", "3", "--repeats", "1", "--out", str(out), "--no-progress"]
    assert _run_cli(argv, capsys)[0] == 0
    results = json.loads((out / "results.json").read_text())
    for cell in results["cells"].values():
        for key in PER_EXAMPLE + ("ci", "vs_full"):
            cell.pop(key, None)
    del results["ties"]
    (out / "results.json").write_text(json.dumps(results))
    code, captured = _run_cli(argv + ["--resume"], capsys)
    assert code == 0, captured.err
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert all("ci" not in c and "vs_full" not in c for c in cells.values())
    row = next(line for line in captured.out.splitlines() if line.startswith("| piqa | snapkv | 0.5 |"))
    assert "[" not in row and "| - | 3 |" in row  # no interval, no difference to full
    assert "not compared (no per-example data, or too few examples): snapkv" in captured.out or \
        "not compared (no per-example data, or too few examples): sink_window" in captured.out


def test_resume_merges_the_rank_files_of_a_stopped_multi_process_run(tiny_dir, tmp_path, capsys):
    """A torchrun run killed before its merge leaves results.rank<R>.json files: --resume (any number of processes)
    keeps their cells instead of running them again, and removes the files once results.json holds them."""
    out = tmp_path / "run"
    base = ["--model", str(tiny_dir), "--strategies", "sink_window", "--tasks", "needle@256", "--limit", "2",
            "--repeats", "1", "--out", str(out), "--no-progress", "--no-plots"]
    assert _run_cli(base + ["--budgets", "0.5"], capsys)[0] == 0
    first = json.loads((out / "results.json").read_text())
    (out / "results.json").unlink()
    (out / "results.rank1.json").write_text(json.dumps({"rank": 1, "world_size": 2, "cells": first["cells"]}))
    assert _run_cli(base + ["--budgets", "0.5,0.25", "--resume"], capsys)[0] == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert list(cells) == ["needle@256|sink_window|0.5", "needle@256|sink_window|0.25"]
    assert cells["needle@256|sink_window|0.5"]["started_at"] == first["cells"]["needle@256|sink_window|0.5"][
        "started_at"]  # not run again
    assert not list(out.glob("results.rank*.json"))


def test_perplexity_windows_do_not_overlap(tiny_dir):
    """Regression: windows were drawn at random starts and overlapped, so the bootstrap over windows (which takes
    them as independent examples) was too narrow. They are now disjoint slots of the essays."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    length, samples = 256, 24
    prepared = tasks.TASKS["ppl"].prepare(tokenizer, limit=samples, seed=0, length=length, options={})
    ids = tasks._essay_ids(tokenizer, length * (samples + 1))
    starts = []
    for segment in prepared["segments"]:
        window = segment[0].tolist()
        starts.append(next(s for s in range(len(ids) - length + 1) if ids[s:s + length] == window))
    starts.sort()
    assert len(starts) == samples
    assert all(b - a >= length for a, b in zip(starts, starts[1:])), starts


def test_paper_preset_plan_takes_every_registered_strategy(monkeypatch, capsys):
    """The paper preset's grid comes from the registry (a strategy registered later joins it), meets the sample size
    of issue 19 (>= 100 examples per accuracy cell: needles at 2K and 4K in both query modes, PIQA, BoolQ) and shares
    prefills unless --no-share-prefill says otherwise."""
    from kvcompress import registry
    from kvcompress.strategies import SinkWindowCache

    class PlantedCache(SinkWindowCache):
        pass

    monkeypatch.setitem(registry._STRATEGIES, "zz_planted", PlantedCache)
    assert cli.main(["--preset", "paper", "--plan"]) == 0
    printed = capsys.readouterr().out
    assert "zz_planted" in printed.splitlines()[0]
    assert "--share-prefill" in printed
    rows = [line.split(" | ") for line in printed.splitlines() if line.startswith("| ") and "@" in line
            or line.startswith("| piqa") or line.startswith("| boolq")]
    sizes = {row[0].lstrip("| "): int(row[2].rstrip(" |")) for row in rows}
    for label, n in sizes.items():
        if not label.startswith("ppl"):
            assert n >= 100, label
    assert {"needle@2048", "needle@4096", "needle@2048:before", "needle@4096:before", "piqa", "boolq"} <= set(sizes)
    assert cli.main(["--preset", "paper", "--plan", "--no-share-prefill"]) == 0
    assert "--share-prefill" not in capsys.readouterr().out
    assert cli.main(["--preset", "quick", "--plan"]) == 0
    assert "--share-prefill" not in capsys.readouterr().out


def _bench_command(tiny_dir, out, extra=()):
    return ["-m", "kvcompress.bench", "--model", str(tiny_dir), "--strategies", "full,sink_window,snapkv,tova",
            "--tasks", "piqa,needle@256,ppl@256,ruler_niah_single_number@512,ruler_vt@512", "--limit", "3",
            "--repeats", "1", "--threads", "1", "--out", str(out), "--no-progress", "--no-plots", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}


@pytest.mark.slow  # four bench processes and a torchrun launcher: ~1-2 min on 2 shared cores
def test_torchrun_two_processes_give_the_scores_of_one(tiny_dir, tmp_path):
    """The grid run by torchrun with 2 CPU processes (gloo, cells dealt by rank, merged by rank 0) equals the same
    grid run in one process, cell by cell except timings; a torchrun --resume that adds a budget runs only the new
    cells."""
    one = tmp_path / "one"
    single = subprocess.run([sys.executable, *_bench_command(tiny_dir, one, ["--budgets", "0.5,0.25"])],
                            capture_output=True, text=True, timeout=900, env=_env())
    assert single.returncode == 0, single.stderr[-3000:]
    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    first = subprocess.run(torchrun + _bench_command(tiny_dir, two, ["--budgets", "0.5"]),
                           capture_output=True, text=True, timeout=900, env=_env())
    assert first.returncode == 0, first.stderr[-3000:]
    before = json.loads((two / "results.json").read_text())
    assert before["environment"]["world_size"] == 2 and before["environment"]["distributed_backend"] == "gloo"
    assert {cell["rank"] for cell in before["cells"].values()} == {0, 1}  # both processes ran cells
    assert first.stdout.count("| piqa | full | - |") == 1  # rank 0 reports, rank 1 does not
    resumed = subprocess.run(torchrun + _bench_command(tiny_dir, two, ["--budgets", "0.5,0.25", "--resume"]),
                             capture_output=True, text=True, timeout=900, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    merged = json.loads((two / "results.json").read_text())
    reference = json.loads((one / "results.json").read_text())
    assert list(merged["cells"]) == list(reference["cells"])
    assert _scores(merged["cells"]) == _scores(reference["cells"])
    assert merged["ties"] == reference["ties"]
    for key, cell in before["cells"].items():  # finished before the resume: kept, not run again
        assert merged["cells"][key]["started_at"] == cell["started_at"]
    assert not list(two.glob("results.rank*.json"))


def test_round_robin_shards_cover_the_grid_once():
    """The cells each rank runs (`[rank::world]` of the cells to do) partition the grid, for any world size."""
    cells = runner.grid([("ppl@64", None, 64), ("needle@64", None, 64)], ["full", "sink_window", "snapkv"],
                        [runner.parse_budget("0.1"), runner.parse_budget("0.5")])
    keys = [c.key for c in cells]
    for world in (1, 2, 3, 7):
        shards = [keys[rank::world] for rank in range(world)]
        assert sorted(k for shard in shards for k in shard) == sorted(keys)


def test_ties_mark_strategies_whose_interval_to_the_best_contains_zero():
    def cell(strategy, outcomes):
        return {"status": "ok", "task": "piqa", "strategy": strategy, "budget": "0.1", "n_examples": len(outcomes),
                "accuracy": outcomes.count("1") / len(outcomes), "example_correct": outcomes}

    best = "1" * 80 + "0" * 20
    close = "1" * 78 + "0" * 22  # 2 discordant pairs: not distinguishable
    far = "1" * 50 + "0" * 50  # 30 discordant pairs: below
    results = {"cells": {s: cell(s, o) for s, o in [("a_best", best), ("b_close", close), ("c_far", far)]}}
    [group] = leaderboard.ties(copy.deepcopy(results))
    assert group["best"] == "a_best"
    assert [v["strategy"] for v in group["tied"]] == ["b_close"]
    assert [v["strategy"] for v in group["below"]] == ["c_far"]
    assert group["below"][0]["difference"]["high"] < 0 < group["tied"][0]["difference"]["high"]
    table = leaderboard.ties_table(results)
    assert "| piqa | 0.1 | a_best 0.800 | b_close -0.020 [" in table and leaderboard.TIES_NOTE in table


def test_ties_leave_one_window_perplexities_unranked_and_say_why():
    """The quick preset's ppl@1024 has one window per cell: no bootstrap interval, so no verdict (not "tied")."""
    def cell(strategy, nll):
        return {"status": "ok", "task": "ppl@1024", "strategy": strategy, "budget": "0.1", "n_examples": 1,
                "perplexity": math.exp(nll / 100), "window_nll": [nll], "window_tokens": [100]}

    results = {"cells": {s: cell(s, nll) for s, nll in [("kvzip", 300.0), ("snapkv", 340.0)]}}
    [group] = leaderboard.ties(copy.deepcopy(results))
    assert group["best"] == "kvzip" and group["tied"] == group["below"] == []
    assert [v["strategy"] for v in group["not_compared"]] == ["snapkv"]
    assert "not compared (no per-example data, or too few examples): snapkv" in leaderboard.ties_table(results)


def test_rows_on_another_model_are_compared_with_that_models_full_cache():
    """`anchor:model=X` is compared with `full:model=X` on the same examples, never with the bench model's `full`."""
    def cell(strategy, outcomes, model="base"):
        return {"task": "piqa", "strategy": strategy, "budget": "-", "status": "ok", "model": model,
                "metric": "accuracy", "accuracy": sum(outcomes) / len(outcomes), "n_examples": len(outcomes),
                "example_correct": outcomes}

    trained = "model=smollm2-135m-anchor-ep"
    results = {"cells": {
        "piqa|full|-": cell("full", [1, 1, 1, 1, 1, 1]),
        "piqa|anchor|-": cell("anchor", [1, 1, 1, 0, 0, 0]),
        f"piqa|full:{trained}|-": cell(f"full:{trained}", [1, 1, 0, 0, 0, 0], "smollm2-135m-anchor-ep"),
        f"piqa|anchor:{trained}|-": cell(f"anchor:{trained}", [1, 1, 0, 0, 0, 0], "smollm2-135m-anchor-ep"),
        "piqa|anchor:model=other|-": cell("anchor:model=other", [1, 0, 0, 0, 0, 0], "other"),
    }}
    cells = stats.annotate(results)["cells"]
    assert cells[f"piqa|anchor:{trained}|-"]["vs_full"]["accuracy"]["difference"] == 0.0
    assert cells["piqa|anchor|-"]["vs_full"]["accuracy"]["difference"] == -0.5
    assert "vs_full" not in cells["piqa|anchor:model=other|-"]  # no full cache on that model in the run


def test_two_runs_sharing_one_out_folder_keep_each_others_cells(tmp_path):
    """Two bench processes given the same --out (each with --resume): a save never drops the cells the other wrote
    since this one started; this run's own cells win for the cells it ran."""
    path = tmp_path / runner.RESULTS
    mine_at_start = {"a|full|-": {"status": "ok", "accuracy": 1.0}}
    results = {"environment": {}, "config": {}, "cells": dict(mine_at_start)}
    # meanwhile another process wrote its own cell and a newer copy of "a"
    runner.write_json(path, {"cells": {"a|full|-": {"status": "ok", "accuracy": 0.5},
                                       "b|tova|0.1": {"status": "ok", "accuracy": 0.25}}})
    done = {"c|snapkv|0.1": {"status": "ok", "accuracy": 0.75}}
    results["cells"].update(done)
    runner.save_results(path, results, done, at_start={})
    cells = json.loads(path.read_text())["cells"]
    assert list(cells) == ["a|full|-", "c|snapkv|0.1", "b|tova|0.1"]
    assert cells["a|full|-"]["accuracy"] == 0.5  # the other process's newer copy, not this run's stale one
    assert cells["b|tova|0.1"]["accuracy"] == 0.25 and cells["c|snapkv|0.1"]["accuracy"] == 0.75
    # a run without --resume starts a fresh file: what the file held when it started is not carried over
    at_start = json.loads(path.read_text())["cells"]
    fresh = {"d|full|-": {"status": "ok", "accuracy": 1.0}}
    runner.save_results(path, {"environment": {}, "config": {}, "cells": dict(fresh)}, fresh, at_start)
    assert list(json.loads(path.read_text())["cells"]) == ["d|full|-"]
