"""Video files through PyAV (the `video` extra, installed by the `test` extra): clips encoded
here with PyAV's own encoders decode, through the processor and generation, to the same frames,
frame indices, timestamps and tokens as the frames they were made from.

Three clips of 13 frames at 4 fps: PNG in QuickTime (lossless, the container declares its frame
count), raw RGB in NUT (lossless, no declared count: the source counts by decoding) and MPEG-4
Part 2 in MP4 (lossy, as users' files are: compared within a tolerance, and shown to be closer
to the right frames than to their neighbours).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx_qwen35
from mlx_qwen35.errors import UserError
from mlx_qwen35.inputs.video import VideoFrames, VideoProcessor
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

try:
    import av
except ImportError:  # the tests that need it skip; the one without it still runs
    av = None

FPS, COUNT = 4, 13
# 13 frames at 4 fps = 3.25 s -> 6 frames sampled at 2 fps, in 3 temporal groups.
SAMPLED = [0, 2, 5, 7, 10, 12]
CLIPS = {  # name -> (codec, pixel format, width, height)
    "clip.mov": ("png", "rgb24", 70, 40),
    "clip.nut": ("rawvideo", "rgb24", 70, 40),
    "clip.mp4": ("mpeg4", "yuv420p", 64, 48),
}


def make_frames(w: int, h: int) -> list[Image.Image]:
    """Distinct frames: a red level that jumps, a green bar that moves, a blue ramp."""
    frames = []
    for i in range(COUNT):
        a = np.zeros((h, w, 3), np.uint8)
        a[..., 0] = 97 * i % 256
        a[:, 4 * i : 4 * i + 16, 1] = 255
        a[..., 2] = np.linspace(0, 255, w, dtype=np.uint8)[None]
        frames.append(Image.fromarray(a))
    return frames


def encode(path: Path, codec: str, pix_fmt: str, frames: list[Image.Image]) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, pix_fmt
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}
        for image in frames:
            frame = av.VideoFrame.from_image(image)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, tuple[Path, list[Image.Image]]]:
    if av is None:
        pytest.skip("PyAV (the video extra) is not installed")
    root = tmp_path_factory.mktemp("clips")
    out = {}
    for name, (codec, pix_fmt, w, h) in CLIPS.items():
        frames = make_frames(w, h)
        out[name] = (encode(root / name, codec, pix_fmt, frames), frames)
    with av.open(str(out["clip.nut"][0])) as c:
        assert c.streams.video[0].frames == 0  # NUT declares no count: the fallback runs
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return mlx_qwen35.load(str(ensure_tiny_random(tmp_path_factory.mktemp("cache"))))


def process(processor, video):
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]}]
    )
    out = processor(text=[text], videos=[video])
    return out["input_ids"][0].tolist(), np.array(out["pixel_values_videos"]), out


@pytest.mark.parametrize("name", ["clip.mov", "clip.nut"])
def test_lossless_clip_gives_exactly_its_frames(tiny, clips, name):
    model, processor = tiny
    path, frames = clips[name]
    ids, pixels, out = process(processor, path)
    ref_ids, ref_pixels, ref = process(processor, VideoFrames(frames, fps=FPS))
    # Same sampled frames, same timestamps in the prompt, same pixels.
    assert ids == ref_ids and "seconds>" in processor.decode(ids)
    np.testing.assert_array_equal(pixels, ref_pixels)
    assert np.array(out["video_grid_thw"]).tolist() == np.array(ref["video_grid_thw"]).tolist()
    _, _, (meta,) = processor.video_processor([path])
    assert (meta.total_frames, meta.source_fps, meta.fps_assumed) == (COUNT, FPS, False)
    assert meta.frame_indices == SAMPLED
    # And the whole path to generated tokens.
    prompt = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]}]
    text = mlx_qwen35.generate(model, processor, prompt, max_tokens=4, videos=[path])
    assert text == mlx_qwen35.generate(
        model, processor, prompt, max_tokens=4, videos=[VideoFrames(frames, fps=FPS)]
    )


def test_lossy_mp4_decodes_the_right_frames(clips):
    path, frames = clips["clip.mp4"]
    vp = VideoProcessor()
    pixels, grid, (meta,) = vp(str(path))
    ref, ref_grid, (ref_meta,) = vp(VideoFrames(frames, fps=FPS))
    assert grid.tolist() == ref_grid.tolist()
    assert (meta.total_frames, meta.source_fps, meta.frame_indices) == (COUNT, FPS, SAMPLED)
    assert meta.timestamps == ref_meta.timestamps
    error = np.abs(pixels - ref).mean()
    assert error < 0.05
    # The next frame over is much further away than the codec's error: no off-by-one.
    shifted, _, _ = vp(VideoFrames(frames[1:] + frames[-1:], fps=FPS))
    assert np.abs(pixels - shifted).mean() > 5 * error


def test_broken_video_file_is_one_line(tmp_path, clips):
    path = tmp_path / "cut.mp4"
    path.write_bytes(clips["clip.mp4"][0].read_bytes()[:300])
    with pytest.raises(UserError, match=r"cut.mp4: cannot (read|decode)"):
        VideoProcessor()(str(path))


def test_video_file_without_pyav(tmp_path, monkeypatch):
    """Without PyAV a video file gets an error naming the extra (PyAV hidden, if installed: an
    import of a module set to None in sys.modules raises ImportError)."""
    monkeypatch.setitem(sys.modules, "av", None)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(100))
    with pytest.raises(UserError, match=r"clip.mp4: reading video files needs PyAV.*\[video\]"):
        VideoProcessor()(clip)
