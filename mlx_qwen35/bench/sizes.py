"""The models a bench runs: the text dimensions of every Qwen3.5 size (`--config`), random weights
in the original checkpoint layout for them, and cutting a model to its first layers (`--layers`)."""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from ..errors import UserError
from ..model.config import TextConfig

if TYPE_CHECKING:
    from ..weights.recipes import QuantSpec, Recipe

_ROPE = {
    "rope_type": "default",
    "rope_theta": 10000000.0,
    "partial_rotary_factor": 0.25,
    "mrope_section": [11, 11, 10],
    "mrope_interleaved": True,
}

# Text dimensions of the public Qwen3.5 checkpoints. 0.8b, 9b and 27b are from spec §1; 2b and 4b
# are from their public config.json files as we know them, the MoE sizes from the configs quoted by
# training frameworks that load them (slime, Megatron-Bridge); no download here to confirm. `tiny`
# and `tiny-moe` are for smoke tests only. MoE sizes carry expert fields, not intermediate_size.
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
    "tiny-moe": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
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
    "27b": dict(
        hidden_size=5120,
        intermediate_size=17408,
        num_hidden_layers=64,
        num_attention_heads=24,
        num_key_value_heads=4,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=48,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        vocab_size=248320,
        tie_word_embeddings=False,
        rope_parameters=_ROPE,
    ),
    "35b-a3b": dict(
        hidden_size=2048,
        num_hidden_layers=40,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        num_experts=256,
        num_experts_per_tok=8,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        vocab_size=248320,
        tie_word_embeddings=False,
        rope_parameters=_ROPE,
    ),
    "122b-a10b": dict(
        hidden_size=3072,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=64,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        num_experts=256,
        num_experts_per_tok=8,
        moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024,
        vocab_size=248320,
        tie_word_embeddings=False,
        rope_parameters=_ROPE,
    ),
    "397b-a17b": dict(
        hidden_size=4096,
        num_hidden_layers=60,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=64,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        num_experts=512,
        num_experts_per_tok=10,
        moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024,
        vocab_size=248320,
        tie_word_embeddings=False,
        rope_parameters=_ROPE,
    ),
}


def size_config(size: str) -> dict[str, Any]:
    """A config.json dict (HF layout, text only) with the text dimensions of `size`."""
    text = copy.deepcopy(SIZES[size])
    moe = "num_experts" in text
    text.update(
        model_type="qwen3_5_moe_text" if moe else "qwen3_5_text",
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
        "model_type": "qwen3_5_moe" if moe else "qwen3_5",
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


def random_hf_weights(
    text: TextConfig,
    dtype: mx.Dtype,
    seed: int = 0,
    recipe: Recipe | None = None,
    quantized: dict[str, tuple[QuantSpec, int]] | None = None,
) -> dict[str, mx.array]:
    """Random weights under their original HF names and layout: zero-centred (1+w) norms, conv1d
    as [C, 1, K], A_log in fp32. Each tensor is evaluated as soon as it is drawn, so the peak stays
    at the weights themselves. MoE experts are drawn already stacked (`mlp.switch_mlp.*`, which
    both our loader and mlx-lm's take as they are), so that the two models share one copy.

    With a `recipe`, every tensor it quantizes is packed as soon as it is drawn (so the peak is
    the packed model, not the float one) and noted in `quantized` (our path -> spec, size), from
    which the config's quantization block is made."""
    from ..weights.loading import rename_key
    from ..weights.quantize import decide, quantize

    key = mx.random.key(seed)
    out: dict[str, mx.array] = {}

    def draw(name: str, shape: tuple[int, ...], std: float, mean: float = 0.0, dt=None) -> None:
        nonlocal key
        key, sub = mx.random.split(key)
        value = mx.random.normal(shape, dt or dtype, loc=mean, scale=std, key=sub)
        ours = rename_key(name)
        decision = decide(ours, shape, recipe) if recipe is not None and ours else None
        if decision is None or decision.spec is None:
            out[name] = value
            mx.eval(value)
            return
        packed = quantize(name, value, decision.spec)
        mx.eval(packed)
        out.update(packed)
        if quantized is not None:
            quantized[ours.removesuffix(".weight")] = (decision.spec, value.size)

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
        moe = text.moe
        if moe is None:
            draw(q + "mlp.gate_proj.weight", (inter, H), 0.02)
            draw(q + "mlp.up_proj.weight", (inter, H), 0.02)
            draw(q + "mlp.down_proj.weight", (H, inter), 0.02)
        else:
            E, mi, si = (
                moe.num_experts,
                moe.moe_intermediate_size,
                moe.shared_expert_intermediate_size,
            )
            draw(q + "mlp.gate.weight", (E, H), 0.02)
            draw(q + "mlp.switch_mlp.gate_proj.weight", (E, mi, H), 0.02)
            draw(q + "mlp.switch_mlp.up_proj.weight", (E, mi, H), 0.02)
            draw(q + "mlp.switch_mlp.down_proj.weight", (E, H, mi), 0.02)
            draw(q + "mlp.shared_expert.gate_proj.weight", (si, H), 0.02)
            draw(q + "mlp.shared_expert.up_proj.weight", (si, H), 0.02)
            draw(q + "mlp.shared_expert.down_proj.weight", (H, si), 0.02)
            draw(q + "mlp.shared_expert_gate.weight", (1, H), 0.02)
    draw(p + "norm.weight", (H,), 0.05)
    if not text.tie_word_embeddings:
        draw("lm_head.weight", (text.vocab_size, H), 0.02)
    mx.eval(out)
    return out
