"""The whole model with the Metal gated-delta path forced (emulated) matches transformers.

MLX_QWEN35_GDN_BACKEND=metal makes every linear-attention layer call the Metal kernels (the
dispatch raises instead of falling back when it cannot), and the emulator stands in for the GPU.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import hf_logits
from metal_emu import emulate_metal, skip_unless_kernels_can_run

from mlx_qwen35.weights.loading import load_model

skip_unless_kernels_can_run()  # the emulator, or real Metal with MLX_QWEN35_METAL_EMU=0

TOL = 1e-4


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture
def metal_forced(monkeypatch):
    emu = emulate_metal(monkeypatch)
    monkeypatch.setenv("MLX_QWEN35_GDN_BACKEND", "metal")
    return emu


@pytest.mark.parametrize("variant", ["base", "hv3", "hv_eq_hk"])
def test_prefill_and_decode_with_metal_kernels_match_reference(
    hf_checkpoint, metal_forced, variant
):
    hf, path = hf_checkpoint(variant)
    model = load_model(path)
    ids = np.random.RandomState(1).randint(0, 300, size=(2, 24))
    ref = hf_logits(hf, ids)
    assert rel_err(np.array(model(mx.array(ids))), ref) < TOL
    cache = model.make_cache()
    pieces = [np.array(model(mx.array(ids[:, :17]), cache=cache))]
    for t in range(17, 24):
        pieces.append(np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)))
    assert rel_err(np.concatenate(pieces, axis=1), ref) < TOL
    n_linear = sum(lt == "linear_attention" for lt in hf.config.text_config.layer_types)
    calls = metal_forced.calls
    assert len(calls) == n_linear * (1 + 1 + 7) and {c.name for c in calls} == {"gdn_fused"}
    assert [dict(c.template)["TB"] for c in calls[-n_linear:]] == [1] * n_linear
