"""Tiny Qwen3.5 checkpoints made by the reference implementation (transformers, torch CPU).

Every tensor is perturbed before saving: freshly initialised norm weights are zero (HF stores w of
norm(x)·(1+w)) and would hide a missing or doubled +1; A_log/dt_bias at their init values would hide
gate mistakes. The configs vary the shapes that ports get wrong (Hv/Hk > 1, Dk != Dv,
head_dim != 256, non-standard layer_types, tied and untied heads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

TEXT_BASE: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=48,  # rotary dim 12 -> 6 frequency pairs
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=24,
    linear_conv_kernel_dim=4,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 2, 2],
        "mrope_interleaved": True,
    },
    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    bos_token_id=300,
    eos_token_id=301,
)

VISION_BASE: dict[str, Any] = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    in_channels=3,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    num_position_embeddings=16,
    deepstack_visual_indexes=[],
)

# Special ids inside the tiny vocabulary (the real ones are ~248k, far beyond a tiny vocab).
TOKEN_IDS = dict(
    image_token_id=310, video_token_id=311, vision_start_token_id=312, vision_end_token_id=313
)

# Named variants used across the test suite.
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "tied": {"tie_word_embeddings": True},
    "hv_eq_hk": {"linear_num_key_heads": 4, "linear_num_value_heads": 4, "linear_key_head_dim": 24},
    "hv3": {
        "linear_num_key_heads": 1,
        "linear_num_value_heads": 3,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 16,
        "num_attention_heads": 6,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1e6,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        "layer_types": [
            "full_attention",
            "linear_attention",
            "linear_attention",
            "full_attention",
            "linear_attention",
        ],
        "num_hidden_layers": 5,
    },
}


def text_config(variant: str = "base", **overrides: Any) -> dict[str, Any]:
    cfg = json.loads(json.dumps(TEXT_BASE))
    cfg.update(json.loads(json.dumps(VARIANTS[variant])))
    cfg.update(overrides)
    return cfg


def build_hf_model(
    variant: str = "base", *, vision: bool = False, seed: int = 0, **text_overrides: Any
) -> torch.nn.Module:
    """A perturbed fp32 `Qwen3_5ForConditionalGeneration` in eval mode."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    tc = text_config(variant, **text_overrides)
    tie = bool(tc.pop("tie_word_embeddings", False))
    vc = dict(VISION_BASE, out_hidden_size=tc["hidden_size"])
    config = Qwen3_5Config(text_config=tc, vision_config=vc, tie_word_embeddings=tie, **TOKEN_IDS)
    config.text_config.tie_word_embeddings = tie
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(config).float().eval()
    perturb(model, seed)
    if not vision:
        model.config.vision_config = None
    return model


def perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1:
                # norms (zero-centred in HF), biases, A_log, dt_bias: clearly non-trivial values
                p.add_(0.3 * noise.to(p.dtype))
            else:
                p.add_(0.02 * noise.to(p.dtype))


def save_hf_checkpoint(
    model: torch.nn.Module,
    path: Path,
    *,
    max_shard_size: str | None = None,
    with_mtp: bool = False,
    keep_vision: bool = True,
) -> Path:
    """save_pretrained, optionally sharded, optionally with fake mtp.* tensors beside the model."""
    path = Path(path)
    kwargs: dict[str, Any] = {}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    if not keep_vision:
        _drop_vision(path)
    if with_mtp:
        _add_fake_mtp(model, path)
    return path


def _drop_vision(path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    for f in path.glob("*.safetensors"):
        tensors = {k: v for k, v in load_file(f).items() if not k.startswith("model.visual.")}
        save_file(tensors, f, metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("vision_config", None)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def _add_fake_mtp(model: torch.nn.Module, path: Path) -> None:
    from safetensors.numpy import save_file

    h = model.config.text_config.hidden_size
    rng = np.random.default_rng(7)
    tensors = {
        "mtp.fc.weight": rng.standard_normal((h, 2 * h)).astype(np.float32),
        "mtp.norm.weight": rng.standard_normal((h,)).astype(np.float32),
        "mtp.pre_fc_norm_hidden.weight": rng.standard_normal((h,)).astype(np.float32),
        "mtp.pre_fc_norm_embedding.weight": rng.standard_normal((h,)).astype(np.float32),
    }
    save_file(tensors, path / "model-mtp.safetensors", metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].update({k: "model-mtp.safetensors" for k in tensors})
        index.write_text(json.dumps(data, indent=2))


def hf_logits(model: torch.nn.Module, input_ids: np.ndarray, **kwargs: Any) -> np.ndarray:
    """Reference logits (B, T, V) as float32 numpy."""
    with torch.no_grad():
        torch_kwargs = {
            k: torch.from_numpy(np.asarray(v)) for k, v in kwargs.items() if v is not None
        }
        out = model(input_ids=torch.from_numpy(np.asarray(input_ids)), **torch_kwargs)
    return out.logits.float().numpy()


# ---------------------------------------------------------------- MoE (qwen3_5_moe)

# Sparse-MLP fields per MoE variant; the shapes come from VARIANTS (via `moe_of`). Shared and
# routed expert widths differ so that swapping them fails; experts >= 8, top-k >= 2.
MOE_VARIANTS: dict[str, dict[str, Any]] = {
    "moe": dict(
        base="base",
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    ),
    "moe_hv3": dict(
        base="hv3",
        num_experts=12,
        num_experts_per_tok=3,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=16,
        tie_word_embeddings=True,
    ),
}
ROUTER_SCALE = 10.0  # spreads the router's softmax so that top-k choices have clear margins


def moe_text_config(variant: str = "moe", **overrides: Any) -> dict[str, Any]:
    moe = dict(MOE_VARIANTS[variant])
    tc = text_config(moe.pop("base"))
    tc.pop("intermediate_size")
    tc.update(moe)
    tc.update(overrides)
    return tc


def build_hf_moe_model(
    variant: str = "moe", *, vision: bool = False, seed: int = 0, **text_overrides: Any
) -> torch.nn.Module:
    """A perturbed fp32 `Qwen3_5MoeForConditionalGeneration` in eval mode."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    tc = moe_text_config(variant, **text_overrides)
    tie = bool(tc.pop("tie_word_embeddings", False))
    vc = dict(VISION_BASE, out_hidden_size=tc["hidden_size"])
    config = Qwen3_5MoeConfig(
        text_config=tc, vision_config=vc, tie_word_embeddings=tie, **TOKEN_IDS
    )
    config.text_config.tie_word_embeddings = tie
    torch.manual_seed(seed)
    model = Qwen3_5MoeForConditionalGeneration(config).float().eval()
    perturb(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(ROUTER_SCALE)
    if not vision:
        model.config.vision_config = None
    return model


def router_margin(model: torch.nn.Module, input_ids: np.ndarray) -> float:
    """The smallest gap, over every token and layer, between the k-th and (k+1)-th largest router
    logit (softmax keeps the order): a port whose fp32 round-off differs picks the same experts
    only if this is clearly above that round-off (~1e-5 for logits of magnitude ~10)."""
    gaps: list[float] = []

    def hook(module, args, output):
        top = torch.topk(output[0].float(), module.top_k + 1, dim=-1).values
        gaps.append(float((top[:, -2] - top[:, -1]).min()))

    routers = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    handles = [r.register_forward_hook(hook) for r in routers]
    try:
        hf_logits(model, input_ids)
    finally:
        for h in handles:
            h.remove()
    return min(gaps)


def fuse_experts(path: Path) -> None:
    """Rewrite a saved checkpoint's per-expert tensors into the fused layout of the original Hub
    checkpoints: `experts.gate_up_proj` [E, 2I, H] (gate rows, then up) and `experts.down_proj`."""
    import re

    from safetensors.numpy import load_file, save_file

    pattern = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    for f in path.glob("*.safetensors"):
        tensors = load_file(f)
        groups: dict[str, dict[str, dict[int, np.ndarray]]] = {}
        out = {}
        for key, value in tensors.items():
            m = pattern.match(key)
            if m:
                groups.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = value
            else:
                out[key] = value
        for prefix, projs in groups.items():
            stack = {p: np.stack([v[e] for e in sorted(v)]) for p, v in projs.items()}
            out[f"{prefix}.gate_up_proj"] = np.concatenate(
                [stack["gate_proj"], stack["up_proj"]], axis=1
            )
            out[f"{prefix}.down_proj"] = stack["down_proj"]
        save_file(out, f, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        weight_map = {}
        for key, shard in data["weight_map"].items():
            m = pattern.match(key)
            if m:
                base = m[1]
                weight_map[
                    f"{base}.down_proj" if m[3] == "down_proj" else f"{base}.gate_up_proj"
                ] = shard
            else:
                weight_map[key] = shard
        data["weight_map"] = weight_map
        index.write_text(json.dumps(data, indent=2))
