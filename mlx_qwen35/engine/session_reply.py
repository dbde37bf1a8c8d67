"""What a chat turn hands back: the streaming `Reply`, the finished `TurnResult`, and how the
generated tokens become an answer, reasoning and typed tool calls in the history."""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..inputs.messages import THINK_START, split_thinking
from ..inputs.tools import ParsedCalls, ToolCallWarning, parse_tool_calls
from .session_render import Rendered
from .text_stream import Piece


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
    draft_tokens / accepted_tokens: speculative decoding, drafts proposed and kept.
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
    draft_tokens: int = 0
    accepted_tokens: int = 0

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


def record_reply(
    processor: Any,
    tools: list[Any],
    messages: list[dict[str, Any]],
    rendered: Rendered,
    stats: Any,
    generated: list[int],
    finish: str,
    thinking_tokens: int,
) -> TurnResult:
    """Turn the generated tokens into an answer, reasoning and tool calls, and add the assistant
    message to `messages` (when anything was generated)."""
    eos = processor.eos_token_ids
    body = [t for t in generated if t not in eos]
    raw = processor.decode(body)
    if rendered.thinking_open:
        reasoning, answer = split_thinking(THINK_START + raw)
    else:
        reasoning, answer = split_thinking(raw)
    parsed = (
        parse_tool_calls(answer, tools, id_prefix=f"call_{len(messages)}")
        if "<tool_call>" in answer
        else ParsedCalls(text=answer)
    )
    for line in parsed.warnings:
        warn_at_caller(line, ToolCallWarning)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.text}
    if rendered.thinking_open or reasoning:
        message["reasoning_content"] = reasoning
    if parsed.calls:
        message["tool_calls"] = [c.to_message() for c in parsed.calls]
    if generated:
        messages.append(message)
    return TurnResult(
        text=parsed.text,
        reasoning=reasoning,
        tool_calls=parsed.calls,
        warnings=parsed.warnings,
        raw=raw,
        tokens=generated,
        finish_reason=finish,
        prompt_tokens=len(rendered.ids),
        reused_tokens=stats.cached_tokens,
        prefilled_tokens=stats.prefilled_tokens,
        thinking_tokens=thinking_tokens,
        prompt_tps=stats.prompt_tps,
        generation_tps=stats.generation_tps,
        peak_memory=mx.get_peak_memory() / 1e9,
        draft_tokens=stats.draft_tokens,
        accepted_tokens=stats.accepted_tokens,
    )


def empty_result(rendered: Rendered, finish: str) -> TurnResult:
    return TurnResult(
        text="",
        reasoning="",
        tool_calls=[],
        warnings=[],
        raw="",
        tokens=[],
        finish_reason=finish,
        prompt_tokens=len(rendered.ids),
        reused_tokens=0,
        prefilled_tokens=0,
        thinking_tokens=0,
        prompt_tps=0.0,
        generation_tps=0.0,
        peak_memory=mx.get_peak_memory() / 1e9,
    )


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """Warn at the first frame outside this package: the caller's loop over a reply, or its
    `ask()` line, however deep the library's own frames are."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("mlx_qwen35."):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
