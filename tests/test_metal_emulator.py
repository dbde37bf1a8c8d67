"""The Metal emulation harness (tests/metal_emu) itself: MLX's exact kernel text, SIMD-group and
barrier semantics, dispatch geometry, poisoning, guards and the error reports."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from metal_emu import (
    EmulationError,
    Emulator,
    build,
    skip_on_real_metal,
    skip_unless_kernels_can_run,
)

skip_on_real_metal()
skip_unless_kernels_can_run()


def traced_kernels(fn, *arrays) -> list[list]:
    """MLX's own CustomKernel records (name, text, grid..., ) from an export trace."""
    got: list[dict] = []
    mx.export_function(got.append, fn, *arrays)
    return [d["arguments"] for d in got if d.get("name") == "CustomKernel"]


def run(
    source,
    inputs,
    out_shape,
    *,
    out_dtype=mx.float32,
    grid,
    tg,
    header="",
    template=None,
    init_value=None,
    emu=None,
    names=None,
):
    emu = emu or Emulator()
    names = names or [f"in{i}" for i in range(len(inputs))]
    kernel = emu.metal_kernel("t", names, ["out"], source, header=header)
    return kernel(
        inputs=inputs,
        output_shapes=[out_shape],
        output_dtypes=[out_dtype],
        grid=grid,
        threadgroup=tg,
        template=template,
        init_value=init_value,
    )[0]


# ----------------------------------------------------------------------------- MLX's text
SPEC_FULL = dict(
    name="full",
    input_names=["a", "b", "T", "c"],
    output_names=["out", "o2"],
    source="""
  uint i = thread_position_in_grid.x;
  out[i] = a[i] * static_cast<float>(b[0]) + T + a_shape[0] + c_strides[0] + c_ndim;
  o2[i] = static_cast<OutT>(simd_sum(1.0f) + dispatch_threads_per_threadgroup.x);
""",
    header="inline float twice(float x) { return 2.0f * x; }\n",
)


def test_generated_text_equals_mlx_trace(capfd):
    a = mx.ones((8,))
    b = mx.ones((2,), mx.float16)  # < 8 elements: `constant`
    c = mx.ones((2, 5), mx.bfloat16)
    call = dict(
        template=[("OutT", mx.float16), ("N", 4), ("flag", True), ("off", False)],
        grid=(8, 1, 1),
        threadgroup=(4, 1, 1),
        output_shapes=[(8,), (8,)],
        output_dtypes=[mx.float32, mx.float16],
        verbose=True,
    )
    real = mx.fast.metal_kernel(**SPEC_FULL)
    [traced] = traced_kernels(lambda a, b, c: real(inputs=[a, b, 3, c], **call), a, b, c)
    mlx_printed = capfd.readouterr().out
    emulated = Emulator().metal_kernel(**SPEC_FULL)
    gen = emulated.generate([a, b, 3, c], call["output_dtypes"], call["template"])
    assert (gen.kernel_name, gen.text) == (traced[0], traced[1])
    # the emulator prints what MLX prints with verbose=True, and runs the text
    outs = emulated(inputs=[a, b, 3, c], **call)
    assert capfd.readouterr().out == mlx_printed
    assert np.array(outs[0]).tolist() == [1 + 3 + 8 + 5 + 2] * 8
    assert np.array(outs[1]).tolist() == [4 + 4] * 8  # simd_sum over a 4-thread group + its width


@pytest.mark.parametrize(
    "spec, inputs, outs, atomic",
    [
        # no template, no attributes, one output: the signature closes after the output
        (
            dict(input_names=["x"], output_names=["y"], source="y[0] = x[0];"),
            ["f32x16"],
            [mx.float32],
            False,
        ),
        # MLX's quirk: shape buffers shift the index it compares, closing the signature early
        (
            dict(input_names=["x"], output_names=["y", "z"], source="y[0] = x_shape[0];"),
            ["f32x16"],
            [mx.float32, mx.int32],
            False,
        ),
        # scalar float/bool inputs, atomic outputs, a quirky attribute substring
        (
            dict(
                input_names=["s", "f", "x"],
                output_names=["y"],
                source="uint g = grid_size.x + thread_index_in_quadgroup; y[0] = s * f;",
            ),
            [1.5, True, "i32x3"],
            [mx.float32],
            True,
        ),
    ],
)
def test_generated_text_equals_mlx_trace_edge_cases(spec, inputs, outs, atomic):
    arrays = {"f32x16": mx.ones((16,)), "i32x3": mx.ones((3,), mx.int32)}
    values = [arrays.get(x, x) if isinstance(x, str) else x for x in inputs]
    real = mx.fast.metal_kernel(name="edge", atomic_outputs=atomic, **spec)
    array_args = [v for v in values if isinstance(v, mx.array)]

    def fn(*arrs):
        it = iter(arrs)
        ins = [next(it) if isinstance(v, mx.array) else v for v in values]
        return real(
            inputs=ins,
            grid=(1, 1, 1),
            threadgroup=(1, 1, 1),
            output_shapes=[(1,)] * len(outs),
            output_dtypes=outs,
        )

    [traced] = traced_kernels(fn, *array_args)
    gen = (
        Emulator()
        .metal_kernel(name="edge", atomic_outputs=atomic, **spec)
        .generate(values, outs, None)
    )
    assert (gen.kernel_name, gen.text) == (traced[0], traced[1])


# ----------------------------------------------------------------------------- SIMD semantics
SIMD_OPS = """
  uint i = thread_position_in_grid.x;
  uint lane = thread_index_in_simdgroup;
  float x = in0[i];
  out[i * 11 + 0] = simd_sum(x);
  out[i * 11 + 1] = simd_max(x);
  out[i * 11 + 2] = simd_min(x);
  out[i * 11 + 3] = simd_shuffle_xor(x, ushort(M));
  out[i * 11 + 4] = simd_shuffle_down(x, ushort(3));
  out[i * 11 + 5] = simd_shuffle_up(x, ushort(3));
  out[i * 11 + 6] = simd_broadcast(x, ushort(5));
  out[i * 11 + 7] = simd_prefix_exclusive_sum(x);
  out[i * 11 + 8] = simd_prefix_inclusive_sum(x);
  out[i * 11 + 9] = simd_shuffle(x, ushort(31 - lane));
  out[i * 11 + 10] = simd_all(x > -100.0f) + 2 * simd_any(x > 30.0f);
"""


def simd_expected(x: np.ndarray, mask: int) -> np.ndarray:
    out = np.zeros((x.size, 11), np.float32)
    for g0 in range(0, x.size, 32):
        v = x[g0 : g0 + 32]
        lanes = np.arange(32)
        down = np.where(lanes + 3 < 32, v[np.minimum(lanes + 3, 31)], v)
        up = np.where(lanes >= 3, v[np.maximum(lanes - 3, 0)], v)
        cs = np.cumsum(v)
        out[g0 : g0 + 32] = np.stack(
            [
                np.full(32, v.sum()),
                np.full(32, v.max()),
                np.full(32, v.min()),
                v[lanes ^ mask],
                down,
                up,
                np.full(32, v[5]),
                cs - v,
                cs,
                v[31 - lanes],
                np.full(32, 1 + 2 * float((v > 30).any())),
            ],
            axis=1,
        )
    return out.reshape(-1)


@pytest.mark.parametrize("mask", [1, 6, 16])
def test_simd_group_functions(mask):
    x = np.random.default_rng(mask).integers(-20, 40, 64).astype(np.float32)
    got = run(
        SIMD_OPS, [mx.array(x)], (64 * 11,), grid=(64, 1, 1), tg=(64, 1, 1), template=[("M", mask)]
    )
    np.testing.assert_array_equal(np.array(got), simd_expected(x, mask))


def test_partial_simd_group_and_reads_outside_it():
    src = "out[thread_position_in_grid.x] = simd_sum(in0[thread_position_in_grid.x]);"
    x = np.arange(48, dtype=np.float32)
    got = np.array(run(src, [mx.array(x)], (48,), grid=(48, 1, 1), tg=(48, 1, 1)))
    np.testing.assert_array_equal(got, np.r_[np.full(32, x[:32].sum()), np.full(16, x[32:].sum())])
    bad = "out[thread_position_in_grid.x] = simd_shuffle_xor(in0[thread_position_in_grid.x], 16);"
    with pytest.raises(EmulationError, match="outside the SIMD group"):
        run(bad, [mx.array(x)], (48,), grid=(48, 1, 1), tg=(48, 1, 1))


ATTRS = """
  uint3 g = thread_position_in_grid;
  uint k = (g.y * 40 + g.x) * 9;
  out[k + 0] = threadgroup_position_in_grid.x;
  out[k + 1] = threadgroup_position_in_grid.y;
  out[k + 2] = thread_position_in_threadgroup.x;
  out[k + 3] = thread_position_in_threadgroup.y;
  out[k + 4] = thread_index_in_threadgroup;
  out[k + 5] = simdgroup_index_in_threadgroup;
  out[k + 6] = thread_index_in_simdgroup;
  out[k + 7] = threads_per_threadgroup.x * 100 + threads_per_threadgroup.y;
  out[k + 8] = threadgroups_per_grid.x * 100 + threadgroups_per_grid.y;
"""


def test_dispatch_geometry_partial_threadgroups():
    # grid (40, 3) threads in (32, 2) threadgroups: edge threadgroups of 8 columns / 1 row
    got = np.array(
        run(ATTRS, [], (40 * 3 * 9,), out_dtype=mx.int32, grid=(40, 3, 1), tg=(32, 2, 1))
    ).reshape(3, 40, 9)
    for y in range(3):
        for x in range(40):
            tx, ty = x // 32, y // 2
            w, h = min(32, 40 - 32 * tx), min(2, 3 - 2 * ty)
            lx, ly = x % 32, y % 2
            lin = lx + ly * w
            want = [tx, ty, lx, ly, lin, lin // 32, lin % 32, w * 100 + h, 2 * 100 + 2]
            assert got[y, x].tolist() == want, (x, y)


def test_threadgroup_clamped_to_grid_and_size_limit():
    got = np.array(
        run(
            "out[thread_position_in_grid.x] = threads_per_threadgroup.x;",
            [],
            (8,),
            out_dtype=mx.int32,
            grid=(8, 1, 1),
            tg=(32, 1, 1),
        )
    )
    assert got.tolist() == [8] * 8
    with pytest.raises(EmulationError, match="1..1024"):
        run("out[0] = 1;", [], (1,), grid=(2048, 1, 1), tg=(2048, 1, 1))


# ----------------------------------------------------------------------------- poison and init
def test_unwritten_outputs_are_nan_unless_init_value():
    src = "uint i = thread_position_in_grid.x; if (i % 2 == 0) { out[i] = 1.0f; }"
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        got = np.array(
            run(src, [], (8,), out_dtype=dtype, grid=(8, 1, 1), tg=(8, 1, 1)).astype(mx.float32)
        )
        assert np.all(got[::2] == 1) and np.all(np.isnan(got[1::2]))
    got = np.array(run(src, [], (8,), grid=(8, 1, 1), tg=(8, 1, 1), init_value=2.5))
    assert got.tolist() == [1, 2.5] * 4


def test_threadgroup_memory_is_poisoned_for_every_threadgroup():
    src = """
  threadgroup float buf[32];
  uint i = thread_index_in_threadgroup;
  if (threadgroup_position_in_grid.x == 0) { buf[i] = 7.0f; }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[thread_position_in_grid.x] = buf[i];
"""
    got = np.array(run(src, [], (64,), grid=(64, 1, 1), tg=(32, 1, 1)))
    assert np.all(got[:32] == 7) and np.all(np.isnan(got[32:]))


# ----------------------------------------------------------------------------- divergence
@pytest.mark.parametrize(
    "body, message",
    [
        ("float v = 1.0f; if (lane < 16) { v = simd_sum(v); }", "returned|divergent"),
        (
            "float v = 1.0f; if (lane < 16) { v = simd_sum(v); } else { v = simd_max(v); }",
            "divergent SIMD-group operation",
        ),
        (
            "float v = 1.0f; for (uint j = 0; j < lane % 2 + 1; ++j) { v = simd_sum(v); }",
            "divergent",
        ),
        ("float v = 1.0f; if (lane == 3) { return; } v = simd_shuffle_xor(v, 1);", "returned"),
        (
            "float v = 1.0f; if (thread_index_in_threadgroup < 32) "
            "{ threadgroup_barrier(mem_flags::mem_threadgroup); }",
            "threadgroup_barrier",
        ),
    ],
)
def test_divergent_simd_operations_and_barriers_are_reported(body, message):
    src = f"""
  uint lane = thread_index_in_simdgroup;
  {body}
  out[thread_position_in_grid.x] = v;
"""
    with pytest.raises(EmulationError, match=message) as err:
        run(src, [], (64,), grid=(64, 1, 1), tg=(64, 1, 1))
    assert "source line 3" in str(err.value)  # the report points at the offending line


def test_uniform_branches_around_simd_operations_are_fine():
    src = """
  float v = 1.0f;
  if (simdgroup_index_in_threadgroup == 1) { v = simd_sum(v); }
  out[thread_position_in_grid.x] = v;
"""
    got = np.array(run(src, [], (64,), grid=(64, 1, 1), tg=(64, 1, 1)))
    assert got.tolist() == [1.0] * 32 + [32.0] * 32


@pytest.mark.parametrize("barrier", [True, False])
def test_missing_threadgroup_barrier_is_caught(barrier):
    src = f"""
  threadgroup float buf[64];
  uint i = thread_index_in_threadgroup;
  buf[i] = float(i);
  {"threadgroup_barrier(mem_flags::mem_threadgroup);" if barrier else ""}
  out[i] = buf[(i + 32) % 64];
"""
    if barrier:
        got = np.array(run(src, [], (64,), grid=(64, 1, 1), tg=(64, 1, 1)))
        assert got.tolist() == [float((i + 32) % 64) for i in range(64)]
    else:
        with pytest.raises(EmulationError, match="data race"):
            run(src, [], (64,), grid=(64, 1, 1), tg=(64, 1, 1))


def test_lanes_sharing_threadgroup_memory_without_a_barrier_race():
    src = """
  threadgroup float buf[32];
  uint i = thread_index_in_threadgroup;
  buf[i] = float(i);
  out[i] = buf[i ^ 1];
"""
    with pytest.raises(EmulationError, match="data race"):
        run(src, [], (32,), grid=(32, 1, 1), tg=(32, 1, 1))


# ----------------------------------------------------------------------------- guards
@pytest.mark.parametrize(
    "stmt, message",
    [
        ("out[i + 1] = 1.0f;", "output 'out': byte 0 past its end"),
        ("out[int(i) - 1] = 1.0f;", "before its start"),
        ("out[i] = in0[i + 64];", "input 'in0'"),
        ("threadgroup float buf[64]; buf[i + 1] = 1.0f; out[i] = 0.0f;", "threadgroup array 'buf'"),
        ("threadgroup float big[9000]; big[i] = 1.0f; out[i] = 0.0f;", "32 KiB"),
        ("int z = int(i) / (int(i) - int(i)); out[i] = float(z);", "arithmetic exception"),
    ],
)
def test_out_of_bounds_and_faults_are_reported(stmt, message):
    src = f"uint i = thread_position_in_grid.x;\n  {stmt}"
    with pytest.raises(EmulationError, match=message):
        run(src, [mx.zeros((64,))], (64,), grid=(64, 1, 1), tg=(64, 1, 1))


def test_endless_kernel_is_stopped_by_the_watchdog():
    # the store keeps the loop observable (a side-effect-free endless loop is undefined in C++)
    src = "uint i = 0; while (in0[0] < 1.0f) { out[0] = float(i); i = i * 3 + 1; }"
    with pytest.raises(EmulationError, match="endless loop"):
        run(src, [mx.zeros((1,))], (1,), grid=(1, 1, 1), tg=(1, 1, 1), emu=Emulator(timeout_s=0.5))


# ----------------------------------------------------------------------------- numerics, build
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_and_bfloat_conversions_round_like_mlx(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * np.exp(rng.uniform(-10, 10, 4096))).astype(np.float32)
    x[:4] = [np.inf, -np.inf, np.nan, 0.0]
    src = "uint i = thread_position_in_grid.x; out[i] = static_cast<OutT>(in0[i]);"
    got = run(
        src,
        [mx.array(x)],
        (4096,),
        out_dtype=dtype,
        grid=(4096, 1, 1),
        tg=(256, 1, 1),
        template=[("OutT", dtype)],
    )
    want = mx.array(x).astype(dtype)
    bits, want_bits = np.array(got.view(mx.uint16)), np.array(want.view(mx.uint16))
    nan = np.isnan(np.array(want.astype(mx.float32)))
    assert np.isnan(np.array(got.astype(mx.float32)))[nan].all()  # NaN payloads may differ
    np.testing.assert_array_equal(bits[~nan], want_bits[~nan])
    back = run(
        "uint i = thread_position_in_grid.x; out[i] = static_cast<float>(in0[i]) * 2.0f;",
        [want],
        (4096,),
        grid=(4096, 1, 1),
        tg=(256, 1, 1),
    )
    np.testing.assert_array_equal(np.array(back), np.array(want.astype(mx.float32)) * 2)


def test_random_schedule_and_compiled_kernels_are_cached(monkeypatch):
    src = "out[thread_position_in_grid.x] = simd_prefix_inclusive_sum(1.0f);"
    header = f"// {uuid.uuid4()}\n"  # a text nobody compiled before
    calls = []
    real = subprocess.run
    monkeypatch.setattr(
        build.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real(cmd, **kw)
    )
    emu = Emulator(schedules=("random",), seed=3)
    first = run(src, [], (64,), grid=(64, 1, 1), tg=(64, 1, 1), header=header, emu=emu)
    compiles = [c for c in calls if "-o" in c]
    again = run(src, [], (64,), grid=(64, 1, 1), tg=(64, 1, 1), header=header, emu=emu)
    assert len(compiles) == 1 and len([c for c in calls if "-o" in c]) == 1
    assert np.array(first).tolist() == np.array(again).tolist() == list(range(1, 33)) * 2


def test_ucontext_fibers_match_the_assembly_switch():
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import numpy as np, mlx.core as mx\n"
        "from metal_emu import Emulator, build\n"
        "import test_metal_emulator as t\n"
        "assert build.runtime().mtlemu_uses_ucontext() == 1\n"
        "x = np.arange(64, dtype=np.float32)\n"
        "got = t.run(t.SIMD_OPS, [mx.array(x)], (704,), grid=(64, 1, 1), tg=(64, 1, 1),"
        " template=[('M', 6)])\n"
        "np.testing.assert_array_equal(np.array(got), t.simd_expected(x, 6))\n"
    )
    env = dict(os.environ, MTLEMU_UCONTEXT="1")
    here = str(Path(__file__).parent)
    res = subprocess.run(
        [sys.executable, "-c", script, here], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
