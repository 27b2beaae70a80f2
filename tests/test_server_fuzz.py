"""Fuzzing (hypothesis) of the batched server's OpenAI surface: n, logprobs, top_logprobs, echo, stream,
max_tokens 0 and penalties in any combination get a 200 with every choice, or a 4xx with OpenAI's
error JSON; afterwards no slot is held and the server answers /health."""

import json
import urllib.error
import urllib.request

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lowbit  # noqa: E402
from lowbit.runtime.server import Running, create_app  # noqa: E402

NAME = "tiny-w4"
VALUES = {"n": st.sampled_from([1, 2, 3, 0, -1, True, "2", None]),
          "logprobs": st.sampled_from([0, 1, 5, 20, 21, -1, True, False, None]),
          "top_logprobs": st.sampled_from([0, 2, 20, 21, None, "x"]),
          "echo": st.sampled_from([True, False, None, 1]),
          "stream": st.booleans(),
          "max_tokens": st.sampled_from([0, 1, 3, 300, None]),
          "presence_penalty": st.sampled_from([0.0, 1.5, -2.0, 3.0]),
          "frequency_penalty": st.sampled_from([0.0, 2.0, -2.5]),
          "temperature": st.sampled_from([0, 0.8]),
          "seed": st.sampled_from([None, 0, 7])}
bodies = st.fixed_dictionaries({}, optional=VALUES)


@pytest.fixture
def server(tiny_quantized_dir):
    model = lowbit.load(tiny_quantized_dir)
    running = Running(create_app(model.session(max_context=128, parallel=2, prefix_cache=1), NAME))
    yield running
    running.stop()


def post(url: str, body: dict, chat: bool) -> tuple[int, str]:
    req = urllib.request.Request(url + ("/chat/completions" if chat else "/completions"),
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, chat=st.booleans())
def test_openai_options_in_any_combination(server, body, chat):
    payload = {"model": NAME, **({"messages": [{"role": "user", "content": "Hi there"}]} if chat
                                else {"prompt": "Once upon a time"}), **{k: v for k, v in body.items() if v is not None}}
    status, answer = post(server.url, payload, chat)
    assert status in (200, 400), (status, answer)
    if status == 400:
        err = json.loads(answer)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"]
    elif payload.get("stream"):
        events = [json.loads(line[6:]) for line in answer.splitlines() if line.startswith("data: {")]
        assert answer.rstrip().endswith("data: [DONE]") and not any("error" in e for e in events)
        finished = {c["index"] for e in events for c in e.get("choices", []) if c["finish_reason"]}
        assert finished == set(range(payload.get("n", 1)))
    else:
        choices = json.loads(answer)["choices"]
        assert [c["index"] for c in choices] == list(range(payload.get("n", 1)))
        if payload.get("logprobs") not in (None, False) and not (chat and payload.get("logprobs") is not True):
            assert all(c["logprobs"] is not None for c in choices)
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health", timeout=30) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["active_slots"] == 0 and health["queue_depth"] == 0
