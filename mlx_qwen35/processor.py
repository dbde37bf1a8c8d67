"""The Processor: tokenizer + chat template + (later) image and video preprocessing, called the
way transformers' processors are called.

    processor = Processor.from_pretrained(model_dir, config)
    text = processor.apply_chat_template(messages, enable_thinking=False)
    inputs = processor(text=[text_a, text_b])      # {"input_ids", "attention_mask"}, left-padded

Media go through `image_processor` / `video_processor` (built by the vision code in
processing.py); without them, passing images or videos is an error. Both are callables
`(texts, items) -> (texts, arrays)`: they expand their placeholders in the prompt texts (each
`<|image_pad|>` / video block to its number of vision tokens, video timestamps included) and return
their arrays (`pixel_values`, `image_grid_thw` / `pixel_values_videos`, `video_grid_thw`, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from .chat import render_chat_template
from .config import ModelConfig
from .errors import UserError

IM_END = "<|im_end|>"


class Processor:
    """Text side of a Qwen3.5 processor.

    Args:
        tokenizer: an mlx-lm `TokenizerWrapper` (streaming detokenizer, eos ids, chat template).
        config: the model's `ModelConfig` (special token ids, context length).
        image_processor: `(texts, images) -> (expanded texts, {"pixel_values", ...})`.
        video_processor: `(texts, videos) -> (expanded texts, {"pixel_values_videos", ...})`.
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
        """Tokenizer from `model_dir` via mlx-lm; stop ids = <|im_end|> ∪ generation_config eos."""
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        model_dir = Path(model_dir)
        if (
            not (model_dir / "tokenizer.json").is_file()
            and not (model_dir / "tokenizer_config.json").is_file()
        ):
            raise UserError(
                f"{model_dir}: no tokenizer.json or tokenizer_config.json; the checkpoint is "
                "incomplete, download or convert it again"
            )
        try:
            tokenizer = load_tokenizer(model_dir, eos_token_ids=_generation_eos_ids(model_dir))
        except (OSError, ValueError) as e:
            raise UserError(f"{model_dir}: cannot load the tokenizer ({e})") from e
        im_end = tokenizer.convert_tokens_to_ids(IM_END)
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
            tokenizer.add_eos_token(im_end)
        return cls(tokenizer, config)

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
        media: dict[str, Any] = {}
        for kind, items in (("image", images), ("video", videos)):
            if items:
                texts, arrays = self._expand_media(kind, texts, items)
                media.update(arrays)
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        input_ids, attention_mask = self._left_pad(rows)
        return {"input_ids": input_ids, "attention_mask": attention_mask, **media}

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
        texts, arrays = media_processor(texts, list(items))
        return list(texts), dict(arrays)


def _generation_eos_ids(model_dir: Path) -> list[int]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); download the checkpoint again") from e
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
