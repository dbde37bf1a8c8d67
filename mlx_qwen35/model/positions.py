"""3-D (temporal, height, width) M-RoPE positions for mixed text/image/video prompts (spec §4).

The walk keeps one counter, `next`: a text token takes (next, next, next) and advances it by one;
a run of image (or video-group) pad tokens takes (next, next + r, next + c) over its merged grid in
row-major order and advances it by max(rows, cols). Keeping `next` per sequence lets a cache
continue the walk for any appended chunk: decode tokens, or a later turn that adds new images.
For one prompt this equals HF's `cache index + rope_delta` form.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from ..errors import UserError

_TEXT, _IMAGE, _VIDEO = 0, 1, 2
_NAMES = {_IMAGE: "image", _VIDEO: "video frame group"}


def _merged_grids(grid_thw: Any, merge: int, split_time: bool) -> deque[tuple[int, int]]:
    """(rows, cols) of each placeholder block after merging; a video (T, h, w) is T blocks."""
    if grid_thw is None:
        return deque()
    arr = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    out: deque[tuple[int, int]] = deque()
    for t, h, w in arr.tolist():
        out.extend([(h // merge, w // merge)] * (t if split_time else 1))
    return out


def _walk(
    row: np.ndarray,
    start: int,
    grids: dict[int, deque[tuple[int, int]]],
    image_token_id: int,
    video_token_id: int,
) -> tuple[np.ndarray, int]:
    """Positions [3, L] for one unpadded sequence, and the counter after it."""
    kind = np.zeros(row.shape[0], dtype=np.int8)
    kind[row == image_token_id] = _IMAGE
    kind[row == video_token_id] = _VIDEO
    bounds = [0, *(np.flatnonzero(np.diff(kind)) + 1).tolist(), row.shape[0]]
    out = np.empty((3, row.shape[0]), dtype=np.int64)
    nxt = int(start)
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        if s == e:
            continue
        k = int(kind[s])
        if k == _TEXT:
            out[:, s:e] = np.arange(nxt, nxt + e - s)
            nxt += e - s
            continue
        if not grids[k]:
            raise UserError(
                f"the prompt has more {_NAMES[k]} placeholder blocks than {_NAMES[k]}s given; "
                "pass one grid per placeholder block"
            )
        gh, gw = grids[k].popleft()
        if e - s != gh * gw:
            raise UserError(
                f"a {_NAMES[k]} placeholder block has {e - s} pad tokens but its grid needs "
                f"{gh}x{gw} = {gh * gw}; expand the prompt with the processor's grids"
            )
        r, c = np.divmod(np.arange(gh * gw), gw)
        out[0, s:e] = nxt
        out[1, s:e] = nxt + r
        out[2, s:e] = nxt + c
        nxt += max(gh, gw)
    return out, nxt


def rope_index(
    input_ids: Any,
    image_grid_thw: Any = None,
    video_grid_thw: Any = None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    attention_mask: Any = None,
    start: int | Any = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions for a batch of token sequences.

    input_ids [B, T] (or [T]); image_grid_thw [n_img, 3] and video_grid_thw [n_vid, 3] in order of
    appearance over the whole batch (row 0 first); attention_mask [B, T] with 0 at padding (any
    side); start: the counter to continue from, an int or one per row ([B]).
    Returns position_ids [3, B, T] int64 (0 at padded slots) and next_position [B] int64, the
    counter after each row: the next token of row b gets (next[b],) * 3. For multimodal prompts
    next < T (rope_delta = next - unpadded length <= 0).

    A chunk must hold whole placeholder blocks (never split a run of pad tokens); the grids passed
    are exactly those of the blocks inside the chunk. Raises UserError when the pad runs and the
    grids disagree (count or size).
    """
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise UserError(f"input_ids must be [B, T], got shape {list(ids.shape)}")
    b, t = ids.shape
    if attention_mask is None:
        mask = np.ones((b, t), dtype=bool)
    else:
        mask = np.asarray(attention_mask).reshape(b, t).astype(bool)
    starts = np.broadcast_to(np.asarray(start, dtype=np.int64), (b,))
    grids = {
        _IMAGE: _merged_grids(image_grid_thw, spatial_merge_size, split_time=False),
        _VIDEO: _merged_grids(video_grid_thw, spatial_merge_size, split_time=True),
    }
    positions = np.zeros((3, b, t), dtype=np.int64)
    next_position = np.zeros(b, dtype=np.int64)
    for i in range(b):
        keep = np.flatnonzero(mask[i])
        pos, next_position[i] = _walk(
            ids[i, keep], int(starts[i]), grids, image_token_id, video_token_id
        )
        positions[:, i, keep] = pos
    for k, left in grids.items():
        if left:
            raise UserError(
                f"{len(left)} {_NAMES[k]}(s) left without a placeholder block in the prompt; "
                f"the prompt needs one placeholder per {_NAMES[k]}"
            )
    return positions, next_position


def decode_positions(next_position: Any, length: int = 1) -> np.ndarray:
    """Positions [3, B, length] for `length` text tokens appended after `next_position` [B]."""
    nxt = np.asarray(next_position, dtype=np.int64).reshape(-1)
    pos = nxt[:, None] + np.arange(length, dtype=np.int64)[None, :]
    return np.broadcast_to(pos[None], (3, *pos.shape)).copy()
