"""The server's continuous batching and its OpenAI surface, through the real `openai` client.

A tiny quantized llama on the native engine with 4 KV slots and fp32 activations (`exact`: a
batched step's GEMM and a lone step's GEMV then differ only in rounding), so concurrent clients must
get exactly the greedy completions of serial requests; logprobs and echo are checked against the
engine's own logits for the same tokens.
"""

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import lowbit
from lowbit.runtime.engine import load_decoder
from lowbit.runtime.sampling import SamplingParams
from lowbit.runtime.server import Running, create_app

openai = pytest.importorskip("openai")
NAME = "tiny-w4"
PROMPTS = ["The quick brown fox", "Once upon a time there was a", "A", "Numbers: one two three four five six",
           "The sea is", "Hello there, how are you doing today? I am"]


def _start(model, parallel=4, max_queue=64, **session):
    running = Running(create_app(model.session(max_context=256, parallel=parallel, exact=True, **session), NAME,
                                 max_queue=max_queue))
    running.model, running.scheduler = model, running.server.config.app.state.worker
    return running


class SlowSteps:
    """The real engine, each step 10 ms later: the tiny model's stream then lasts long enough to watch."""

    def __init__(self, engine):
        self.engine = engine

    def step(self, segments):
        time.sleep(0.01)
        return self.engine.step(segments)

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.fixture
def model(tiny_quantized_dir):
    return lowbit.load(tiny_quantized_dir)


@pytest.fixture
def server(model):
    running = _start(model)
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def _serial(model, prompt: str, max_tokens: int, **sampling):
    session = model.session(exact=True)
    return session.generate(session.encode(prompt), max_tokens, SamplingParams(**sampling))


def _get(server, path: str):
    with urllib.request.urlopen(server.url.removesuffix("/v1") + path, timeout=30) as r:
        return r.headers, r.read().decode()


def _metrics(server) -> dict:
    """The /metrics page parsed line by line (Prometheus text: HELP and TYPE before each sample)."""
    out, typed = {}, set()
    for line in _get(server, "/metrics")[1].splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert name.split("{")[0] in typed, f"{name} has no # TYPE line"
            out[name] = float(value)
    return out


def test_concurrent_clients_get_the_serial_greedy_completions(client, server):
    want = [_serial(server.model, p, 12).text for p in PROMPTS]
    got = [None] * len(PROMPTS)

    def one(i):
        if i % 2:
            got[i] = client.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=12, temperature=0).choices[0].text
        else:
            stream = client.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=12, temperature=0, stream=True)
            got[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    m = _metrics(server)
    assert m["lowbit_generated_tokens_total"] == 12 * len(PROMPTS)
    assert m["lowbit_steps_total"] < m["lowbit_generated_tokens_total"]  # several sequences per step
    assert m["lowbit_slots"] == 4 and m["lowbit_slots_active"] == 0 and m['lowbit_requests_total{outcome="completed"}'] == 6


def test_a_disconnecting_client_frees_its_slot(client, server):
    assert _serial(server.model, "Go on and on.", 200).finish_reason == "length"  # it would run all 200 tokens
    server.scheduler.engine = SlowSteps(server.scheduler.engine)
    with client.completions.with_streaming_response.create(
            model=NAME, prompt="Go on and on.", max_tokens=200, stream=True, temperature=0) as response:
        lines = response.iter_lines()  # held: a dropped generator closes the connection (a disconnect)
        assert next(lines).startswith("data:")
        assert _metrics(server)["lowbit_slots_active"] == 1
    deadline = time.time() + 20
    while _metrics(server)["lowbit_slots_active"] and time.time() < deadline:
        time.sleep(0.05)
    m = _metrics(server)
    assert m["lowbit_slots_active"] == 0 and m['lowbit_requests_total{outcome="cancelled"}'] == 1
    assert m["lowbit_generated_tokens_total"] < 200


def test_n_choices_seeded_and_greedy(client, server):
    kw = dict(model=NAME, prompt="Once upon a time", max_tokens=10, temperature=1.0, seed=5, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2] and 3 <= a.usage.completion_tokens <= 30
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1  # each choice draws on its own (seed + i)
    greedy = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                            temperature=0, n=2)
    session = server.model.session(exact=True)
    want = session.generate(session.chat_ids([{"role": "user", "content": "Hi"}]), 8).text
    assert [c.message.content for c in greedy.choices] == [want, want]


def _logprobs_of(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the engine's logits after each prefix of `ids` (one sequence, fp32 activations)."""
    eng = load_decoder(model.model, max_context=256)
    return torch.stack([torch.log_softmax(eng.forward([t]), -1) for t in ids])


def test_completion_logprobs_and_echo(client, server):
    tok = server.model.tokenizer
    prompt = "The quick brown fox jumps"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids = tok(prompt).input_ids
    gen = _serial(server.model, prompt, 6).tokens
    ref = _logprobs_of(server.model, ids + gen)
    assert len(lp.token_logprobs) == 6 and lp.tokens == [tok.decode([t]) for t in gen]
    for j, t in enumerate(gen):
        assert lp.token_logprobs[j] == pytest.approx(ref[len(ids) - 1 + j, t].item(), abs=1e-3)
        assert len(lp.top_logprobs[j]) == 3 and max(lp.top_logprobs[j].values()) == pytest.approx(lp.token_logprobs[j])
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    # echo with no new tokens: the prompt's own log-probabilities (lm-eval's loglikelihood request)
    e = client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    elp = e.choices[0].logprobs
    assert e.choices[0].text == prompt and elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert len(elp.token_logprobs) == len(ids) and e.usage.completion_tokens == 0
    want = [ref[j - 1, ids[j]].item() for j in range(1, len(ids))]
    assert elp.token_logprobs[1:] == pytest.approx(want, abs=1e-3)


def test_chat_logprobs(client, server):
    messages = [{"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(c.token for c in content) == r.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)
    assert all(c.bytes == list(c.token.encode()) for c in content)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, stream=True)
    streamed = [e.logprob for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([c.logprob for c in content])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=messages, max_tokens=2, top_logprobs=2)


def test_presence_and_frequency_penalties(client, server):
    plain = _serial(server.model, "Numbers: one two", 32, temperature=0).tokens
    for sign in (1, -1):  # against repeats, and for them
        kw = dict(temperature=0, presence_penalty=1.5 * sign, frequency_penalty=2.0 * sign)
        r = client.completions.create(model=NAME, prompt="Numbers: one two", max_tokens=32, **kw)
        want = _serial(server.model, "Numbers: one two", 32, **kw)
        assert r.choices[0].text == want.text
        assert (len(set(want.tokens)) > len(set(plain))) == (sign > 0)  # the penalties bite


def test_health_metrics_and_a_request_refused_before_any_work(client, server):
    headers, body = _get(server, "/health")
    assert json.loads(body) == {"status": "ok", "slots": 4, "active_slots": 0, "queue_depth": 0}
    assert _get(server, "/metrics")[0]["content-type"].startswith("text/plain")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="hello", max_tokens=4, n=5)
    assert e.value.body["code"] == "kv_budget_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="hello " * 10, max_tokens=250, n=2)  # beyond a slot's 256
    assert _metrics(server)["lowbit_prompt_tokens_total"] == 0  # nothing was admitted


def test_full_queue_is_a_503_with_retry_after(model):
    server = _start(model, parallel=1, max_queue=1)
    server.scheduler.engine = SlowSteps(server.scheduler.engine)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        with client.completions.with_streaming_response.create(
                model=NAME, prompt="Go on and on.", max_tokens=200, stream=True, temperature=0) as running:
            lines = running.iter_lines()  # held: a dropped generator closes the connection (a disconnect)
            next(lines)
            waiter = threading.Thread(target=lambda: client.completions.create(model=NAME, prompt="a", max_tokens=2))
            waiter.start()
            deadline = time.time() + 20
            while _metrics(server)["lowbit_queue_depth"] < 1 and time.time() < deadline:
                time.sleep(0.02)
            assert _metrics(server)["lowbit_slots_active"] == 1
            req = urllib.request.Request(server.url + "/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": NAME, "prompt": "b", "max_tokens": 2}).encode())
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30)
            assert e.value.code == 503 and e.value.headers["Retry-After"] == "1"
            assert json.loads(e.value.read())["error"]["code"] == "server_busy"
        waiter.join(60)  # the first stream's disconnect freed the slot for the waiting one
        assert not waiter.is_alive() and server.scheduler.counts["completed"] == 1
    finally:
        server.stop()


def test_shared_prefix_is_computed_once(client, server):
    system = "You are a helpful assistant who answers in one short sentence. " * 3
    first = client.completions.create(model=NAME, prompt=system + "Q: sky?", max_tokens=4, temperature=0)
    before = _metrics(server)["lowbit_prompt_tokens_cached_total"]
    second = client.completions.create(model=NAME, prompt=system + "Q: sea?", max_tokens=4, temperature=0)
    cached = _metrics(server)["lowbit_prompt_tokens_cached_total"] - before
    assert cached >= len(server.model.tokenizer(system).input_ids) - 1
    assert second.choices[0].text == _serial(server.model, system + "Q: sea?", 4).text
    assert first.choices[0].text == _serial(server.model, system + "Q: sky?", 4).text


def test_universal_decoder_serves_as_one_slot(model):
    server = _start(model, parallel=4, engine=False)
    try:
        assert server.scheduler.slots == 1
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        r = client.completions.create(model=NAME, prompt="The sea is", max_tokens=6, temperature=0, echo=True,
                                      logprobs=0)
        assert r.choices[0].text.startswith("The sea is") and r.choices[0].logprobs.token_logprobs[0] is None
    finally:
        server.stop()


class FailingStep(SlowSteps):
    """The real engine, but its next step raises (a fault the scheduler must survive)."""

    def step(self, segments):
        self.__dict__.setdefault("failed", 0)
        if not self.failed:
            self.failed = 1
            raise RuntimeError("injected fault")
        return self.engine.step(segments)


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(client, server):
    server.scheduler.engine = FailingStep(server.scheduler.engine)
    with pytest.raises(openai.InternalServerError, match="injected fault"):
        client.completions.create(model=NAME, prompt="The sea is", max_tokens=4, temperature=0)
    r = client.completions.create(model=NAME, prompt="The sea is", max_tokens=4, temperature=0)
    assert r.choices[0].text == _serial(server.model, "The sea is", 4).text
    assert json.loads(_get(server, "/health")[1])["status"] == "ok"
    assert _metrics(server)['lowbit_requests_total{outcome="failed"}'] == 1
