"""Causal depthwise conv1d (no bias) as shifted multiply-adds, with a carried conv state.

u = concat(conv_state [B, K−1, C], x [B, T, C]);  y_t[c] = Σ_j w[c, j] · u_{t+j}[c]
(tap j = K−1 multiplies the current token); the new conv state is the last K−1 rows of u: the raw
inputs, before the conv and before any activation. MLX's grouped `conv1d` measured ~2–4x slower
on CPU than these K multiply-adds (and ~10x slower than them compiled). Products accumulate in
fp32.
"""

from __future__ import annotations

import mlx.core as mx

from ...errors import UserError
from ..cpu_fast import exp_neg, on_cpu


def conv_window(x: mx.array, conv_state: mx.array | None, kernel_size: int) -> mx.array:
    """u = concat(conv_state, x) [B, K−1+T, C] in x.dtype; zeros stand in for a missing state."""
    B, _, C = x.shape
    if conv_state is None:
        conv_state = mx.zeros((B, kernel_size - 1, C), x.dtype)
    elif conv_state.shape != (B, kernel_size - 1, C):
        raise UserError(
            f"conv_state has shape {tuple(conv_state.shape)}, expected {(B, kernel_size - 1, C)} "
            "(batch, kernel_size - 1, channels); pass the state this layer returned, or None"
        )
    if kernel_size == 1:
        return x
    return mx.concatenate([conv_state.astype(x.dtype), x], axis=1)


def _taps(u: mx.array, w: mx.array) -> mx.array:
    K = w.shape[0]
    T = u.shape[1] - K + 1
    y = u[:, 0:T] * w[0]
    for j in range(1, K):
        y = y + u[:, j : j + T] * w[j]
    return y


def _taps_silu(u: mx.array, w: mx.array) -> mx.array:
    y = _taps(u, w)
    # SiLU; on MLX CPU, y / (1 + exp(-y)) is faster than y * sigmoid(y), and exact at both ends.
    return y / (1.0 + mx.exp(-y))


def _taps_silu_cpu(u: mx.array, w: mx.array) -> mx.array:
    # MLX's CPU exp is a scalar libm call (~12 ns/element); see cpu_fast.
    y = _taps(u, w)
    return y / (1.0 + exp_neg(y))


# Compiled, the taps (and the SiLU) are one pass over memory instead of 2K - 1 (or 2K + 2) full
# size temporaries: ~3-4x faster on CPU.
_compiled = {False: mx.compile(_taps), True: mx.compile(_taps_silu)}
_compiled_cpu_silu = mx.compile(_taps_silu_cpu)


def conv_taps(u: mx.array, weight: mx.array, *, silu: bool = False) -> mx.array:
    """Σ_j w[:, j] · u[:, j : j+T] in fp32 for u [B, K−1+T, C] and weight [C, K, 1], then
    optionally SiLU. Returns [B, T, C] fp32."""
    C, K = weight.shape[:2]
    w = weight.reshape(C, K).T.astype(mx.float32)  # [K, C]
    fn = _compiled_cpu_silu if silu and on_cpu() else _compiled[silu]
    return fn(u, mx.contiguous(w))


def causal_conv1d(
    x: mx.array,
    weight: mx.array,
    conv_state: mx.array | None = None,
    *,
    dtype: mx.Dtype | None = None,
) -> tuple[mx.array, mx.array]:
    """Causal depthwise conv over time.

    x: [B, T, C]; weight: [C, K, 1] (as stored); conv_state: [B, K−1, C] or None (zeros).
    Returns (y [B, T, C] in `dtype` (default x.dtype), new conv state [B, K−1, C] in x.dtype).
    """
    if weight.ndim != 3 or weight.shape[0] != x.shape[-1] or weight.shape[2] != 1:
        raise UserError(
            f"conv weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]}, K, 1) "
            "(MLX depthwise layout); convert HF [C, 1, K] weights with the loader"
        )
    K = weight.shape[1]
    T = x.shape[1]
    u = conv_window(x, conv_state, K)
    y = conv_taps(u, weight)
    # A copy, so the cache does not keep the whole window u alive.
    new_state = mx.contiguous(u[:, T:])
    return y.astype(dtype or x.dtype), new_state
