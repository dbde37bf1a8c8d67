"""Bad requests: each gets a 4xx JSON error in its endpoint's own shape, and the server keeps
serving. Also the API key, the body-size limit, and a client that disconnects mid-stream."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image
from server_harness import SCRIPT, WEATHER, RunningServer

from mlx_qwen35.weights.scripted import scripted_checkpoint
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

openai = pytest.importorskip("openai")
KEY = "test-key"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = ensure_tiny_random(tmp_path_factory.mktemp("cache"))
    model, processor, _ = scripted_checkpoint(base, tmp_path_factory.mktemp("scripted"), SCRIPT)
    running = RunningServer(
        model, processor, api_key=KEY, max_body_bytes=1_000_000, max_concurrency=1, max_queue=2
    )
    yield running
    running.close()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def png_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(**fields):
    return {"model": "qwen", "messages": USER, "max_tokens": 4, **fields}


def image_message(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


BAD_CHAT = [
    ("malformed JSON", b'{"model": "qwen", "messages": [', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("messages wrong type", chat(messages="hello"), 400, "messages"),
    ("bad role", chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role"),
    ("empty messages", chat(messages=[]), 400, "messages"),
    ("user without content", chat(messages=[{"role": "user"}]), 400, "messages[0]"),
    ("temperature too high", chat(temperature=3), 400, "temperature"),
    ("top_p zero", chat(top_p=0), 400, "top_p"),
    ("min_p above one", chat(min_p=1.5), 400, "min_p"),
    ("negative max_tokens", chat(max_tokens=-1), 400, "max_tokens"),
    ("n above one", chat(n=2), 400, "n"),
    ("top_logprobs too many", chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("max_tokens a string", chat(max_tokens="many"), 400, "max_tokens"),
    ("unknown model", chat(model="gpt-4o"), 404, "model"),
    (
        "undecodable image",
        chat(messages=image_message("data:image/png;base64,aGVsbG8=")),
        400,
        "messages[0].content[0].image_url",
    ),
    (
        "bad base64",
        chat(messages=image_message("data:image/png;base64,@@@")),
        400,
        "messages[0].content[0].image_url",
    ),
    (
        "local file refused",
        chat(messages=image_message("/etc/hostname")),
        400,
        "messages[0].content[0].image_url",
    ),
    (
        "image over the pixel budget",
        chat(messages=image_message(png_url(8000, 6000))),
        400,
        "messages[0].content[0].image_url",
    ),
    (
        "prompt beyond the context",
        chat(messages=[{"role": "user", "content": "word " * 5000}]),
        400,
        "messages",
    ),
    ("bad response_format", chat(response_format={"type": "xml"}), 400, "response_format"),
    (
        "bad json schema",
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "bogus"}},
            }
        ),
        400,
        "response_format",
    ),
    (
        "named tool that is not there",
        chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
        400,
        "tool_choice",
    ),
    ("required without tools", chat(tool_choice="required"), 400, "tool_choice"),
    ("tool name with markup", chat(tools=[{"function": {"name": "a<b>"}}]), 400, "tools"),
    (
        "bad tool-call arguments",
        chat(
            messages=[
                *USER,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{oops"},
                        }
                    ],
                },
            ]
        ),
        400,
        "messages",
    ),
    (
        "system message in the middle",
        chat(messages=[*USER, {"role": "system", "content": "x"}]),
        400,
        "messages",
    ),
]


@pytest.mark.parametrize(
    "body, status, param", [b[1:] for b in BAD_CHAT], ids=[b[0] for b in BAD_CHAT]
)
def test_bad_chat_requests(http, body, status, param):
    if isinstance(body, bytes):
        response = http.post(CHAT, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(CHAT, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}
    # ... and the server still answers a good request.
    ok = http.post(CHAT, json=chat(tools=[WEATHER], max_tokens=64))
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["finish_reason"] == "tool_calls"


BAD_MESSAGES = [
    ({"model": "qwen", "messages": USER}, 400),  # no max_tokens
    ({"model": "qwen", "max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}, 400),
    ({"model": "qwen", "max_tokens": 5, "messages": USER, "temperature": 1.5}, 400),
    (
        {
            "model": "qwen",
            "max_tokens": 5,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/png",
                                "data": "aGVsbG8=",
                            },
                        }
                    ],
                }
            ],
        },
        400,
    ),
    ({"model": "claude-opus", "max_tokens": 5, "messages": USER}, 404),
]


@pytest.mark.parametrize("body, status", BAD_MESSAGES)
def test_bad_messages_requests(http, body, status):
    response = http.post("/v1/messages", json=body)
    assert response.status_code == status
    payload = response.json()
    assert payload["type"] == "error" and payload["error"]["message"]
    ok = http.post("/v1/messages", json={"model": "qwen", "max_tokens": 64, "messages": USER})
    assert ok.status_code == 200 and ok.json()["type"] == "message"


def test_api_key(server):
    with httpx.Client(base_url=server.url) as anonymous:
        assert anonymous.get("/health").status_code == 200
        for path in ("/v1/models", CHAT, "/v1/messages", "/v1/responses"):
            response = (
                anonymous.post(path, json={}) if path != "/v1/models" else (anonymous.get(path))
            )
            assert response.status_code == 401
        assert anonymous.get("/v1/models", headers={"x-api-key": KEY}).status_code == 200
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"


def test_body_limit(http):
    big = chat(messages=[{"role": "user", "content": "x" * 1_500_000}])
    response = http.post(CHAT, json=big)
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]
    assert http.post(CHAT, json=chat()).status_code == 200


def test_unknown_endpoint(http):
    response = http.post("/v1/embeddings", json={})
    assert response.status_code == 404 and response.json()["error"]["message"]


def test_disconnect_cancels_and_frees_the_slot(server, http):
    """A streaming client that goes away mid-reply: its request is cancelled in the engine
    (not run to its 3000 tokens), and the next request gets the slot and finishes."""
    before = len(server.engine.handles)
    # A raw prompt whose last token has no successor: the scripted model rambles until
    # max_tokens, far longer than the test waits.
    body = {"model": "qwen", "prompt": "zq", "max_tokens": 3000, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one token arrived; leave
    handle = server.engine.handles[before]
    follow = http.post(CHAT, json=chat(tools=[WEATHER], max_tokens=64))
    assert follow.status_code == 200
    assert follow.json()["choices"][0]["finish_reason"] == "tool_calls"
    assert handle.stats.finish_reason == "cancelled"


def test_openai_sdk_raises_typed_errors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="qwen", messages=USER, temperature=9)
    assert caught.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=USER)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).models.list()
    reply = client.chat.completions.create(model="qwen", messages=USER, tools=[WEATHER])
    assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments) == {
        "city": "Paris"
    }


def test_queue_full_is_429(server, http):
    limit = server.config.max_concurrency + server.config.max_queue
    for _ in range(limit):
        server.state.started()
    try:
        response = http.post(CHAT, json=chat())
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        for _ in range(limit):
            server.state.ended()
    assert http.post(CHAT, json=chat()).status_code == 200
