"""The Metal kernels stay inside the subset the emulator supports (metal_emu/lint.py)."""

from __future__ import annotations

import re

import pytest
from metal_emu import lint
from metal_emu.build import PRELUDE

from mlx_qwen35.model.gated_delta import metal


@pytest.mark.parametrize("name", list(metal.KERNELS))
def test_production_kernels_are_inside_the_subset(name):
    spec = metal.KERNELS[name]
    assert lint.lint(spec["source"], spec["header"]) == []


@pytest.mark.parametrize(
    "source, header, finding",
    [
        ("float4 v = x[0];", "", "vector"),
        ("float v = x[0].xy;", "", "swizzle"),
        ("double d = 1.0;", "", "double"),
        ("texture2d<float> t;", "", "texture"),
        ("simdgroup_float8x8 m;", "", "simdgroup matrices"),
        ("float v = quad_sum(1.0f);", "", "quad"),
        ("threadgroup float* p = buf;", "", "threadgroup only as"),
        ("threadgroup float2 buf[4];", "", "vector"),
        ("const device float* p = x;", "", "address space"),
        ("float v = exp(x[0]);", "", "metal::exp"),
        ("float v = metal::log1p(x[0]);", "", "log1p"),
        ("float v = simd_reduce(x[0]);", "", "not an emulated SIMD"),
        ("auto f = [](float v) { return v; };", "", "lambda"),
        ("if constexpr (N > 1) { y[0] = 1; }", "", "if constexpr"),
        ("atomic_fetch_add_explicit(y, 1, memory_order_relaxed);", "", "atomic"),
        ("uint n = threads_per_threadgroup.x;", "", "threads_per_threadgroup"),
        ("y[0] = 1;", "#include <metal_stdlib>\n", "preprocessor"),
        ("y[0] = 1;", "inline float f(float x) { return f(x - 1.0f); }\n", "recursive"),
        ("y[0] = 1;", "inline float f(const constant float* p) { return p[0]; }\n", "pointer"),
    ],
)
def test_lint_flags_constructs_outside_the_subset(source, header, finding):
    problems = lint.lint(source, header)
    assert any(finding in p for p in problems), problems


def test_everything_the_lint_allows_is_emulated():
    prelude = PRELUDE.read_text()
    namespace = prelude[prelude.index("namespace metal {") : prelude.index("}  // namespace metal")]
    defined_math = set(re.findall(r"inline \w+ (\w+)\(", namespace))
    assert lint.MATH <= defined_math
    defined_simd = set(re.findall(r"inline \w+ (simd\w+)\(", prelude))
    assert lint.SIMD <= defined_simd
