"""Perplexity and KL divergence on fixed token windows.

Windows are `ctx` tokens long and start every `stride` tokens (default: stride = ctx, disjoint
windows). A window scores only the tokens not already scored by the previous window, each predicted
from all the tokens before it in the window (the transformers perplexity recipe). KL divergence
KL(P_source || P_quantized) of the next-token distributions is averaged over the same scored tokens.

Both models run on the native engine where it supports them (runtime/engine.py), on its exact path:
fp32 activations and an fp32 KV cache; the engine returns every position's final-normed hidden state
and the model's own output head (as stored: float, or its QuantLinear) turns them into logits, so the
scores are the model's to float rounding, at the engine's prefill speed instead of transformers'.
Anything else runs through the model's own forward (transformers).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import LowbitError
from ..runtime.engine import load_decoder


@dataclass
class EvalResult:
    ppl: float
    tokens: int  # tokens scored
    windows: int
    ctx: int
    kld: float | None = None  # mean KL(source || model), nats per token
    source_ppl: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def windows(n_tokens: int, ctx: int, stride: int, max_windows: int | None = None):
    """(begin, end, first scored position within the window) for each window."""
    if ctx < 2:
        raise LowbitError(f"context length must be at least 2, got {ctx}")
    if not 0 < stride <= ctx:
        raise LowbitError(f"stride must be in 1..ctx ({ctx}), got {stride}")
    out, scored_to = [], 1  # a window's first token has no context in it and is never scored
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + ctx, n_tokens)
        if end - begin < 2 or end <= scored_to:
            break
        out.append((begin, end, max(scored_to - begin, 1)))
        scored_to = end
        if end == n_tokens or (max_windows and len(out) == max_windows):
            break
    return out


@torch.inference_mode()
def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids.unsqueeze(0)).logits[0, :-1].float()
    return F.log_softmax(logits, dim=-1)


def scorer(model, ctx: int, engine: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """window ids [n] -> log-probabilities [n - 1, vocab] of each next token: on the native engine's
    exact path when it runs `model` (and `engine`), else through the model's own forward."""
    try:
        decoder = load_decoder(model, max_context=ctx, kv_dtype=torch.float32) if engine else None
    except (AttributeError, LowbitError):
        decoder = None
    if decoder is None:
        return lambda ids: _logprobs(model, ids)
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)

    @torch.inference_mode()
    def run(ids: torch.Tensor) -> torch.Tensor:
        decoder.truncate(0)
        logits = head(decoder.states(ids[:-1])).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return F.log_softmax(logits, dim=-1)
    return run


def evaluate(model, tokenizer, text: str, ctx: int = 512, stride: int | None = None,
             max_windows: int | None = None, source=None, progress: bool = True,
             engine: bool = True) -> EvalResult:
    """Perplexity of `model` on `text`; with `source` (the unquantized model) also KLD and its ppl.
    `engine`: score on the native engine where it runs the model (else transformers)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    spans = windows(len(ids), ctx, stride or ctx, max_windows)
    if not spans:
        raise LowbitError(f"evaluation text is too short: {len(ids)} tokens")
    if hasattr(source, "prefetch"):  # a streamed source runs all windows block by block first
        source.prefetch([ids[begin:end] for begin, end, _ in spans])
    score = scorer(model, ctx, engine)
    score_source = None if source is None else \
        (lambda w: _logprobs(source, w)) if hasattr(source, "prefetch") else scorer(source, ctx, engine)
    nll = src_nll = kld = 0.0
    tokens = 0
    for begin, end, first in tqdm(spans, desc="evaluating", unit="window", disable=not progress):
        window = ids[begin:end]
        target = window[first:]
        lp = score(window)[first - 1:]
        nll -= lp.gather(1, target[:, None]).sum().item()
        if source is not None:
            slp = score_source(window)[first - 1:]
            src_nll -= slp.gather(1, target[:, None]).sum().item()
            kld += (slp.exp() * (slp - lp)).sum().item()
        tokens += len(target)
    result = EvalResult(_perplexity(nll / tokens, "the model"), tokens, len(spans), ctx)
    if source is not None:
        result.kld, result.source_ppl = kld / tokens, _perplexity(src_nll / tokens, "the source model")
        if not math.isfinite(result.kld):
            raise LowbitError(f"the KL divergence came out as {result.kld}: one of the models gives NaN or Inf "
                              "log-probabilities (damaged weights, or activations that overflow their dtype)")
    return result


def _perplexity(mean_nll: float, who: str) -> float:
    """exp(mean NLL); a non-finite or overflowing result is a broken model, never a number to report."""
    if not math.isfinite(mean_nll) or mean_nll > 700:
        raise LowbitError(f"the perplexity of {who} is not finite (mean log-loss {mean_nll}): it gives NaN or "
                          "Inf log-probabilities (damaged weights, or activations that overflow their dtype)")
    return math.exp(mean_nll)
