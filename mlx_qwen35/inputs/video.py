"""Videos -> pixel_values_videos, grids and timestamps (spec §7).

Videos follow qwen-vl-utils: an even number of frames sampled at a target fps, a per-frame pixel
cap, and the source fps carried explicitly so that the timestamps written into the prompt are real.
Sources: frame lists or folders, animated GIF/WebP, and video files through PyAV (the `video`
extra).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from .images import (
    MAX_ASPECT_RATIO,
    _check_size,
    _Normalize,
    _open_image,
    _pil_to_rgb,
    _pixel_bounds,
    _read_json,
    load_image,
)
from .placeholders import expand_prompts

# Assumed source frame rate of pre-decoded frames whose rate nobody told us (what transformers
# assumes too); the metadata records that it was assumed.
ASSUMED_FPS = 24.0
# Frame delay browsers use for GIF/WebP frames that declare none (or 0 ms).
_DEFAULT_FRAME_MS = 100.0
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


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


# Named the same way in the README.
PYAV_INSTALL = 'pip install -e ".[video]"'


class _PyAVSource:
    """Video files through PyAV (optional dependency: the `video` extra)."""

    def __init__(self, path: Path):
        try:
            import av
        except ImportError:
            raise UserError(
                f"{path}: reading video files needs PyAV, from the video extra: "
                f"{PYAV_INSTALL} (or pass a GIF, a folder of frames or a frame list)"
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
