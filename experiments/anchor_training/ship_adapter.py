"""Copy a finished LoRA anchor-training run into the package: kvcompress/anchors/<alias>/ gets the adapter
(adapter_config.json, adapter_model.safetensors) and anchor.json (mode, anchor ids, base model, tokens trained), and
the training record (train_state.json: steps, losses, CPU time). The adapter's LoRA weights are stored as they were
trained (fp32).

    python experiments/anchor_training/ship_adapter.py runs/anchor/ac kvcompress/anchors/smollm2-135m-anchor-ac

A run stopped before the end of its learning-rate schedule is refused, unless `--stopped-early "why"` is given: the
record then says `"finished": false`, the step it stopped at and why (docs/anchor.md says which shipped run that is).
"""

import argparse
import json
import pathlib
import shutil
import sys


def main(run: str, target: str, stopped_early: str | None = None) -> None:
    run_dir, target_dir = pathlib.Path(run), pathlib.Path(target)
    state = json.loads((run_dir / "train_state.json").read_text())
    anchor = json.loads((run_dir / "anchor.json").read_text())
    finished = state["step"] >= state["args"]["steps"]
    if not finished and not stopped_early:
        raise SystemExit(f"{run_dir} is at step {state['step']} of {state['args']['steps']}: not finished")
    target_dir.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "anchor.json"):
        shutil.copy2(run_dir / name, target_dir / name)
    record = {k: state[k] for k in ("step", "tokens", "losses", "timing")}
    record["args"] = {k: v for k, v in state["args"].items() if k not in ("output", "resume", "no_progress")}
    record["finished"] = finished
    if not finished:
        record["stopped_early"] = f"at step {state['step']} of {state['args']['steps']}: {stopped_early}"
    (target_dir / "train_state.json").write_text(json.dumps(record, indent=1))
    size = sum(p.stat().st_size for p in target_dir.iterdir()) / 2**20
    print(f"shipped {run_dir} -> {target_dir} ({anchor['mode']}, {state['tokens']} tokens, {size:.1f} MiB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("target")
    parser.add_argument("--stopped-early", default=None, help="ship a run stopped before its last step; say why")
    args = parser.parse_args()
    main(args.run, args.target, args.stopped_early)
