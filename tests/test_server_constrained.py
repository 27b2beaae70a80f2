"""Constrained decoding and tool calls through the real `openai` client, on the real model: the
embedded SmolLM2-135M-Instruct quantized W4A16-g32, served with 4 slots on the engine's exact path
(fp32 activations: a batched step and a lone one differ only in rounding, so greedy outputs match).

response_format json_object / json_schema output must parse and validate (jsonschema), streamed, with
n choices, beside an unconstrained request in the same batch; tool_choice "required" or a named
function must give tool_calls whose arguments validate against the function's parameters; invalid
schemas and tool definitions are 400s naming the parameter.
"""

import json
import threading
import time
import urllib.request

import numpy as np
import pytest

import lowbit
from lowbit.runtime import tools
from lowbit.runtime.constrained import Grammars
from lowbit.runtime.server import Running, create_app

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.slow
NAME = "smollm2-w4"
CAT = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
       "required": ["name", "age"], "additionalProperties": False}
ASK_CAT = [{"role": "user", "content": "Describe a cat as JSON with its name and age."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The local time in a time zone",
                                         "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                                        "required": ["zone"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def model(smollm_w4_dir):
    return lowbit.load(smollm_w4_dir)


@pytest.fixture(scope="module")
def server(model):
    running = Running(create_app(model.session(max_context=1024, parallel=4, exact=True), NAME))
    running.scheduler = running.server.config.app.state.worker
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=300)


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def test_json_object_parses(client):
    ask = [{"role": "user", "content": 'Return a JSON object with keys "city" and "country" for Paris.'}]
    r = client.chat.completions.create(model=NAME, messages=ask, max_tokens=120, temperature=0,
                                       response_format={"type": "json_object"})
    choice = r.choices[0]
    assert choice.finish_reason == "stop"  # the grammar ended the object: no step spent on EOS
    assert isinstance(json.loads(choice.message.content), dict)


def test_json_schema_validates_streamed_and_not(client):
    kw = dict(model=NAME, messages=ASK_CAT, max_tokens=120, temperature=0, response_format=_schema_format(CAT))
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), CAT)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_each_follow_the_schema(client):
    r = client.chat.completions.create(model=NAME, messages=ASK_CAT, max_tokens=120, temperature=0.9, seed=5, n=2,
                                       response_format=_schema_format(CAT))
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), CAT)


def test_completions_take_response_format_too(client):
    colours = {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 3, "maxItems": 3}
    r = client.completions.create(model=NAME, prompt="A list of three colours in JSON:", max_tokens=60, temperature=0,
                                  extra_body={"response_format": _schema_format(colours)})
    assert r.choices[0].finish_reason == "stop" and len(json.loads(r.choices[0].text)) == 3


def _steps(server) -> int:
    return server.scheduler.metrics()["steps"]


def test_constrained_and_free_requests_share_a_batch(client, server):
    """Both complete correctly in the same steps: the free one exactly as when it runs alone."""
    free = dict(model=NAME, messages=[{"role": "user", "content": "Tell me about the sea."}], max_tokens=40,
                temperature=0)
    alone = client.chat.completions.create(**free).choices[0].message.content
    results, before = {}, _steps(server)

    def ask(key, **kw):
        results[key] = client.chat.completions.create(**kw)

    threads = [threading.Thread(target=ask, args=("free",), kwargs=free),
               threading.Thread(target=ask, args=("json",), kwargs=dict(
                   model=NAME, messages=ASK_CAT, max_tokens=40, temperature=0, response_format=_schema_format(CAT)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps = _steps(server) - before
    generated = sum(r.usage.completion_tokens for r in results.values())
    assert steps < generated  # they shared steps
    assert results["free"].choices[0].message.content == alone
    jsonschema.validate(json.loads(results["json"].choices[0].message.content), CAT)


def _validate_calls(calls, allowed):
    assert calls
    for call in calls:
        fn = allowed[call.function.name]
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), fn["function"]["parameters"])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_validate(client, choice):
    r = client.chat.completions.create(model=NAME, messages=ASK_WEATHER, max_tokens=150, temperature=0,
                                       tools=[TIME, WEATHER], tool_choice=choice, parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
    _validate_calls(c.message.tool_calls, {"get_weather": WEATHER, "get_time": TIME})
    if isinstance(choice, dict):
        assert c.message.tool_calls[0].function.name == "get_weather"


def test_tool_calls_stream_as_openai_does(client):
    kw = dict(model=NAME, messages=ASK_WEATHER, max_tokens=150, temperature=0, tools=[WEATHER],
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    chunks = list(client.chat.completions.create(**kw, stream=True))
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            got = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
            got["arguments"] += d.function.arguments or ""
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == json.loads(whole.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_streams_text_and_ends_as_the_whole_reply(client):
    """tool_choice "auto": text streams as it comes (up to where a call could begin); content and calls
    put together from the chunks are the non-streamed reply's."""
    for ask in (ASK_WEATHER, [{"role": "user", "content": "Say hello in one short sentence."}]):
        kw = dict(model=NAME, messages=ask, max_tokens=60, temperature=0, tools=[WEATHER, TIME])
        whole = client.chat.completions.create(**kw).choices[0]
        text, names = "", []
        for c in client.chat.completions.create(**kw, stream=True):
            delta = c.choices[0].delta if c.choices else None
            text += (delta.content or "") if delta else ""
            names += [d.function.name for d in (delta.tool_calls or []) if d.function.name] if delta else []
        assert text == (whole.message.content or "")
        assert names == [t.function.name for t in whole.message.tool_calls or []]


def test_a_conversation_with_tool_results_goes_on(client):
    history = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    r = client.chat.completions.create(model=NAME, messages=history, max_tokens=30, temperature=0, tools=[WEATHER])
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(model=NAME, messages=history, max_tokens=30, temperature=0, tools=[WEATHER],
                                          tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


def test_the_fallback_template_renders_tools_and_history(model):
    """SmolLM2's ChatML ignores `tools`: the Hermes-format fallback writes them into the system prompt."""
    template = tools.ChatTemplate(model.tokenizer)
    assert not template.native
    history = ASK_WEATHER + [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                          "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "21 C"}]
    text = template.render(history, [WEATHER])
    assert text.count("<|im_start|>system") == 1 and json.dumps(WEATHER) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n21 C\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert template.render(ASK_WEATHER, []) == model.tokenizer.apply_chat_template(
        ASK_WEATHER, tokenize=False, add_generation_prompt=True)  # no tools: the prompt as before


def test_parse_calls():
    two = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n' \
          '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}</tool_call>'
    content, calls = tools.parse_calls("Checking. " + two, [WEATHER, TIME])
    assert content == "Checking." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"zone": "CET"}
    assert tools.parse_calls('{"name": "get_time", "parameters": {"zone": "UTC"}}', [TIME])[1][0]["function"][
        "arguments"] == '{"zone": "UTC"}'  # the Llama 3.1 form
    for text in ('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',  # not an offered tool
                 '<tool_call>\n{"name": "get_weather", "argu',  # cut short by max_tokens
                 "The weather is fine."):
        assert tools.parse_calls(text, [WEATHER]) == (text, [])


@pytest.mark.parametrize("text,now", [("Sure, one moment. ", "Sure, one moment."), ("Hi <tool", "Hi"),
                                      ("Hi\n<tool_call>{\"name\"", "Hi"), (' {"name": "get_time"', ""),
                                      ("\n\n", ""), ("a < b", "a < b")])
def test_what_streams_before_a_reply_is_parsed(text, now):
    assert text[:tools.streamable(text)] == now


def test_the_rest_after_streaming_completes_the_parsed_content():
    call = '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
    for reply in ("Let me check. " + call + " Done.", "\nJust text, no call.", call):
        content, calls = tools.parse_calls(reply, [TIME])
        for cut in range(len(reply) + 1):
            sent = reply[:tools.streamable(reply[:cut])]
            streamed = sent + tools.unsent(content, calls, sent)
            assert streamed == (content or "") or (calls and streamed.lstrip() == content), (reply, cut)


@pytest.mark.parametrize("kw,param", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
     "response_format.json_schema.schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/missing"}}}),
     "response_format.json_schema.schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}),
     "response_format.json_schema.schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": CAT}}), "response_format.json_schema.name"),
    (dict(response_format={"type": "xml"}), "response_format"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": "zero"}}}}}]), "tools[0].function.parameters"),
    (dict(tools=[WEATHER, {"type": "function", "function": {"name": "bad name!"}}]), "tools[1].function.name"),
    (dict(tools=[WEATHER, WEATHER]), "tools[1].function.name"),
    (dict(tools=[{"type": "retrieval"}]), "tools[0]"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "response_format"),
])
def test_invalid_schemas_and_tools_are_400s(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=ASK_WEATHER, max_tokens=5, **kw)
    err = e.value.body
    assert err["param"] == param and "\n" not in err["message"] and err["message"]


def test_mask_cost_per_token(model, client):
    """The grammar's share of a constrained step (mask, masking, advance), in thread CPU time; printed for
    BENCHMARKS.md. Bounded loosely here: a step of the 135M model itself costs several milliseconds."""
    r = client.chat.completions.create(model=NAME, messages=ASK_CAT, max_tokens=120, temperature=0,
                                       response_format=_schema_format(CAT))
    ids = model.tokenizer(r.choices[0].message.content, add_special_tokens=False).input_ids
    grammars = Grammars(model.tokenizer, model.session().stop_tokens)
    matcher = grammars.json_schema(CAT, "schema").matcher()
    vocab = model.model.config.vocab_size
    spent = 0.0
    for token in ids:  # the reply's own tokens: the path the server's matcher took
        t = time.thread_time()
        allowed = matcher.allowed(vocab)
        np.putmask(np.zeros(vocab, np.float32), ~allowed, -np.inf)  # what sampling does with it
        assert allowed[token]
        matcher.advance(token)
        spent += time.thread_time() - t
    assert matcher.m.is_accepting()
    per_token_ms = spent / len(ids) * 1e3
    print(f"\nconstrained decoding: {per_token_ms:.3f} ms/token of grammar work over {len(ids)} tokens")
    assert per_token_ms < 2.0
