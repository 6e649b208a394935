"""The lm-evaluation-harness adapter (kvcompress.lmeval) on a local task (tests/data/lmeval: YAML + JSONL, no hub):
`full` gives lm-eval's own `hf` numbers, a compressing strategy gives a masked full-forward reference's numbers."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from kvcompress.testing import masked_reference_logits, tiny_llama

if importlib.util.find_spec("lm_eval") is None and not os.environ.get("CI"):
    pytest.skip("lm-eval not installed (pip install -e '.[lmeval]')", allow_module_level=True)

DATA = pathlib.Path(__file__).parent / "data" / "lmeval"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random 3-layer Llama with a character tokenizer, saved like a hub model (fast stand-in for SmolLM2)."""
    chars = ["<pad>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    path = tmp_path_factory.mktemp("lmeval") / "tiny"
    tiny_llama(seed=0, vocab_size=len(chars), max_position_embeddings=2048).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _evaluate(model, tasks, limit, model_args=None):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(DATA), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=limit, log_samples=True,
                                   task_manager=manager, device="cpu", batch_size=2)


def _logliks(results, task):
    """[per doc: [log-likelihood of each choice]] in document order."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


@pytest.mark.slow  # ~30-60 s on 2 shared cores, mostly lm-eval's own overhead
def test_full_matches_hf_and_sink_window_matches_masked_reference(tiny_dir):
    from kvcompress.lmeval import KVCompressLM

    tasks = ["kvc_recall_mc", "kvc_recall_gen"]
    hf = _evaluate("hf", tasks, 6, f"pretrained={tiny_dir},dtype=float32")
    full = _evaluate("kvcompress", tasks, 6, f"pretrained={tiny_dir},strategy=full")
    # Tolerance: fp32 sums over <= 10 tokens, SDPA (hf) vs the kvcompress core in two forwards; printed to 4 digits.
    hf_ll, full_ll = _logliks(hf, "kvc_recall_mc"), _logliks(full, "kvc_recall_mc")
    assert torch.allclose(torch.tensor(full_ll), torch.tensor(hf_ll), atol=1e-4, rtol=0), (full_ll, hf_ll)
    for task in tasks:
        for metric, value in hf["results"][task].items():
            if isinstance(value, float):
                assert f"{full['results'][task][metric]:.4f}" == f"{value:.4f}", (task, metric)
    def generations(results):
        return [s["resps"] for s in sorted(results["samples"]["kvc_recall_gen"], key=lambda s: s["doc_id"])]

    assert generations(full) == generations(hf)

    # sink_window, 16 tokens = 4 sinks + 12 recent of the context minus its last token; checked against ONE
    # cache-free forward (transformers' eager attention) whose mask shows each continuation token exactly those.
    lm = KVCompressLM(pretrained=str(tiny_dir), strategy="sink_window", budget=16, device="cpu")
    out = _evaluate(lm, ["kvc_recall_mc"], 6)
    got = _logliks(out, "kvc_recall_mc")
    samples = sorted(out["samples"]["kvc_recall_mc"], key=lambda s: s["doc_id"])
    differs = 0
    for i, (sample, lls) in enumerate(zip(samples, got)):
        for k, ((context_text, continuation_text), ll) in enumerate(zip(sample["arguments"], lls)):
            context, continuation = lm._encode_pair(context_text, continuation_text)
            want = _masked_loglik(lm.model, context, continuation, n_sink=4, window=12)
            assert abs(ll - want) < 1e-4, (ll, want)
            differs += abs(ll - full_ll[i][k]) > 1e-3
    assert differs > 0  # the budget changed the scores


def _masked_loglik(model, context, continuation, n_sink, window):
    row = torch.tensor([context + continuation[:-1]])
    p = len(context) - 1
    n = row.shape[1]
    visible = torch.ones(n, n).tril().bool()
    kept = torch.zeros(n, dtype=torch.bool)
    kept[:n_sink] = True
    kept[max(p - window, 0):p] = True
    kept[p:] = True
    visible[p:] &= kept
    logits = masked_reference_logits(model, row, torch.ones_like(row), visible[None])
    logprobs = logits[0, p:].double().log_softmax(-1)
    return float(logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum())


def test_bad_model_args(tiny_dir):
    from kvcompress.lmeval import KVCompressLM

    with pytest.raises(ValueError, match="strategy='nope' is not registered"):
        KVCompressLM(pretrained=str(tiny_dir), strategy="nope")
    with pytest.raises(ValueError, match="budget=0: .*must be >= 1"):
        KVCompressLM(pretrained=str(tiny_dir), strategy="sink_window", budget=0)
    with pytest.raises(ValueError, match="budget=1.5: .*fraction must be in"):
        KVCompressLM(pretrained=str(tiny_dir), strategy="sink_window", budget=1.5)
    with pytest.raises(ValueError, match="chunk=0"):
        KVCompressLM(pretrained=str(tiny_dir), chunk=0)


@pytest.mark.integration
@pytest.mark.slow
def test_cli_on_smollm2_full_equals_hf(smollm2, tmp_path):
    """`python -m kvcompress.lmeval` (lm-eval's CLI, model registered) on SmolLM2; `lm-eval --model hf` on the
    same weights (kvcompress's local copy) prints the same table values."""
    from kvcompress.models import cache_dir

    def cli(*args):
        env = {**os.environ, **OFFLINE}
        proc = subprocess.run([sys.executable, "-m", "kvcompress.lmeval", "--tasks", "kvc_recall_mc", "--include_path",
                               str(DATA), "--device", "cpu", "--limit", "8", *args], capture_output=True, text=True,
                              env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [line for line in proc.stdout.splitlines() if line.startswith("|") and "acc" in line]

    full = cli("--model", "kvcompress", "--model_args", "pretrained=smollm2-135m,strategy=full")
    hf = cli("--model", "hf", "--model_args", f"pretrained={cache_dir() / 'smollm2-135m'},dtype=float32")
    assert len(full) == 2 and full == hf, (full, hf)
