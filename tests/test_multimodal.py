"""Images and videos through the whole model: logits against transformers'
Qwen3_5ForConditionalGeneration (3-D positions, feature scatter), the cache bookkeeping that lets
decoding, chunked prefill and later turns continue the position walk, and the processor and
generation paths on tiny-random (the example programs are in test_examples.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import TOKEN_IDS, build_hf_model, hf_logits, save_hf_checkpoint
from mlx.utils import tree_flatten
from PIL import Image
from test_vision import sharpen

import mlx_qwen35.model.vision as vision
from mlx_qwen35.engine.generate import generate, stream_generate
from mlx_qwen35.errors import UserError
from mlx_qwen35.inputs.prompt import prepare_prompt
from mlx_qwen35.model.cache import KVCache
from mlx_qwen35.model.model import Model
from mlx_qwen35.weights.loading import load, load_model
from mlx_qwen35.weights.tiny_random import ensure_tiny_random

TOL = 1e-4
IMG, VID = TOKEN_IDS["image_token_id"], TOKEN_IDS["video_token_id"]
VS, VE = TOKEN_IDS["vision_start_token_id"], TOKEN_IDS["vision_end_token_id"]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ----------------------------------------------------------------------------- prompts by hand


class Prompt:
    """Token ids with expanded placeholders and matching random pixels, built left to right."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.ids: list[int] = []
        self.images: list[list[int]] = []
        self.videos: list[list[int]] = []
        self.image_pixels: list[np.ndarray] = []
        self.video_pixels: list[np.ndarray] = []

    def text(self, n: int) -> Prompt:
        self.ids += self.rng.integers(0, 300, n).tolist()
        return self

    def image(self, h: int, w: int) -> Prompt:
        self.ids += [VS] + [IMG] * (h * w // 4) + [VE]
        self.images.append([1, h, w])
        self.image_pixels.append(self._pixels(h * w))
        return self

    def video(self, t: int, h: int, w: int) -> Prompt:
        for _ in range(t):  # per temporal group: timestamp text, then its own block
            self.text(3)
            self.ids += [VS] + [VID] * (h * w // 4) + [VE]
        self.videos.append([t, h, w])
        self.video_pixels.append(self._pixels(t * h * w))
        return self

    def _pixels(self, n: int) -> np.ndarray:
        return self.rng.uniform(-1, 1, (n, 1536)).astype(np.float32)

    @property
    def media(self) -> dict[str, np.ndarray | None]:
        return {
            "pixel_values": np.concatenate(self.image_pixels) if self.images else None,
            "image_grid_thw": np.array(self.images) if self.images else None,
            "pixel_values_videos": np.concatenate(self.video_pixels) if self.videos else None,
            "video_grid_thw": np.array(self.videos) if self.videos else None,
        }

    def array(self) -> np.ndarray:
        return np.array([self.ids])


def reference(hf, ids: np.ndarray, attention_mask=None, **media) -> np.ndarray:
    types = np.zeros_like(ids)
    types[ids == IMG] = 1
    types[ids == VID] = 2
    return hf_logits(hf, ids, attention_mask=attention_mask, mm_token_type_ids=types, **media)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(HF model, our model loaded from its saved checkpoint), tower at unit-variance scale."""
    hf = build_hf_model(vision=True)
    sharpen(hf.model.visual)
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp("hf-vision") / "ckpt", keep_vision=True)
    return hf, load_model(path)


@pytest.fixture(scope="module")
def mixed(pair):
    """Two images and a two-group video in one prompt, with the reference logits."""
    hf, _ = pair
    p = Prompt(seed=1).text(5).image(6, 8).text(4).video(2, 4, 6).text(3).image(2, 6).text(6)
    return p, reference(hf, p.array(), **p.media)


def run(model, ids, cache=None, **kwargs) -> np.ndarray:
    return np.array(model(mx.array(ids), cache=cache, **kwargs))


# ----------------------------------------------------------------------------- parity with HF


def test_image_matches_reference(pair):
    hf, ours = pair
    p = Prompt(seed=0).text(5).image(6, 8).text(7)
    ref = reference(hf, p.array(), **p.media)
    assert rel_err(run(ours, p.array(), **p.media), ref) < TOL
    # Both ingredients matter far beyond the tolerance: 3-D positions and the feature scatter.
    emb, pos = ours.prepare_inputs(mx.array(p.array()), **p.media)
    T = p.array().shape[1]
    flat = mx.broadcast_to(mx.arange(T)[None, None], (3, 1, T))
    assert rel_err(np.array(ours(None, input_embeddings=emb, position_ids=flat)), ref) > 100 * TOL
    plain = np.array(ours(mx.array(p.array()), position_ids=pos))
    assert rel_err(plain, ref) > 100 * TOL


def test_video_matches_reference(pair):
    hf, ours = pair
    p = Prompt(seed=2).text(4).video(3, 4, 2).text(5)
    ref = reference(hf, p.array(), **p.media)
    assert rel_err(run(ours, p.array(), **p.media), ref) < TOL


def test_images_and_video_in_one_prompt(pair, mixed):
    _, ours = pair
    p, ref = mixed
    assert rel_err(run(ours, p.array(), **p.media), ref) < TOL


def test_prefill_then_decode_matches_full_forward(pair, mixed):
    _, ours = pair
    p, ref = mixed
    ids = p.array()
    cut = ids.shape[1] - 6  # the prompt ends 6 text tokens after the last image
    cache = ours.make_cache()
    pieces = [run(ours, ids[:, :cut], cache, **p.media)]
    for t in range(cut, ids.shape[1]):
        pieces.append(run(ours, ids[:, t : t + 1], cache))
    assert rel_err(np.concatenate(pieces, axis=1), ref) < TOL


def test_chunked_prefill_splitting_pad_runs(pair, mixed):
    _, ours = pair
    p, ref = mixed
    ids = mx.array(p.array())
    emb, pos = ours.prepare_inputs(ids, **p.media)
    first_image = p.ids.index(IMG)
    first_video = p.ids.index(VID)
    # Cuts inside the first image's pad run and inside the video's first group.
    cuts = [0, first_image + 5, first_video + 3, ids.shape[1] - 2, ids.shape[1]]
    assert p.ids[cuts[1]] == IMG and p.ids[cuts[2]] == VID
    cache = ours.make_cache()
    pieces = [
        np.array(ours(None, cache, input_embeddings=emb[:, a:b], position_ids=pos[..., a:b]))
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]
    whole_cache = ours.make_cache()
    whole = run(ours, p.array(), whole_cache, **p.media)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, rtol=0, atol=1e-4)
    assert rel_err(whole, ref) < TOL
    # Both caches agree on where positions stand: the next token follows the prompt's walk.
    expected = int(np.array(pos).max()) + 1
    assert ours.next_positions(cache).tolist() == ours.next_positions(whole_cache).tolist()
    assert ours.next_positions(cache).tolist() == [expected]
    for c in cache:
        if isinstance(c, KVCache):
            assert c.rope_delta.tolist() == [expected - ids.shape[1]]


def test_second_turn_with_new_image_matches_full_conversation(pair):
    hf, ours = pair
    turn1 = Prompt(seed=3).text(4).image(4, 6).text(3)
    replies = Prompt(seed=4).text(3)
    turn2 = Prompt(seed=5).text(4).image(6, 4).text(2).video(2, 2, 4).text(3)
    conversation = Prompt(seed=6)
    conversation.ids = turn1.ids + replies.ids + turn2.ids
    conversation.images, conversation.image_pixels = (
        turn1.images + turn2.images,
        turn1.image_pixels + turn2.image_pixels,
    )
    conversation.videos, conversation.video_pixels = turn2.videos, turn2.video_pixels
    ref = reference(hf, conversation.array(), **conversation.media)

    cache = ours.make_cache()
    pieces = [run(ours, turn1.array(), cache, **turn1.media)]
    for token in replies.ids:  # what the model "said", decoded one token at a time
        pieces.append(run(ours, [[token]], cache))
    pieces.append(run(ours, turn2.array(), cache, **turn2.media))
    assert rel_err(np.concatenate(pieces, axis=1), ref) < TOL


def test_left_padded_batch_with_images_matches_and_decodes(pair):
    hf, ours = pair
    long = Prompt(seed=7).text(3).image(4, 6).text(5)
    short = Prompt(seed=8).text(2).image(2, 4).text(2)
    T = len(long.ids)
    pad = T - len(short.ids)
    ids = np.array([long.ids, [0] * pad + short.ids])
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    media = {
        "pixel_values": np.concatenate(long.image_pixels + short.image_pixels),
        "image_grid_thw": np.array(long.images + short.images),
    }
    # One extra text token per row, decoded after the padded prefill.
    nxt = np.array([[17], [42]])
    full_ids, full_mask = np.concatenate([ids, nxt], 1), np.concatenate([mask, [[1], [1]]], 1)
    ref = reference(hf, full_ids, attention_mask=full_mask, **media)

    cache = ours.make_cache()
    prefill = run(ours, ids, cache, attention_mask=mx.array(mask), **media)
    step = run(ours, nxt, cache)
    out = np.concatenate([prefill, step], axis=1)
    real = full_mask.astype(bool)
    assert rel_err(out[real], ref[real]) < TOL
    # The padded row equals the same row alone.
    alone = run(ours, np.array([short.ids]), **short.media)
    np.testing.assert_allclose(prefill[1, pad:], alone[0], rtol=0, atol=1e-4)


def test_our_format_keeps_the_tower_unchanged(pair, tmp_path):
    """Our converted layout (= mlx-vlm's) loads without any vision transform."""
    hf, ours = pair
    path = tmp_path / "ours"
    path.mkdir()
    params = dict(tree_flatten(ours.parameters()))
    assert params["vision_tower.patch_embed.proj.weight"].shape == (32, 2, 16, 16, 3)
    mx.save_safetensors(str(path / "model.safetensors"), params)
    (path / "config.json").write_text(json.dumps(ours.config.to_dict()))
    again = load_model(path)
    p = Prompt(seed=10).text(3).image(4, 6).text(3)
    np.testing.assert_array_equal(run(again, p.array(), **p.media), run(ours, p.array(), **p.media))


def test_media_errors(pair):
    _, ours = pair
    p = Prompt(seed=9).text(3).image(4, 4).text(2)
    short = list(p.ids)
    del short[short.index(IMG)]  # one pad token fewer than the image's 4 features
    with pytest.raises(UserError, match="hold 3 image pad tokens but the images give 4"):
        ours(mx.array([short]), **p.media)
    with pytest.raises(UserError, match="no image was given"):
        ours.prepare_inputs(mx.array(p.array()))
    with pytest.raises(UserError, match="without their grid"):
        ours(mx.array(p.array()), pixel_values=p.media["pixel_values"])
    with pytest.raises(UserError, match="either input_embeddings or pixel values"):
        emb, _ = ours.prepare_inputs(mx.array(p.array()), **p.media)
        ours(None, input_embeddings=emb, **p.media)
    text_only = Model(replace(ours.config, vision=None))
    with pytest.raises(UserError, match="no vision tower"):
        text_only(mx.array(p.array()), **p.media)
    # Plain text takes the fast path: no positions, no rope_delta in the cache.
    emb, pos = ours.prepare_inputs(mx.array([[1, 2, 3]]))
    assert pos is None
    cache = ours.make_cache()
    ours(mx.array([[1, 2, 3]]), cache)
    assert all(c.rope_delta is None for c in cache if isinstance(c, KVCache))


# ----------------------------------------------------------------------------- tiny-random paths


def write_png(path: Path, h: int, w: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def write_gif(path: Path, frames: int = 6, h: int = 48, w: int = 64, ms: int = 250) -> Path:
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(frames)
    ]
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms, loop=0)
    return path


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    ensure_tiny_random(root)
    return root


@pytest.fixture(scope="module")
def tiny(tiny_cache):
    return load(str(ensure_tiny_random(tiny_cache)))


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    return {
        "png": write_png(root / "a.png", 40, 56),
        "png2": write_png(root / "b.png", 70, 45, seed=1),
        "big": write_png(root / "big.png", 900, 700, seed=2),
        "gif": write_gif(root / "clip.gif"),
    }


def test_processor_call_shape(tiny, media_files):
    model, processor = tiny
    cfg = processor.config
    text = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "video"},
                    {"type": "image"},
                    {"type": "text", "text": "Compare."},
                ],
            }
        ]
    )
    out = processor(
        text=[text], images=[media_files["png"], media_files["png2"]], videos=[media_files["gif"]]
    )
    assert set(out) == {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
    }
    assert all(isinstance(v, mx.array) for v in out.values())
    ids = out["input_ids"][0].tolist()
    images, videos = np.array(out["image_grid_thw"]), np.array(out["video_grid_thw"])
    assert ids.count(cfg.image_token_id) == int(np.prod(images, axis=1).sum()) // 4
    assert ids.count(cfg.video_token_id) == int(np.prod(videos, axis=1).sum()) // 4
    assert "seconds>" in processor.decode(ids)  # video timestamps
    logits = model(**{"inputs" if k == "input_ids" else k: v for k, v in out.items()})
    assert logits.shape == (1, len(ids), cfg.text.vocab_size)

    with pytest.raises(UserError, match="placeholder.*but no images were given"):
        processor(text=[text], videos=[media_files["gif"]])
    with pytest.raises(UserError, match="2 image placeholder.*3 image"):
        processor(text=[text], images=[media_files["png"]] * 3, videos=[media_files["gif"]])


def test_generate_with_image_matches_full_forward(tiny, media_files, monkeypatch):
    model, processor = tiny
    calls = []
    tower_call = vision.VisionModel.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return tower_call(self, *args, **kwargs)

    monkeypatch.setattr(vision.VisionModel, "__call__", counting)
    images = [media_files["png"], media_files["png2"]]
    # Prefill steps of 5 tokens split the images' pad runs; the tower still runs once.
    out = [
        r.token
        for r in stream_generate(
            model, processor, "Describe both.", max_tokens=8, images=images, prefill_step_size=5
        )
    ]
    assert len(calls) == 1 and len(out) == 8
    ids, _, _ = prepare_prompt(model, processor, "Describe both.", images=images)
    monkeypatch.setattr(vision.VisionModel, "__call__", tower_call)
    pixels, grid = processor.image_processor(images)
    logits = model(mx.array([ids + out[:-1]]), pixel_values=pixels, image_grid_thw=grid)
    assert mx.argmax(logits[0, len(ids) - 1 :], axis=-1).tolist() == out
    # Whole-prompt prefill gives the same tokens.
    assert [
        r.token for r in stream_generate(model, processor, "Describe both.", 8, images=images)
    ] == out


def test_generate_with_video_and_message_forms(tiny, media_files):
    model, processor = tiny
    gif = media_files["gif"]
    text = generate(model, processor, "What happens?", max_tokens=6, videos=[gif])
    parts = [{"type": "video", "video": gif}, {"type": "text", "text": "What happens?"}]
    assert generate(model, processor, [{"role": "user", "content": parts}], max_tokens=6) == text
    parts = [{"type": "video"}, {"type": "text", "text": "What happens?"}]
    messages = [{"role": "user", "content": parts}]
    assert generate(model, processor, messages, max_tokens=6, videos=[gif]) == text
    ids, emb, pos = prepare_prompt(model, processor, "What happens?", videos=[gif])
    assert emb.shape == (1, len(ids), processor.config.text.hidden_size)
    assert pos.shape == (3, 1, len(ids)) and int(np.array(pos).max()) + 1 < len(ids)


def test_large_images_are_capped_before_the_tower(tiny, media_files):
    model, processor = tiny
    ids, _, _ = prepare_prompt(model, processor, "x", images=[media_files["big"]])
    cfg = processor.config
    assert ids.count(cfg.image_token_id) <= processor.image_processor.max_pixels // 1024 == 64
    small = processor.with_media_options(max_pixels=8 * 1024, fps=1.0, max_frames=4)
    assert processor.image_processor.max_pixels == 65536  # the original is untouched
    capped, _, _ = prepare_prompt(model, small, "x", images=[media_files["big"]])
    assert 0 < capped.count(cfg.image_token_id) <= 8
    _, grid, meta = small.video_processor([media_files["gif"]])
    assert len(meta[0].frame_indices) == 4 and grid[0, 1] * grid[0, 2] // 4 <= 8


@pytest.mark.parametrize(
    "prompt, kwargs, match",
    [
        (
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
            {"images": ["IMG", "IMG"]},
            r"1 image\(s\) left over: the messages have 1 image part",
        ),
        (
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
            {},
            "more image parts than images given",
        ),
        ([5, 6, 7], {"images": ["IMG"]}, "token ids cannot place them"),
        # Token ids are taken as they are; typed text never becomes a placeholder (test_render).
        ("IMAGE_IDS", {}, "holds image placeholder tokens but no images were given"),
        ("Look", {"images": ["NOFILE"]}, "no such file"),
        ("Look", {"images": ["BAD"]}, "not an image"),
        ("Look", {"videos": ["IMG"], "fps": 0}, "fps must be a number > 0"),
        ("Look", {"images": ["IMG"], "max_pixels": 100}, "max_pixels must be an integer >= 1024"),
    ],
)
def test_generate_media_errors(tiny, media_files, tmp_path, prompt, kwargs, match):
    model, processor = tiny
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    paths = {"IMG": media_files["png"], "NOFILE": tmp_path / "missing.png", "BAD": bad}
    for key in ("images", "videos"):
        if key in kwargs:
            kwargs[key] = [paths[v] for v in kwargs[key]]
    if prompt == "IMAGE_IDS":
        prompt = [5, processor.config.image_token_id]
    with pytest.raises(UserError, match=match):
        generate(model, processor, prompt, max_tokens=2, **kwargs)
