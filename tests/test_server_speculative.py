"""The server's --draft-model: requests speculate (alone in the engine) and answer exactly as
without it, through the OpenAI SDK; the flags are checked before a model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from server_harness import SCRIPT, WEATHER, RunningServer

from mlx_qwen35.weights.scripted import scripted_checkpoint
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

openai = pytest.importorskip("openai")

USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    base = ensure_tiny_random(tmp_path_factory.mktemp("cache"))
    return scripted_checkpoint(base, tmp_path_factory.mktemp("scripted"), SCRIPT)


def ask(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model="qwen", messages=USER, tools=[WEATHER])
    return reply.choices[0].message, server.engine.handles[-1]


def test_a_speculating_server_answers_as_a_plain_one(scripted):
    model, processor, _ = scripted
    answers = {}
    for draft in (None, "mtp"):
        server = RunningServer(model, processor, draft_model=draft, num_draft_tokens=3)
        try:
            message, handle = ask(server)
        finally:
            server.close()
        call = message.tool_calls[0]
        answers[draft] = (
            message.model_extra["reasoning_content"],
            call.function.name,
            json.loads(call.function.arguments),
            handle.tokens,
        )
        stats = handle.stats
        if draft is None:
            assert stats.draft_tokens == 0
        else:  # the scripted MTP head drafts the script: every draft up to the stop is kept
            assert stats.draft_tokens > 0
            assert stats.draft_tokens - 3 < stats.accepted_tokens < stats.draft_tokens
    assert answers["mtp"] == answers[None]
    assert answers[None][1:3] == ("get_weather", {"city": "Paris"})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--draft-vocab", "100"], "--draft-vocab needs --draft-model"),
        (["--draft-model", "mtp", "--num-draft-tokens", "8"], "num_draft_tokens must be"),
    ],
)
def test_bad_draft_flags_fail_before_loading(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "mlx_qwen35.server", "--model", "/nonexistent/model", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and message in result.stderr
