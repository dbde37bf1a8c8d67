"""--kv-bits through every front door: generate/batch_generate, ChatSession (a saved 4-bit
session records its KV format, loads and continues identically), the generate and chat CLIs,
and the server (its requests quantize, and resume from quantized prefix states)."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from click.testing import CliRunner
from server_harness import SCRIPT, WEATHER, RunningServer

from mlx_qwen35.cli import options
from mlx_qwen35.cli.chat import main as chat_main
from mlx_qwen35.cli.generate import main as generate_main
from mlx_qwen35.cli.server import config_from_flags
from mlx_qwen35.engine.generate import batch_generate, stream_generate
from mlx_qwen35.engine.session import ChatSession
from mlx_qwen35.errors import UserError
from mlx_qwen35.model import cache as kv_cache
from mlx_qwen35.weights.loading import load
from mlx_qwen35.weights.scripted import chain, scripted_checkpoint, write_successors
from mlx_qwen35.weights.tiny_random import CACHE_ENV, ensure_tiny_random

GREEDY = dict(temp=0.0, presence_penalty=0.0)
PROMPT = "Tell me about the weather in Paris and in Rome, please."
# tiny-random's head_dim is 32: groups of 32.
KV8 = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=0)
KV4 = dict(kv_bits=4, kv_group_size=32, quantized_kv_start=16)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    ensure_tiny_random(root)
    return root


@pytest.fixture(scope="module")
def tiny(cache_root):
    return load(str(ensure_tiny_random(cache_root)))


def test_generate_with_an_8_bit_cache_starts_with_the_greedy_tokens_of_the_unquantized_run(tiny):
    model, processor = tiny

    def tokens(**kv):
        responses = stream_generate(model, processor, PROMPT, max_tokens=24, **kv)
        return [r.token for r in responses]

    plain, quant = tokens(), tokens(**KV8)
    # Random weights leave small margins between the top logits; the first tokens agree.
    assert quant[:8] == plain[:8] and quant != tokens(**KV4)
    out = batch_generate(
        model, processor, [PROMPT, "Hi"], max_tokens=12, return_token_ids=True, **KV8
    )
    assert out.token_ids[0] == quant[:12]  # batched as alone


def test_a_saved_4_bit_session_records_its_format_and_continues_identically(tiny, tmp_path):
    model, processor = tiny
    chat = ChatSession(model, processor, max_tokens=6, **GREEDY, **KV4)
    chat.ask("Hello there, how are you today? Tell me a story about a cat.")
    path = tmp_path / "kv4.session"
    chat.save(path)
    _, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    state = json.loads(metadata["session"])
    assert {k: state["settings"][k] for k in KV4} == KV4
    formats = {len(e["tokens"]) >= 16: e["kv_format"] for e in state["entries"]}
    assert formats[True] == [4, 32, 16]  # the states past quantized_kv_start are 4-bit
    expected = chat.ask("And then?")
    chat.engine.prefix_cache.clear()  # nothing left in memory: the file alone must carry it
    loaded = ChatSession.load(path, model, processor)
    assert loaded.kv == chat.kv
    got = loaded.ask("And then?")
    assert got.tokens == expected.tokens and got.text == expected.text
    assert got.reused_tokens == expected.reused_tokens > 16  # resumed from the 4-bit states


def test_a_session_file_with_a_wrong_kv_format_is_refused(tiny, tmp_path):
    model, processor = tiny
    chat = ChatSession(model, processor, max_tokens=3, **GREEDY, **KV4)
    chat.ask("Hello there, how are you today? Tell me a story.")
    path = tmp_path / "kv4.session"
    chat.save(path)
    arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    state = json.loads(metadata["session"])
    for entry in state["entries"]:
        if entry["kv_format"]:
            entry["kv_format"] = [8, 32, 16]  # the packed arrays are 4-bit
    bad = tmp_path / "bad.session"
    with open(bad, "wb") as f:
        mx.save_safetensors(f, arrays, {**metadata, "session": json.dumps(state)})
    with pytest.raises(UserError, match="corrupted session file .*quantized keys"):
        ChatSession.load(bad, model, processor)


def test_cli_flags_have_mlx_lm_defaults(cache_root, monkeypatch):
    assert options.KV_GROUP_SIZE == kv_cache.DEFAULT_KV_GROUP_SIZE == 64
    assert options.QUANTIZED_KV_START == kv_cache.DEFAULT_QUANTIZED_KV_START == 5000
    monkeypatch.setenv(CACHE_ENV, str(cache_root))
    args = ["--model", "tiny-random", "-p", "Hello there", "-m", "8"]
    plain = CliRunner().invoke(generate_main, args)
    kv = ["--kv-bits", "8", "--kv-group-size", "32", "--quantized-kv-start", "0"]
    quant = CliRunner().invoke(generate_main, [*args, *kv])
    assert plain.exit_code == quant.exit_code == 0 and quant.stdout == plain.stdout
    verbose = CliRunner().invoke(generate_main, [*args, *kv, "--verbose"])
    assert verbose.exit_code == 0
    (line,) = [x for x in verbose.stderr.splitlines() if x.startswith("Will it fit?")]
    assert "tokens, 8-bit) + recurrent states" in line and line.endswith(" left")
    result = CliRunner().invoke(chat_main, ["--model", "tiny-random", "--kv-bits", "4"], input="")
    assert result.exit_code == 1
    assert "kv_group_size 64 does not divide the model's head_dim 32" in result.stderr


@pytest.mark.parametrize(
    "args, match",
    [
        (["--kv-bits", "3"], "kv_bits must be one of 4, 8"),
        (["--kv-bits", "8", "--kv-group-size", "40"], "kv_group_size must be one of 32, 64, 128"),
        (["--kv-bits", "8", "--quantized-kv-start", "-5"], "quantized_kv_start must be >= 0"),
    ],
)
def test_bad_kv_flags_fail_before_loading(args, match):
    result = CliRunner().invoke(generate_main, ["--model", "/nonexistent", *args])
    assert result.exit_code == 1 and result.stderr == f"Error: {result.stderr[7:]}"
    assert match in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_server_flags_reach_the_config():
    from mlx_qwen35.cli.server import main

    def flags(*args: str) -> dict:
        return main.make_context("server", list(args)).params

    config = config_from_flags(flags("--kv-bits", "4", "--kv-group-size", "32"))
    assert (config.kv_bits, config.kv_group_size, config.quantized_kv_start) == (4, 32, 5000)
    assert config_from_flags(flags()).kv_bits is None
    with pytest.raises(UserError, match="kv_bits must be one of 4, 8"):
        config_from_flags(flags("--kv-bits", "2"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    openai = pytest.importorskip("openai")
    base = ensure_tiny_random(tmp_path_factory.mktemp("cache"))
    model, processor, ids = scripted_checkpoint(base, tmp_path_factory.mktemp("scripted"), SCRIPT)
    write_successors(model, chain(ids))
    mx.eval(model.parameters())
    running = RunningServer(model, processor, max_concurrency=2, **KV4)
    yield running, openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0)
    running.close()


def test_the_server_quantizes_and_resumes_from_quantized_states(server):
    running, client = server
    messages = [
        {"role": "system", "content": "You are a weather assistant. " * 10},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    first = client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER])
    call = first.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    request = running.engine.handles[-1].request
    assert (request.kv_bits, request.kv_group_size, request.quantized_kv_start) == (4, 32, 16)
    formats = {e.kv_format for e in running.engine.prefix_cache.entries()}
    assert (4, 32, 16) in formats
    again = client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER])
    assert again.usage.prompt_tokens_details.cached_tokens > 16
    assert again.choices[0].message.tool_calls[0].function.arguments == call.function.arguments
