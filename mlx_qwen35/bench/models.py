"""The models the bench runs: random weights with the real dimensions of each Qwen3.5 size, or a
checkpoint (optionally cut to its first layers), built into our model and, for --vs mlx-lm, into
mlx-lm's own qwen3_5 model from the same tensors."""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from ..errors import UserError
from ..model.config import ModelConfig, TextConfig

if TYPE_CHECKING:
    from ..model.model import Model

_ROPE = {
    "rope_type": "default",
    "rope_theta": 10000000.0,
    "partial_rotary_factor": 0.25,
    "mrope_section": [11, 11, 10],
    "mrope_interleaved": True,
}

# Text dimensions of the public Qwen3.5 checkpoints. 0.8b and 9b are from spec §1; 2b and 4b are
# from their public config.json files as we know them (no download here to confirm). `tiny` is for
# smoke tests only.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        vocab_size=512,
        tie_word_embeddings=False,
        rope_parameters=dict(_ROPE, mrope_section=[2, 1, 1]),
    ),
    "0.8b": dict(
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=24,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=16,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        vocab_size=248320,
        tie_word_embeddings=True,
        rope_parameters=_ROPE,
    ),
    "2b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=24,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=16,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        vocab_size=248320,
        tie_word_embeddings=True,
        rope_parameters=_ROPE,
    ),
    "4b": dict(
        hidden_size=2560,
        intermediate_size=9216,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        vocab_size=248320,
        tie_word_embeddings=True,
        rope_parameters=_ROPE,
    ),
    "9b": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        vocab_size=248320,
        tie_word_embeddings=False,
        rope_parameters=_ROPE,
    ),
}


def size_config(size: str) -> dict[str, Any]:
    """A config.json dict (HF layout, text only) with the text dimensions of `size`."""
    text = copy.deepcopy(SIZES[size])
    text.update(
        model_type="qwen3_5_text",
        linear_conv_kernel_dim=4,
        full_attention_interval=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=262144,
        hidden_act="silu",
    )
    n = text["num_hidden_layers"]
    text["layer_types"] = [
        "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)
    ]
    return {
        "model_type": "qwen3_5",
        "text_config": text,
        "tie_word_embeddings": text["tie_word_embeddings"],
    }


_LAYER_KEY = re.compile(
    r"^(model\.language_model\.|language_model\.model\.|model\.)layers\.(\d+)\."
)


def cut_layers(
    config: dict[str, Any], weights: dict[str, mx.array] | None, layers: int
) -> dict[str, Any]:
    """Keep the first `layers` decoder layers: returns the new config dict; drops the other
    layers' tensors from `weights` in place."""
    config = copy.deepcopy(config)
    text = config.get("text_config") or config
    total = int(text.get("num_hidden_layers", 0))
    if not 1 <= layers <= total:
        raise UserError(f"--layers must be between 1 and {total} (the model's depth), got {layers}")
    text["num_hidden_layers"] = layers
    if text.get("layer_types"):
        text["layer_types"] = list(text["layer_types"][:layers])
    if weights is not None:
        for key in list(weights):
            m = _LAYER_KEY.match(key)
            if m and int(m.group(2)) >= layers:
                del weights[key]
    return config


def random_hf_weights(text: TextConfig, dtype: mx.Dtype, seed: int = 0) -> dict[str, mx.array]:
    """Random weights under their original HF names and layout: zero-centred (1+w) norms, conv1d
    as [C, 1, K], A_log in fp32. Each tensor is evaluated as soon as it is drawn, so the peak stays
    at the weights themselves."""
    key = mx.random.key(seed)
    out: dict[str, mx.array] = {}

    def draw(name: str, shape: tuple[int, ...], std: float, mean: float = 0.0, dt=None) -> None:
        nonlocal key
        key, sub = mx.random.split(key)
        out[name] = mx.random.normal(shape, dt or dtype, loc=mean, scale=std, key=sub)
        mx.eval(out[name])

    H, inter = text.hidden_size, text.intermediate_size
    Hv, Dv, K = text.linear_num_value_heads, text.linear_value_head_dim, text.linear_conv_kernel_dim
    nh, nkv, hd = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    p = "model.language_model."
    draw(p + "embed_tokens.weight", (text.vocab_size, H), 0.02)
    for i in range(text.num_hidden_layers):
        q = f"{p}layers.{i}."
        draw(q + "input_layernorm.weight", (H,), 0.05)
        draw(q + "post_attention_layernorm.weight", (H,), 0.05)
        if text.is_linear(i):
            a = q + "linear_attn."
            draw(a + "in_proj_qkv.weight", (text.conv_dim, H), 0.02)
            draw(a + "in_proj_z.weight", (Hv * Dv, H), 0.02)
            draw(a + "in_proj_b.weight", (Hv, H), 0.02)
            draw(a + "in_proj_a.weight", (Hv, H), 0.02)
            draw(a + "conv1d.weight", (text.conv_dim, 1, K), 0.3)
            draw(a + "dt_bias", (Hv,), 0.5, mean=1.0)
            # A = exp(A_log) in roughly [1, 16], as Qwen initialises it.
            key, sub = mx.random.split(key)
            out[a + "A_log"] = mx.log(mx.random.uniform(1.0, 16.0, (Hv,), key=sub))
            draw(a + "norm.weight", (Dv,), 0.05, mean=1.0)
            draw(a + "out_proj.weight", (H, Hv * Dv), 0.02)
        else:
            a = q + "self_attn."
            draw(a + "q_proj.weight", (2 * nh * hd, H), 0.02)
            draw(a + "k_proj.weight", (nkv * hd, H), 0.02)
            draw(a + "v_proj.weight", (nkv * hd, H), 0.02)
            draw(a + "o_proj.weight", (H, nh * hd), 0.02)
            draw(a + "q_norm.weight", (hd,), 0.05)
            draw(a + "k_norm.weight", (hd,), 0.05)
        draw(q + "mlp.gate_proj.weight", (inter, H), 0.02)
        draw(q + "mlp.up_proj.weight", (inter, H), 0.02)
        draw(q + "mlp.down_proj.weight", (H, inter), 0.02)
    draw(p + "norm.weight", (H,), 0.05)
    if not text.tie_word_embeddings:
        draw("lm_head.weight", (text.vocab_size, H), 0.02)
    mx.eval(out)
    return out


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
    """mlx-lm's own qwen3_5 model on the same tensors, through mlx-lm's own sanitize."""
    from mlx_lm.models import qwen3_5

    from ..weights import loading

    config = copy.deepcopy(config)
    config.pop("vision_config", None)
    _check_mlx_lm_layout(ModelConfig.from_dict(config).text, config)
    model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(config))
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
    model_path: str | None, size: str | None, layers: int | None, dtype: mx.Dtype | None, seed: int
) -> tuple[dict[str, Any], dict[str, mx.array], str]:
    """(config dict, original-layout tensors, description) for --model or --config."""
    if (model_path is None) == (size is None):
        raise UserError("pass exactly one of --model (a checkpoint) or --config (random weights)")
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
    raw = random_hf_weights(text, dtype or mx.float32, seed)
    return config, raw, f"config {size} (random weights)"
