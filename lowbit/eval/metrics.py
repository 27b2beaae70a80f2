"""Perplexity and KL divergence on fixed token windows.

Windows are `ctx` tokens long and start every `stride` tokens (default: stride = ctx, disjoint
windows). A window scores only the tokens not already scored by the previous window, each predicted
from all the tokens before it in the window (the transformers perplexity recipe). KL divergence
KL(P_source || P_quantized) of the next-token distributions is averaged over the same scored tokens.

Both models run on the native engine where it supports them (runtime/engine.py), on its exact path:
fp32 activations and an fp32 KV cache; the engine returns every position's final-normed hidden state
and the model's own output head (as stored: float, or its QuantLinear) turns them into logits, so the
scores are the model's to float rounding, at the engine's prefill speed instead of transformers'.
Anything else runs through the model's own forward (transformers). The source's states are cached
between evaluations (SourceScores): scoring variants of one source against it costs one model, not two.
"""

import hashlib
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import LowbitError
from ..runtime.engine import load_decoder
from ..settings import cache_root

CACHE_VERSION = 1  # of SourceScores' cache files: bump when what they hold changes


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


def _decoder(model, ctx: int, engine: bool):
    """The native engine on its exact path (fp32 activations and KV cache) for `model`, or None."""
    if not engine or hasattr(model, "prefetch"):
        return None
    try:
        return load_decoder(model, max_context=ctx, kv_dtype=torch.float32)
    except (AttributeError, LowbitError):
        return None


@torch.inference_mode()
def _head_logprobs(model, states: torch.Tensor) -> torch.Tensor:
    """Log-probabilities from final-normed hidden states through the model's own output head."""
    logits = model.get_output_embeddings()(states).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.log_softmax(logits, dim=-1)


def scorer(model, ctx: int, engine: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """window ids [n] -> log-probabilities [n - 1, vocab] of each next token: on the native engine's
    exact path when it runs `model` (and `engine`), else through the model's own forward."""
    decoder = _decoder(model, ctx, engine)
    if decoder is None:
        return lambda ids: _logprobs(model, ids)

    @torch.inference_mode()
    def run(ids: torch.Tensor) -> torch.Tensor:
        decoder.truncate(0)
        return _head_logprobs(model, decoder.states(ids[:-1]))
    return run


class SourceScores:
    """The reference's log-probabilities of each window's scored positions, with a cache. The states
    the reference computes (on the engine: the scored positions' final-normed hidden states; a source
    streamed block by block: every position's last-block output) are kept in a file named by a hash of
    the source's fingerprint (models.fingerprint: its files' paths, sizes and times), the token ids and
    the windows, so the next evaluation against the same source and text runs only the source's output
    head, not its decoder (half of an evaluation's work; all of a streamed source's reading). A missing,
    foreign or damaged file is computed again; a failed write costs only the cache (a warning)."""

    def __init__(self, source, ctx: int, engine: bool, ids: torch.Tensor, spans, key: str | None):
        self.source, self.decoder, self.path, self.states, self.kept, self.offset = source, None, None, None, [], 0
        streamed = hasattr(source, "prefetch")
        windows = [ids[begin:end] for begin, end, _ in spans]
        if key is not None and (engine or streamed):
            digest = hashlib.sha256(f"{CACHE_VERSION}|{key}|{ctx}|{spans}|{streamed}|".encode() + ids.numpy().tobytes())
            self.path = cache_root() / "eval" / f"{digest.hexdigest()[:32]}.safetensors"
            total = sum(len(w) for w in windows) if streamed else sum(end - begin - first for begin, end, first in spans)
            self.states = self._read(total, source.model if streamed else source)
        if streamed:  # all windows run block by block first (models/lazy.py), or come from the cache
            if self.states is None:
                source.prefetch(windows)
                self.kept = [source.finals[w.numpy().tobytes()].reshape(len(w), -1) for w in windows]
                self.save()
            else:
                source.finals.update({w.numpy().tobytes(): h.unsqueeze(0) for w, h in
                                      zip(windows, self.states.split([len(w) for w in windows]))})
        elif self.states is None:
            self.decoder = _decoder(source, ctx, engine)

    def _read(self, total: int, model) -> torch.Tensor | None:
        try:
            states = load_file(self.path).get("states")
        except Exception:  # missing or damaged: computed again (safetensors never unpickles)
            return None
        hidden = model.get_output_embeddings().in_features
        ok = states is not None and states.dtype == torch.float32 and tuple(states.shape) == (total, hidden)
        return states if ok else None

    @torch.inference_mode()
    def __call__(self, window: torch.Tensor, first: int) -> torch.Tensor:
        """Log-probabilities [len(window) − first, vocab] of the window's scored positions."""
        if self.decoder is None and (self.states is None or hasattr(self.source, "prefetch")):
            return _logprobs(self.source, window)[first - 1:]
        if self.states is not None:
            n = len(window) - first
            states, self.offset = self.states[self.offset:self.offset + n], self.offset + n
            return _head_logprobs(self.source, states)
        self.decoder.truncate(0)
        states = self.decoder.states(window[:-1])[first - 1:]
        if self.path is not None:
            self.kept.append(states.clone())
        return _head_logprobs(self.source, states)

    def save(self) -> None:
        """Write the kept states (once: after the last window, or a streamed source's prefetch), atomically."""
        if self.path is None or self.states is not None or not self.kept:
            return
        tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"states": torch.cat(self.kept).float().contiguous()}, str(tmp))
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            warnings.warn(f"lowbit: could not cache the source's states in {self.path.parent}: {e}", stacklevel=2)
        self.kept = []


def evaluate(model, tokenizer, text: str, ctx: int = 512, stride: int | None = None,
             max_windows: int | None = None, source=None, progress: bool = True,
             engine: bool = True, source_key: str | None = None) -> EvalResult:
    """Perplexity of `model` on `text`; with `source` (the unquantized model) also KLD and its ppl.
    `engine`: score on the native engine where it runs the model (else transformers). `source_key`:
    what identifies the source's weights (models.fingerprint), to cache its states (SourceScores)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    spans = windows(len(ids), ctx, stride or ctx, max_windows)
    if not spans:
        raise LowbitError(f"evaluation text is too short: {len(ids)} tokens")
    score = scorer(model, ctx, engine)
    score_source = None if source is None else SourceScores(source, ctx, engine, ids, spans, source_key)
    nll = src_nll = kld = 0.0
    tokens = 0
    for begin, end, first in tqdm(spans, desc="evaluating", unit="window", disable=not progress):
        window = ids[begin:end]
        target = window[first:]
        lp = score(window)[first - 1:]
        nll -= lp.gather(1, target[:, None]).sum().item()
        if source is not None:
            slp = score_source(window, first)
            src_nll -= slp.gather(1, target[:, None]).sum().item()
            kld += (slp.exp() * (slp - lp)).sum().item()
        tokens += len(target)
    result = EvalResult(_perplexity(nll / tokens, "the model"), tokens, len(spans), ctx)
    if source is not None:
        score_source.save()
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
