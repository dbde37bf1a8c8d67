"""Caches for the hybrid decoder, following mlx-lm's prompt-cache protocol.

Full-attention layers keep keys/values (plus where the 3-D rotary positions stand); Gated DeltaNet
layers keep the last K-1 raw projections for the causal conv and the fp32 recurrent state, neither
of which can be trimmed token by token.

The classes are our own rather than subclasses of mlx-lm's: importing any `mlx_lm` module runs its
package `__init__`, which imports transformers (and torch when installed), ~2 s before a command
can do anything. They keep mlx-lm's method names (`update_and_fetch`, `offset`, `state`,
`is_trimmable`, `trim`, `size`, `empty`, `nbytes`), so mlx-lm's generation utilities still drive
the model.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx


class KVCache:
    """Keys/values [B, n_kv_heads, S, head_dim], grown in steps of `step` positions.

    rope_delta [B]: a token at cache index n has rotary position n + rope_delta (negative after
        images, whose tokens advance the position by less than their count; minus the padding for
        left-padded rows).
    key_mask [B, S]: False at left-padding positions; None when no row is padded.
    """

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self.rope_delta: mx.array | None = None
        self.key_mask: mx.array | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev = self.offset
        T = keys.shape[2]
        if self.keys is None or prev + T > self.keys.shape[2]:
            B, n_kv, _, k_dim = keys.shape
            grow = (self.step + T - 1) // self.step * self.step
            new_k = mx.zeros((B, n_kv, grow, k_dim), keys.dtype)
            new_v = mx.zeros((B, n_kv, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                kept_k, kept_v = self.keys[..., :prev, :], self.values[..., :prev, :]
                self.keys = mx.concatenate([kept_k, new_k], axis=2)
                self.values = mx.concatenate([kept_v, new_v], axis=2)
        self.offset += T
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def state(self) -> tuple[mx.array | None, mx.array | None, int]:
        return self.keys, self.values, self.offset

    @state.setter
    def state(self, value: tuple[mx.array, mx.array, int]) -> None:
        self.keys, self.values, self.offset = value

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        if self.key_mask is not None:
            self.key_mask = self.key_mask[:, : self.offset]
        return n

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class GatedDeltaCache:
    """cache[0]: conv state [B, K-1, C] (activation dtype); cache[1]: state [B, Hv, Dv, Dk] fp32."""

    def __init__(self) -> None:
        self.cache: list[mx.array | None] = [None, None]

    def __getitem__(self, idx: int) -> mx.array | None:
        return self.cache[idx]

    def __setitem__(self, idx: int, value: mx.array | None) -> None:
        self.cache[idx] = value

    @property
    def conv_state(self) -> mx.array | None:
        return self.cache[0]

    @property
    def recurrent_state(self) -> mx.array | None:
        return self.cache[1]

    @property
    def state(self) -> list[mx.array | None]:
        return self.cache

    @state.setter
    def state(self, value: list[mx.array | None]) -> None:
        self.cache = list(value)

    def is_trimmable(self) -> bool:
        return False

    def size(self) -> int:
        return 0

    def empty(self) -> bool:
        return self.cache[0] is None

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache if c is not None)


def make_cache(layer_types: list[str]) -> list[Any]:
    return [GatedDeltaCache() if kind == "linear_attention" else KVCache() for kind in layer_types]
