"""Bench rows on another model (`strategy:model=ALIAS`, e.g. the anchor-trained aliases beside the untrained
`anchor` row) and perplexity that skips the anchors an AC tokenizer inserts."""

import json

import torch
from test_bench import _run_cli, tiny_dir  # noqa: F401  (fixture: a saved tiny random Llama with a BPE tokenizer)
from test_train import _args, _tiny_checkpoint

from kvcompress import FullCache, train
from kvcompress.bench import metrics
from kvcompress.models import load_model


def test_a_row_can_run_on_another_model(tiny_dir, tmp_path, capsys):
    """`anchor:model=PATH` runs its cells on that model (here an AC-trained checkpoint of another tiny model) while
    the other rows run on --model; each cell records its model."""
    model_dir, text = _tiny_checkpoint(tmp_path)
    train.run(_args(model_dir, text, tmp_path / "ac", 1, "--mode", "ac"))
    code, _ = _run_cli(["--model", str(tiny_dir), "--strategies", f"full,anchor:model={tmp_path / 'ac'}",
                        "--tasks", "ppl@64", "--limit", "1", "--out", str(tmp_path / "out"), "--no-plots",
                        "--no-progress"], capsys)
    assert code == 0
    cells = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    assert cells["ppl@64|full|-"]["model"] == str(tiny_dir)
    anchored = cells[f"ppl@64|anchor:model={tmp_path / 'ac'}|-"]
    assert anchored["status"] == "ok" and anchored["model"] == str(tmp_path / "ac")


def test_streaming_nll_skips_the_given_tokens(tmp_path):
    """Skipped ids are fed (the cache and the later predictions see them) but not scored: the total equals the
    unskipped total minus exactly their NLL."""
    model_dir, _ = _tiny_checkpoint(tmp_path)
    model, _ = load_model(str(model_dir))
    ids = torch.tensor([[5, 9, 7, 9, 11, 9, 4, 9, 6, 5, 9]])
    full_total, full_count = metrics.streaming_nll(model, FullCache(model), ids, 4)
    skipped_total, skipped_count = metrics.streaming_nll(model, FullCache(model), ids, 4, skip=[9])
    assert full_count == 10 and skipped_count == 10 - 5  # five 9s, none at position 0
    with torch.no_grad():
        logprobs = model(ids).logits[0].log_softmax(-1)
    nll_of_nines = -sum(logprobs[i - 1, 9].item() for i in range(1, 11) if ids[0, i] == 9)
    assert abs((full_total - skipped_total) - nll_of_nines) < 1e-3
