"""Continuous batching: many generations at once over one decoder's KV slots, one batched step at a time.

A CPU decode step is bandwidth-bound: it reads every weight once whether it advances one sequence or
B, so the scheduler keeps up to `slots` sequences in flight and advances all of them in each step
(Engine.step: every sequence at its own position in its own slot, the linears once over all rows):
  - a decoding sequence contributes its last token;
  - a sequence still reading its prompt contributes the next piece of it: at most PREFILL_STEP
    tokens while others decode (their streams keep flowing), the step's whole budget when none does;
  - a request joins at the next step once it has slots (n choices take n: the prompt is computed in
    the first and copied to the others) and leaves when done, cancelled or failed.
A slot keeps its tokens after its sequence leaves; a later prompt that starts the same way (a shared
system prompt, the previous chat turn) takes the free slot sharing the longest prefix, or copies that
prefix from whichever slot holds it (free slots are overwritten least recently used first), or from
the prefix cache (runtime/prefix_cache.py: the session's spare slots, where finished sequences'
prefixes are parked by token-prefix hash), whichever holds more of it.

Greedy output equals Session.generate on the same prompt (the same sampler, stop rules and
detokenizer; logits equal within float rounding). A decoder without batched steps (the universal
HFDecoder) runs as a single slot (OneSlot).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..errors import LowbitError
from .constrained import Grammar
from .engine import Segment
from .prefix_cache import PrefixCache
from .sampling import Sampler, SamplingParams, TokenLogprob, token_logprob
from .session import Completion, Detokenizer, GenerationStats, Session, StopStrings, common_prefix

PREFILL_STEP = 128  # prompt tokens per step while other sequences decode (and per echo step)
RATE_WINDOW_S = 10.0  # tokens/s in the metrics: generated over this many seconds


class QueueFull(LowbitError):
    """Every slot is busy and the waiting line is full."""


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int  # 0: score the prompt only (echo)
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    n: int = 1  # choices, each sampled on its own (seed + i when seeded)
    logprobs: int | None = None  # alternatives reported per generated token (0: the chosen one only); None: off
    echo: bool = False  # report the prompt's log-probabilities too
    on_event: Callable[[int, str, object], None] = lambda choice, kind, value: None
    cancel: threading.Event = field(default_factory=threading.Event)
    grammar: Grammar | None = None  # constrained decoding (runtime/constrained.py): each choice gets a matcher
    # events: (i, "text", (delta, [TokenLogprob])), (i, "done", Completion), (-1, "error", exception)


class OneSlot:
    """Batched steps over a one-sequence Decoder: one slot, one segment per step."""

    slots = 1

    def __init__(self, decoder):
        self.decoder, self.max_step_tokens = decoder, 512

    def step(self, segments: list[Segment]) -> torch.Tensor:
        (seg,) = segments
        self.decoder.truncate(seg.pos0)
        if seg.want == 2:
            return torch.stack([self.decoder.forward([t]) for t in seg.ids])
        logits = self.decoder.forward(seg.ids)[None]
        return logits if seg.want else logits[:0]

    def copy(self, src: int, dst: int, n: int) -> None:
        raise LowbitError("a single-slot decoder has no other slot to copy to")


class _Sequence:
    """One choice of a request in its slot: the tokens, how many of them the slot has computed, output."""

    def __init__(self, req: Request, index: int, slot: int, tokenizer, reused: int):
        self.req, self.index, self.slot = req, index, slot
        seed = req.sampling.seed
        self.sampler = Sampler(req.sampling if seed is None else replace(req.sampling, seed=(seed + index) % 2**63))
        self.tokens, self.cached, self.reused = list(req.prompt), reused, reused
        self.generated: list[int] = []
        self.detok, self.stopper = Detokenizer(tokenizer, req.prompt), StopStrings(req.stop)
        self.logprobs = [] if req.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if req.echo else None
        self.pending: list[TokenLogprob] = []  # log-probabilities not yet sent with text
        self.leader: _Sequence | None = None  # choices after the first wait for its prompt
        self.start, self.times, self.cut = time.perf_counter(), [], False
        self.matcher = None if req.grammar is None else req.grammar.matcher()

    @property
    def prefilling(self) -> bool:
        return self.leader is None and self.cached < len(self.req.prompt)


class Scheduler(threading.Thread):
    """The only thread that touches the decoder: admits requests into slots, runs steps, streams events."""

    def __init__(self, session: Session, max_queue: int):
        super().__init__(name="lowbit-scheduler", daemon=True)
        decoder = session.decoder
        self.engine = decoder if hasattr(decoder, "step") else OneSlot(decoder)
        self.slots, self.max_context = self.engine.slots - session.prefix_slots, decoder.max_context
        self.prefix = PrefixCache(self.engine, range(self.slots, self.engine.slots))
        self.kv_bytes_per_slot = getattr(decoder, "kv_bytes_per_slot", 0)
        self.tokenizer, self.stop_tokens, self.max_queue = session.tokenizer, session.stop_tokens, max_queue
        self.cond = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.active: list[_Sequence] = []
        self.busy: list[_Sequence | None] = [None] * self.slots
        self.held: list[list[int]] = [[] for _ in range(self.slots)]  # tokens a free slot's cache holds
        self.used = [0.0] * self.slots  # when each slot was last released (least recently used first)
        self.left: dict[int, int] = {}  # id(request) -> choices still running
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self.totals = {"prompt_tokens": 0, "cached_prompt_tokens": 0, "prefix_cache_hits": 0, "generated_tokens": 0,
                       "steps": 0}
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens generated) per recent step
        self.stopping = False

    # ---- outside the thread ----------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if not 1 <= req.n <= self.slots:
            raise LowbitError(f"n={req.n} choices need {req.n} KV slots; this server has {self.slots}")
        if len(req.prompt) + req.max_tokens > self.max_context:
            raise LowbitError(f"the prompt ({len(req.prompt)} tokens) plus max tokens ({req.max_tokens}) exceeds "
                              f"a slot's context of {self.max_context} tokens")
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy ({len(self.waiting)} requests waiting): retry later")
            self.waiting.append(req)
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def metrics(self) -> dict:
        """Queue depth, active slots, tokens/s over the last RATE_WINDOW_S, KV positions in use."""
        now = time.perf_counter()
        with self.cond:
            recent = [n for t, n in list(self.recent) if t > now - RATE_WINDOW_S]
            used = sum(s.cached for s in self.active)
            return {"queue_depth": len(self.waiting), "slots": self.slots,
                    "active_slots": sum(b is not None for b in self.busy),
                    "tokens_per_second": sum(recent) / RATE_WINDOW_S, "kv_used_tokens": used,
                    "kv_capacity_tokens": self.slots * self.max_context,
                    "kv_used_bytes": used * self.kv_bytes_per_slot // max(self.max_context, 1),
                    "prefix_slots": len(self.prefix.lru), "prefix_parked": self.prefix.parked,
                    **self.totals, **{f"requests_{k}": v for k, v in self.counts.items()}}

    # ---- the thread ----------------------------------------------------------------------------------
    def run(self) -> None:
        # This thread's torch work is one vocabulary-sized row per sequence (sampling, log-probabilities):
        # a second OpenMP thread only adds a barrier per op and takes a core from the engine's pool
        # (torch's thread count is per calling thread: other threads keep theirs).
        torch.set_num_threads(1)
        while True:
            with self.cond:
                while not self.stopping and not self.active and not self.waiting:
                    self.cond.wait()
                if self.stopping:
                    return
            self.step_once()

    def step_once(self) -> list[tuple[_Sequence, Segment]]:
        """Admit what fits, drop what was cancelled, run one batched step; the plan it ran (or [])."""
        with self.cond:
            self._admit()
        for seq in [s for s in self.active if s.req.cancel.is_set()]:
            self._finish(seq, "cancelled")
        plan = self._plan()
        if plan:
            try:
                self._absorb(plan, self.engine.step([seg for _, seg in plan]))
            except Exception as e:  # noqa: BLE001 - any failure ends these requests, the server goes on
                self._fail({id(s.req): s.req for s, _ in plan if s in self.active}.values(), e)
        return plan

    def _admit(self) -> None:
        """Move waiting requests into free slots, in arrival order (under self.cond)."""
        while self.waiting:
            req = self.waiting[0]
            if req.cancel.is_set():
                self.waiting.popleft()
                self.counts["cancelled"] += 1
                continue
            free = [s for s in range(self.slots) if self.busy[s] is None]
            if len(free) < req.n:
                return
            self.waiting.popleft()
            prompt = req.prompt
            shared = [0 if req.echo else common_prefix(self._holds(s), prompt) for s in range(self.slots)]
            first = max(free, key=lambda s: (shared[s], -self.used[s]))
            source = max(range(self.slots), key=lambda s: shared[s])
            reuse = min(shared[source], len(prompt) - 1)
            spare, parked = (-1, 0) if req.echo else self.prefix.lookup(prompt)
            if min(parked, len(prompt) - 1) > reuse:
                reuse = min(parked, len(prompt) - 1)
                self.engine.copy(spare, first, reuse)
                self.totals["prefix_cache_hits"] += 1
            elif shared[source] > shared[first] and reuse > 0:
                self.engine.copy(source, first, reuse)
            else:
                reuse = min(shared[first], len(prompt) - 1)
            rest = sorted((s for s in free if s != first), key=lambda s: self.used[s])[:req.n - 1]
            seqs = [_Sequence(req, i, slot, self.tokenizer, reuse if i == 0 else 0)
                    for i, slot in enumerate([first, *rest])]
            for seq in seqs[1:]:
                seq.leader = seqs[0]
            for seq in seqs:
                self.busy[seq.slot] = seq
                self.held[seq.slot] = []
            self.active += seqs
            self.left[id(req)] = req.n
            self.totals["prompt_tokens"] += len(prompt)
            self.totals["cached_prompt_tokens"] += reuse

    def _holds(self, slot: int) -> list[int]:
        seq = self.busy[slot]
        return self.held[slot] if seq is None else seq.tokens[:seq.cached]

    def _plan(self) -> list[tuple[_Sequence, Segment]]:
        """This step's segments: every decoding sequence's last token, then prompt pieces in arrival order."""
        budget = self.engine.max_step_tokens
        plan = [(s, Segment(s.slot, s.cached, [s.tokens[-1]], 1)) for s in self.active
                if s.leader is None and not s.prefilling][:budget]
        room = budget - len(plan)
        cap = PREFILL_STEP if plan else room
        for s in self.active:
            if not s.prefilling or min(room, cap) <= 0:
                continue
            k = min(room, cap, len(s.req.prompt) - s.cached, PREFILL_STEP if s.req.echo else budget)
            end = s.cached + k
            want = 2 if s.req.echo else int(end == len(s.req.prompt))
            plan.append((s, Segment(s.slot, s.cached, s.req.prompt[s.cached:end], want)))
            room, cap = room - k, cap - k
        return plan

    def _absorb(self, plan: list[tuple[_Sequence, Segment]], rows: torch.Tensor) -> None:
        r, generated = 0, 0
        for seq, seg in plan:
            n = len(seg.ids) if seg.want == 2 else seg.want
            mine, r = rows[r:r + n], r + n
            seq.cached += len(seg.ids)
            if seg.want == 2:  # row j predicts the token at position pos0 + j + 1
                prompt = seq.req.prompt
                seq.prompt_logprobs += [token_logprob(mine[j], prompt[p], seq.req.logprobs or 0)
                                        for j, p in enumerate(range(seg.pos0 + 1, seg.pos0 + n + 1)) if p < len(prompt)]
            if seq.prefilling or seq.req.cancel.is_set():
                continue
            logits = mine[-1]
            if seq.cached == len(seq.req.prompt):  # the prompt is done: its other choices start from it
                for f in [f for f in self.active if f.leader is seq]:
                    self.engine.copy(seq.slot, f.slot, seq.cached)
                    f.leader, f.cached, f.start = None, seq.cached, seq.start
                    f.prompt_logprobs = None if seq.prompt_logprobs is None else list(seq.prompt_logprobs)
                    generated += self._next(f, logits)
                if seq.req.max_tokens == 0:
                    self._finish(seq, "length")
                    continue
            generated += self._next(seq, logits)
        with self.cond:
            self.totals["steps"] += 1
            self.totals["generated_tokens"] += generated
            now = time.perf_counter()
            self.recent.append((now, generated))
            while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
                self.recent.popleft()

    def _next(self, seq: _Sequence, logits: torch.Tensor) -> int:
        """Sample seq's next token from `logits`, stream its text, finish it when a rule says so."""
        allowed = None if seq.matcher is None else seq.matcher.allowed(logits.numel())
        token = seq.sampler(logits, seq.tokens, seq.generated, allowed)
        if seq.matcher is not None:
            seq.matcher.advance(token)
        seq.times.append(time.perf_counter())
        if seq.logprobs is not None:
            rec = token_logprob(logits, token, seq.req.logprobs)
            seq.logprobs.append(rec)
            seq.pending.append(rec)
        seq.generated.append(token)
        seq.tokens.append(token)
        if token in self.stop_tokens:
            self._finish(seq, "stop")
            return 1
        text, hit = seq.stopper.feed(seq.detok.add(token))
        if text:
            seq.req.on_event(seq.index, "text", (text, seq.pending))
            seq.pending = []
        if hit:
            seq.cut = True
            self._finish(seq, "stop")
        elif seq.matcher is not None and seq.matcher.done:  # the grammar allows only the end now
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.req.max_tokens or seq.cached >= self.max_context:
            self._finish(seq, "length")
        return 1

    def _finish(self, seq: _Sequence, reason: str) -> None:
        if not seq.cut and reason != "cancelled":  # what the detokenizer and stop check hold is output
            text, hit = seq.stopper.feed(seq.detok.add(final=True))
            text += "" if hit else seq.stopper.flush()
            reason = "stop" if hit else reason
            if text or seq.pending:
                seq.req.on_event(seq.index, "text", (text, seq.pending))
        t = seq.times or [seq.start]
        stats = GenerationStats(len(seq.req.prompt), len(seq.generated), t[0] - seq.start, t[-1] - t[0], seq.reused)
        self._release(seq, seq.tokens[:seq.cached])  # before "done": a client that has its answer sees a free slot
        self.prefix.park(seq.slot, seq.tokens[:seq.cached])
        self.left[id(seq.req)] -= 1
        if not self.left[id(seq.req)]:
            del self.left[id(seq.req)]
            with self.cond:
                self.counts["cancelled" if seq.req.cancel.is_set() else "completed"] += 1
        seq.req.on_event(seq.index, "done", Completion(seq.stopper.text, seq.generated, reason, stats,
                                                       seq.logprobs, seq.prompt_logprobs))

    def _release(self, seq: _Sequence, keep: list[int]) -> None:
        self.active.remove(seq)
        self.busy[seq.slot], self.held[seq.slot], self.used[seq.slot] = None, keep, time.perf_counter()

    def _fail(self, reqs, error: Exception) -> None:
        for req in reqs:
            for seq in [s for s in self.active if s.req is req]:
                self._release(seq, [])  # its cache may be half-written: forget it
            self.left.pop(id(req), None)
            req.on_event(-1, "error", error)
            with self.cond:
                self.counts["failed"] += 1
