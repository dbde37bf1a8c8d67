"""Checkpoints with a complete, perturbed MTP head beside a transformers-built model.

transformers ignores `mtp.*` (it neither builds nor saves the head), so the head is written here in
the original HF layout: one full-attention decoder layer under `mtp.layers.0.`, the fusion `mtp.fc`
[H, 2H], and zero-centred (1 + w) norms with clearly non-zero w.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np


def mtp_tensors(text_config: dict[str, Any], seed: int = 11) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, inter = text_config["hidden_size"], text_config["intermediate_size"]
    nh, nkv = text_config["num_attention_heads"], text_config["num_key_value_heads"]
    hd = text_config["head_dim"]

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (0.3 * rng.standard_normal(n)).astype(np.float32)

    p = "mtp.layers.0."
    return {
        "mtp.fc.weight": mat(h, 2 * h),
        "mtp.pre_fc_norm_embedding.weight": norm(h),
        "mtp.pre_fc_norm_hidden.weight": norm(h),
        "mtp.norm.weight": norm(h),
        p + "input_layernorm.weight": norm(h),
        p + "post_attention_layernorm.weight": norm(h),
        p + "self_attn.q_proj.weight": mat(2 * nh * hd, h),
        p + "self_attn.k_proj.weight": mat(nkv * hd, h),
        p + "self_attn.v_proj.weight": mat(nkv * hd, h),
        p + "self_attn.o_proj.weight": mat(h, nh * hd),
        p + "self_attn.q_norm.weight": norm(hd),
        p + "self_attn.k_norm.weight": norm(hd),
        p + "mlp.gate_proj.weight": mat(inter, h),
        p + "mlp.up_proj.weight": mat(inter, h),
        p + "mlp.down_proj.weight": mat(h, inter),
    }


def with_mtp(source: Path, target: Path, seed: int = 11) -> Path:
    """Copy the HF checkpoint `source` to `target` and add an MTP head (its own shard, listed in
    the index when there is one; config.json gets mtp_num_hidden_layers = 1)."""
    from safetensors.numpy import save_file

    if not target.exists():
        shutil.copytree(source, target)
        config = json.loads((target / "config.json").read_text())
        text = config.get("text_config", config)
        text["mtp_num_hidden_layers"] = 1
        (target / "config.json").write_text(json.dumps(config, indent=2))
        tensors = mtp_tensors(text, seed)
        save_file(tensors, target / "model-mtp.safetensors", metadata={"format": "pt"})
        index = target / "model.safetensors.index.json"
        if index.exists():
            data = json.loads(index.read_text())
            data["weight_map"].update({k: "model-mtp.safetensors" for k in tensors})
            index.write_text(json.dumps(data, indent=2))
    return target
