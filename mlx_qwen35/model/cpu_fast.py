"""Fast paths for MLX's CPU backend (Linux development machines and CI; never used on Metal).

Three things are slow there, all measured on this project's 2-core x86 machines with OpenBLAS:
- a matmul with a few rows (decode, one row per running request): MLX calls cblas_sgemm, which
  packs the whole weight matrix before multiplying and streams it at 3-10 GB/s. The same product
  cut into [m, K] x [K, b] calls of b weight rows can run OpenBLAS's unpacked small-matrix kernel
  (where the CPU has one: AVX-512 builds) at 15-19 GB/s, and twice that for a large matrix split
  over two CPU streams (two cores); 8 rows then cost ~1.5x one row instead of ~3x. Whether the
  small calls win depends on the CPU and the BLAS (on AMD Zen 3, without that kernel, they lose),
  so the first product of each shape is timed both ways and the faster way kept (`linear`);
- exp (and so sigmoid, SiLU, softmax): a scalar libm call per element on one core, ~12 ns per
  element. Built from +, *, a rounding and a bit shift, and compiled, it is one vectorised pass
  at ~2.5 ns per element, accurate to ~3e-7 relative;
- causal attention: the fallback of mx.fast.scaled_dot_product_attention scores all T x S pairs
  and masks half of them. Query blocks that only score the keys they can see, with the fast
  softmax, take less than half the time at T = 2048.
Every function here is exact up to fp32 rounding, and callers use it only when the default device
is the CPU (`on_cpu()`).
"""

from __future__ import annotations

import math
import threading
from time import perf_counter

import mlx.core as mx

# rows * b * K per call: the largest product that stays on OpenBLAS's small-matrix kernel (its
# limit is M*N*K <= 100^3; one row measured best at 2^18, several rows at 2^19).
_SMALL_CALL_ELEMENTS = (1 << 18, 1 << 19)
# Products of up to this many rows (decode batches) may take the small calls.
MAX_SMALL_CALL_ROWS = 8
# Matrices from this many elements (64 MB in fp32) up are split over two CPU streams.
_GEMV_SPLIT_ELEMENTS = 1 << 24
# The first product of a shape is timed on at most this many weight elements, best of 3.
_CALIBRATION_ELEMENTS = 1 << 22
_CALIBRATION_REPEATS = 3
_ATTENTION_BLOCK = 128
_LOG2E = 1.4426950408889634
# Taylor coefficients of 2^f = e^(f ln 2); on |f| <= 1/2 the degree-6 remainder is ~1e-7.
_EXP2 = tuple(math.log(2) ** i / math.factorial(i) for i in range(7))

# The other core's stream for split matrices. Thread-local: MLX streams belong to the thread that
# made them, and generation may run on any thread.
_second_stream = mx.new_thread_local_stream(mx.cpu)

# (rows, K, b) -> whether the small calls beat one matmul on this machine.
_small_calls_chosen: dict[tuple[int, int, int], bool] = {}
_calibration_lock = threading.Lock()


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _rows_per_call(n: int, k: int, m: int) -> int:
    limit = _SMALL_CALL_ELEMENTS[0 if m == 1 else 1]
    b = 1 << max(0, (limit // (m * k)).bit_length() - 1)
    while n % b:
        b //= 2
    return b


def _small_calls(x: mx.array, w: mx.array, b: int) -> mx.array:
    """x [m, K] @ w[N, K].T as N/b calls of b weight rows each."""
    n, k = w.shape
    m = x.shape[0]
    y = x @ w.reshape(n // b, b, k).swapaxes(1, 2)  # [N/b, m, b]
    return y.reshape(1, n) if m == 1 else y.swapaxes(0, 1).reshape(m, n)


def _split_small_calls(x: mx.array, w: mx.array, b: int) -> mx.array:
    n, k = w.shape
    if n * k < _GEMV_SPLIT_ELEMENTS or n % (2 * b):
        return _small_calls(x, w, b)
    h = n // 2
    y1 = _small_calls(x, w[:h], b)
    with mx.stream(_second_stream):
        y2 = _small_calls(x, w[h:], b)
    return mx.concatenate([y1, y2], axis=-1)


def _small_calls_win(m: int, k: int, b: int, weight: mx.array) -> bool:
    key = (m, k, b)
    chosen = _small_calls_chosen.get(key)
    if chosen is None:
        with _calibration_lock:
            chosen = _small_calls_chosen.get(key)
            if chosen is None:
                chosen = _small_calls_chosen[key] = _time_small_calls(m, k, b, weight)
    return chosen


def _time_small_calls(m: int, k: int, b: int, weight: mx.array) -> bool:
    """Time x @ w.T both ways on (a slice of) this weight; True if the small calls are faster."""
    rows = min(weight.shape[0], max(b, _CALIBRATION_ELEMENTS // k // b * b))
    w = weight[:rows]
    x = mx.random.normal((m, k), key=mx.random.key(0))
    mx.eval(x, w)
    ways = (lambda: x @ w.T, lambda: _small_calls(x, w, b))
    times: tuple[list[float], list[float]] = ([], [])
    for repeat in range(_CALIBRATION_REPEATS + 1):  # the first round only warms up
        for way, spent in zip(ways, times, strict=True):
            tic = perf_counter()
            mx.eval(way())
            elapsed = perf_counter() - tic
            if repeat:
                spent.append(elapsed)
    return min(times[1]) < min(times[0])


def linear(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T; on the CPU, fp32 products of up to MAX_SMALL_CALL_ROWS rows take the
    small-call path where this machine runs it faster (see the module docstring)."""
    n, k = weight.shape
    if weight.dtype != mx.float32 or x.shape[-1] != k or not on_cpu():
        return x @ weight.T
    m = x.size // k
    if m > MAX_SMALL_CALL_ROWS:
        return x @ weight.T
    b = _rows_per_call(n, k, m)
    if b < 16 or not _small_calls_win(m, k, b, weight):
        return x @ weight.T
    y = _split_small_calls(x.reshape(m, k), weight, b)
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


@mx.compile
def _exp_shifted(scores: mx.array, row_max: mx.array) -> mx.array:
    return _exp_neg(row_max - scores)


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


def causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal softmax attention for prefill on the CPU.

    q: [B, nh, T, D]; k, v: [B, nkv, S, D] with S = (cached tokens) + T; query i sees keys up to
    S - T + i; query head h uses key head h // (nh / nkv). Returns [B, nh, T, D] in q.dtype.
    """
    B, nh, T, D = q.shape
    nkv, S = k.shape[1], k.shape[2]
    past = S - T
    q = (q * scale).reshape(B, nkv, nh // nkv, T, D)
    k, v = k[:, :, None], v[:, :, None]
    outs = []
    for start in range(0, T, _ATTENTION_BLOCK):
        end = min(start + _ATTENTION_BLOCK, T)
        seen = past + end
        scores = q[..., start:end, :] @ k[..., :seen, :].swapaxes(-1, -2)
        visible = mx.arange(past + start, past + end)[:, None] >= mx.arange(seen)[None]
        scores = mx.where(visible, scores.astype(mx.float32), -math.inf)
        p = _exp_shifted(scores, mx.max(scores, axis=-1, keepdims=True))
        p = p * (1.0 / p.sum(axis=-1, keepdims=True))
        outs.append(p.astype(v.dtype) @ v[..., :seen, :])
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-2)
    return out.reshape(B, nh, T, D)
