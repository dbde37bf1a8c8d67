"""Images -> pixel_values and grids (spec §6), and what image and video preprocessing share.

Pillow and numpy only. The image path reproduces transformers' Qwen2-VL image processor (PIL
backend) bit for bit: RGB with transparency composited on white, `smart_resize` with Python's
half-to-even rounding, PIL bicubic on uint8, rescale in float64 then float32 normalisation, and the
merge-block patch order the vision tower expects. Videos (video.py) reuse the resizing,
normalisation and patch order defined here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError
from .placeholders import expand_prompts

MAX_ASPECT_RATIO = 200


# ----------------------------------------------------------------------------- resizing


def smart_resize(
    height: int,
    width: int,
    factor: int = 32,
    min_pixels: int = 65536,
    max_pixels: int = 16777216,
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, pixel count within [min, max], aspect kept.

    Rounds with Python's round (half to even), as the reference does: (720, 1280) -> (704, 1280).
    """
    if min(height, width) < 1:
        raise ValueError(f"image size {height}x{width} is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} > 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ----------------------------------------------------------------------------- decoding


def _open_image(path: Path) -> Image.Image:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not an image file")
    try:
        image = Image.open(path)
        image.load()
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image in a format Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{path}: image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: cannot decode image ({e}); the file may be truncated") from None
    return image


def _pil_to_rgb(image: Image.Image, name: str) -> Image.Image:
    """RGB, transparency composited on white (as transformers 5 does)."""
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"{name}: cannot convert {image.mode} image to RGB ({e})") from None


def _array_to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    """uint8 [H, W], [H, W, C] or [C, H, W] (C in 1, 3, 4) -> RGB uint8 [H, W, 3]."""
    if arr.dtype != np.uint8:
        raise UserError(
            f"{name}: numpy images must be uint8 (0..255), got {arr.dtype}; convert first"
        )
    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise UserError(
            f"{name}: numpy image of shape {list(arr.shape)} is not [H, W], [H, W, C] or [C, H, W] "
            "with 1, 3 or 4 channels"
        )
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3:4] / 255
        return np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return arr


def load_image(image: Any, name: str = "image") -> Image.Image:
    """A path, PIL image or uint8 numpy array -> upright RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        name = str(image)
        image = _open_image(Path(image))
    if isinstance(image, Image.Image):
        try:
            image = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"{name}: cannot decode image ({e}); the file may be truncated") from e
        return _pil_to_rgb(image, name)
    if isinstance(image, np.ndarray):
        return Image.fromarray(_array_to_rgb(image, name))
    raise UserError(
        f"{name}: unsupported image input {type(image).__name__}; pass a file path, a PIL image "
        "or a uint8 numpy array"
    )


def _check_size(height: int, width: int, patch: int, name: str) -> None:
    if height < patch or width < patch:
        raise UserError(
            f"{name}: image is {width}x{height} pixels; each side must be at least {patch} pixels "
            "(one vision patch)"
        )
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise UserError(
            f"{name}: aspect ratio {max(height, width) / min(height, width):.1f}:1 is beyond "
            f"{MAX_ASPECT_RATIO}:1; crop or pad the image"
        )


# ----------------------------------------------------------------------------- shared steps


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read processor config ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _pixel_bounds(d: dict[str, Any], min_default: int, max_default: int) -> tuple[int, int]:
    size = d.get("size") or {}
    lo = d.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or min_default
    hi = d.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or max_default
    return int(lo), int(hi)


@dataclass
class _Normalize:
    """Settings shared by the image and video processors."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL bicubic

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @staticmethod
    def _common(d: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("patch_size", "temporal_patch_size", "merge_size", "resample"):
            if d.get(key) is not None:
                out[key] = int(d[key])
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                v = d[key]
                out[key] = tuple(float(x) for x in (v if isinstance(v, list) else [v] * 3))
        if d.get("rescale_factor") is not None:
            out["rescale_factor"] = float(d["rescale_factor"])
        return out

    def _to_float(self, image: Image.Image, size: tuple[int, int]) -> np.ndarray:
        """Resize (bicubic on uint8) to (h, w), rescale, normalise -> float32 [3, h, w]."""
        h, w = size
        resized = np.asarray(image.resize((w, h), resample=self.resample))
        # Same operation order and dtypes as the reference: float64 rescale, float32 normalise.
        x = (resized.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return x.transpose(2, 0, 1)

    def _patchify(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """[n, C, H, W] -> rows [t*gh*gw, C*T*P*P] ordered (group, block row, block col, in-block
        row, in-block col), columns (C, frame-in-group, y, x); n is padded by repeating the last
        frame."""
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -frames.shape[0] % tp:
            frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        n, c, h, w = frames.shape
        gt, gh, gw = n // tp, h // p, w // p
        x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


# ----------------------------------------------------------------------------- images


@dataclass
class ImageProcessor(_Normalize):
    """Qwen3.5 image preprocessing. Defaults are the shipped Qwen3.5 values (not CLIP's)."""

    min_pixels: int = 65536
    max_pixels: int = 16777216

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessor:
        lo, hi = _pixel_bounds(d, cls.min_pixels, cls.max_pixels)
        return cls(min_pixels=lo, max_pixels=hi, **cls._common(d))

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> ImageProcessor:
        path = Path(model_dir) / "preprocessor_config.json"
        return cls.from_dict(_read_json(path)) if path.is_file() else cls()

    def target_size(self, height: int, width: int, name: str = "image") -> tuple[int, int]:
        _check_size(height, width, self.patch_size, name)
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def __call__(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """One image or a list -> (pixel_values float32 [N, C*T*P*P], image_grid_thw int64 [n, 3]).

        An image is a file path, a PIL image or a uint8 numpy array ([H, W], [H, W, C], [C, H, W]).
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise UserError("no images given")
        rows, grids = [], []
        for i, item in enumerate(images):
            name = str(item) if isinstance(item, (str, os.PathLike)) else f"image {i + 1}"
            rgb = load_image(item, name)
            size = self.target_size(rgb.height, rgb.width, name)
            frame = self._to_float(rgb, size)[None]
            patches, grid = self._patchify(np.repeat(frame, self.temporal_patch_size, axis=0))
            rows.append(patches)
            grids.append(grid)
        pixels = rows[0] if len(rows) == 1 else np.concatenate(rows)
        return pixels, np.asarray(grids, dtype=np.int64)

    def expand(
        self, texts: Sequence[str], images: Any, **tokens: str
    ) -> tuple[list[str], dict[str, np.ndarray]]:
        """Processor hook: preprocess `images` and expand the image placeholders of `texts`
        (consumed in order over the texts) -> (texts, {"pixel_values", "image_grid_thw"})."""
        pixels, grid = self(images)
        texts = expand_prompts(texts, grid, merge_size=self.merge_size, **tokens)
        return texts, {"pixel_values": pixels, "image_grid_thw": grid}
