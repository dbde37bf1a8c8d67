"""What a caller hands the engine and what it gets back.

    handle = engine.submit(Request(prompt=ids, max_tokens=64, sampling=SamplingParams(temp=0.7)))
    for event in handle:            # TokenEvent, as soon as each token is sampled
        print(event.token, event.finish_reason)
    handle.stats                    # RequestStats: prompt/cached/prefilled tokens, speeds, ...
    handle.cancel()                 # frees the row at the next step

A `Request` carries its prompt as token ids (for images and videos: the expanded placeholder ids,
plus the merged embeddings and 3-D positions from `Model.prepare_inputs`), its sampling settings,
logits processors (grammar constraints are one), stop ids and the prefix-cache hints: message
`boundaries` where a snapshot is kept, `media_spans` never resumed inside, `cache_final` to keep the
state after the reply. Iterating a handle drives the engine when no background loop runs, so the
synchronous API needs no thread of its own (see scheduler.py).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import mlx.core as mx

from ..errors import UserError
from ..model.cache import DEFAULT_KV_GROUP_SIZE, DEFAULT_QUANTIZED_KV_START

if TYPE_CHECKING:
    from .prefix_cache import PrefixEntry
    from .scheduler import Engine

# MLX's random seed is an unsigned 64-bit integer (what mx.random.key takes).
MAX_SEED = 2**64 - 1

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class SamplingParams:
    """How one request picks its tokens (the semantics of mlx-lm's sampler, per row).

    temp: 0 = greedy. top_p / min_p / top_k cut the distribution (on the log-probabilities before
    temperature, as mlx-lm does); repetition_penalty divides (multiplies, if negative) the logits
    of the last `repetition_context_size` tokens, prompt included; presence_penalty is subtracted
    once from every token generated so far, frequency_penalty once per occurrence (OpenAI/vLLM).
    seed: a private random stream for this request, so batching never changes its samples.
    top_logprobs: how many alternatives each TokenEvent carries.
    """

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

    def check(self) -> None:
        """Raise UserError, saying what to pass instead, for any out-of-range setting."""
        if not _is_num(self.temp) or self.temp < 0:
            raise UserError(f"temp must be a number >= 0 (0 = greedy), got {self.temp!r}")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise UserError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise UserError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        rp = self.repetition_penalty
        if rp is not None and (not _is_num(rp) or rp <= 0):
            raise UserError(f"repetition_penalty must be a number > 0 (1 = off), got {rp!r}")
        size = self.repetition_context_size
        if not _is_int(size) or size < 1:
            raise UserError(f"repetition_context_size must be an integer >= 1, got {size!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not _is_num(value):
                raise UserError(f"{name} must be a finite number, got {value!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise UserError(
                f"seed must be an integer from 0 to {MAX_SEED} (2**64 - 1), got {self.seed!r}"
            )
        if not _is_int(self.top_logprobs) or self.top_logprobs < 0:
            raise UserError(f"top_logprobs must be an integer >= 0, got {self.top_logprobs!r}")


class MediaSpan(NamedTuple):
    """Prompt positions [start, end) of an image or video (or a message holding some). The
    prefix cache never resumes strictly inside one; `key` names the media's content, so that a
    state covering it is reused only for the same pixels (None: the engine hashes the span's
    embeddings)."""

    start: int
    end: int
    key: str | None = None


@dataclass
class Request:
    """One generation: see the module docstring.

    prompt: token ids. max_tokens: most tokens to generate.
    input_embeddings [T', H] (or [1, T', H]) and position_ids [3, T'] (or [3, 1, T']): the merged
        embeddings and 3-D positions of the last T' <= T prompt tokens (T' < T only together with
        a `prefix` that covers the rest: the engine resumes from it).
    logits_processors: `(tokens [n] (prompt + generated so far), logits [1, V]) -> logits`; one
        that must see each generated token once, in order, says so with `stateful = True`. They
        run on whichever thread drives the engine: an array a processor keeps must be evaluated
        (a lazy array made on another thread cannot be computed there).
    stop_token_ids: ids that end the reply (default: the processor's end-of-turn ids).
    boundaries: prompt positions where the prefix cache keeps a snapshot (message ends).
    media_spans: MediaSpan or (start, end) ranges of the prompt never resumed inside.
    cache_final: keep the state after the reply (prompt + generated tokens) in the prefix cache:
        an agent's next request usually extends it.
    prefix: a prefix-cache entry to resume from (from `engine.prefix_cache.lookup`), instead of
        the engine's own lookup; it must cover a prefix of the prompt.
    cache_owner: a tag put on the prefix-cache entries this request makes (ChatSession prunes its
        own).
    prefill_step_size: prompt tokens per prefill chunk (default: the engine's).
    on_prefill: called as on_prefill(done, total) after each prefill chunk (a progress bar), on
        the thread that runs the engine.
    draft_model: speculative decoding (speculative.py): "mtp" (the model's own MTP head) or a
        draft `Model` sharing the tokenizer; None decodes plainly. The output is the same.
    num_draft_tokens: tokens drafted per verification (1 to 7).
    draft_vocab: let draft heads score only this many token ids (draft_vocab.py); None: all.
    kv_bits / kv_group_size / quantized_kv_start: quantize the full-attention KV cache (4 or 8
        bits, groups of kv_group_size) once it holds quantized_kv_start tokens, as mlx-lm does
        (see kv_settings.py); rows of different formats decode in separate batches.
    """

    prompt: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    input_embeddings: mx.array | None = None
    position_ids: mx.array | None = None
    logits_processors: Sequence[LogitsProcessor] = ()
    stop_token_ids: Collection[int] | None = None
    boundaries: Sequence[int] = ()
    media_spans: Sequence[MediaSpan | tuple[int, int]] = ()
    cache_final: bool = False
    prefix: PrefixEntry | None = None
    cache_owner: Any = None
    prefill_step_size: int | None = None
    on_prefill: Callable[[int, int], None] | None = None
    draft_model: Any = None
    num_draft_tokens: int = 3
    draft_vocab: int | None = None
    kv_bits: int | None = None
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START


class TokenEvent:
    """One sampled token.

    token: the id. logprobs: the log-probabilities [V] it was drawn from (after logits processors
    and penalties, before temperature and truncation), computed when first read, on the reader's
    thread. top_logprobs: [(token, logprob)] best first, when the request asked for them.
    from_draft: accepted from a speculative draft. finish_reason: None, "stop" (a stop id, which
    is this token) or "length" (max_tokens reached with this token). Made with either `logprobs`
    or `logits` (an evaluated row [V] that the first read of `logprobs` normalises).
    """

    __slots__ = ("token", "_logprobs", "_logits", "top_logprobs", "from_draft", "finish_reason")

    def __init__(
        self,
        token: int,
        logprobs: mx.array | None = None,
        top_logprobs: list[tuple[int, float]] | None = None,
        from_draft: bool = False,
        finish_reason: str | None = None,
        *,
        logits: mx.array | None = None,
    ):
        self.token = token
        self._logprobs = logprobs
        self._logits = logits
        self.top_logprobs = top_logprobs
        self.from_draft = from_draft
        self.finish_reason = finish_reason

    @property
    def logprobs(self) -> mx.array:
        if self._logprobs is None:
            # The engine hands out the evaluated logits row [V]; normalising it here, lazily and
            # on the reader's stream, costs the engine nothing when nobody reads it.
            row = self._logits
            self._logprobs = row - mx.logsumexp(row, axis=-1, keepdims=True)
            self._logits = None
        return self._logprobs

    def __repr__(self) -> str:
        return (
            f"TokenEvent(token={self.token}, finish_reason={self.finish_reason!r}, "
            f"from_draft={self.from_draft})"
        )


@dataclass
class RequestStats:
    """prompt_tokens: prompt length; cached_tokens: resumed from the prefix cache;
    prefilled_tokens: run through prefill (prompt - cached); generation_tokens: sampled so far;
    prompt_tps: prefilled tokens per second up to the first token; generation_tps: tokens per
    second after the first; peak_memory: GB; finish_reason: None while running, then "stop",
    "length", "cancelled" or "error". Speculative decoding: draft_tokens proposed and
    accepted_tokens kept (the acceptance rate is their ratio)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    finish_reason: str | None = None
    draft_tokens: int = 0
    accepted_tokens: int = 0


class RequestHandle:
    """The caller's end of a submitted request: iterate it for TokenEvents; `cancel()`.

    Iterating drives the engine when no background loop runs (see `Engine`); an error raised
    while running the request (a logits processor's, say) is raised here.
    """

    def __init__(self, engine: Engine, request: Request, uid: int):
        self.engine = engine
        self.request = request
        self.uid = uid
        self.stats = RequestStats(prompt_tokens=len(request.prompt))
        self.tokens: list[int] = []  # generated so far (what the events carried)
        self._events: deque[TokenEvent] = deque()
        self._finished = False
        self._error: BaseException | None = None
        self._cancelled = threading.Event()

    # Set by the engine (under its lock), read by the consumer.
    def _push(self, event: TokenEvent) -> None:
        if self._cancelled.is_set():
            return
        self.tokens.append(event.token)
        self._events.append(event)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        self.stats.finish_reason = reason
        self._error = error
        self._finished = True

    @property
    def done(self) -> bool:
        """Finished (or cancelled or failed), and every event handed out."""
        return self._finished and not self._events

    @property
    def finished(self) -> bool:
        return self._finished

    def cancel(self) -> None:
        """Stop generating: events not yet read are dropped, the row (or the queued request)
        leaves at the next step and its cache is freed; iteration ends, with finish_reason
        "cancelled" (unless the request had already finished)."""
        with self.engine._cv:
            self._cancelled.set()
            self._events.clear()
            self.engine._cv.notify_all()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[TokenEvent]:
        return self

    def __next__(self) -> TokenEvent:
        self.engine._wait_for(self)
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        raise StopIteration
