"""The server through the real `anthropic` SDK, on the scripted checkpoint of
test_server_openai: thinking block, tool_use, stop reasons, usage, count_tokens, errors."""

from __future__ import annotations

import pytest
from server_harness import SCRIPT, RunningServer

from mlx_qwen35.inputs.render import render_chat
from mlx_qwen35.weights.scripted import scripted_checkpoint
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

anthropic = pytest.importorskip("anthropic")

TOOL = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
OPENAI_TOOL = {
    "type": "function",
    "function": {
        "name": TOOL["name"],
        "description": TOOL["description"],
        "parameters": TOOL["input_schema"],
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = ensure_tiny_random(tmp_path_factory.mktemp("cache"))
    model, processor, _ = scripted_checkpoint(base, tmp_path_factory.mktemp("scripted"), SCRIPT)
    running = RunningServer(model, processor, api_key="sekret")
    yield running
    running.close()


@pytest.fixture
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="sekret", max_retries=0)


def test_tool_use_whole(client, server):
    reply = client.messages.create(
        model="qwen", max_tokens=64, messages=MESSAGES, tools=[TOOL], system="Be brief."
    )
    assert [b.type for b in reply.content] == ["thinking", "tool_use"]
    assert reply.content[0].thinking == "Checking the weather in Paris."
    assert reply.content[1].name == "get_weather" and reply.content[1].input == {"city": "Paris"}
    assert reply.stop_reason == "tool_use"
    expected = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    prompt = len(render_chat(server.state.processor, expected, tools=[OPENAI_TOOL]).ids)
    assert reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0) == prompt
    assert reply.usage.output_tokens == len(SCRIPT) - 1


def test_tool_use_streamed(client):
    with client.messages.stream(
        model="qwen", max_tokens=64, messages=MESSAGES, tools=[TOOL]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "input_json" in kinds or "content_block_delta" in kinds
    assert [b.type for b in final.content] == ["thinking", "tool_use"]
    assert final.content[1].input == {"city": "Paris"}
    assert final.stop_reason == "tool_use"


def test_tool_result_round_trip_and_thinking_off(client):
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Checking.", "signature": ""},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"}],
        },
    ]
    reply = client.messages.create(
        model="qwen",
        max_tokens=64,
        messages=history,
        tools=[TOOL],
        thinking={"type": "disabled"},
    )
    assert [b.type for b in reply.content] == ["tool_use"]


def test_stop_sequence_and_max_tokens(client):
    reply = client.messages.create(
        model="qwen", max_tokens=64, messages=MESSAGES, tools=[TOOL], stop_sequences=["Paris"]
    )
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == "Paris"
    assert reply.content[0].thinking == "Checking the weather in"
    short = client.messages.create(model="qwen", max_tokens=1, messages=MESSAGES, tools=[TOOL])
    assert short.stop_reason == "max_tokens"


def test_count_tokens(client, server):
    counted = client.messages.count_tokens(model="qwen", messages=MESSAGES, tools=[TOOL])
    prompt = render_chat(server.state.processor, MESSAGES, tools=[OPENAI_TOOL]).ids
    assert counted.input_tokens == len(prompt)


def test_errors_in_anthropic_shape(server):
    bad_key = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        bad_key.messages.create(model="qwen", max_tokens=5, messages=MESSAGES)
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "authentication_error"
    client = anthropic.Anthropic(base_url=server.url, api_key="sekret", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model="qwen", max_tokens=5, messages=[{"role": "system", "content": "x"}]
        )
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-3", max_tokens=5, messages=MESSAGES)
    reply = client.messages.create(model="qwen", max_tokens=64, messages=MESSAGES, tools=[TOOL])
    assert reply.stop_reason == "tool_use"
