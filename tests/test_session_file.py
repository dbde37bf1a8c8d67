"""Saved sessions under bad conditions: every OS error of save and load is one line, a missing
directory is an error (not a new tree), crafted files are refused field by field and tensor by
tensor and leave the current session as it was; tool-call warnings point at the caller's line."""

from __future__ import annotations

import io
import json
import os
import runpy
import struct
import sys
import tempfile
import warnings
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_qwen35.cli.chat import ChatApp
from mlx_qwen35.engine.generate import generate
from mlx_qwen35.engine.session import ChatSession
from mlx_qwen35.errors import UserError
from mlx_qwen35.inputs.tools import ToolCallWarning
from mlx_qwen35.weights.loading import load
from mlx_qwen35.weights.tiny_random import CACHE_ENV, ensure_tiny_random

GREEDY = dict(temp=0.0, presence_penalty=0.0)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    ensure_tiny_random(root)
    return root


@pytest.fixture(scope="module")
def tiny(cache_root):
    return load(str(ensure_tiny_random(cache_root)))


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    model, processor = tiny
    chat = ChatSession(model, processor, max_tokens=3, **GREEDY)
    chat.ask("Hello")
    chat.ask("Again")
    path = tmp_path_factory.mktemp("saved") / "good.session"
    chat.save(path)
    return path


def test_save_errors_are_one_line_and_create_nothing(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    chat = ChatSession(model, processor, max_tokens=2, **GREEDY)
    chat.ask("Hi")
    (tmp_path / "somefile.txt").write_text("x")
    (tmp_path / "adir").mkdir()
    cases = {
        tmp_path / "missing" / "deeper" / "x.session": "does not exist",
        tmp_path / "somefile.txt" / "x": "does not exist",
        tmp_path / "adir": "is a directory",
    }
    for path, match in cases.items():
        with pytest.raises(UserError, match=match) as info:
            chat.save(path)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "missing").exists()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(UserError, match="Permission denied"):
        chat.save(tmp_path / "ok.session")
    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(UserError, match="Permission denied"):
        chat.save(tmp_path / "ok.session")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "somefile.txt"]


def edit_state(data: bytes, edit) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def session_json(edit):
    def apply(header):
        state = json.loads(header["__metadata__"]["session"])
        edit(state)
        header["__metadata__"]["session"] = json.dumps(state)

    return apply


def raw_session(text: str):
    def apply(header):
        header["__metadata__"]["session"] = text

    return apply


def first_kv(header) -> str:
    return next(k for k, v in header.items() if k.endswith(".0") and len(v["shape"]) == 4)


def wrong_head_size(header):
    info = header[first_kv(header)]
    b, h, n, d = info["shape"]
    info["shape"] = [b, h, n * 2, d // 2]  # the same bytes, a head half as wide


def wrong_dtype(header):
    header[first_kv(header)]["dtype"] = "I32"


def set_key(path, value):
    def edit(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return session_json(edit)


CRAFTED = {
    "infinity-token": (
        lambda h: h["__metadata__"].update(
            session=h["__metadata__"]["session"].replace('"tokens": [', '"tokens": [Infinity, ', 1)
        ),
        "Infinity",
    ),
    "huge-number": (set_key(["entries", 0, "tokens", 0], 10**30), "not an integer in range"),
    "float-token": (
        lambda h: h["__metadata__"].update(
            session=h["__metadata__"]["session"].replace('"tokens": [', '"tokens": [1e400, ', 1)
        ),
        "not an integer in range",
    ),
    "deep": (raw_session("[" * 200_000 + "]" * 200_000), "nested deeper"),
    "head-size": (wrong_head_size, "the model needs"),
    "dtype": (wrong_dtype, "the model needs"),
    "processors": (set_key(["settings", "logits_processors"], "abc"), "unknown settings"),
    "temp": (set_key(["settings", "temp"], "hot"), "not a number"),
    "role": (set_key(["messages", 0, "role"], "wizard"), "role"),
    "kind": (set_key(["entries", 0, "kind"], "other"), "kind"),
    "media": (set_key(["media"], {"99": ["image"]}), "do not belong"),
    "anchors": (set_key(["anchors"], "x"), "anchors"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_session_files_are_refused_in_one_line(tiny, saved, tmp_path, case):
    model, processor = tiny
    edit, match = CRAFTED[case]
    path = tmp_path / f"{case}.session"
    path.write_bytes(edit_state(saved.read_bytes(), edit))
    engine_entries = len(ChatSession(model, processor).engine.prefix_cache)
    with pytest.raises(UserError, match=match) as info:
        ChatSession.load(path, model, processor)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert len(ChatSession(model, processor).engine.prefix_cache) == engine_entries


def test_a_failed_load_leaves_the_chat_as_it_was(tiny, saved, tmp_path):
    model, processor = tiny
    session = ChatSession(model, processor, max_tokens=2, **GREEDY)
    err = io.StringIO()
    app = ChatApp(session, out=io.StringIO(), err=err)
    app.run(["Hi there"])
    history = session.history
    bad = tmp_path / "bad.session"
    bad.write_bytes(edit_state(saved.read_bytes(), wrong_head_size))
    app.run([f"/load {bad}", f"/save {tmp_path}/nowhere/x.session", "And now?"])
    assert app.session is session and session.history[:2] == history
    assert len(session.history) == 4
    lines = err.getvalue().splitlines()
    assert sum(line.startswith("Error: ") for line in lines) == 2
    reloaded = ChatSession.load(saved, model, processor)
    assert reloaded.history[-1]["role"] == "assistant"


class Script:
    """A logits processor that makes the model write `tokens`."""

    def __init__(self, tokens):
        self.tokens, self.step = list(tokens), 0

    def __call__(self, history, logits):
        if self.step < len(self.tokens):
            hit = mx.arange(logits.shape[-1]) == self.tokens[self.step]
            logits = mx.where(hit, 0.0, -1e9) + mx.zeros_like(logits)
        self.step += 1
        return logits


BAD_CALL = "<tool_call>\n<function=book_flight>\n<parameter=to>\nRome\n</parameter>\n</function>"


def bad_call_session(model, processor):
    chat = ChatSession(model, processor, tools=[WEATHER], enable_thinking=False, max_tokens=60)
    chat.logits_processors = [Script(processor.encode(BAD_CALL) + processor.encode("<|im_end|>"))]
    return chat


def test_tool_call_warnings_point_at_the_callers_line(tiny):
    model, processor = tiny
    chat = bad_call_session(model, processor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chat.ask("Book me a flight")
        line = sys._getframe().f_lineno - 1
    assert [(w.category, w.filename, w.lineno) for w in caught] == [
        (ToolCallWarning, __file__, line)
    ]
    chat = bad_call_session(model, processor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _piece in chat.send("Book me a flight"):
            pass
        line = sys._getframe().f_lineno - 2
    assert [(w.category, w.filename, w.lineno) for w in caught] == [
        (ToolCallWarning, __file__, line)
    ]


def test_agent_example_prints_a_malformed_call_once(tiny, cache_root, monkeypatch, capsys):
    model, processor = tiny
    import mlx_qwen35.engine.session as session_module

    class Scripted(session_module.ChatSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # The agent thinks first: close the thinking, then make the malformed call.
            text = "ok</think>\n\n" + BAD_CALL
            self.logits_processors = [Script(processor.encode(text + "<|im_end|>"))]

    monkeypatch.setattr(session_module, "ChatSession", Scripted)
    monkeypatch.setenv(CACHE_ENV, str(cache_root))
    monkeypatch.setattr(sys, "argv", ["agent.py", "--model", "tiny-random", "--max-rounds", "1"])
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        runpy.run_path(str(EXAMPLES / "agent.py"), run_name="__main__")
    out = capsys.readouterr()
    assert (out.out + out.err).count("unknown tool 'book_flight'") == 1


def test_bad_arguments_are_user_errors(tiny):
    model, processor = tiny
    with pytest.raises(UserError, match="enable_thinking must be True, False or None"):
        generate(model, processor, "hi", enable_thinking="yes")
    with pytest.raises(UserError, match="enable_thinking"):
        ChatSession(model, processor, enable_thinking="yes")
    with pytest.raises(UserError, match="enable_thinking"):
        ChatSession(model, processor).send("hi", enable_thinking="no")
    with pytest.raises(UserError, match="the prompt is empty"):
        generate(model, processor, None)
    with pytest.raises(UserError, match="logits_processors"):
        ChatSession(model, processor, logits_processors="abc")
