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
(transformers), under the same switch. What the scores need of the source is cached between
evaluations (SourceScores, eval/source_cache.py): a second evaluation against one source and text
neither loads nor runs it, and costs one model, not two. Its windows are then independent: with T
kernel threads they run T at a time, each on its own engine and one thread (eval/streams.py), and
are summed in window order: the numbers of one thread, bit for bit, without the pool's barriers.
"""

import contextlib
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import LowbitError
from ..kernels.cpu import threads as kernel_threads
from ..kernels.cpu.logit_scores import records, row_scores
from ..kernels.switches import int8_activations_set
from ..runtime.engine import SCRATCH_BYTES, available_memory, load_decoder
from . import source_cache, streams

CACHE_VERSION = 2  # of SourceScores' cache files: bump when what they hold changes
SCORINGS = ("lowbit", "llama.cpp")
WINDOWS_PER_STREAM = 4  # a stream builds its own engine: worth it for a few windows, not for one


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
    in inference mode), written into one buffer, grown to the most rows asked and reused: the logits
    returned are valid until the next call. A float nn.Linear head writes there directly; any other
    (a QuantLinear) runs CHUNK_BYTES of output rows at a time, copied in: its own ~100 MB output a
    window, freed and allocated again, cost ~25k page faults a window (malloc maps blocks over 32 MB
    afresh each time; smaller ones it reuses), ~2 CPU-s over SmolLM2's 33 windows."""

    CHUNK_BYTES = 16 << 20

    def __init__(self, model):
        self.head, self.buffer = model.get_output_embeddings(), None
        self.cap = getattr(model.config, "final_logit_softcapping", None)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        head, n = self.head, len(states)
        if self.buffer is None or len(self.buffer) < n:
            self.buffer = None  # the old one goes before the new one comes
            self.buffer = torch.empty(n, head.out_features)
        logits = self.buffer[:n]
        if type(head) is nn.Linear and head.weight.dtype == states.dtype == torch.float32:
            torch.matmul(states, head.weight.T, out=logits)
            if head.bias is not None:
                logits.add_(head.bias)
        else:
            rows = max(1, self.CHUNK_BYTES // (4 * head.out_features))
            for i in range(0, n, rows):
                logits[i:i + rows] = head(states[i:i + rows])
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
    run.decoder = decoder
    return run


def scorer(model, ctx: int, engine: bool = True, exact: bool = True) -> Callable[..., torch.Tensor]:
    """logit_scorer's log-probabilities (a new tensor each call)."""
    logits = logit_scorer(model, ctx, engine, exact)
    return lambda ids, first=1: F.log_softmax(logits(ids, first), dim=-1)


class SourceScores:
    """What the KL divergence and the source's perplexity need of the reference on each window's scored
    positions, with a cache. Without a `key`: the source's exact logits, scored with the model's (the KL
    exact). With one (models.fingerprint: its files' paths, sizes and times), a record of them
    (kernels/cpu/logit_scores: uint16 log-probabilities and exact scalars), kept in a file named by a
    hash of the key, the token ids, the windows and `engine` (eval/source_cache.py), so that the next
    evaluation against the same source and text reads the records and never loads or runs the source:
    its log-loss and entropy stay exact, the KL's cross term comes from the dequantized record (~1e-6
    nats on a mean over thousands of positions), the same numbers first run and second. `source` is the
    reference, or a function that loads it (called only when its records are not cached). A missing,
    foreign or damaged file is computed again; a failed write costs only the cache (a warning)."""

    def __init__(self, source, ctx: int, engine: bool, scored: list[tuple[torch.Tensor, int]], key: str | None):
        self.source, self.ctx, self.engine, self.scored = source, ctx, engine, scored
        self.decoder = self.head = self.cached = self.writer = self.buffers = None
        self.ready = False
        if key is not None:
            digest = hashlib.sha256(f"{CACHE_VERSION}|{key}|{ctx}|{[first for _, first in scored]}|{engine}|".encode()
                                    + b"".join(w.numpy().tobytes() for w, _ in scored)).hexdigest()
            path = source_cache.directory() / f"{digest[:32]}{source_cache.SUFFIX}"
            rows = sum(len(w) - first for w, first in scored)
            self.cached = source_cache.read(path, digest, rows)
            self.writer = source_cache.Writer(path, digest, rows) if self.cached is None else None

    def _load(self) -> None:
        """The reference, ready to run (loaded at the first window that needs it)."""
        if self.ready:
            return
        self.ready = True
        if not isinstance(self.source, nn.Module) and not hasattr(self.source, "prefetch"):
            self.source = self.source()
        if hasattr(self.source, "prefetch"):  # all windows run block by block first (models/lazy.py)
            self.source.prefetch([w for w, _ in self.scored])
        else:
            self.head, self.decoder = _Head(self.source), _decoder(self.source, self.ctx, self.engine)

    @torch.inference_mode()
    def scores(self, logits: torch.Tensor, window: torch.Tensor, first: int, row: int) -> torch.Tensor:
        """row_scores of the model's logits [len(window) − first, vocab] against the source on the
        window's scored positions, rows `row` .. of all windows' (the source exact: fp32 activations,
        whatever the process-wide int8 switch says). Cached records are read in any order (from
        several streams at once); records being written, in window order only."""
        target, n = window[first:], len(window) - first
        if self.cached is not None:
            return row_scores(logits, None, target, self.cached.record(row, n))
        self._load()
        with int8_activations_set(False):
            source = self._logits(window, first)
        if self.writer is None:
            return row_scores(logits, source, target)
        if self.buffers is None or len(self.buffers[1]) < n:
            self.buffers = None  # the old ones go before the new ones come
            self.buffers = torch.empty(n, source.shape[1], dtype=torch.uint16), torch.empty(n, 4, dtype=torch.float64)
        record = records(source, target, (self.buffers[0][:n], self.buffers[1][:n]))
        self.writer.write(record)
        return row_scores(logits, None, target, record)

    def _logits(self, window: torch.Tensor, first: int) -> torch.Tensor:
        if self.decoder is None:
            return _logits(self.source, window)[first - 1:]
        self.decoder.truncate(0)
        return self.head.logits(self.decoder.states(window[:-1])[first - 1:])

    def save(self) -> None:
        """Put the written records in place (after the last window)."""
        if self.writer is not None:
            self.writer.commit()


def evaluate(model, tokenizer, text: str, ctx: int = 512, stride: int | None = None,
             max_windows: int | None = None, source=None, progress: bool = True,
             engine: bool = True, source_key: str | None = None, exact: bool = True,
             scoring: str = "lowbit") -> EvalResult:
    """Perplexity of `model` on `text`; with `source` (the unquantized model, or a function that loads
    it) also KLD and its ppl. `engine`: score on the native engine where it runs the model (else
    transformers). `source_key`: what identifies the source's weights (models.fingerprint), to cache
    its scores (SourceScores: a function is called only when they are not cached).
    `exact` (the default here, where methods are compared): the model's matmuls on fp32 activations;
    False: on int8 activations, as the engine generates (the source is always exact). `scoring`: whose
    windows and scored positions (SCORINGS: ours, or llama-perplexity's)."""
    scored = scored_windows(tokenizer, text, ctx, stride, max_windows, scoring)
    score_source = None if source is None else SourceScores(source, ctx, engine, scored, source_key)
    rows = [0]  # each window's first row among all windows' scored positions
    for window, first in scored:
        rows.append(rows[-1] + len(window) - first)

    def window_sums(score, i: int) -> torch.Tensor:  # the model's log-loss, the source's, KL(source ‖ model)
        window, first = scored[i]
        logits = score(window, first)
        return (row_scores(logits, None, window[first:]) if source is None else
                score_source.scores(logits, window, first, rows[i])).sum(0)

    # several streams where the windows are independent: the source's records cached (or no source)
    independent = engine and (source is None or score_source.cached is not None)
    count = _streams(model, ctx, min(kernel_threads.get(), len(scored) // WINDOWS_PER_STREAM)) if independent else 1
    with tqdm(total=len(scored), desc="evaluating", unit="window", disable=not progress) as bar, \
            int8_activations_set(not exact), _one_thread_each(count > 1) as restore:
        score = logit_scorer(model, ctx, engine, exact)
        if score.decoder is None:  # the universal path: no engine to copy, the threads back
            count = restore()
        per_window = streams.run(len(scored), score, lambda: logit_scorer(model, ctx, engine, exact),
                                 window_sums, count, bar.update)
    sums = torch.zeros(3, dtype=torch.float64)
    for s in per_window:  # in window order: the sums of one stream, bit for bit
        sums += s
    tokens = rows[-1]
    nll, src_nll, kld = sums.tolist()
    result = EvalResult(_perplexity(nll / tokens, "the model"), tokens, len(scored), ctx, exact=exact, scoring=scoring)
    if source is not None:
        result.kld, result.source_ppl = kld / tokens, _perplexity(src_nll / tokens, "the source model")
        if not math.isfinite(result.kld):
            raise LowbitError(f"the KL divergence came out as {result.kld}: one of the models gives NaN or Inf "
                              "log-probabilities (damaged weights, or activations that overflow their dtype)")
        score_source.save()
    return result


def _streams(model, ctx: int, most: int) -> int:
    """How many windows to score at once, each on its own engine and one thread (eval/streams.py): up
    to `most`, as many as half the memory available now holds, a stream costing about its weights
    (the engine's copy), fp32 embedding, logits buffer and scratch."""
    if most <= 1:
        return 1
    config = model.config
    per_stream = sum(t.nbytes for t in model.state_dict().values()) + SCRATCH_BYTES \
        + 4 * config.vocab_size * (config.hidden_size + ctx)
    return max(1, min(most, int(available_memory() // 2 // per_stream)))


@contextlib.contextmanager
def _one_thread_each(on: bool):
    """With `on`, the kernels' pool and torch at one thread inside the block (each stream is one
    thread: one shared pool would serialize them); yields a function that gives the threads back
    early (and returns 1, the streams left); their counts as before after the block either way."""
    kernels, intra = kernel_threads.get(), torch.get_num_threads()

    def restore() -> int:
        kernel_threads.set_threads(kernels)
        torch.set_num_threads(intra)
        return 1

    if on:
        kernel_threads.set_threads(1)
        torch.set_num_threads(1)
    try:
        yield restore
    finally:
        if on:
            restore()


def _perplexity(mean_nll: float, who: str) -> float:
    """exp(mean NLL); a non-finite or overflowing result is a broken model, never a number to report."""
    if not math.isfinite(mean_nll) or mean_nll > 700:
        raise LowbitError(f"the perplexity of {who} is not finite (mean log-loss {mean_nll}): it gives NaN or "
                          "Inf log-probabilities (damaged weights, or activations that overflow their dtype)")
    return math.exp(mean_nll)
