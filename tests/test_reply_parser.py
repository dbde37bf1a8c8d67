"""The streamed reply parser: any split of the text gives the same fields as the whole text,
calls are typed by their schemas, and whatever is not a usable call stays in the answer."""

from __future__ import annotations

import json

import pytest

from mlx_qwen35.inputs.reply_parser import CallArguments, CallStart, ReplyParser

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}
TWO_CALLS = (
    "Let me check.\n\n</think>\n\nSure.\n\n<tool_call>\n<function=get_weather>\n"
    "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n"
    "</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n"
    "</function>\n</tool_call>"
)


def parse(text, step, tools=(WEATHER,), thinking=True):
    parser = ReplyParser(list(tools) if tools is not None else None, thinking=thinking)
    deltas = []
    for i in range(0, len(text), step):
        deltas += parser.feed(text[i : i + step])
    deltas += parser.finish()
    return parser.reply, deltas


@pytest.mark.parametrize("step", [1, 2, 3, 7, 10_000])
def test_any_split_gives_the_same_reply(step):
    reply, deltas = parse(TWO_CALLS, step)
    assert reply.reasoning == "Let me check."
    assert reply.content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in reply.calls] == [
        ("get_weather", {"city": "Paris", "days": 3}),
        ("get_weather", {"city": "Rome"}),
    ]
    starts = [d for d in deltas if isinstance(d, CallStart)]
    assert [s.index for s in starts] == [0, 1] and starts[0].id != starts[1].id
    pieces = [d.text for d in deltas if isinstance(d, CallArguments) and d.index == 0]
    assert pieces == ['{"city": "Paris"', ', "days": 3', "}"]


@pytest.mark.parametrize("step", [1, 5, 10_000])
def test_what_is_not_a_call_stays_text(step):
    text = "Hello <tool_call>\n<function=nope>\n</function>\n</tool_call> bye"
    reply, _ = parse(text, step, thinking=False)
    assert reply.calls == [] and reply.content == text
    prose = "a < b and <tool_ is not a tag"
    assert parse(prose, step, thinking=False)[0].content == prose


def test_json_style_call_and_untyped_tools():
    text = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    reply, _ = parse(text, 4, tools=None, thinking=False)
    assert reply.calls[0].name == "f" and json.loads(reply.calls[0].arguments) == {"a": 1}


def test_missing_closing_tags_and_cut_off():
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\nafter"
    reply, _ = parse(text, 3, thinking=False)
    assert json.loads(reply.calls[0].arguments) == {"city": "Paris"}
    assert reply.content == "after"
    cut, _ = parse("<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", 2, thinking=False)
    assert json.loads(cut.calls[0].arguments) == {"city": "Par"}


def test_thinking_without_an_open_block_and_parse_calls_off():
    reply, _ = parse("<think>\nhmm\n</think>\n\nHi", 2, thinking=False)
    assert (reply.reasoning, reply.content) == ("hmm", "Hi")
    parser = ReplyParser([WEATHER], parse_calls=False)
    parser.feed("<tool_call>\n<function=get_weather>\n</function>\n</tool_call>")
    parser.finish()
    assert parser.reply.calls == [] and parser.reply.content.startswith("<tool_call>")
