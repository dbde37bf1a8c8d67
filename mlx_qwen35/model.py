"""The Qwen3.5 model: embeddings, the hybrid decoder stack, the head, and the vision merge.

Module names follow mlx-vlm's qwen3_5 layout (`language_model.model.layers.N...`,
`vision_tower...`), so our converted checkpoints load unchanged in mlx-lm and mlx-vlm and theirs in
ours. The model follows mlx-lm's protocol (`__call__(inputs, cache=...)`, `make_cache()`, `layers`),
so mlx-lm's generation utilities can drive it.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, make_cache
from .config import ModelConfig, TextConfig
from .gated_delta import gated_delta_core
from .layers import MLP, GatedAttention, RMSNorm, RMSNormGated


class GatedDeltaNet(nn.Module):
    """The linear-attention mixer: projections, causal conv, gated delta recurrence, gated norm."""

    def __init__(self, args: TextConfig):
        super().__init__()
        self.num_k_heads = args.linear_num_key_heads
        self.num_v_heads = args.linear_num_value_heads
        self.head_k_dim = args.linear_key_head_dim
        self.head_v_dim = args.linear_value_head_dim
        self.conv_kernel_size = args.linear_conv_kernel_dim
        conv_dim = args.conv_dim
        value_dim = self.num_v_heads * self.head_v_dim
        h = args.hidden_size
        self.in_proj_qkv = nn.Linear(h, conv_dim, bias=False)
        self.in_proj_z = nn.Linear(h, value_dim, bias=False)
        self.in_proj_b = nn.Linear(h, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(h, self.num_v_heads, bias=False)
        # Stored as MLX's depthwise Conv1d weight [C, K, 1]; applied as shifted multiply-adds.
        self.conv1d = nn.Module()
        self.conv1d.weight = mx.zeros((conv_dim, self.conv_kernel_size, 1))
        self.dt_bias = mx.ones((self.num_v_heads,))
        self.A_log = mx.zeros((self.num_v_heads,), dtype=mx.float32)
        self.norm = RMSNormGated(self.head_v_dim, eps=args.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, h, bias=False)

    def __call__(self, x: mx.array, cache: Any = None) -> mx.array:
        B, T, _ = x.shape
        conv_state = cache[0] if cache is not None else None
        state = cache[1] if cache is not None else None
        o, conv_state, state = gated_delta_core(
            self.in_proj_qkv(x),
            self.in_proj_a(x),
            self.in_proj_b(x),
            self.conv1d.weight,
            self.A_log,
            self.dt_bias,
            conv_state,
            state,
            num_k_heads=self.num_k_heads,
            num_v_heads=self.num_v_heads,
            head_k_dim=self.head_k_dim,
            head_v_dim=self.head_v_dim,
        )
        if cache is not None:
            cache[0], cache[1] = conv_state, state
        z = self.in_proj_z(x).reshape(B, T, self.num_v_heads, self.head_v_dim)
        return self.out_proj(self.norm(o, z).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, args: TextConfig, layer_idx: int):
        super().__init__()
        self.is_linear = args.is_linear(layer_idx)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(args)
        else:
            self.self_attn = GatedAttention(args)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)

    def __call__(
        self,
        x: mx.array,
        mask: Any,
        cache: Any,
        position_ids: mx.array | None,
        pad_mask: mx.array | None,
    ) -> mx.array:
        h = self.input_layernorm(x)
        if self.is_linear:
            if pad_mask is not None:
                # Zero padded positions so they leave the (zero) initial state untouched.
                h = h * pad_mask[..., None].astype(h.dtype)
            r = self.linear_attn(h, cache)
        else:
            r = self.self_attn(h, mask, cache, position_ids)
        x = x + r
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3_5TextModel(nn.Module):
    def __init__(self, args: TextConfig):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.first_attention = next(
            (i for i, layer in enumerate(self.layers) if not layer.is_linear), None
        )

    def __call__(
        self,
        h: mx.array,
        cache: list[Any] | None = None,
        attention_mask: mx.array | None = None,
        position_ids: mx.array | None = None,
    ) -> mx.array:
        B, T, _ = h.shape
        if cache is None:
            cache = [None] * len(self.layers)
        attn_cache = cache[self.first_attention] if self.first_attention is not None else None
        mask, pad_mask, position_ids = _masks_and_positions(
            B, T, attn_cache, attention_mask, position_ids
        )
        for layer, c in zip(self.layers, cache, strict=False):
            h = layer(h, mask, c, position_ids, pad_mask)
        return self.norm(h)


def _masks_and_positions(
    B: int,
    T: int,
    cache: Any,
    attention_mask: mx.array | None,
    position_ids: mx.array | None,
) -> tuple[Any, mx.array | None, mx.array | None]:
    """The attention mask, the DeltaNet padding mask and the rotary positions for one call.

    Without padding the attention mask is plain causal and positions follow the cache offset
    (shifted by the cache's rope_delta after images), which lets rotary take its fast path.
    With left padding (attention_mask: 1 = real token) padded keys are masked out, padded DeltaNet
    inputs are zeroed, and real tokens of each row count positions from 0; the cache remembers
    both so that later calls continue the same way.
    """
    offset = cache.offset if cache is not None else 0
    key_mask = cache.key_mask if isinstance(cache, KVCache) else None
    rope_delta = cache.rope_delta if isinstance(cache, KVCache) else None
    pad_mask = None
    if attention_mask is not None:
        pad_mask = attention_mask.astype(mx.bool_)
        if bool(mx.all(pad_mask)) and key_mask is None:
            pad_mask = None
    if pad_mask is not None or key_mask is not None:
        step_mask = pad_mask if pad_mask is not None else mx.ones((B, T), dtype=mx.bool_)
        if key_mask is None:
            key_mask = mx.ones((B, offset), dtype=mx.bool_)
        key_mask = mx.concatenate([key_mask, step_mask], axis=1)  # [B, offset + T]
        if position_ids is None:
            counts = mx.cumsum(key_mask.astype(mx.int32), axis=1)[:, offset:] - 1
            pos = mx.maximum(counts, 0)
            if rope_delta is not None:
                pos = pos + rope_delta[:, None]
            position_ids = mx.broadcast_to(pos[None], (3, B, T))
        causal = mx.arange(offset, offset + T)[:, None] >= mx.arange(offset + T)[None]
        mask = causal[None, None] & key_mask[:, None, None, :]
        if isinstance(cache, KVCache):
            cache.key_mask = key_mask
    else:
        mask = "causal" if T > 1 else None
        if position_ids is None and rope_delta is not None:
            pos = offset + mx.arange(T)[None] + rope_delta[:, None]
            position_ids = mx.broadcast_to(pos[None], (3, B, T))
    return mask, pad_mask, position_ids


class LanguageModel(nn.Module):
    def __init__(self, args: TextConfig):
        super().__init__()
        self.args = args
        self.model = Qwen3_5TextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)


class Model(nn.Module):
    """Qwen3.5 (dense): `model(input_ids, cache=...) -> logits [B, T, vocab]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.args = config.text
        self.model_type = config.model_type
        self.language_model = LanguageModel(config.text)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.language_model.model.layers

    def make_cache(self) -> list[Any]:
        return make_cache(self.args.layer_types)

    def embed(self, input_ids: mx.array) -> mx.array:
        return self.language_model.model.embed_tokens(input_ids)

    def hidden_states(
        self,
        inputs: mx.array | None,
        cache: list[Any] | None = None,
        *,
        attention_mask: mx.array | None = None,
        position_ids: mx.array | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        """The final-norm hidden states [B, T, H] (what feeds the head)."""
        h = input_embeddings if input_embeddings is not None else self.embed(inputs)
        if attention_mask is not None:
            attention_mask = mx.array(attention_mask)
        if position_ids is not None:
            position_ids = mx.array(position_ids)
        return self.language_model.model(h, cache, attention_mask, position_ids)

    def __call__(
        self,
        inputs: mx.array | None,
        cache: list[Any] | None = None,
        *,
        attention_mask: mx.array | None = None,
        position_ids: mx.array | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        hidden = self.hidden_states(
            inputs,
            cache,
            attention_mask=attention_mask,
            position_ids=position_ids,
            input_embeddings=input_embeddings,
        )
        return self.language_model.logits(hidden)

    @property
    def cast_predicate(self):
        # A_log stays fp32 whatever dtype the rest is cast to (mlx-lm's convert honours this).
        return lambda path: not path.endswith("A_log")
