"""Choosing the next token from logits: penalties, temperature, top-k, top-p, min-p, a seeded generator.

The order is the usual one (HF and llama.cpp agree on it): penalties on the raw logits, then
temperature, then the truncations (top-k, top-p, min-p), then a draw. Temperature 0 is greedy.
A constrained sequence (runtime/constrained.py) passes the tokens its grammar allows: every other
logit is -inf after the penalties, so neither the truncations nor greedy can pick outside the grammar.
Log-probabilities reported to clients are the model's own, log_softmax of the raw logits (before
penalties and temperature), as vLLM reports them: what lm-eval's scoring and a calibration check need.

The draw is by inverse CDF: one uniform u from the seeded generator, the first token whose cumulative
probability (float64, so no token's share is lost to rounding) exceeds u times the total. A token of
probability 0 (cut by a truncation or a grammar) has no interval of its own and is never drawn.
torch.multinomial gives the same distribution at ~1.5 ms per 49k-token vocabulary (one thread); the
cumulative sum of the whole vocabulary in float64 ~0.1 ms; this sums blocks of CDF_BLOCK tokens in
float32 (one pass), finds u's block in their float64 cumulative sums and takes the cumulative sum of
that block only (~40 us; a block's float32 sum is off by ~1e-7 of itself, so u lands in the wrong one
with odds ~1e-7): a server's step samples every sequence it advances on one thread while the engine's
pool waits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LowbitError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off; keeps tokens with p >= min_p * p(most likely)
    repetition_penalty: float = 1.0  # HF's: >1 discourages every token already in the sequence
    presence_penalty: float = 0.0  # OpenAI's, over the generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None

    def check(self) -> "SamplingParams":
        """Raise LowbitError naming the first value out of range."""
        bad = [("temperature", self.temperature < 0 or self.temperature > 100, "between 0 and 100"),
               ("top_k", self.top_k < 0, "0 (off) or a positive count"),
               ("top_p", not 0 < self.top_p <= 1, "in (0, 1]"),
               ("min_p", not 0 <= self.min_p <= 1, "in [0, 1]"),
               ("repetition_penalty", self.repetition_penalty <= 0, "positive (1 = off)"),
               ("presence_penalty", not -2 <= self.presence_penalty <= 2, "between -2 and 2"),
               ("frequency_penalty", not -2 <= self.frequency_penalty <= 2, "between -2 and 2"),
               ("seed", self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
                "an integer in [0, 2^63)")]
        for name, wrong, want in bad:
            if wrong:
                raise LowbitError(f"{name} must be {want}, got {getattr(self, name)}")
        return self


def apply_penalties(logits: torch.Tensor, context: list[int], generated: list[int],
                    p: SamplingParams) -> torch.Tensor:
    """HF's repetition penalty over the whole sequence, OpenAI's presence/frequency over the output."""
    if p.repetition_penalty != 1.0 and context:
        ids = torch.tensor(sorted(set(context)), dtype=torch.long)
        seen = logits[ids]
        logits[ids] = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and generated:
        ids, counts = torch.tensor(generated, dtype=torch.long).unique(return_counts=True)
        logits[ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
    return logits


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if 0 < k < logits.numel():
        logits[logits < torch.topk(logits, k).values[-1]] = -float("inf")
    return logits


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p  # the mass before this token already reaches p
        logits[order[drop]] = -float("inf")
    return logits


def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p > 0.0:
        probs = logits.softmax(-1)
        logits[probs < p * probs.max()] = -float("inf")
    return logits


@dataclass
class TokenLogprob:
    token: int
    logprob: float  # log p(token) under the model
    top: list[tuple[int, float]]  # the most likely tokens at this position, most likely first


def token_logprob(logits: torch.Tensor, token: int, top: int = 0) -> TokenLogprob:
    """`token`'s log-probability under `logits` (raw) and the `top` most likely alternatives."""
    lp = torch.log_softmax(logits.float(), -1)
    best = torch.topk(lp, top) if top > 0 else None
    alts = [] if best is None else [(int(i), float(v)) for v, i in zip(best.values, best.indices)]
    return TokenLogprob(int(token), float(lp[token]), alts)


class Sampler:
    """Turns one step's logits into a token id; seeded, so a seed reproduces a run exactly."""

    def __init__(self, params: SamplingParams):
        self.params = params.check()
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, context: list[int], generated: list[int],
                 allowed: np.ndarray | None = None) -> int:
        """The next token; `allowed` (numpy bool, one per logit): only those tokens may be drawn."""
        p = self.params
        logits = logits.float()
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or allowed is not None:
            logits = apply_penalties(logits.clone(), context, generated, p)  # the caller's row stays as it is
        if allowed is not None:  # in numpy: one pass, no thread hand-off (runtime/constrained.py)
            np.putmask(logits.numpy(), ~allowed, -np.inf)
        if p.temperature == 0:
            return int(logits.argmax())
        logits = min_p(top_p(top_k(logits / p.temperature, p.top_k), p.top_p), p.min_p)
        return draw(logits.softmax(-1), self.generator)


CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF (see the module docstring)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """A token drawn with probability probs[i] (inverse CDF over blocks; see the module docstring)."""
    p = probs.numpy()
    n = len(p)
    padded = probs if n % CDF_BLOCK == 0 else torch.nn.functional.pad(probs, (0, -n % CDF_BLOCK))
    ends = np.cumsum(padded.view(-1, CDF_BLOCK).sum(1).numpy(), dtype=np.float64)
    target = float(torch.rand((), dtype=torch.float64, generator=generator)) * ends[-1]
    b = min(int(np.searchsorted(ends, target, side="right")), len(ends) - 1)
    lo = b * CDF_BLOCK
    within = np.cumsum(p[lo:lo + CDF_BLOCK], dtype=np.float64) + (ends[b - 1] if b else 0.0)
    i = lo + min(int(np.searchsorted(within, target, side="right")), len(within) - 1)
    if p[i] == 0:  # the target rounded onto (or past) the end of the mass: the last token that can be drawn there
        below = np.flatnonzero(p[:i])
        i = int(below[-1]) if len(below) else int(np.flatnonzero(p)[0])
    return i
