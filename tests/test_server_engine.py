"""The server on the batching engine: a resent conversation resumes from the prefix cache
(cached_tokens), two streams in flight both make progress with their own settings."""

from __future__ import annotations

import itertools
import json

import httpx
import mlx.core as mx
import pytest
from server_harness import SCRIPT, WEATHER, RunningServer

from mlx_qwen35.weights.scripted import chain, scripted_checkpoint, write_successors
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

openai = pytest.importorskip("openai")

USER = [
    {"role": "system", "content": "You are a weather assistant. " * 20},
    {"role": "user", "content": "Weather in Paris?"},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = ensure_tiny_random(tmp_path_factory.mktemp("cache"))
    model, processor, ids = scripted_checkpoint(base, tmp_path_factory.mktemp("scripted"), SCRIPT)
    # Besides the script, "z" and "q" follow each other forever: a reply that never ends.
    (z,), (q,) = processor.encode("z"), processor.encode("q")
    write_successors(model, {**chain(ids), z: q, q: z})
    mx.eval(model.parameters())
    running = RunningServer(model, processor, max_concurrency=4)
    yield running
    running.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def test_resent_conversation_resumes_from_the_cache(client, server):
    first = client.chat.completions.create(model="qwen", messages=USER, tools=[WEATHER])
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    call = first.choices[0].message.tool_calls[0]
    conversation = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": first.choices[0].message.model_extra["reasoning_content"],
            "tool_calls": [call.model_dump()],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    second = client.chat.completions.create(model="qwen", messages=conversation, tools=[WEATHER])
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 0.8 * first.usage.prompt_tokens
    handle = server.engine.handles[-1]
    assert handle.stats.cached_tokens == cached
    assert handle.stats.prefilled_tokens == second.usage.prompt_tokens - cached
    # The same conversation again: everything but the last token comes from the cache.
    third = client.chat.completions.create(model="qwen", messages=conversation, tools=[WEATHER])
    assert third.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens - 8
    assert json.loads(third.choices[0].message.tool_calls[0].function.arguments) == {
        "city": "Paris"
    }


def test_two_streams_progress_together(server):
    """While one stream runs (a reply that never ends by itself), another with its own settings
    starts, runs to its own max_tokens and finishes; a one-at-a-time server could not answer it
    before the first one's 2000 tokens."""
    before = len(server.engine.handles)
    with httpx.Client(base_url=server.url, timeout=120) as http:
        long = {"model": "qwen", "prompt": "zq", "max_tokens": 2000, "stream": True}
        with http.stream("POST", "/v1/completions", json=long) as a:
            lines = a.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            short = {
                "model": "qwen",
                "prompt": "qz",
                "max_tokens": 3,
                "temperature": 1.0,
                "top_k": 5,
            }
            reply = http.post("/v1/completions", json=short).json()
            assert reply["choices"][0]["text"] == "qzq"
            assert reply["choices"][0]["finish_reason"] == "length"
            handle_a = server.engine.handles[before]
            assert not handle_a.finished
            # ... and the first stream goes on.
            more = [line for line in itertools.islice(lines, 20) if line.startswith("data: {")]
            assert more and all('"finish_reason": null' in line for line in more)
    # The client is gone: the server cancels the request (waiting on the handle ends when the
    # engine has dropped it; had nobody cancelled it, it would end at 2000 with "length").
    for _ in handle_a:
        pass
    assert handle_a.stats.finish_reason == "cancelled"
    assert handle_a.stats.generation_tokens < 2000
