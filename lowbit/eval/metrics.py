"""Perplexity and KL divergence on fixed token windows, scored two ways (SCORINGS).

lowbit (ours): windows are `ctx` tokens long and start every `stride` tokens (default: stride = ctx,
disjoint windows). A window scores only the tokens not already scored by the previous window, each
predicted from all the tokens before it in the window (the transformers perplexity recipe; with
disjoint windows each window's first token goes unscored: it has no context in its window).
llama.cpp (llama-perplexity's recipe, tools/perplexity/perplexity.cpp): the text tokenized with BOS
in front when the tokenizer adds one; disjoint windows of `ctx` tokens, only whole ones, at least two;
each window's first token replaced by BOS (when the tokenizer adds one) and only its second half scored:
the tokens at positions ctx/2 + 1 .. ctx − 1, each seeing at least ctx/2 tokens of context. Its
perplexity is comparable with llama-perplexity's on the same text and context; ours is lower-context
on average (a window's early tokens see little), so the two differ by design.
KL divergence KL(P_source || P_quantized) = Σ_v p_v (log p_v − log q_v) of the next-token
distributions is averaged over the same scored tokens. Both are made of per-row scores of the two
models' logits (kernels/cpu/logit_scores: each row's log-softmax at its target, and the KL row sum,
read from the logits in one native pass instead of torch's log-softmaxes of vocabulary size).

Both models run on the native engine where it supports them (runtime/engine.py): every position's
final-normed hidden state comes back and the model's own output head (as stored: float, or its
QuantLinear) turns it into logits, at the engine's prefill speed instead of transformers'. A float
head writes into one buffer per model, reused window after window (a fresh 100 MB tensor a window
costs ~25k page faults). The source always runs exactly (fp32 activations, fp32 KV cache). The
quantized model runs exactly too with `exact`; without it, as generate/serve/bench run it: its
UniformQ matmuls (engine and head) on activations rounded to int8 per 32-block (kernels/switches.py),
which changes the numbers a little and runs the GEMMs 3-4x faster. Anything the engine does not run goes through the model's own forward
(transformers), under the same switch. The source's states are cached between evaluations
(SourceScores): scoring variants of one source against it costs one model, not two.
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
from torch import nn
from tqdm.auto import tqdm

from ..errors import LowbitError
from ..kernels.cpu.logit_scores import row_scores
from ..kernels.switches import int8_activations_set
from ..runtime.engine import load_decoder
from ..settings import cache_root

CACHE_VERSION = 1  # of SourceScores' cache files: bump when what they hold changes
SCORINGS = ("lowbit", "llama.cpp")


@dataclass
class EvalResult:
    ppl: float
    tokens: int  # tokens scored
    windows: int
    ctx: int
    kld: float | None = None  # mean KL(source || model), nats per token
    source_ppl: float | None = None
    exact: bool = True  # the model scored on fp32 activations (else int8 ones, as the engine generates)
    scoring: str = "lowbit"  # which windows and positions were scored (SCORINGS)

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


def llamacpp_windows(n_tokens: int, ctx: int, max_windows: int | None = None):
    """llama-perplexity's windows as (begin, end, first scored position): whole disjoint windows of
    `ctx` tokens (it needs at least two), positions ctx/2 + 1 .. ctx − 1 scored."""
    if ctx < 4:
        raise LowbitError(f"context length must be at least 4 for llama.cpp's scoring, got {ctx}")
    if n_tokens < 2 * ctx:
        raise LowbitError(f"llama.cpp's scoring needs at least 2 × ctx = {2 * ctx} tokens of text, got {n_tokens}")
    count = n_tokens // ctx if not max_windows else min(n_tokens // ctx, max_windows)
    return [(i * ctx, (i + 1) * ctx, ctx // 2 + 1) for i in range(count)]


def _bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of a text (llama.cpp's add_bos), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    probe, plain = (tokenizer("a", add_special_tokens=special)["input_ids"] for special in (True, False))
    return bos if len(probe) > len(plain) and probe[0] == bos else None


def scored_windows(tokenizer, text: str, ctx: int, stride: int | None = None, max_windows: int | None = None,
                   scoring: str = "lowbit") -> list[tuple[torch.Tensor, int]]:
    """The windows' token ids and their first scored position, as `scoring` (SCORINGS) cuts the text."""
    if scoring not in SCORINGS:
        raise LowbitError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if scoring == "lowbit":
        ids = torch.tensor(ids, dtype=torch.long)
        spans = windows(len(ids), ctx, stride or ctx, max_windows)
        if not spans:
            raise LowbitError(f"evaluation text is too short: {len(ids)} tokens")
        return [(ids[begin:end], first) for begin, end, first in spans]
    if stride not in (None, ctx):
        raise LowbitError("a stride is lowbit's scoring only: llama.cpp's windows are disjoint")
    bos = _bos(tokenizer)
    ids = torch.tensor(([] if bos is None else [bos]) + ids, dtype=torch.long)
    out = []
    for begin, end, first in llamacpp_windows(len(ids), ctx, max_windows):
        window = ids[begin:end].clone()
        if bos is not None:
            window[0] = bos
        out.append((window, first))
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [n − 1, vocab] of every next token of `ids` through the model's own forward (its callers
    run in inference mode)."""
    return model(ids.unsqueeze(0)).logits[0, :-1].float()


def _decoder(model, ctx: int, engine: bool, exact: bool = True):
    """The native engine for `model` (fp32 KV cache; fp32 activations if `exact`, else int8), or None."""
    if not engine or hasattr(model, "prefetch"):
        return None
    try:
        return load_decoder(model, max_context=ctx, kv_dtype=torch.float32, int8_activations=not exact)
    except (AttributeError, LowbitError):
        return None


class _Head:
    """Logits from final-normed hidden states through the model's own output head (its callers run
    in inference mode). A float nn.Linear head writes into one buffer, grown to the most rows asked
    and reused: the logits returned are valid until the next call."""

    def __init__(self, model):
        self.head, self.buffer = model.get_output_embeddings(), None
        self.cap = getattr(model.config, "final_logit_softcapping", None)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        head = self.head
        if type(head) is nn.Linear and head.weight.dtype == states.dtype == torch.float32:
            if self.buffer is None or len(self.buffer) < len(states):
                self.buffer = None  # the old one goes before the new one comes
                self.buffer = torch.empty(len(states), head.out_features)
            logits = torch.matmul(states, head.weight.T, out=self.buffer[:len(states)])
            if head.bias is not None:
                logits.add_(head.bias)
        else:
            logits = head(states).float()
        if self.cap:
            logits.div_(self.cap).tanh_().mul_(self.cap)
        return logits


def logit_scorer(model, ctx: int, engine: bool = True, exact: bool = True) -> Callable[..., torch.Tensor]:
    """(window ids [n], first) -> float32 logits [n − first, vocab] of tokens first .. n − 1 (first
    defaults to 1: every next token; valid until the next call), the output head run for those
    positions only: on the native engine when it runs `model` (and `engine`), else through the
    model's own forward; its UniformQ matmuls on fp32 activations if `exact`, else on int8 ones (the
    engine's default for generation)."""
    decoder = _decoder(model, ctx, engine, exact)
    head = None if decoder is None else _Head(model)

    @torch.inference_mode()
    def run(ids: torch.Tensor, first: int = 1) -> torch.Tensor:
        with int8_activations_set(not exact):
            if decoder is None:
                return _logits(model, ids)[first - 1:]
            decoder.truncate(0)
            return head.logits(decoder.states(ids[:-1])[first - 1:])
    return run


def scorer(model, ctx: int, engine: bool = True, exact: bool = True) -> Callable[..., torch.Tensor]:
    """logit_scorer's log-probabilities (a new tensor each call)."""
    logits = logit_scorer(model, ctx, engine, exact)
    return lambda ids, first=1: F.log_softmax(logits(ids, first), dim=-1)


class SourceScores:
    """The reference's logits of each window's scored positions, with a cache. The states
    the reference computes (on the engine: the scored positions' final-normed hidden states; a source
    streamed block by block: every position's last-block output) are kept in a file named by a hash of
    the source's fingerprint (models.fingerprint: its files' paths, sizes and times), the token ids and
    the windows, so the next evaluation against the same source and text runs only the source's output
    head, not its decoder (half of an evaluation's work; all of a streamed source's reading). A missing,
    foreign or damaged file is computed again; a failed write costs only the cache (a warning)."""

    def __init__(self, source, ctx: int, engine: bool, scored: list[tuple[torch.Tensor, int]], key: str | None):
        self.source, self.decoder, self.path, self.states, self.kept, self.offset = source, None, None, None, [], 0
        streamed = hasattr(source, "prefetch")
        self.head = None if streamed else _Head(source)
        windows = [w for w, _ in scored]
        if key is not None and (engine or streamed):
            digest = hashlib.sha256(f"{CACHE_VERSION}|{key}|{ctx}|{[first for _, first in scored]}|{streamed}|".encode()
                                    + b"".join(w.numpy().tobytes() for w in windows))
            self.path = cache_root() / "eval" / f"{digest.hexdigest()[:32]}.safetensors"
            total = sum(len(w) for w in windows) if streamed else sum(len(w) - first for w, first in scored)
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
        """Logits [len(window) − first, vocab] of the window's scored positions (exactly: fp32
        activations, whatever the process-wide int8 switch says; valid until the next call)."""
        with int8_activations_set(False):
            return self._logits(window, first)

    def _logits(self, window: torch.Tensor, first: int) -> torch.Tensor:
        if self.head is None or (self.decoder is None and self.states is None):
            return _logits(self.source, window)[first - 1:]
        if self.states is not None:
            n = len(window) - first
            states, self.offset = self.states[self.offset:self.offset + n], self.offset + n
            return self.head.logits(states)
        self.decoder.truncate(0)
        states = self.decoder.states(window[:-1])[first - 1:]
        if self.path is not None:
            self.kept.append(states.clone())
        return self.head.logits(states)

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
             engine: bool = True, source_key: str | None = None, exact: bool = True,
             scoring: str = "lowbit") -> EvalResult:
    """Perplexity of `model` on `text`; with `source` (the unquantized model) also KLD and its ppl.
    `engine`: score on the native engine where it runs the model (else transformers). `source_key`:
    what identifies the source's weights (models.fingerprint), to cache its states (SourceScores).
    `exact` (the default here, where methods are compared): the model's matmuls on fp32 activations;
    False: on int8 activations, as the engine generates (the source is always exact). `scoring`: whose
    windows and scored positions (SCORINGS: ours, or llama-perplexity's)."""
    scored = scored_windows(tokenizer, text, ctx, stride, max_windows, scoring)
    score = logit_scorer(model, ctx, engine, exact)
    score_source = None if source is None else SourceScores(source, ctx, engine, scored, source_key)
    sums = torch.zeros(3, dtype=torch.float64)  # the model's log-loss, the source's, KL(source ‖ model)
    tokens = 0
    for window, first in tqdm(scored, desc="evaluating", unit="window", disable=not progress):
        logits = score(window, first)
        sums += row_scores(logits, None if source is None else score_source(window, first), window[first:]).sum(0)
        tokens += len(window) - first
    nll, src_nll, kld = sums.tolist()
    result = EvalResult(_perplexity(nll / tokens, "the model"), tokens, len(scored), ctx, exact=exact, scoring=scoring)
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
