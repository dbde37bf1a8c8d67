"""Grammars: forced tool calls accept exactly the Qwen XML format with typed values; generate()
takes a response_format; bad schemas are refused with a clear error."""

from __future__ import annotations

import json

import pytest

import mlx_qwen35
from mlx_qwen35.errors import UserError
from mlx_qwen35.inputs.structured import (
    check_grammar,
    json_schema_grammar,
    ll_tokenizer,
    tool_call_grammar,
)
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return mlx_qwen35.load(str(ensure_tiny_random(tmp_path_factory.mktemp("cache"))))


def accepts(processor, vocab, grammar, text):
    matcher = llguidance.LLMatcher(ll_tokenizer(processor, vocab), grammar, log_level=0)
    return matcher.consume_tokens(processor.encode(text)) and matcher.is_accepting()


@pytest.mark.parametrize(
    "text, ok",
    [
        (
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
            "</function>\n</tool_call>",
            True,
        ),
        (
            "\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nLe Mans\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
            True,
        ),
        (
            "<tool_call>\n<function=get_weather>\n<parameter=days>\n3\n</parameter>\n"
            "</function>\n</tool_call>",
            False,
        ),  # the required city is missing
        (
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
            "<parameter=days>\nthree\n</parameter>\n</function>\n</tool_call>",
            False,
        ),
        ("<tool_call>\n<function=get_time>\n</function>\n</tool_call>", False),
        ("Sure! <tool_call>", False),
    ],
)
def test_tool_call_grammar(tiny, text, ok):
    _, processor = tiny
    grammar = tool_call_grammar([WEATHER], parallel=False)
    assert accepts(processor, processor.config.text.vocab_size, grammar, text) == ok


def test_generate_takes_response_format(tiny):
    model, processor = tiny
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 0, "maximum": 5},
        },
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    # (After an open thinking block the constraint waits for </think>: test_server_sampling.)
    for seed in range(3):
        text = mlx_qwen35.generate(
            model,
            processor,
            "JSON please",
            max_tokens=200,
            temp=1.0,
            seed=seed,
            enable_thinking=False,
            response_format={"type": "json_schema", "json_schema": {"schema": schema}},
        )
        jsonschema.validate(json.loads(text), schema)


def test_bad_formats_are_refused(tiny):
    model, processor = tiny
    with pytest.raises(UserError, match="grammar cannot be used"):
        check_grammar(processor, 704, json_schema_grammar({"type": "bogus"}))
    with pytest.raises(UserError, match="not supported"):
        mlx_qwen35.generate(model, processor, "x", response_format={"type": "yaml"})
    with pytest.raises(UserError, match="not one of the tools"):
        tool_call_grammar([WEATHER], "nope")
