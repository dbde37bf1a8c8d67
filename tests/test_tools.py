"""Tool-call parsing: realistic and malformed model outputs, typing by the tools' JSON schemas,
and a round trip through the chat template."""

from __future__ import annotations

import pytest

from mlx_qwen35.errors import UserError
from mlx_qwen35.inputs.processor import Processor
from mlx_qwen35.inputs.tools import (
    ToolCall,
    ToolResult,
    convert_value,
    normalize_tools,
    parse_tool_calls,
)
from mlx_qwen35.model.config import load_config
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
            },
            "required": ["city"],
        },
    },
}
PLAN = {
    "name": "plan_trip",  # bare form, as some apps write it
    "parameters": {
        "type": "object",
        "properties": {
            "stops": {"type": "array", "items": {"type": "string"}},
            "budget": {"type": ["number", "null"]},
            "options": {"type": "object"},
            "mode": {"enum": ["train", "car"]},
            "note": {"type": "string"},
        },
        "required": ["stops"],
        "additionalProperties": False,
    },
}
TOOLS = [WEATHER, PLAN]


def call(function: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={function}>\n{body}</function>\n</tool_call>"


def test_realistic_reply_with_two_calls():
    text = (
        "I'll look both up.\n\n"
        + call("get_weather", city="Paris", days="3", metric="true")
        + "\n"
        + call("get_weather", city="New York")
    )
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.warnings == []
    assert parsed.text == "I'll look both up."
    assert parsed.calls == [
        ToolCall("get_weather", {"city": "Paris", "days": 3, "metric": True}, "call_0"),
        ToolCall("get_weather", {"city": "New York"}, "call_1"),
    ]


def test_values_are_typed_by_the_schema():
    text = call(
        "plan_trip",
        stops='["Lyon", "Nice"]',
        budget="1250.5",
        options='{"hotel": {"stars": 4, "pool": true}, "nights": [1, 2]}',
        mode="train",
        note="123",  # a string parameter keeps digits as text
    )
    (got,) = parse_tool_calls(text, TOOLS).calls
    assert got.arguments == {
        "stops": ["Lyon", "Nice"],
        "budget": 1250.5,
        "options": {"hotel": {"stars": 4, "pool": True}, "nights": [1, 2]},
        "mode": "train",
        "note": "123",
    }
    # Python-literal lists (small models write them) and null for a nullable number.
    (got,) = parse_tool_calls(call("plan_trip", stops="['a', 'b']", budget="null"), TOOLS).calls
    assert got.arguments == {"stops": ["a", "b"], "budget": None}


def test_multiline_string_values_keep_their_whitespace():
    (got,) = parse_tool_calls(call("get_weather", city="  line 1\nline 2  "), TOOLS).calls
    assert got.arguments["city"] == "  line 1\nline 2  "


def test_without_schemas_values_that_read_as_json_are_decoded():
    text = call("anything", n="2", flags='{"a": [1, {"b": null}]}', name="Bob", quoted='"x"')
    (got,) = parse_tool_calls(text).calls
    assert got.arguments == {
        "n": 2,
        "flags": {"a": [1, {"b": None}]},
        "name": "Bob",
        "quoted": '"x"',
    }


@pytest.mark.parametrize(
    "text, problem",
    [
        (call("book_flight", to="Rome"), "unknown tool 'book_flight'"),
        (call("get_weather", days="2"), "missing required parameter(s) city"),
        (call("get_weather", city="Rome", days="two"), "'days' = 'two' is not a integer"),
        (call("plan_trip", stops="[1, 2"), "'stops' = '[1, 2' is not a array"),
        (call("plan_trip", stops="[]", mode="plane"), "is not one of train, car"),
        (call("plan_trip", stops="[]", color="red"), "unknown parameter 'color'"),
        ("<tool_call>\n<function=get_weather>\n<parameter=city>\nRo", "missing </function>"),
        ("<tool_call>\nget_weather(city='Rome')\n</tool_call>", "no <function=NAME>"),
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>',
            "not valid JSON",
        ),
        (
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nA\n</parameter>\n"
            "<parameter=city>\nB\n</parameter>\n</function>\n</tool_call>",
            "given twice",
        ),
    ],
)
def test_malformed_calls_stay_in_the_text_with_a_warning(text, problem):
    reply = "Let me check. " + text
    parsed = parse_tool_calls(reply, TOOLS)
    assert parsed.calls == []
    assert parsed.text == reply.strip()
    assert len(parsed.warnings) == 1 and problem in parsed.warnings[0]
    assert "left in the text" in parsed.warnings[0]


def test_one_bad_call_does_not_spoil_the_others():
    text = call("nope") + "\n" + call("get_weather", city="Oslo")
    parsed = parse_tool_calls(text, TOOLS)
    assert [c.name for c in parsed.calls] == ["get_weather"]
    assert parsed.text == call("nope")
    assert len(parsed.warnings) == 1 and "unknown tool 'nope'" in parsed.warnings[0]


def test_missing_closing_tags_that_leave_no_doubt_are_tolerated():
    # No </parameter> before the next parameter or </function>; no </tool_call> at the end.
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
        "<parameter=days>\n2\n</function>\nDone."
    )
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.calls == [ToolCall("get_weather", {"city": "Paris", "days": 2}, "call_0")]
    assert parsed.text == "Done."
    assert len(parsed.warnings) == 3
    assert "missing </tool_call>" in parsed.warnings[0]
    assert all("</parameter>" in w for w in parsed.warnings[1:])
    # A second <tool_call> before the first is closed ends the first.
    text = call("get_weather", city="A").replace("</tool_call>", "") + call("get_weather", city="B")
    assert [c.arguments["city"] for c in parse_tool_calls(text, TOOLS).calls] == ["A", "B"]


def test_json_style_calls_are_accepted_and_checked():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}'
    text += "\n</tool_call>"
    (got,) = parse_tool_calls(text, TOOLS).calls
    assert got.arguments == {"city": "Rome", "days": 2}
    bad = '<tool_call>{"name": "get_weather", "arguments": {"city": 5}}</tool_call>'
    assert parse_tool_calls(bad, TOOLS).calls == []


def test_text_without_calls_is_untouched():
    parsed = parse_tool_calls("The weather is <b>fine</b>.", TOOLS)
    assert (parsed.calls, parsed.text, parsed.warnings) == ([], "The weather is <b>fine</b>.", [])


def test_convert_value_unions_and_enums():
    assert convert_value("12", {"type": ["integer", "string"]}) == (True, 12)
    assert convert_value("twelve", {"type": ["integer", "string"]}) == (True, "twelve")
    assert convert_value("3", {"anyOf": [{"type": "integer"}, {"type": "null"}]}) == (True, 3)
    assert convert_value("2", {"enum": [1, 2, 3]}) == (True, 2)
    assert convert_value("7.0", {"type": "integer"}) == (True, 7)
    assert convert_value("7.5", {"type": "integer"})[0] is False
    assert convert_value("TRUE", {"type": "boolean"}) == (True, True)
    assert convert_value("yes", {"type": "boolean"})[0] is False


def test_normalize_tools():
    tools = normalize_tools(TOOLS)
    assert [t["function"]["name"] for t in tools] == ["get_weather", "plan_trip"]
    assert all(t["type"] == "function" for t in tools)
    for bad in ("get_weather", [{"description": "no name"}], [{"name": "a<b"}], [3]):
        with pytest.raises(UserError):
            normalize_tools(bad)


def test_round_trip_through_the_template(tmp_path_factory):
    path = ensure_tiny_random(tmp_path_factory.mktemp("cache"))
    processor = Processor.from_pretrained(path, load_config(path))
    calls = [
        ToolCall("get_weather", {"city": "São Paulo", "days": 2, "metric": False}, "c0"),
        ToolCall(
            "plan_trip",
            {"stops": ["a", "b"], "options": {"x": [1, {"y": None}]}, "note": "two\nlines"},
            "c1",
        ),
    ]
    messages = [
        {"role": "user", "content": "Plan it."},
        {
            "role": "assistant",
            "reasoning_content": "Two tools.",
            "content": "Checking.",
            "tool_calls": [c.to_message() for c in calls],
        },
        calls[0].result({"temp": 21}).to_message(),
        calls[1].result("ok").to_message(),
    ]
    text = processor.apply_chat_template(messages, tools=TOOLS)
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in text
    reply = text.split("</think>\n\n", 1)[1].split("<|im_end|>", 1)[0]
    parsed = parse_tool_calls(reply, TOOLS, id_prefix="c")
    assert parsed.warnings == []
    assert [(c.name, c.arguments, c.id) for c in parsed.calls] == [
        (c.name, c.arguments, f"c_{i}") for i, c in enumerate(calls)
    ]
    assert parsed.text == "Checking."


def test_tool_result_messages():
    assert ToolResult("sunny").to_message() == {"role": "tool", "content": "sunny"}
    message = ToolCall("f", {}, "id7").result([1, "é"]).to_message()
    assert message == {"role": "tool", "content": '[1, "é"]', "name": "f", "tool_call_id": "id7"}
