"""The models the bench runs: random weights with the real dimensions of each Qwen3.5 size
(`sizes.py`), or a checkpoint (optionally cut to its first layers), built into our model and, for
--vs mlx-lm, into mlx-lm's own qwen3_5 / qwen3_5_moe model from the same tensors."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from ..errors import UserError
from ..model.config import ModelConfig, TextConfig
from .sizes import SIZES, cut_layers, random_hf_weights, size_config

if TYPE_CHECKING:  # the model and loader are imported by the runs, so -h answers at once
    from ..model.model import Model

__all__ = [
    "SIZES",
    "build_mlx_lm",
    "build_ours",
    "cut_layers",
    "load_source",
    "random_hf_weights",
    "size_config",
]


def build_ours(raw: dict[str, mx.array], config: ModelConfig, dtype: mx.Dtype | None) -> Model:
    """Our model from original-layout (or any readable) tensors, as `loading.load_model` does."""
    from ..weights import loading

    return loading.model_from_weights(raw, replace(config, vision=None), dtype, "bench weights")


def _check_mlx_lm_layout(text: TextConfig, config: dict[str, Any]) -> None:
    """mlx-lm's qwen3_5 derives the layer kinds from full_attention_interval alone and needs a
    full-attention layer at index interval - 1; refuse what it would run differently or crash on."""
    interval = int((config.get("text_config") or config).get("full_attention_interval", 4))
    derived = [
        "full_attention" if (i + 1) % interval == 0 else "linear_attention"
        for i in range(text.num_hidden_layers)
    ]
    if text.num_hidden_layers < interval:
        raise UserError(
            f"mlx-lm's qwen3_5 needs at least one full-attention layer: use --layers {interval} "
            "or more with --vs mlx-lm"
        )
    if derived != text.layer_types:
        raise UserError(
            "mlx-lm's qwen3_5 derives layer kinds from full_attention_interval and would run this "
            "checkpoint's layer_types differently; drop --vs mlx-lm"
        )


def build_mlx_lm(raw: dict[str, mx.array], config: dict[str, Any], dtype: mx.Dtype | None):
    """mlx-lm's own qwen3_5 (or qwen3_5_moe) model on the same tensors, through mlx-lm's own
    sanitize."""
    from mlx_lm.models import qwen3_5, qwen3_5_moe

    from ..weights import loading

    config = copy.deepcopy(config)
    config.pop("vision_config", None)
    text = ModelConfig.from_dict(config).text
    _check_mlx_lm_layout(text, config)
    module = qwen3_5_moe if text.moe is not None else qwen3_5
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = model.sanitize(dict(raw))
    loading.quantize_like_checkpoint(model, weights, config)
    if dtype is not None:
        keep = model.cast_predicate
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and keep(k) else v
            for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model


def load_source(
    model_path: str | None,
    size: str | None,
    layers: int | None,
    dtype: mx.Dtype | None,
    seed: int,
    q_bits: int | None = None,
    vs: str | None = None,
) -> tuple[dict[str, Any], dict[str, mx.array], str]:
    """(config dict, original-layout tensors, description) for --model or --config; with
    `q_bits` the random weights are quantized by that recipe (`4bit` / `8bit`) as drawn."""
    if (model_path is None) == (size is None):
        raise UserError("pass exactly one of --model (a checkpoint) or --config (random weights)")
    if q_bits is not None and size is None:
        raise UserError("--q-bits quantizes --config's random weights; a --model is used as stored")
    if model_path is not None:
        from ..weights import loading

        model_dir = loading.resolve_model_path(model_path)
        config = loading.load_config(model_dir).raw
        raw = loading.read_weights(model_dir)
        if layers is not None:
            config = cut_layers(config, raw, layers)
        return config, raw, f"model {model_path}"
    config = size_config(size)
    if layers is not None:
        config = cut_layers(config, None, layers)
    text = ModelConfig.from_dict(config).text
    if vs == "mlx-lm":
        _check_mlx_lm_layout(text, config)  # before minutes of drawing weights
    from ..weights.quantize import quantization_block
    from ..weights.recipes import load_recipe

    recipe = load_recipe(f"{q_bits}bit") if q_bits is not None else None
    quantized: dict[str, Any] = {}
    raw = random_hf_weights(text, dtype or mx.float32, seed, recipe, quantized)
    what = f"config {size} (random weights)"
    if recipe is not None:
        config["quantization"] = quantization_block(recipe, quantized)
        what = f"config {size} (random weights, {recipe.name} recipe)"
    return config, raw, what
