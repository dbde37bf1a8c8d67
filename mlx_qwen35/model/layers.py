"""Building blocks of the Qwen3.5 text decoder: norms, rotary embedding, gated attention, MLP.

The Gated DeltaNet mixer lives in `model.py` (its recurrence in `gated_delta/`); everything here is
shared with the MTP head and kept free of cache bookkeeping beyond mlx-lm's KV-cache protocol.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .attention import attention
from .config import RopeConfig, TextConfig
from .cpu_fast import linear, sigmoid, silu, swiglu


class RMSNorm(nn.Module):
    """Qwen3.5's RMSNorm with the (1 + w) offset already folded into `weight` (kept in fp32).

    The product with the weight happens in fp32 before the cast back to the input dtype, as the
    reference does (Llama-style norms cast first, then multiply, which rounds differently in bf16).
    """

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,), dtype=mx.float32)
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), w, self.eps).astype(x.dtype)


class RMSNormGated(nn.Module):
    """Per-head norm of the DeltaNet output, then the SiLU gate z (norm first, gate outside).

    Its weight is a plain w (no +1), as shipped.
    """

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,), dtype=mx.float32)
        self.eps = eps

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        dtype = x.dtype
        normed = mx.fast.rms_norm(x.astype(mx.float32), None, self.eps).astype(dtype)
        out = self.weight.astype(mx.float32) * normed.astype(mx.float32)
        return (out * silu(gate.astype(mx.float32))).astype(dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters, quantizes the same way) with the CPU decode path of
    `cpu_fast.linear`: one fp32 row is multiplied as many small calls instead of one packed GEMM."""

    def __call__(self, x: mx.array) -> mx.array:
        y = linear(x, self["weight"])
        return y + self["bias"] if "bias" in self else y


class MLP(nn.Module):
    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.gate_proj = Linear(dims, hidden_dims, bias=False)
        self.up_proj = Linear(dims, hidden_dims, bias=False)
        self.down_proj = Linear(hidden_dims, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _yarn_inv_freq(rope: RopeConfig, dim: int, max_pos: int) -> tuple[mx.array, float]:
    """YaRN-scaled inverse frequencies and the cos/sin attention factor (as HF computes them)."""
    base, factor = rope.theta, rope.factor
    original = rope.original_max_position_embeddings or max_pos
    pos_freqs = base ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dim // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    attention_factor = rope.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, float(attention_factor)


class MRoPE(nn.Module):
    """Partial, interleaved multimodal rotary embedding.

    Only the first `rotary_dim` dims of a head rotate (half-split pairing inside that slice). Each
    frequency i takes its angle from one position axis: h if i % 3 == 1 and i < 3*s_h, w if
    i % 3 == 2 and i < 3*s_w, else t. For text all three axes agree, and `mx.fast.rope` with an
    offset computes exactly the same thing, so text takes that fast path.
    """

    def __init__(self, args: TextConfig):
        super().__init__()
        self.dims = args.rotary_dim
        rope = args.rope
        half = self.dims // 2
        if rope.rope_type == "yarn":
            inv_freq, self.attention_factor = _yarn_inv_freq(
                rope, self.dims, args.max_position_embeddings
            )
        else:
            exponents = mx.arange(0, self.dims, 2, dtype=mx.float32) / self.dims
            inv_freq = 1.0 / (rope.theta**exponents)
            self.attention_factor = 1.0
        self._inv_freq = inv_freq
        self._freqs = 1.0 / inv_freq  # mx.fast.rope takes wavelengths
        s_t, s_h, s_w = rope.mrope_section
        axis = [0] * half
        for i in range(half):
            if i % 3 == 1 and i < 3 * s_h:
                axis[i] = 1
            elif i % 3 == 2 and i < 3 * s_w:
                axis[i] = 2
        if not rope.mrope_interleaved:
            # Sectioned layout (Qwen2-VL style): t for the first s_t, then h, then w.
            axis = [0] * s_t + [1] * s_h + [2] * s_w
        self._axis_onehot = mx.array(
            [[1.0 if axis[i] == a else 0.0 for i in range(half)] for a in range(3)]
        )  # [3, half]
        # Constants, not parameters: evaluate them now, so no lazy graph from the loading thread
        # reaches a generation running on another thread (MLX streams are per thread).
        mx.eval(self._inv_freq, self._freqs, self._axis_onehot)

    def __call__(self, x: mx.array, offset: Any = 0, position_ids: mx.array | None = None):
        """x: [B, heads, T, head_dim]; offset: int or [B] array; position_ids: [3, B, T]."""
        if position_ids is None and self.attention_factor == 1.0:
            return mx.fast.rope(
                x,
                self.dims,
                traditional=False,
                base=None,
                scale=1.0,
                offset=offset,
                freqs=self._freqs,
            )
        if position_ids is None:
            T = x.shape[-2]
            pos = mx.arange(T, dtype=mx.float32) + mx.array(offset, dtype=mx.float32)[..., None]
            pos = mx.broadcast_to(pos.reshape(-1, T), (x.shape[0], T))
            position_ids = mx.broadcast_to(pos[None], (3, x.shape[0], T))
        # angles[b, t, i] = position_ids[axis(i), b, t] * inv_freq[i], in fp32
        pos = position_ids.astype(mx.float32)  # [3, B, T]
        angles = mx.einsum("abt,ai->bti", pos, self._axis_onehot) * self._inv_freq
        cos = (mx.cos(angles) * self.attention_factor)[:, None].astype(x.dtype)
        sin = (mx.sin(angles) * self.attention_factor)[:, None].astype(x.dtype)
        half = self.dims // 2
        x1, x2, rest = x[..., :half], x[..., half : self.dims], x[..., self.dims :]
        rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
        return mx.concatenate(rotated + [rest], axis=-1)


class GatedAttention(nn.Module):
    """Full attention with a per-head sigmoid output gate and (1+w) q/k norms.

    q_proj emits, per head, [query | gate] (interleaved per head, not all queries then all gates).
    """

    def __init__(self, args: TextConfig):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = hd = args.head_dim
        self.scale = hd**-0.5
        h = args.hidden_size
        self.q_proj = Linear(h, 2 * self.n_heads * hd, bias=False)
        self.k_proj = Linear(h, self.n_kv_heads * hd, bias=False)
        self.v_proj = Linear(h, self.n_kv_heads * hd, bias=False)
        self.o_proj = Linear(self.n_heads * hd, h, bias=False)
        self.q_norm = RMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = RMSNorm(hd, eps=args.rms_norm_eps)
        self.rope = MRoPE(args)

    def __call__(
        self,
        x: mx.array,
        mask: Any = None,
        cache: Any = None,
        position_ids: mx.array | None = None,
    ) -> mx.array:
        B, T, _ = x.shape
        qg = self.q_proj(x).reshape(B, T, self.n_heads, 2 * self.head_dim)
        queries, gate = mx.split(qg, 2, axis=-1)
        gate = gate.reshape(B, T, -1)
        queries = self.q_norm(queries).transpose(0, 2, 1, 3)
        queries = self.rope(queries, self._rope_offset(cache, position_ids), position_ids)
        keys, values = self._keys_values(x, cache, position_ids)
        out = attention(queries, keys, values, scale=self.scale, mask=mask, cache=cache)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, -1)
        return self.o_proj(out * sigmoid(gate))

    def fill_cache(self, x: mx.array, cache: Any, position_ids: mx.array | None = None) -> None:
        """Only store x's keys/values in `cache` (a prefill step whose output nobody reads)."""
        self._keys_values(x, cache, position_ids)

    @staticmethod
    def _rope_offset(cache: Any, position_ids: mx.array | None) -> Any:
        offset = cache.offset if cache is not None else 0
        if position_ids is None and getattr(cache, "rope_delta", None) is not None:
            offset = offset + cache.rope_delta  # [B]: each row's positions (media, padding)
        return offset

    def _keys_values(self, x: mx.array, cache: Any, position_ids: mx.array | None) -> tuple:
        """Normed, rotated keys and values [B, n_kv, T, head_dim], after the cache's (then all
        its positions, possibly quantized)."""
        B, T, _ = x.shape
        keys = self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        values = self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        keys = self.k_norm(keys).transpose(0, 2, 1, 3)
        keys = self.rope(keys, self._rope_offset(cache, position_ids), position_ids)
        values = values.transpose(0, 2, 1, 3)
        if cache is not None:
            return cache.update_and_fetch(keys, values)
        return keys, values
