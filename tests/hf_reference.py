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
