"""The anchor-training command end to end on a tiny random model: loss falls on a repeated batch, checkpoints
resume (step counter and optimizer state), the checkpoint reloads and generates with AnchorCache (EP and AC)."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from kvcompress import train
from kvcompress.anchor_tokens import anchor_token_id
from kvcompress.models import load_model
from kvcompress.strategies import AnchorCache
from kvcompress.testing import tiny_llama

TEXT = "The cat sat. It was warm! Was it? Yes."  # 38 characters: one block of 32 tokens, repeated every step


def _tiny_checkpoint(tmp_path):
    chars = ["<pad>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    model = tiny_llama(seed=0, vocab_size=len(tokenizer))
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    return path, text


def _args(model, text, out, steps, *extra):
    return ["--model", str(model), "--text", str(text), "--output", str(out), "--steps", str(steps), "--seq-len",
            "32", "--lr", "3e-3", "--warmup", "1", "--save-every", "2", "--device", "cpu", "--no-progress", *extra]


def _generate(path, **cache_options):
    model, tokenizer = load_model(str(path))
    ids = torch.tensor([tokenizer.encode("It sat. The cat")])
    cache = AnchorCache(model, tokenizer, **cache_options)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False, pad_token_id=0)
    return out, cache, ids


def test_training_lowers_loss_resumes_and_checkpoint_generates(tmp_path, capsys):
    model_dir, text = _tiny_checkpoint(tmp_path)
    out = tmp_path / "run"
    state = train.run(_args(model_dir, text, out, 6))
    losses = state["losses"]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1, losses
    assert state["tokens"] == 6 * 4 * 32  # CPU defaults: micro-batch 1, 4 accumulation steps
    saved = json.loads((out / train.STATE_FILE).read_text())
    assert saved["step"] == 6 and (out / train.OPTIMIZER_FILE).is_file()

    resumed = train.run(_args(model_dir, text, out, 8, "--resume"))
    assert resumed["step"] == 8 and len(resumed["losses"]) == 8 and resumed["losses"][:6] == losses
    assert resumed["losses"][-1] < losses[0]
    assert '"step": 8' in capsys.readouterr().out

    sequences, cache, ids = _generate(out)
    assert sequences.shape[1] == ids.shape[1] + 5
    assert cache.kept_counts()[0, 0] < cache.get_seq_length()  # "It sat." was compressed to its anchor


def test_ac_mode_adds_the_anchor_token_and_reloads(tmp_path):
    model_dir, text = _tiny_checkpoint(tmp_path)
    out = tmp_path / "ac"
    state = train.run(_args(model_dir, text, out, 2, "--mode", "ac"))
    assert all(torch.isfinite(torch.tensor(state["losses"])))
    model, tokenizer = load_model(str(out))
    token_id = anchor_token_id(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == token_id + 1
    sequences, cache, _ = _generate(out, mode="ac")
    assert cache.anchor_ids.tolist() == [token_id]


def test_bad_options(tmp_path):
    model_dir, text = _tiny_checkpoint(tmp_path)
    with pytest.raises(SystemExit):
        train.run(_args(model_dir, text, tmp_path / "x", 1, "--mask", "flex"))  # no FlexAttention backward on CPU
    with pytest.raises(FileNotFoundError):
        train.run(_args(model_dir, tmp_path / "missing.txt", tmp_path / "x", 1))
    with pytest.raises(ValueError, match="fewer than one block"):
        train.run(_args(model_dir, text, tmp_path / "x", 1, "--seq-len", "4096"))


def test_lora_ac_run_saves_an_adapter_that_loads_merged_with_its_anchor_config(tmp_path):
    """LoRA (rank 4) + the trainable <AC> row: the checkpoint is an adapter (no full weights), resumes, and
    `load_model(folder)` gives the base with the adapter merged, carrying mode and anchor ids in its config; its
    logits equal the trained peft model's."""
    from kvcompress.anchor_model import anchor_config

    model_dir, text = _tiny_checkpoint(tmp_path)
    out = tmp_path / "lora"
    state = train.run(_args(model_dir, text, out, 4, "--mode", "ac", "--lora-rank", "4"))
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert state["timing"]["cpu_seconds"] > 0
    resumed = train.run(_args(model_dir, text, out, 6, "--mode", "ac", "--lora-rank", "4", "--resume"))
    assert resumed["losses"][:4] == state["losses"] and len(resumed["losses"]) == 6
    model, tokenizer = load_model(str(out))
    config = anchor_config(model)
    assert config["mode"] == "ac" and config["anchor_ids"] == [anchor_token_id(tokenizer)] and config["tokens"] == 768
    base, _ = load_model(str(model_dir))
    tokenizer.insert_anchors = False  # the base model does not know <AC>
    ids = torch.tensor([tokenizer.encode("It sat. The cat")])
    assert not torch.allclose(model(ids).logits[..., : base.config.vocab_size], base(ids).logits)  # trained
    period = tokenizer.encode(".", add_special_tokens=False)[0]
    embedding = model.get_input_embeddings().weight
    assert not torch.equal(embedding[config["anchor_ids"][0]], embedding[period])  # the <AC> row was trained
    from safetensors.torch import load_file

    saved = load_file(out / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) < 0.5 * sum(p.numel() for p in base.parameters())  # no full embedding


def test_full_run_stores_the_anchor_config_in_the_model_config(tmp_path):
    from kvcompress.anchor_model import anchor_config

    model_dir, text = _tiny_checkpoint(tmp_path)
    train.run(_args(model_dir, text, tmp_path / "ep", 1))
    model, tokenizer = load_model(str(tmp_path / "ep"))
    config = anchor_config(model)
    assert config["mode"] == "ep" and config["tokens"] == 128
    assert config["anchor_ids"] == train.sentence_end_ids(tokenizer)


def test_until_stops_early_on_the_full_schedule_and_resumes_to_the_same_run(tmp_path):
    """--until 3 of --steps 6 stops after 3 steps with the 6-step learning-rate schedule; resuming finishes exactly
    the run that never stopped."""
    model_dir, text = _tiny_checkpoint(tmp_path)
    partial = train.run(_args(model_dir, text, tmp_path / "a", 6, "--until", "3"))
    assert partial["step"] == 3
    resumed = train.run(_args(model_dir, text, tmp_path / "a", 6, "--resume"))
    straight = train.run(_args(model_dir, text, tmp_path / "b", 6))
    assert resumed["losses"] == straight["losses"] and resumed["step"] == 6
