"""Structured output: JSON schemas and forced tool calls, enforced while sampling.

    processor = constraint_processor(processor, vocab_size, response_format={"type": "json_object"},
                                     after_think=rendered.thinking_open)
    # an mlx-lm style logits processor: (tokens, logits) -> logits with every token that would
    # break the grammar at -inf

The grammar engine is llguidance (guidance-ai; also behind vLLM's, SGLang's and llama.cpp's
structured output): abi3 wheels for macOS arm64 and Linux x86-64 with no dependencies, a mask in
tens of microseconds for a 250k vocabulary, JSON schemas compiled lazily (no up-front automaton,
so large or recursive schemas cost nothing until used), and Lark grammars that embed JSON schemas
-- which a Qwen XML tool call with typed parameters needs. xgrammar needs torch at install;
outlines-core turns schemas into one regular expression (no recursion, slow compiles).

A reply that starts inside the thinking block is left free until `</think>`; the constraint
applies to the answer after it. JSON is written compactly with fixed separators (`", "`,
`": "`), so a sampler cannot wander off into endless white space.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import UserError
from .tools import normalize_tools

# The template (and a thinking budget) puts a blank line after </think>: the answer may start
# with up to two newlines, no more (a sampler must not loop on white space).
ANSWER_START = r"/\n{0,2}/"
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# A string parameter of a forced tool call: any text without "</" (so it cannot run past its
# closing tag), then the tag. One terminal, so the lexer never has to guess where it ends.
_STRING_VALUE = r"/(?:[^<]|<[^\/])*\n<\/parameter>\n/"


def response_format_grammar(response_format: Mapping[str, Any] | None) -> str | None:
    """The llguidance grammar for an OpenAI `response_format` (None for plain text).

    Accepts {"type": "text"}, {"type": "json_object"} and {"type": "json_schema", "json_schema":
    {"name", "schema", "strict"}} (also a bare {"schema": ...} as some clients send).
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise UserError("response_format must be an object with a 'type'")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise UserError("response_format json_schema needs a 'json_schema' object")
        schema = spec.get("schema", spec.get("schema_"))
        if schema is None:
            raise UserError("response_format json_schema needs json_schema.schema")
        return json_schema_grammar(schema)
    raise UserError(
        f"response_format type {kind!r} is not supported; use 'text', 'json_object' or "
        "'json_schema'"
    )


def json_schema_grammar(schema: Any) -> str:
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, Mapping):
        raise UserError("a JSON schema must be an object")
    return _lark(f"start: {ANSWER_START} {_json_terminal(schema)}\n")


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]], choice: str | None = None, *, parallel: bool = True
) -> str:
    """A grammar for one (or, with `parallel`, one or more) Qwen XML tool calls to `tools`, or
    to the tool named `choice` only; parameters typed by each tool's schema."""
    tools = normalize_tools(tools)
    if choice is not None:
        tools = [t for t in tools if t["function"]["name"] == choice]
        if not tools:
            raise UserError(f"tool_choice names {choice!r}, which is not one of the tools")
    if not tools:
        raise UserError("tool_choice 'required' needs at least one tool")
    rules = []
    for i, tool in enumerate(tools):
        rules.append(_call_rule(f"call_{i}", tool["function"]))
    calls = " | ".join(f"call_{i}" for i in range(len(tools)))
    head = (
        f'start: {ANSWER_START} call ("\\n" call)*\n'
        if parallel
        else (f"start: {ANSWER_START} call\n")
    )
    head += f'call: <tool_call> "\\n" ({calls}) </tool_call>\n'

    return _lark(head + "".join(rules))


def _call_rule(name: str, fn: Mapping[str, Any]) -> str:
    schema = fn.get("parameters") or {}
    properties = schema.get("properties") or {}
    required = [p for p in schema.get("required", []) if p in properties]
    optional = [p for p in properties if p not in required]
    parts = []
    for key in required + optional:
        value = _value_terminal(properties[key])
        part = f'"<parameter={_lark_text(key)}>\\n" {value}'
        parts.append(part if key in required else f"({part})?")
    body = " ".join(parts)
    return f'{name}: "<function={_lark_text(fn["name"])}>\\n" {body} "</function>\\n"\n'


def _value_terminal(schema: Any) -> str:
    types = schema.get("type") if isinstance(schema, Mapping) else None
    if types == "string" and "enum" not in schema and "const" not in schema:
        return _STRING_VALUE
    # Everything else is written as JSON (numbers, booleans, objects, arrays, enums).
    return f'{_json_terminal(schema)} "\\n</parameter>\\n"'


def _json_terminal(schema: Mapping[str, Any] | Any) -> str:
    schema = dict(schema) if isinstance(schema, Mapping) else schema
    if isinstance(schema, dict):
        schema["x-guidance"] = {**JSON_OPTIONS, **schema.get("x-guidance", {})}
    return "%json " + json.dumps(schema)


def _lark_text(text: str) -> str:
    return json.dumps(text)[1:-1]


def _lark(grammar: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(grammar)


class GrammarProcessor:
    """An mlx-lm logits processor that keeps sampling inside a grammar (see the module doc).

    It must see every generated token in order, once per step (as generate_step and the engine
    call it): the last token of `tokens` on each call after the first is the one just sampled.
    """

    def __init__(self, matcher: Any, vocab_size: int, gate: int | None, eos: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.gate = gate  # the answer starts after this token (</think>); None: at once
        self.eos = eos
        self.calls = 0
        self.open = gate is None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        calls, self.calls = self.calls, self.calls + 1
        if calls and (self.open or self.gate is not None):
            last = int(tokens[-1].item())
            if not self.open:
                if last != self.gate:
                    return logits
                self.open = True
            elif not self.matcher.is_stopped():
                self.matcher.consume_token(last)
        elif not self.open:
            return logits
        return mx.where(mx.array(self._allowed()), logits, -math.inf).astype(logits.dtype)

    def _allowed(self) -> np.ndarray:
        if self.matcher.is_error() or self.matcher.is_stopped():
            allowed = np.zeros(self.vocab_size, dtype=bool)
            allowed[self.eos] = True
            return allowed
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little").astype(bool)
        if allowed.size < self.vocab_size:
            allowed = np.pad(allowed, (0, self.vocab_size - allowed.size))
        return allowed[: self.vocab_size]


def ll_tokenizer(processor: Any, vocab_size: int) -> Any:
    """llguidance's view of the processor's tokenizer, built once (it walks the vocabulary)."""
    key = ("_ll_tokenizer", vocab_size)
    cached = processor.__dict__.get(key)
    if cached is None:
        import llguidance

        from .render import _backend_tokenizer

        backend = _backend_tokenizer(processor.tokenizer)
        cached = llguidance.LLTokenizer(
            backend.to_str(), n_vocab=vocab_size, eos_token=stop_token(processor)
        )
        processor.__dict__[key] = cached
    return cached


def stop_token(processor: Any) -> int:
    """The end-of-turn token a constrained answer finishes with (<|im_end|>)."""
    ids = processor.encode("<|im_end|>")
    if len(ids) == 1:
        return ids[0]
    return min(processor.eos_token_ids)


def check_grammar(processor: Any, vocab_size: int, grammar: str) -> None:
    """Raise UserError when llguidance cannot compile `grammar` (e.g. a bad JSON schema)."""
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, ll_tokenizer(processor, vocab_size)
    )
    if is_error:
        lines = [line for m in messages for line in m.strip().splitlines()[:1]]
        raise UserError(f"the grammar cannot be used: {'; '.join(lines) or 'invalid'}")


def grammar_processor(
    processor: Any, vocab_size: int, grammar: str, *, after_think: bool = False
) -> GrammarProcessor:
    """A GrammarProcessor for `grammar`; with `after_think` it waits for </think> first."""
    import llguidance

    check_grammar(processor, vocab_size, grammar)
    matcher = llguidance.LLMatcher(ll_tokenizer(processor, vocab_size), grammar, log_level=0)
    gate = None
    if after_think:
        ids = processor.encode("</think>")
        gate = ids[0] if len(ids) == 1 else None
    return GrammarProcessor(matcher, vocab_size, gate, stop_token(processor))


def constraint_processor(
    processor: Any,
    vocab_size: int,
    *,
    response_format: Mapping[str, Any] | None = None,
    after_think: bool = False,
) -> GrammarProcessor | None:
    """The processor that enforces `response_format` (None when it asks for plain text)."""
    grammar = response_format_grammar(response_format)
    if grammar is None:
        return None
    return grammar_processor(processor, vocab_size, grammar, after_think=after_think)


def thinking_open(processor: Any, ids: Sequence[int]) -> bool:
    """Whether prompt `ids` end inside a thinking block (a <think> after the last </think>)."""
    start, end = processor.encode("<think>"), processor.encode("</think>")
    if len(start) != 1 or len(end) != 1:
        return False
    last = {t: i for i, t in enumerate(ids)}
    return last.get(start[0], -1) > last.get(end[0], -1)
