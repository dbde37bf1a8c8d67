"""`python -m mlx_qwen35.chat` on tiny-random: driven through stdin (in process) and through a
pseudo-terminal (a subprocess), two turns, /save, /load, /exit, commands and errors."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mlx_qwen35.cli.chat import DIM, RESET, main
from mlx_qwen35.engine.session import ChatSession
from mlx_qwen35.weights.loading import load
from mlx_qwen35.weights.tiny_random import CACHE_ENV, ensure_tiny_random

FLAGS = ["--temp", "0", "--presence-penalty", "0", "-m", "6", "--thinking-budget", "2"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(ensure_tiny_random(tmp_path_factory.mktemp("cache")))


def chat(tiny_path, stdin: str, *args: str):
    return CliRunner().invoke(main, ["--model", tiny_path, *FLAGS, *args], input=stdin)


def expected_replies(tiny_path, messages, hide_thinking=False) -> str:
    """What the CLI should print for `messages`, computed with the session API."""
    model, processor = load(tiny_path)
    session = ChatSession(
        model, processor, temp=0.0, presence_penalty=0.0, max_tokens=6, thinking_budget=2
    )
    out = ""
    for message in messages:
        reply = session.send(message)
        pieces = list(reply)
        thinking = "".join(p.text for p in pieces if p.thinking)
        answer = "".join(p.text for p in pieces if not p.thinking)
        if not hide_thinking:
            out += f"<think>\n{thinking}\n</think>\n\n"
        out += answer + "\n"
    return out


def test_two_turns_save_load_exit_through_stdin(tiny_path, tmp_path):
    saved = tmp_path / "talk.session"
    stdin = (
        f"Hello there\nTell me about the river town.\n/save {saved}\n/load {saved}\n"
        "And Maria?\n/exit\nnever read\n"
    )
    result = chat(tiny_path, stdin, "--verbose")
    assert result.exit_code == 0, result.output
    messages = ["Hello there", "Tell me about the river town.", "And Maria?"]
    assert result.stdout == expected_replies(tiny_path, messages)
    assert f"Saved to {saved}." in result.stderr
    assert f"Loaded {saved}: 2 user message(s)" in result.stderr
    assert "Error" not in result.stderr
    # --verbose: the third turn continued from the loaded caches.
    stats = re.findall(r"prompt (\d+) tokens: (\d+) reused, (\d+) prefilled", result.stderr)
    assert len(stats) == 3 and int(stats[0][1]) == 0 and int(stats[2][1]) > 0
    model, processor = load(tiny_path)
    history = ChatSession.load(saved, model, processor).history
    assert [m["role"] for m in history] == ["user", "assistant"] * 2


def test_hide_thinking(tiny_path):
    result = chat(tiny_path, "Hello there\n", "--hide-thinking")
    assert result.exit_code == 0, result.output
    assert result.stdout == expected_replies(tiny_path, ["Hello there"], hide_thinking=True)
    assert "<think>" not in result.stdout


def test_commands_and_errors_keep_the_chat_going(tiny_path, tmp_path):
    image = tmp_path / "dots.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    broken = tmp_path / "broken.session"
    broken.write_bytes(b"not a session at all")
    saved = tmp_path / "after.session"
    stdin = "\n".join(
        [
            "/help",
            "/image nowhere.png",
            f"/load {broken}",
            "/bogus",
            "/save",
            f"/image {image}",
            "What is in it?",
            "/reset",
            "Hi",
            f"/save {saved}",
        ]
    )
    result = chat(tiny_path, stdin + "\n")  # ends at end of input, no /exit needed
    assert result.exit_code == 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 4
    assert errors[0] == "Error: nowhere.png: no such file"
    assert errors[1].startswith(f"Error: {broken}: not a readable session file (")
    assert errors[2:] == [
        "Error: unknown command /bogus; /help lists the commands",
        "Error: usage: /save FILE",
    ]
    assert "/image PATH" in result.stderr and "Started over." in result.stderr
    assert result.stdout.count("</think>") == 2
    model, processor = load(tiny_path)
    history = ChatSession.load(saved, model, processor).history
    assert [m["content"] for m in history if m["role"] == "user"] == ["Hi"]  # /reset worked


def test_image_flag_goes_with_the_first_message(tiny_path, tmp_path):
    image = tmp_path / "dots.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(image)
    saved = tmp_path / "img.session"
    args = ["--image", str(image), "--max-pixels", "4096"]
    result = chat(tiny_path, f"Describe\nAgain\n/save {saved}\n", *args)
    assert result.exit_code == 0, result.output
    model, processor = load(tiny_path)
    users = [m for m in ChatSession.load(saved, model, processor).history if m["role"] == "user"]
    assert users[0]["content"] == [
        {"type": "image", "image": str(image)},
        {"type": "text", "text": "Describe"},
    ]
    assert users[1]["content"] == "Again"


@pytest.mark.parametrize(
    "args, match",
    [
        (["--top-p", "2"], "top_p"),
        (["--image", "missing.png"], "missing.png: no such file"),
        (["--thinking-budget", "-1"], "thinking-budget"),
        (["--max-pixels", "10"], "max_pixels"),
    ],
)
def test_bad_flags_fail_before_loading(tiny_path, args, match):
    result = CliRunner().invoke(main, ["--model", tiny_path, *args], input="hi\n")
    assert result.exit_code != 0 and not result.stdout
    assert re.search(match, result.stderr)


class Terminal:
    """A subprocess on a pseudo-terminal; `expect` reads until a pattern shows up."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True
        )
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 120.0) -> str:
        start = len(self.seen)
        while pattern not in self.seen[start:]:
            ready, _, _ = select.select([self.master], [], [], timeout)
            assert ready, f"no {pattern!r} in {self.seen[start:]!r}"
            try:
                data = os.read(self.master, 4096)
            except OSError:  # the child closed the terminal
                data = b""
            assert data, f"ended before {pattern!r}: {self.seen[start:]!r}"
            self.seen += data.decode("utf-8", errors="replace")
        return self.seen[start:]

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        code = self.proc.wait(timeout=60)
        os.close(self.master)
        return code


def test_pseudo_terminal_session(tiny_path, tmp_path):
    env = dict(os.environ, **{CACHE_ENV: str(tmp_path)}, HF_HUB_OFFLINE="1")
    env.pop("NO_COLOR", None)
    saved = tmp_path / "pty.session"
    term = Terminal([sys.executable, "-m", "mlx_qwen35.chat", "--model", tiny_path, *FLAGS], env)
    try:
        assert "/help lists the commands" in term.expect(">> ")
        term.send("Hello there")
        first = term.expect(">> ")
        # Thinking is shown dimmed on a terminal, then the answer.
        assert DIM in first and RESET in first
        term.send("Tell me about the river town.")
        second = term.expect(">> ")
        assert DIM in second
        term.send(f"/save {saved}")
        assert "Saved to" in term.expect(">> ")
        term.send(f"/load {saved}")
        assert "Loaded" in term.expect(">> ")
        term.send("/exit")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert "RuntimeWarning" not in term.seen and "Traceback" not in term.seen
    model, processor = load(tiny_path)
    history = ChatSession.load(saved, model, processor).history
    assert [m["content"] for m in history if m["role"] == "user"] == [
        "Hello there",
        "Tell me about the river town.",
    ]
