"""The CPU fast paths: the small-call products equal one matmul for every row count a decode
batch has, and each machine keeps whichever way its first timing found faster (here the timings
are scripted; no test times anything)."""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35.model import cpu_fast


@pytest.fixture
def fresh_choices(monkeypatch):
    monkeypatch.setattr(cpu_fast, "_ways_chosen", {})
    return cpu_fast._ways_chosen


def scripted_clock(monkeypatch, *spans_of_ways: float) -> None:
    """perf_counter as seen by the calibration: the ways it times (plain, small calls, then split
    when it is a candidate) take these many seconds, in that order, round after round."""
    ticks = itertools.count()
    spans = itertools.cycle(spans_of_ways)
    state = {"t": 0.0}

    def clock() -> float:
        if next(ticks) % 2:  # the end of a timed product
            state["t"] += next(spans)
        return state["t"]

    monkeypatch.setattr(cpu_fast, "perf_counter", clock)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
def test_small_calls_equal_one_matmul(fresh_choices, monkeypatch, rows):
    scripted_clock(monkeypatch, 2.0, 1.0)
    rng = np.random.default_rng(rows)
    w = mx.array(rng.standard_normal((512, 96)).astype(np.float32))
    x = mx.array(rng.standard_normal((rows, 1, 96)).astype(np.float32))
    y = cpu_fast.linear(x, w)
    b = cpu_fast._rows_per_call(512, 96, rows)
    assert fresh_choices == {(rows, 96, b, False): "small"}
    ref = x @ w.T
    assert y.shape == ref.shape == (rows, 1, 512)
    assert np.allclose(np.array(y), np.array(ref), rtol=1e-5, atol=1e-5)


def test_a_machine_where_small_calls_lose_keeps_the_plain_product(fresh_choices, monkeypatch):
    scripted_clock(monkeypatch, 1.0, 3.0)
    calls = []
    real = cpu_fast._small_calls

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(cpu_fast, "_small_calls", counting)
    w = mx.ones((1024, 64))
    x = mx.ones((2, 64))
    y = cpu_fast.linear(x, w)
    assert list(fresh_choices.values()) == ["plain"]
    timed = len(calls)  # only the calibration used them
    assert mx.array_equal(y, x @ w.T).item()
    cpu_fast.linear(x, w)  # decided once: no second timing, still the plain product
    assert len(calls) == timed and len(fresh_choices) == 1


def test_prefill_and_other_dtypes_never_take_small_calls(fresh_choices):
    w = mx.ones((256, 64))
    cpu_fast.linear(mx.ones((9, 64)), w)  # more rows than a decode batch
    cpu_fast.linear(mx.ones((1, 64), mx.bfloat16), w.astype(mx.bfloat16))
    assert fresh_choices == {}


def test_a_batch_product_split_over_two_cores_when_that_is_fastest(fresh_choices, monkeypatch):
    scripted_clock(monkeypatch, 3.0, 2.0, 1.0)  # plain, small calls, small calls split
    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((4096, 256)).astype(np.float32))  # 2^20 elements
    x = mx.array(rng.standard_normal((4, 1, 256)).astype(np.float32))
    y = cpu_fast.linear(x, w)
    b = cpu_fast._rows_per_call(4096, 256, 4)
    assert fresh_choices == {(4, 256, b, True): "split"}
    assert np.allclose(np.array(y), np.array(x @ w.T), rtol=1e-5, atol=1e-5)
    # One row: split is no candidate below 2^24 elements.
    scripted_clock(monkeypatch, 2.0, 1.0)
    cpu_fast.linear(x[:1], w)
    assert fresh_choices[(1, 256, cpu_fast._rows_per_call(4096, 256, 1), False)] == "small"


@pytest.mark.parametrize("n,k", [(3584, 1024), (1024, 3584), (1 << 15, 1024), (96, 64)])
def test_linear_equals_matmul_for_every_input_shape(n, k):
    """Decode rows, batched decode and speculative verification (up to 8 tokens of one row) all
    reach `linear` with their own leading shapes; whatever way this machine picked, the product
    and its shape are the matmul's."""
    w = mx.random.normal((n, k), key=mx.random.key(0))
    for shape in ((1, k), (1, 1, k), (4, k), (1, 4, k), (2, 3, k), (1, 8, k), (9, k)):
        x = mx.random.normal(shape, key=mx.random.key(1))
        ours, ref = np.array(cpu_fast.linear(x, w)), np.array(x @ w.T)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)
