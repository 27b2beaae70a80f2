"""Fuzzing (hypothesis) of the batched server's OpenAI surface: n, logprobs, top_logprobs, echo, stream,
max_tokens 0 and penalties in any combination, and response_format / tools / tool_choice bodies (valid,
invalid schemas, broken tool definitions), get a 200 with every choice, or a 4xx with OpenAI's error
JSON; afterwards no slot is held and the server answers /health."""

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


def exchange(server, body: dict, chat: bool) -> tuple[dict, list[dict]]:
    """Post `body` with a prompt or one user message: a 400 must carry OpenAI's error JSON naming the
    parameter, a 200 every choice (streamed: each one finished, no in-band error); afterwards no slot is
    held. (the payload sent, the non-streamed 200's choices or [])."""
    payload = {"model": NAME, **({"messages": [{"role": "user", "content": "Hi there"}]} if chat
                                else {"prompt": "Once upon a time"}), **{k: v for k, v in body.items() if v is not None}}
    status, answer = post(server.url, payload, chat)
    assert status in (200, 400), (status, answer)
    choices = []
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
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health", timeout=30) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["active_slots"] == 0 and health["queue_depth"] == 0
    return payload, choices


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, chat=st.booleans())
def test_openai_options_in_any_combination(server, body, chat):
    payload, choices = exchange(server, body, chat)
    if choices and payload.get("logprobs") not in (None, False) and not (chat and payload.get("logprobs") is not True):
        assert all(c["logprobs"] is not None for c in choices)


SCHEMAS = [{"type": "object"}, {"type": "integer", "minimum": 3}, {"enum": ["a", "b"]}, {"type": "nope"},
           {"$ref": "#/nowhere"}, {"type": "object", "properties": {"x": {"type": "string", "maxLength": 3}},
                                   "required": ["x"]}, [], "string", {"anyOf": []}, {"minimum": "0"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer"}}, "required": ["a"]}}}
FORMATS = st.one_of(st.sampled_from([None, {"type": "text"}, {"type": "json_object"}, {"type": "xml"}, "json", 1,
                                     {"type": "json_schema"}, {"type": "json_schema", "json_schema": []}]),
                    st.builds(lambda schema, name: {"type": "json_schema",
                                                    "json_schema": {"name": name, "schema": schema}},
                              st.sampled_from(SCHEMAS), st.sampled_from(["answer", "", "a b", 5])))
TOOLS = st.one_of(st.sampled_from([None, [], "f", [TOOL], [TOOL, TOOL], [{"type": "function"}], [{"type": "code"}],
                                   [{"type": "function", "function": {"name": "g" * 65}}]]),
                  st.builds(lambda p, name: [{"type": "function", "function": {"name": name, "parameters": p}}],
                            st.sampled_from(SCHEMAS), st.sampled_from(["g", "bad name", None])))
CHOICES = st.sampled_from([None, "auto", "none", "required", "maybe", 3, {"type": "function"},
                           {"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "h"}}])
constrained = st.fixed_dictionaries({}, optional={"response_format": FORMATS, "tools": TOOLS, "tool_choice": CHOICES,
                                                  "parallel_tool_calls": st.sampled_from([True, False, "no"]),
                                                  "n": st.sampled_from([1, 2]), "stream": st.booleans(),
                                                  "max_tokens": st.sampled_from([1, 8]),
                                                  "temperature": st.sampled_from([0, 1.0])})


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=constrained, chat=st.booleans())
def test_response_format_and_tools_in_any_combination(server, body, chat):
    """Any response_format / tools / tool_choice body: a 200 whose choices all finish (tool calls parsed
    where tools are offered), or a 400 naming the parameter; never a 500, and no slot is left held."""
    for c in exchange(server, body, chat)[1]:
        calls = c.get("message", {}).get("tool_calls") or []
        assert (c["finish_reason"] == "tool_calls") == bool(calls) or c["finish_reason"] == "length"
        assert all(json.loads(call["function"]["arguments"]) is not None for call in calls)
