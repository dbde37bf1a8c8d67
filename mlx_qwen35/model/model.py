"""The Qwen3.5 model: embeddings, the hybrid decoder stack, the head, and the vision merge.

Module names follow mlx-vlm's qwen3_5 layout (`language_model.model.layers.N...`,
`vision_tower...`), so our converted checkpoints load unchanged in mlx-lm and mlx-vlm and theirs in
ours. The model follows mlx-lm's protocol (`__call__(inputs, cache=...)`, `make_cache()`, `layers`),
so mlx-lm's generation utilities can drive it.

Images and videos enter through `prepare_inputs`: the vision tower runs once per prompt, its
features replace the `<|image_pad|>` / `<|video_pad|>` embeddings, and the prompt gets 3-D rotary
positions. The caches remember where positions stand (`AttentionCache.rope_delta`: the token at
cache index n has position n + rope_delta), so decoding, chunked prefill and later turns with new
images all continue the same walk.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import UserError
from ..threads import release_thread_state_at_exit
from .attention import PaddingMask
from .cache import AttentionCache, make_cache
from .config import ModelConfig, TextConfig
from .cpu_fast import linear
from .gated_delta import gated_delta_core
from .layers import MLP, GatedAttention, Linear, RMSNorm, RMSNormGated
from .moe import SparseMoeBlock
from .positions import rope_index
from .vision import VisionModel


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
        self.in_proj_qkv = Linear(h, conv_dim, bias=False)
        self.in_proj_z = Linear(h, value_dim, bias=False)
        self.in_proj_b = Linear(h, self.num_v_heads, bias=False)
        self.in_proj_a = Linear(h, self.num_v_heads, bias=False)
        # Stored as MLX's depthwise Conv1d weight [C, K, 1]; applied as shifted multiply-adds.
        self.conv1d = nn.Module()
        self.conv1d.weight = mx.zeros((conv_dim, self.conv_kernel_size, 1))
        self.dt_bias = mx.ones((self.num_v_heads,))
        self.A_log = mx.zeros((self.num_v_heads,), dtype=mx.float32)
        self.norm = RMSNormGated(self.head_v_dim, eps=args.rms_norm_eps)
        self.out_proj = Linear(value_dim, h, bias=False)

    def __call__(self, x: mx.array, cache: Any = None) -> mx.array:
        B, T, _ = x.shape
        conv_state = cache[0] if cache is not None else None
        state = cache[1] if cache is not None else None
        # Speculative verify: keep the state after every token so the cache can roll back.
        record = getattr(cache, "record_steps", False)
        out = gated_delta_core(
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
            per_token_states=record,
        )
        o, conv_state, state = out[:3]
        if record:
            cache.steps = out[3:]
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
        if args.moe is not None:
            self.mlp = SparseMoeBlock(args)
        else:
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
    # Set by `distributed.pipeline`: this process runs only its range of the layers.
    pipeline_group: Any = None

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
        fill_only: bool = False,
    ) -> mx.array | None:
        B, T, _ = h.shape
        if cache is None:
            cache = [None] * len(self.layers)
        attn_cache = cache[self.first_attention] if self.first_attention is not None else None
        offset = attn_cache.offset if attn_cache is not None else 0
        mask, pad_mask, position_ids, explicit = _masks_and_positions(
            B, T, attn_cache, attention_mask, position_ids
        )
        if explicit:
            # The next token continues after the largest position used so far, whatever made it
            # (images advance positions by less than their token count, padding by nothing).
            rope_delta = mx.max(position_ids, axis=(0, 2)).astype(mx.int32) + 1 - (offset + T)
            for c in cache:
                if isinstance(c, AttentionCache):
                    c.rope_delta = rope_delta
        if attn_cache is not None:
            # Every attention layer's cache knows the padding, so batches can split and merge.
            for c in cache:
                if isinstance(c, AttentionCache):
                    c.key_mask = attn_cache.key_mask
        if self.pipeline_group is not None:
            from .distributed import run_pipeline_stage

            h = run_pipeline_stage(self, h, cache, mask, position_ids, pad_mask)
            return None if fill_only else self.norm(h)
        last = len(self.layers) - 1
        for i, (layer, c) in enumerate(zip(self.layers, cache, strict=False)):
            if fill_only and i == last and not layer.is_linear and c is not None:
                # Nothing reads this layer's output, only its keys/values: skip the attention
                # (the costly part of a long prefill step) and the MLP.
                layer.self_attn.fill_cache(layer.input_layernorm(h), c, position_ids)
                return None
            h = layer(h, mask, c, position_ids, pad_mask)
        return None if fill_only else self.norm(h)


def _masks_and_positions(
    B: int,
    T: int,
    cache: Any,
    attention_mask: mx.array | None,
    position_ids: mx.array | None,
) -> tuple[Any, mx.array | None, mx.array | None, bool]:
    """The attention mask, the DeltaNet padding mask and the rotary positions for one call, and
    whether the positions are explicit (given, or counted around padding) rather than following
    the cache offset.

    A token at cache index n has position n + rope_delta (rope_delta from the cache, 0 if unset).
    Without padding the attention mask is plain causal and positions follow the cache: the
    attention layers give rotary the offset (plus each row's rope_delta, when set), its fast
    path. With left padding (attention_mask: 1 = real token) padded keys are masked out, padded
    DeltaNet inputs are zeroed, and real tokens count positions on from the row's next position;
    the cache remembers the key mask so that later calls (and batches that split or merge rows)
    continue the same way.
    """
    offset = cache.offset if cache is not None else 0
    key_mask = cache.key_mask if isinstance(cache, AttentionCache) else None
    rope_delta = cache.rope_delta if isinstance(cache, AttentionCache) else None
    explicit = position_ids is not None
    pad_mask = None
    if attention_mask is not None:
        pad_mask = attention_mask.astype(mx.bool_)
        if bool(mx.all(pad_mask)):
            pad_mask = None
    if pad_mask is not None or key_mask is not None:
        step_mask = pad_mask if pad_mask is not None else mx.ones((B, T), dtype=mx.bool_)
        if key_mask is None:
            key_mask = mx.ones((B, offset), dtype=mx.bool_)
        key_mask = mx.concatenate([key_mask, step_mask], axis=1)  # [B, offset + T]
        mask = PaddingMask(key_mask)  # the attention builds its [rows, keys] slices from it
        if isinstance(cache, AttentionCache):
            cache.key_mask = key_mask
    else:
        mask = "causal" if T > 1 else None
    if position_ids is None and pad_mask is not None:
        start = offset + (rope_delta if rope_delta is not None else mx.zeros((B,), mx.int32))
        # Real tokens count on from the row's next position; padded slots (masked) repeat it.
        steps = mx.maximum(mx.cumsum(pad_mask.astype(mx.int32), axis=1) - 1, 0)
        explicit = True
        pos = start[:, None] + steps
        position_ids = mx.broadcast_to(pos[None], (3, B, T))
    return mask, pad_mask, position_ids, explicit


class LanguageModel(nn.Module):
    def __init__(self, args: TextConfig):
        super().__init__()
        self.args = args
        self.model = Qwen3_5TextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            embed = self.model.embed_tokens
            if isinstance(embed, nn.QuantizedEmbedding):
                return embed.as_linear(hidden)
            return linear(hidden, embed.weight)
        return self.lm_head(hidden)


class Model(nn.Module):
    """Qwen3.5 (dense): `model(input_ids, cache=...) -> logits [B, T, vocab]`.

    With a vision tower (config.vision set), images and videos go in as the processor returns
    them: `model(input_ids, cache, pixel_values=..., image_grid_thw=...)`, or prepared once with
    `prepare_inputs` and then passed as `input_embeddings` / `position_ids` (chunked prefill).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.args = config.text
        self.model_type = config.model_type
        self.language_model = LanguageModel(config.text)
        if config.vision is not None:
            self.vision_tower = VisionModel(config.vision)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.language_model.model.layers

    def make_cache(self) -> list[Any]:
        return make_cache(self.args.layer_types)

    def embed(self, input_ids: mx.array) -> mx.array:
        return self.language_model.model.embed_tokens(input_ids)

    def prepare_inputs(
        self,
        input_ids: Any,
        cache: list[Any] | None = None,
        *,
        pixel_values: Any = None,
        image_grid_thw: Any = None,
        pixel_values_videos: Any = None,
        video_grid_thw: Any = None,
        attention_mask: Any = None,
        start: Any = None,
    ) -> tuple[mx.array, mx.array | None]:
        """(input_embeddings [B, T, H], position_ids [3, B, T] or None) for a prompt chunk.

        The vision tower runs here, once: image and video features replace the embeddings of the
        `<|image_pad|>` / `<|video_pad|>` tokens, in order over the batch (row 0 first). Positions
        continue the walk from where `cache` stands (0 for a fresh one), so a later turn with new
        images follows the earlier ones; they are None for plain text (the fast path). Pass the
        result to `__call__` / `hidden_states` as `input_embeddings` and `position_ids`, whole or
        sliced along T for chunked prefill. `start` ([B] ints) gives the rows' next positions
        instead of `cache` (the engine resumes from a prefix-cache entry, not a cache object).
        """
        ids = _as_int_array(input_ids, "input_ids")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise UserError(f"input_ids must be [B, T], got shape {list(ids.shape)}")
        ids_np = np.array(ids)
        h = self.embed(ids)
        media = (
            ("image", self.config.image_token_id, pixel_values, image_grid_thw),
            ("video", self.config.video_token_id, pixel_values_videos, video_grid_thw),
        )
        grids: dict[str, np.ndarray | None] = {}
        for kind, token_id, pixels, grid in media:
            slots = np.flatnonzero(ids_np.reshape(-1) == token_id)
            grids[kind] = None if grid is None else np.asarray(grid, dtype=np.int64).reshape(-1, 3)
            if pixels is None and grid is None:
                if slots.size:
                    raise UserError(
                        f"input_ids hold {slots.size} {kind} pad tokens but no {kind} was given; "
                        f"pass the processor's pixel_values{'_videos' if kind == 'video' else ''} "
                        f"and {kind}_grid_thw"
                    )
                continue
            features = self._vision_features(kind, pixels, grid)
            if features.shape[0] != slots.size:
                raise UserError(
                    f"input_ids hold {slots.size} {kind} pad tokens but the {kind}s give "
                    f"{features.shape[0]} feature rows; expand the prompt's placeholders with the "
                    "processor (one placeholder per item, in order)"
                )
            flat = h.reshape(-1, h.shape[-1])
            flat[mx.array(slots)] = features.astype(h.dtype)
            h = flat.reshape(h.shape)
        multimodal = grids["image"] is not None or grids["video"] is not None
        if not multimodal:
            return h, None
        vision = self.config.vision
        positions, _ = rope_index(
            ids_np,
            grids["image"],
            grids["video"],
            image_token_id=self.config.image_token_id,
            video_token_id=self.config.video_token_id,
            spatial_merge_size=vision.spatial_merge_size,
            attention_mask=None if attention_mask is None else np.array(attention_mask),
            start=self.next_positions(cache, ids.shape[0])
            if start is None
            else np.asarray(start, dtype=np.int64).reshape(-1),
        )
        return h, mx.array(positions.astype(np.int32))

    def _vision_features(self, kind: str, pixels: Any, grid: Any) -> mx.array:
        if not hasattr(self, "vision_tower"):
            raise UserError(
                f"this model has no vision tower (its config.json has no vision_config), so it "
                f"cannot take {kind}s; use a multimodal Qwen3.5 checkpoint or pass text only"
            )
        if pixels is None or grid is None:
            given, missing = ("grid", "pixels") if pixels is None else ("pixels", "grid")
            raise UserError(
                f"{kind} {given} were given without their {missing}; pass both arrays the "
                "processor returns"
            )
        return self.vision_tower(pixels, grid)

    def next_positions(self, cache: list[Any] | None, batch: int = 1) -> np.ndarray:
        """[batch] int64: the rotary position the next token of each row takes (cache offset +
        rope_delta; 0 for no cache)."""
        kv = next((c for c in cache or [] if isinstance(c, AttentionCache)), None)
        if kv is None:
            return np.zeros(batch, dtype=np.int64)
        start = np.full(batch, kv.offset, dtype=np.int64)
        if kv.rope_delta is not None:
            start = start + np.array(kv.rope_delta).astype(np.int64)
        return start

    def hidden_states(
        self,
        inputs: mx.array | None,
        cache: list[Any] | None = None,
        *,
        attention_mask: mx.array | None = None,
        position_ids: mx.array | None = None,
        input_embeddings: mx.array | None = None,
        fill_only: bool = False,
        **media: Any,
    ) -> mx.array | None:
        """The final-norm hidden states [B, T, H] (what feeds the head). `media`: the vision
        arguments of `__call__`. fill_only: a prefill step that only needs the caches filled
        (not the last of a prompt): returns None, and skips the work whose result nothing reads
        (the last layer's attention and MLP)."""
        release_thread_state_at_exit()  # every forward compiles; see threads.py
        if attention_mask is not None:
            attention_mask = mx.array(attention_mask)
        if any(v is not None for v in media.values()):
            if input_embeddings is not None:
                raise UserError(
                    "pass either input_embeddings or pixel values, not both; prepare_inputs "
                    "already merged the vision features into the embeddings"
                )
            if inputs is None:
                raise UserError("pixel values need the input_ids that hold their pad tokens")
            input_embeddings, prepared = self.prepare_inputs(
                inputs, cache, attention_mask=attention_mask, **media
            )
            if position_ids is None:
                position_ids = prepared
        h = input_embeddings if input_embeddings is not None else self.embed(inputs)
        if position_ids is not None:
            position_ids = mx.array(position_ids)
        return self.language_model.model(h, cache, attention_mask, position_ids, fill_only)

    def __call__(
        self,
        inputs: mx.array | None = None,
        cache: list[Any] | None = None,
        *,
        input_ids: mx.array | None = None,
        attention_mask: mx.array | None = None,
        position_ids: mx.array | None = None,
        input_embeddings: mx.array | None = None,
        pixel_values: Any = None,
        image_grid_thw: Any = None,
        pixel_values_videos: Any = None,
        video_grid_thw: Any = None,
    ) -> mx.array:
        """Logits [B, T, vocab]. `input_ids` is an alias of `inputs`, so the processor's output
        can be passed as `model(**inputs)` the way transformers users do."""
        hidden = self.hidden_states(
            inputs if inputs is not None else input_ids,
            cache,
            attention_mask=attention_mask,
            position_ids=position_ids,
            input_embeddings=input_embeddings,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
        )
        return self.language_model.logits(hidden)

    def shard(self, group: Any = None) -> None:
        """Tensor parallelism over `group` (default: `mx.distributed.init()`), mlx-lm's name:
        every rank keeps a slice of the heads and hidden units of every layer; see
        `distributed.py`."""
        from .distributed import shard

        shard(self, group)

    def pipeline(self, group: Any = None, split: list[int] | None = None) -> None:
        """Pipeline parallelism over `group`, mlx-lm's name: every rank keeps a range of the
        layers (`split`: layers per rank, rank 0 last); see `distributed.py`."""
        from .distributed import pipeline

        pipeline(self, group, split)

    @property
    def cast_predicate(self):
        # A_log stays fp32 whatever dtype the rest is cast to (mlx-lm's convert honours this).
        return lambda path: not path.endswith("A_log")


def _as_int_array(x: Any, name: str) -> mx.array:
    arr = x if isinstance(x, mx.array) else mx.array(np.asarray(x))
    if not mx.issubdtype(arr.dtype, mx.integer):
        raise UserError(f"{name} must hold integer token ids, got {arr.dtype}")
    return arr
