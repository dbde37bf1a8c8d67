"""A chat session's conversation and how it renders into the token ids the engine runs.

A chat template re-renders the whole conversation every turn (and Qwen3.5's drops the thinking of
earlier turns), so each turn's prompt is rendered afresh; what can be reused is found by the
engine's prefix cache at the message boundaries this rendering reports. The rendering itself is
`inputs.render.render_chat`, the one the server and generate use (message contents are tokenized
as text); the conversation keeps what it remembers between turns: the renderings of its first k
messages, and the stretches with images or videos with their processed pixels, which also name
their content for the prefix cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..inputs.render import Segment, render_chat
from .request import MediaSpan

ASSISTANT_START = "<|im_start|>assistant"
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@dataclass
class Rendered:
    ids: list[int]
    boundaries: list[tuple[int, bool]]  # (token position after a message, ends a user query)
    media_spans: list[tuple[int, int, Segment]]  # token range of segments that carry media
    thinking_open: bool  # the generation prompt leaves a <think> block open

    @property
    def spans(self) -> list[MediaSpan]:
        return [MediaSpan(a, b, seg.key) for a, b, seg in self.media_spans]


class Conversation:
    """The messages of a chat, their media, and the renderings and processed media remembered
    for them. Messages are only appended (or the last ones dropped), so renderings of the first k
    messages stay valid until they are dropped."""

    def __init__(self, processor: Any, system: str | None, tools: list[Any]):
        self.processor = processor
        self.system = system
        self.tools = tools
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, Any]] = []
        if self.system is not None:
            self.messages.append({"role": "system", "content": self.system})
        self.media: dict[int, list[tuple[str, Any]]] = {}  # message index -> [(kind, item)]
        self.prefixes: dict[tuple[int, bool | None], str | None] = {}
        self.segments: dict[tuple[str, tuple[int, ...]], Segment] = {}

    def add_user(self, text: str, media: list[tuple[str, Any]]) -> None:
        if media:
            self.media[len(self.messages)] = media
        self.messages.append(_user_message(text, media))

    def truncate(self, length: int) -> None:
        """Drop the messages from `length` on, and everything remembered about them (a later
        message at the same index must not find their renderings or processed images)."""
        del self.messages[length:]
        self.media = {i: m for i, m in self.media.items() if i < length}
        self.prefixes = {key: v for key, v in self.prefixes.items() if key[0] <= length}
        self.segments = {
            key: seg for key, seg in self.segments.items() if all(i < length for i in seg.media)
        }

    def template(self, messages: list[dict[str, Any]], generation: bool, thinking: Any) -> str:
        return self.processor.apply_chat_template(
            messages,
            add_generation_prompt=generation,
            enable_thinking=thinking,
            tools=self.tools or None,
        )

    def render(self, thinking: bool | None) -> Rendered:
        """Token ids of the conversation plus a generation prompt, and where messages end:
        `inputs.render.render_chat` (message contents tokenized as text), with this
        conversation's remembered renderings and processed media."""
        rendered = render_chat(
            self.processor,
            self.messages,
            tools=self.tools or None,
            enable_thinking=thinking,
            media=self.media,
            prefix_cache=self.prefixes,
            segment_cache=self.segments,
        )
        spans = [(a, a + len(seg.ids), seg) for a, seg in rendered.segments if seg.media]
        return Rendered(rendered.ids, rendered.boundaries, spans, rendered.thinking_open)


def media_arrays(segments: list[Segment]) -> dict[str, mx.array]:
    """The processor arrays of several segments, in order, as one set of model arguments."""
    return {
        key: mx.concatenate([s.arrays[key] for s in segments if key in s.arrays])
        for key in MEDIA_KEYS
        if any(key in s.arrays for s in segments)
    }


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
