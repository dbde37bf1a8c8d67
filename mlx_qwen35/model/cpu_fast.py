"""Fast paths for MLX's CPU backend (Linux development machines and CI; never used on Metal).

Two things are slow there, both measured on this project's 2-core x86 machine with OpenBLAS:
- a matmul with one row (decode) or a few (batched decode, speculative verification of up to 8
  tokens): MLX calls cblas_sgemm, which packs the whole weight matrix before multiplying and
  streams it at 3-10 GB/s. The same product cut into [m, K] x [K, b] calls of b weight rows
  (m * b * K within the small-matrix limit) runs OpenBLAS's unpacked small-matrix kernel at
  15-19 GB/s, and twice that for a large matrix split over two CPU streams (two cores). At 4
  rows the packed GEMM measured ~3x slower than the small calls;
- exp (and so sigmoid, SiLU, softmax): a scalar libm call per element on one core, ~12 ns per
  element. Built from +, *, a rounding and a bit shift, and compiled, it is one vectorised pass
  at ~2.5 ns per element, accurate to ~3e-7 relative.
(Causal attention is cut into query blocks for every backend: see model/attention.py.)
Every function here is exact up to fp32 rounding, and callers use it only when the default device
is the CPU (`on_cpu()`).
"""

from __future__ import annotations

import math

import mlx.core as mx

# rows per call * K * input rows: the largest product that stays on OpenBLAS's small-matrix kernel.
_GEMV_CALL_ELEMENTS = 1 << 18
# Inputs with up to this many rows take the small-call path.
_SMALL_ROWS = 8
# Matrices from this many elements (64 MB in fp32) up are split over two CPU streams.
_GEMV_SPLIT_ELEMENTS = 1 << 24
_LOG2E = 1.4426950408889634
# Taylor coefficients of 2^f = e^(f ln 2); on |f| <= 1/2 the degree-6 remainder is ~1e-7.
_EXP2 = tuple(math.log(2) ** i / math.factorial(i) for i in range(7))

# The other core's stream for split matrices. Thread-local: MLX streams belong to the thread that
# made them, and generation may run on any thread.
_second_stream = mx.new_thread_local_stream(mx.cpu)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _rows_per_call(n: int, k: int) -> int:
    b = 1 << max(0, (_GEMV_CALL_ELEMENTS // k).bit_length() - 1)
    while n % b:
        b //= 2
    return b


def _gemv(x: mx.array, w: mx.array) -> mx.array | None:
    """x [m, K] @ w[N, K].T as N/b small calls, or None when N has no useful block size."""
    n, k = w.shape
    m = x.shape[0]
    b = _rows_per_call(n, k * m)
    if b < 16:
        return None
    y = x @ w.reshape(n // b, b, k).swapaxes(1, 2)  # [N/b, m, b]
    return y.reshape(1, n) if m == 1 else y.swapaxes(0, 1).reshape(m, n)


def linear(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T; up to 8 fp32 rows on the CPU take the small-call path described above."""
    n, k = weight.shape
    m = x.size // k if x.shape[-1] == k else 0
    if not 1 <= m <= _SMALL_ROWS or weight.dtype != mx.float32 or not on_cpu():
        return x @ weight.T
    x1 = x.reshape(m, k)
    if n * k >= _GEMV_SPLIT_ELEMENTS and n % 32 == 0:
        h = n // 2
        y1 = _gemv(x1, weight[:h])
        with mx.stream(_second_stream):
            y2 = _gemv(x1, weight[h:])
        y = None if y1 is None or y2 is None else mx.concatenate([y1, y2], axis=-1)
    else:
        y = _gemv(x1, weight)
    if y is None:
        return x @ weight.T
    return y.reshape(*x.shape[:-1], n)


def _exp_neg(x: mx.array) -> mx.array:
    """exp(-x) for fp32 x: 2^n * p(f) with n = round(-x log2 e), the exponent set by a shift.

    Saturates at 2^-126 and 2^127 instead of 0 and inf (silu and sigmoid only add 1 to it)."""
    t = mx.clip(x * -_LOG2E, -126.0, 127.0)
    e = (t + 127.5).astype(mx.int32)  # round(t) + 127, the biased exponent, in [1, 254]
    f = t - (e.astype(mx.float32) - 127.0)
    p = _EXP2[6]
    for c in reversed(_EXP2[:6]):
        p = p * f + c
    return p * mx.left_shift(e, 23).view(mx.float32)


@mx.compile
def _silu(x: mx.array) -> mx.array:
    xf = x.astype(mx.float32)
    return (xf / (1.0 + _exp_neg(xf))).astype(x.dtype)


@mx.compile
def _sigmoid(x: mx.array) -> mx.array:
    xf = x.astype(mx.float32)
    return (1.0 / (1.0 + _exp_neg(xf))).astype(x.dtype)


@mx.compile
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    g = gate.astype(mx.float32)
    return (g / (1.0 + _exp_neg(g)) * up.astype(mx.float32)).astype(gate.dtype)


def silu(x: mx.array) -> mx.array:
    return _silu(x) if on_cpu() else x * mx.sigmoid(x)


def sigmoid(x: mx.array) -> mx.array:
    return _sigmoid(x) if on_cpu() else mx.sigmoid(x)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up."""
    return _swiglu(gate, up) if on_cpu() else gate * mx.sigmoid(gate) * up


def exp_neg(x: mx.array) -> mx.array:
    """exp(-x) for fp32 x, to be used inside a compiled function (see `_exp_neg`)."""
    return _exp_neg(x)
