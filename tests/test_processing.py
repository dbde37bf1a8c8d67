"""Image/video preprocessing and prompt expansion (spec §6, §7).

Images are compared with transformers' Qwen2-VL PIL-backend image processor built with the shipped
Qwen3.5 settings; videos (transformers' video processor needs torchvision, absent here) with the
spec's formulas and an independent per-element re-derivation of the patch layout.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from mlx_qwen35.errors import UserError
from mlx_qwen35.inputs.images import ImageProcessor, smart_resize
from mlx_qwen35.inputs.placeholders import expand_prompt, expand_prompts
from mlx_qwen35.inputs.video import (
    VideoFrames,
    VideoProcessor,
    group_timestamps,
    sample_frame_indices,
)

QWEN35_IMAGE = dict(
    size={"shortest_edge": 65536, "longest_edge": 16777216},
    patch_size=16,
    merge_size=2,
    temporal_patch_size=2,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
)


@pytest.fixture(scope="module")
def hf_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(**QWEN35_IMAGE)


def make_image(h: int, w: int, mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: bicubic overshoot and clipping both get exercised.
    y, x = np.mgrid[0:h, 0:w]
    base = (x * 255 // max(w - 1, 1) + y * 127 // max(h - 1, 1)) % 256
    noise = rng.integers(0, 256, (h, w, 4))
    arr = ((base[..., None] + noise) // 2).astype(np.uint8)
    if mode == "RGBA":
        arr[..., 3] = rng.integers(0, 256, (h, w))  # partial transparency everywhere
        return Image.fromarray(arr, "RGBA")
    if mode == "LA":
        return Image.fromarray(arr[..., :2].copy(), "LA")
    if mode == "L":
        return Image.fromarray(arr[..., 0].copy(), "L")
    if mode == "P":
        img = Image.fromarray(arr[..., 0].copy(), "L").convert("P")
        img.info["transparency"] = 7
        return img
    return Image.fromarray(arr[..., :3].copy(), "RGB")


@pytest.mark.parametrize(
    "h, w",
    [
        (720, 1280),  # half-to-even rounding case of the spec
        (1296, 1000),
        (17, 23),  # tiny, odd: upscaled to the minimum budget
        (16, 16),  # exactly one patch
        (101, 57),  # odd
        (333, 335),  # odd, near square
        (16, 3000),  # extreme aspect (187:1)
        (50, 9999),  # extreme aspect, wide
        (4000, 6000),  # huge: beyond the 16.7 MP budget, scaled down
        (2160, 97),  # tall and thin
        (48, 200),  # spec vector
    ],
)
def test_images_match_hf_rgb(hf_image_processor, h, w):
    img = make_image(h, w, "RGB", seed=h * w)
    ref = hf_image_processor(img, return_tensors="np")
    pixels, grid = ImageProcessor()(img)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert pixels.dtype == np.float32
    assert np.abs(pixels - ref["pixel_values"]).max() <= 1e-6


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P"])
def test_images_match_hf_other_modes(hf_image_processor, mode):
    img = make_image(75, 130, mode, seed=3)
    ref = hf_image_processor(img, return_tensors="np")
    pixels, grid = ImageProcessor()(img)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert np.abs(pixels - ref["pixel_values"]).max() <= 1e-6


def test_batch_and_numpy_inputs_match_hf(hf_image_processor):
    rgb = np.asarray(make_image(90, 61, "RGB", seed=1))
    rgba = np.asarray(make_image(40, 77, "RGBA", seed=2))
    images = [rgb, rgba, make_image(33, 47, "L")]
    ref = hf_image_processor(images, return_tensors="np")
    pixels, grid = ImageProcessor()(images)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert np.abs(pixels - ref["pixel_values"]).max() <= 1e-6
    # Channel-first and 2-D grayscale arrays are accepted too.
    gray = np.asarray(make_image(33, 47, "L"))
    np.testing.assert_array_equal(ImageProcessor()(gray)[0], ImageProcessor()(images[2])[0])
    np.testing.assert_array_equal(
        ImageProcessor()(np.moveaxis(rgb, -1, 0))[0], ImageProcessor()(rgb)[0]
    )


def test_alpha_is_composited_on_white():
    clear = Image.new("RGBA", (64, 64), (10, 200, 30, 0))
    pixels, _ = ImageProcessor()(clear)
    np.testing.assert_array_equal(pixels, np.ones_like(pixels))  # white -> (1 - 0.5) / 0.5


def test_paths(tmp_path, hf_image_processor):
    img = make_image(120, 90, "RGB")
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "b.jpg", quality=90)
    pixels, grid = ImageProcessor()([str(tmp_path / "a.png"), tmp_path / "b.jpg"])
    ref = hf_image_processor(
        [Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.jpg")], return_tensors="np"
    )
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert np.abs(pixels - ref["pixel_values"]).max() <= 1e-6


@pytest.mark.parametrize(
    "hw, expected",
    [
        ((720, 1280), (704, 1280)),
        ((1296, 1000), (1280, 992)),
        ((1080, 1920), (1088, 1920)),
        ((4000, 6000), (3328, 4992)),
        ((4032, 3024), (4032, 3008)),
        ((48, 200), (128, 544)),
        ((80, 80), (256, 256)),
    ],
)
def test_smart_resize_spec_vectors(hw, expected):
    assert smart_resize(*hw, factor=32, min_pixels=65536, max_pixels=16777216) == expected
    assert ImageProcessor().target_size(*hw) == expected


def test_config_defaults_and_files(tmp_path):
    p = ImageProcessor.from_dir(tmp_path)  # no file: the shipped Qwen3.5 values, not CLIP's
    assert (p.min_pixels, p.max_pixels, p.patch_size, p.merge_size) == (65536, 16777216, 16, 2)
    assert p.image_mean == p.image_std == (0.5, 0.5, 0.5)
    assert p.resample == 3 and p.temporal_patch_size == 2
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(dict(QWEN35_IMAGE, size={"shortest_edge": 1024, "longest_edge": 4096}))
    )
    p = ImageProcessor.from_dir(tmp_path)
    assert (p.min_pixels, p.max_pixels) == (1024, 4096)
    assert ImageProcessor.from_dict({"min_pixels": 5, "max_pixels": 6}).max_pixels == 6
    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps({"fps": 1, "max_frames": 10, "size": {"longest_edge": 999999}})
    )
    v = VideoProcessor.from_dir(tmp_path)
    assert (v.fps, v.max_frames, v.max_pixels, v.min_pixels) == (1.0, 10, 999999, 4096)
    assert v.cap_pixels_per_frame
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(UserError, match="preprocessor_config.json: cannot read"):
        ImageProcessor.from_dir(tmp_path)


def test_bad_images(tmp_path):
    png = tmp_path / "ok.png"
    make_image(64, 64, "RGB").save(png)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(png.read_bytes()[:200])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    tiny = tmp_path / "tiny.png"
    make_image(10, 100, "RGB").save(tiny)
    thin = tmp_path / "thin.png"
    make_image(16, 3300, "RGB").save(thin)
    cases = [
        (tmp_path / "missing.png", "missing.png: no such file"),
        (truncated, "cut.png: cannot decode image .*truncated"),
        (text, "notes.txt: not an image in a format Pillow can read"),
        (tiny, "tiny.png: image is 100x10 pixels; each side must be at least 16"),
        (thin, r"thin.png: aspect ratio 206.2:1 is beyond 200:1"),
        (tmp_path, "is a directory"),
        (np.zeros((32, 32, 3), np.float32), "image 1: numpy images must be uint8"),
        (np.zeros((32, 32, 2), np.uint8), "image 1: numpy image of shape"),
        (42, "image 1: unsupported image input int"),
    ]
    for item, message in cases:
        with pytest.raises(UserError, match=message) as info:
            ImageProcessor()(item)
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- videos


def spec_frame_count(total: int, src_fps: float, fps: float, lo: int, hi: int) -> int:
    """qwen-vl-utils' even frame count, written from the spec."""
    n = total / src_fps * fps
    lo_even = math.ceil(lo / 2) * 2
    hi_even = math.floor(min(hi, total) / 2) * 2
    return max(2, math.floor(min(max(n, lo_even), hi_even) / 2) * 2)


@pytest.mark.parametrize(
    "total, src_fps, fps, lo, hi",
    [
        (30, 10, 2, 4, 768),  # 3 s at 2 fps -> 6
        (301, 29.97, 2, 4, 768),  # odd count from a real-world rate -> 20
        (5, 24, 2, 4, 768),  # short: min_frames, then floored to even (4)
        (3, 24, 2, 4, 768),  # fewer frames than min_frames -> 2
        (10000, 30, 2, 4, 768),  # long: max_frames
        (90, 30, 2, 4, 5),  # odd max_frames floors to 4
        (7, 1, 0.5, 4, 768),
    ],
)
def test_frame_sampling_formula(total, src_fps, fps, lo, hi):
    idx = sample_frame_indices(total, src_fps, fps, lo, hi)
    n = spec_frame_count(total, src_fps, fps, lo, hi)
    assert len(idx) == n and n % 2 == 0
    np.testing.assert_array_equal(idx, np.round(np.linspace(0, total - 1, n)).astype(int))
    assert idx[0] == 0 and idx[-1] == total - 1


def test_timestamps_match_hf_formula():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 8):
        idx = np.sort(rng.choice(500, n, replace=False)).tolist()
        fps = float(rng.uniform(5, 60))
        ref = Qwen3VLProcessor._calculate_timestamps(None, list(idx), fps, 2)
        assert group_timestamps(idx, fps) == ref


def test_video_resize_spec_example():
    # 16 frames of 720x1280: capped 640x1152 (720 tokens per group), uncapped 704x1280 (880).
    assert VideoProcessor().target_size(16, 720, 1280, "v") == (640, 1152)
    assert VideoProcessor(cap_pixels_per_frame=False).target_size(16, 720, 1280, "v") == (704, 1280)


def coloured_frames(n: int, h: int = 64, w: int = 96) -> list[Image.Image]:
    """Distinct frames: frame i has a gradient whose offset encodes i."""
    y, x = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        arr = np.stack([(x * 2 + i * 8) % 256, (y * 3 + i * 5) % 256, np.full_like(x, i * 7)], -1)
        out.append(Image.fromarray(arr.astype(np.uint8), "RGB"))
    return out


def expected_pixels(frames: list[Image.Image], size: tuple[int, int]) -> np.ndarray:
    """Spec §6/§7 patch layout, element by element: row = (group, block row, block col, in-block
    row, in-block col), column = ((c * 2 + tau) * 16 + y) * 16 + x."""
    h, w = size
    norm = [
        ((np.asarray(f.resize((w, h), Image.BICUBIC), np.float64) / 255).astype(np.float32) - 0.5)
        / np.float32(0.5)
        for f in frames
    ]
    if len(norm) % 2:
        norm.append(norm[-1])
    gh, gw = h // 16, w // 16
    rows = []
    for g in range(len(norm) // 2):
        for br in range(gh // 2):
            for bc in range(gw // 2):
                for ir in range(2):
                    for ic in range(2):
                        r0, c0 = (br * 2 + ir) * 16, (bc * 2 + ic) * 16
                        cols = [
                            norm[2 * g + tau][r0 : r0 + 16, c0 : c0 + 16, c].reshape(-1)
                            for c in range(3)
                            for tau in range(2)
                        ]
                        rows.append(np.concatenate(cols))
    return np.stack(rows)


def test_animated_gif(tmp_path):
    frames = coloured_frames(30)
    path = tmp_path / "clip.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    decoded = []
    with Image.open(path) as gif:
        for i in range(gif.n_frames):
            gif.seek(i)
            decoded.append(gif.convert("RGB"))
    pixels, grid, meta = VideoProcessor()(str(path))
    (m,) = meta
    # 30 frames of 100 ms: 10 fps, 3 s -> 6 frames at 2 fps.
    assert (m.total_frames, m.source_fps, m.fps_assumed) == (30, 10.0, False)
    assert m.frame_indices == [0, 6, 12, 17, 23, 29]
    assert m.timestamps == pytest.approx([0.3, 1.45, 2.6])
    assert grid.tolist() == [[3, 4, 6]]
    sampled = [decoded[i] for i in m.frame_indices]
    np.testing.assert_array_equal(pixels, expected_pixels(sampled, (64, 96)))


def test_frame_lists_and_folders(tmp_path):
    frames = coloured_frames(13, 40, 70)
    for i, f in enumerate(frames):
        f.save(tmp_path / f"frame{i}.png")  # frame10 must sort after frame9
    vp = VideoProcessor()
    by_list, grid1, meta1 = vp(VideoFrames(frames, fps=4.0))
    by_dir, grid2, meta2 = vp(tmp_path)
    # 13 frames at 4 fps = 3.25 s -> 6.5 -> 6 frames.
    assert meta1[0].frame_indices == [0, 2, 5, 7, 10, 12]
    assert meta1[0].timestamps == pytest.approx([0.25, 1.5, 2.75])
    assert [f"<{t:.1f} seconds>" for t in meta1[0].timestamps][:2] == [
        "<0.2 seconds>",
        "<1.5 seconds>",
    ]
    size = vp.target_size(6, 40, 70, "v")
    np.testing.assert_array_equal(
        by_list, expected_pixels([frames[i] for i in meta1[0].frame_indices], size)
    )
    # Unknown source rate: 24 fps assumed (13 frames -> 0.54 s -> min_frames 4), and said so.
    assert meta2[0].fps_assumed and meta2[0].source_fps == 24.0
    assert meta2[0].frame_indices == [0, 4, 8, 12]
    assert grid2.tolist() == [[2, size[0] // 16, size[1] // 16]]
    # Several videos in one call: rows are video-major.
    both, grids, _ = vp([VideoFrames(frames, fps=4.0), tmp_path])
    np.testing.assert_array_equal(both, np.concatenate([by_list, by_dir]))
    assert grids.tolist() == [grid1[0].tolist(), grid2[0].tolist()]


def test_single_frame_video_is_padded():
    pixels, grid, meta = VideoProcessor()([coloured_frames(1)[0]])
    assert grid.tolist() == [[1, 4, 6]] and meta[0].timestamps == [0.0]
    half = pixels.shape[1] // 6  # columns (c, tau, y, x): tau = 1 repeats tau = 0
    cols = pixels.reshape(-1, 3, 2, half)
    np.testing.assert_array_equal(cols[:, :, 0], cols[:, :, 1])


def test_bad_videos(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.gif"
    frames = coloured_frames(5)
    frames[0].save(tmp_path / "ok.gif", save_all=True, append_images=frames[1:], duration=50)
    data = (tmp_path / "ok.gif").read_bytes()
    broken.write_bytes(data[:300])
    cut = tmp_path / "cut.gif"
    cut.write_bytes(data[: len(data) * 2 // 3])
    cases = [
        (empty, "empty: the video has no frames"),
        ([], "no videos given"),
        (VideoFrames([]), "video: the video has no frames"),
        (tmp_path / "nope.mp4", "nope.mp4: no such file"),
        (broken, "broken.gif: not an image in a format Pillow can read"),
        (cut, r"cut.gif: cannot decode frame \d+ .*truncated"),
        (VideoFrames([frames[0], frames[1].resize((50, 50))] * 2, fps=2), "frames differ in size"),
    ]
    for item, message in cases:
        with pytest.raises(UserError, match=message):
            VideoProcessor()(item)


# ----------------------------------------------------------------------------- prompts

VS, VE, IMG, VID = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"


def test_expand_images_and_videos_default_layout():
    text = f"A {VS}{IMG}{VE} B {VS}{VID}{VE} C {VS}{IMG}{VE}"
    out = expand_prompt(text, [[1, 4, 6], [1, 2, 2]], [[2, 2, 4]], [[0.25, 1.5]])
    video = f"<0.2 seconds>{VS}{VID * 2}{VE}<1.5 seconds>{VS}{VID * 2}{VE}"
    assert out == f"A {VS}{IMG * 6}{VE} B {video} C {VS}{IMG}{VE}"


def test_expand_batches_and_separate_passes():
    texts = [f"a{VS}{IMG}{VE}{VS}{VID}{VE}", f"b{VS}{IMG}{VE}c{VS}{IMG}{VE}"]
    # Image pass only: grids go to the texts in order, video placeholders stay as they are.
    out = expand_prompts(texts, [[1, 2, 2], [1, 2, 4], [1, 4, 4]])
    assert out == [
        f"a{VS}{IMG}{VE}{VS}{VID}{VE}",
        f"b{VS}{IMG * 2}{VE}c{VS}{IMG * 4}{VE}",
    ]
    out = expand_prompts(out, None, [[1, 2, 2]], [[0.5]])
    assert out[0] == f"a{VS}{IMG}{VE}<0.5 seconds>{VS}{VID}{VE}" and out[1] == texts[1].replace(
        f"{VS}{IMG}{VE}c{VS}{IMG}{VE}", f"{VS}{IMG * 2}{VE}c{VS}{IMG * 4}{VE}"
    )


def test_expand_transformers5_layout():
    out = expand_prompt(f"x{VS}{VID}{VE}y", None, [[1, 4, 4]], [[3.0]], video_layout="transformers")
    assert out == f"x{VS}<3.0 seconds>{VS}{VID * 4}{VE}{VE}y"


@pytest.mark.parametrize(
    "text, images, videos, stamps, message",
    [
        (f"{VS}{IMG}{VE}", [[1, 2, 2]] * 2, None, None, "1 image placeholder.* but 2 image"),
        (f"{VS}{IMG}{VE}" * 2, [[1, 2, 2]], None, None, "2 image placeholder.* but 1 image"),
        (f"{VS}{VID}{VE}", None, [], [], "1 video placeholder.* but 0 video"),
        (f"{VID}", None, [[1, 2, 2]], [[0.0]], "outside"),
        (f"{VS}{VID}{VE}", None, [[2, 2, 2]], [[0.0]], "2 temporal groups but 1 timestamps"),
    ],
)
def test_expand_count_errors(text, images, videos, stamps, message):
    with pytest.raises(UserError, match=message):
        expand_prompt(text, images, videos, stamps)


def test_processor_hooks(tmp_path):
    frames = coloured_frames(8)
    texts = [f"a{VS}{IMG}{VE}", f"b{VS}{VID}{VE}{VS}{IMG}{VE}"]
    images = [make_image(64, 64, "RGB"), make_image(40, 100, "RGB")]
    ip = ImageProcessor(min_pixels=1024, max_pixels=64 * 1024)
    texts2, arrays = ip.expand(texts, images)
    pixels, grid = ip(images)
    np.testing.assert_array_equal(arrays["pixel_values"], pixels)
    np.testing.assert_array_equal(arrays["image_grid_thw"], grid)
    assert texts2[0] == f"a{VS}{IMG * (grid[0, 1] * grid[0, 2] // 4)}{VE}"
    texts3, varrays = VideoProcessor().expand(texts2, [VideoFrames(frames, fps=4.0)])
    assert varrays["video_grid_thw"].tolist() == [[2, 4, 6]]
    assert texts3[1].startswith(f"b<0.2 seconds>{VS}{VID * 6}{VE}<1.5 seconds>")
    with pytest.raises(UserError, match="1 image placeholder.* but 2 image"):
        ip.expand(texts[:1], images)
