"""The server through the real `openai` SDK and an `openai-agents` tool loop, on a scripted
checkpoint whose reply is known: a reasoning block, then a Qwen XML call to get_weather(Paris)."""

from __future__ import annotations

import json

import pytest
from server_harness import SCRIPT, WEATHER, RunningServer

from mlx_qwen35.inputs.render import render_chat
from mlx_qwen35.weights.scripted import scripted_checkpoint
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
REASONING = "Checking the weather in Paris."
# After the prompt's last token the script writes 11 tokens, <|im_end|> included; the first
# two (the sentence and </think>) are the reasoning.
REPLY_TOKENS, REASONING_TOKENS = len(SCRIPT) - 1, 2


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    base = ensure_tiny_random(tmp_path_factory.mktemp("cache"))
    model, processor, _ = scripted_checkpoint(base, tmp_path_factory.mktemp("scripted"), SCRIPT)
    return model, processor


@pytest.fixture(scope="module")
def server(scripted):
    running = RunningServer(*scripted)
    yield running
    running.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def prompt_length(processor, messages, tools, thinking=None):
    return len(render_chat(processor, messages, tools=tools, enable_thinking=thinking).ids)


def test_tool_call_whole(client, scripted):
    reply = client.chat.completions.create(
        model="qwen", messages=MESSAGES, tools=[WEATHER], temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id
    assert choice.message.content is None
    assert choice.message.model_extra["reasoning_content"] == REASONING
    usage = reply.usage
    assert usage.prompt_tokens == prompt_length(scripted[1], MESSAGES, [WEATHER])
    assert usage.completion_tokens == REPLY_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + REPLY_TOKENS
    assert usage.completion_tokens_details.reasoning_tokens == REASONING_TOKENS
    assert usage.prompt_tokens_details.cached_tokens is not None


def test_tool_call_streamed(client, scripted):
    stream = client.chat.completions.create(
        model="qwen",
        messages=MESSAGES,
        tools=[WEATHER],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    reasoning = "".join(
        c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices
    )
    assert reasoning == REASONING
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    pieces = [d.function.arguments for d in deltas if d.function.arguments]
    assert len(pieces) >= 2  # the arguments arrive as deltas, one parameter at a time
    assert json.loads("".join(pieces)) == {"city": "Paris"}
    assert all(d.index == 0 for d in deltas)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "tool_calls" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == REPLY_TOKENS
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == REASONING_TOKENS


def test_thinking_off_per_request(client):
    reply = client.chat.completions.create(
        model="qwen",
        messages=MESSAGES,
        tools=[WEATHER],
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    message = reply.choices[0].message
    assert "reasoning_content" not in (message.model_extra or {})
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    # "\n\n" after the template's empty think block is the prompt's last token: 8 tokens follow.
    assert reply.usage.completion_tokens == REPLY_TOKENS - 3
    assert reply.usage.completion_tokens_details.reasoning_tokens == 0


def test_without_tools_the_call_is_text(client):
    reply = client.chat.completions.create(model="qwen", messages=MESSAGES, temperature=0)
    message = reply.choices[0].message
    assert message.tool_calls is None
    assert message.content.startswith("<tool_call>") or "get_weather" in message.content


def test_stop_string_ends_the_reply(client):
    reply = client.chat.completions.create(
        model="qwen", messages=MESSAGES, tools=[WEATHER], stop=["Paris"], temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.model_extra["reasoning_content"] == "Checking the weather in"
    assert choice.message.tool_calls is None


def test_max_tokens_cuts_with_length(client):
    reply = client.chat.completions.create(
        model="qwen", messages=MESSAGES, tools=[WEATHER], max_tokens=3
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_logprobs(client):
    reply = client.chat.completions.create(
        model="qwen", messages=MESSAGES, tools=[WEATHER], logprobs=True, top_logprobs=2
    )
    entries = reply.choices[0].logprobs.content
    assert len(entries) == REPLY_TOKENS
    assert entries[0].token == REASONING and entries[0].logprob > -1e-3
    assert entries[0].top_logprobs[0].token == REASONING
    assert entries[0].top_logprobs[1].logprob < -50  # the script's margin


def test_models_and_completions(client, server):
    assert [m.id for m in client.models.list()] == ["qwen"]
    completion = client.completions.create(model="qwen", prompt="hello\n", max_tokens=2, logprobs=2)
    assert completion.choices[0].text == REASONING + "</think>"
    assert completion.usage.completion_tokens == 2
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == [REASONING, "</think>"] and logprobs.text_offset == [0, 30]
    assert logprobs.token_logprobs[0] > -1e-3 and len(logprobs.top_logprobs[0]) == 2


def test_agents_tool_loop(server):
    agents = pytest.importorskip("agents")
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    seen = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return f"Sunny in {city}"

    agent = agents.Agent(
        name="weather",
        instructions="Answer weather questions.",
        tools=[get_weather],
        model=agents.OpenAIChatCompletionsModel(model="qwen", openai_client=client),
        tool_use_behavior="stop_on_first_tool",
    )
    agents.set_tracing_disabled(True)
    result = agents.Runner.run_sync(agent, "Weather in Paris?")
    assert seen == ["Paris"]
    assert result.final_output == "Sunny in Paris"


RESPONSES_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": WEATHER["function"]["parameters"],
}


def test_responses_whole_and_follow_up(client):
    first = client.responses.create(
        model="qwen", input="Weather in Paris?", tools=[RESPONSES_TOOL], instructions="Be brief."
    )
    assert first.status == "completed"
    kinds = [item.type for item in first.output]
    assert kinds == ["reasoning", "function_call"]
    call = first.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert first.usage.output_tokens == REPLY_TOKENS
    assert first.usage.output_tokens_details.reasoning_tokens == REASONING_TOKENS
    follow = client.responses.create(
        model="qwen",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}],
        tools=[RESPONSES_TOOL],
        reasoning={"effort": "none"},
    )
    assert [item.type for item in follow.output] == ["function_call"]
    assert follow.usage.input_tokens > first.usage.input_tokens
    assert client.responses.retrieve(first.id).id == first.id


def test_responses_streamed(client):
    events = list(
        client.responses.create(
            model="qwen", input="Weather in Paris?", tools=[RESPONSES_TOOL], stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert json.loads("".join(deltas)) == {"city": "Paris"}
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "function_call"]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="qwen", input="x", previous_response_id="resp_missing")


def test_responses_text_and_developer_messages(client):
    reply = client.responses.create(
        model="qwen",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {"role": "developer", "content": "Follow AGENTS.md."},
            {"role": "user", "content": "Weather in Paris?"},
        ],
        instructions="Be brief.",
    )
    assert [item.type for item in reply.output] == ["reasoning", "message"]
    assert reply.output_text.startswith("<tool_call>")  # no tools: the call is plain text
    assert reply.output[0].content[0].text == REASONING
