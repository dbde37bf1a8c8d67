"""The engine interface the server drives (ENGINE_CONTRACT: Request, SamplingParams, TokenEvent,
Engine.submit / start / stop, RequestHandle), run one request at a time on one worker thread over
`generate_step`, until the batching engine replaces it."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..threads import release_thread_state_at_exit


@dataclass
class SamplingParams:
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    top_logprobs: int = 0


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    input_embeddings: mx.array | None = None
    position_ids: mx.array | None = None
    logits_processors: list = field(default_factory=list)
    stop_token_ids: set[int] = field(default_factory=set)
    boundaries: list[int] = field(default_factory=list)
    media_spans: list[tuple[int, int]] = field(default_factory=list)
    cache_final: bool = False


@dataclass
class TokenEvent:
    token: int
    logprobs: mx.array
    top_logprobs: list[tuple[int, float]] | None
    from_draft: bool = False
    finish_reason: str | None = None


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    finish_reason: str | None = None


_DONE = object()


class RequestHandle:
    def __init__(self, request: Request):
        self.request = request
        self.stats = Stats(prompt_tokens=len(request.prompt))
        self.cancelled = threading.Event()
        self._events: queue.Queue = queue.Queue()

    def __iter__(self) -> Iterator[TokenEvent]:
        while (event := self._events.get()) is not _DONE:
            if isinstance(event, BaseException):
                raise event
            yield event

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    def __init__(self, model: Any, processor: Any, *, max_batch_size: int = 1, **_: Any):
        self.model = model
        self.processor = processor
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, request: Request) -> RequestHandle:
        handle = RequestHandle(request)
        self._jobs.put(handle)
        return handle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        release_thread_state_at_exit()
        while (handle := self._jobs.get()) is not None:
            try:
                self._run(handle)
            except Exception as e:  # keep serving; the request ends with its error
                handle.stats.finish_reason = "error"
                handle._events.put(e)
            finally:
                handle._events.put(_DONE)

    def _run(self, handle: RequestHandle) -> None:
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        from ..engine.generate import generate_step

        request, s = handle.request, handle.request.sampling
        if handle.cancelled.is_set():
            handle.stats.finish_reason = "cancelled"
            return
        if s.seed is not None:
            mx.random.seed(s.seed)
        sampler = make_sampler(s.temp, top_p=s.top_p, min_p=s.min_p, top_k=s.top_k)
        processors = list(request.logits_processors) + make_logits_processors(
            repetition_penalty=s.repetition_penalty,
            repetition_context_size=s.repetition_context_size,
        )
        presence = make_logits_processors(
            presence_penalty=s.presence_penalty or None,
            presence_context_size=request.max_tokens,
            frequency_penalty=s.frequency_penalty or None,
            frequency_context_size=request.max_tokens,
        )
        extra = {}
        if request.input_embeddings is not None:
            extra["input_embeddings"] = request.input_embeddings
            extra["position_ids"] = request.position_ids
        tic = time.perf_counter()
        steps = generate_step(
            self.model,
            mx.array(request.prompt, dtype=mx.uint32),
            max_tokens=request.max_tokens,
            sampler=sampler,
            logits_processors=processors,
            presence_processors=presence,
            **extra,
        )
        handle.stats.prefilled_tokens = len(request.prompt)
        n = 0
        try:
            for n, (token, logprobs) in enumerate(steps, 1):
                if n == 1:
                    handle.stats.prompt_tps = len(request.prompt) / (time.perf_counter() - tic)
                    tic = time.perf_counter()
                finish = None
                if token in request.stop_token_ids:
                    finish = "stop"
                elif n == request.max_tokens:
                    finish = "length"
                elif handle.cancelled.is_set():
                    finish = "cancelled"
                top = None
                if s.top_logprobs:
                    order = mx.argsort(-logprobs)[: s.top_logprobs].tolist()
                    top = [(i, logprobs[i].item()) for i in order]
                handle._events.put(TokenEvent(token, logprobs, top, finish_reason=finish))
                if finish is not None:
                    handle.stats.finish_reason = finish
                    break
        finally:
            steps.close()
            elapsed = time.perf_counter() - tic
            handle.stats.generation_tps = (n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0
            handle.stats.peak_memory = mx.get_peak_memory() / 1e9
