"""python -m mlx_qwen35.server as a user runs it: --help at once, the URL printed once it can be
reached, bad flags refused before loading, SIGTERM stops it cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from mlx_qwen35.weights.tiny_random import CACHE_ENV, ensure_tiny_random


def run(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "mlx_qwen35.server", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def test_help_lists_the_flags():
    result = run("--help")
    assert result.returncode == 0
    for flag in (
        "--api-key",
        "--served-model-name",
        "--max-concurrency",
        "--prefix-cache-gb",
        "--allow-local-files",
        "--thinking-budget",
        "--log-level",
        "--port",
    ):
        assert flag in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temp", "-1"], "temp must be"),
        (["--top-p", "0"], "top_p must be"),
        (["--max-tokens", "0"], "max_tokens must be"),
    ],
)
def test_bad_flags_fail_before_loading(args, message):
    result = run("--model", "/nonexistent/model", *args)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and message in result.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serves_and_stops_on_sigterm(tmp_path):
    env = dict(os.environ, MLX_QWEN35_API_KEY="k", **{CACHE_ENV: str(tmp_path)})
    ensure_tiny_random(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_qwen35.server",
            "--model",
            "tiny-random",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = process.stderr.readline()
        assert line.strip() == f"Serving tiny-random at http://127.0.0.1:{port}/v1"
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/health").json() == {"status": "ok"}
        assert httpx.get(base + "/v1/models").status_code == 401  # the key from the env
        models = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert [m["id"] for m in models["data"]] == ["tiny-random"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
