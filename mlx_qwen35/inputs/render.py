"""Conversations -> token ids, safely: only the chat template's own markup becomes control tokens.

    rendered = render_chat(processor, messages, tools=tools, enable_thinking=True)
    rendered.ids           # the prompt
    rendered.boundaries    # [(token position after a message, that message is a user turn)]

HF and mlx-lm render the template to text and tokenize that text whole, so a user message (or a
tool result, or a document) that says `<|im_end|><|im_start|>system` becomes real control tokens.
Here every string that comes from outside -- message contents and text parts, reasoning, tool-call
names and arguments, tool schemas -- is escaped before rendering: `ESCAPE` (a private-use
character) is written after each character that can start an added token (and doubled where it
occurs itself), so no added token can be spelled inside content. Every added token left in the
rendered text is then the template's own markup and becomes its id; the text between markup tokens
is unescaped and tokenized by the plain BPE (the tokenizer without its added tokens). For
conversations whose contents hold no added token this gives exactly the ids of tokenizing the
rendered text (tests check).

Message boundaries are where the prefix cache snapshots: message k ends at character c when the
first k messages rendered alone (no generation prompt) are a prefix of the whole rendering (they
are not where a later message changes how earlier ones render, e.g. tool results merged into one
turn). The stretches between boundaries are tokenized on their own, so the same conversation
prefix always gives the same ids, whatever follows it; stretches with images or videos go through
the processor's media expansion once (the caller may keep them in `segment_cache`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import UserError
from .messages import THINK_END, THINK_START, normalize_messages
from .tokenizer import _check_utf8

ESCAPE = "\ue000"
ASSISTANT_START = "<|im_start|>assistant"
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
# Values under these keys of a content part name media (paths, URLs, images), not text.
_MEDIA_PART_KEYS = ("image", "video", "image_url", "video_url")


class SafeEncoder:
    """Escaping and markup-aware tokenization for one tokenizer (see the module doc)."""

    def __init__(self, tokenizer: Any):
        from tokenizers import Tokenizer

        backend = _backend_tokenizer(tokenizer)
        self.added = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
        spec = json.loads(backend.to_str())
        spec["added_tokens"] = []
        spec["truncation"] = spec["padding"] = None
        self.plain = Tokenizer.from_str(json.dumps(spec))
        starts = "".join(sorted({t[0] for t in self.added if t}))
        by_length = sorted(self.added, key=len, reverse=True)
        self._markup = re.compile("|".join(re.escape(t) for t in by_length)) if by_length else None
        cls = re.escape(starts)
        self._escape = re.compile(f"[{cls}{ESCAPE}]" if starts else ESCAPE)
        self._unescape = re.compile(
            (f"([{cls}]){ESCAPE}|" if starts else "") + f"{ESCAPE}({ESCAPE})"
        )

    def escape(self, text: str) -> str:
        """`text` with no added token spelled in it (undone by `unescape`)."""
        return self._escape.sub(lambda m: m.group(0) + ESCAPE, text)

    def unescape(self, text: str) -> str:
        return self._unescape.sub(lambda m: m.group(1) or m.group(2), text)

    def encode(self, text: str) -> list[int]:
        """Ids of escaped template output: added tokens are markup, the rest is text."""
        return self.encode_many([text])[0]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        pieces: list[list[Any]] = []  # per text: markup ids and gap texts, in order
        gaps: list[str] = []
        for text in texts:
            parts: list[Any] = []
            pos = 0
            for m in self._markup.finditer(text) if self._markup else ():
                if m.start() > pos:
                    parts.append(len(gaps))
                    gaps.append(self.unescape(text[pos : m.start()]))
                parts.append(("markup", self.added[m.group(0)]))
                pos = m.end()
            if pos < len(text):
                parts.append(len(gaps))
                gaps.append(self.unescape(text[pos:]))
            pieces.append(parts)
        for gap in gaps:
            _check_utf8(gap)
        encoded = self.plain.encode_batch(gaps, add_special_tokens=False) if gaps else []
        out = []
        for parts in pieces:
            ids: list[int] = []
            for part in parts:
                if isinstance(part, tuple):
                    ids.append(part[1])
                else:
                    ids.extend(encoded[part].ids)
            out.append(ids)
        return out

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` read entirely as text (no added token at all)."""
        _check_utf8(text)
        return self.plain.encode(text, add_special_tokens=False).ids

    def escape_value(self, value: Any, *, skip: tuple[str, ...] = ()) -> Any:
        """Every string (and mapping key) in a JSON-like value escaped, except the values under
        the keys in `skip`."""
        if isinstance(value, str):
            return self.escape(value)
        if isinstance(value, Mapping):
            return {
                self.escape(k) if isinstance(k, str) else k: (
                    v if k in skip else self.escape_value(v, skip=skip)
                )
                for k, v in value.items()
            }
        if isinstance(value, (list, tuple)):
            return [self.escape_value(v, skip=skip) for v in value]
        return value


def _backend_tokenizer(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` under ours (`.backend`) or a transformers one."""
    from tokenizers import Tokenizer

    for candidate in (tokenizer, getattr(tokenizer, "_tokenizer", None)):
        for name in ("backend", "backend_tokenizer"):
            backend = getattr(candidate, name, None)
            if isinstance(backend, Tokenizer):
                return backend
    raise UserError(
        "safe tokenization needs a fast tokenizer (tokenizer.json); this checkpoint has none"
    )


def safe_encoder(processor: Any) -> SafeEncoder:
    """The processor's SafeEncoder, built on first use (building copies the vocabulary)."""
    encoder = processor.__dict__.get("_safe_encoder")
    if encoder is None:
        encoder = SafeEncoder(processor.tokenizer)
        processor.__dict__["_safe_encoder"] = encoder
    return encoder


def escape_messages(encoder: SafeEncoder, messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Messages ready for the template with every outside string escaped. `reasoning` is
    accepted for `reasoning_content`, and an assistant content that carries its thinking
    (`...</think>answer`) is split into the two the way the template would."""
    out = []
    for message in normalize_messages(messages):
        message = dict(message)
        if "reasoning" in message:
            reasoning = message.pop("reasoning")
            if message.get("reasoning_content") is None:
                message["reasoning_content"] = reasoning
        if message.get("reasoning_content") is None:
            message.pop("reasoning_content", None)
        content = message.get("content")
        if (
            message["role"] == "assistant"
            and isinstance(content, str)
            and THINK_END in content
            and "reasoning_content" not in message
        ):
            reasoning, answer = content.split(THINK_END, 1)
            message["reasoning_content"] = reasoning.split(THINK_START)[-1].strip()
            message["content"] = answer.strip()
        out.append(encoder.escape_value(message, skip=("role",) + _MEDIA_PART_KEYS))
    return out


@dataclass
class Segment:
    """One stretch of the rendering between message boundaries.

    text: its escaped template text; media: the indices of the messages whose images/videos it
    holds; ids: its tokens (vision placeholders expanded); arrays: its pixel arrays and grids.
    """

    text: str
    media: tuple[int, ...]
    ids: list[int]
    arrays: dict[str, mx.array] = field(default_factory=dict)

    @property
    def key(self) -> str | None:
        """A name for the content of its media (the prefix cache reuses a state that covers
        media only for the same pixels); None without media."""
        if not self.arrays:
            return None
        if "_key" not in self.__dict__:
            digest = hashlib.blake2b(digest_size=16)
            for name in sorted(self.arrays):
                value = self.arrays[name]
                digest.update(name.encode() + str(value.dtype).encode())
                digest.update(np.array(value.astype(mx.float32)).tobytes())
            self.__dict__["_key"] = digest.hexdigest()
        return self.__dict__["_key"]


@dataclass
class RenderedChat:
    """ids: the prompt. boundaries: (token position after a message, whether that message is a
    user turn). segments: (first token position, Segment), covering ids in order.
    thinking_open: the generation prompt leaves a <think> block open."""

    ids: list[int]
    boundaries: list[tuple[int, bool]]
    segments: list[tuple[int, Segment]]
    thinking_open: bool

    @property
    def media_spans(self) -> list[tuple[int, int]]:
        """Token ranges of the segments with images or videos (never resume inside one)."""
        return [(a, a + len(s.ids)) for a, s in self.segments if s.media]

    def media_arrays(self, start: int = 0) -> dict[str, mx.array]:
        """The pixel arrays and grids of the media at token positions >= `start`, in order."""
        arrays = [s.arrays for a, s in self.segments if s.media and a >= start]
        return {
            key: mx.concatenate([a[key] for a in arrays if key in a])
            for key in MEDIA_KEYS
            if any(key in a for a in arrays)
        }


def message_media(messages: Sequence[Mapping[str, Any]]) -> dict[int, list[tuple[str, Any]]]:
    """message index -> [(kind, item)] for the image/video parts that carry their item."""
    media: dict[int, list[tuple[str, Any]]] = {}
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str) or not isinstance(content, Sequence):
            continue
        for part in content:
            if not isinstance(part, Mapping):
                continue
            for kind in ("image", "video"):
                if part.get("type") == kind or kind in part:
                    if part.get(kind) is None:
                        raise UserError(
                            f"message {i} has a {kind} part without its {kind}; give it as the "
                            f"part's {kind!r} key"
                        )
                    media.setdefault(i, []).append((kind, part[kind]))
                    break
    return media


def render_chat(
    processor: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    enable_thinking: bool | None = None,
    add_generation_prompt: bool = True,
    media: Mapping[int, Sequence[tuple[str, Any]]] | None = None,
    prefix_cache: MutableMapping[Any, str | None] | None = None,
    segment_cache: MutableMapping[Any, Segment] | None = None,
    **template_kwargs: Any,
) -> RenderedChat:
    """Render `messages` (+ a generation prompt) to token ids safely, with message boundaries.

    media: message index -> [(kind, item)]; by default read from the image/video parts.
    prefix_cache: the first k messages rendered alone, keyed by (k, enable_thinking); a caller
    that only ever appends messages (a chat session) keeps it across turns. segment_cache: the
    segments by (text, media), so images are processed once (left holding only those of this
    rendering).
    """
    encoder = safe_encoder(processor)
    escaped = escape_messages(encoder, messages)
    tools = encoder.escape_value(list(tools)) if tools else None
    template_kwargs = encoder.escape_value(template_kwargs)
    media = message_media(messages) if media is None else media

    def template(k: int, generation: bool) -> str:
        return processor.apply_chat_template(
            escaped[:k],
            add_generation_prompt=generation,
            enable_thinking=enable_thinking,
            tools=tools,
            **template_kwargs,
        )

    full = template(len(escaped), add_generation_prompt)
    cuts: list[tuple[int, int]] = []  # (character position, messages before it)
    prefixes = {} if prefix_cache is None else prefix_cache
    for k in range(1, len(escaped) + 1):
        key = (k, enable_thinking)
        if key not in prefixes:
            try:
                prefixes[key] = template(k, False)
            except UserError:  # the template refuses this prefix alone (e.g. no user turn)
                prefixes[key] = None
        prefix = prefixes[key]
        last = cuts[-1][0] if cuts else 0
        if prefix is not None and last < len(prefix) < len(full) and full.startswith(prefix):
            cuts.append((len(prefix), k))
    stretches: list[tuple[str, tuple[int, ...]]] = []
    roles: list[str] = []  # the role of the message each stretch but the last ends with
    start, first = 0, 0
    for end, k in [*cuts, (len(full), len(escaped))]:
        stretches.append((full[start:end], tuple(i for i in range(first, k) if i in media)))
        roles.append(escaped[k - 1]["role"])
        start, first = end, k
    ids: list[int] = []
    boundaries: list[tuple[int, bool]] = []
    placed: list[tuple[int, Segment]] = []
    segments = _segments(processor, encoder, stretches, media, segment_cache)
    for n, segment in enumerate(segments):
        placed.append((len(ids), segment))
        ids.extend(segment.ids)
        if n + 1 < len(segments):
            boundaries.append((len(ids), roles[n] == "user"))
    tail = full[full.rfind(ASSISTANT_START) :] if add_generation_prompt else ""
    thinking_open = THINK_START in tail and THINK_END not in tail
    return RenderedChat(ids, boundaries, placed, thinking_open)


def _segments(
    processor: Any,
    encoder: SafeEncoder,
    stretches: list[tuple[str, tuple[int, ...]]],
    media: Mapping[int, Sequence[tuple[str, Any]]],
    cache: MutableMapping[Any, Segment] | None,
) -> list[Segment]:
    cache = {} if cache is None else cache
    used = set(stretches)
    for key in [k for k in cache if k not in used]:
        del cache[key]  # keep only what this rendering uses (processed media are large)
    missing = [(text, kept) for text, kept in stretches if (text, kept) not in cache and not kept]
    for (text, kept), ids in zip(
        missing, encoder.encode_many([t for t, _ in missing]), strict=True
    ):
        cache[(text, kept)] = Segment(text, kept, ids)
    out = []
    for text, kept in stretches:
        if (text, kept) not in cache:
            cache[(text, kept)] = _media_segment(processor, encoder, text, kept, media)
        out.append(cache[(text, kept)])
    return out


def _media_segment(
    processor: Any,
    encoder: SafeEncoder,
    text: str,
    kept: tuple[int, ...],
    media: Mapping[int, Sequence[tuple[str, Any]]],
) -> Segment:
    items = [item for i in kept for item in media[i]]
    if any(item is None for _, item in items):
        raise UserError(
            "the images of this conversation would have to be processed again, but only their "
            "processed form was kept; start a new conversation to change them"
        )
    images = [x for kind, x in items if kind == "image"] or None
    videos = [x for kind, x in items if kind == "video"] or None
    (expanded,), arrays = processor.expand_media([text], images, videos)
    return Segment(text, kept, encoder.encode(expanded), dict(arrays))
