"""Inputs a user types that are not what the program takes: seeds outside MLX's range and text
that is not UTF-8 (argv, stdin, chat lines), on the command lines and through the API. Each is
one line saying what to pass instead."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import mlx_qwen35
from mlx_qwen35.cli import chat, generate
from mlx_qwen35.errors import UserError
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(ensure_tiny_random(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return mlx_qwen35.load(tiny_path)


def one_error_line(stderr: str, match: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ") and re.search(match, lines[0]), lines[0]


SEED_RANGE = r"seed must be an integer from 0 to 18446744073709551615"


@pytest.mark.parametrize("command", [generate.main, chat.main])
@pytest.mark.parametrize("seed", ["-1", "18446744073709551616"])
def test_seed_out_of_range_on_the_command_lines(tiny_path, command, seed):
    result = CliRunner().invoke(command, ["--model", tiny_path, "--seed", seed], input="hi\n")
    assert result.exit_code == 1 and not result.stdout
    one_error_line(result.stderr, SEED_RANGE + f".*got {seed}")


def test_seed_range_through_the_api(tiny):
    model, processor = tiny
    for seed in (-1, 2**64, 1.5, True):
        with pytest.raises(UserError, match=SEED_RANGE):
            mlx_qwen35.generate(model, processor, "hi", max_tokens=1, seed=seed)
        with pytest.raises(UserError, match=SEED_RANGE):
            mlx_qwen35.ChatSession(model, processor, seed=seed)
    # The ends of the range are seeds.
    for seed in (0, 2**64 - 1):
        assert isinstance(mlx_qwen35.generate(model, processor, "hi", max_tokens=1, seed=seed), str)


def _run(args: list, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", *args],
        input=stdin,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": path},
        timeout=300,
    )


def test_prompt_that_is_not_utf8_in_argv_or_stdin(tiny_path):
    argv = _run(["mlx_qwen35.generate", "--model", tiny_path, "--prompt", b"hi \xff there"])
    assert argv.returncode == 1 and not argv.stdout
    one_error_line(argv.stderr.decode(), r"the prompt is not valid UTF-8 text \(byte 0xff")
    piped = _run(["mlx_qwen35.generate", "--model", tiny_path, "-p", "-"], stdin=b"hi \xfe\xff")
    assert piped.returncode == 1 and not piped.stdout
    one_error_line(piped.stderr.decode(), r"prompt on stdin is not valid UTF-8 text \(byte 0xfe")
    system = CliRunner().invoke(generate.main, ["--model", tiny_path, "--system", "a\udcffb"])
    assert system.exit_code == 1
    one_error_line(system.stderr, "the system prompt is not valid UTF-8")


def test_chat_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(tiny_path):
    flags = ["--model", tiny_path, "--temp", "0", "-m", "3", "--thinking-budget", "1"]
    out = _run(["mlx_qwen35.chat", *flags], stdin=b"caf\xe9 au lait\nHello\n")
    assert out.returncode == 0, out.stderr
    stderr = out.stderr.decode()
    assert "Traceback" not in stderr
    one_error_line(stderr, r"that line is not valid UTF-8 text \(byte 0xe9 at character 3\)")
    assert out.stdout.decode().count("</think>") == 1  # "Hello" was answered


def test_api_text_with_lone_surrogates(tiny):
    model, processor = tiny
    with pytest.raises(UserError, match="lone surrogate"):
        mlx_qwen35.generate(model, processor, "hi \udcff", max_tokens=1)
    with pytest.raises(UserError, match="lone surrogate"):
        processor.encode("\ud800")


def test_too_long_prompt_is_one_line_and_nothing_else(tiny_path):
    """The error alone: no tokenizer library warning about the length before it."""
    out = _run(["mlx_qwen35.generate", "--model", tiny_path, "-p", "word " * 3000, "-m", "1"])
    assert out.returncode == 1 and not out.stdout
    assert out.stderr.decode().count("\n") == 1, out.stderr
    one_error_line(out.stderr.decode(), r"the prompt has \d+ tokens but the model's context is")
