"""Run the server in this process on 127.0.0.1 for tests that talk to it through real clients.

The listening socket is bound and listening before uvicorn starts, so clients can connect at
once: their connections wait in the backlog until the server accepts them (no polling, no sleep).
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from mlx_qwen35.engine.scheduler import Engine
from mlx_qwen35.server.app import create_app
from mlx_qwen35.server.state import ServerConfig, ServerState

SCRIPT = [
    "\n",  # the last token of the generation prompt "<think>\n"
    "Checking the weather in Paris.",
    "</think>",
    "\n\n",
    "<tool_call>",
    "\n<function=get_weather>\n",
    "<parameter=city>\n",
    "Paris",
    "\n</parameter>\n",
    "</function>\n",
    "</tool_call>",
    "<|im_end|>",
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


class RecordingEngine(Engine):
    """The engine, keeping the handles it gave out (tests look at their stats)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.handles: list[Any] = []

    def submit(self, request: Any) -> Any:
        handle = super().submit(request)
        self.handles.append(handle)
        return handle


class RunningServer:
    def __init__(self, model: Any, processor: Any, **settings: Any):
        import uvicorn

        settings.setdefault("served_model_names", ["qwen"])
        self.config = ServerConfig(model="scripted", **settings)
        self.engine = RecordingEngine(model, processor, max_batch_size=self.config.max_concurrency)
        self.engine.start()
        self.state = ServerState(self.config, model, processor, self.engine)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(self.state), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.engine.stop()
