"""Prompt expansion: the chat template's one-token image/video placeholders -> the vision
tokens the model sees (spec §6, §7)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import UserError

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


def _grid_rows(grid_thw: Any) -> list[list[int]] | None:
    if grid_thw is None:
        return None
    return np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3).tolist()


def expand_prompts(
    texts: Sequence[str],
    image_grid_thw: Any = None,
    video_grid_thw: Any = None,
    video_timestamps: Sequence[Sequence[float]] | None = None,
    *,
    merge_size: int = 2,
    image_token: str = IMAGE_TOKEN,
    video_token: str = VIDEO_TOKEN,
    vision_start: str = VISION_START,
    vision_end: str = VISION_END,
    video_layout: str = "vllm",
) -> list[str]:
    """Expand the chat template's one-token placeholders to the vision tokens the model sees.

    Grids are consumed in order over the texts (all of text 0's placeholders first). A grid
    argument of None leaves that kind untouched (so images and videos can be expanded in separate
    passes); an empty one asserts the texts hold no such placeholder.
    Images: each `image_token` becomes gh*gw/merge^2 copies. Videos, per temporal group g:
    `<{t_g:.1f} seconds>` + vision_start + video_token x (gh*gw/merge^2) + vision_end.
    video_layout "vllm" (default; transformers <= 4.57 and vLLM) replaces the template's whole
    `vision_start video_token vision_end` triple with that; "transformers" (transformers 5)
    replaces only the video token, keeping the outer start/end tokens.
    Raises UserError when placeholders and images (videos) differ in number.
    """
    if video_layout not in ("vllm", "transformers"):
        raise UserError(f"video_layout must be 'vllm' or 'transformers', got {video_layout!r}")
    images, videos = _grid_rows(image_grid_thw), _grid_rows(video_grid_thw)
    stamps = [list(s) for s in video_timestamps or []]
    if videos is not None:
        if len(stamps) != len(videos):
            raise UserError(f"{len(videos)} videos but {len(stamps)} timestamp lists")
        for (t, _, _), s in zip(videos, stamps, strict=True):
            if len(s) != t:
                raise UserError(f"a video has {t} temporal groups but {len(s)} timestamps")

    triple = vision_start + video_token + vision_end
    parts = []
    if images is not None:
        parts.append(f"(?P<image>{re.escape(image_token)})")
    if videos is not None:
        video = re.escape(triple) if video_layout == "vllm" else re.escape(video_token)
        parts.append(f"(?P<video>{video})")
    if not parts:
        return list(texts)
    pattern = re.compile("|".join(parts))

    counts = {"image": 0, "video": 0}
    for text in texts:
        for m in pattern.finditer(text):
            counts[m.lastgroup] += 1
        if videos is not None and video_layout == "vllm":
            stray = text.count(video_token) - text.count(triple)
            if stray:
                raise UserError(
                    f"the prompt has {stray} {video_token} token(s) outside {triple} "
                    "placeholders; use the chat template's video placeholder"
                )
    for kind, items in (("image", images), ("video", videos)):
        if items is not None and counts[kind] != len(items):
            raise UserError(
                f"the prompt has {counts[kind]} {kind} placeholder(s) but {len(items)} {kind}(s) "
                f"were given; put one {kind} in the messages per {kind} passed"
            )

    merge = merge_size * merge_size
    next_image, next_video = iter(images or []), iter(zip(videos or [], stamps, strict=False))

    def replace(m: re.Match[str]) -> str:
        if m.lastgroup == "image":
            _, h, w = next(next_image)
            return image_token * (h * w // merge)
        (_, h, w), times = next(next_video)
        pads = video_token * (h * w // merge)
        return "".join(f"<{t:.1f} seconds>{vision_start}{pads}{vision_end}" for t in times)

    return [pattern.sub(replace, text) for text in texts]


def expand_prompt(
    text: str,
    image_grid_thw: Any = None,
    video_grid_thw: Any = None,
    video_timestamps: Sequence[Sequence[float]] | None = None,
    **kwargs: Any,
) -> str:
    """`expand_prompts` for one text."""
    return expand_prompts([text], image_grid_thw, video_grid_thw, video_timestamps, **kwargs)[0]
