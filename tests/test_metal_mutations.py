"""Planted bugs in the production Metal kernels must make the emulated checks fail.

Each mutation edits the kernel source text of mlx_qwen35/gated_delta/metal.py (the edited text
must occur, so refactors cannot silently turn a mutation into a no-op), rebuilds the kernels
through the emulator, and runs probes that cover decode (T = 1), multi-block prefill (T = 17 > TB),
GQA (Hv = 2 Hk with Hk > 1), a partial threadgroup (Dv / 8 = 6 SIMD groups of rows -> 4 + 2) and
per-token states. A mutation is caught when a probe raises EmulationError (divergence, race,
out-of-bounds, poison) or misses the float64 reference.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import test_metal_gated_delta as t
from metal_emu import (
    EmulationError,
    emulate_metal,
    skip_on_real_metal,
    skip_unless_kernels_can_run,
)
from metal_emu import gdn_reference as ref

from mlx_qwen35.model.gated_delta import metal

skip_on_real_metal()  # tests what the emulator detects
skip_unless_kernels_can_run()

SHAPE = (2, 4, 16, 48)  # Hk, Hv, Dk, Dv

MUTATIONS = {
    "wrong shuffle offset": (
        "kd += simd_shuffle_xor(kd, ushort(o));",
        "kd += simd_shuffle_xor(kd, ushort(2 * o));",
    ),
    "dropped butterfly level": (
        "      for (int o = LPR / 2; o > 0; o /= 2) {\n        out += simd_shuffle_xor",
        "      for (int o = LPR / 4; o > 0; o /= 2) {\n        out += simd_shuffle_xor",
    ),
    "wrong head index (tiling instead of repeat-interleave)": (
        "const int hk = hv / R;",
        "const int hk = hv % Hk;",
    ),
    "off-by-one output store": ("y[yi] = ", "y[yi + 1] = "),
    "off-by-one state store": (
        "state_out[(n * Dv + dv) * Dk + sub + i * LPR] = s[i];",
        "state_out[(n * Dv + dv) * Dk + sub + i * LPR + 1] = s[i];",
    ),
    "SIMD op under a branch (norm)": (
        "sq = simd_sum(sq);",
        "if (lane < Dk) { sq = simd_sum(sq); }",
    ),
    "SIMD op under a branch (row sum)": (
        "kd += simd_shuffle_xor(kd, ushort(o));",
        "if (sub == 0) { kd += simd_shuffle_xor(kd, ushort(o)); }",
    ),
    "missing barrier after the token preparation": (
        "\n    threadgroup_barrier(mem_flags::mem_threadgroup);\n"
        "    for (int tt = 0; tt < nt; ++tt)",
        "\n    for (int tt = 0; tt < nt; ++tt)",
    ),
    "missing barrier before the next block": (
        "    }\n    threadgroup_barrier(mem_flags::mem_threadgroup);\n  }\n",
        "    }\n  }\n",
    ),
    "partial threadgroup counted as full": (
        "const int nsg = metal::min(NSG, Dv / RPS - tgy * NSG);",
        "const int nsg = NSG;",
    ),
    "conv taps reversed": (
        "acc += static_cast<float>(conv_w[c * K + j]) * x;",
        "acc += static_cast<float>(conv_w[c * K + (K - 1 - j)]) * x;",
    ),
    "per-token state stored at the wrong token": (
        "states_pt[yi * Dk + sub + i * LPR] = s[i];",
        "states_pt[(yi % (Hv * Dv)) * Dk + sub + i * LPR] = s[i];",
    ),
}


def mutated_kernels(old: str, new: str) -> dict:
    kernels = copy.deepcopy(metal.KERNELS)
    hits = 0
    for spec in kernels.values():
        hits += spec["source"].count(old)
        spec["source"] = spec["source"].replace(old, new)
    assert hits, f"mutation target not found in the kernel sources: {old!r}"
    return kernels


def probes() -> None:
    """Raise AssertionError or EmulationError when the kernels are wrong."""
    Hk, Hv, Dk, Dv = SHAPE
    for T in (1, 17):
        inp = t.core_inputs(2, T, Hk, Hv, Dk, Dv, seed=T)
        o, conv_state, state = t.run_core(inp, Hk, Hv, Dk, Dv)
        want = t.reference_core(inp, Hk, Hv, Dk, Dv)
        t.assert_close_f32(o, want["o"], "o")
        t.assert_close_f32(state, want["state"], "state")
        t.assert_exact(conv_state, want["conv_state"], "conv state")
    inp = t.core_inputs(1, 5, Hk, Hv, Dk, Dv, seed=2)
    outs = t.run_core(inp, Hk, Hv, Dk, Dv, per_token=True)
    t.assert_close_f32(outs[3], t.reference_core(inp, Hk, Hv, Dk, Dv)["states"], "states")
    upd = t.update_inputs(2, 17, Hk, Hv, Dk, Dv, seed=1)
    y, state = metal.gated_delta_update(**upd)
    want_y, want_state = ref.recurrence(
        *(t.f64(upd[k]) for k in ("q", "k", "v", "g", "beta")), t.f64(upd["state"])
    )
    t.assert_close_f32(y, want_y, "y")
    t.assert_close_f32(state, want_state, "state")


def test_unmutated_kernels_pass_the_probes(monkeypatch):
    emulate_metal(monkeypatch)
    probes()


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_planted_bug_is_caught(monkeypatch, name):
    old, new = MUTATIONS[name]
    monkeypatch.setattr(metal, "KERNELS", mutated_kernels(old, new))
    emulate_metal(monkeypatch)
    with pytest.raises((AssertionError, EmulationError)) as err:
        probes()
    assert "mutation target" not in str(err.value)
    print(f"{name}: {type(err.value).__name__}: {str(err.value).splitlines()[0][:160]}")


def test_probe_shape_has_partial_threadgroups_and_gqa():
    Hk, Hv, Dk, Dv = SHAPE
    rows_per_simdgroup = 32 // metal.lanes_per_row(Dk)
    assert (Dv // rows_per_simdgroup) % metal.NSG != 0 and Hv // Hk > 1 and Hk > 1
    assert 17 > metal.PREFILL_TB and np.ceil(17 / metal.PREFILL_TB) >= 2
