"""The tables of docs/quantization.md, printed from the results files (so no figure is copied by hand).

    python experiments/quantization/tables.py docs/results/quantization-2026-11-30.json \
        docs/results/quantization-speed-2026-11-30.json docs/results/quantization-hf-2026-11-30.json

Every interval is the bench's (kvcompress.bench.stats): perplexity by a percentile bootstrap over the windows,
paired differences by a paired bootstrap over the same windows, loyalty and accuracy by Wilson, paired
loyalty differences by Newcombe's paired interval.
"""

from __future__ import annotations

import json
import pathlib
import sys

from kvcompress.bench import stats

PPL = "ppl@2048"
# (label, fp32 arm, quantized arm) at the same bytes; cell keys are "task|strategy|budget"
PAIRS_PPL = [
    ("sink_window", "sink_window|80", "sink_window:kv_bits=4:residual=0|0.25"),
    ("snapkv", "snapkv|80", "snapkv:kv_bits=4:residual=0|0.25"),
    ("expected_attention", "expected_attention|80", "expected_attention:kv_bits=4:residual=0|0.25"),
    ("sink_window, demoted to int2", "sink_window|250", "sink_window:evicted=2|0.03"),
]
PAIRS_SST2 = [
    ("sink_window", "sink_window|0.08", "sink_window:kv_bits=4:residual=0|0.25"),
    ("snapkv", "snapkv|0.08", "snapkv:kv_bits=4:residual=0|0.25"),
    ("expected_attention", "expected_attention|0.08", "expected_attention:kv_bits=4:residual=0|0.25"),
    ("sink_window, demoted to int2", "sink_window|0.145", "sink_window:evicted=2|0.03"),
]


def ci(cell: dict, metric: str, spec: str) -> str:
    return stats.with_interval(cell[metric], cell.get("ci", {}).get(metric), spec)


def diff(first: dict, second: dict, metric: str, spec: str) -> str:
    a, b = stats.examples(first, metric), stats.examples(second, metric)
    return stats.difference_text(stats.difference(a, b) if a and b else None, spec)


def table_full(cells: dict) -> str:
    full = cells[f"{PPL}|full|-"]
    fp_kept, fp_held = full["kv_bytes"], full["kv_bytes_allocated"]
    lines = ["| cache | ppl@2048 [95% CI] | vs fp32 [95% CI] | vs fp32 % | kept bytes / fp32 | held bytes / fp32 kept "
             "| held / fp32 held | within 2% at <= 0.16x kept (held) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for key, cell in cells.items():
        task, strategy, _ = key.split("|")
        if task != PPL or not strategy.startswith("full"):
            continue
        change = cell["perplexity"] / full["perplexity"] - 1
        vs = cell.get("vs_full", {}).get("perplexity")
        upper = vs["high"] / full["perplexity"] if vs else float("nan")
        kept, held = cell["kv_bytes"] / fp_kept, cell["kv_bytes_allocated"] / fp_kept
        verdict = "-" if strategy == "full" else (
            f"{'yes' if upper <= 0.02 and kept <= 0.16 else 'no'} ({'yes' if upper <= 0.02 and held <= 0.16 else 'no'})")
        lines.append(f"| {strategy} | {ci(cell, 'perplexity', '.2f')} | "
                     f"{stats.difference_text(vs, '.3f') if vs else '-'} | {100 * change:+.2f}% (upper {100 * upper:+.2f}%) | "
                     f"{kept:.3f} | {held:.3f} | {cell['kv_bytes_allocated'] / fp_held:.3f} | {verdict} |")
    return "\n".join(lines)


def table_pairs(cells: dict, task: str, pairs, metric: str, spec: str) -> str:
    other = "accuracy" if metric == "loyalty" else None
    head = f"| strategy | arm | budget | kept tokens | KV bytes / fp32 full | {metric} [95% CI] |"
    head += " accuracy [95% CI] |" if other else " vs full [95% CI] |"
    head += f" quantized arm - fp32 arm [95% CI] |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, fp_key, q_key in pairs:
        fp, q = cells.get(f"{task}|{fp_key}"), cells.get(f"{task}|{q_key}")
        for arm, key, cell in (("fp32", fp_key, fp), ("quantized", q_key, q)):
            if cell is None:
                lines.append(f"| {label} | {arm} | {key} | missing | | | | |")
                continue
            strategy, budget = key.split("|")
            extra = ci(cell, other, ".3f") if other else stats.difference_text(
                cell.get("vs_full", {}).get(metric), spec)
            paired = diff(q, fp, metric, spec) if arm == "quantized" and fp and q else ""
            lines.append(f"| {label} | {strategy} | {budget} | {cell['kept_fraction']:.3f} | "
                         f"{cell['kv_bytes_fraction']:.3f} | {ci(cell, metric, spec)} | {extra} | {paired} |")
    return "\n".join(lines)


def table_speed(rows: list[dict]) -> str:
    by = {r["cache"]: r for r in rows}
    lines = ["| cache | kept tokens | KV MiB (kept) | step ms (IQR) | floor ms | step / floor | int4 step / fp32 step "
             "| int4 floor / fp32 floor |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = by.get(r["cache"].split(":")[0]) if ":" in r["cache"] else None
        step = f"{r['step_ms'] / base['step_ms']:.2f}x" if base else "-"
        fl = f"{r['floor_ms'] / base['floor_ms']:.3f}x" if base else "-"
        lines.append(f"| {r['cache']} | {r['kept_tokens']} | {r['kv_bytes'] / 2**20:.1f} | {r['step_ms']:.1f} "
                     f"({r['step_ms_iqr']:.1f}) | {r['floor_ms']:.1f} | {r['floor_ratio']:.2f} | {step} | {fl} |")
    return "\n".join(lines)


def table_hf(hf: dict, cells: dict) -> str:
    full = cells[f"{PPL}|full|-"]
    lines = ["| cache | ppl@2048 [95% CI] | vs fp32 FullCache % (per window) | bytes / fp32 |",
             "|---|---:|---:|---:|"]
    for key in ("full:kv_bits=4", "full:kv_bits=2"):
        cell = cells[f"{PPL}|{key}|-"]
        per = [100 * (a / t - b / t) for a, b, t in zip(cell["window_nll"], full["window_nll"], cell["window_tokens"])]
        lines.append(f"| kvcompress {key} (residual 128, group 32) | {ci(cell, 'perplexity', '.2f')} | "
                     f"{100 * (cell['perplexity'] / full['perplexity'] - 1):+.2f} (NLL/token x100: "
                     f"{', '.join(f'{p:+.2f}' for p in per)}) | {cell['kv_bytes_fraction']:.3f} |")
    for row in hf.get("perplexity", []):
        interval = f" [{row['ci'][0]:.2f}, {row['ci'][1]:.2f}]" if row.get("ci") else ""
        ratios = row.get("window_ppl_ratio_vs_fp32_full")
        per = f" ({', '.join(f'{100 * (r - 1):+.2f}' for r in ratios)})" if ratios else ""
        change = f"{100 * (row['ppl_ratio_vs_fp32_full'] - 1):+.2f}" if row.get("ppl_ratio_vs_fp32_full") else "-"
        lines.append(f"| {row['cache']} (residual 128, group 64) | {row['perplexity']:.2f}{interval} | {change}{per} | "
                     f"{row['kv_bytes_fraction']:.3f} |")
    lines += ["", "| cache (4,096-token context) | step ms | step / DynamicCache | KV bytes / fp32 |", "|---|---:|---:|---:|"]
    for row in hf.get("decode", []):
        lines.append(f"| {row['cache']} | {row['step_ms']:.1f} | {row['step_vs_first']:.2f}x | "
                     f"{row['kv_bytes_fraction']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    results = json.loads(pathlib.Path(argv[0]).read_text())
    cells = results["cells"]
    print("## FullCache\n")
    print(table_full(cells))
    print("\n## Same bytes, ppl@2048\n")
    print(table_pairs(cells, PPL, PAIRS_PPL, "perplexity", ".2f"))
    print("\n## Same bytes, SST-2\n")
    print(table_pairs(cells, "sst2", PAIRS_SST2, "loyalty", ".3f"))
    if len(argv) > 1:
        print("\n## Decode step\n")
        print(table_speed(json.loads(pathlib.Path(argv[1]).read_text())["rows"]))
    if len(argv) > 2:
        print("\n## transformers QuantizedCache\n")
        print(table_hf(json.loads(pathlib.Path(argv[2]).read_text()), cells))


if __name__ == "__main__":
    main(sys.argv[1:])
