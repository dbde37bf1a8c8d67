"""`python -m mlx_qwen35.server --distributed` under `mlx.launch --backend ring -n 2` on
127.0.0.1: concurrent greedy replies (one constrained by a grammar, which runs on rank 0 only)
equal the single-process server's, a stream closed midway and a stop string free their rows on
both ranks, images are refused, SIGTERM to rank 0 stops both ranks, and a follower whose rank 0
dies exits non-zero."""

from __future__ import annotations

import base64
import io
import os
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from server_harness import RunningServer
from test_distributed import LAUNCH, free_port

from mlx_qwen35.weights.loading import load
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

HERE = Path(__file__).parent
TIMEOUT = 60
PROMPTS = ["hi", "Tell me about the sea.", "Count: one, two,"]
JSON_FORMAT = {"type": "json_object"}
pytestmark = pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch not installed")


def chat(base: str, prompt: str, max_tokens: int = 10, **extra) -> dict:
    body = {
        "model": "qwen",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }
    response = httpx.post(base + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    return {"status": response.status_code, **response.json()}


def text(reply: dict) -> tuple:
    choice = reply["choices"][0]
    return (
        choice["message"].get("reasoning_content"),
        choice["message"]["content"],
        choice["finish_reason"],
    )


class Launched:
    """The server under mlx.launch: its stderr lines, rank 0's pid, a bounded stop."""

    def __init__(self, model: Path, mode: str):
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        command = [LAUNCH, "--backend", "ring", "-n", "2", "--starting-port", str(free_port())]
        server = ["-m", "mlx_qwen35.server", "--model", str(model), "--distributed", mode]
        server += ["--port", str(self.port), "--served-model-name", "qwen"]
        self.process = subprocess.Popen(
            [*command, sys.executable, *server, "--log-level", "warning"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_serving(self) -> str:
        while (line := self.lines.get(timeout=TIMEOUT)) is not None:
            if line.startswith("Serving"):
                return line.strip()
        raise AssertionError("".join(self.stderr)[-3000:])

    def rank_pid(self, rank: int) -> int:
        """The pid of this launch's rank (found by its port and MLX_RANK)."""
        for entry in Path("/proc").iterdir():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if str(self.port).encode() in cmdline and f"MLX_RANK={rank}".encode() in environ:
                return int(entry.name)
        raise AssertionError(f"no rank {rank} process")

    def finish(self) -> tuple[int, str, str]:
        stdout = self.process.stdout.read()
        code = self.process.wait(timeout=TIMEOUT)
        return code, stdout, "".join(self.stderr)

    def kill(self) -> None:
        if self.process.poll() is None:
            for rank in (0, 1):
                try:
                    os.kill(self.rank_pid(rank), signal.SIGKILL)
                except (AssertionError, ProcessLookupError):
                    pass
            self.process.kill()
            self.process.wait(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_random(tmp_path_factory.mktemp("dserver"))


@pytest.fixture(scope="module")
def reference(tiny):
    """The single-process server's replies to the requests below."""
    model, processor = load(tiny)
    server = RunningServer(model, processor)
    try:
        return {
            "plain": [chat(server.url, p) for p in PROMPTS],
            "json": chat(server.url, PROMPTS[0], 12, response_format=JSON_FORMAT),
            "long": chat(server.url, PROMPTS[1], 24),
        }
    finally:
        server.close()


def png() -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_tensor_parallel_server(tiny, reference):
    server = Launched(tiny, "tensor")
    try:
        assert server.wait_serving().endswith(f"127.0.0.1:{server.port}/v1")
        base = server.base
        with ThreadPoolExecutor(4) as pool:  # together: the rows batch on both ranks
            plain = [pool.submit(chat, base, p) for p in PROMPTS]
            constrained = pool.submit(chat, base, PROMPTS[0], 12, response_format=JSON_FORMAT)
            for got, want in zip(plain, reference["plain"], strict=True):
                assert text(got.result()) == text(want)
            assert text(constrained.result()) == text(reference["json"])
        # A stream closed after two chunks: its row leaves on both ranks, the next one runs.
        body = {
            "model": "qwen",
            "messages": [{"role": "user", "content": PROMPTS[2]}],
            "max_tokens": 500,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
            lines = r.iter_lines()
            assert [next(lines) for _ in range(4)]
        # A stop string (rank 0 cancels the row) cuts the reply where the single server's is.
        long = reference["long"]
        reasoning = long["choices"][0]["message"]["reasoning_content"]
        stop = reasoning[len(reasoning) // 2 :][:3]
        stopped = chat(base, PROMPTS[1], 24, stop=[stop])
        assert stopped["choices"][0]["finish_reason"] == "stop"
        assert long["choices"][0]["message"]["reasoning_content"].startswith(
            stopped["choices"][0]["message"]["reasoning_content"]
        )
        assert text(chat(base, PROMPTS[1], 24)) == text(long)
        image = [{"type": "image_url", "image_url": {"url": png()}}, {"type": "text", "text": "?"}]
        refused = chat(base, image)
        assert refused["status"] == 400 and "--distributed" in refused["error"]["message"]
        os.kill(server.rank_pid(0), signal.SIGTERM)
        code, stdout, stderr = server.finish()
        assert code == 0 and "exited with code" not in stderr, stderr[-3000:]
        assert stdout == "" and stderr.count("Serving") == 1  # rank 0 prints, once
    finally:
        server.kill()


def test_pipeline_server_and_a_lost_rank0(tiny, reference):
    server = Launched(tiny, "pipeline")
    try:
        server.wait_serving()
        assert text(chat(server.base, PROMPTS[0])) == text(reference["plain"][0])
        os.kill(server.rank_pid(0), signal.SIGKILL)
        code, _, stderr = server.finish()
        assert "rank 1 lost rank 0" in stderr and "rank 1 exited with code 1" in stderr
    finally:
        server.kill()
