"""The MTP head of an MoE checkpoint: its one decoder layer is an MoE layer (router, experts in the
original fused layout, gated shared expert). Draft logits against the spec's formulas (§9) in fp32,
with transformers' own MoE decoder layer for the block, and through our converter."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from hf_reference import ROUTER_SCALE
from mtp_fixture import mtp_tensors
from safetensors.numpy import load_file, save_file
from test_mtp import rms1p

from mlx_qwen35.model.moe import SparseMoeBlock
from mlx_qwen35.weights.convert import convert
from mlx_qwen35.weights.loading import load_model

IDS = np.random.RandomState(8).randint(0, 300, size=(1, 17))
TOL = 1e-4


def moe_mtp_tensors(text: dict, seed: int = 13) -> dict[str, np.ndarray]:
    """The dense head's tensors with the MLP swapped for an MoE block, experts fused as the Hub
    checkpoints store them."""
    h, e = text["hidden_size"], text["num_experts"]
    i, s = text["moe_intermediate_size"], text["shared_expert_intermediate_size"]
    tensors = {
        k: v
        for k, v in mtp_tensors(dict(text, intermediate_size=i), seed).items()
        if ".mlp." not in k
    }
    rng = np.random.default_rng(seed + 1)

    def mat(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    p = "mtp.layers.0.mlp."
    tensors.update(
        {
            p + "gate.weight": ROUTER_SCALE * 0.2 * mat(e, h),
            p + "experts.gate_up_proj": mat(e, 2 * i, h),
            p + "experts.down_proj": mat(e, h, i),
            p + "shared_expert.gate_proj.weight": mat(s, h),
            p + "shared_expert.up_proj.weight": mat(s, h),
            p + "shared_expert.down_proj.weight": mat(h, s),
            p + "shared_expert_gate.weight": mat(1, h),
        }
    )
    return tensors


@pytest.fixture(scope="module")
def checkpoint(hf_moe_checkpoint, tmp_path_factory):
    hf, source = hf_moe_checkpoint("moe")
    target = tmp_path_factory.mktemp("moe_mtp") / "ckpt"
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["text_config"]["mtp_num_hidden_layers"] = 1
    (target / "config.json").write_text(json.dumps(config, indent=2))
    save_file(
        moe_mtp_tensors(config["text_config"]),
        target / "model-mtp.safetensors",
        metadata={"format": "pt"},
    )
    return hf, target


def reference(hf, path, ids: np.ndarray) -> tuple[np.ndarray, float]:
    """(draft logits for x_{p+2} by spec §9 with transformers' MoE decoder layer, the smallest
    top-k router logit gap inside that layer)."""
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeDecoderLayer

    t = load_file(path / "model-mtp.safetensors")
    text = hf.model.language_model
    cfg = hf.config.text_config
    ids_t = torch.from_numpy(ids)
    gaps: list[float] = []
    with torch.no_grad():
        hidden = text(input_ids=ids_t).last_hidden_state
        T = ids.shape[1] - 1
        e = text.embed_tokens(ids_t[:, 1:])
        u = torch.cat(
            [
                rms1p(e, t["mtp.pre_fc_norm_embedding.weight"]),
                rms1p(hidden[:, :T], t["mtp.pre_fc_norm_hidden.weight"]),
            ],
            dim=-1,
        )
        u = u @ torch.from_numpy(t["mtp.fc.weight"]).T
        layer_cfg = type(cfg).from_dict(cfg.to_dict())
        layer_cfg.layer_types = ["full_attention"]
        layer_cfg._attn_implementation = "eager"
        layer = Qwen3_5MoeDecoderLayer(layer_cfg, 0).float().eval()
        prefix = "mtp.layers.0."
        layer.load_state_dict(
            {k[len(prefix) :]: torch.from_numpy(v) for k, v in t.items() if k.startswith(prefix)}
        )

        def hook(module, args, output):
            top = torch.topk(output[0], module.top_k + 1, dim=-1).values
            gaps.append(float((top[:, -2] - top[:, -1]).min()))

        layer.mlp.gate.register_forward_hook(hook)
        pos = torch.arange(T)[None, None].expand(3, 1, T)
        causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
        u = layer(u, position_embeddings=text.rotary_emb(u, pos), attention_mask=causal)
        o = rms1p(u, t["mtp.norm.weight"])
        return hf.lm_head(o).numpy(), min(gaps)


def draft_logits(model, ids: np.ndarray) -> np.ndarray:
    x = mx.array(ids)
    hidden = model.hidden_states(x)
    o = model.mtp(model.embed(x[:, 1:]), hidden[:, :-1], model.mtp.make_cache())
    return np.array(model.language_model.logits(o))


def test_moe_mtp_draft_logits_match_the_spec_formulas(checkpoint, tmp_path):
    hf, path = checkpoint
    ref, margin = reference(hf, path, IDS)
    assert margin > 1e-4  # no near-ties: both sides pick the same experts
    model = load_model(path)
    assert isinstance(model.mtp.layers[0].mlp, SparseMoeBlock)
    assert model.mtp.layers[0].mlp.switch_mlp.up_proj.weight.shape == (8, 32, 64)
    ours = draft_logits(model, IDS)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < TOL
    # through our converter: the head's experts are stacked in mtp.safetensors, same drafts
    out = convert(path, tmp_path / "converted", progress=False).out
    head = mx.load(str(out / "mtp.safetensors"))
    assert "mtp.layers.0.mlp.switch_mlp.gate_proj.weight" in head
    assert not any(".experts." in k for k in head)
    converted = draft_logits(load_model(out), IDS)
    assert np.abs(converted - ref).max() / np.abs(ref).max() < TOL
