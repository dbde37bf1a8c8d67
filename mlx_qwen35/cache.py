"""Caches for the hybrid decoder, compatible with mlx-lm's prompt-cache protocol.

Full-attention layers keep keys/values (mlx-lm's KVCache, plus where the 3-D rotary positions
stand); Gated DeltaNet layers keep the last K-1 raw projections for the causal conv and the fp32
recurrent state, neither of which can be trimmed token by token.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache
from mlx_lm.models.cache import KVCache as _MlxLmKVCache


class KVCache(_MlxLmKVCache):
    """mlx-lm's KVCache plus the bookkeeping a multimodal, left-padded prompt needs.

    rope_delta [B]: a token at cache index n has rotary position n + rope_delta (negative after
        images, whose tokens advance the position by less than their count; minus the padding for
        left-padded rows).
    key_mask [B, S]: False at left-padding positions; None when no row is padded.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rope_delta: mx.array | None = None
        self.key_mask: mx.array | None = None


class GatedDeltaCache(ArraysCache):
    """cache[0]: conv state [B, K-1, C] (activation dtype); cache[1]: state [B, Hv, Dv, Dk] fp32."""

    def __init__(self) -> None:
        super().__init__(size=2)

    @property
    def conv_state(self) -> mx.array | None:
        return self.cache[0]

    @property
    def recurrent_state(self) -> mx.array | None:
        return self.cache[1]


def make_cache(layer_types: list[str]) -> list[Any]:
    return [
        GatedDeltaCache() if kind == "linear_attention" else KVCache() for kind in layer_types
    ]
