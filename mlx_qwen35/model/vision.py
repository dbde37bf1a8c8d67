"""The Qwen3.5 vision tower (spec §5): pixel patches -> features in the text model's hidden size.

Parameter names and layouts are mlx-vlm's `vision_tower.*` (HF `model.visual.*` minus the prefix),
so converted checkpoints load unchanged in mlx-vlm. The one layout difference from HF is the patch
embedding: stored as MLX Conv3d weights [D, T, P, P, C], computed as a single matmul.

Input rows are ordered per item (image or video), then temporal group, then merge block
(row-major), then position inside the block; every per-patch table below (position embedding,
rotary angles) is emitted in that same order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import UserError
from .config import VisionConfig

# Largest fp32 score block (elements) one unfused attention call may hold on backends without a
# fused kernel. A single 16k-patch image would otherwise materialise 16 x 16k x 16k fp32 scores
# (17 GB); queries are processed in chunks that keep each block near 256 MB.
SCORE_BUDGET = 1 << 26

# Head dims MLX's fused Metal attention kernel accepts; others fall back to the unfused path.
_FUSED_HEAD_DIMS = (64, 80, 128)

_ACTIVATIONS = {
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_new": nn.gelu_approx,
    "gelu": nn.gelu,
}

Grid = tuple[int, int, int]


def parse_grids(grid_thw: Any, merge: int) -> list[Grid]:
    """(t, h, w) triples from an [n, 3] array-like; h and w are pre-merge patch counts."""
    arr = np.asarray(grid_thw.tolist() if isinstance(grid_thw, mx.array) else grid_thw)
    if arr.size == 0:
        return []
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise UserError(f"grid_thw must have shape [n, 3], got {list(arr.shape)}")
    grids = [tuple(int(v) for v in row) for row in arr]
    for t, h, w in grids:
        if t < 1 or h < merge or w < merge or h % merge or w % merge:
            raise UserError(
                f"grid_thw row {[t, h, w]} is invalid: t must be >= 1 and h, w positive "
                f"multiples of spatial_merge_size={merge}"
            )
    return grids


def _merge_order(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each patch of an h x w grid, in merge-block order."""
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
    cols = np.broadcast_to(np.arange(w)[None, :], (h, w))

    def reorder(a: np.ndarray) -> np.ndarray:
        return a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)

    return reorder(rows), reorder(cols)


def _interp_matrix(n: int, side: int) -> np.ndarray:
    """[n, side] fp32 linear-interpolation weights, align_corners=True (ends map to 0 and side-1).

    Source coordinates are computed in fp32 exactly as the reference does."""
    src = np.arange(n, dtype=np.float32) * np.float32(side - 1) / np.float32(max(n - 1, 1))
    lo = np.floor(src)
    frac = src - lo
    lo = lo.astype(np.int64)
    hi = np.minimum(lo + 1, side - 1)
    m = np.zeros((n, side), dtype=np.float32)
    rows = np.arange(n)
    np.add.at(m, (rows, lo), 1 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def _apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate-half rotary over the whole head dim, computed in fp32."""
    xf = x.astype(mx.float32)
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def _fused_attention_available() -> bool:
    return mx.default_device() == mx.gpu and mx.metal.is_available()


def _attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Non-causal attention on [B, H, L, hd] without materialising huge score matrices."""
    hd = q.shape[-1]
    if _fused_attention_available():
        # The fused kernel never materialises scores but supports only a few head dims: pad with
        # zeros (q.k and the kept output columns are unchanged) and slice the output back.
        target = next((d for d in _FUSED_HEAD_DIMS if d >= hd), None)
        if target is not None:
            if target != hd:
                pad = [(0, 0)] * 3 + [(0, target - hd)]
                q, k, v = mx.pad(q, pad), mx.pad(k, pad), mx.pad(v, pad)
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
            return out[..., :hd] if target != hd else out
    b, h, length, _ = q.shape
    chunk = max(1, SCORE_BUDGET // (b * h * length))
    if chunk >= length:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    outs = [
        mx.fast.scaled_dot_product_attention(q[:, :, i : i + chunk], k, v, scale=scale)
        for i in range(0, length, chunk)
    ]
    return mx.concatenate(outs, axis=2)


def _segment_runs(grids: Sequence[Grid]) -> list[tuple[int, int, int]]:
    """Attention segments as runs (count, h, w): every image and every temporal group of a video
    is one segment; consecutive segments of the same grid are batched together."""
    runs: list[list[int]] = []
    for t, h, w in grids:
        if runs and runs[-1][1:] == [h, w]:
            runs[-1][0] += t
        else:
            runs.append([t, h, w])
    return [(c, h, w) for c, h, w in runs]


@dataclass(frozen=True)
class SegmentRun:
    """`count` consecutive attention segments of `length` patches sharing one grid, with that
    grid's rotary tables cos, sin [length, 1, head_dim] (fp32)."""

    count: int
    length: int
    cos: mx.array
    sin: mx.array


class Conv3dWeights(nn.Module):
    """The parameters of a stride = kernel Conv3d, in MLX layout [D, T, P, P, C]."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int]):
        super().__init__()
        scale = math.sqrt(1.0 / (in_channels * math.prod(kernel)))
        self.weight = mx.random.uniform(-scale, scale, (out_channels, *kernel, in_channels))
        self.bias = mx.random.uniform(-scale, scale, (out_channels,))


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        t, p = config.temporal_patch_size, config.patch_size
        self.proj = Conv3dWeights(config.in_channels, config.hidden_size, (t, p, p))

    def __call__(self, pixels: mx.array) -> mx.array:
        # A stride = kernel conv over one patch is a matmul with the kernel flattened in the
        # pixel rows' column order (C, T, P, P).
        w = self.proj.weight
        w = w.transpose(0, 4, 1, 2, 3).reshape(w.shape[0], -1)
        return mx.addmm(self.proj.bias, pixels.astype(w.dtype), w.T)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def __call__(self, x: mx.array, runs: list[SegmentRun]) -> mx.array:
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        outs = []
        start = 0
        for run in runs:
            end = start + run.count * run.length
            seg = qkv[start:end].reshape(run.count, run.length, 3, self.num_heads, self.head_dim)
            q, k, v = seg[:, :, 0], seg[:, :, 1], seg[:, :, 2]  # [count, L, H, hd]
            q = _apply_rotary(q, run.cos, run.sin)
            k = _apply_rotary(k, run.cos, run.sin)
            o = _attention(*(a.transpose(0, 2, 1, 3) for a in (q, k, v)), self.scale)
            outs.append(o.transpose(0, 2, 1, 3).reshape(end - start, -1))
            start = end
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        return self.proj(out)


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        if act not in _ACTIVATIONS:
            raise UserError(
                f"vision_config.hidden_act {act!r} is not supported "
                f"(expected one of {', '.join(_ACTIVATIONS)})"
            )
        self.act = _ACTIVATIONS[act]
        self.linear_fc1 = nn.Linear(dim, hidden, bias=True)
        self.linear_fc2 = nn.Linear(hidden, dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config.hidden_size, config.num_heads)
        self.mlp = VisionMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def __call__(self, x: mx.array, runs: list[SegmentRun]) -> mx.array:
        x = x + self.attn(self.norm1(x), runs)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch (before grouping), then each 2x2 block as one vector -> MLP."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.merged = config.hidden_size * config.spatial_merge_size**2
        self.norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged, bias=True)
        self.linear_fc2 = nn.Linear(self.merged, config.out_hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(nn.gelu(self.linear_fc1(x)))


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.merge = config.spatial_merge_size
        self.side = int(round(config.num_position_embeddings**0.5))
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = [VisionBlock(config) for _ in range(config.depth)]
        self.merger = PatchMerger(config)

    @property
    def patch_dim(self) -> int:
        c = self.config
        return c.in_channels * c.temporal_patch_size * c.patch_size**2

    def __call__(self, pixel_values: Any, grid_thw: Any) -> mx.array:
        """pixel_values [N, C*T*P*P], grid_thw [n, 3] -> features [N / merge**2, out_hidden]."""
        grids = parse_grids(grid_thw, self.merge)
        if not grids:
            raise UserError("grid_thw is empty: no image or video to encode")
        pixels = pixel_values if isinstance(pixel_values, mx.array) else mx.array(pixel_values)
        expected = sum(t * h * w for t, h, w in grids)
        if pixels.ndim != 2 or pixels.shape != (expected, self.patch_dim):
            raise UserError(
                f"pixel_values has shape {list(pixels.shape)} but grid_thw describes "
                f"[{expected}, {self.patch_dim}]; pass the processor's outputs unchanged"
            )
        x = self.patch_embed(pixels)
        table = self._position_table()
        tables: dict[tuple[int, int], tuple[mx.array, mx.array, mx.array]] = {}
        parts, runs = [], []
        start = 0
        for count, h, w in _segment_runs(grids):
            if (h, w) not in tables:
                tables[(h, w)] = (self.position_embedding(table, h, w), *self.rotary_tables(h, w))
            pe, cos, sin = tables[(h, w)]
            end = start + count * h * w
            # Every segment of the run shares the grid's position embedding (broadcast, not tiled).
            seg = x[start:end].reshape(count, h * w, -1) + pe.astype(x.dtype)
            parts.append(seg.reshape(end - start, -1))
            runs.append(SegmentRun(count, h * w, cos, sin))
            start = end
        x = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
        for block in self.blocks:
            x = block(x, runs)
        return self.merger(x)

    def _position_table(self) -> mx.array:
        """The learned table as fp32 [side, side, D]. Calling the embedding on every index also
        dequantizes a quantized table."""
        side = self.side
        table = self.pos_embed(mx.arange(side * side)).astype(mx.float32)
        return table.reshape(side, side, -1)

    def position_embedding(self, table: mx.array, h: int, w: int) -> mx.array:
        """[h*w, D] fp32: the [side, side, D] table resampled bilinearly (align_corners=True) to
        an h x w grid, in merge-block order."""
        side, dim, m = self.side, table.shape[-1], self.merge
        # Separable: interpolate along columns for every table row, then along rows.
        by_col = mx.matmul(mx.array(_interp_matrix(w, side)), table)  # [side, w, D]
        pe = (mx.array(_interp_matrix(h, side)) @ by_col.reshape(side, -1)).reshape(h, w, dim)
        pe = pe.reshape(h // m, m, w // m, m, dim).transpose(0, 2, 1, 3, 4)
        return pe.reshape(h * w, dim)

    def rotary_tables(self, h: int, w: int) -> tuple[mx.array, mx.array]:
        """cos, sin [h*w, 1, head_dim] fp32 in merge-block order: angles (row * w_i, col * w_i),
        w_i = theta^(-2i / (head_dim / 2)), duplicated for the rotate-half pairing."""
        spatial = self.config.head_dim // 2
        inv_freq = 1.0 / (
            self.config.rope_theta ** (mx.arange(0, spatial, 2, dtype=mx.float32) / spatial)
        )
        rows, cols = _merge_order(h, w, self.merge)
        r = mx.array(rows.astype(np.float32))[:, None] * inv_freq
        c = mx.array(cols.astype(np.float32))[:, None] * inv_freq
        freqs = mx.concatenate([r, c], axis=-1)
        emb = mx.concatenate([freqs, freqs], axis=-1)[:, None, :]
        return mx.cos(emb), mx.sin(emb)

    def sanitize_hf(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """HF raw vision tensors (keys without `model.visual.`) -> our/mlx-vlm layout."""
        c = self.config
        hf_shape = (c.hidden_size, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        out = {}
        for key, value in weights.items():
            if key.startswith("rotary_pos_emb."):
                continue  # derived buffers, never parameters
            if key == "patch_embed.proj.weight":
                if tuple(value.shape) != hf_shape:
                    raise UserError(
                        f"model.visual.patch_embed.proj.weight has shape {list(value.shape)}, "
                        f"expected HF layout {list(hf_shape)}"
                    )
                value = value.transpose(0, 2, 3, 4, 1)
            out[key] = value
        return out
