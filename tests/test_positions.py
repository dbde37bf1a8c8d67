"""3-D M-RoPE positions (spec §4) against the worked example and HF's get_rope_index."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_reference import TOKEN_IDS, build_hf_model

from mlx_qwen35.errors import UserError
from mlx_qwen35.model.positions import decode_positions, rope_index

IMG = TOKEN_IDS["image_token_id"]
VID = TOKEN_IDS["video_token_id"]
VS = TOKEN_IDS["vision_start_token_id"]
VE = TOKEN_IDS["vision_end_token_id"]
KW = dict(image_token_id=IMG, video_token_id=VID, spatial_merge_size=2)


def image_block(grid: tuple[int, int, int]) -> list[int]:
    return [VS] + [IMG] * (grid[1] * grid[2] // 4) + [VE]


def video_blocks(grid: tuple[int, int, int], stamp_tokens: int = 3) -> list[int]:
    """The default (vLLM) layout: per temporal group, timestamp text + <vs> pads <ve>."""
    out: list[int] = []
    for g in range(grid[0]):
        out += [20 + g] * stamp_tokens + [VS] + [VID] * (grid[1] * grid[2] // 4) + [VE]
    return out


def test_spec_worked_example():
    a, b, c = 5, 6, 7
    ids = np.array([[a, b, VS] + [IMG] * 6 + [VE, c]])
    pos, nxt = rope_index(ids, [[1, 4, 6]], **KW)
    expected = [(0, 0, 0), (1, 1, 1), (2, 2, 2)]
    expected += [(3, 3, 3), (3, 3, 4), (3, 3, 5), (3, 4, 3), (3, 4, 4), (3, 4, 5)]
    expected += [(6, 6, 6), (7, 7, 7)]
    assert pos[:, 0, :].T.tolist() == [list(e) for e in expected]
    assert nxt.tolist() == [8]
    assert int(nxt[0]) - ids.shape[1] == -3  # rope_delta of the spec


@pytest.fixture(scope="module")
def hf_model():
    return build_hf_model(vision=True).model


def hf_rope_index(hf_model, ids, image_grid, video_grid, mask=None):
    ids_t = torch.from_numpy(ids)
    types = torch.zeros_like(ids_t, dtype=torch.int32)
    types[ids_t == IMG] = 1
    types[ids_t == VID] = 2
    kwargs = {}
    if image_grid is not None:
        kwargs["image_grid_thw"] = torch.tensor(image_grid)
    if video_grid is not None:
        kwargs["video_grid_thw"] = torch.tensor(video_grid)
    if mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(mask)
    pos, delta = hf_model.get_rope_index(ids_t, types, **kwargs)
    return pos.numpy(), delta.numpy().reshape(-1)


def test_mixed_image_video_matches_hf(hf_model):
    images = [(1, 4, 6), (1, 8, 2)]
    videos = [(3, 4, 4)]
    ids = [1, 2] + image_block(images[0]) + [3] + video_blocks(videos[0]) + [4, 5]
    ids += image_block(images[1]) + [6, 7, 8]
    ids = np.array([ids])
    pos, nxt = rope_index(ids, images, videos, **KW)
    ref, delta = hf_rope_index(hf_model, ids, images, videos)
    np.testing.assert_array_equal(pos, ref)
    np.testing.assert_array_equal(nxt - ids.shape[1], delta)


def test_batch_with_left_padding_matches_hf(hf_model):
    row0 = [1] + image_block((1, 6, 4)) + [2, 3] + video_blocks((2, 2, 4)) + [4]
    row1 = [5, 6, 7] + image_block((1, 2, 2)) + [8] + image_block((1, 4, 8)) + [9]
    t = max(len(row0), len(row1)) + 2
    ids = np.zeros((2, t), dtype=np.int64)
    mask = np.zeros((2, t), dtype=np.int64)
    for i, row in enumerate((row0, row1)):
        ids[i, t - len(row) :] = row
        mask[i, t - len(row) :] = 1
    images = [(1, 6, 4), (1, 2, 2), (1, 4, 8)]
    videos = [(2, 2, 4)]
    pos, nxt = rope_index(ids, images, videos, attention_mask=mask, **KW)
    ref, delta = hf_rope_index(hf_model, ids, images, videos, mask)
    np.testing.assert_array_equal(pos, ref)
    np.testing.assert_array_equal(nxt - mask.sum(1), delta)
    # Decoding continues from `next`, which is HF's (unpadded index + rope_delta).
    step = decode_positions(nxt, 3)
    assert step.shape == (3, 2, 3)
    np.testing.assert_array_equal(step[1, :, 0], mask.sum(1) + delta)


def test_text_only_is_arange():
    ids = np.arange(10)[None] + 1
    pos, nxt = rope_index(ids, **KW)
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(10), (3, 1, 10)))
    assert nxt.tolist() == [10]


def test_continuing_the_walk_equals_the_full_walk():
    # Turn 1 with an image, turn 2 adds a video and another image: walking the appended chunk from
    # the cached counter must equal walking the whole conversation.
    turn1 = [1, 2] + image_block((1, 4, 6)) + [3, 4]
    turn2 = [5] + video_blocks((2, 4, 2)) + [6] + image_block((1, 2, 8)) + [7]
    full, full_next = rope_index([turn1 + turn2], [(1, 4, 6), (1, 2, 8)], [(2, 4, 2)], **KW)
    p1, n1 = rope_index([turn1], [(1, 4, 6)], **KW)
    p2, n2 = rope_index([turn2], [(1, 2, 8)], [(2, 4, 2)], start=n1, **KW)
    np.testing.assert_array_equal(np.concatenate([p1, p2], axis=2), full)
    np.testing.assert_array_equal(n2, full_next)


def test_per_row_start():
    pos, nxt = rope_index([[1, 2], [3, 4]], start=[5, 9], **KW)
    assert pos[0].tolist() == [[5, 6], [9, 10]]
    assert nxt.tolist() == [7, 11]


def test_transformers5_video_layout_gives_same_walk():
    # transformers 5 keeps an outer <vs> ... <ve> around the per-group blocks: still valid, the
    # extra tokens are text.
    grid = (2, 4, 4)
    ids = [1, VS] + video_blocks(grid) + [VE, 2]
    pos, nxt = rope_index([ids], None, [grid], **KW)
    assert nxt.tolist() == [pos.max() + 1]
    assert pos[:, 0, -1].tolist() == [int(nxt[0]) - 1] * 3


@pytest.mark.parametrize(
    "ids, images, message",
    [
        ([1, VS, IMG, IMG, IMG, VE], [(1, 4, 4)], "has 3 pad tokens but its grid needs 2x2 = 4"),
        ([1, VS, IMG, VE], [], "more image placeholder blocks than images"),
        ([1, VS, IMG, VE], [(1, 2, 2), (1, 2, 2)], "1 image(s) left without a placeholder"),
    ],
)
def test_mismatches_are_user_errors(ids, images, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rope_index([ids], images, **KW)
