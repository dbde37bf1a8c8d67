"""A prompt as the user gives it (text, chat messages, token ids; images and videos) -> the token
ids, and for media the merged embeddings and 3-D positions, that the engine runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx

from ..errors import UserError
from .messages import build_messages
from .render import render_chat


def _check_text_prompt(prompt: str) -> None:
    """Raise UserError for a text prompt with nothing but white space."""
    if not prompt.strip():
        raise UserError("the prompt is empty; pass some text (--prompt TEXT, or - for stdin)")


def prompt_tokens(
    processor: Any,
    prompt: str | Sequence[Mapping[str, Any]] | Sequence[int] | mx.array,
    *,
    system: str | None = None,
    enable_thinking: bool | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Token ids for a prompt given as text (one user turn, rendered through the chat template
    as mlx-lm does), a list of chat messages, or token ids (used as they are)."""
    if isinstance(prompt, mx.array):
        prompt = prompt.reshape(-1).tolist()
    if isinstance(prompt, str):
        _check_text_prompt(prompt)
        if not processor.has_chat_template:
            if system is not None:
                raise UserError(
                    "this model has no chat template, so it cannot take a system prompt"
                )
            return processor.encode(prompt, add_special_tokens=True)
        prompt = build_messages(prompt, system)
    elif system is not None and _is_messages(prompt):
        prompt = list(prompt)
        if prompt and prompt[0].get("role") == "system":
            raise UserError("the messages already start with a system message; drop `system`")
        prompt = [{"role": "system", "content": system}, *prompt]
    if _is_messages(prompt):
        # Message contents are text: only the template's markup becomes control tokens.
        return render_chat(processor, prompt, tools=tools, enable_thinking=enable_thinking).ids
    ids = list(prompt)
    if not ids:
        raise UserError("the prompt is empty; pass some text, messages or token ids")
    if system is not None:
        raise UserError("`system` applies to text or message prompts, not to token ids")
    vocab = processor.config.text.vocab_size
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise UserError(f"token ids must be integers in [0, {vocab}); got {ids[:8]}...")
    return ids


def _is_messages(prompt: Any) -> bool:
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and len(prompt) > 0
        and all(isinstance(m, Mapping) for m in prompt)
    )


def media_messages(
    prompt: str | Sequence[Mapping[str, Any]],
    images: Sequence[Any] = (),
    videos: Sequence[Any] = (),
    system: str | None = None,
) -> tuple[list[dict[str, Any]], list[Any], list[Any]]:
    """Chat messages with one content part per image and video (each part carrying its item),
    and the media in prompt order.

    A text prompt becomes one user turn: the images, then the videos, then the text. In a message
    list, each `{"type": "image"}` / `{"type": "video"}` part takes its item from the part's
    "image" / "video" key when present, else the next one of `images` / `videos`; every item
    must find a part.
    """
    images, videos = list(images or ()), list(videos or ())
    if isinstance(prompt, str):
        _check_text_prompt(prompt)
        parts = [{"type": "image", "image": i} for i in images]
        parts += [{"type": "video", "video": v} for v in videos]
        messages = build_messages(prompt, system)
        messages[-1]["content"] = [*parts, {"type": "text", "text": prompt}]
        return messages, images, videos
    if not _is_messages(prompt):
        raise UserError(
            "images and videos need a text or chat-message prompt; token ids cannot place them"
        )
    messages = [dict(m) for m in prompt]
    if system is not None:
        if messages[0].get("role") == "system":
            raise UserError("the messages already start with a system message; drop `system`")
        messages.insert(0, {"role": "system", "content": system})
    given = {"image": iter(images), "video": iter(videos)}
    found: dict[str, list[Any]] = {"image": [], "video": []}
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) or not isinstance(content, Sequence):
            continue
        parts = message["content"] = [dict(p) if isinstance(p, Mapping) else p for p in content]
        for part in parts:
            kind = _media_kind(part)
            if kind is None:
                continue
            item = part.get(kind)
            if item is None:
                item = next(given[kind], None)
            if item is None:
                raise UserError(
                    f"the messages have more {kind} parts than {kind}s given; pass one {kind} per "
                    f"{kind} part (in {kind}s=[...] or the part's {kind!r} key)"
                )
            part[kind] = item  # each part carries its item (a copy: the caller's stay as given)
            found[kind].append(item)
    for kind, rest in given.items():
        extra = len(list(rest))
        if extra:
            raise UserError(
                f"{extra} {kind}(s) left over: the messages have {len(found[kind])} {kind} "
                f"part(s); add a {{'type': '{kind}'}} part for each {kind}"
            )
    return messages, found["image"], found["video"]


def _has_media_parts(prompt: Any) -> bool:
    if not _is_messages(prompt):
        return False
    for message in prompt:
        content = message.get("content")
        if isinstance(content, Sequence) and not isinstance(content, str):
            if any(_media_kind(part) for part in content):
                return True
    return False


def _media_kind(part: Any) -> str | None:
    if not isinstance(part, Mapping):
        return None
    if part.get("type") == "image" or "image" in part:
        return "image"
    if "image_url" in part:
        raise UserError(
            "image_url parts are not supported; use {'type': 'image', 'image': PATH} or pass "
            "images=[...]"
        )
    if part.get("type") == "video" or "video" in part:
        return "video"
    return None


def prepare_prompt(
    model: Any,
    processor: Any,
    prompt: str | Sequence[Mapping[str, Any]] | Sequence[int] | mx.array,
    *,
    images: Sequence[Any] | None = None,
    videos: Sequence[Any] | None = None,
    system: str | None = None,
    enable_thinking: bool | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[list[int], mx.array | None, mx.array | None]:
    """(token ids, input_embeddings [1, T, H] or None, position_ids [3, 1, T] or None).

    Text prompts give ids only. With images/videos the prompt is rendered with their
    placeholders, expanded by the processor, and the vision tower runs here, once.
    """
    if not images and not videos and not _has_media_parts(prompt):
        ids = prompt_tokens(
            processor, prompt, system=system, enable_thinking=enable_thinking, tools=tools
        )
        config = processor.config
        for kind, token_id in (("image", config.image_token_id), ("video", config.video_token_id)):
            if token_id in ids:
                raise UserError(
                    f"the prompt holds {kind} placeholder tokens but no {kind}s were given; pass "
                    f"{kind}s=[...] (--{kind} PATH) or remove the placeholders"
                )
        return ids, None, None
    if isinstance(prompt, mx.array):
        prompt = prompt.reshape(-1).tolist()
    messages, _, _ = media_messages(prompt, images, videos, system)
    rendered = render_chat(processor, messages, tools=tools, enable_thinking=enable_thinking)
    embeddings, positions = model.prepare_inputs(
        mx.array([rendered.ids]), **rendered.media_arrays()
    )
    return rendered.ids, embeddings, positions
