"""The gated delta package: every path against the sequential loop and a float64 numpy reference.

Accuracy bar (design/gated_delta.md): on the stress cases (repeated keys with g ≈ 1 and β ≈ 1,
slow heads, g underflowing to exactly 0, T not a multiple of C, non-zero initial state) the fast
paths stay within 10x of the fp32 sequential loop's own error against float64.
"""

from __future__ import annotations

import math
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35.errors import UserError
from mlx_qwen35.model.gated_delta import (
    causal_conv1d,
    chunked_gated_delta,
    dispatch,
    gated_delta_core,
    gated_delta_reference,
    gated_delta_steps,
    gated_delta_update,
    select_backend,
)
from mlx_qwen35.model.gated_delta.chunked import unit_lower_inverse

# ---------------------------------------------------------------- float64 numpy references


def np_recurrence(q, k, v, g, beta, state=None, per_token=False):
    """Spec §3.1 step 7 in float64, state [B, Hv, Dv, Dk]; value head j reads key head j // r."""
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    r = Hv // Hk
    S = np.zeros((B, Hv, Dv, Dk)) if state is None else np.array(state, np.float64)
    ys, states = np.zeros((B, T, Hv, Dv)), np.zeros((B, T, Hv, Dv, Dk))
    for t in range(T):
        kt = np.repeat(k[:, t], r, axis=1)  # [B, Hv, Dk]
        qt = np.repeat(q[:, t], r, axis=1)
        S = g[:, t, :, None, None] * S
        delta = beta[:, t, :, None] * (v[:, t] - np.einsum("bhvk,bhk->bhv", S, kt))
        S = S + delta[..., None] * kt[:, :, None, :]
        ys[:, t] = np.einsum("bhvk,bhk->bhv", S, qt)
        states[:, t] = S
    return (ys, S, states) if per_token else (ys, S)


def np_conv(x, w, conv_state):
    """Spec §3.1 step 2: y_t = Σ_j w[c, j] u_{t+j}; new state = last K-1 rows of u."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)[..., 0]  # [C, K]
    K = w.shape[1]
    u = np.concatenate([np.asarray(conv_state, np.float64), x], axis=1)
    T = x.shape[1]
    y = sum(w[:, j] * u[:, j : j + T] for j in range(K))
    return y, u[:, T:], u


def np_core(qkv, a, b, w, A_log, dt_bias, conv_state, state, Hk, Hv, Dk, Dv, per_token=False):
    """Spec §3.1 steps 2-7 in float64."""
    a, b, A_log, dt_bias = (np.asarray(x, np.float64) for x in (a, b, A_log, dt_bias))
    y, new_conv, u = np_conv(qkv, w, conv_state)
    y = y / (1.0 + np.exp(-y))
    B, T, _ = y.shape
    nk = Hk * Dk
    q = y[..., :nk].reshape(B, T, Hk, Dk)
    k = y[..., nk : 2 * nk].reshape(B, T, Hk, Dk)
    v = y[..., 2 * nk :].reshape(B, T, Hv, Dv)
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) * Dk**-0.5
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    beta = 1.0 / (1.0 + np.exp(-b))
    g = np.exp(-np.exp(A_log) * np.logaddexp(a + dt_bias, 0.0))
    out = np_recurrence(q, k, v, g, beta, state, per_token=per_token)
    return (out[0], new_conv, out[1], *out[2:], u)


# ---------------------------------------------------------------- inputs


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_case(kind, B, T, Hk, Hv, Dk, Dv, seed=0, with_state=True):
    """fp32 numpy inputs q, k, v, g, beta, state for one stress case."""
    rng = np.random.default_rng(seed)
    q = unit(rng.standard_normal((B, T, Hk, Dk))) * Dk**-0.5
    k = unit(rng.standard_normal((B, T, Hk, Dk)))
    v = rng.standard_normal((B, T, Hv, Dv))
    g = np.exp(-rng.uniform(0.0, 1.0, (B, T, Hv)))
    beta = rng.uniform(0.05, 0.95, (B, T, Hv))
    if kind == "repeated_keys":
        # Two keys repeating, no forgetting, full writes: the case that breaks one nilpotent
        # series over a whole chunk (partial sums ~1e17).
        keys = unit(rng.standard_normal((2, Hk, Dk)))
        k = np.broadcast_to(keys[np.arange(T) % 2 * (np.arange(T) % 5 == 0)], k.shape).copy()
        g = 1.0 - rng.uniform(0.0, 1e-4, g.shape)
        beta = rng.uniform(0.99, 1.0, beta.shape)
    elif kind == "slow":
        g = 1.0 - 10.0 ** rng.uniform(-7.0, -3.0, g.shape)
    elif kind == "underflow":
        # Strong decays: exp(-x) is exactly 0 in fp32 beyond x ≈ 104 (a quarter of the tokens),
        # subnormal just before.
        g = np.exp(-rng.uniform(0.0, 120.0, g.shape)).astype(np.float32)
        g[rng.uniform(size=g.shape) < 0.25] = np.exp(np.float32(-110.0))
        assert (g == 0).any() and (g[g > 0] < 1e-30).any()
    state = rng.standard_normal((B, Hv, Dv, Dk)) * 0.3 if with_state else None
    f32 = np.float32
    arrs = [x.astype(f32) for x in (q, k, v, g, beta)]
    return (*arrs, None if state is None else state.astype(f32))


def to_mx(*xs):
    return [None if x is None else mx.array(x) for x in xs]


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def assert_within_bar(y, s, y32, s32, y64, s64, factor=10.0):
    """Fast path (y, s) within `factor` x the fp32 loop's (y32, s32) error against float64."""
    floor = 2e-7 * (1.0 + np.abs(y64).max())  # a couple of fp32 ulps for tiny T
    ey, es = max_err(y, y64), max_err(s, s64)
    ey32, es32 = max_err(y32, y64), max_err(s32, s64)
    assert ey <= factor * max(ey32, floor), (ey, ey32)
    assert es <= factor * max(es32, floor), (es, es32)


# ---------------------------------------------------------------- recurrence paths

SHAPES = [  # (B, T, Hk, Hv, Dk, Dv)
    (1, 67, 2, 4, 16, 24),
    (2, 300, 1, 3, 32, 16),
    (2, 5, 2, 2, 16, 8),
    (1, 1, 3, 6, 8, 16),
]


KINDS = ["random", "repeated_keys", "slow", "underflow"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}Hk{}Hv{}Dk{}Dv{}".format(*s))
def test_fast_paths_meet_accuracy_bar(kind, shape):
    case = make_case(kind, *shape, seed=KINDS.index(kind))
    q, k, v, g, beta, state = to_mx(*case)
    y64, s64 = np_recurrence(*case)
    y32, s32 = gated_delta_reference(q, k, v, g, beta, state)
    assert y32.dtype == mx.float32 and s32.dtype == mx.float32
    # The loop itself must be right, or the bar below means nothing.
    assert max_err(y32, y64) < 1e-4 * (1 + np.abs(y64).max())
    for C in (8, 32):
        y, s = chunked_gated_delta(q, k, v, g, beta, state, chunk_size=C, segment_tokens=128)
        assert y.shape == y32.shape and s.dtype == mx.float32
        assert_within_bar(y, s, y32, s32, y64, s64)
    y, s = gated_delta_steps(q, k, v, g, beta, state)
    assert_within_bar(y, s, y32, s32, y64, s64)


def test_chunked_default_segments_and_large_chunks():
    # T > 512 crosses a default segment boundary; C = 64 is the GPU-style tile.
    case = make_case("random", 1, 600, 2, 4, 16, 8, seed=3)
    q, k, v, g, beta, state = to_mx(*case)
    y64, s64 = np_recurrence(*case)
    y32, s32 = gated_delta_reference(q, k, v, g, beta, state)
    for C in (32, 64):
        y, s = chunked_gated_delta(q, k, v, g, beta, state, chunk_size=C)
        assert_within_bar(y, s, y32, s32, y64, s64)


def test_fast_decay_heads_flush_their_subnormal_decays():
    """Heads with g ~ 0.01-0.1 make decay products of a 32-token chunk fall far below fp32's
    normal range; the chunked path zeroes those under FLUSH_BELOW (subnormal arithmetic is ~100x
    slower on x86) and still meets the accuracy bar."""
    from mlx_qwen35.model.gated_delta import chunked

    decays = mx.array([1.0, 1e-3, 2 * chunked.FLUSH_BELOW, chunked.FLUSH_BELOW / 2, 1e-39, 0.0])
    kept = decays.tolist()[:3]
    assert chunked._flush(decays).tolist() == [*kept, 0.0, 0.0, 0.0]
    case = list(make_case("random", 1, 96, 2, 4, 32, 16, seed=7))
    rng = np.random.default_rng(7)
    case[3] = rng.uniform(0.01, 0.1, case[3].shape).astype(np.float32)
    q, k, v, g, beta, state = to_mx(*case)
    y64, s64 = np_recurrence(*case)
    y32, s32 = gated_delta_reference(q, k, v, g, beta, state)
    y, s = chunked_gated_delta(q, k, v, g, beta, state)
    assert_within_bar(y, s, y32, s32, y64, s64)


def test_zero_initial_state_and_none_agree():
    case = make_case("random", 2, 40, 2, 4, 16, 8, seed=4, with_state=False)
    q, k, v, g, beta, _ = to_mx(*case)
    zeros = mx.zeros((2, 4, 8, 16))
    y64, s64 = np_recurrence(*case)
    for fn in (gated_delta_reference, chunked_gated_delta, gated_delta_steps):
        y_none, s_none = fn(q, k, v, g, beta, None)
        y_zero, s_zero = fn(q, k, v, g, beta, zeros)
        assert max_err(y_none, y_zero) == 0.0 and max_err(s_none, s_zero) == 0.0
        assert max_err(y_none, y64) < 1e-5 and max_err(s_none, s64) < 1e-5


def test_gqa_is_repeat_interleave_not_tile():
    # Key head 0 and key head 1 differ; value head 1 must read key head 0 (j // r), not 1 (j % Hk).
    B, T, Hk, Hv, Dk, Dv = 1, 9, 2, 4, 8, 4
    case = make_case("random", B, T, Hk, Hv, Dk, Dv, seed=5)
    q, k, v, g, beta, state = to_mx(*case)
    y64, _ = np_recurrence(*case)
    tiled = [np.tile(case[i], (1, 1, 2, 1)) for i in (0, 1)]
    y_tiled, _ = np_recurrence(tiled[0], tiled[1], *case[2:])
    assert max_err(y_tiled, y64) > 1e-2  # the test can tell the two apart
    for fn in (gated_delta_reference, chunked_gated_delta, gated_delta_steps):
        y, _ = fn(q, k, v, g, beta, state)
        assert max_err(y, y64) < 1e-5


def test_bf16_inputs_keep_fp32_state():
    case = make_case("slow", 2, 70, 2, 4, 32, 16, seed=6)
    bf = [mx.array(x).astype(mx.bfloat16) for x in case[:3]]
    g, beta, state = to_mx(*case[3:])
    exact = [np.array(x.astype(mx.float32)) for x in bf]
    y64, s64 = np_recurrence(*exact, case[3], case[4], case[5])
    y32, s32 = gated_delta_reference(*bf, g, beta, state)
    for fn in (chunked_gated_delta, gated_delta_steps):
        y, s = fn(*bf, g, beta, state)
        assert y.dtype == mx.bfloat16 and s.dtype == mx.float32
        # Output rounded to bf16 once; the fp32 state meets the usual bar.
        assert max_err(y.astype(mx.float32), y64) <= 1e-2 * np.abs(y64).max()
        assert max_err(s, s64) <= 10 * max(max_err(s32, s64), 1e-6)


@pytest.mark.parametrize("C", [8, 16, 32, 64])
def test_unit_lower_inverse(C):
    rng = np.random.default_rng(C)
    # Repeated keys, g = β = 1: N = -(all ones strictly below): the inverse stays small, but a
    # single nilpotent series over the chunk has huge partial sums.
    hard = -np.tril(np.ones((C, C)), -1)
    rand = np.tril(rng.uniform(-1, 1, (C, C)), -1)
    n_lower = np.stack([hard, rand]).astype(np.float32)
    inv = np.array(unit_lower_inverse(mx.array(n_lower)))
    ref = np.linalg.inv(np.eye(C) - n_lower.astype(np.float64))
    assert np.abs(inv - ref).max() < 1e-5 * np.abs(ref).max()
    assert np.all(np.triu(inv, 1) == 0)


# ---------------------------------------------------------------- conv


@pytest.mark.parametrize("K", [2, 4])
def test_causal_conv1d_matches_numpy_and_continues(K):
    rng = np.random.default_rng(K)
    B, T, C = 2, 11, 24
    x = rng.standard_normal((B, T, C)).astype(np.float32)
    w = rng.standard_normal((C, K, 1)).astype(np.float32)
    st = rng.standard_normal((B, K - 1, C)).astype(np.float32)
    y, new = causal_conv1d(mx.array(x), mx.array(w), mx.array(st))
    y_ref, new_ref, _ = np_conv(x, w, st)
    assert y.dtype == mx.float32 and new.shape == (B, K - 1, C)
    assert max_err(y, y_ref) < 1e-5 and max_err(new, new_ref) == 0.0
    # No state = zeros.
    y0, _ = causal_conv1d(mx.array(x), mx.array(w))
    assert max_err(y0, np_conv(x, w, np.zeros_like(st))[0]) < 1e-5
    # Prefill in pieces (incl. single tokens, shorter than K-1) equals the whole.
    pieces, state = [], mx.array(st)
    for a, b in [(0, 1), (1, 2), (2, 7), (7, 8), (8, 11)]:
        yp, state = causal_conv1d(mx.array(x[:, a:b]), mx.array(w), state)
        pieces.append(np.array(yp))
    assert max_err(np.concatenate(pieces, axis=1), y_ref) < 1e-5
    assert max_err(state, new_ref) == 0.0


def test_causal_conv1d_bf16_and_dtype():
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, 6, 8)).astype(np.float32)).astype(mx.bfloat16)
    w = mx.array(rng.standard_normal((8, 4, 1)).astype(np.float32)).astype(mx.bfloat16)
    y, st = causal_conv1d(x, w)
    y32, _ = causal_conv1d(x, w, dtype=mx.float32)
    assert y.dtype == mx.bfloat16 and st.dtype == mx.bfloat16 and y32.dtype == mx.float32
    ref, _, _ = np_conv(
        np.array(x.astype(mx.float32)), np.array(w.astype(mx.float32)), np.zeros((1, 3, 8))
    )
    assert max_err(y32, ref) < 1e-5  # accumulated in fp32
    with pytest.raises(UserError, match="conv weight"):
        causal_conv1d(x, w.reshape(8, 1, 4))


# ---------------------------------------------------------------- gated_delta_core


def core_inputs(B, T, Hk, Hv, Dk, Dv, K=4, seed=0, with_cache=True):
    rng = np.random.default_rng(seed)
    C = 2 * Hk * Dk + Hv * Dv
    f = np.float32
    qkv = rng.standard_normal((B, T, C)).astype(f)
    a = rng.standard_normal((B, T, Hv)).astype(f) * 2
    b = rng.standard_normal((B, T, Hv)).astype(f) * 2
    w = (rng.standard_normal((C, K, 1)) * 0.5).astype(f)
    A_log = rng.uniform(-2, 2, Hv).astype(f)
    dt_bias = rng.standard_normal(Hv).astype(f)
    conv_state = rng.standard_normal((B, K - 1, C)).astype(f) if with_cache else None
    state = (rng.standard_normal((B, Hv, Dv, Dk)) * 0.3).astype(f) if with_cache else None
    return qkv, a, b, w, A_log, dt_bias, conv_state, state


def heads(Hk, Hv, Dk, Dv):
    return dict(num_k_heads=Hk, num_v_heads=Hv, head_k_dim=Dk, head_v_dim=Dv)


@pytest.mark.parametrize("backend", [None, "ops", "chunked", "mlx-core"])
@pytest.mark.parametrize("T", [1, 5, 40])
def test_core_matches_spec(backend, T):
    dims = (2, 4, 16, 8)
    inp = core_inputs(2, T, *dims, seed=T)
    o, conv, s = gated_delta_core(*to_mx(*inp), **heads(*dims), backend=backend)
    o64, conv64, s64, _ = np_core(*inp[:6], inp[6], inp[7], *dims)
    assert o.dtype == mx.float32 and s.dtype == mx.float32 and o.shape == (2, T, 4, 8)
    assert max_err(o, o64) < 2e-5 and max_err(s, s64) < 2e-5
    assert max_err(conv, conv64) == 0.0


def test_core_without_cache_and_bf16():
    dims = (1, 3, 32, 16)
    inp = core_inputs(1, 37, *dims, seed=9, with_cache=False)
    qkv, a, b, w, A_log, dt_bias, _, _ = to_mx(*inp)
    C = qkv.shape[-1]
    o64, conv64, s64, _ = np_core(*inp[:6], np.zeros((1, 3, C)), None, *dims)
    o, conv, s = gated_delta_core(qkv, a, b, w, A_log, dt_bias, None, None, **heads(*dims))
    assert max_err(o, o64) < 2e-5 and max_err(s, s64) < 2e-5 and max_err(conv, conv64) == 0
    # bf16 activations: o and conv state in bf16, state fp32; checked against float64 on the
    # bf16-rounded inputs.
    bf = [x.astype(mx.bfloat16) for x in (qkv, a, b, w, dt_bias)]
    exact = [np.array(x.astype(mx.float32)) for x in bf]
    o64, _, s64, _ = np_core(*exact[:4], inp[4], exact[4], np.zeros((1, 3, C)), None, *dims)
    o, conv, s = gated_delta_core(
        bf[0], bf[1], bf[2], bf[3], A_log, bf[4], None, None, **heads(*dims)
    )
    assert o.dtype == mx.bfloat16 and conv.dtype == mx.bfloat16 and s.dtype == mx.float32
    assert max_err(o.astype(mx.float32), o64) < 1e-2 * np.abs(o64).max()
    assert max_err(s, s64) < 1e-5


def test_core_long_prompt_runs_in_segments(monkeypatch):
    # Prompts longer than SEGMENT_TOKENS run conv + recurrence per segment, carrying both states.
    monkeypatch.setattr(dispatch, "SEGMENT_TOKENS", 16)
    dims = (1, 2, 16, 8)
    inp = core_inputs(2, 45, *dims, seed=15)
    o, conv, s = gated_delta_core(*to_mx(*inp), **heads(*dims), backend="chunked")
    o64, conv64, s64, _ = np_core(*inp, *dims)
    assert o.shape == (2, 45, 2, 8)
    assert max_err(o, o64) < 2e-5 and max_err(s, s64) < 2e-5 and max_err(conv, conv64) == 0.0


def test_core_l2_eps_is_on_the_sum():
    # Tiny activations: Σq² ~ 1e-6, where eps on the sum and eps on the mean differ a lot.
    dims = (2, 2, 16, 8)
    inp = list(core_inputs(1, 6, *dims, seed=14))
    inp[0] = inp[0] * np.float32(2e-3)
    inp[6] = inp[6] * np.float32(2e-3)
    o, _, s = gated_delta_core(*to_mx(*inp), **heads(*dims))
    o64, _, s64, _ = np_core(*inp, *dims)
    assert max_err(o, o64) < 2e-5 * np.abs(o64).max()
    assert max_err(s, s64) < 2e-5 * np.abs(s64).max()


def test_core_prefill_then_decode_equals_whole():
    dims = (2, 4, 16, 8)
    inp = core_inputs(1, 50, *dims, seed=11)
    qkv, a, b, w, A_log, dt_bias, cs, st = to_mx(*inp)
    whole = gated_delta_core(qkv, a, b, w, A_log, dt_bias, cs, st, **heads(*dims))
    outs = []
    for lo, hi in [(0, 30), (30, 31), (31, 34), (34, 50)]:
        o, cs, st = gated_delta_core(
            qkv[:, lo:hi], a[:, lo:hi], b[:, lo:hi], w, A_log, dt_bias, cs, st, **heads(*dims)
        )
        outs.append(o)
    assert max_err(mx.concatenate(outs, axis=1), whole[0]) < 1e-5
    assert max_err(cs, whole[1]) == 0.0 and max_err(st, whole[2]) < 1e-5


@pytest.mark.parametrize("backend", [None, "ops", "mlx-core"])
def test_per_token_states_roll_back(backend):
    dims = (2, 4, 16, 8)
    T, K = 5, 4
    inp = core_inputs(2, T, *dims, seed=12)
    args = to_mx(*inp)
    out = gated_delta_core(*args, **heads(*dims), backend=backend, per_token_states=True)
    assert len(out) == 5
    o, conv, s, states, window = out
    assert states.shape == (2, T, 4, 8, 16) and states.dtype == mx.float32
    assert window.shape == (2, K - 1 + T, args[0].shape[-1])
    o64, conv64, s64, states64, u64 = np_core(*inp, *dims, per_token=True)
    assert max_err(states, states64) < 2e-5 and max_err(window, u64) == 0.0
    assert max_err(o, o64) < 2e-5 and max_err(s, s64) < 2e-5 and max_err(conv, conv64) == 0
    qkv, a, b, w, A_log, dt_bias, cs, st = args
    for keep in (1, 3, T):
        _, cs_a, st_a = gated_delta_core(
            qkv[:, :keep], a[:, :keep], b[:, :keep], w, A_log, dt_bias, cs, st, **heads(*dims)
        )
        assert max_err(window[:, keep : keep + K - 1], cs_a) == 0.0
        assert max_err(states[:, keep - 1], st_a) < 1e-5


def test_per_token_states_limit():
    dims = (1, 1, 8, 8)
    args = to_mx(*core_inputs(1, 9, *dims))
    with pytest.raises(UserError, match="per_token_states"):
        gated_delta_core(*args, **heads(*dims), per_token_states=True)


def test_core_rejects_bad_shapes():
    dims = (2, 3, 8, 8)  # 3 value heads cannot share 2 key heads
    args = to_mx(*core_inputs(1, 3, 2, 4, 8, 8))
    with pytest.raises(UserError, match="multiple"):
        gated_delta_core(*args, **heads(*dims))
    with pytest.raises(UserError, match="qkv"):
        gated_delta_core(*args, **heads(2, 4, 8, 4))


# ---------------------------------------------------------------- dispatch


def update_inputs(T, seed=0):
    return to_mx(*make_case("random", 1, T, 2, 4, 16, 8, seed=seed))


def spy(monkeypatch, name):
    calls = []
    real = getattr(dispatch, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, name, wrapper)
    return calls


def test_default_rule(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)  # the rule off Apple GPUs
    sel = dict(dtype=mx.float32, head_k_dim=128, head_v_dim=128)
    assert select_backend(None, T=1, **sel) == "steps"
    assert select_backend(None, T=dispatch.SMALL_T, **sel) == "steps"
    assert select_backend(None, T=dispatch.SMALL_T + 1, **sel) == "chunked"
    steps = spy(monkeypatch, "gated_delta_steps")
    chunked = spy(monkeypatch, "chunked_gated_delta")
    gated_delta_update(*update_inputs(1))
    gated_delta_update(*update_inputs(40))
    assert steps == ["gated_delta_steps"] and chunked == ["chunked_gated_delta"]


@pytest.mark.parametrize(
    "name, impl",
    [
        ("ops", "gated_delta_reference"),
        ("chunked", "chunked_gated_delta"),
        ("mlx-core", "_mlx_core"),
    ],
)
def test_env_var_forces_backend(monkeypatch, name, impl):
    monkeypatch.setenv(dispatch.ENV_VAR, name)
    calls = spy(monkeypatch, impl)
    inputs = update_inputs(3)
    y, s = gated_delta_update(*inputs)
    assert calls == [impl]
    y64, s64 = np_recurrence(*(np.array(x) for x in inputs))
    assert max_err(y, y64) < 1e-5 and max_err(s, s64) < 1e-5
    # The argument beats the environment.
    assert select_backend("ops", T=3, dtype=mx.float32, head_k_dim=16, head_v_dim=8) == "ops"


def test_bad_backend_names(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(UserError, match="ops, chunked, metal, mlx-core") as info:
        gated_delta_update(*update_inputs(2))
    assert dispatch.ENV_VAR in str(info.value)
    monkeypatch.delenv(dispatch.ENV_VAR)
    with pytest.raises(UserError, match="valid values"):
        gated_delta_update(*update_inputs(2), backend="fast")
    if not mx.metal.is_available():
        with pytest.raises(UserError, match="Apple GPU"):
            gated_delta_update(*update_inputs(2), backend="metal")


def test_metal_hook_is_lazy_and_routed(monkeypatch):
    code = (
        "import sys, mlx_qwen35.model.gated_delta; "
        "print('mlx_qwen35.model.gated_delta.metal' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

    from mlx_qwen35.model.gated_delta import metal

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    seen = []

    def eligible(**kw):
        seen.append(kw)
        return kw["T"] <= 4

    monkeypatch.setattr(metal, "is_eligible", eligible)
    monkeypatch.setattr(metal, "gated_delta_update", lambda *a, **kw: "metal-update")
    monkeypatch.setattr(metal, "gated_delta_core", lambda *a, **kw: ("metal-core", kw))
    assert gated_delta_update(*update_inputs(2)) == "metal-update"
    assert seen[-1] == dict(
        T=2, dtype=mx.float32, head_k_dim=16, head_v_dim=8, per_token_states=False
    )
    dims = (2, 4, 16, 8)
    tag, kw = gated_delta_core(
        *to_mx(*core_inputs(1, 3, *dims)), **heads(*dims), per_token_states=True
    )
    assert tag == "metal-core" and kw["per_token_states"] and kw["num_v_heads"] == 4
    # Not eligible -> the portable path; forcing Metal on an ineligible call is an error.
    y, _ = gated_delta_update(*update_inputs(6))
    assert isinstance(y, mx.array) and y.shape == (1, 6, 4, 8)
    with pytest.raises(UserError, match="does not support"):
        gated_delta_update(*update_inputs(6), backend="metal")


def test_mlx_core_agrees():
    case = make_case("repeated_keys", 2, 45, 2, 4, 32, 16, seed=13)
    q, k, v, g, beta, state = to_mx(*case)
    y_ref, s_ref = gated_delta_update(q, k, v, g, beta, state, backend="ops")
    y_core, s_core = gated_delta_update(q, k, v, g, beta, state, backend="mlx-core")
    y_ch, s_ch = gated_delta_update(q, k, v, g, beta, state, backend="chunked")
    assert max_err(y_core, y_ref) < 1e-5 and max_err(s_core, s_ref) < 1e-5
    assert max_err(y_ch, y_core) < 1e-5 and max_err(s_ch, s_core) < 1e-5


def test_update_validation():
    q, k, v, g, beta, state = update_inputs(4)
    with pytest.raises(UserError, match="power of two"):
        gated_delta_update(q, k, v, g, beta, state, chunk_size=24)
    with pytest.raises(UserError, match="state"):
        gated_delta_update(q, k, v, g, beta, state.swapaxes(-1, -2))
    with pytest.raises(UserError, match="beta"):
        gated_delta_update(q, k, v, g, beta[:, :2], state)
    y, s = gated_delta_update(q[:, :0], k[:, :0], v[:, :0], g[:, :0], beta[:, :0], state)
    assert y.shape == (1, 0, 4, 8) and max_err(s, state) == 0.0
    assert math.isfinite(float(gated_delta_update(q, k, v, g, beta)[0].sum()))
