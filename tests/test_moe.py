"""The MoE models (qwen3_5_moe): fp32 logits of our model against transformers'
Qwen3_5MoeForConditionalGeneration on tiny perturbed checkpoints (experts >= 8, top-k >= 2, shared
expert on, odd layer_types, router margins checked to be far above round-off), full forward and
prefill + decode, images through the tower, and the router/expert arithmetic on its own."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import build_hf_moe_model, hf_logits, router_margin, save_hf_checkpoint
from test_multimodal import Prompt, reference
from test_vision import sharpen

from mlx_qwen35.model.config import ModelConfig
from mlx_qwen35.model.moe import SparseMoeBlock
from mlx_qwen35.weights.loading import load_model

TOL = 1e-4
VARIANTS = ["moe", "moe_hv3"]
MARGIN = 1e-4  # router logit gaps below this could flip an expert choice on round-off alone


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def random_ids(batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 300, size=(batch, length))


@pytest.fixture(scope="module")
def models(hf_moe_checkpoint):
    cache = {}

    def get(variant):
        if variant not in cache:
            hf, path = hf_moe_checkpoint(variant)
            cache[variant] = (hf, load_model(path))
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("length", [1, 6, 67, 150])
def test_full_forward_matches_reference(models, variant, length):
    hf, model = models(variant)
    ids = random_ids(2, length, seed=length)
    assert router_margin(hf, ids) > MARGIN
    ours = np.array(model(mx.array(ids)))
    assert rel_err(ours, hf_logits(hf, ids)) < TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_then_decode_matches_full_forward(models, variant):
    hf, model = models(variant)
    ids = random_ids(2, 45, seed=3)
    assert router_margin(hf, ids) > MARGIN
    ref = hf_logits(hf, ids)
    cache = model.make_cache()
    pieces = [np.array(model(mx.array(ids[:, :30]), cache=cache))]
    for t in range(30, 45):
        pieces.append(np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)))
    assert rel_err(np.concatenate(pieces, axis=1), ref) < TOL


def test_every_layer_is_sparse_and_config_round_trips(models):
    _, model = models("moe_hv3")
    assert all(isinstance(layer.mlp, SparseMoeBlock) for layer in model.layers)
    moe = model.args.moe
    assert (moe.num_experts, moe.num_experts_per_tok) == (12, 3)
    written = model.config.to_dict()
    assert written["model_type"] == "qwen3_5_moe"
    assert "intermediate_size" not in written["text_config"]
    assert ModelConfig.from_dict(written).text.moe == moe


def test_image_through_the_tower_matches_reference(tmp_path):
    hf = build_hf_moe_model("moe", vision=True, seed=2)
    sharpen(hf.model.visual)
    model = load_model(save_hf_checkpoint(hf, tmp_path / "ckpt", keep_vision=True))
    p = Prompt(seed=0).text(5).image(6, 8).text(7)
    ref = reference(hf, p.array(), **p.media)
    ours = np.array(model(mx.array(p.array()), **p.media))
    assert rel_err(ours, ref) < TOL


# ----------------------------------------------------------------------------- the block alone


def block_reference(block: SparseMoeBlock, x: np.ndarray, normalise: bool) -> np.ndarray:
    """The block by its formula, in numpy float64."""
    p = {k: np.array(v, dtype=np.float64) for k, v in _params(block).items()}
    silu = lambda v: v / (1 + np.exp(-v))
    logits = x @ p["gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-probs[t])[: block.top_k]
        w = probs[t, top] / (probs[t, top].sum() if normalise else 1.0)
        for j, e in enumerate(top):
            g = x[t] @ p["switch_mlp.gate_proj.weight"][e].T
            u = x[t] @ p["switch_mlp.up_proj.weight"][e].T
            out[t] += w[j] * ((silu(g) * u) @ p["switch_mlp.down_proj.weight"][e].T)
        s = silu(x[t] @ p["shared_expert.gate_proj.weight"].T) * (
            x[t] @ p["shared_expert.up_proj.weight"].T
        )
        gate = 1 / (1 + np.exp(-(x[t] @ p["shared_expert_gate.weight"].T)))
        out[t] += gate * (s @ p["shared_expert.down_proj.weight"].T)
    return out


def _params(block: SparseMoeBlock) -> dict[str, mx.array]:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(block.parameters()))


@pytest.mark.parametrize("normalise", [True, False])
def test_block_follows_its_formula(normalise):
    cfg = ModelConfig.from_dict(
        {
            "model_type": "qwen3_5_moe",
            "text_config": {
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 16,
                "linear_num_key_heads": 1,
                "linear_num_value_heads": 1,
                "vocab_size": 16,
                "rope_parameters": {"mrope_section": [1, 1, 0], "partial_rotary_factor": 0.25},
                "num_experts": 9,
                "num_experts_per_tok": 4,
                "moe_intermediate_size": 8,
                "shared_expert_intermediate_size": 12,
                "norm_topk_prob": normalise,
            },
        }
    )
    mx.random.seed(4)
    block = SparseMoeBlock(cfg.text)
    block.update(
        {
            "gate": {"weight": mx.random.normal((9, 32)) * 0.5},
            "shared_expert_gate": {"weight": mx.random.normal((1, 32)) * 0.2},
        }
    )
    x = np.random.RandomState(0).standard_normal((11, 32)).astype(np.float32)
    ours = np.array(block(mx.array(x)))
    ref = block_reference(block, x.astype(np.float64), normalise)
    assert rel_err(ours, ref) < 1e-5
    # the other normalisation is far off: the flag matters
    assert rel_err(ours, block_reference(block, x.astype(np.float64), not normalise)) > 1e-2


def test_bfloat16_experts_run_off_metal(hf_moe_checkpoint):
    """MLX's CPU gather_mm is float32-only: bf16 experts are held in fp32 there, and the block's
    output keeps the activation dtype."""
    hf, path = hf_moe_checkpoint("moe")
    model = load_model(path, "bfloat16")
    ids = random_ids(1, 9, seed=1)
    out = model(mx.array(ids))
    assert out.dtype == mx.bfloat16
    ref = hf_logits(hf, ids)
    assert rel_err(np.array(out.astype(mx.float32)), ref) < 0.05
    if not mx.metal.is_available():
        assert model.layers[0].mlp.switch_mlp.up_proj.weight.dtype == mx.float32
