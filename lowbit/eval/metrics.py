"""Perplexity and KL divergence on fixed token windows.

Windows are `ctx` tokens long and start every `stride` tokens (default: stride = ctx, disjoint
windows). A window scores only the tokens not already scored by the previous window, each predicted
from all the tokens before it in the window (the transformers perplexity recipe). KL divergence
KL(P_source || P_quantized) of the next-token distributions is averaged over the same scored tokens.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import LowbitError


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


def evaluate(model, tokenizer, text: str, ctx: int = 512, stride: int | None = None,
             max_windows: int | None = None, source=None, progress: bool = True) -> EvalResult:
    """Perplexity of `model` on `text`; with `source` (the unquantized model) also KLD and its ppl."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    spans = windows(len(ids), ctx, stride or ctx, max_windows)
    if not spans:
        raise LowbitError(f"evaluation text is too short: {len(ids)} tokens")
    if hasattr(source, "prefetch"):  # a streamed source runs all windows block by block first
        source.prefetch([ids[begin:end] for begin, end, _ in spans])
    nll = src_nll = kld = 0.0
    tokens = 0
    for begin, end, first in tqdm(spans, desc="evaluating", unit="window", disable=not progress):
        window = ids[begin:end]
        target = window[first:]
        lp = _logprobs(model, window)[first - 1:]
        nll -= lp.gather(1, target[:, None]).sum().item()
        if source is not None:
            slp = _logprobs(source, window)[first - 1:]
            src_nll -= slp.gather(1, target[:, None]).sum().item()
            kld += (slp.exp() * (slp - lp)).sum().item()
        tokens += len(target)
    result = EvalResult(math.exp(nll / tokens), tokens, len(spans), ctx)
    if source is not None:
        result.kld, result.source_ppl = kld / tokens, math.exp(src_nll / tokens)
    return result
