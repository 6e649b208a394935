"""lm-evaluation-harness adapter: run any lm-eval task through any kvcompress strategy.

    python -m kvcompress.lmeval --model kvcompress \\
        --model_args pretrained=smollm2-135m,strategy=sink_window,budget=0.25 --tasks hellaswag --device cpu

(`kvcompress-lmeval` is the same command.) lm-eval 0.4.13 finds models only in its own registry (no plugin entry
point), so plain `lm-eval --model kvcompress` works only after `import kvcompress.lmeval`; this module's
command registers the model and then runs lm-eval's own CLI with the given arguments, unchanged. From Python:
`import kvcompress.lmeval` then `lm_eval.simple_evaluate(model="kvcompress", model_args=...)`. Importing this
module registers the name "kvcompress" in lm-eval's model registry and does nothing else.

Model arguments (`--model_args`, besides every `hf` argument such as `batch_size`, `max_length`):
    pretrained: a kvcompress model alias (`smollm2-135m`, offline), a local directory or `.gguf` file, or a hub
        name, loaded by `kvcompress.models.load_model`.
    strategy: a registered strategy name (`kvcompress.registry.available()`), default "full".
    budget: as in the bench (`kvcompress.bench.runner.parse_budget`): a kept fraction in (0, 1] like 0.25 (of the
        compressible context, rounded up) or a token count like 256; omitted: the strategy's own size. The cache
        is `registry.get(strategy).for_budget(model, tokenizer, tokens)`, a fresh one per request.
    chunk: optional; feed the scored tokens in chunks of this many tokens, compressing after each chunk.
    dtype: "float32" (default), "bfloat16", "float16".

What a budget means, per request type (every request gets a fresh cache):
    loglikelihood (multiple choice, `acc`): lm-eval scores `continuation` given `context`. The context minus its
        last token (the compressible context, n tokens) is prefilled in ONE forward; the cache compresses after
        that forward to the budget (a fraction resolves against n). Then the last context token and the
        continuation (minus its last token) are fed in one forward (or `chunk`-sized forwards) through the
        compressed cache, and every continuation log-probability comes from that second forward: each scored
        token attends only to the kept context KV plus the last context token and the continuation before it.
        (Keeping the last context token out of the prefill is what makes the budget apply to one-token answers
        like " A": its logit would otherwise be computed before any eviction.) With `full` this is the same
        computation as lm-eval's `hf` model in two forwards. Requests sharing context and continuation[:-1]
        share one forward, as lm-eval's logits cache does, only when their split is also the same.
    loglikelihood_rolling (perplexity): lm-eval's windows have a one-token context, so nothing is prefilled and,
        without `chunk`, nothing is evicted before a token is scored: the budget does NOT apply (a warning says
        so). With `chunk=C` the window is fed C tokens at a time with compression after each chunk, as the
        bench's ppl task does, and a fraction resolves against the window length.
    generate_until: the prompt is prefilled (compressed after that forward, a fraction resolving against the
        longest prompt of the batch), then `model.generate` decodes through the cache, which keeps compressing.
"""

from __future__ import annotations

import logging
import sys

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from . import registry
from .bench.runner import Budget, parse_budget
from .cache import cache_arg
from .models import DEFAULT_MODEL, load_model

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _budget(budget) -> Budget:
    """`budget=` as lm-eval parsed it (int, float, str or None) -> a bench `Budget`."""
    if budget is None or (isinstance(budget, str) and budget.strip().lower() in ("", "none", "-")):
        return Budget("-")
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise TypeError(f"budget={budget!r}: give a kept fraction like 0.25 or a token count like 256")
    try:
        return parse_budget(str(budget))
    except ValueError as error:
        raise ValueError(f"budget={budget!r}: {error}") from None


@register_model("kvcompress")
class KVCompressLM(HFLM):
    """lm-eval's `hf` model with every forward run through a fresh kvcompress cache (see the module docstring)."""

    def __init__(self, pretrained: str = DEFAULT_MODEL, strategy: str = "full", budget=None, chunk=None,
                 device: str | None = None, dtype: str = "float32", **kwargs) -> None:
        import kvcompress.strategies  # noqa: F401  (registers the built-in strategies)

        if strategy not in registry.available():
            raise ValueError(f"strategy={strategy!r} is not registered; known: {', '.join(registry.available())}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk={chunk!r}: give a positive number of tokens")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: one of {', '.join(_DTYPES)}")
        if not isinstance(pretrained, str):
            raise TypeError("pretrained= takes a model alias, path or hub name (a string)")
        self.strategy, self.budget, self.chunk = registry.get(strategy), _budget(budget), chunk
        self._prefill_tokens = 0  # set per group of requests by _loglikelihood_tokens
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = load_model(pretrained, device=device, dtype=_DTYPES[dtype])
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", **kwargs)
        self.pretrained_name = pretrained

    def new_cache(self, context_tokens: int):
        """A fresh cache of the strategy with the budget resolved against `context_tokens`."""
        return self.strategy.for_budget(self.model, self.tokenizer, self.budget.resolve(max(context_tokens, 1)))

    # -- loglikelihood ----------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """Groups requests by (context + continuation[:-1], split) and scores each group with HFLM's own code;
        `_model_call` then knows where the compressible context of its rows ends."""
        groups: dict[tuple, list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            row = (list(context) + list(continuation))[-(self.max_length + 1):][:-1]
            groups.setdefault((tuple(row), len(row) - len(continuation)), []).append(i)
        results: list = [None] * len(requests)
        for (_, prefill), members in groups.items():
            self._prefill_tokens = max(prefill, 0)
            try:
                scores = super()._loglikelihood_tokens([requests[i] for i in members], disable_tqdm=True,
                                                       override_bs=override_bs)
            finally:
                self._prefill_tokens = 0
            for i, score in zip(members, scores):
                results[i] = score
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        if self.chunk is None and self.strategy.uses_budget:
            log.warning("kvcompress: loglikelihood_rolling without chunk=: windows are scored in one forward, so "
                        "the budget does not apply (give chunk=N to compress every N tokens)")
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits (B, L, V) of `inps` (B, L): rows of one group are identical (see `_loglikelihood_tokens`), so one
        row is computed: its first `_prefill_tokens` tokens in one forward, then the rest, through one cache."""
        if attn_mask is not None or labels is not None:
            raise ValueError("kvcompress runs causal LMs only (no seq2seq)")
        row = inps[:1]
        prefill = min(self._prefill_tokens, row.shape[1] - 1)
        cache = self.new_cache(prefill if prefill > 0 else row.shape[1])
        step = self.chunk or row.shape[1]
        bounds = ([0, prefill] if prefill > 0 else [0]) + list(range(prefill + step, row.shape[1], step))
        pieces = []
        with torch.no_grad():
            for start, end in zip(bounds, bounds[1:] + [row.shape[1]]):
                pieces.append(self.model(row[:, start:end], **cache_arg(cache), use_cache=True).logits)
        return torch.cat(pieces, dim=1).expand(inps.shape[0], -1, -1)

    # -- generation -------------------------------------------------------------------------------------------

    def _model_generate(self, context, max_length: int, stop, **generation_kwargs):
        mask = generation_kwargs.get("attention_mask")
        prompt = int(mask.sum(dim=1).max()) if mask is not None else context.shape[1]
        generation_kwargs.update(cache_arg(self.new_cache(prompt)))
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


def main(argv: list[str] | None = None) -> int:
    """`python -m kvcompress.lmeval` / `kvcompress-lmeval`: lm-eval's CLI with the "kvcompress" model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
