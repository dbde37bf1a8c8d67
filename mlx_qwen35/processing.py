"""Images and video frames -> pixel_values, grids and expanded prompts (spec §6, §7).

Pillow and numpy only. The image path reproduces transformers' Qwen2-VL image processor (PIL
backend) bit for bit: RGB with transparency composited on white, `smart_resize` with Python's
half-to-even rounding, PIL bicubic on uint8, rescale in float64 then float32 normalisation, and the
merge-block patch order the vision tower expects. Videos follow qwen-vl-utils (an even number of
frames sampled at a target fps, a per-frame pixel cap) and carry the source fps explicitly so that
the timestamps written into the prompt are real.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

MAX_ASPECT_RATIO = 200
# Assumed source frame rate of pre-decoded frames whose rate nobody told us (what transformers
# assumes too); the metadata records that it was assumed.
ASSUMED_FPS = 24.0
# Frame delay browsers use for GIF/WebP frames that declare none (or 0 ms).
_DEFAULT_FRAME_MS = 100.0
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


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


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    factor: int = 32,
    temporal_factor: int = 2,
    min_pixels: int = 4096,
    max_pixels: int = 25165824,
) -> tuple[int, int]:
    """As `smart_resize`, but the budget is for the whole clip (frames x pixels)."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} > 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
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


# ----------------------------------------------------------------------------- videos


@dataclass
class VideoFrames:
    """Pre-decoded frames (PIL images, uint8 arrays or image paths) and their source frame rate.

    Leave fps None only when it is truly unknown: timestamps then assume 24 fps."""

    frames: Sequence[Any]
    fps: float | None = None
    name: str = "video"


@dataclass
class VideoMetadata:
    name: str
    total_frames: int
    source_fps: float
    fps_assumed: bool
    frame_indices: list[int]
    timestamps: list[float]  # seconds, one per temporal group


def sample_frame_indices(
    total_frames: int,
    source_fps: float,
    fps: float = 2.0,
    min_frames: int = 4,
    max_frames: int = 768,
    temporal: int = 2,
) -> np.ndarray:
    """Frames to keep, qwen-vl-utils style: n = total / source_fps * fps clamped to
    [min_frames, min(max_frames, total)] and floored to a multiple of `temporal`; indices are
    linspace(0, total - 1, n) rounded half to even."""
    if total_frames < 1:
        raise ValueError("a video needs at least one frame")
    if total_frames < temporal:
        return np.arange(total_frames)
    lo = -(-min_frames // temporal) * temporal
    hi = min(max_frames, total_frames) // temporal * temporal
    n = min(max(total_frames / source_fps * fps, lo), hi)
    n = max(temporal, int(n // temporal) * temporal)
    return np.round(np.linspace(0, total_frames - 1, n)).astype(np.int64)


def group_timestamps(indices: Sequence[int], source_fps: float, temporal: int = 2) -> list[float]:
    """Seconds per temporal group: mean of its first and last frame time (the index list padded
    by repeating the last index, as the frames are)."""
    idx = [int(i) for i in indices]
    idx += [idx[-1]] * (-len(idx) % temporal)
    t = [i / source_fps for i in idx]
    return [(t[g] + t[g + temporal - 1]) / 2 for g in range(0, len(t), temporal)]


class _Source(Protocol):
    """A decodable clip: frame count, frame rate (None if unknown), chosen frames as RGB."""

    name: str
    total: int
    fps: float | None

    def frames(self, indices: Sequence[int]) -> list[Image.Image]: ...


class _ListSource:
    def __init__(self, frames: Sequence[Any], fps: float | None, name: str):
        self.items, self.fps, self.name, self.total = list(frames), fps, name, len(frames)

    def frames(self, indices: Sequence[int]) -> list[Image.Image]:
        out = []
        for i in indices:
            item = self.items[i]
            label = str(item) if isinstance(item, (str, os.PathLike)) else f"{self.name} frame {i}"
            out.append(load_image(item, label))
        return out


class _AnimatedSource:
    """GIF / animated WebP (or any still image, as one frame) through Pillow."""

    def __init__(self, image: Image.Image, name: str):
        self.image, self.name = image, name
        self.total = int(getattr(image, "n_frames", 1))
        durations = []
        try:
            for i in range(self.total):
                image.seek(i)
                d = image.info.get("duration") or 0
                durations.append(float(d) if d > 0 else _DEFAULT_FRAME_MS)
        except (OSError, ValueError, EOFError) as e:
            raise UserError(
                f"{name}: cannot decode frame {i} ({e}); the file may be truncated"
            ) from None
        self.fps = 1000.0 * self.total / sum(durations) if self.total > 1 else None

    def frames(self, indices: Sequence[int]) -> list[Image.Image]:
        out = []
        for i in indices:
            try:
                self.image.seek(int(i))
                out.append(_pil_to_rgb(self.image.copy(), self.name))
            except (OSError, ValueError, EOFError) as e:
                raise UserError(f"{self.name}: cannot decode frame {i} ({e})") from None
        return out


class _PyAVSource:
    """Video files through PyAV (optional dependency: the `video` extra)."""

    def __init__(self, path: Path):
        try:
            import av
        except ImportError:
            raise UserError(
                f"{path}: reading video files needs PyAV; install it with pip install "
                "'mlx-qwen35[video]' (or pass a GIF, a folder of frames or a frame list)"
            ) from None
        self.av, self.path, self.name = av, path, str(path)
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise UserError(f"{path}: the file has no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                self.fps = float(rate) if rate else None
                self.total = int(stream.frames or 0)
                if self.total <= 0:
                    self.total = sum(1 for _ in container.decode(stream))
        except (av.error.FFmpegError, OSError) as e:
            raise UserError(f"{path}: cannot read video ({e})") from None

    def frames(self, indices: Sequence[int]) -> list[Image.Image]:
        wanted = {int(i) for i in indices}
        last = max(wanted)
        got: dict[int, Image.Image] = {}
        decoded = 0
        try:
            with self.av.open(str(self.path)) as container:
                for frame in container.decode(container.streams.video[0]):
                    if decoded in wanted:
                        got[decoded] = frame.to_image()
                    decoded += 1
                    if decoded > last:
                        break
        except (self.av.error.FFmpegError, OSError) as e:
            raise UserError(f"{self.path}: cannot decode video ({e})") from None
        if len(got) < len(wanted):
            # The container declared more frames than it holds: retry with the real count.
            self.total = decoded
            raise _ShortVideo()
        return [_pil_to_rgb(got[int(i)], self.name) for i in indices]


class _ShortVideo(Exception):
    pass


def _is_frame(item: Any) -> bool:
    return isinstance(item, Image.Image) or (isinstance(item, np.ndarray) and item.ndim in (2, 3))


def _video_list(videos: Any) -> list[Any]:
    """One video (path, VideoFrames, [T, H, W, C] array, list of PIL/array frames) or a list."""
    if isinstance(videos, (str, os.PathLike, VideoFrames)):
        return [videos]
    if isinstance(videos, np.ndarray) and videos.ndim == 4:
        return [videos]
    if isinstance(videos, (list, tuple)) and videos and all(_is_frame(v) for v in videos):
        return [videos]
    if not isinstance(videos, (list, tuple)) or not videos:
        raise UserError("no videos given")
    return list(videos)


def _open_video(video: Any, index: int) -> _Source:
    if isinstance(video, VideoFrames):
        return _ListSource(video.frames, video.fps, video.name)
    if isinstance(video, (list, tuple)) or (isinstance(video, np.ndarray) and video.ndim == 4):
        return _ListSource(video, None, f"video {index + 1}")
    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if path.is_dir():
            files = sorted(
                (p for p in path.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS),
                key=lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)],
            )
            return _ListSource(files, None, str(path))
        if not path.exists():
            raise UserError(f"{path}: no such file or directory")
        if path.suffix.lower() in FRAME_EXTENSIONS:
            return _AnimatedSource(_open_image(path), str(path))
        try:
            image = Image.open(path)
        except UnidentifiedImageError:
            return _PyAVSource(path)
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e})") from None
        return _AnimatedSource(image, str(path))
    raise UserError(
        f"video {index + 1}: unsupported input {type(video).__name__}; pass a path (video file, "
        "GIF/WebP or folder of frames), a list of frames, a [T, H, W, C] array or "
        "VideoFrames(frames, fps)"
    )


@dataclass
class VideoProcessor(_Normalize):
    """Qwen3.5 video preprocessing (spec §7). Defaults: the shipped video_preprocessor_config."""

    min_pixels: int = 4096
    max_pixels: int = 25165824
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = True
    max_video_tokens: int = 768

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoProcessor:
        lo, hi = _pixel_bounds(d, cls.min_pixels, cls.max_pixels)
        kwargs = cls._common(d)
        for key in ("min_frames", "max_frames", "max_video_tokens"):
            if d.get(key) is not None:
                kwargs[key] = int(d[key])
        if d.get("fps") is not None:
            kwargs["fps"] = float(d["fps"])
        if d.get("cap_pixels_per_frame") is not None:
            kwargs["cap_pixels_per_frame"] = bool(d["cap_pixels_per_frame"])
        return cls(min_pixels=lo, max_pixels=hi, **kwargs)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> VideoProcessor:
        path = Path(model_dir) / "video_preprocessor_config.json"
        return cls.from_dict(_read_json(path)) if path.is_file() else cls()

    def target_size(self, num_frames: int, height: int, width: int, name: str) -> tuple[int, int]:
        _check_size(height, width, self.patch_size, name)
        n = max(num_frames, self.temporal_patch_size)
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            # qwen-vl-utils: a frame costs at most max_video_tokens merged tokens or its even share
            # of the clip budget, and at least 1.05 x min_pixels.
            per_frame = max(
                min(self.max_video_tokens * self.factor**2, self.max_pixels // n),
                int(self.min_pixels * 1.05),
            )
            max_pixels = per_frame * n
        return smart_resize_video(
            n, height, width, self.factor, self.temporal_patch_size, self.min_pixels, max_pixels
        )

    def _sample(self, source: _Source) -> tuple[list[Image.Image], np.ndarray, float, bool]:
        for _ in range(2):
            if source.total < 1:
                raise UserError(f"{source.name}: the video has no frames")
            fps = source.fps or ASSUMED_FPS
            indices = sample_frame_indices(
                source.total,
                fps,
                self.fps,
                self.min_frames,
                self.max_frames,
                self.temporal_patch_size,
            )
            try:
                return source.frames(indices), indices, fps, source.fps is None
            except _ShortVideo:
                continue
        raise UserError(f"{source.name}: cannot decode the frames it declares")

    def __call__(self, videos: Any) -> tuple[np.ndarray, np.ndarray, list[VideoMetadata]]:
        """One video or a list -> (pixel_values_videos float32 [N, C*T*P*P], video_grid_thw int64
        [n, 3], metadata per video with the sampled indices and per-group timestamps).

        A video is a path (video file via PyAV, animated GIF/WebP, folder of frame images), a list
        of frames (PIL / uint8 arrays / paths) or a uint8 [T, H, W, C] array (source fps unknown:
        24 assumed), or VideoFrames(frames, fps). A list of PIL images or arrays is one video.
        """
        videos = _video_list(videos)
        rows, grids, meta = [], [], []
        for i, video in enumerate(videos):
            source = _open_video(video, i)
            frames, indices, fps, assumed = self._sample(source)
            sizes = {(f.height, f.width) for f in frames}
            if len(sizes) > 1:
                raise UserError(f"{source.name}: frames differ in size ({sorted(sizes)[:2]}...)")
            h, w = sizes.pop()
            size = self.target_size(len(frames), h, w, source.name)
            stack = np.stack([self._to_float(f, size) for f in frames])
            patches, grid = self._patchify(stack)
            rows.append(patches)
            grids.append(grid)
            meta.append(
                VideoMetadata(
                    name=source.name,
                    total_frames=source.total,
                    source_fps=fps,
                    fps_assumed=assumed,
                    frame_indices=[int(x) for x in indices],
                    timestamps=group_timestamps(indices, fps, self.temporal_patch_size),
                )
            )
        pixels = rows[0] if len(rows) == 1 else np.concatenate(rows)
        return pixels, np.asarray(grids, dtype=np.int64), meta

    def expand(
        self, texts: Sequence[str], videos: Any, *, video_layout: str = "vllm", **tokens: str
    ) -> tuple[list[str], dict[str, np.ndarray]]:
        """Processor hook: preprocess `videos` and expand the video placeholders of `texts`
        (timestamps included) -> (texts, {"pixel_values_videos", "video_grid_thw"})."""
        pixels, grid, meta = self(videos)
        texts = expand_prompts(
            texts,
            None,
            grid,
            [m.timestamps for m in meta],
            merge_size=self.merge_size,
            video_layout=video_layout,
            **tokens,
        )
        return texts, {"pixel_values_videos": pixels, "video_grid_thw": grid}


# ----------------------------------------------------------------------------- prompts


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
