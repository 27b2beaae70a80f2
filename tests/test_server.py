"""The OpenAI-compatible server, driven by the real `openai` client over loopback (tiny quantized model)."""

import importlib.util
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import lowbit
from lowbit.runtime.server import Running, create_app

openai = pytest.importorskip("openai")
NAME = "tiny-w4"


@pytest.fixture
def server(tiny_quantized_dir):
    model = lowbit.load(tiny_quantized_dir)
    app = create_app(model.session(max_context=256, parallel=4), NAME)
    running = Running(app)
    running.model, running.app = model, app
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def _reference(model, prompt_ids, max_tokens, **kw):
    return model.session().generate(prompt_ids, max_tokens, **kw)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion_stream_and_not(client, server):
    r = client.completions.create(model=NAME, prompt="The quick brown fox", max_tokens=12, temperature=0)
    tok = server.model.tokenizer
    ref = _reference(server.model, tok("The quick brown fox").input_ids, 12)
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.stats.prompt_tokens, 12)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    chunks = list(client.completions.create(model=NAME, prompt="The quick brown fox", max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-2].choices[0].finish_reason == "length"


def test_chat_stream_and_not(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    prompt = server.model.session().chat_ids(messages)
    ref = _reference(server.model, prompt, 10)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == ref.text


def test_sampling_parameters_and_stop(client):
    kw = dict(model=NAME, prompt="Once upon a time", max_tokens=16, temperature=0.9, top_p=0.9, seed=3,
              extra_body={"top_k": 30, "min_p": 0.02, "repetition_penalty": 1.2})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text  # seeded
    full = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[5:8]
    cut = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kw,param,code", [
    (dict(model="gpt-4"), "model", "model_not_found"),
    (dict(prompt="word " * 300), "prompt", "context_length_exceeded"),
    (dict(max_tokens=10_000), "max_tokens", "context_length_exceeded"),
    (dict(temperature=-1), "temperature", "invalid_value"),
    (dict(top_p=0), "top_p", "invalid_value"),
    (dict(max_tokens=0), "max_tokens", "invalid_value"),
    (dict(n=5), "n", "kv_budget_exceeded"),  # 4 slots
    (dict(logprobs=21), "logprobs", "invalid_value"),
    (dict(echo=True, stream=True), "echo", "unsupported"),
    (dict(extra_body={"tools": [{"type": "function", "function": {"name": "f"}}]}), "tools", "unsupported"),
    (dict(extra_body={"top_k": "many"}), "top_k", "invalid_value"),
    (dict(stop=[1, 2]), "stop", "invalid_value"),
])
def test_bad_requests_get_openai_errors(client, kw, param, code):
    args = {"model": NAME, "prompt": "hello", "max_tokens": 4, **kw}
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**args)
    assert e.value.status_code == (404 if code == "model_not_found" else 400)
    err = e.value.body
    assert (err["param"], err["code"]) == (param, code) and err["message"] and err["type"]


def _raw(server, path, data: bytes | None):
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_malformed_json_and_unknown_routes(server):
    status, body = _raw(server, "/chat/completions", b'{"model": "tiny-w4", "messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = _raw(server, "/chat/completions", json.dumps({"model": NAME, "messages": "hi"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = _raw(server, "/nothing", None)
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def test_disconnect_cancels_generation(client, server):
    prompt = "Go on and on."
    ids = server.model.tokenizer(prompt).input_ids
    assert _reference(server.model, ids, 200).finish_reason == "length"  # it would run all 200 tokens
    counts = server.app.state.worker.counts
    before = dict(counts)
    with client.completions.with_streaming_response.create(
            model=NAME, prompt=prompt, max_tokens=200, stream=True, temperature=0) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data:")
    deadline = time.time() + 20
    while counts["cancelled"] == before["cancelled"] and time.time() < deadline:
        time.sleep(0.05)
    assert counts["cancelled"] == before["cancelled"] + 1 and counts["completed"] == before["completed"]
    assert client.completions.create(model=NAME, prompt="still alive?", max_tokens=3).usage.completion_tokens == 3


def _load_module():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_32_concurrent_streaming_clients(server):
    r = _load_module().run_load(server.url, NAME, clients=32, max_tokens=16, timeout=120, prompt_words=12)
    print(json.dumps({k: v for k, v in r.items() if k != "errors"}))
    assert r["completed"] == 32 and r["failed"] == 0, r["errors"]
    assert r["latency_p99_s"] >= r["latency_p50_s"] > 0
    assert server.app.state.worker.counts["failed"] == 0


def test_port_in_use_is_a_clear_error(server):
    from lowbit.errors import LowbitError
    from lowbit.runtime.server import listen

    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(LowbitError, match=f"cannot listen on 127.0.0.1:{port}"):
        listen("127.0.0.1", port)


@pytest.mark.parametrize("seed", [2**64, 2**63, -1, "7", 1.5])
def test_bad_seed_is_a_400(client, seed):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=NAME, prompt="hello", max_tokens=2, seed=seed) if isinstance(seed, int) \
            else client.completions.create(model=NAME, prompt="hello", max_tokens=2, extra_body={"seed": seed})
    assert e.value.status_code == 400 and (e.value.body["param"], e.value.body["code"]) == ("seed", "invalid_value")


@pytest.fixture
def small_server(tiny_quantized_dir):
    """A server that takes bodies of at most 4 kB and tokenizes slowly (0.3 s per prompt)."""
    model = lowbit.load(tiny_quantized_dir)
    session = model.session(max_context=256)
    session.tokenizer = SlowTokenizer(session.tokenizer)
    running = Running(create_app(session, NAME, max_body_bytes=4096))
    running.vocab = model.tokenizer.get_vocab()
    yield running
    running.stop()


class SlowTokenizer:
    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *a, **kw):
        time.sleep(0.3)
        return self.inner(*a, **kw)

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):  # not for "inner" itself: deepcopy looks it up before setting it
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def test_body_over_the_limit_is_a_413(small_server):
    body = json.dumps({"model": NAME, "prompt": "x" * 5000}).encode()
    status, err = _raw(small_server, "/completions", body)
    assert status == 413 and err["error"]["code"] == "request_too_large" and err["error"]["type"]
    # chunked, no Content-Length: refused as the limit is passed
    import http.client

    host, port = small_server.url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=iter([body[:3000], body[3000:]]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()
    status, ok = _raw(small_server, "/completions", json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 2}).encode())
    assert status == 200 and ok["choices"][0]["text"] is not None


def test_prompt_longer_than_the_context_is_refused_before_tokenizing(small_server):
    chars = 256 * (max(len(t) for t in small_server.vocab) + 1) + 1
    assert chars < 4096  # inside the body limit: the length bound refuses it, not the size
    t = time.time()
    status, err = _raw(small_server, "/completions", json.dumps({"model": NAME, "prompt": "y" * chars}).encode())
    assert status == 400 and err["error"]["code"] == "context_length_exceeded" and "characters" in err["error"]["message"]
    assert time.time() - t < 0.3  # the slow tokenizer never ran
    status, err = _raw(small_server, "/completions", json.dumps({"model": NAME, "prompt": [1] * 300}).encode())
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"


def test_models_answers_while_prompts_are_tokenized(small_server):
    """Tokenizing runs off the event loop: /v1/models answers at once while prompts are tokenized."""
    import threading

    posts = [threading.Thread(target=_raw, args=(small_server, "/completions",
                                                 json.dumps({"model": NAME, "prompt": "hello " * 100,
                                                             "max_tokens": 1}).encode())) for _ in range(6)]
    for p in posts:
        p.start()
    time.sleep(0.2)
    t = time.time()
    with urllib.request.urlopen(small_server.url + "/models", timeout=30) as r:
        assert r.status == 200
    assert time.time() - t < 0.5, f"/v1/models took {time.time() - t:.2f} s behind 6 × 0.3 s of tokenizing"
    for p in posts:
        p.join()
