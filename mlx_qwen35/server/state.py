"""What the server holds while it runs: its settings, the model, the engine, the stored
Responses, and the count of requests in flight (for queue-full 429s)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..engine.speculative import resolve_draft_model
from .errors import APIError
from .media import MediaLimits


@dataclass
class ServerConfig:
    """Server settings (the CLI's flags). sampling: defaults for temp, top_p, top_k, min_p,
    presence/frequency/repetition penalties and seed (None: the model card's value)."""

    model: str = "tiny-random"
    served_model_names: list[str] = field(default_factory=list)
    api_key: str | None = None
    max_tokens: int = 4096
    sampling: dict[str, Any] = field(default_factory=dict)
    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    max_concurrency: int = 8
    max_queue: int = 64
    prefix_cache_gb: float = 4.0
    max_body_bytes: int = 64 * 1024 * 1024
    media: MediaLimits = field(default_factory=MediaLimits)
    max_stored_responses: int = 256
    draft_model: str | None = None  # speculative decoding: "mtp" or a draft checkpoint
    num_draft_tokens: int = 3
    draft_vocab: int | None = None
    kv_bits: int | None = None  # KV-cache quantization of every request (engine/kv_settings.py)
    kv_group_size: int = 64
    quantized_kv_start: int = 5000
    distributed: str | None = None  # "tensor" or "pipeline": rank 0 of an mlx.launch run

    @property
    def model_names(self) -> list[str]:
        return self.served_model_names or [self.model]


class ServerState:
    def __init__(self, config: ServerConfig, model: Any, processor: Any, engine: Any):
        self.config = config
        self.model = model
        self.processor = processor
        self.engine = engine
        # "mtp" or the loaded draft model, for every request (engine/speculative.py: a request
        # speculates while it is the only one decoding).
        self.draft_model = resolve_draft_model(config.draft_model, model, processor)
        self.created = int(time.time())
        self.vocab_size = processor.config.text.vocab_size
        ids = processor.encode("</think>")
        self.think_end = ids[0] if len(ids) == 1 else None
        self.media_lock = threading.Lock()
        self.responses: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._inflight = 0
        self._lock = threading.Lock()

    def check_model(self, name: str | None, param: str = "model") -> str:
        """The served name a request asked for; 404 for a model this server does not serve."""
        names = self.config.model_names
        if name is None or name == "":
            return names[0]
        if name not in names:
            raise APIError(
                404,
                f"the model {name!r} does not exist here; this server serves "
                f"{', '.join(repr(n) for n in names)}",
                param=param,
                code="model_not_found",
            )
        return name

    def check_capacity(self) -> None:
        """429 when the engine's slots and queue are all taken (checked before a request is
        accepted, so a streaming client gets the error instead of a broken stream)."""
        limit = self.config.max_concurrency + self.config.max_queue
        if self._inflight >= limit:
            raise APIError(
                429,
                f"the server is busy ({self._inflight} requests in flight); retry shortly",
                code="rate_limit_exceeded",
            )

    def started(self) -> None:
        with self._lock:
            self._inflight += 1

    def ended(self) -> None:
        with self._lock:
            self._inflight -= 1

    def store_response(self, response_id: str, record: dict[str, Any]) -> None:
        self.responses[response_id] = record
        while len(self.responses) > self.config.max_stored_responses:
            self.responses.popitem(last=False)
