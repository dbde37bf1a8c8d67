"""The Metal gated-delta kernels (mlx_qwen35/gated_delta/metal.py) under CPU emulation.

The emulator replaces `mx.fast.metal_kernel` and `mx.metal.is_available()` reports True, so these
tests run the production dispatch (grid, threadgroup, template values, eligibility) and the
kernels themselves against a float64 sequential reference (metal_emu/gdn_reference.py). On a Mac,
MLX_QWEN35_METAL_EMU=0 runs the same tests on the real GPU.
Tolerances: fp32 outputs and states within 1e-5 of the reference relative to its largest value;
bf16/fp16 outputs within one ulp of the float64 reference (ulp of the reference value, floored at
1e-6 of the largest output so exact zeros do not demand more than fp32 can give).
"""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest
from metal_emu import Recorder, emulate_metal, skip_unless_kernels_can_run
from metal_emu import gdn_reference as ref
from metal_emu.emulator import to_numpy

from mlx_qwen35.model.gated_delta import metal

skip_unless_kernels_can_run()  # the emulator, or real Metal with MLX_QWEN35_METAL_EMU=0

F32_TOL = 1e-5


@pytest.fixture
def emu(monkeypatch):
    return emulate_metal(monkeypatch)


def f64(x: mx.array | None) -> np.ndarray | None:
    return None if x is None else np.array(x.astype(mx.float32), np.float64)


def core_inputs(B, T, Hk, Hv, Dk, Dv, *, dtype=mx.float32, seed=0, conv=True, state=True, K=4):
    rng = np.random.default_rng(seed)
    C = 2 * Hk * Dk + Hv * Dv

    def act(*shape, scale=1.0):
        return mx.array((scale * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)

    return dict(
        qkv=act(B, T, C),
        a=act(B, T, Hv),
        b=act(B, T, Hv, scale=2.0),
        conv_weight=act(C, K, 1, scale=0.5),
        A_log=mx.array((0.5 * rng.standard_normal(Hv)).astype(np.float32)),
        dt_bias=act(Hv),
        conv_state=act(B, K - 1, C) if conv else None,
        state=mx.array((0.3 * rng.standard_normal((B, Hv, Dv, Dk))).astype(np.float32))
        if state
        else None,
    )


def reference_core(inp, Hk, Hv, Dk, Dv):
    return ref.core(
        f64(inp["qkv"]),
        f64(inp["a"]),
        f64(inp["b"]),
        f64(inp["conv_weight"]),
        f64(inp["A_log"]),
        f64(inp["dt_bias"]),
        f64(inp["conv_state"]),
        f64(inp["state"]),
        Hk=Hk,
        Hv=Hv,
        Dk=Dk,
        Dv=Dv,
    )


def run_core(inp, Hk, Hv, Dk, Dv, per_token=False):
    return metal.gated_delta_core(
        **inp,
        num_k_heads=Hk,
        num_v_heads=Hv,
        head_k_dim=Dk,
        head_v_dim=Dv,
        per_token_states=per_token,
    )


def assert_close_f32(got: mx.array, want: np.ndarray, what: str) -> None:
    got = np.array(got.astype(mx.float32), np.float64)
    assert got.shape == want.shape, what
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= F32_TOL, f"{what}: relative error {err:.2e}"


def assert_within_ulp(got: mx.array, want: np.ndarray, dtype: mx.Dtype, what: str) -> None:
    mant = {mx.bfloat16: 7, mx.float16: 10}[dtype]
    tiny = {mx.bfloat16: 2.0**-126, mx.float16: 2.0**-14}[dtype]
    got = np.array(got.astype(mx.float32), np.float64)
    mag = np.maximum(np.abs(want), max(tiny, 1e-6 * np.abs(want).max()))
    ulp = 2.0 ** (np.floor(np.log2(mag)) - mant)
    bad = np.abs(got - want) > ulp
    assert not bad.any(), f"{what}: {bad.sum()} values off by more than one ulp"


def assert_exact(got: mx.array, want: np.ndarray, what: str) -> None:
    np.testing.assert_array_equal(np.array(got.astype(mx.float32), np.float64), want, what)


# (Hk, Hv, Dk, Dv): Hv/Hk = 1, 2, 3; Dk != Dv. Dv/8 = 6 row groups -> threadgroups of 4 and 2
# SIMD groups (partial); Dv = 8 -> one SIMD group (threadgroup clamped to the grid).
SHAPES = [(2, 2, 16, 48), (1, 2, 32, 16), (2, 6, 24, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "hk{}hv{}dk{}dv{}".format(*s))
@pytest.mark.parametrize("T", [1, 3, 17, 64])
@pytest.mark.parametrize("B", [1, 2])
def test_fused_core_matches_reference_fp32(emu, shape, T, B):
    Hk, Hv, Dk, Dv = shape
    inp = core_inputs(B, T, Hk, Hv, Dk, Dv, seed=T * 10 + B)
    o, conv_state, state = run_core(inp, Hk, Hv, Dk, Dv)
    want = reference_core(inp, Hk, Hv, Dk, Dv)
    assert_close_f32(o, want["o"], "o")
    assert_close_f32(state, want["state"], "state")
    assert_exact(conv_state, want["conv_state"], "conv state")
    assert o.dtype == mx.float32 and state.dtype == mx.float32


@pytest.mark.parametrize(
    "shape, T",
    [((1, 2, 128, 128), 1), ((1, 2, 128, 128), 17), ((1, 1, 256, 20), 5), ((2, 2, 136, 8), 3)],
)
def test_fused_core_large_heads_and_eight_lanes_per_row(emu, shape, T):
    Hk, Hv, Dk, Dv = shape
    inp = core_inputs(1, T, Hk, Hv, Dk, Dv, seed=T)
    o, _, state = run_core(inp, Hk, Hv, Dk, Dv)
    want = reference_core(inp, Hk, Hv, Dk, Dv)
    assert_close_f32(o, want["o"], "o")
    assert_close_f32(state, want["state"], "state")


@pytest.mark.parametrize("T", [1, 9])
def test_fused_core_without_caches(emu, T):
    Hk, Hv, Dk, Dv = 2, 4, 16, 24
    inp = core_inputs(2, T, Hk, Hv, Dk, Dv, conv=False, state=False, seed=5)
    o, conv_state, state = run_core(inp, Hk, Hv, Dk, Dv)
    want = reference_core(inp, Hk, Hv, Dk, Dv)
    assert_close_f32(o, want["o"], "o")
    assert_close_f32(state, want["state"], "state")
    assert_exact(conv_state, want["conv_state"], "conv state")


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T", [1, 17])
def test_fused_core_half_precision_within_one_ulp(emu, dtype, T):
    Hk, Hv, Dk, Dv = 2, 4, 16, 24
    inp = core_inputs(2, T, Hk, Hv, Dk, Dv, dtype=dtype, seed=7)
    o, conv_state, state = run_core(inp, Hk, Hv, Dk, Dv)
    want = reference_core(inp, Hk, Hv, Dk, Dv)  # float64 from the same rounded inputs
    assert o.dtype == dtype and conv_state.dtype == dtype and state.dtype == mx.float32
    assert_within_ulp(o, want["o"], dtype, "o")
    assert_close_f32(state, want["state"], "state")
    assert_exact(conv_state, want["conv_state"], "conv state")


@pytest.mark.parametrize("T, caches", [(1, True), (4, True), (8, False)])
def test_per_token_states_and_conv_window(emu, T, caches):
    Hk, Hv, Dk, Dv = 1, 2, 32, 16
    inp = core_inputs(2, T, Hk, Hv, Dk, Dv, conv=caches, state=caches, seed=T)
    o, conv_state, state, states, window = run_core(inp, Hk, Hv, Dk, Dv, per_token=True)
    want = reference_core(inp, Hk, Hv, Dk, Dv)
    assert states.shape == (2, T, Hv, Dv, Dk) and window.shape == (2, 3 + T, inp["qkv"].shape[2])
    assert_close_f32(o, want["o"], "o")
    assert_close_f32(states, want["states"], "per-token states")
    assert_exact(window, want["u"], "conv window")
    assert_exact(conv_state, want["conv_state"], "conv state")
    np.testing.assert_array_equal(np.array(state), np.array(states[:, -1]))
    # rolling back to token a: the state after it and conv_window[:, a : a+K-1]
    a = max(1, T // 2)
    short = {k: v for k, v in inp.items()}
    short.update(qkv=inp["qkv"][:, :a], a=inp["a"][:, :a], b=inp["b"][:, :a])
    o_a, conv_a, state_a = run_core(short, Hk, Hv, Dk, Dv)
    np.testing.assert_array_equal(np.array(conv_a), np.array(window[:, a : a + 3]))
    assert_close_f32(state_a, np.array(states[:, a - 1], np.float64), "rolled-back state")


def test_stress_keys_repeat_with_slow_decay_and_saturated_beta(emu):
    # a -> -inf: softplus ~ 0, g ~ 1; b large: beta ~ 1; every token carries the same q/k
    Hk, Hv, Dk, Dv, T = 1, 2, 32, 16, 64
    inp = core_inputs(1, T, Hk, Hv, Dk, Dv, seed=11)
    qkv = np.array(inp["qkv"])
    qkv[:, :, : 2 * Dk] = qkv[:, :1, : 2 * Dk]
    inp.update(qkv=mx.array(qkv), a=mx.full((1, T, Hv), -30.0), b=mx.full((1, T, Hv), 12.0))
    o, _, state = run_core(inp, Hk, Hv, Dk, Dv)
    want = reference_core(inp, Hk, Hv, Dk, Dv)
    assert_close_f32(o, want["o"], "o")
    assert_close_f32(state, want["state"], "state")


# ----------------------------------------------------------------------------- recurrence only
def update_inputs(B, T, Hk, Hv, Dk, Dv, *, dtype=mx.float32, seed=0, state=True):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, Hk, Dk))
    k = rng.standard_normal((B, T, Hk, Dk))
    q = q / np.linalg.norm(q, axis=-1, keepdims=True) * Dk**-0.5
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    g = rng.uniform(0.0, 1.0, (B, T, Hv))
    g[..., 0] = 0.0  # fully decayed (underflow) and untouched heads
    g[..., -1] = 1.0
    return dict(
        q=mx.array(q.astype(np.float32)).astype(dtype),
        k=mx.array(k.astype(np.float32)).astype(dtype),
        v=mx.array(rng.standard_normal((B, T, Hv, Dv)).astype(np.float32)).astype(dtype),
        g=mx.array(g.astype(np.float32)),
        beta=mx.array(rng.uniform(0.0, 1.0, (B, T, Hv)).astype(np.float32)),
        state=mx.array((0.3 * rng.standard_normal((B, Hv, Dv, Dk))).astype(np.float32))
        if state
        else None,
    )


@pytest.mark.parametrize("T", [1, 3, 17, 64])
@pytest.mark.parametrize("shape", [(1, 3, 32, 16), (2, 2, 16, 48)], ids=["r3", "r1"])
def test_recurrence_kernel_matches_reference(emu, T, shape):
    Hk, Hv, Dk, Dv = shape
    inp = update_inputs(2, T, Hk, Hv, Dk, Dv, seed=T, state=T != 3)
    y, state = metal.gated_delta_update(**inp)
    want_y, want_state = ref.recurrence(
        *(f64(inp[k]) for k in ("q", "k", "v", "g", "beta")), f64(inp["state"])
    )
    assert_close_f32(y, want_y, "y")
    assert_close_f32(state, want_state, "state")


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
def test_recurrence_kernel_half_precision(emu, dtype):
    inp = update_inputs(2, 17, 1, 2, 32, 16, dtype=dtype, seed=3)
    y, state = metal.gated_delta_update(**inp)
    want_y, want_state = ref.recurrence(
        *(f64(inp[k]) for k in ("q", "k", "v", "g", "beta")), f64(inp["state"])
    )
    assert y.dtype == dtype
    assert_within_ulp(y, want_y, dtype, "y")
    assert_close_f32(state, want_state, "state")


def test_matches_the_portable_reference_backend(emu):
    from mlx_qwen35.model.gated_delta import gated_delta_core, gated_delta_update

    Hk, Hv, Dk, Dv = 1, 3, 32, 16
    inp = core_inputs(2, 17, Hk, Hv, Dk, Dv, seed=4)
    ours = run_core(inp, Hk, Hv, Dk, Dv)
    ops = gated_delta_core(
        **inp, num_k_heads=Hk, num_v_heads=Hv, head_k_dim=Dk, head_v_dim=Dv, backend="ops"
    )
    for a, b in zip(ours, ops, strict=True):
        assert_close_f32(a, np.array(b, np.float64), "vs ops backend")
    upd = update_inputs(2, 17, Hk, Hv, Dk, Dv, seed=4)
    for a, b in zip(
        metal.gated_delta_update(**upd), gated_delta_update(**upd, backend="ops"), strict=True
    ):
        assert_close_f32(a, np.array(b, np.float64), "vs ops backend")


# ----------------------------------------------------------------------------- dispatch
def test_dispatch_parameters(emu):
    Hk, Hv, Dk, Dv = 2, 6, 24, 48
    run_core(core_inputs(2, 1, Hk, Hv, Dk, Dv), Hk, Hv, Dk, Dv)
    run_core(core_inputs(2, 20, Hk, Hv, Dk, Dv, conv=False, state=False), Hk, Hv, Dk, Dv)
    run_core(core_inputs(1, 3, Hk, Hv, Dk, Dv), Hk, Hv, Dk, Dv, per_token=True)
    metal.gated_delta_update(**update_inputs(1, 5, 1, 1, 256, 12))
    decode, prefill, spec, update = emu.calls
    for call, B in ((decode, 2), (prefill, 2), (spec, 1)):
        assert call.name == "gdn_fused"
        assert call.grid == (32, Dv // 8, B * Hv) and call.threadgroup == (32, 4, 1)
    tmpl = [dict(c.template) for c in emu.calls]
    assert tmpl[0] == dict(
        OutT=mx.float32,
        Dk=Dk,
        Dv=Dv,
        Hk=Hk,
        Hv=Hv,
        K=4,
        LPR=4,
        NSG=4,
        TB=1,
        HasConv=True,
        HasState=True,
        PerTok=False,
        Window=False,
    )
    assert (tmpl[1]["TB"], tmpl[1]["HasConv"], tmpl[1]["HasState"]) == (8, False, False)
    assert (tmpl[2]["PerTok"], tmpl[2]["Window"]) == (True, True)
    assert spec.output_shapes[1:] == [
        (1, 3 + 3, 2 * Hk * Dk + Hv * Dv),
        (1, Hv, Dv, Dk),
        (1, 3, Hv, Dv, Dk),
    ]
    # Dk > 128: eight lanes per row, four rows per SIMD group
    assert update.name == "gdn_recurrent" and update.grid == (32, 12 // 4, 1)
    assert dict(update.template)["LPR"] == 8


def test_eligibility_rule(monkeypatch):
    ok = dict(T=1, dtype=mx.bfloat16, head_k_dim=128, head_v_dim=128, per_token_states=False)
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    assert not metal.is_eligible(**ok)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert metal.is_eligible(**ok)
    assert metal.is_eligible(**{**ok, "T": metal.MAX_FUSED_T})
    assert not metal.is_eligible(**{**ok, "T": metal.MAX_FUSED_T + 1})
    assert metal.supports(**{**ok, "T": 4096})  # the kernel itself takes any T
    assert metal.is_eligible(**{**ok, "T": 8, "per_token_states": True})
    assert not metal.is_eligible(**{**ok, "T": 9, "per_token_states": True})
    for dk, dv, good in [
        (16, 24, True),
        (24, 16, True),
        (4, 8, True),
        (130, 128, False),
        (132, 128, False),
        (136, 12, True),
        (256, 4, True),
        (264, 8, False),
        (64, 12, False),
        (2, 8, False),
    ]:
        assert metal.is_eligible(**{**ok, "head_k_dim": dk, "head_v_dim": dv}) is good, (dk, dv)
    assert not metal.is_eligible(**{**ok, "dtype": mx.int32})
    with pytest.raises(ValueError, match="do not support"):
        metal.gated_delta_update(**update_inputs(1, 2, 1, 1, 64, 12))


def test_kernels_are_built_lazily_once_per_factory(monkeypatch):
    def refuse(**kwargs):
        raise AssertionError("kernel built at import time")

    monkeypatch.setattr(mx.fast, "metal_kernel", refuse)
    importlib.reload(metal)  # importing builds nothing
    emulate_metal(monkeypatch)
    installed = mx.fast.metal_kernel
    built = []
    monkeypatch.setattr(
        mx.fast, "metal_kernel", lambda **kw: built.append(kw["name"]) or installed(**kw)
    )
    inp = core_inputs(1, 1, 1, 1, 16, 8)
    run_core(inp, 1, 1, 16, 8)
    run_core(inp, 1, 1, 16, 8)
    metal.gated_delta_update(**update_inputs(1, 1, 1, 1, 16, 8))
    assert built == ["gdn_fused", "gdn_recurrent"]


def test_default_dispatch_routes_short_calls_to_metal(emu):
    from mlx_qwen35.model.gated_delta import gated_delta_core

    Hk, Hv, Dk, Dv = 1, 2, 16, 8
    for T in (1, metal.MAX_FUSED_T, metal.MAX_FUSED_T + 1):
        gated_delta_core(
            **core_inputs(1, T, Hk, Hv, Dk, Dv),
            num_k_heads=Hk,
            num_v_heads=Hv,
            head_k_dim=Dk,
            head_v_dim=Dv,
        )
    assert [c.input_shapes[0][1] for c in emu.calls] == [1, metal.MAX_FUSED_T]


# ----------------------------------------------------------------------------- MLX's own text
def test_kernel_text_equals_what_mlx_compiles(monkeypatch):
    """Trace the production calls through MLX's real metal_kernel (export works without Metal,
    wrapped by the Recorder that MLX_QWEN35_METAL_EMU=0 uses), then run them emulated: MLX's
    text, grid and threadgroup are exactly what the emulator generated and ran."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    Hk, Hv, Dk, Dv = 1, 2, 32, 16
    core = core_inputs(2, 3, Hk, Hv, Dk, Dv, dtype=mx.bfloat16, conv=False)
    upd = update_inputs(1, 1, Hk, Hv, Dk, Dv, dtype=mx.float16)
    names = ["qkv", "a", "b", "conv_weight", "A_log", "dt_bias", "state"]

    def fused(*arrays):
        kw = dict(zip(names, arrays, strict=True), conv_state=None)
        return run_core(kw, Hk, Hv, Dk, Dv, per_token=True)

    def update(q, k, v, g, beta, state):
        return metal.gated_delta_update(q, k, v, g, beta, state)

    recorder = Recorder()
    monkeypatch.setattr(mx.fast, "metal_kernel", recorder.metal_kernel)
    traced = []
    for fn, arrays in ((fused, [core[n] for n in names]), (update, list(upd.values()))):
        got: list[dict] = []
        mx.export_function(got.append, fn, *arrays)
        traced += [d["arguments"] for d in got if d.get("name") == "CustomKernel"]
    emu = emulate_metal(monkeypatch)
    fused(*[core[n] for n in names])
    update(*upd.values())
    assert len(traced) == len(recorder.calls) == len(emu.calls) == 2
    for args, rec, call in zip(traced, recorder.calls, emu.calls, strict=True):
        assert args[0] == rec.kernel_name == call.kernel_name
        assert args[1] == rec.text == call.text
        assert tuple(args[2:5]) == call.grid and tuple(args[5:8]) == call.threadgroup


def test_host_copies_keep_bfloat16_bits():
    x = mx.array([1.0, -2.5, 3.140625]).astype(mx.bfloat16)
    assert to_numpy(x).dtype == np.uint16
