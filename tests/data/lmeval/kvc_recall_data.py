"""Loader of the local lm-eval test tasks (kvc_recall_*.yaml): the JSONL beside this file, no hub access."""

import json
import pathlib

import datasets


def load(**_options) -> datasets.DatasetDict:
    """{"train": 4 few-shot examples, "test": 26} from kvc_recall.jsonl (30 synthetic recall questions)."""
    rows = [json.loads(line) for line in (pathlib.Path(__file__).parent / "kvc_recall.jsonl").open(encoding="utf-8")]
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list([r for r in rows if r["split"] == split]) for split in ("train", "test")
    })
