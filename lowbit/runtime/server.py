"""OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming),
/health, /metrics (Prometheus text).

One scheduler thread (runtime/batching.py) owns the decoder: requests join the running batch at the
next step while it has free KV slots (`parallel` of them), wait in a bounded FIFO line otherwise (503
with Retry-After once the line is full), and leave when done, so many clients stream at once and a
shared prefix (a system prompt, the previous chat turn) is computed once. A client that disconnects,
while waiting or while streaming, cancels its request and frees its slots at the next step. The
OpenAI surface: n choices, logprobs / top_logprobs (the model's own log-probabilities), echo with the
prompt's log-probabilities (what lm-eval's loglikelihood tasks ask for), seed, presence and
frequency penalties, `response_format` json_object / json_schema (decoding constrained to the schema:
runtime/constrained.py), `tools` / `tool_choice` with parsed `tool_calls` (runtime/tools.py; a reply
that may hold calls streams its text up to where a call could begin, the rest once done and parsed).
Bad requests get OpenAI's error JSON: {"error": {"message", "type", "param",
"code"}}, and a request that cannot fit (n choices beyond the slots, prompt plus max tokens beyond a
slot's context) is refused before any work.

A request cannot stall the others: its body is read up to a limit (`max_body_bytes`, 413 past it), a
prompt longer in characters than the context could hold in tokens is refused before tokenizing, and
tokenizing runs on a thread of its own, so the event loop keeps answering (/v1/models, other streams)
while a large prompt is tokenized.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import LowbitError
from . import batching, tools
from .constrained import Grammar, Grammars, InvalidRequest
from .sampling import SamplingParams, TokenLogprob
from .session import Completion, Session

DISCONNECT_POLL_S = 0.25
MAX_BODY_BYTES = 2 << 20  # default request-body limit: a full 128k-token context is ~0.5 MB of text
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
RETRY_AFTER_S = 1  # what a 503 (line full) tells the client to wait


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---- request parsing ------------------------------------------------------------------------------
def _get(body: dict, name: str, types, default=None, check=None, want: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types) or \
            (check is not None and not check(value)):
        raise APIError(400, f"'{name}' must be {want}, got {json.dumps(value)}", param=name,
                       code="invalid_value")
    return value


def _sampling(body: dict, defaults: dict) -> SamplingParams:
    num = (int, float)
    d = {**{"temperature": 1.0, "top_p": 1.0}, **defaults}
    top_k = _get(body, "top_k", (int,), d.get("top_k", 0), lambda v: v >= -1, "an integer >= -1 (-1 or 0: off)")
    p = SamplingParams(
        temperature=float(_get(body, "temperature", num, d["temperature"], lambda v: 0 <= v <= 2, "in [0, 2]")),
        top_p=float(_get(body, "top_p", num, d["top_p"], lambda v: 0 < v <= 1, "in (0, 1]")),
        top_k=max(0, top_k),
        min_p=float(_get(body, "min_p", num, d.get("min_p", 0.0), lambda v: 0 <= v <= 1, "in [0, 1]")),
        repetition_penalty=float(_get(body, "repetition_penalty", num, d.get("repetition_penalty", 1.0),
                                      lambda v: 0 < v <= 10, "in (0, 10]")),
        presence_penalty=float(_get(body, "presence_penalty", num, 0.0, lambda v: -2 <= v <= 2, "in [-2, 2]")),
        frequency_penalty=float(_get(body, "frequency_penalty", num, 0.0, lambda v: -2 <= v <= 2, "in [-2, 2]")),
        seed=_get(body, "seed", (int,), d.get("seed"), lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)"))
    return p


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
        raise APIError(400, "'stop' must be a string or a list of at most 16 strings", param="stop",
                       code="invalid_value")
    return stop


def _unsupported(body: dict, chat: bool) -> None:
    """Features this server does not have: refuse them rather than silently ignore them."""
    for name, ok in (("best_of", lambda v: v in (None, 1)), ("suffix", lambda v: not v),
                     ("functions", lambda v: not v), ("function_call", lambda v: not v),
                     ("tools", lambda v: chat or not v), ("tool_choice", lambda v: chat or v is None),
                     ("logit_bias", lambda v: not v)):
        if name in body and not ok(body[name]):
            raise APIError(400, f"'{name}' is not supported by this server" +
                           (" (use 'tools')" if name.startswith("function") else ""), param=name, code="unsupported")


def _response_format(body: dict) -> tuple[dict, str] | None:
    """(JSON schema the output must match, the param naming it) or None for free text."""
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}, "response_format"
    spec = fmt.get("json_schema") if kind == "json_schema" else None
    if not isinstance(spec, dict):
        raise InvalidRequest("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                             "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                             "response_format")
    if not isinstance(spec.get("name"), str) or not tools.NAME.fullmatch(spec["name"]):
        raise InvalidRequest("'response_format.json_schema.name' must be 1-64 letters, digits, '_' or '-'",
                             "response_format.json_schema.name")
    return spec.get("schema", {}), "response_format.json_schema.schema"


def _tool_calls(m: dict, i: int) -> list[dict]:
    """An assistant message's earlier `tool_calls`, checked ([] when it has none)."""
    calls = m.get("tool_calls") or []
    if m.get("role") != "assistant" and calls or not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
            and isinstance(c["function"].get("arguments"), str) for c in calls):
        raise APIError(400, f"messages[{i}].tool_calls must be a list of {{id, type: \"function\", function: "
                       f"{{name, arguments (JSON text)}}}} on an assistant message", param=f"messages[{i}].tool_calls")
    return calls


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        calls = _tool_calls(m, i) if isinstance(m, dict) else []
        if calls and content is None:
            content = ""
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if role not in ("system", "developer", "user", "assistant", "tool") or not isinstance(content, str):
            raise APIError(400, f"messages[{i}] must have a role (system, user, assistant, tool) and text content",
                           param=f"messages[{i}]")
        out.append({"role": "system" if role == "developer" else role, "content": content,
                    **({"tool_calls": calls} if calls else {}),
                    **({"tool_call_id": str(m["tool_call_id"])} if role == "tool" and "tool_call_id" in m else {})})
    return out


def _prompt(body: dict, vocab: int) -> str | list[int]:
    """The completion's prompt: text (to tokenize) or token ids (each below `vocab`)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and \
            all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
        return prompt
    raise APIError(400, f"'prompt' must be a string or a list of token ids below {vocab} (one prompt per request)",
                   param="prompt")


def _too_long(size: int, limit: int, unit: str, context: int, param: str) -> None:
    if size > limit:
        raise APIError(400, f"the prompt has {size} {unit}; this model's context holds {context} tokens: "
                       f"shorten it", param=param, code="context_length_exceeded")


def _longest_token(tokenizer) -> int:
    """Characters of the tokenizer's longest token (its text form: byte-level pieces spell every byte
    as one character, so no token decodes to more characters than this)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return max((len(t) for t in vocab), default=64) + 1


def _choices(body: dict, chat: bool, slots: int) -> tuple[int, int | None, bool]:
    """(n, alternatives per token or None for no log-probabilities, echo) from the request."""
    n = _get(body, "n", (int,), 1, lambda v: 1 <= v <= 128, "an integer in [1, 128]")
    if n > slots:
        raise APIError(400, f"n={n} choices need {n} KV slots; this server runs {slots} (lowbit serve --parallel)",
                       param="n", code="kv_budget_exceeded")
    bound = f"an integer in [0, {MAX_TOP_LOGPROBS}]"
    if chat:
        on = _get(body, "logprobs", (bool,), False, want="true or false")
        top = _get(body, "top_logprobs", (int,), None, lambda v: 0 <= v <= MAX_TOP_LOGPROBS, bound)
        if top is not None and not on:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
        return n, (top or 0) if on else None, False
    top = _get(body, "logprobs", (int,), None, lambda v: 0 <= v <= MAX_TOP_LOGPROBS, bound)
    return n, top, _get(body, "echo", (bool,), False, want="true or false")


# ---- responses --------------------------------------------------------------------------------------
def _usage(prompt: list[int], outs: list[Completion]) -> dict:
    done = sum(len(o.tokens) for o in outs)
    return {"prompt_tokens": len(prompt), "completion_tokens": done, "total_tokens": len(prompt) + done}


class Pieces:
    """Token ids as the text pieces clients see in log-probabilities (OpenAI's `token`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def legacy(self, pairs: list[tuple[int, TokenLogprob | None]], offset: int = 0) -> dict:
        """/v1/completions' logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, rec in pairs:
            piece = self(token)
            out["tokens"].append(piece)
            out["token_logprobs"].append(None if rec is None else rec.logprob)
            out["top_logprobs"].append(None if rec is None else {self(t): lp for t, lp in rec.top})
            out["text_offset"].append(offset)
            offset += len(piece)
        return out

    def chat(self, recs: list[TokenLogprob]) -> dict:
        """/v1/chat/completions' logprobs object: content = [{token, logprob, bytes, top_logprobs}]."""
        def entry(token: int, lp: float) -> dict:
            piece = self(token)
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}
        return {"content": [{**entry(r.token, r.logprob), "top_logprobs": [entry(t, lp) for t, lp in r.top]}
                            for r in recs], "refusal": None}


def _prometheus(m: dict) -> str:
    """The scheduler's metrics in Prometheus' text format (version 0.0.4)."""
    rows = [("queue_depth", "gauge", "requests waiting for a KV slot", m["queue_depth"]),
            ("slots", "gauge", "KV slots (sequences decoded together)", m["slots"]),
            ("slots_active", "gauge", "KV slots holding a running sequence", m["active_slots"]),
            ("tokens_per_second", "gauge", "tokens generated per second over the last 10 s", m["tokens_per_second"]),
            ("kv_used_tokens", "gauge", "KV cache positions held by running sequences", m["kv_used_tokens"]),
            ("kv_capacity_tokens", "gauge", "KV cache positions in all slots", m["kv_capacity_tokens"]),
            ("kv_used_bytes", "gauge", "bytes of KV cache held by running sequences", m["kv_used_bytes"]),
            ("prompt_tokens_total", "counter", "prompt tokens admitted", m["prompt_tokens"]),
            ("prompt_tokens_cached_total", "counter", "prompt tokens reused from a slot's cache",
             m["cached_prompt_tokens"]),
            ("prefix_cache_slots", "gauge", "KV slots parking finished prompts' prefixes", m["prefix_slots"]),
            ("prefix_cache_hits_total", "counter", "prompts that reused a parked prefix", m["prefix_cache_hits"]),
            ("prefix_cache_parked_total", "counter", "prefixes parked", m["prefix_parked"]),
            ("generated_tokens_total", "counter", "tokens generated", m["generated_tokens"]),
            ("steps_total", "counter", "batched decoder steps", m["steps"])]
    lines = []
    for name, kind, help, value in rows:
        lines += [f"# HELP lowbit_{name} {help}", f"# TYPE lowbit_{name} {kind}", f"lowbit_{name} {value}"]
    lines += ["# HELP lowbit_requests_total requests by outcome", "# TYPE lowbit_requests_total counter"]
    lines += [f'lowbit_requests_total{{outcome="{k}"}} {m[f"requests_{k}"]}' for k in ("completed", "cancelled", "failed")]
    return "\n".join(lines) + "\n"


def _finish(out: Completion) -> str:
    return "stop" if out.finish_reason == "stop" else "length"


def _reply(out: Completion, tool_list: list[dict]) -> tuple[str | None, list[dict], str]:
    """(content, tool_calls, finish_reason) of a chat choice: with tools offered, its calls parsed
    (a reply cut by max_tokens keeps "length", with the calls it completed)."""
    content, calls = tools.parse_calls(out.text, tool_list) if tool_list else (out.text, [])
    return content, calls, "tool_calls" if calls and out.finish_reason == "stop" else _finish(out)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {declared} bytes; this server takes at most {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body passes {limit} bytes, the most this server takes",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(session: Session, name: str, defaults: dict | None = None, max_queue: int = 64,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving `session` under the model id `name`; `defaults` are sampling values
    (temperature, top_k, ...) used when a request omits them; a body past `max_body_bytes` is refused."""
    defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
    SamplingParams(**defaults).check()
    worker = batching.Scheduler(session, max_queue)
    tokenizer = copy.deepcopy(session.tokenizer)  # the tokenizing thread's own: the scheduler decodes with the other
    pieces = Pieces(tokenizer)
    tokenizing = ThreadPoolExecutor(1, thread_name_prefix="lowbit-tokenize")  # one at a time: off the event loop
    max_chars = session.max_context * _longest_token(tokenizer)
    created = int(time.time())
    grammars = Grammars(tokenizer, session.stop_tokens)  # used on the tokenizing thread only
    template = tools.ChatTemplate(tokenizer) if getattr(tokenizer, "chat_template", None) else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()
        tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lowbit", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "lowbit", "max_model_len": session.max_context}]}

    @app.get("/health")
    async def health():
        m = worker.metrics()
        body = {"status": "ok" if worker.is_alive() else "stopped", "slots": m["slots"],
                "active_slots": m["active_slots"], "queue_depth": m["queue_depth"]}
        return JSONResponse(body, status_code=200 if worker.is_alive() else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(worker.metrics()), media_type="text/plain; version=0.0.4")

    def constrain(body: dict, chat: bool) -> tuple[list[dict], Grammar | None]:
        """On the tokenizing thread: the tools offered to the model (none for tool_choice "none") and
        the grammar its output must follow (a forced tool call or response_format), compiled once."""
        try:
            tool_list = tools.parse_tools(body, grammars) if chat else []
            choice = tools.parse_choice(body, tool_list)
            fmt = _response_format(body)
            if fmt is not None and choice not in (None, "none"):
                raise InvalidRequest("'response_format' with 'tools' is not supported: use one of them",
                                     "response_format")
            if choice not in (None, "none", "auto"):
                parallel = choice == "required" and _get(body, "parallel_tool_calls", (bool,), True,
                                                         want="true or false")
                return tool_list, tools.call_grammar(grammars, tool_list, choice, parallel)
            return ([] if choice == "none" else tool_list), None if fmt is None else grammars.json_schema(*fmt)
        except InvalidRequest as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None
        except LowbitError as e:  # the tokenizer cannot be used for grammars
            raise APIError(400, str(e), param="response_format", code="unsupported") from None

    def tokenize(chat: bool, what, tool_list: list[dict]) -> list[int]:
        """On the tokenizing thread: the chat template's rendering of `what` (messages) with the
        offered tools, or the text."""
        try:
            if not chat:
                return list(tokenizer(what).input_ids)
            return list(tokenizer(template.render(what, tool_list), add_special_tokens=False).input_ids)
        except Exception as e:  # the template rejected the messages
            raise APIError(400, f"cannot render the prompt: {str(e)[:200]}", param="messages") from None

    async def parse(request: Request, chat: bool) -> tuple[dict, list[int], int, list[dict], Grammar | None]:
        try:
            body = json.loads(await _read_body(request, max_body_bytes))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model != name:
            raise APIError(404, f"the model '{str(model)[:100]}' does not exist: this server serves '{name}'",
                           param="model", code="model_not_found")
        _unsupported(body, chat)
        param = "messages" if chat else "prompt"
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise APIError(400, "this model has no chat template: use /v1/completions",
                               param="messages", code="no_chat_template")
            what = _messages(body)
            _too_long(sum(len(m["content"]) for m in what), max_chars, "characters", session.max_context, param)
        else:
            what = _prompt(body, len(tokenizer))
            if isinstance(what, list):
                _too_long(len(what), session.max_context - 1, "tokens", session.max_context, param)
            else:
                _too_long(len(what), max_chars, "characters", session.max_context, param)
        loop = asyncio.get_running_loop()
        tool_list, grammar = await loop.run_in_executor(tokenizing, functools.partial(constrain, body, chat))
        prompt = what if not chat and isinstance(what, list) else \
            await loop.run_in_executor(tokenizing, functools.partial(tokenize, chat, what, tool_list))
        room = session.max_context - len(prompt)
        if not prompt or room < 1:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context holds "
                           f"{session.max_context}: shorten it", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
        given = next((n for n in names if body.get(n) is not None), names[-1])
        least = 0 if body.get("echo") is True else 1  # echo with 0 new tokens scores the prompt
        max_tokens = _get(body, given, (int,), None if chat else 16, lambda v: v >= least,
                          "a positive integer" if least else "a non-negative integer")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"the prompt ({len(prompt)} tokens) plus {given} ({max_tokens}) exceeds the "
                           f"context of {session.max_context} tokens", param=given, code="context_length_exceeded")
        return body, prompt, room if max_tokens is None else max_tokens, tool_list, grammar

    async def run(request: Request, chat: bool):
        body, prompt, max_tokens, tool_list, grammar = await parse(request, chat)
        stream = _get(body, "stream", (bool,), False, want="true or false")
        options = _get(body, "stream_options", (dict,), {}, want="an object")
        n, top, echo = _choices(body, chat, worker.slots)
        if echo and stream:
            raise APIError(400, "'echo' is supported without streaming only", param="echo", code="unsupported")
        try:
            sampling = _sampling(body, defaults).check()
        except LowbitError as e:
            raise APIError(400, str(e)) from None
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        cancel = threading.Event()

        def on_event(i: int, kind: str, value) -> None:  # on the scheduler's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (i, kind, value))
            except RuntimeError:  # the event loop is gone (server shutting down)
                cancel.set()

        req = batching.Request(prompt, max_tokens, sampling, _stop(body), n, top, echo, on_event, cancel, grammar)
        try:
            worker.submit(req)
        except batching.QueueFull as e:
            raise APIError(503, str(e), "server_error", code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except LowbitError as e:
            raise APIError(400, str(e), code="kv_budget_exceeded") from None
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": name}

        async def until_done():
            """The request's events until every choice is done; a disconnected client cancels it."""
            left, finished = n, False
            try:
                while left:
                    try:
                        i, kind, value = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                    if kind == "error":
                        finished = True
                        raise APIError(400, str(value)) if isinstance(value, LowbitError) else \
                            APIError(500, f"generation failed: {type(value).__name__}: {value}", "server_error")
                    left -= kind == "done"
                    yield i, kind, value
                finished = True
            finally:
                if not finished:
                    cancel.set()

        def logprobs(recs: list[TokenLogprob], offset: int) -> dict | None:
            if top is None:
                return None
            return pieces.chat(recs) if chat else pieces.legacy([(r.token, r) for r in recs], offset)

        if not stream:
            outs: dict[int, Completion] = {}
            async for i, kind, out in until_done():
                if kind == "done":
                    outs[i] = out
            if len(outs) < n:
                return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
            prefix = tokenizer.decode(prompt) if echo else ""
            choices = []
            for i in range(n):
                out = outs[i]
                content, calls, finish = _reply(out, tool_list)
                choice = {"index": i, "finish_reason": finish, "logprobs": logprobs(out.logprobs or [], len(prefix))}
                if echo and top is not None:
                    pairs = list(zip(prompt, out.prompt_logprobs)) + [(r.token, r) for r in out.logprobs or []]
                    choice["logprobs"] = pieces.legacy(pairs)
                choice.update({"message": {"role": "assistant", "content": content, **({"tool_calls": calls} if calls
                                                                                          else {})}} if chat
                              else {"text": prefix + out.text})
                choices.append(choice)
            return {**head, "choices": choices, "usage": _usage(prompt, list(outs.values()))}

        chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        offsets = [0] * n

        held = [[] for _ in range(n)]  # with tools offered: each choice's log-probabilities until it is done
        texts, sent = [""] * n, [0] * n  # with tools offered: each choice's text so far, and how much of it went out

        def chunk(i: int, text: str | None, finish: str | None, recs=(), role: bool = False, delta=None) -> dict:
            lp = logprobs(list(recs), offsets[i]) if recs else None
            offsets[i] += len(text or "")
            if chat:
                delta = delta or ({"role": "assistant", "content": ""} if role else {} if text is None
                                  else {"content": text})
                return {**chunk_head, "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": lp}]}
            return {**chunk_head, "choices": [{"index": i, "text": text or "", "finish_reason": finish, "logprobs": lp}]}

        def whole(i: int, out: Completion):
            """A choice that may hold tool calls, once done: its content, then each call as OpenAI streams
            one (a delta with id, type and name, then one with the arguments), then the finish."""
            content, calls, finish = _reply(out, tool_list)
            rest = tools.unsent(content, calls, texts[i][:sent[i]])
            if rest or held[i]:
                yield chunk(i, rest, None, held[i])
            for k, call in enumerate(calls):
                head = {**call, "index": k, "function": {"name": call["function"]["name"], "arguments": ""}}
                yield chunk(i, None, None, delta={"tool_calls": [head]})
                yield chunk(i, None, None, delta={"tool_calls": [{"index": k, "function": {
                    "arguments": call["function"]["arguments"]}}]})
            yield chunk(i, None, finish)

        async def sse():
            if chat:
                for i in range(n):
                    yield _sse(chunk(i, None, None, role=True))
            outs = []
            try:
                async for i, kind, value in until_done():
                    if kind == "text" and tool_list:  # text that cannot be part of a call goes out now
                        held[i] += value[1]
                        texts[i] += value[0]
                        upto = tools.streamable(texts[i])
                        if upto > sent[i]:
                            yield _sse(chunk(i, texts[i][sent[i]:upto], None))
                            sent[i] = upto
                    elif kind == "text":
                        yield _sse(chunk(i, value[0], None, value[1]))
                    else:
                        outs.append(value)
                        for c in whole(i, value) if tool_list else [chunk(i, None, _finish(value))]:
                            yield _sse(c)
                if options.get("include_usage") and len(outs) == n:
                    yield _sse({**chunk_head, "choices": [], "usage": _usage(prompt, outs)})
            except APIError as e:  # the stream has started: the error goes in-band
                yield _sse(e.body())
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    return app


class Running:
    """A uvicorn server on a thread of this process (tests, benchmarks, notebooks); `stop()` ends it."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = listen(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def listen(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise LowbitError(f"cannot listen on {host}:{port}: {e.strerror or e} (pick another --port)") from None


def serve(session: Session, name: str, host: str = "127.0.0.1", port: int = 8000, defaults: dict | None = None,
          max_queue: int = 64, log_level: str = "info", max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    app = create_app(session, name, defaults, max_queue, max_body_bytes)
    sock = listen(host, port)
    worker = app.state.worker
    spare = len(worker.prefix.lru)
    print(f"lowbit: serving '{name}' at http://{host}:{sock.getsockname()[1]}/v1 (context {session.max_context} "
          f"tokens, {worker.slots} parallel slots + {spare} prefix-cache slots, "
          f"{(worker.slots + spare) * worker.kv_bytes_per_slot / 2**20:.0f} MiB of KV cache); Ctrl-C stops",
          file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
