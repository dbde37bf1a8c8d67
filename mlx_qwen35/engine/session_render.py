"""A chat session's conversation and how it renders into the token ids the engine runs.

A chat template re-renders the whole conversation every turn (and Qwen3.5's drops the thinking of
earlier turns), so each turn's prompt is rendered afresh; what can be reused is found by the
engine's prefix cache at the message boundaries this rendering reports. Stretches between
boundaries are tokenized on their own (boundaries fall between special tokens, so this equals the
tokenization of the whole text), and stretches with images or videos go through the processor
once and are remembered with their processed pixels, which also name their content for the prefix
cache.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..inputs.messages import THINK_END, THINK_START
from .request import MediaSpan

ASSISTANT_START = "<|im_start|>assistant"
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@dataclass
class Segment:
    """Tokens of one stretch of the rendered conversation between message boundaries; with media,
    the processor's arrays for it and a key naming their content."""

    text: str
    media: tuple[int, ...]
    ids: list[int]
    arrays: dict[str, mx.array] = field(default_factory=dict)

    @property
    def key(self) -> str | None:
        if not self.arrays:
            return None
        if "_key" not in self.__dict__:
            digest = hashlib.blake2b(digest_size=16)
            for name in sorted(self.arrays):
                value = self.arrays[name]
                digest.update(name.encode())
                digest.update(str(value.dtype).encode())
                digest.update(np.array(value.astype(mx.float32)).tobytes())
            self.__dict__["_key"] = digest.hexdigest()
        return self.__dict__["_key"]


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

    def _prefix(self, k: int, thinking: bool | None) -> str | None:
        """The first k messages rendered alone (None when the template refuses them)."""
        key = (k, thinking)
        if key not in self.prefixes:
            try:
                self.prefixes[key] = self.template(self.messages[:k], False, thinking)
            except UserError:
                self.prefixes[key] = None
        return self.prefixes[key]

    def render(self, thinking: bool | None) -> Rendered:
        """Token ids of the conversation plus a generation prompt, and where messages end.

        A message ends at character c when the first k messages rendered alone are a prefix of the
        whole rendering (it is not when a later message changes how earlier ones render, e.g. tool
        results merged into one turn).
        """
        full = self.template(self.messages, True, thinking)
        cuts: list[tuple[int, int]] = []  # (character position, messages before it)
        for k in range(1, len(self.messages) + 1):
            prefix = self._prefix(k, thinking)
            last = cuts[-1][0] if cuts else 0
            if prefix is not None and len(prefix) > last and full.startswith(prefix):
                cuts.append((len(prefix), k))
        ids: list[int] = []
        boundaries: list[tuple[int, bool]] = []
        media_spans: list[tuple[int, int, Segment]] = []
        segments: dict[tuple[str, tuple[int, ...]], Segment] = {}
        start, first = 0, 0
        for end, k in [*cuts, (len(full), len(self.messages))]:
            media = tuple(i for i in range(first, k) if i in self.media)
            segment = self._segment(full[start:end], media)
            segments[(segment.text, media)] = segment
            if media:
                media_spans.append((len(ids), len(ids) + len(segment.ids), segment))
            ids.extend(segment.ids)
            if end < len(full):
                boundaries.append((len(ids), self.messages[k - 1]["role"] == "user"))
            start, first = end, k
        self.segments = segments  # keep only what this rendering uses
        tail = full[full.rfind(ASSISTANT_START) :]
        thinking_open = THINK_START in tail and THINK_END not in tail
        return Rendered(ids, boundaries, media_spans, thinking_open)

    def _segment(self, text: str, media: tuple[int, ...]) -> Segment:
        key = (text, media)
        if key in self.segments:
            return self.segments[key]
        if not media:
            return Segment(text, media, self.processor.encode(text))
        items = [item for i in media for item in self.media[i]]
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
        return Segment(text, media, out["input_ids"][0].tolist(), arrays)


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
