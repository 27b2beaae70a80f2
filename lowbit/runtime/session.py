"""The generation loop over any Decoder: prompt-prefix reuse, sampling, stop rules, streamed text, chat.

A Session owns one decoder and remembers which tokens its cache holds, so the next prompt (the
next chat turn, the next server request) recomputes only what differs from the longest common
prefix. Text is streamed by incremental detokenisation (a token's text is emitted once it decodes
to whole characters), and text that might be the start of a stop string is held back until it
is known not to be one, so a stop string split across tokens never leaks into the output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import LowbitError
from .hf_decoder import decoder_for
from .sampling import Sampler, SamplingParams, TokenLogprob

PREFILL_CHUNK = 512  # prompt tokens per forward: bounds attention memory, lets a cancel land between


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float  # until the first new token
    decode_s: float  # from the first new token to the last
    cached_tokens: int = 0  # prompt tokens reused from the cache (not recomputed)

    @property
    def decode_tps(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    @property
    def prefill_tps(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_s if self.prefill_s > 0 else 0.0


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (a stop token or string), "length" (max tokens or context), "cancelled"
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None  # per generated token, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (None for the first)


class Detokenizer:
    """Emits the text each new token adds, decoding a short window so merges and spaces come out right."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-4:])  # context, so the first token's leading space survives
        self.prefix, self.read = 0, len(self.ids)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int | None = None, final: bool = False) -> str:
        if token is not None:
            self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):  # no half characters
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""


class StopStrings:
    """Accumulates the output text; cuts it at the first stop string, holding back possible starts."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text, self.sent = "", 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was found)."""
        self.text += delta
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, self.sent - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._emit(len(self.text)), True
        tail = self.text[self.sent:]
        hold = max((k for s in self.stops for k in range(min(len(s) - 1, len(tail)), 0, -1)
                    if tail.endswith(s[:k])), default=0)
        return self._emit(len(self.text) - hold), False

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], end
        return out


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def model_stop_tokens(model, tokenizer) -> set[int]:
    """End-of-sequence ids from the model's generation config and the tokenizer."""
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(getattr(model, "config", None), "eos_token_id", None), tokenizer.eos_token_id):
        ids.update(source if isinstance(source, (list, tuple)) else [] if source is None else [source])
    return {int(i) for i in ids}


class Session:
    """One decoder, its tokenizer, and the token ids its cache holds."""

    def __init__(self, decoder, tokenizer, stop_tokens: set[int] | None = None, prefix_slots: int = 0):
        self.decoder, self.tokenizer = decoder, tokenizer
        self.stop_tokens = set(stop_tokens or ())
        self.prefix_slots = prefix_slots  # the decoder's last slots park prefixes (the server's prefix cache)
        self.cached: list[int] = []

    @classmethod
    def for_model(cls, model, tokenizer, max_context: int | None = None, threads: int | None = None,
                  engine: bool = True, exact: bool = False, parallel: int | None = 1,
                  kv_cache: str = "fp16", prefix_cache: int | None = 0) -> "Session":
        """`parallel`: sequences the decoder holds for the server's batched steps (None: what memory
        allows; the universal decoder holds one); `prefix_cache`: further slots where the server parks
        finished prompts' prefixes (None: as many as `parallel`, or half of what memory allows when
        that is None too); `kv_cache`: fp16, bf16, fp32 or int8 (the engine's)."""
        if tokenizer is None:
            raise LowbitError("the model has no tokenizer: quantize or load it with one")
        if (prefix_cache or 0) < 0:
            raise LowbitError(f"prefix_cache must be 0 or more slots, got {prefix_cache}")
        slots = None if parallel is None else parallel + (parallel if prefix_cache is None else prefix_cache)
        decoder = decoder_for(model, max_context, threads, engine, exact, slots, kv_cache)
        total = getattr(decoder, "slots", 1)
        spare = (total // 2 if prefix_cache is None else min(prefix_cache, total - 1)) if parallel is None \
            else total - parallel
        return cls(decoder, tokenizer, model_stop_tokens(model, tokenizer), max(spare, 0))

    @property
    def max_context(self) -> int:
        return self.decoder.max_context

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt for `messages` rendered by the tokenizer's chat template, ready for the reply."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise LowbitError("this model's tokenizer has no chat template: use plain completion "
                              "(lowbit generate, /v1/completions) instead")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja errors: the messages do not fit the template
            raise LowbitError(f"the chat template rejected the messages: {e}") from None
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def check_prompt(self, ids: Sequence[int]) -> None:
        if not ids:
            raise LowbitError("the prompt is empty")
        if len(ids) >= self.max_context:
            raise LowbitError(f"the prompt has {len(ids)} tokens but the context holds {self.max_context}: "
                              "shorten it")

    def _prefill(self, ids: list[int], cancelled) -> tuple[object, int]:
        """Logits after `ids`, recomputing only what the cache does not already hold."""
        reuse = min(common_prefix(self.cached, ids), len(ids) - 1)  # the last token gives the logits
        self.decoder.truncate(reuse)
        self.cached = self.cached[:reuse]
        logits = None
        for i in range(reuse, len(ids), PREFILL_CHUNK):
            if cancelled is not None and cancelled():
                return None, reuse
            chunk = ids[i:i + PREFILL_CHUNK]
            logits = self.decoder.forward(chunk)
            self.cached += chunk
        return logits, reuse

    def generate(self, prompt_ids: Sequence[int], max_tokens: int = 64, sampling: SamplingParams | None = None,
                 stop: Sequence[str] = (), stop_tokens: Sequence[int] = (),
                 on_text: Callable[[str], None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> Completion:
        """Generate up to `max_tokens` after `prompt_ids`; `on_text` receives the text as it is produced,
        `cancelled()` is polled before each token."""
        prompt = [int(i) for i in prompt_ids]
        self.check_prompt(prompt)
        if max_tokens < 1:
            raise LowbitError(f"max tokens must be at least 1, got {max_tokens}")
        sampler = Sampler(sampling or SamplingParams())
        ends = self.stop_tokens | {int(t) for t in stop_tokens}
        detok, stopper = Detokenizer(self.tokenizer, prompt), StopStrings(stop)
        emit = on_text or (lambda _: None)
        generated, times, finish, cut = [], [], "length", False
        start = time.perf_counter()
        try:
            logits, reused = self._prefill(prompt, cancelled)
            while logits is not None:
                if cancelled is not None and cancelled():
                    finish = "cancelled"
                    break
                token = sampler(logits, self.cached, generated)
                generated.append(token)
                times.append(time.perf_counter())
                if token in ends:
                    finish = "stop"
                    break
                text, hit = stopper.feed(detok.add(token))
                if text:
                    emit(text)
                if hit:
                    finish, cut = "stop", True
                    break
                if len(generated) >= max_tokens or self.decoder.position >= self.max_context:
                    break
                logits = self.decoder.forward([token])
                self.cached.append(token)
            else:
                finish = "cancelled"
        except BaseException:
            self.decoder.truncate(0)  # the cache may be half-updated: forget it
            self.cached = []
            raise
        if not cut:  # what the detokenizer and the stop check still hold is output after all
            text, hit = stopper.feed(detok.add(final=True))
            text += "" if hit else stopper.flush()
            finish = "stop" if hit else finish
            if text:
                emit(text)
        t = times or [start]
        stats = GenerationStats(len(prompt), len(generated), t[0] - start, t[-1] - t[0], reused)
        return Completion(stopper.text, generated, finish, stats)


class Chat:
    """A multi-turn conversation over one Session: each turn re-renders the history with the chat
    template, and the cache keeps everything up to where the new prompt differs."""

    def __init__(self, session: Session, system: str | None = None):
        self.session, self.system = session, system
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the cache keeps what still matches: the system prompt)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, max_tokens: int = 256, **options) -> Completion:
        """The assistant's reply to `text` (options as Session.generate); the oldest turns are dropped
        when the history no longer fits the context."""
        self.messages.append({"role": "user", "content": text})
        ids = self.session.chat_ids(self.messages)
        first = 1 if self.messages[0]["role"] == "system" else 0
        while len(ids) + 1 >= self.session.max_context and len(self.messages) - first > 1:
            del self.messages[first:first + 2]  # one user message and its reply
            ids = self.session.chat_ids(self.messages)
        try:
            reply = self.session.generate(ids, max_tokens, **options)
        except BaseException:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": reply.text})
        return reply
