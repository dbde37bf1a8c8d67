"""Multi-turn chat sessions that keep their caches between turns.

    chat = ChatSession(model, processor, system="Be brief.", tools=[WEATHER])
    for piece in (reply := chat.send("Weather in Paris?")):
        print(piece.text, end="", flush=True)
    reply.result.tool_calls          # [ToolCall(name="get_weather", arguments={"city": "Paris"})]

Why snapshots: a chat template re-renders the whole conversation every turn, and Qwen3.5's drops
the thinking of earlier turns, so the tokens of the previous answer change on the next turn. A KV
cache is simply trimmed back to the last token both renderings share, but the Gated DeltaNet layers
carry one recurrent state that cannot be rewound. So the session copies those states (conv and
recurrent state, plus the rotary offset) at message boundaries while it prefills, and on the next
turn rolls back to the last boundary inside the shared prefix: restore the DeltaNet states, trim the
KV caches, and prefill only what follows. The boundary before each assistant answer is the one that
makes reuse work. A snapshot costs the DeltaNet states of every linear layer (`snapshot_nbytes`:
19.5 MB at 0.8B, 51.5 MB at 9B with bf16 activations), so only `max_snapshots` are kept.
"""

from __future__ import annotations

import copy
import inspect
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..errors import UserError
from ..inputs.messages import THINK_END, THINK_START, split_thinking
from ..inputs.tools import (
    ParsedCalls,
    ToolCallWarning,
    ToolResult,
    normalize_tools,
    parse_tool_calls,
)
from ..model.cache import KVCache
from ..threads import release_thread_state_at_exit
from .generate import GENERATION_STREAM, generate_step
from .sampling import check_sampling
from .session_file import load_session, save_session
from .text_stream import Piece, TextStream, thinking_budget_processor

DEFAULT_MAX_SNAPSHOTS = 4
DEFAULT_MAX_TOKENS = 4096
ASSISTANT_START = "<|im_start|>assistant"
# The template closes a thinking block with this; a thinking budget forces the same text.
THINK_CLOSE = THINK_END + "\n\n"
# Qwen3.5 model card's sampling (spec §8), by whether the turn thinks. Settings left at None take
# these values for each turn.
RECOMMENDED_SAMPLING = {
    True: dict(temp=1.0, top_p=0.95, top_k=20, min_p=0.0, presence_penalty=1.5),
    False: dict(temp=0.7, top_p=0.8, top_k=20, min_p=0.0, presence_penalty=1.5),
}
SAMPLING_KEYS = ("temp", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty")
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@dataclass
class TurnResult:
    """A finished reply.

    text: the answer, with thinking and well-formed tool calls cut out. reasoning: the thinking
    text. tool_calls: typed calls (see tools.py). warnings: one line per malformed call.
    raw: everything generated, decoded. tokens: the generated ids (an end-of-turn id included).
    finish_reason: "stop", "length" or "interrupted".
    prompt_tokens: length of the rendered conversation; reused_tokens: how much of it came from
    the cache; prefilled_tokens: how much was prefilled this turn (prompt - reused).
    thinking_tokens: tokens inside the thinking block (a budget caps them).
    """

    text: str
    reasoning: str
    tool_calls: list[Any]
    warnings: list[str]
    raw: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    reused_tokens: int
    prefilled_tokens: int
    thinking_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory: float

    @property
    def generation_tokens(self) -> int:
        return len(self.tokens)


class Reply:
    """What `ChatSession.send` returns: iterate it for `Piece`s as they are generated; `result`
    (which finishes the generation if the pieces were not all read) gives the `TurnResult`.
    `close()` stops generating early; the partial reply is kept, as "interrupted" (a reply
    closed before its first token leaves no trace in the history)."""

    def __init__(self, run: Callable[[Reply], Iterator[Piece]], cancel: Callable[[], TurnResult]):
        self._result: TurnResult | None = None
        self._run = run(self)
        self._cancel = cancel

    def __iter__(self) -> Reply:
        return self

    def __next__(self) -> Piece:
        return next(self._run)

    @property
    def result(self) -> TurnResult:
        for _ in self:
            pass
        assert self._result is not None
        return self._result

    @property
    def done(self) -> bool:
        return self._result is not None

    def close(self) -> None:
        started = inspect.getgeneratorstate(self._run) != inspect.GEN_CREATED
        self._run.close()
        if not started and self._result is None:
            self._result = self._cancel()


@dataclass
class _Snapshot:
    """The cache as it stood after `position` tokens: DeltaNet (conv, recurrent) states per
    linear layer; rotary offset per attention layer (KV caches are trimmed, not copied)."""

    position: int
    anchor: bool  # taken at the end of a user query: the rollback point of the next turn
    layers: list[Any]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for v in self.layers if isinstance(v, tuple) for a in v)


@dataclass
class _Segment:
    """Tokens of one stretch of the rendered conversation between message boundaries."""

    text: str
    media: tuple[int, ...]
    ids: list[int]
    arrays: dict[str, mx.array] = field(default_factory=dict)


@dataclass
class _Rendered:
    ids: list[int]
    boundaries: list[tuple[int, bool]]  # (token position after a message, ends a user query)
    media_spans: list[tuple[int, int, _Segment]]  # token range of segments that carry media
    thinking_open: bool  # the generation prompt leaves a <think> block open


def snapshot_nbytes(text_config: Any, activation_dtype: mx.Dtype = mx.bfloat16) -> int:
    """Bytes one snapshot holds: per Gated DeltaNet layer, the fp32 recurrent state
    [Hv, Dv, Dk] and the conv state [K-1, C] in the activation dtype (batch 1)."""
    c = text_config
    state = c.linear_num_value_heads * c.linear_value_head_dim * c.linear_key_head_dim * 4
    conv = (c.linear_conv_kernel_dim - 1) * c.conv_dim * activation_dtype.size
    linear = sum(kind == "linear_attention" for kind in c.layer_types)
    return linear * (state + conv)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatSession:
    """A conversation with a model, keeping its caches between turns.

    Args:
        model, processor: from `mlx_qwen35.load`.
        system: system prompt. tools: tool JSON schemas (OpenAI form, or bare {name, parameters}).
        enable_thinking: True/False switch the thinking block; None leaves it to the template.
        thinking_budget: close the thinking block after this many tokens (None = no limit).
        max_tokens: per reply. temp/top_p/top_k/min_p/repetition_penalty/presence_penalty:
            sampling; each left at None takes the model card's value for the turn's mode
            (`RECOMMENDED_SAMPLING`; repetition penalty off). seed: seeds MLX's generator.
        prefill_step_size: prompt tokens per prefill step.
        max_snapshots: cache snapshots kept (each costs `snapshot_nbytes(model.args)` bytes).
        logits_processors: extra mlx-lm style processors `(tokens, logits) -> logits`.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temp: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        presence_penalty: float | None = None,
        seed: int | None = None,
        prefill_step_size: int = 2048,
        max_snapshots: int = DEFAULT_MAX_SNAPSHOTS,
        logits_processors: Sequence[Any] = (),
    ):
        self.model = model
        self.processor = processor
        if system is not None and not isinstance(system, str):
            raise UserError("system must be a string")
        self.system = system
        self.tools = normalize_tools(tools)
        self.enable_thinking = _check_thinking(enable_thinking)
        self.thinking_budget = _check_budget(thinking_budget)
        self.max_tokens = max_tokens
        self.sampling = {
            "temp": temp,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "repetition_penalty": repetition_penalty,
            "presence_penalty": presence_penalty,
        }
        self.prefill_step_size = prefill_step_size
        for mode in (True, False):
            check_sampling(
                max_tokens=max_tokens,
                prefill_step_size=prefill_step_size,
                seed=seed,
                **self._sampling(mode),
            )
        if type(max_snapshots) is not int or max_snapshots < 0:
            raise UserError(f"max_snapshots must be an integer >= 0, got {max_snapshots!r}")
        self.max_snapshots = max_snapshots
        self.seed = seed
        self.logits_processors = list(logits_processors)
        if not processor.has_chat_template:
            raise UserError("this model has no chat template, so it cannot hold a chat session")
        self._think_end = _single_token(processor, THINK_END)
        self._think_close = processor.encode(THINK_CLOSE)
        if self._think_end is None or self._think_close[0] != self._think_end:
            raise UserError(f"this tokenizer has no single {THINK_END} token; it is not Qwen3.5's")
        if seed is not None:
            release_thread_state_at_exit()  # the random key is per thread: see threads.py
            mx.random.seed(seed)
        self._pending: Reply | None = None
        self.reset()

    # ------------------------------------------------------------------ conversation

    @property
    def history(self) -> list[dict[str, Any]]:
        """The conversation as chat messages (a copy), system message first when there is one."""
        return copy.deepcopy(self._messages)

    def reset(self) -> None:
        """Forget the conversation (system prompt and tools stay) and drop the caches."""
        self._finish_pending()
        self._messages: list[dict[str, Any]] = []
        if self.system is not None:
            self._messages.append({"role": "system", "content": self.system})
        self._media: dict[int, list[tuple[str, Any]]] = {}  # message index -> [(kind, item)]
        self._prefixes: dict[tuple[int, bool | None], str | None] = {}
        self._segments: dict[tuple[str, tuple[int, ...]], _Segment] = {}
        self._drop_cache()

    def _drop_cache(self) -> None:
        self._cache: list[Any] = self.model.make_cache()
        self._cached: list[int] = []  # the tokens the cache holds
        self._snapshots: list[_Snapshot] = []

    def send(
        self,
        content: str | None = None,
        *,
        images: Sequence[Any] | Any | None = None,
        videos: Sequence[Any] | Any | None = None,
        tool_results: Sequence[ToolResult | Any] | None = None,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        max_tokens: int | None = None,
    ) -> Reply:
        """Add tool results and/or a user message (text, images, videos) and reply to it.

        Returns a `Reply` that streams `Piece`s; its `result` is the `TurnResult`.
        `enable_thinking`, `thinking_budget`, `max_tokens` override the session's for this turn.
        Images: paths, PIL images or arrays; videos: paths or lists of frames.
        """
        self._finish_pending()
        images, videos = _as_list(images), _as_list(videos)
        if content is None and not tool_results and not images and not videos:
            raise UserError("send needs a message, images/videos or tool results")
        if content is not None and not isinstance(content, str):
            raise UserError(f"the message must be a string, got {type(content).__name__}")
        thinking = _check_thinking(enable_thinking)
        thinking = self.enable_thinking if thinking is None else thinking
        budget = _check_budget(thinking_budget)
        budget = self.thinking_budget if budget is None else budget
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        check_sampling(
            max_tokens=max_tokens, prefill_step_size=self.prefill_step_size, **self._sampling(True)
        )
        before = len(self._messages)
        self._messages.extend(_tool_message(r) for r in tool_results or ())
        if content is not None or images or videos:
            media = [("image", i) for i in images] + [("video", v) for v in videos]
            if media:
                self._media[len(self._messages)] = media
            self._messages.append(_user_message(content or "", media))
        try:
            rendered = self._render(thinking)
            context = self.processor.max_position_embeddings
            if len(rendered.ids) >= context:
                raise UserError(
                    f"the conversation is {len(rendered.ids)} tokens, the model's context is "
                    f"{context}; start over with reset()"
                )
        except BaseException:
            self._truncate(before)
            raise
        max_tokens = min(max_tokens, self.processor.max_position_embeddings - len(rendered.ids))
        reply = Reply(
            lambda r: self._turn(r, rendered, budget, max_tokens, before),
            cancel=lambda: self._cancel(rendered, before),
        )
        self._pending = reply
        return reply

    def ask(self, content: str | None = None, **kwargs: Any) -> TurnResult:
        """`send(...)` and wait for the whole reply."""
        return self.send(content, **kwargs).result

    def _cancel(self, rendered: _Rendered, before: int) -> TurnResult:
        """A turn closed before it started: forget its messages."""
        self._truncate(before)
        return TurnResult(
            text="",
            reasoning="",
            tool_calls=[],
            warnings=[],
            raw="",
            tokens=[],
            finish_reason="interrupted",
            prompt_tokens=len(rendered.ids),
            reused_tokens=0,
            prefilled_tokens=0,
            thinking_tokens=0,
            prompt_tps=0.0,
            generation_tps=0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
        )

    def _truncate(self, length: int) -> None:
        """Drop the messages from `length` on, and everything remembered about them (a later
        message at the same index must not find their renderings or processed images)."""
        del self._messages[length:]
        self._media = {i: m for i, m in self._media.items() if i < length}
        self._prefixes = {key: v for key, v in self._prefixes.items() if key[0] <= length}
        self._segments = {
            key: seg for key, seg in self._segments.items() if all(i < length for i in seg.media)
        }

    def _finish_pending(self) -> None:
        if getattr(self, "_pending", None) is not None and not self._pending.done:
            self._pending.result  # noqa: B018 -- finishing the reply records it in the history
        self._pending = None

    def _sampling(self, thinking: bool) -> dict[str, Any]:
        recommended = RECOMMENDED_SAMPLING[thinking]
        return {k: recommended.get(k) if v is None else v for k, v in self.sampling.items()}

    # ------------------------------------------------------------------ rendering

    def _template(self, messages: list[dict[str, Any]], generation: bool, thinking: Any) -> str:
        return self.processor.apply_chat_template(
            messages,
            add_generation_prompt=generation,
            enable_thinking=thinking,
            tools=self.tools or None,
        )

    def _prefix(self, k: int, thinking: bool | None) -> str | None:
        """The first k messages rendered alone (None when the template refuses them). Messages
        are only ever appended, so these never change until reset()."""
        key = (k, thinking)
        if key not in self._prefixes:
            try:
                self._prefixes[key] = self._template(self._messages[:k], False, thinking)
            except UserError:
                self._prefixes[key] = None
        return self._prefixes[key]

    def _render(self, thinking: bool | None) -> _Rendered:
        """Token ids of the conversation plus a generation prompt, and where messages end.

        A message ends at character c when the first k messages rendered alone are a prefix of the
        whole rendering (it is not when a later message changes how earlier ones render, e.g. tool
        results merged into one turn). Each stretch between boundaries is tokenized on its own --
        boundaries fall between special tokens, so this is the tokenization of the whole text --
        and stretches with images or videos go through the processor once and are remembered.
        """
        full = self._template(self._messages, True, thinking)
        cuts: list[tuple[int, int]] = []  # (character position, messages before it)
        for k in range(1, len(self._messages) + 1):
            prefix = self._prefix(k, thinking)
            last = cuts[-1][0] if cuts else 0
            if prefix is not None and len(prefix) > last and full.startswith(prefix):
                cuts.append((len(prefix), k))
        ids: list[int] = []
        boundaries: list[tuple[int, bool]] = []
        media_spans: list[tuple[int, int, _Segment]] = []
        segments: dict[tuple[str, tuple[int, ...]], _Segment] = {}
        start, first = 0, 0
        for end, k in [*cuts, (len(full), len(self._messages))]:
            media = tuple(i for i in range(first, k) if i in self._media)
            segment = self._segment(full[start:end], media)
            segments[(segment.text, media)] = segment
            if media:
                media_spans.append((len(ids), len(ids) + len(segment.ids), segment))
            ids.extend(segment.ids)
            if end < len(full):
                boundaries.append((len(ids), self._messages[k - 1]["role"] == "user"))
            start, first = end, k
        self._segments = segments  # keep only what this rendering uses
        tail = full[full.rfind(ASSISTANT_START) :]
        thinking_open = THINK_START in tail and THINK_END not in tail
        return _Rendered(ids, boundaries, media_spans, thinking_open)

    def _segment(self, text: str, media: tuple[int, ...]) -> _Segment:
        key = (text, media)
        if key in self._segments:
            return self._segments[key]
        if not media:
            return _Segment(text, media, self.processor.encode(text))
        items = [item for i in media for item in self._media[i]]
        if any(item is None for _, item in items):
            raise UserError(
                "the images of this loaded session would have to be processed again, but a saved "
                "session keeps only their processed form; start a new session to change them"
            )
        out = self.processor(
            text=text,
            images=[x for kind, x in items if kind == "image"] or None,
            videos=[x for kind, x in items if kind == "video"] or None,
        )
        arrays = {k: v for k, v in out.items() if k in MEDIA_KEYS}
        return _Segment(text, media, out["input_ids"][0].tolist(), arrays)

    # ------------------------------------------------------------------ cache reuse

    def _reuse_point(self, rendered: _Rendered) -> int:
        """How many leading tokens of `rendered` the cache can keep: all it holds when the new
        rendering extends it, else the last snapshot inside the shared prefix (0: none).
        At least one token is left to prefill, since the next token's logits come from it."""
        limit = min(common_prefix_length(self._cached, rendered.ids), len(rendered.ids) - 1)
        candidates = [0] + [s.position for s in self._snapshots if s.position <= limit]
        if limit >= len(self._cached):
            candidates.append(len(self._cached))
        # Never resume inside an image: its tokens are encoded together.
        ok = [p for p in candidates if not any(a < p < b for a, b, _ in rendered.media_spans)]
        return max(ok)

    def _rollback(self, position: int) -> None:
        if position == len(self._cached):
            return
        if position == 0:
            self._drop_cache()
            return
        snapshot = next(s for s in self._snapshots if s.position == position)
        for c, saved in zip(self._cache, snapshot.layers, strict=True):
            if isinstance(c, KVCache):
                c.trim(c.offset - position)
                c.rope_delta = saved
            else:
                c[0], c[1] = saved
        self._cached = self._cached[:position]
        self._snapshots = [s for s in self._snapshots if s.position <= position]

    def _snapshot(self, position: int, anchor: bool) -> None:
        if self.max_snapshots == 0:
            return
        self._compact_states()
        layers = [c.rope_delta if isinstance(c, KVCache) else (c[0], c[1]) for c in self._cache]
        self._snapshots = [s for s in self._snapshots if s.position != position]
        self._snapshots.append(_Snapshot(position, anchor, layers))
        self._snapshots.sort(key=lambda s: s.position)
        while len(self._snapshots) > self.max_snapshots:
            # Evict the oldest, but keep the latest user-query boundary: after a run of tool
            # calls it is where the next user turn rolls back to.
            anchors = [s for s in self._snapshots if s.anchor]
            keep = anchors[-1] if anchors else None
            victim = next(s for s in self._snapshots if s is not keep)
            self._snapshots.remove(victim)

    def _compact_states(self) -> None:
        """Make the DeltaNet states plain contiguous arrays.

        The model may hand back views (the conv state is the tail of a longer buffer), which
        would keep that buffer alive in a snapshot and compute with other strides than the
        contiguous arrays a loaded session reads back, changing results in the last bits.
        """
        for c in self._cache:
            if not isinstance(c, KVCache) and c[1] is not None:
                c[0], c[1] = mx.contiguous(c[0]), mx.contiguous(c[1])
        mx.eval([c.state for c in self._cache])

    @property
    def snapshot_bytes(self) -> int:
        """Memory held by the snapshots now."""
        return sum(s.nbytes for s in self._snapshots)

    @property
    def cached_tokens(self) -> int:
        return len(self._cached)

    def _cache_length(self) -> int:
        return next(c.offset for c in self._cache if isinstance(c, KVCache))

    # ------------------------------------------------------------------ a turn

    def _turn(
        self, reply: Reply, rendered: _Rendered, budget: int | None, max_tokens: int, before: int
    ) -> Iterator[Piece]:
        tic = time.perf_counter()
        reuse = self._reuse_point(rendered)
        self._rollback(reuse)
        prefilled = 0

        def count(n: int) -> None:
            nonlocal prefilled
            prefilled += n

        ids = rendered.ids
        generated: list[int] = []
        finish = "interrupted"
        prompt_tps = generation_tps = 0.0
        thinking_tokens = 0
        try:
            from mlx_lm.generate import wired_limit
            from mlx_lm.sample_utils import make_logits_processors, make_sampler

            with wired_limit(self.model, [GENERATION_STREAM]):
                final = self._prefill(rendered, reuse, count)
                settings = self._sampling(rendered.thinking_open)
                sampler = make_sampler(
                    settings["temp"],
                    top_p=settings["top_p"],
                    min_p=settings["min_p"],
                    top_k=settings["top_k"],
                )
                processors = [
                    *self.logits_processors,
                    *make_logits_processors(repetition_penalty=settings["repetition_penalty"]),
                ]
                if rendered.thinking_open and budget is not None:
                    processors.append(
                        thinking_budget_processor(len(final["ids"]), budget, self._think_close)
                    )
                presence = make_logits_processors(
                    presence_penalty=settings["presence_penalty"] or None,
                    presence_context_size=max_tokens,
                )
                steps = generate_step(
                    self.model,
                    mx.array(final["ids"], dtype=mx.uint32),
                    max_tokens=max_tokens,
                    sampler=sampler,
                    logits_processors=processors,
                    presence_processors=presence,
                    prefill_step_size=self.prefill_step_size,
                    cache=self._cache,
                    on_prefill=count,
                    **final["extra"],
                )
                stream = TextStream(self.processor, self._think_end, rendered.thinking_open)
                gen_tic = tic
                try:
                    for n, (token, logprobs) in enumerate(steps):
                        if n == 0:
                            gen_tic = time.perf_counter()
                            prompt_tps = (len(ids) - reuse) / max(gen_tic - tic, 1e-9)
                        generated.append(token)
                        last = n + 1 == max_tokens
                        stop = token in self.processor.eos_token_ids
                        piece = stream.add(token, logprobs, stop or last)
                        yield piece
                        if stop or last:
                            finish = "stop" if stop else "length"
                            break
                finally:
                    steps.close()
                    elapsed = time.perf_counter() - gen_tic
                    if len(generated) > 1 and elapsed > 0:
                        generation_tps = (len(generated) - 1) / elapsed
                    thinking_tokens = stream.thinking_tokens
        finally:
            fed = self._cache_length()
            self._cached = (ids + generated)[:fed]
            self._compact_states()
            if not generated:
                self._truncate(before)  # interrupted before the first token: no turn happened
            reply._result = self._record(
                rendered,
                reuse,
                prefilled,
                generated,
                finish,
                thinking_tokens,
                prompt_tps,
                generation_tps,
            )

    def _prefill(
        self, rendered: _Rendered, reuse: int, count: Callable[[int], None]
    ) -> dict[str, Any]:
        """Prefill from `reuse` up to the last message boundary, snapshotting at each boundary;
        return what generate_step gets: the rest of the prompt (and its embeddings and positions
        when the new part carries images or videos)."""
        ids = rendered.ids
        stops = [(p, a) for p, a in rendered.boundaries if p > reuse]
        embeddings = positions = None
        new_media = [seg for a, _, seg in rendered.media_spans if a >= reuse]
        if new_media:
            arrays = {
                key: mx.concatenate([s.arrays[key] for s in new_media if key in s.arrays])
                for key in MEDIA_KEYS
                if any(key in s.arrays for s in new_media)
            }
            embeddings, positions = self.model.prepare_inputs(
                mx.array([ids[reuse:]]), self._cache, **arrays
            )
        start = reuse
        with mx.stream(GENERATION_STREAM):
            for stop, anchor in stops:
                for a in range(start, stop, self.prefill_step_size):
                    b = min(a + self.prefill_step_size, stop)
                    if embeddings is None:
                        self.model.hidden_states(mx.array([ids[a:b]]), self._cache)
                    else:
                        self.model.hidden_states(
                            None,
                            self._cache,
                            input_embeddings=embeddings[:, a - reuse : b - reuse],
                            position_ids=_slice_positions(positions, a - reuse, b - reuse),
                        )
                    mx.eval([c.state for c in self._cache])
                    count(b - a)
                # With explicit positions the model has set rope_delta for what follows.
                self._cached = ids[:stop]
                self._snapshot(stop, anchor)
                start = stop
        extra: dict[str, Any] = {}
        if embeddings is not None:
            extra["input_embeddings"] = embeddings[:, start - reuse :]
            extra["position_ids"] = _slice_positions(positions, start - reuse, None)
        return {"ids": ids[start:], "extra": extra}

    def _record(
        self,
        rendered: _Rendered,
        reuse: int,
        prefilled: int,
        generated: list[int],
        finish: str,
        thinking_tokens: int,
        prompt_tps: float,
        generation_tps: float,
    ) -> TurnResult:
        """Turn the generated tokens into an answer, reasoning and tool calls, and add the
        assistant message to the history."""
        body = [t for t in generated if t not in self.processor.eos_token_ids]
        raw = self.processor.decode(body)
        if rendered.thinking_open:
            reasoning, answer = split_thinking(THINK_START + raw)
        else:
            reasoning, answer = split_thinking(raw)
        parsed = (
            parse_tool_calls(answer, self.tools, id_prefix=f"call_{len(self._messages)}")
            if "<tool_call>" in answer
            else ParsedCalls(text=answer)
        )
        for line in parsed.warnings:
            # Past _turn and Reply.__next__: the warning points at the caller's loop.
            warnings.warn(line, ToolCallWarning, stacklevel=4)
        message: dict[str, Any] = {"role": "assistant", "content": parsed.text}
        if rendered.thinking_open or reasoning:
            message["reasoning_content"] = reasoning
        if parsed.calls:
            message["tool_calls"] = [c.to_message() for c in parsed.calls]
        if generated:
            self._messages.append(message)
        return TurnResult(
            text=parsed.text,
            reasoning=reasoning,
            tool_calls=parsed.calls,
            warnings=parsed.warnings,
            raw=raw,
            tokens=generated,
            finish_reason=finish,
            prompt_tokens=len(rendered.ids),
            reused_tokens=reuse,
            prefilled_tokens=prefilled,
            thinking_tokens=thinking_tokens,
            prompt_tps=prompt_tps,
            generation_tps=generation_tps,
            peak_memory=mx.get_peak_memory() / 1e9,
        )

    # ------------------------------------------------------------------ saving

    def _settings(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "tools": self.tools,
            "enable_thinking": self.enable_thinking,
            "thinking_budget": self.thinking_budget,
            "max_tokens": self.max_tokens,
            **self.sampling,
            "seed": self.seed,
            "prefill_step_size": self.prefill_step_size,
            "max_snapshots": self.max_snapshots,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the session (history, settings, caches, snapshots, processed images) to one
        safetensors file, the JSON parts in its metadata; atomically (temp file + rename)."""
        save_session(self, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: Any, processor: Any, **overrides: Any
    ) -> ChatSession:
        """A session saved by `save`, ready to continue; `overrides` replace saved settings
        (and give `logits_processors`, which are not saved)."""
        return load_session(cls, path, model, processor, **overrides)


# ---------------------------------------------------------------------- helpers


def _check_thinking(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise UserError(f"enable_thinking must be True, False or None, got {value!r}")
    return value


def _check_budget(value: Any) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise UserError(f"thinking_budget must be an integer >= 0 (or None), got {value!r}")
    return value


def _single_token(processor: Any, text: str) -> int | None:
    ids = processor.encode(text)
    return ids[0] if len(ids) == 1 else None


def _as_list(items: Any) -> list[Any]:
    if items is None:
        return []
    if isinstance(items, (str, os.PathLike)) or not isinstance(items, Sequence):
        return [items]
    return list(items)


def _user_message(text: str, media: list[tuple[str, Any]]) -> dict[str, Any]:
    if not media:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = []
    for kind, item in media:
        part: dict[str, Any] = {"type": kind}
        if isinstance(item, (str, os.PathLike)):
            part[kind] = str(item)  # keeps the history JSON-friendly and readable
        parts.append(part)
    if text:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def _tool_message(result: ToolResult | Any) -> dict[str, Any]:
    if not isinstance(result, ToolResult):
        result = ToolResult(result)
    return result.to_message()


def _slice_positions(positions: mx.array | None, a: int, b: int | None) -> mx.array | None:
    return None if positions is None else positions[..., a:b]
