"""Checkpoints written by `mlx_lm.convert` load in our runtime: unquantized ones give the HF
reference's logits, `-q` ones give the same logits as mlx-lm's own model on that checkpoint."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import build_hf_model, hf_logits, save_hf_checkpoint
from test_convert import add_tokenizer

from mlx_qwen35.model.config import load_config
from mlx_qwen35.weights.loading import checkpoint_layout, load_model, read_weights

mlx_lm_convert = pytest.importorskip("mlx_lm.convert").convert
mlx_lm_load = pytest.importorskip("mlx_lm").load

# mlx-lm builds its layer pattern from full_attention_interval: use the shipped one.
LAYERS = ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"]
IDS = np.random.RandomState(1).randint(0, 300, size=(2, 21))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx_lm")
    hf = build_hf_model("base", num_hidden_layers=len(LAYERS), layer_types=LAYERS, seed=5)
    path = save_hf_checkpoint(hf, root / "hf", keep_vision=False)
    add_tokenizer(path)
    return hf, path


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_plain_mlx_lm_conversion_matches_reference(source, tmp_path):
    hf, path = source
    out = tmp_path / "plain"
    mlx_lm_convert(str(path), str(out), dtype="float32")
    assert checkpoint_layout(read_weights(out), load_config(out)) == "mlx"
    ours = np.array(load_model(out)(mx.array(IDS)))
    assert rel_err(ours, hf_logits(hf, IDS)) < 1e-4


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_mlx_lm_conversion_matches_mlx_lm(source, tmp_path, bits):
    _, path = source
    out = tmp_path / f"q{bits}"
    mlx_lm_convert(
        str(path), str(out), quantize=True, q_bits=bits, q_group_size=32, dtype="float32"
    )
    ours_model = load_model(out)
    assert "scales" in dict(ours_model.layers[0].mlp.gate_proj.items())  # really quantized
    theirs_model, _ = mlx_lm_load(str(out))
    ours = np.array(ours_model(mx.array(IDS)))
    theirs = np.array(theirs_model(mx.array(IDS)))
    assert rel_err(ours, theirs) < 1e-4
