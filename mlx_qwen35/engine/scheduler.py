"""The engine: one scheduler owns a model and runs every request in one loop of steps.

    engine = engine_for(model, processor)          # the model's shared engine
    handle = engine.submit(Request(prompt=ids, max_tokens=32))
    for event in handle: ...                       # TokenEvents (request.py)

Each `step()`:
1. drops cancelled requests (and requests whose handle was dropped), freeing their caches;
2. decodes every running row in one batched forward (B = running rows): the tokens sampled last
   step are fed, the next ones are sampled and queued (`mx.async_eval`) before the last ones are
   read and handed out, so the device works while Python streams (gpt-fast's pipelining);
   rows that stop (a stop id, max_tokens) leave the batch;
3. advances the prefill of one waiting request by one chunk (`prefill_step_size` tokens, ending
   early at message boundaries for the prefix cache); when its prompt is done it samples its
   first token and joins the batch. Nobody else is prefilled again.

Who drives: with `start()` a background thread runs steps whenever there is work (the server).
Without it, iterating a handle runs steps until that handle has an event: the synchronous API
(generate, ChatSession) needs no thread, and requests submitted from several threads batch
together, one of the waiting threads driving at a time. MLX streams belong to the thread that
made them, so the engine computes on a stream of its own made for any thread
(`mx.new_thread_unsafe_stream`), and only ever from inside `step`, which one thread runs at a time
(`_step_lock`). What leaves the engine is evaluated data (token ids, logits rows).

Prefill goes through `model.hidden_states` (the head runs on the last prompt position only),
decode through `model(...)`; tests count prefilled tokens that way.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Any

import mlx.core as mx

from ..errors import UserError
from .batch_cache import Batch
from .pending import Pending
from .prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, PrefixCache
from .request import Request, RequestHandle, TokenEvent
from .rows import Row, check_request
from .sampling import _top_logprobs, check_prefill_step_size, sample_batch
from .speculative import decode_positions, speculative_round

DEFAULT_MAX_BATCH_SIZE = 8
# Free MLX's buffer cache every this many decode steps (as mlx-lm does), and when idle.
CLEAR_CACHE_EVERY = 256


class Engine:
    """Continuous batching of one model's requests (see the module docstring).

    max_batch_size: most rows decoded together; more requests wait. prefill_step_size: prompt
    tokens per prefill chunk (one chunk per step). prefix_cache_bytes: bound of the prefix cache.
    """

    def __init__(
        self,
        model: Any,
        processor: Any = None,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        prefill_step_size: int = 2048,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    ):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise UserError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        check_prefill_step_size(prefill_step_size)
        self.model = model
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.prefill_step_size = prefill_step_size
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        eos = getattr(processor, "eos_token_ids", None) or ()
        self._stop_ids = frozenset(int(t) for t in eos)
        config = getattr(model, "config", None)
        self._media_ids = tuple(
            t
            for t in (
                getattr(config, "image_token_id", None),
                getattr(config, "video_token_id", None),
            )
            if t is not None
        )
        self._stream = mx.new_thread_unsafe_stream(mx.default_device())
        self._cv = threading.Condition()
        self._step_lock = threading.Lock()
        self._uids = itertools.count()
        self._incoming: deque[Row] = deque()  # submitted since the last step began
        self._waiting: deque[Row] = deque()
        self._prefilling: Row | None = None
        self._running: list[Row] = []
        self._cache: Batch | None = None  # the running rows' caches, one batch per KV format
        self._pending: Pending | None = None  # sampled tokens not yet handed out
        self._steps = 0
        self._wired: int | None = None  # the wired-memory limit to restore when idle (Metal)
        self._thread: threading.Thread | None = None
        self._stopping = False
        # A StepSync (step_sync.py) when the model is spread over several processes: every rank
        # then runs the same steps over the same rows, as rank 0 decides.
        self.sync: Any = None

    # ------------------------------------------------------------------ public

    def submit(self, request: Request) -> RequestHandle:
        """Queue a request; iterate the returned handle for its tokens."""
        check_request(request, self.model)
        if self.sync is not None:
            self.sync.check(request)
        handle = RequestHandle(self, request, next(self._uids))
        row = self._row(handle)
        with self._cv:
            self._incoming.append(row)
            self._cv.notify_all()
        return handle

    def _row(self, handle: RequestHandle) -> Row:
        return Row(handle, self.model, self._stop_ids, self._media_ids, self.processor)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._incoming) + len(self._waiting) + (self._prefilling is not None)

    def has_work(self) -> bool:
        return bool(
            self._incoming or self._waiting or self._prefilling is not None or self._running
        )

    def step(self) -> None:
        """One scheduler step (see the module docstring). Thread-safe; blocks while another
        thread steps."""
        with self._step_lock:
            self._step()
        with self._cv:
            self._cv.notify_all()

    def start(self) -> None:
        """Run steps on a background thread whenever there is work (until `stop()`)."""
        with self._cv:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(
                target=self._loop, name="mlx-qwen35-engine", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """End the background loop (requests left are then driven by their consumers)."""
        with self._cv:
            thread, self._stopping = self._thread, True
            self._cv.notify_all()
        if thread is not None:
            thread.join()
        with self._cv:
            self._thread = None
            self._cv.notify_all()

    # ------------------------------------------------------------------ driving

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.has_work():
                    self._cv.wait()
                if self._stopping:
                    return
            self.step()

    def _wait_for(self, handle: RequestHandle) -> None:
        """Return when `handle` has an event or has finished, stepping the engine meanwhile
        unless the background loop does."""
        while True:
            with self._cv:
                if handle._events or handle._finished:
                    return
                if self._thread is not None or not self._step_lock.acquire(blocking=False):
                    self._cv.wait()
                    continue
            try:
                self._step()
            finally:
                with self._cv:
                    self._step_lock.release()
                    self._cv.notify_all()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # ------------------------------------------------------------------ one step

    def _step(self) -> None:
        self._wire(True)
        try:
            with mx.stream(self._stream):
                self._drop_cancelled(self._begin_step())
                if self._running:
                    self._decode()
                if self._prefilling is None and len(self._running) < self.max_batch_size:
                    with self._cv:
                        self._prefilling = self._waiting.popleft() if self._waiting else None
                if self._prefilling is not None:
                    self._prefill(self._prefilling)
        except Exception as e:  # whatever broke, the requests in flight end with it, not the engine
            for row in [*self._running, self._prefilling]:
                if row is not None:
                    self._finish(row, "error", e)
            self._running, self._prefilling = [], None
            self._cache = self._pending = None
        if not self.has_work():
            self._cache = self._pending = None
            mx.clear_cache()
            self._wire(False)

    def _wire(self, busy: bool) -> None:
        """On an Apple GPU, keep the model's memory wired while requests run (as mlx-lm's
        generate does), and give the old limit back when the engine goes idle."""
        if (self._wired is not None) == busy or mx.default_device() != mx.gpu:
            return
        if busy:
            limit = mx.device_info()["max_recommended_working_set_size"]
            self._wired = mx.set_wired_limit(limit)
        else:
            mx.synchronize(self._stream)
            mx.set_wired_limit(self._wired)
            self._wired = None

    def _begin_step(self) -> set[int] | None:
        """Queue the requests submitted since the last step. With a sync, the ranks agree on
        them and on the rows to drop: returns those rows' uids (None: the ones cancelled now)."""
        with self._cv:
            new = list(self._incoming)
            self._incoming.clear()
        doomed = None
        if self.sync is not None:
            new, doomed = self.sync.exchange(self, new)
        with self._cv:
            self._waiting.extend(new)
        return doomed

    def _drop_cancelled(self, doomed: set[int] | None = None) -> None:
        def gone(r: Row) -> bool:
            return r.cancelled if doomed is None else r.uid in doomed

        with self._cv:
            for row in [r for r in self._waiting if gone(r)]:
                self._waiting.remove(row)
                self._finish(row, "cancelled")
        if self._prefilling is not None and gone(self._prefilling):
            row, self._prefilling = self._prefilling, None
            row.cache = None
            self._finish(row, "cancelled")
        gone_rows = [i for i, r in enumerate(self._running) if gone(r)]
        if gone_rows:
            for i in gone_rows:
                self._finish(self._running[i], "cancelled")
            self._remove(gone_rows)

    def _prefill(self, row: Row) -> None:
        try:
            if row.cache is None:
                row.admit(self.model, self.prefix_cache)
            if not row.prefill_chunk(self.model, self.prefill_step_size, self.prefix_cache):
                return
            pending = self._agree(row.first_token())
            if row.sampler.error is not None:
                if self.sync is None:
                    raise row.sampler.error
                self._fail_later(row)
        except Exception as e:  # the request fails, the engine goes on
            self._prefilling = None
            row.cache = None
            self._finish(row, "error", e)
            return
        pending = Pending.of(*pending)
        pending.schedule()
        self._cache = self._cache or Batch()
        self._cache.add(row.cache, row.kv_format())
        row.cache = None
        self._pending = pending if self._pending is None else self._pending.join(pending)
        self._running.append(row)
        self._prefilling = None

    def _decode(self) -> None:
        rows = self._running
        pending = self._pending
        tokens = pending.tokens
        if len(rows) == 1 and rows[0].spec is not None:  # speculation: see speculative.py
            k = rows[0].spec.budget(len(rows[0].generated), rows[0].max_tokens)
            k = rows[0].kv.draft_budget(rows[0].fed, k)  # a round never crosses the KV threshold
            if k >= 1 and int(tokens[0].item()) not in rows[0].stop:
                self._decode_speculative(rows[0], k)
                return
        following = None
        try:
            if any(len(r.generated) + 1 < r.max_tokens for r in rows):
                out = self._forward(rows, tokens)
                sampled = self._agree(sample_batch(out, [r.sampler for r in rows], tokens))
                following = Pending.of(*sampled)
                following.schedule(self._cache.arrays())
                for i, r in enumerate(rows):
                    r.fed += 1
                    self._convert_if_due(i, r)
            ids = tokens.tolist()
            top = pending.top_lists()
        except Exception as e:  # a failed forward fails every row of the batch
            for r in rows:
                self._finish(r, "error", e)
            self._running, self._cache, self._pending = [], None, None
            return
        now = time.perf_counter()
        finished: list[int] = []
        with self._cv:
            for i, r in enumerate(rows):
                reason = self._emit(r, i, ids[i], pending.logits[i], top, now)
                failing = r.sampler.error is not None
                if failing and reason is None and self.sync is not None:
                    self._fail_later(r)
                elif reason is not None or failing:
                    finished.append(i)
        self._steps += 1
        if self._steps % CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()
        self._pending = following
        if finished:
            for i in finished:
                r = rows[i]
                if r.sampler.error is not None and r.handle is not None and not r.handle.finished:
                    self._finish(r, "error", r.sampler.error)
                elif r.request.cache_final:
                    r.keep_final(self._cache.extract(i), self.prefix_cache)
            self._remove(finished)

    def _forward(self, rows: list[Row], tokens: mx.array) -> mx.array:
        """Logits [B, V] of one decode step; rows that speculate when alone are handed their
        token and hidden state, so their drafters keep up while they decode in the batch."""
        spec = [i for i, r in enumerate(rows) if r.spec is not None]
        if not spec:
            return self._cache.forward(self.model, tokens)
        positions = self._cache.per_row(lambda c, idx: decode_positions(c, idx.size), axis=1)
        model = self.model
        hidden = self._cache.per_row(lambda c, idx: model.hidden_states(tokens[idx][:, None], c))
        for i in spec:
            rows[i].spec.observe(tokens[i : i + 1], hidden[i : i + 1], positions[:, i : i + 1])
        return self.model.language_model.logits(hidden)[:, -1, :]

    def _decode_speculative(self, r: Row, k: int) -> None:
        """One speculative round of the only running row: it hands out the pending token and
        the accepted drafts, and leaves the round's next token pending."""
        pending = self._pending
        tokens = pending.tokens
        ((_, cache, _),) = self._cache.groups  # one row
        try:
            rnd = speculative_round(self.model, cache, r.spec, r.sampler, tokens, k, r.stop)
            drafts_top = _top_logprobs(rnd.logits, [r.sampler] * rnd.logits.shape[0])
            following = None
            if rnd.next_token is not None:
                nxt = rnd.logits[-1:]
                following = Pending.of(rnd.next_token, nxt, _top_logprobs(nxt, [r.sampler]))
                following.schedule()
            ids = tokens.tolist()
            top = pending.top_lists()
            draft_top = (drafts_top[0].tolist(), drafts_top[1].tolist()) if drafts_top else None
        except Exception as e:  # the row fails, the engine goes on
            self._finish(r, "error", e)
            self._running, self._cache, self._pending = [], None, None
            return
        r.fed += 1 + rnd.accepted
        self._convert_if_due(0, r)
        r.stats.draft_tokens += k
        r.stats.accepted_tokens += rnd.accepted
        now = time.perf_counter()
        with self._cv:
            reason = self._emit(r, 0, ids[0], pending.logits[0], top, now)
            for j, token in enumerate(rnd.tokens):
                if reason is not None:
                    break
                reason = self._emit(r, j, token, rnd.logits[j], draft_top, now, from_draft=True)
        self._steps += 1
        self._pending = following
        if reason is not None or r.sampler.error is not None:
            if r.sampler.error is not None and r.handle is not None and not r.handle.finished:
                self._finish(r, "error", r.sampler.error)
            elif r.request.cache_final:
                r.keep_final(cache, self.prefix_cache)
            self._remove([0])

    def _agree(self, sampled: tuple[mx.array, mx.array, Any]) -> tuple[mx.array, mx.array, Any]:
        """With a sync, every rank takes rank 0's tokens (one lazy collective)."""
        if self.sync is None:
            return sampled
        tokens, logits, top = sampled
        return self.sync.agree(tokens), logits, top

    def _fail_later(self, row: Row) -> None:
        """With a sync, a row whose logits processor failed (on rank 0 only, where processors
        run) fails for its caller now and leaves at the next step, on every rank at once."""
        self._finish(row, "error", row.sampler.error)
        row.failed = True

    def _convert_if_due(self, i: int, r: Row) -> None:
        """Row i's KV cache reaches its quantized_kv_start on this step: from the next one it
        decodes quantized, in the batch of its new format (kv_settings.py)."""
        if r.kv.due_at(r.fed) and self._cache.format_of(i) != r.kv.quantized_format:
            cache = self._cache.extract(i)
            r.kv.convert(cache)
            self._cache.move(i, cache, r.kv.quantized_format)

    def _emit(
        self,
        r: Row,
        i: int,
        token: int,
        logits: mx.array,
        top: Any,
        now: float,
        from_draft: bool = False,
    ) -> str | None:
        r.generated.append(token)
        n = len(r.generated)
        stats = r.stats
        if n == 1:
            r.first_token_time = now
            stats.prompt_tps = stats.prefilled_tokens / max(now - r.prefill_start, 1e-9)
        elif now > r.first_token_time:
            stats.generation_tps = (n - 1) / (now - r.first_token_time)
        stats.generation_tokens = n
        stats.peak_memory = mx.get_peak_memory() / 1e9
        reason = "stop" if token in r.stop else ("length" if n >= r.max_tokens else None)
        top_logprobs = None
        k = r.sampler.params.top_logprobs
        if k and top is not None:
            top_logprobs = list(zip(top[0][i][:k], top[1][i][:k], strict=True))
        handle = r.handle
        if handle is not None:
            event = TokenEvent(token, None, top_logprobs, from_draft, reason, logits=logits)
            handle._push(event)
            if reason is not None:
                handle._finish(reason)
        return reason

    def _remove(self, idx: list[int]) -> None:
        keep = [i for i in range(len(self._running)) if i not in set(idx)]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache, self._pending = None, None
            return
        self._cache.filter(keep)
        if self._pending is not None:
            self._pending = self._pending.select(keep)

    def _finish(self, row: Row, reason: str, error: BaseException | None = None) -> None:
        handle = row.handle
        if handle is not None and not handle.finished:
            with self._cv:
                handle._finish(reason, error)
                self._cv.notify_all()


_engines_lock = threading.Lock()
_ATTR = "_mlx_qwen35_engine"


def engine_for(model: Any, processor: Any = None) -> Engine:
    """The engine of `model`, made on first use and shared by generate, stream_generate,
    batch_generate, ChatSession and the server (so they share its batch and prefix cache)."""
    with _engines_lock:
        engine = vars(model).get(_ATTR)
        if engine is None:
            engine = Engine(model, processor)
            object.__setattr__(model, _ATTR, engine)
        elif engine.processor is None and processor is not None:
            engine.processor = processor
            engine._stop_ids = frozenset(int(t) for t in processor.eos_token_ids)
        return engine
