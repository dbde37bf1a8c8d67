"""Caches for the hybrid decoder, following mlx-lm's prompt-cache protocol.

Full-attention layers keep keys/values (plus where the 3-D rotary positions stand); Gated DeltaNet
layers keep the last K-1 raw projections for the causal conv and the fp32 recurrent state, neither
of which can be trimmed token by token.

The classes are our own rather than subclasses of mlx-lm's: importing any `mlx_lm` module runs its
package `__init__`, which imports transformers (and torch when installed), ~2 s before a command
can do anything. They keep mlx-lm's method names (`update_and_fetch`, `offset`, `state`,
`is_trimmable`, `trim`, `size`, `empty`, `nbytes`), so mlx-lm's generation utilities still drive
the model.

Batches of rows (the engine's continuous batching) use the same classes: `merge` stacks the rows
of several caches on the batch axis, `filter` keeps some rows, `extract` copies one row out. KV
rows of different lengths are left-padded to the longest: every row then writes the same cache
index at each decode step (a plain slice update, in place), padded keys are masked by `key_mask`,
and `rope_delta` shifts each row's positions back by its padding. The Gated DeltaNet states have
no time axis, so their rows are simply stacked: padding never reaches a recurrent state.

MLX semantics these methods respect: a slice write into a buffer that another array still views
copies the whole buffer, and a view keeps its whole buffer alive. So whatever leaves a cache
(`extract`, `prefix`) is a copy (`owned_copy`), and a merged or filtered cache owns fresh
buffers, which the next decode step then updates in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx


def owned_copy(x: mx.array) -> mx.array:
    """A row-contiguous copy of `x` that shares no buffer with it. (`mx.array(x)` copies but keeps
    a transposed view's strides, and `mx.contiguous` alone may return a view; a state must have
    the layout a loaded one has, or later results differ in the last bits.)"""
    return mx.contiguous(mx.array(x))


def _capacity(length: int, step: int) -> int:
    """Room for `length` positions and at least one more, in whole steps."""
    return (length // step + 1) * step


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

    # ---------------------------------------------------------------- rows of a batch

    @property
    def batch_size(self) -> int:
        return 0 if self.keys is None else self.keys.shape[0]

    def row_padding(self) -> list[int]:
        """Left padding of each row: the positions before its first real token."""
        if self.key_mask is None:
            return [0] * self.batch_size
        real = mx.sum(self.key_mask.astype(mx.int32), axis=1)
        return [self.offset - n for n in real.tolist()]

    # A snapshot (the prefix cache's, a saved session's) is a tuple of arrays per layer, made by
    # `snapshot` and turned back into a one-row cache by `from_snapshot`; `kind` names the class
    # in saved files (CACHE_KINDS).
    kind = "kv"

    def snapshot(self, length: int) -> tuple[mx.array, mx.array]:
        """Copies of the first `length` positions of a one-row, unpadded cache: (keys, values)
        [1, n_kv_heads, length, head_dim]."""
        if self.batch_size != 1 or self.key_mask is not None or not 0 < length <= self.offset:
            raise ValueError(f"snapshot({length}) needs an unpadded one-row cache of >= {length}")
        return owned_copy(self.keys[..., :length, :]), owned_copy(self.values[..., :length, :])

    @classmethod
    def from_snapshot(cls, arrays: Sequence[mx.array], rope_delta: mx.array | None) -> KVCache:
        """A one-row cache holding keys/values [1, n_kv, n, d] (copied into a buffer with room to
        grow, so that the snapshot stays untouched)."""
        keys, values = arrays
        cache = cls()
        n = keys.shape[2]
        cache.keys = _fresh(keys, _capacity(n, cls.step))
        cache.values = _fresh(values, _capacity(n, cls.step))
        cache.offset = n
        cache.rope_delta = rope_delta
        return cache

    @classmethod
    def merge(cls, caches: Sequence[KVCache]) -> KVCache:
        """The rows of `caches` stacked in order, each left-padded to the longest."""
        length = max(c.offset for c in caches)
        merged = cls()
        cap = _capacity(length, cls.step)
        parts_k, parts_v, masks, deltas = [], [], [], []
        padded = False
        for c in caches:
            b, shift = c.batch_size, length - c.offset
            padded = padded or shift > 0 or c.key_mask is not None
            parts_k.append((c.keys[..., : c.offset, :], shift))
            parts_v.append((c.values[..., : c.offset, :], shift))
            own = c.key_mask if c.key_mask is not None else mx.ones((b, c.offset), mx.bool_)
            masks.append(mx.concatenate([mx.zeros((b, shift), mx.bool_), own], axis=1))
            delta = c.rope_delta if c.rope_delta is not None else mx.zeros((b,), mx.int32)
            deltas.append(delta.astype(mx.int32) - shift)
        merged.keys = _stack_right_aligned(parts_k, length, cap)
        merged.values = _stack_right_aligned(parts_v, length, cap)
        merged.offset = length
        merged.key_mask = mx.concatenate(masks, axis=0) if padded else None
        if padded or any(c.rope_delta is not None for c in caches):
            merged.rope_delta = mx.concatenate(deltas)
        return merged

    def filter(self, keep: Sequence[int]) -> None:
        """Keep only the rows `keep` (in that order), dropping the padding they all share."""
        pads = self.row_padding()
        drop = min(pads[i] for i in keep)
        idx = mx.array(list(keep))
        length = self.offset - drop
        cap = _capacity(length, self.step)
        self.keys = _fresh(self.keys[idx][..., drop : self.offset, :], cap)
        self.values = _fresh(self.values[idx][..., drop : self.offset, :], cap)
        self.offset = length
        if self.key_mask is not None:
            mask = self.key_mask[idx][:, drop:]
            self.key_mask = None if all(pads[i] == drop for i in keep) else mask
        if self.rope_delta is not None:
            self.rope_delta = self.rope_delta[idx] + drop

    def extract(self, row: int) -> KVCache:
        """Row `row` alone, without its padding, as a new cache of copies."""
        pad = self.row_padding()[row]
        out = KVCache()
        out.keys = owned_copy(self.keys[row : row + 1, :, pad : self.offset])
        out.values = owned_copy(self.values[row : row + 1, :, pad : self.offset])
        out.offset = self.offset - pad
        if self.rope_delta is not None:
            out.rope_delta = self.rope_delta[row : row + 1] + pad
        return out


def _fresh(x: mx.array, capacity: int) -> mx.array:
    """A new buffer of `capacity` positions (axis 2) holding `x` at its start."""
    shape = list(x.shape)
    shape[2] = capacity
    out = mx.zeros(shape, x.dtype)
    out[:, :, : x.shape[2]] = x
    return out


def _stack_right_aligned(parts: list[tuple[mx.array, int]], length: int, cap: int) -> mx.array:
    """Rows of `parts` ((rows [b, h, n, d], left shift)) stacked into one [B, h, cap, d] buffer,
    each row ending at position `length`."""
    first = parts[0][0]
    B = sum(x.shape[0] for x, _ in parts)
    out = mx.zeros((B, first.shape[1], cap, first.shape[3]), first.dtype)
    r = 0
    for x, shift in parts:
        out[r : r + x.shape[0], :, shift:length] = x
        r += x.shape[0]
    return out


class GatedDeltaCache:
    """cache[0]: conv state [B, K-1, C] (activation dtype); cache[1]: state [B, Hv, Dv, Dk] fp32."""

    kind = "gdn"

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

    # ---------------------------------------------------------------- rows of a batch

    @property
    def batch_size(self) -> int:
        return 0 if self.cache[1] is None else self.cache[1].shape[0]

    @classmethod
    def merge(cls, caches: Sequence[GatedDeltaCache]) -> GatedDeltaCache:
        """The rows of `caches` stacked in order."""
        merged = cls()
        merged.cache = [mx.concatenate([c.cache[i] for c in caches]) for i in range(2)]
        return merged

    def filter(self, keep: Sequence[int]) -> None:
        idx = mx.array(list(keep))
        self.cache = [c[idx] for c in self.cache]

    def extract(self, row: int) -> GatedDeltaCache:
        """Row `row` alone, as copies (a view would keep the whole batch's states alive)."""
        out = GatedDeltaCache()
        out.cache = [owned_copy(c[row : row + 1]) for c in self.cache]
        return out

    def snapshot(self, length: int) -> tuple[mx.array, mx.array]:
        """Copies of (conv state, recurrent state) of a one-row cache (the conv state may be a
        view of a whole prefill window); `length` is for the protocol: no time axis here."""
        return owned_copy(self.cache[0]), owned_copy(self.cache[1])

    @classmethod
    def from_snapshot(
        cls, arrays: Sequence[mx.array], rope_delta: mx.array | None = None
    ) -> GatedDeltaCache:
        cache = cls()
        cache.cache = list(arrays)  # never written in place: each step makes new state arrays
        return cache


CACHE_KINDS = {"kv": KVCache, "gdn": GatedDeltaCache}


def make_cache(layer_types: list[str]) -> list[Any]:
    return [GatedDeltaCache() if kind == "linear_attention" else KVCache() for kind in layer_types]
