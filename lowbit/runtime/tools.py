"""Tool (function) calling for /v1/chat/completions: OpenAI's `tools` and `tool_choice` in, the
model's chat template renders them, its reply is parsed back into `tool_calls`.

Rendering. A template that takes tools (Qwen2.5/3, Llama 3.1+, Mistral, SmolLM3, Hermes ...) gets
them through `apply_chat_template(messages, tools=...)`, with the history's assistant `tool_calls`
(arguments as objects, the transformers convention) and `tool` messages passed as they are. Whether it
takes them is found by rendering a probe conversation with and without a tool: a template that
renders both the same ignores tools (SmolLM2's ChatML does). Such a template gets the fallback, the
Hermes format that Qwen2.5's template writes (the most widely trained one): the tools' signatures as
JSON lines inside <tools></tools> in the system message, with the instruction to answer a call as
  <tool_call>
  {"name": <function-name>, "arguments": <args-json-object>}
  </tool_call>
earlier assistant calls written back in that form, and tool results as user turns inside
<tool_response></tool_response>.

Choice. "none": the tools are not rendered and nothing is parsed (the model cannot be tempted into a
call nobody reads). "auto": free generation, then parsing. "required" or a named function: the
output is constrained (runtime/constrained.py) to one <tool_call> block per call whose JSON is
{"name": one of the allowed names, "arguments": an object valid under that function's `parameters`
schema}; a named function gets one call, "required" one or more (one block per line) unless
`parallel_tool_calls` is false.

Parsing. Every complete <tool_call>{...}</tool_call> block naming a given tool becomes a call (the
Hermes form); so does a whole reply that is one JSON object {"name", "arguments" | "parameters"}
naming a given tool (the Llama 3.1 form). The text around the calls stays `content`; a block cut
short by max_tokens is not a call (it stays in `content`, and the finish reason stays "length").

Streaming under "auto" (`streamable`): text is sent as it comes while it cannot be part of a call:
up to the first "<tool_call>" (or a tail that may be its start), never trailing whitespace (content
around calls is stripped), and nothing of a reply that starts with "{" (it may be a whole-reply call).
The rest waits until the reply is done and parsed.
"""

from __future__ import annotations

import json
import re
import uuid

from .constrained import Grammar, Grammars, InvalidRequest, with_whitespace

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
NO_PARAMETERS = {"type": "object", "properties": {}}
OPEN = "<tool_call>"
PROBE = [{"role": "user", "content": "x"}]
PROBE_TOOL = {"type": "function", "function": {"name": "probe", "description": "p", "parameters": NO_PARAMETERS}}
FALLBACK = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
            "with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each "
            "function call, return a json object with function name and arguments within <tool_call></tool_call> "
            "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")


def parse_tools(body: dict, grammars: Grammars) -> list[dict]:
    """The request's tools, each {"type": "function", "function": {name, description?, parameters}}
    with its parameters schema checked to compile; a bad one is an InvalidRequest naming it."""
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list) or len(tools) > 128:
        raise InvalidRequest("'tools' must be a list of at most 128 function tools", "tools")
    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise InvalidRequest(f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}", where)
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise InvalidRequest(f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-', "
                                 f"got {json.dumps(name)[:80]}", f"{where}.function.name")
        if name in names:
            raise InvalidRequest(f"'{where}.function.name': '{name}' is defined twice", f"{where}.function.name")
        names.add(name)
        if not isinstance(fn.get("description", ""), str):
            raise InvalidRequest(f"'{where}.function.description' must be a string", f"{where}.function.description")
        parameters = fn.get("parameters", NO_PARAMETERS)
        grammars.check_schema(parameters, f"{where}.function.parameters")
        out.append({"type": "function", "function": {"name": name, "description": fn.get("description", ""),
                                                     "parameters": parameters}})
    return out


def parse_choice(body: dict, tools: list[dict]) -> str | None:
    """"none", "auto", "required" or the one function's name; None without tools."""
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequest("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and \
        choice.get("type") == "function" and isinstance(choice.get("function"), dict) else None
    if name not in {t["function"]["name"] for t in tools}:
        raise InvalidRequest("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                             "\"function\": {\"name\": <one of the tools>}}", "tool_choice")
    return name


def call_grammar(grammars: Grammars, tools: list[dict], choice: str, parallel: bool) -> Grammar:
    """One <tool_call> block (or several, with `parallel`) per call of the allowed tools."""
    allowed = [t["function"] for t in tools if choice == "required" or t["function"]["name"] == choice]
    schema = with_whitespace({"anyOf": [
        {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
         "required": ["name", "arguments"], "additionalProperties": False} for f in allowed]})
    more = ' ("\\n" call)*' if parallel else ""
    return grammars.lark(f'start: call{more}\ncall: "<tool_call>\\n" %json {json.dumps(schema)} "\\n</tool_call>"\n',
                         "tools")


class ChatTemplate:
    """Renders a conversation with tools and tool messages through one tokenizer's chat template."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        try:
            self.native = self._render(PROBE, [PROBE_TOOL]) != self._render(PROBE, None)
        except Exception:  # noqa: BLE001 - a template that fails on tools does not take them
            self.native = False

    def _render(self, messages: list[dict], tools: list[dict] | None) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)

    def render(self, messages: list[dict], tools: list[dict]) -> str:
        """The prompt text; a conversation without tools and tool messages renders as it always has."""
        if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            return self._render(messages, None)
        if self.native:
            return self._render([_native(m) for m in messages], tools or None)
        return self._render(_fallback(messages, tools), None)


def _arguments(text: str):
    """A call's arguments as the object a template expects (text that is not a JSON object stays text)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, dict) else text


def _native(m: dict) -> dict:
    if not m.get("tool_calls"):
        return m
    calls = [{"type": "function", "function": {"name": c["function"]["name"],
                                               "arguments": _arguments(c["function"]["arguments"])}}
             for c in m["tool_calls"]]
    return {**m, "tool_calls": calls}


def _fallback(messages: list[dict], tools: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = [json.dumps({"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])})
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join([m["content"]] * bool(m["content"]) +
                                                                 [f"<tool_call>\n{c}\n</tool_call>" for c in calls])})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        block = FALLBACK.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def parse_calls(text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) from a reply: the calls of the module docstring, OpenAI-shaped
    ({id, type: "function", function: {name, arguments: JSON text}}), and the text around them."""
    names = {t["function"]["name"] for t in tools}

    def call(raw: str) -> dict | None:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            return None
        args = value.get("arguments", value.get("parameters")) if isinstance(value, dict) else None
        if isinstance(args, str):
            args = _arguments(args)
        if not isinstance(value, dict) or value.get("name") not in names or not isinstance(args, dict):
            return None
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": value["name"], "arguments": json.dumps(args)}}

    calls, rest, last = [], [], 0
    for match in CALL.finditer(text):
        found = call(match.group(1))
        if found is not None:
            calls.append(found)
            rest.append(text[last:match.start()])
            last = match.end()
    rest.append(text[last:])
    if not calls and (whole := call(text.strip())) is not None:
        return None, [whole]
    content = "".join(rest).strip()
    return (content or None) if calls else text, calls


def streamable(text: str) -> int:
    """How many characters of a reply so far can be streamed before it is parsed (module docstring)."""
    if text.lstrip().startswith("{"):
        return 0
    end = text.find(OPEN)
    if end < 0:
        end = next((len(text) - k for k in range(min(len(OPEN) - 1, len(text)), 0, -1) if text.endswith(OPEN[:k])),
                   len(text))
    cut = len(text[:end].rstrip())
    return cut if text[:cut].strip() else 0


def unsent(content: str | None, calls: list, sent: str) -> str:
    """The content still to stream after `sent` (a `streamable` prefix of the reply's text): with calls,
    content is stripped, so the part after the sent text without its leading whitespace."""
    content, done = content or "", sent.lstrip() if calls else sent
    same = next((i for i, (a, b) in enumerate(zip(content, done)) if a != b), min(len(content), len(done)))
    return content[same:]  # all of `done` by construction (streamable's prefix lies before every call)
