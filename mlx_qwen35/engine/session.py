"""Multi-turn chat sessions on the engine.

    chat = ChatSession(model, processor, system="Be brief.", tools=[WEATHER])
    for piece in (reply := chat.send("Weather in Paris?")):
        print(piece.text, end="", flush=True)
    reply.result.tool_calls          # [ToolCall(name="get_weather", arguments={"city": "Paris"})]

A session holds the conversation (session_render.py) and no cache of its own: each turn renders
the conversation, submits it to the model's shared engine, and the engine's prefix cache supplies
the reuse. The turn asks the engine to snapshot the state at every message boundary (the one
before each assistant answer is what makes reuse work: Qwen3.5's template drops earlier answers'
thinking, so the tokens of the previous answer change on the next turn) and after the reply (an
agent's next turn, tool results after a tool call, extends it exactly). Its entries carry the
session's tag, and after each turn the session keeps at most `max_snapshots` boundary snapshots
(the latest end of a user message always among them) and its latest reply state. A snapshot costs
the KV of the prefix plus the DeltaNet states (`snapshot_nbytes`: 19.5 MB at 0.8B, 51.5 MB at 9B
with bf16 activations). Sessions, `generate` and the server share the prefix cache, so a session
can resume from a state another one left (the same tokens and images give the same state).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import mlx.core as mx

from ..errors import UserError
from ..inputs.messages import THINK_END
from ..inputs.tools import ToolResult, normalize_tools
from ..model.cache import DEFAULT_KV_GROUP_SIZE, DEFAULT_QUANTIZED_KV_START
from .draft_vocab import check_draft_vocab
from .generate import check_enable_thinking
from .kv_settings import KVSettings
from .prefix_cache import PrefixEntry
from .request import Request, SamplingParams
from .sampling import check_sampling
from .scheduler import engine_for
from .session_file import load_session, save_session
from .session_render import Conversation, Rendered, media_arrays
from .session_reply import Reply, TurnResult, empty_result, record_reply
from .speculative import check_num_draft_tokens, resolve_draft_model
from .text_stream import Piece, TextStream, thinking_budget_processor

__all__ = [
    "ChatSession",
    "Reply",
    "TurnResult",
    "common_prefix_length",
    "snapshot_nbytes",
    "thinking_budget_processor",
]

DEFAULT_MAX_SNAPSHOTS = 4
DEFAULT_MAX_TOKENS = 4096
# The template closes a thinking block with this; a thinking budget forces the same text.
THINK_CLOSE = THINK_END + "\n\n"
# Qwen3.5 model card's sampling (spec §8), by whether the turn thinks. Settings left at None take
# these values for each turn.
RECOMMENDED_SAMPLING = {
    True: dict(temp=1.0, top_p=0.95, top_k=20, min_p=0.0, presence_penalty=1.5),
    False: dict(temp=0.7, top_p=0.8, top_k=20, min_p=0.0, presence_penalty=1.5),
}
SAMPLING_KEYS = ("temp", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty")


def snapshot_nbytes(text_config: Any, activation_dtype: mx.Dtype = mx.bfloat16) -> int:
    """Bytes of the DeltaNet states one snapshot holds: per Gated DeltaNet layer, the fp32
    recurrent state [Hv, Dv, Dk] and the conv state [K-1, C] in the activation dtype (batch 1).
    The KV of the snapshot's prefix comes on top."""
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
    """A conversation with a model, reusing its states between turns.

    Args:
        model, processor: from `mlx_qwen35.load`.
        system: system prompt. tools: tool JSON schemas (OpenAI form, or bare {name, parameters}).
        enable_thinking: True/False switch the thinking block; None leaves it to the template.
        thinking_budget: close the thinking block after this many tokens (None = no limit).
        max_tokens: per reply. temp/top_p/top_k/min_p/repetition_penalty/presence_penalty:
            sampling; each left at None takes the model card's value for the turn's mode
            (`RECOMMENDED_SAMPLING`; repetition penalty off). seed: makes the replies repeat
            (each turn draws from its own stream, derived from the seed and the prompt length).
        prefill_step_size: prompt tokens per prefill step.
        kv_bits / kv_group_size / quantized_kv_start: quantize the KV cache as mlx-lm does
            (see `stream_generate`); a saved session keeps them, and its states in that format.
        max_snapshots: boundary snapshots kept in the prefix cache for this session.
        logits_processors: extra mlx-lm style processors `(tokens, logits) -> logits`.
        draft_model / num_draft_tokens / draft_vocab: speculative decoding, as for
            `stream_generate`; the replies are the same.
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
        draft_model: Any = None,
        num_draft_tokens: int = 3,
        draft_vocab: int | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
        quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    ):
        self.model = model
        self.processor = processor
        if system is not None and not isinstance(system, str):
            raise UserError("system must be a string")
        self.system = system
        self.tools = normalize_tools(tools)
        self.enable_thinking = check_enable_thinking(enable_thinking)
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
        self.kv = KVSettings(kv_bits, kv_group_size, quantized_kv_start)
        self.kv.check(model.args.head_dim)
        if isinstance(logits_processors, (str, bytes)) or not all(
            callable(p) for p in logits_processors
        ):
            raise UserError("logits_processors must be a list of callables (tokens, logits)")
        self.logits_processors = list(logits_processors)
        if not processor.has_chat_template:
            raise UserError("this model has no chat template, so it cannot hold a chat session")
        self._think_end = _single_token(processor, THINK_END)
        self._think_close = processor.encode(THINK_CLOSE)
        if self._think_end is None or self._think_close[0] != self._think_end:
            raise UserError(f"this tokenizer has no single {THINK_END} token; it is not Qwen3.5's")
        self.draft_model = resolve_draft_model(draft_model, model, processor)
        self.num_draft_tokens = check_num_draft_tokens(num_draft_tokens)
        self.draft_vocab = check_draft_vocab(draft_vocab, model.args.vocab_size)
        self.engine = engine_for(model, processor)
        self._owner = _Owner()  # tags this session's prefix-cache entries
        self._anchors: set[int] = set()  # boundaries that end a user message
        self._pending: Reply | None = None
        self._conversation = Conversation(processor, system, self.tools)
        self.reset()

    # ------------------------------------------------------------------ conversation

    @property
    def history(self) -> list[dict[str, Any]]:
        """The conversation as chat messages (a copy), system message first when there is one."""
        return copy.deepcopy(self._conversation.messages)

    def reset(self) -> None:
        """Forget the conversation (system prompt and tools stay) and its cached states."""
        self._finish_pending()
        self._conversation.reset()
        self.engine.prefix_cache.clear(self._owner)

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
        thinking = check_enable_thinking(enable_thinking)
        thinking = self.enable_thinking if thinking is None else thinking
        budget = _check_budget(thinking_budget)
        budget = self.thinking_budget if budget is None else budget
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        check_sampling(
            max_tokens=max_tokens, prefill_step_size=self.prefill_step_size, **self._sampling(True)
        )
        conversation = self._conversation
        before = len(conversation.messages)
        conversation.messages.extend(_tool_message(r) for r in tool_results or ())
        if content is not None or images or videos:
            media = [("image", i) for i in images] + [("video", v) for v in videos]
            conversation.add_user(content or "", media)
        try:
            rendered = conversation.render(thinking)
            context = self.processor.max_position_embeddings
            if len(rendered.ids) >= context:
                raise UserError(
                    f"the conversation is {len(rendered.ids)} tokens, the model's context is "
                    f"{context}; start over with reset()"
                )
        except BaseException:
            conversation.truncate(before)
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

    def _cancel(self, rendered: Rendered, before: int) -> TurnResult:
        """A turn closed before it started: forget its messages."""
        self._conversation.truncate(before)
        return empty_result(rendered, "interrupted")

    def _finish_pending(self) -> None:
        if getattr(self, "_pending", None) is not None and not self._pending.done:
            self._pending.result  # noqa: B018 -- finishing the reply records it in the history
        self._pending = None

    def _sampling(self, thinking: bool) -> dict[str, Any]:
        recommended = RECOMMENDED_SAMPLING[thinking]
        return {k: recommended.get(k) if v is None else v for k, v in self.sampling.items()}

    # ------------------------------------------------------------------ the prefix cache

    @property
    def _snapshots(self) -> list[PrefixEntry]:
        """This session's boundary snapshots in the prefix cache, shortest first."""
        return [e for e in self.engine.prefix_cache.entries(self._owner) if e.kind == "boundary"]

    @property
    def snapshot_bytes(self) -> int:
        """Memory held by this session's entries in the prefix cache."""
        return sum(e.nbytes for e in self.engine.prefix_cache.entries(self._owner))

    @property
    def cached_tokens(self) -> int:
        """Tokens of the conversation whose state the prefix cache holds for this session."""
        entries = self.engine.prefix_cache.entries(self._owner)
        return max((e.length for e in entries), default=0)

    def _prune(self, tokens: list[int]) -> None:
        """Keep this session's entries that the conversation (`tokens`) still starts with: its
        latest reply state and at most `max_snapshots` boundary snapshots, the latest user-message
        end among them (after a run of tool calls it is where the next user turn rolls back)."""
        cache = self.engine.prefix_cache
        entries = cache.entries(self._owner)
        current = [e for e in entries if tuple(tokens[: e.length]) == e.tokens]
        finals = [e for e in current if e.kind == "final"][-1:]
        snaps = [e for e in current if e.kind == "boundary"]
        keep = finals + _newest_with_anchor(snaps, self._anchors, self.max_snapshots)
        for e in entries:
            if not any(e is k for k in keep):
                cache.release(e, self._owner)

    # ------------------------------------------------------------------ a turn

    def _request(self, rendered: Rendered, budget: int | None, max_tokens: int) -> Request:
        """The engine request for this turn: resume from the longest cached prefix, and run the
        vision tower only on media after it."""
        ids = rendered.ids
        spans = rendered.spans
        prefix = self.engine.prefix_cache.lookup(ids, spans, self.kv)
        reuse = prefix.length if prefix is not None else 0
        embeddings = positions = None
        new_media = [seg for a, _, seg in rendered.media_spans if a >= reuse]
        if new_media:
            start = prefix.next_position if prefix is not None else 0
            embeddings, positions = self.model.prepare_inputs(
                mx.array([ids[reuse:]]), start=[start], **media_arrays(new_media)
            )
        settings = self._sampling(rendered.thinking_open)
        processors = list(self.logits_processors)
        if rendered.thinking_open and budget is not None:
            processors.append(thinking_budget_processor(len(ids), budget, self._think_close))
        seed = None if self.seed is None else (self.seed + len(ids)) % 2**64
        return Request(
            prompt=ids,
            max_tokens=max_tokens,
            sampling=SamplingParams(
                temp=settings["temp"],
                top_p=settings["top_p"],
                top_k=settings["top_k"],
                min_p=settings["min_p"],
                repetition_penalty=settings["repetition_penalty"],
                presence_penalty=settings["presence_penalty"] or None,
                seed=seed,
            ),
            input_embeddings=None if embeddings is None else embeddings[0],
            position_ids=None if positions is None else positions[:, 0],
            logits_processors=processors,
            stop_token_ids=self.processor.eos_token_ids,
            boundaries=[p for p, _ in rendered.boundaries] if self.max_snapshots else [],
            media_spans=spans,
            cache_final=True,
            prefix=prefix,
            cache_owner=self._owner,
            prefill_step_size=self.prefill_step_size,
            draft_model=self.draft_model,
            num_draft_tokens=self.num_draft_tokens,
            draft_vocab=self.draft_vocab,
            kv_bits=self.kv.kv_bits,
            kv_group_size=self.kv.kv_group_size,
            quantized_kv_start=self.kv.quantized_kv_start,
        )

    def _turn(
        self, reply: Reply, rendered: Rendered, budget: int | None, max_tokens: int, before: int
    ) -> Iterator[Piece]:
        self._anchors |= {p for p, anchor in rendered.boundaries if anchor}
        generated: list[int] = []
        finish = "interrupted"
        stream = TextStream(self.processor, self._think_end, rendered.thinking_open)
        handle = None
        try:
            handle = self.engine.submit(self._request(rendered, budget, max_tokens))
            for event in handle:
                generated.append(event.token)
                last = event.finish_reason is not None
                yield stream.add(event.token, event.logprobs, last)
                if last:
                    finish = event.finish_reason
        finally:
            if handle is not None and not handle.finished:
                handle.cancel()
            if not generated:
                self._conversation.truncate(before)  # interrupted before the first token
            self._prune(rendered.ids + generated)
            stats = handle.stats if handle is not None else None
            reply._result = self._record(rendered, stats, generated, finish, stream.thinking_tokens)

    def _record(
        self,
        rendered: Rendered,
        stats: Any,
        generated: list[int],
        finish: str,
        thinking_tokens: int,
    ) -> TurnResult:
        if stats is None:
            return empty_result(rendered, finish)
        return record_reply(
            self.processor,
            self.tools,
            self._conversation.messages,
            rendered,
            stats,
            generated,
            finish,
            thinking_tokens,
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
            "kv_bits": self.kv.kv_bits,
            "kv_group_size": self.kv.kv_group_size,
            "quantized_kv_start": self.kv.quantized_kv_start,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the session (history, settings, processed images, and its states in the prefix
        cache) to one safetensors file, the JSON parts in its metadata; atomically (temp file +
        rename). Any failure is one UserError line; the directory must exist."""
        self._finish_pending()
        save_session(self, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: Any, processor: Any, **overrides: Any
    ) -> ChatSession:
        """A session saved by `save`, ready to continue identically; `overrides` replace saved
        settings (and give `logits_processors`, which are not saved). Everything in the file is
        checked against the model first; a bad file is one UserError line."""
        return load_session(cls, path, model, processor, **overrides)


# ---------------------------------------------------------------------- helpers


class _Owner:
    """A session's tag on its prefix-cache entries (not the session: entries must not keep a
    session alive)."""

    __slots__ = ()


def _newest_with_anchor(
    snaps: list[PrefixEntry], anchors: set[int], limit: int
) -> list[PrefixEntry]:
    """The `limit` longest snapshots, the longest one at an anchor always among them."""
    if not limit:
        return []
    chosen = snaps[-limit:]
    at_anchor = [e for e in snaps if e.length in anchors]
    if at_anchor and not any(e is at_anchor[-1] for e in chosen):
        chosen = [*snaps[len(snaps) - limit + 1 :], at_anchor[-1]] if limit > 1 else [at_anchor[-1]]
    return chosen


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


def _tool_message(result: ToolResult | Any) -> dict[str, Any]:
    if not isinstance(result, ToolResult):
        result = ToolResult(result)
    return result.to_message()
