"""The Processor: tokenizer + chat template + image and video preprocessing, called the way
transformers' processors are called.

    processor = Processor.from_pretrained(model_dir, config)
    text = processor.apply_chat_template(messages, enable_thinking=False)
    inputs = processor(text=[text_a, text_b])      # {"input_ids", "attention_mask"}, left-padded
    inputs = processor(text=[text], images=["cat.png"], videos=["clip.gif"])
    # + "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"

Media go through `image_processor` / `video_processor` (images.py's ImageProcessor and video.py's
VideoProcessor, built from the checkpoint's preprocessor configs when the model has a vision
tower); without them, passing images or videos is an error. Each expands its placeholders in the
prompt texts (each `<|image_pad|>` / video block to its number of vision tokens, video timestamps
included) and returns its arrays (`pixel_values`, `image_grid_thw` / `pixel_values_videos`,
`video_grid_thw`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..model.config import ModelConfig
from .messages import render_chat_template
from .placeholders import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START

IM_END = "<|im_end|>"


class Processor:
    """Text side of a Qwen3.5 processor.

    Args:
        tokenizer: a `Tokenizer` (tokenizer.py: streaming detokenizer, eos ids, chat template), or
            anything with its interface, mlx-lm's `TokenizerWrapper` included.
        config: the model's `ModelConfig` (special token ids, context length).
        image_processor: an ImageProcessor (or any object with `.expand(texts, images)`, or a
            callable `(texts, images)`) -> (expanded texts, {"pixel_values", "image_grid_thw"}).
        video_processor: likewise for videos -> (texts, {"pixel_values_videos", "video_grid_thw"}).
    """

    def __init__(
        self,
        tokenizer: Any,
        config: ModelConfig,
        image_processor: Any | None = None,
        video_processor: Any | None = None,
    ):
        self.tokenizer = tokenizer
        self.config = config
        self.image_processor = image_processor
        self.video_processor = video_processor

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: ModelConfig) -> Processor:
        """Tokenizer from `model_dir`; stop ids = <|im_end|> ∪ generation_config eos."""
        from .tokenizer import Tokenizer

        model_dir = Path(model_dir)
        tokenizer = Tokenizer.from_dir(model_dir, eos_token_ids=_generation_eos_ids(model_dir))
        im_end = tokenizer.convert_tokens_to_ids(IM_END)
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
            tokenizer.add_eos_token(im_end)
        image_processor = video_processor = None
        if config.vision is not None:
            from .images import ImageProcessor
            from .video import VideoProcessor

            image_processor = ImageProcessor.from_dir(model_dir)
            video_processor = VideoProcessor.from_dir(model_dir)
            for name, media in (
                ("preprocessor", image_processor),
                ("video_preprocessor", video_processor),
            ):
                _check_matches_tower(media, config, model_dir / f"{name}_config.json")
        return cls(tokenizer, config, image_processor, video_processor)

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.tokenizer.eos_token_ids)

    @property
    def max_position_embeddings(self) -> int:
        return self.config.text.max_position_embeddings

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer.has_chat_template)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Prompt text for `messages` (see chat.render_chat_template)."""
        return render_chat_template(
            self.tokenizer,
            messages,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            tools=tools,
            **template_kwargs,
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __call__(
        self,
        text: str | Sequence[str],
        images: Sequence[Any] | None = None,
        videos: Sequence[Any] | None = None,
        add_special_tokens: bool = False,
    ) -> dict[str, mx.array]:
        """Token ids for one text or a batch: {"input_ids" [B, T], "attention_mask" [B, T]}.

        Batches are left-padded (the model needs real tokens at the end of every row). With
        images/videos, each placeholder in the text is expanded to its number of vision tokens
        and the media arrays are added to the dict.
        """
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise UserError("text must be a string or a non-empty list of strings")
        texts, media = self.expand_media(texts, images, videos)
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        input_ids, attention_mask = self._left_pad(rows)
        return {"input_ids": input_ids, "attention_mask": attention_mask, **media}

    def expand_media(
        self,
        texts: Sequence[str],
        images: Sequence[Any] | None = None,
        videos: Sequence[Any] | None = None,
    ) -> tuple[list[str], dict[str, mx.array]]:
        """(texts with each placeholder expanded to its vision tokens, the media arrays); a
        placeholder without media, or media without placeholders, is a UserError."""
        texts = list(texts)
        media: dict[str, mx.array] = {}
        tokens = self.media_tokens
        for kind, items in (("image", images), ("video", videos)):
            if isinstance(items, (list, tuple)) and not items:
                items = None
            if items is not None:
                texts, arrays = self._expand_media(kind, texts, items)
                media.update({k: mx.array(v) for k, v in arrays.items()})
                continue
            placeholder = tokens[f"{kind}_token"]
            count = sum(t.count(placeholder) for t in texts)
            if count:
                raise UserError(
                    f"the prompt has {count} {placeholder} placeholder(s) but no {kind}s were "
                    f"given; pass {kind}s=[...] or remove the placeholders"
                )
        return texts, media

    @property
    def media_tokens(self) -> dict[str, str]:
        """The placeholder token strings, read from the tokenizer by the config's ids."""
        ids = {
            "image_token": (self.config.image_token_id, IMAGE_TOKEN),
            "video_token": (self.config.video_token_id, VIDEO_TOKEN),
            "vision_start": (self.config.vision_start_token_id, VISION_START),
            "vision_end": (self.config.vision_end_token_id, VISION_END),
        }
        out = {}
        for key, (token_id, default) in ids.items():
            try:
                token = self.tokenizer.convert_ids_to_tokens(token_id)
            except (IndexError, KeyError, OverflowError, TypeError, ValueError):
                token = None
            out[key] = token if isinstance(token, str) and token else default
        return out

    def with_media_options(
        self,
        *,
        fps: float | None = None,
        max_pixels: int | None = None,
        max_frames: int | None = None,
    ) -> Processor:
        """A copy whose media processors sample videos at `fps` frames per second, keep at most
        `max_frames` frames per video, and cap every image and video frame at `max_pixels` pixels
        (before the vision tower). None keeps the checkpoint's setting."""
        check_media_options(fps=fps, max_pixels=max_pixels, max_frames=max_frames)
        out = copy.copy(self)
        image, video = self.image_processor, self.video_processor
        if max_pixels is not None and dataclasses.is_dataclass(image):
            out.image_processor = dataclasses.replace(
                image, max_pixels=max_pixels, min_pixels=min(image.min_pixels, max_pixels)
            )
        if dataclasses.is_dataclass(video):
            changes: dict[str, Any] = {}
            if fps is not None:
                changes["fps"] = float(fps)
            if max_frames is not None:
                changes["max_frames"] = max_frames
                changes["min_frames"] = min(video.min_frames, max_frames)
            if max_pixels is not None:
                # The per-frame cap counts merged tokens of factor^2 pixels each.
                changes["max_video_tokens"] = max(1, max_pixels // video.factor**2)
                changes["cap_pixels_per_frame"] = True
                changes["min_pixels"] = min(video.min_pixels, max_pixels)
            out.video_processor = dataclasses.replace(video, **changes)
        return out

    def _left_pad(self, rows: list[list[int]]) -> tuple[mx.array, mx.array]:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = min(self.eos_token_ids) if self.eos_token_ids else 0
        width = max(len(r) for r in rows)
        ids = [[pad] * (width - len(r)) + r for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        return mx.array(ids, dtype=mx.int32), mx.array(mask, dtype=mx.int32)

    def _expand_media(self, kind: str, texts: list[str], items: Sequence[Any]) -> tuple[list, dict]:
        media_processor = self.image_processor if kind == "image" else self.video_processor
        if media_processor is None:
            raise UserError(
                f"this model has no {kind} processor (no vision tower or preprocessor config); "
                "pass text only"
            )
        items = list(items) if isinstance(items, (list, tuple)) else [items]
        expand = getattr(media_processor, "expand", None)
        if expand is not None:
            texts, arrays = expand(texts, items, **self.media_tokens)
        else:
            texts, arrays = media_processor(texts, items)
        return list(texts), dict(arrays)


def apply_media_options(
    processor: Processor,
    *,
    fps: float | None = None,
    max_pixels: int | None = None,
    max_frames: int | None = None,
) -> Processor:
    """`processor.with_media_options(...)` when any setting is given, else `processor` itself."""
    if fps is None and max_pixels is None and max_frames is None:
        return processor
    return processor.with_media_options(fps=fps, max_pixels=max_pixels, max_frames=max_frames)


def check_media_options(
    *, fps: float | None = None, max_pixels: int | None = None, max_frames: int | None = None
) -> None:
    """Raise UserError for an out-of-range media setting (None = keep the checkpoint's)."""

    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if fps is not None and (
        isinstance(fps, bool)
        or not isinstance(fps, (int, float))
        or not math.isfinite(fps)
        or fps <= 0
    ):
        raise UserError(f"fps must be a number > 0 (frames sampled per second), got {fps!r}")
    if max_pixels is not None and (not is_int(max_pixels) or max_pixels < 32 * 32):
        raise UserError(
            f"max_pixels must be an integer >= 1024 (one 32x32 vision token), got {max_pixels!r}"
        )
    if max_frames is not None and (not is_int(max_frames) or max_frames < 2):
        raise UserError(f"max_frames must be an integer >= 2, got {max_frames!r}")


def _check_matches_tower(media: Any, config: ModelConfig, path: Path) -> None:
    """The preprocessor's patch geometry must be the tower's, or pixel rows would not fit it."""
    vision = config.vision
    for ours, theirs in (
        ("patch_size", "patch_size"),
        ("temporal_patch_size", "temporal_patch_size"),
        ("merge_size", "spatial_merge_size"),
    ):
        if getattr(media, ours) != getattr(vision, theirs):
            raise UserError(
                f"{path}: {ours} is {getattr(media, ours)} but the vision tower's {theirs} is "
                f"{getattr(vision, theirs)}; the preprocessor config belongs to another model"
            )


def _generation_eos_ids(model_dir: Path) -> list[int]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); download the checkpoint again") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; download the checkpoint again")
    eos = data.get("eos_token_id")
    if eos is None:
        return []
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids):
        raise UserError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return ids
