"""Fast paths for MLX's CPU backend (Linux development machines and CI; never used on Metal).

Two things are slow there, both measured on this project's 2-core x86 machines with OpenBLAS:
- a matmul with a few rows (decode, one row per running request): MLX calls cblas_sgemm, which
  packs the whole weight matrix before multiplying and streams it at 3-10 GB/s. The same product
  cut into [m, K] x [K, b] calls of b weight rows can run OpenBLAS's unpacked small-matrix kernel
  (where the CPU has one: AVX-512 builds) at 15-19 GB/s, and twice that for a large matrix split
  over two CPU streams (two cores); 8 rows then cost ~1.5x one row instead of ~3x. Whether the
  small calls win depends on the CPU and the BLAS (on AMD Zen 3, without that kernel, they lose),
  and whether a mid-sized product of several rows gains from the second core on how busy it is,
  so the first product of each shape is timed each way and the fastest kept (`linear`);
- exp (and so sigmoid, SiLU, softmax): a scalar libm call per element on one core, ~12 ns per
  element. Built from +, *, a rounding and a bit shift, and compiled, it is one vectorised pass
  at ~2.5 ns per element, accurate to ~3e-7 relative.
(Causal attention is cut into query blocks for every backend: see model/attention.py.)
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
# Matrices from this many elements (64 MB in fp32) up are split over two CPU streams; from the
# smaller bound up, products of several rows are timed split too (the second core does half the
# arithmetic where one core's small calls run out of it).
_GEMV_SPLIT_ELEMENTS = 1 << 24
_TIMED_SPLIT_ELEMENTS = 1 << 20
# The first product of a shape is timed on at most this many weight elements, best of 3.
_CALIBRATION_ELEMENTS = 1 << 22
_CALIBRATION_REPEATS = 3
_LOG2E = 1.4426950408889634
# Taylor coefficients of 2^f = e^(f ln 2); on |f| <= 1/2 the degree-6 remainder is ~1e-7.
_EXP2 = tuple(math.log(2) ** i / math.factorial(i) for i in range(7))

# The other core's stream for split matrices. Thread-local: MLX streams belong to the thread that
# made them, and generation may run on any thread.
_second_stream = mx.new_thread_local_stream(mx.cpu)

# The ways to run a product of a few rows.
PLAIN, SMALL, SPLIT = "plain", "small", "split"
# (rows, K, b, whether split is a candidate) -> the way this machine runs fastest.
_ways_chosen: dict[tuple[int, int, int, bool], str] = {}
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
    """The small calls, half of the weight rows on the other core's stream."""
    h = w.shape[0] // 2
    y1 = _small_calls(x, w[:h], b)
    with mx.stream(_second_stream):
        y2 = _small_calls(x, w[h:], b)
    return mx.concatenate([y1, y2], axis=-1)


def _way(m: int, k: int, b: int, weight: mx.array) -> str:
    n = weight.shape[0]
    timed_split = m > 1 and _TIMED_SPLIT_ELEMENTS <= n * k < _GEMV_SPLIT_ELEMENTS
    key = (m, k, b, timed_split and n % (2 * b) == 0)
    way = _ways_chosen.get(key)
    if way is None:
        with _calibration_lock:
            way = _ways_chosen.get(key)
            if way is None:
                way = _ways_chosen[key] = _fastest_way(m, k, b, weight, key[3])
    if way == SMALL and n * k >= _GEMV_SPLIT_ELEMENTS and n % (2 * b) == 0:
        return SPLIT  # a matrix this large streams faster from two cores
    return way


def _fastest_way(m: int, k: int, b: int, weight: mx.array, split: bool) -> str:
    """Time x @ w.T each way on (a slice of) this weight; the fastest way's name."""
    step = 2 * b if split else b
    rows = min(weight.shape[0], max(step, _CALIBRATION_ELEMENTS // k // step * step))
    w = weight[:rows]
    x = mx.random.normal((m, k), key=mx.random.key(0))
    mx.eval(x, w)
    ways = {PLAIN: lambda: x @ w.T, SMALL: lambda: _small_calls(x, w, b)}
    if split:
        ways[SPLIT] = lambda: _split_small_calls(x, w, b)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for repeat in range(_CALIBRATION_REPEATS + 1):  # the first round only warms up
        for name, way in ways.items():
            tic = perf_counter()
            mx.eval(way())
            elapsed = perf_counter() - tic
            if repeat:
                times[name].append(elapsed)
    return min(times, key=lambda name: min(times[name]))


def linear(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T; on the CPU, fp32 products of up to MAX_SMALL_CALL_ROWS rows take the
    small-call path (split over two cores) where this machine runs it faster (see the module
    docstring)."""
    n, k = weight.shape
    if weight.dtype != mx.float32 or x.shape[-1] != k or not on_cpu():
        return x @ weight.T
    m = x.size // k
    if m > MAX_SMALL_CALL_ROWS:
        return x @ weight.T
    b = _rows_per_call(n, k, m)
    way = PLAIN if b < 16 else _way(m, k, b, weight)
    if way == PLAIN:
        return x @ weight.T
    run = _split_small_calls if way == SPLIT else _small_calls
    return run(x.reshape(m, k), weight, b).reshape(*x.shape[:-1], n)


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
