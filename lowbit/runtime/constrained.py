"""Constrained decoding: the next token is drawn only from those that keep the output inside a grammar
(a JSON schema, "any JSON object", or a tool call), so `response_format` and forced tool calls come out
parseable by construction, not by hope.

The grammar engine is llguidance (guidance-ai; what vLLM, SGLang and llama.cpp use for structured
output). Chosen on evidence in this environment: it installs as one abi3 CPU wheel with no
dependencies (xgrammar 0.2.x pulls triton and apache-tvm-ffi and requires torch; outlines-core
compiles a schema to a regex DFA over the whole vocabulary up front, which is slow for nested schemas
and cannot express recursion), it takes a Hugging Face fast tokenizer directly (llguidance.hf), its
JSON-schema compiler covers $ref/anyOf/recursion, and it computes a token mask lazily from an Earley
parser over a token trie (tens of microseconds per step for JSON on a 49k vocabulary: no precompiled
automaton per schema, so compiling a request's schema costs milliseconds).

Per request the grammar is compiled once (Grammars.compile: LLMatcher.validate_grammar, then one
matcher); each sequence of the request (n choices) gets its own copy of the matcher (Grammar.matcher:
deep_copy, no recompilation). Per decoding step a constrained sequence asks its matcher for the
allowed-token bitmask (one bit per token id), which sampling turns into -inf on every other logit
before penalties' effect reaches the draw, greedy included (runtime/sampling.py); the chosen token
then advances the matcher. The sequence ends when the matcher is stopped: the grammar has accepted
and nothing but an end-of-sequence token may follow, so no step is spent on sampling that token. A
sequence without a grammar pays nothing: it has no matcher and sampling sees no mask.

JSON between its tokens allows a little whitespace (WHITESPACE: one space or tab, then at most one
newline and an indent of up to 32), not any amount: a small model offered unbounded whitespace can
spend its whole max_tokens on newlines (vLLM's `disable-any-whitespace` exists for the same reason).
A schema's own "x-guidance" options replace this default.

The model's end-of-sequence tokens (the session's stop tokens) are the grammar's EOS: allowed exactly
where the grammar may end.
"""

from __future__ import annotations

import functools
import json

import llguidance
import llguidance.hf
import numpy as np

from ..errors import LowbitError

WHITESPACE = {"whitespace_pattern": r"[ \t]?(\n[ \t]{0,32})?"}  # llguidance's JSON options: between tokens


class InvalidRequest(LowbitError):
    """A request value (a schema, a tool definition) that cannot be used; `param` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class Matcher:
    """One sequence's position in a grammar: the tokens allowed next, advanced token by token."""

    def __init__(self, matcher):
        self.m = matcher

    def allowed(self, vocab: int) -> np.ndarray:
        """A bool array of `vocab` entries: True for the tokens the grammar allows next (ids past the
        tokenizer's vocabulary, padding rows of the output head, are never allowed). numpy, not torch:
        an op over a 49k vocabulary is past torch's parallel grain, and its two-thread hand-off costs
        milliseconds of CPU on a busy machine where numpy's one pass costs microseconds."""
        bits = np.unpackbits(np.frombuffer(self.m.compute_bitmask(), np.uint8), count=vocab, bitorder="little")
        return bits.view(np.bool_)

    def advance(self, token: int) -> None:
        if not self.m.consume_token(token):
            raise LowbitError(f"the grammar refused token {token}: {self.m.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar has accepted and allows nothing more but the end of the sequence."""
        return self.m.is_stopped()


class Grammar:
    """A compiled grammar: the matcher every sequence of one request starts from."""

    def __init__(self, matcher):
        self.proto = matcher

    def matcher(self) -> Matcher:
        return Matcher(self.proto.deep_copy())


class Grammars:
    """Compiles grammars for one tokenizer (its llguidance form is built on first use: about a second)."""

    def __init__(self, tokenizer, stop_tokens):
        self.tokenizer, self.stop_tokens = tokenizer, sorted(stop_tokens)

    @functools.cached_property
    def lltokenizer(self):
        eos = [t for t in self.stop_tokens if t < len(self.tokenizer)] or None
        try:
            return llguidance.hf.from_tokenizer(self.tokenizer, eos_token=eos)
        except ValueError as e:  # a slow (Python) tokenizer: llguidance reads fast tokenizers only
            raise LowbitError(f"constrained decoding needs a fast tokenizer: {e}") from None

    def compile(self, grammar: str, param: str) -> Grammar:
        """A matcher for `grammar` (llguidance's grammar text); one that does not compile is an
        InvalidRequest naming `param`."""
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"'{param}' is not a usable schema: {matcher.get_error()[:300]}", param)
        return Grammar(matcher)

    def check_schema(self, schema, param: str) -> None:
        """Refuse (InvalidRequest naming `param`) a JSON schema llguidance cannot compile."""
        bad, messages = llguidance.LLMatcher.validate_grammar_with_warnings(schema_grammar(schema, param),
                                                                           self.lltokenizer)
        if bad:
            raise InvalidRequest(f"'{param}' is not a usable schema: {messages[0][:300]}", param)

    def json_schema(self, schema, param: str) -> Grammar:
        """Output that is one JSON value valid under `schema` (a dict; {"type": "object"}: any object)."""
        return self.compile(schema_grammar(schema, param), param)

    def lark(self, text: str, param: str) -> Grammar:
        """Output in a Lark grammar (llguidance's dialect: `%json {schema}` embeds a JSON schema)."""
        return self.compile(llguidance.LLMatcher.grammar_from_lark(text), param)


def schema_grammar(schema, param: str) -> str:
    """llguidance's grammar text for a JSON schema (not yet compiled)."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"'{param}' must be a JSON schema object, got {json.dumps(schema)[:100]}", param)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(with_whitespace(schema))
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"'{param}' is not a usable schema: {str(e)[:300]}", param) from None


def with_whitespace(schema: dict) -> dict:
    """`schema` with the default JSON whitespace (WHITESPACE) unless it sets llguidance's options itself."""
    return {"x-guidance": WHITESPACE, **schema}
