"""Loading the family's checkpoints: MoE experts in the original fused layout and per expert (HF),
MoE checkpoints written by `mlx_lm.convert` (plain and -q, made here) and by mlx-vlm, and a dense
fixture with the 27B's proportions."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hf_reference import (
    build_hf_model,
    build_hf_moe_model,
    fuse_experts,
    hf_logits,
    router_margin,
    save_hf_checkpoint,
)
from safetensors.numpy import load_file, save_file
from test_convert import add_tokenizer

from mlx_qwen35.errors import UserError
from mlx_qwen35.model.config import load_config
from mlx_qwen35.weights.loading import checkpoint_layout, load_model, read_weights

TOL = 1e-4
# mlx-lm builds its layer pattern from full_attention_interval: use the shipped one.
LAYERS = ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"]
IDS = np.random.RandomState(1).randint(0, 300, size=(2, 21))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny MoE checkpoint with its experts fused, as the original Hub checkpoints store them."""
    hf = build_hf_moe_model("moe", num_hidden_layers=len(LAYERS), layer_types=LAYERS, seed=5)
    assert router_margin(hf, IDS) > 1e-4
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp("moe") / "hf", keep_vision=False)
    fuse_experts(path)
    add_tokenizer(path)
    return hf, path


def test_fused_and_per_expert_layouts_load_the_same_model(source, hf_moe_checkpoint):
    hf, path = source
    keys = set(read_weights(path))
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in keys
    assert not any(".experts.0." in k for k in keys)
    ours = np.array(load_model(path)(mx.array(IDS)))
    assert rel_err(ours, hf_logits(hf, IDS)) < TOL
    # the same weights saved one tensor per expert
    hf2, per_expert = hf_moe_checkpoint("moe")
    assert any(".experts.7.down_proj.weight" in k for k in read_weights(per_expert))
    fused_dir = per_expert.parent / "fused-copy"
    fused_dir.mkdir(exist_ok=True)
    for f in per_expert.iterdir():
        (fused_dir / f.name).write_bytes(f.read_bytes())
    fuse_experts(fused_dir)
    a = np.array(load_model(per_expert)(mx.array(IDS)))
    b = np.array(load_model(fused_dir)(mx.array(IDS)))
    np.testing.assert_array_equal(a, b)


def test_missing_expert_is_named(hf_moe_checkpoint, tmp_path):
    _, path = hf_moe_checkpoint("moe")
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    shard = tmp_path / "model.safetensors"
    tensors = load_file(shard)
    del tensors["model.language_model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"layers\.2\.mlp\.experts\.5\.up_proj\.weight is missing"):
        load_model(tmp_path)


def test_plain_mlx_lm_conversion_matches_reference(source, tmp_path):
    mlx_lm_convert = pytest.importorskip("mlx_lm.convert").convert
    hf, path = source
    out = tmp_path / "plain"
    mlx_lm_convert(str(path), str(out), dtype="float32")
    weights = read_weights(out)
    assert checkpoint_layout(weights, load_config(out)) == "mlx"
    assert "language_model.model.layers.0.mlp.switch_mlp.gate_proj.weight" in weights
    ours = np.array(load_model(out)(mx.array(IDS)))
    assert rel_err(ours, hf_logits(hf, IDS)) < TOL


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_mlx_lm_conversion_matches_mlx_lm(source, tmp_path, bits):
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.convert import convert as mlx_lm_convert

    _, path = source
    out = tmp_path / f"q{bits}"
    mlx_lm_convert(
        str(path), str(out), quantize=True, q_bits=bits, q_group_size=32, dtype="float32"
    )
    model = load_model(out)
    mlp = model.layers[0].mlp
    assert mlp.switch_mlp.gate_proj.bits == bits  # experts really quantized
    assert mlp.gate.bits == 8 and mlp.shared_expert_gate.bits == 8  # as mlx-lm protects them
    assert isinstance(mlp.shared_expert.down_proj, nn.QuantizedLinear)
    theirs, _ = mlx_lm.load(str(out))
    ours = np.array(model(mx.array(IDS)))
    assert rel_err(ours, np.array(theirs(mx.array(IDS)))) < TOL


def test_mlx_vlm_conversion_matches_reference(tmp_path):
    pytest.importorskip("mlx_vlm")
    from mlx_vlm.convert import convert as vlm_convert

    hf = build_hf_moe_model("moe", vision=True, num_hidden_layers=4, layer_types=LAYERS[:4])
    path = save_hf_checkpoint(hf, tmp_path / "hf", keep_vision=True)
    fuse_experts(path)
    add_tokenizer(path)
    out = tmp_path / "vlm"
    vlm_convert(str(path), str(out), dtype="float32")
    assert any(".switch_mlp." in k for k in read_weights(out))
    ours = np.array(load_model(out)(mx.array(IDS)))
    assert rel_err(ours, hf_logits(hf, IDS)) < TOL


# 27B's text proportions at toy scale: 24 / 4 query / KV heads, 16 / 48 DeltaNet key / value heads
# (ratio 3), intermediate 3.4 x hidden, untied head, layers in the shipped 3:1 pattern.
PROPORTIONS_27B = dict(
    hidden_size=80,
    intermediate_size=272,
    num_hidden_layers=8,
    num_attention_heads=6,
    num_key_value_heads=1,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=6,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    tie_word_embeddings=False,
    layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 1e7,
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    },
)


@pytest.fixture(scope="module")
def dense_27b(tmp_path_factory):
    hf = build_hf_model("base", seed=9, **PROPORTIONS_27B)
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp("27b") / "hf", keep_vision=False)
    add_tokenizer(path)
    return hf, path


def test_27b_proportioned_dense_checkpoint_matches_reference(dense_27b):
    hf, path = dense_27b
    model = load_model(path)
    assert model.args.linear_num_value_heads == 3 * model.args.linear_num_key_heads
    assert not model.args.tie_word_embeddings
    ours = np.array(model(mx.array(IDS)))
    assert rel_err(ours, hf_logits(hf, IDS)) < TOL
