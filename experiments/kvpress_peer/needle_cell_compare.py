"""kvpress's KVzipPress answers (`needle_kvpress.py` on ids of `needle_compare.py --write-ids`) against the answers a
bench cell recorded on the same needles (results.json keeps every answer, in sample order): needle by needle, and
the needles each side alone answers. Runs in the project's venv; reads three JSON files, runs no model.

    python experiments/kvpress_peer/needle_compare.py --write-ids --length 4096 --limit 100 --needles 0:20 \\
        --ids /tmp/needle4k_ids.json
    /work/kvpress-venv/bin/python experiments/kvpress_peer/needle_kvpress.py --ids /tmp/needle4k_ids.json \\
        --out experiments/kvpress_peer/needle4k_kvpress_0.9.json --ratio 0.9 --configs KVzipPress
    python experiments/kvpress_peer/needle_cell_compare.py /tmp/needle4k_ids.json \\
        experiments/kvpress_peer/needle4k_kvpress_0.9.json docs/results/paper/results.json "needle@4096|kvzip|0.1"
"""

from __future__ import annotations

import argparse
import json
import pathlib

from needle_compare import answer_cell


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ids", type=pathlib.Path, help="needle_compare.py --write-ids output")
    parser.add_argument("kvpress", type=pathlib.Path, help="needle_kvpress.py output")
    parser.add_argument("results", type=pathlib.Path, help="a bench results.json")
    parser.add_argument("cell", help='the cell key, e.g. "needle@4096|kvzip|0.1"')
    parser.add_argument("--config", default="KVzipPress", help="the kvpress configuration to compare")
    args = parser.parse_args(argv)
    ids = json.loads(args.ids.read_text())
    theirs = json.loads(args.kvpress.read_text())["configs"][args.config]["answers"]
    cell = json.loads(args.results.read_text())["cells"][args.cell]
    if cell.get("task", "").split(":")[0] != ids["task"]:
        raise SystemExit(f"cell {args.cell} is task {cell.get('task')}, the ids are {ids['task']}")
    ours = cell["answers"]
    print(f"| index | depth | number | kvcompress `{args.cell}` | kvpress `{args.config}` |")
    print("|---:|---:|---:|---|---|")
    counts = {"both": 0, "ours only": 0, "kvpress only": 0, "neither": 0}
    for sample, their in zip(ids["samples"], theirs):
        our = ours[sample["index"]]
        if our["number"] != sample["number"] or their["number"] != sample["number"]:
            raise SystemExit(f"needle {sample['index']}: numbers differ ({our['number']}, {their['number']}, "
                             f"{sample['number']}): not the same samples")
        key = {(True, True): "both", (True, False): "ours only", (False, True): "kvpress only"}.get(
            (our["correct"], their["correct"]), "neither")
        counts[key] += 1
        print(f"| {sample['index']} | {sample['depth']:.3f} | {sample['number']} | {answer_cell(our)} | "
              f"{answer_cell(their)} |")
    n = sum(counts.values())
    print(f"\n{n} needles: kvcompress {counts['both'] + counts['ours only']}/{n}, kvpress "
          f"{counts['both'] + counts['kvpress only']}/{n}; " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
