"""Caches for the hybrid decoder, following mlx-lm's prompt-cache protocol.

Full-attention layers keep keys/values (plus where the 3-D rotary positions stand); Gated DeltaNet
layers keep the last K-1 raw projections for the causal conv and the fp32 recurrent state, neither
of which can be trimmed token by token.

The full-attention caches come in two formats with mlx-lm's names: `KVCache` (keys/values in the
activation dtype) and `QuantizedKVCache` (keys/values as `mx.quantize` triples, `kv_bits` 4 or 8
per element plus a scale and bias per `kv_group_size` elements). As in mlx-lm, a run with
`kv_bits` starts unquantized and `maybe_quantize_kv_cache` swaps each `KVCache` of the list for its
quantized copy once it holds `quantized_kv_start` tokens; only the full-attention layers change,
the recurrent states stay fp32.

The classes are our own rather than subclasses of mlx-lm's: importing any `mlx_lm` module runs its
package `__init__`, which imports transformers (and torch when installed), ~2 s before a command
can do anything. They keep mlx-lm's method names (`update_and_fetch`, `offset`, `state`,
`is_trimmable`, `trim`, `size`, `empty`, `nbytes`, `to_quantized`, and `bits`/`group_size` on the
quantized one, which is how mlx-lm's attention recognises it), so mlx-lm's generation utilities
still drive the model.

Batches of rows (the engine's continuous batching) use the same classes: `merge` stacks the rows
of several caches on the batch axis, `filter` keeps some rows, `extract` copies one row out. KV
rows of different lengths are left-padded to the longest: every row then writes the same cache
index at each decode step (a plain slice update, in place), padded keys are masked by `key_mask`,
and `rope_delta` shifts each row's positions back by its padding. The Gated DeltaNet states have
no time axis, so their rows are simply stacked: padding never reaches a recurrent state. Both KV
formats share this row handling (`AttentionCache`): it moves every array that has a position
axis (keys and values, or their packed values, scales and biases) the same way.

MLX semantics these methods respect: a slice write into a buffer that another array still views
copies the whole buffer, and a view keeps its whole buffer alive. So whatever leaves a cache
(`extract`, `prefix`) is a copy (`owned_copy`), and a merged or filtered cache owns fresh
buffers, which the next decode step then updates in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from ..errors import UserError

# mlx-lm's defaults (mlx_lm.generate): quantize once the cache holds 5000 tokens, groups of 64.
DEFAULT_QUANTIZED_KV_START = 5000
DEFAULT_KV_GROUP_SIZE = 64
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)


def owned_copy(x: mx.array) -> mx.array:
    """A row-contiguous copy of `x` that shares no buffer with it. (`mx.array(x)` copies but keeps
    a transposed view's strides, and `mx.contiguous` alone may return a view; a state must have
    the layout a loaded one has, or later results differ in the last bits.)"""
    return mx.contiguous(mx.array(x))


def _capacity(length: int, step: int) -> int:
    """Room for `length` positions and at least one more, in whole steps."""
    return (length // step + 1) * step


class AttentionCache:
    """What both KV formats share: where positions stand, and moving rows of a batch.

    offset: how many positions the cache holds.
    rope_delta [B]: a token at cache index n has rotary position n + rope_delta (negative after
        images, whose tokens advance the position by less than their count; minus the padding for
        left-padded rows).
    key_mask [B, S]: False at left-padding positions; None when no row is padded.

    Subclasses store their keys/values as arrays [B, n_kv_heads, S, ...] (`_parts`), all with the
    positions on axis 2.
    """

    step = 256

    def __init__(self) -> None:
        self.offset = 0
        self.rope_delta: mx.array | None = None
        self.key_mask: mx.array | None = None

    def _parts(self) -> list[mx.array]:
        raise NotImplementedError

    def _set_parts(self, parts: Sequence[mx.array]) -> None:
        raise NotImplementedError

    def _empty_like(self) -> AttentionCache:
        """An empty cache of the same format."""
        raise NotImplementedError

    def _grown(self, T: int) -> int | None:
        """How many positions to add when T more do not fit, else None."""
        if not self.empty() and self.offset + T <= self._parts()[0].shape[2]:
            return None
        return (self.step + T - 1) // self.step * self.step

    def _store(self, new: Sequence[mx.array]) -> list[mx.array]:
        """Write `new` (one array per part, T positions each) after the cached positions, growing
        the buffers in steps; the filled parts [..., :offset, :]."""
        prev = self.offset
        T = new[0].shape[2]
        grow = self._grown(T)
        if grow is not None:
            if self.empty():
                self._set_parts([_zeros_rows(x, grow) for x in new])
            else:
                self._set_parts(
                    [
                        mx.concatenate([x[..., :prev, :], _zeros_rows(x, grow)], axis=2)
                        for x in self._parts()
                    ]
                )
        self.offset += T
        for x, y in zip(self._parts(), new, strict=True):
            x[..., prev : self.offset, :] = y
        return [x[..., : self.offset, :] for x in self._parts()]

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
        return not self._parts()

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self._parts())

    # ---------------------------------------------------------------- rows of a batch

    @property
    def batch_size(self) -> int:
        return 0 if self.empty() else self._parts()[0].shape[0]

    def row_padding(self) -> list[int]:
        """Left padding of each row: the positions before its first real token."""
        if self.key_mask is None:
            return [0] * self.batch_size
        real = mx.sum(self.key_mask.astype(mx.int32), axis=1)
        return [self.offset - n for n in real.tolist()]

    def _prefix_parts(self, length: int) -> list[mx.array]:
        """Copies of the first `length` positions of a one-row, unpadded cache."""
        if self.batch_size != 1 or self.key_mask is not None or not 0 < length <= self.offset:
            raise ValueError(f"prefix({length}) needs an unpadded one-row cache of >= {length}")
        return [owned_copy(x[..., :length, :]) for x in self._parts()]

    def _fill(self, parts: Sequence[mx.array], rope_delta: mx.array | None) -> AttentionCache:
        """Hold copies of `parts` ([1, n_kv, n, ...]) in buffers with room to grow."""
        n = parts[0].shape[2]
        self._set_parts([_fresh(x, _capacity(n, self.step)) for x in parts])
        self.offset = n
        self.rope_delta = rope_delta
        return self

    @classmethod
    def merge(cls, caches: Sequence[AttentionCache]) -> AttentionCache:
        """The rows of `caches` (all of one format) stacked in order, each left-padded to the
        longest."""
        formats = {c.kv_format for c in caches}
        if len(formats) > 1:
            raise ValueError(f"cannot batch KV caches of different formats {formats}")
        length = max(c.offset for c in caches)
        merged = caches[0]._empty_like()
        cap = _capacity(length, cls.step)
        rows: list[list[tuple[mx.array, int]]] = []
        masks, deltas = [], []
        padded = False
        for c in caches:
            b, shift = c.batch_size, length - c.offset
            padded = padded or shift > 0 or c.key_mask is not None
            rows.append([(x[..., : c.offset, :], shift) for x in c._parts()])
            own = c.key_mask if c.key_mask is not None else mx.ones((b, c.offset), mx.bool_)
            masks.append(mx.concatenate([mx.zeros((b, shift), mx.bool_), own], axis=1))
            delta = c.rope_delta if c.rope_delta is not None else mx.zeros((b,), mx.int32)
            deltas.append(delta.astype(mx.int32) - shift)
        merged._set_parts(
            [_stack_right_aligned(list(part), length, cap) for part in zip(*rows, strict=True)]
        )
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
        self._set_parts([_fresh(x[idx][..., drop : self.offset, :], cap) for x in self._parts()])
        self.offset = length
        if self.key_mask is not None:
            mask = self.key_mask[idx][:, drop:]
            self.key_mask = None if all(pads[i] == drop for i in keep) else mask
        if self.rope_delta is not None:
            self.rope_delta = self.rope_delta[idx] + drop

    def extract(self, row: int) -> AttentionCache:
        """Row `row` alone, without its padding, as a new cache of copies."""
        pad = self.row_padding()[row]
        out = self._empty_like()
        out._set_parts([owned_copy(x[row : row + 1, :, pad : self.offset]) for x in self._parts()])
        out.offset = self.offset - pad
        if self.rope_delta is not None:
            out.rope_delta = self.rope_delta[row : row + 1] + pad
        return out


class KVCache(AttentionCache):
    """Keys/values [B, n_kv_heads, S, head_dim] in the activation dtype, grown in steps of
    `step` positions."""

    kv_format = None

    def __init__(self) -> None:
        super().__init__()
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def _parts(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    def _set_parts(self, parts: Sequence[mx.array]) -> None:
        self.keys, self.values = parts

    def _empty_like(self) -> KVCache:
        return KVCache()

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        k, v = self._store([keys, values])
        return k, v

    @property
    def state(self) -> tuple[mx.array | None, mx.array | None, int]:
        return self.keys, self.values, self.offset

    @state.setter
    def state(self, value: tuple[mx.array, mx.array, int]) -> None:
        self.keys, self.values, self.offset = value

    def to_quantized(
        self, group_size: int = DEFAULT_KV_GROUP_SIZE, bits: int = 4
    ) -> QuantizedKVCache:
        """A QuantizedKVCache holding these positions (rope_delta and key_mask carried over)."""
        quant = QuantizedKVCache(group_size=group_size, bits=bits)
        quant.offset, quant.rope_delta, quant.key_mask = self.offset, self.rope_delta, self.key_mask
        if self.keys is not None:
            # The whole buffer, so the copy keeps the capacity (free slots quantize to zeros).
            quant.keys = mx.quantize(self.keys, group_size, bits)
            quant.values = mx.quantize(self.values, group_size, bits)
        return quant

    def prefix(self, length: int) -> tuple[mx.array, mx.array]:
        """Copies of the first `length` positions of a one-row, unpadded cache: (keys, values)
        [1, n_kv_heads, length, head_dim]."""
        keys, values = self._prefix_parts(length)
        return keys, values

    @classmethod
    def from_prefix(cls, keys: mx.array, values: mx.array, rope_delta: mx.array | None) -> KVCache:
        """A one-row cache holding `keys`/`values` [1, n_kv, n, d] (copied into a buffer with room
        to grow, so that the arrays given stay untouched)."""
        cache = cls()
        cache._fill([keys, values], rope_delta)
        return cache


Quantized = tuple[mx.array, mx.array, mx.array]  # mx.quantize's (packed uint32, scales, biases)


class QuantizedKVCache(AttentionCache):
    """Keys/values as `mx.quantize` triples: packed [B, n_kv, S, head_dim * bits / 32] uint32,
    scales and biases [B, n_kv, S, head_dim / group_size] in the activation dtype.

    Each new position is quantized once, when it is stored; attention reads the triples with
    `mx.quantized_matmul` (`model/attention.py`).
    """

    def __init__(self, group_size: int = DEFAULT_KV_GROUP_SIZE, bits: int = 8) -> None:
        super().__init__()
        self.group_size = group_size
        self.bits = bits
        self.keys: Quantized | None = None
        self.values: Quantized | None = None

    @property
    def kv_format(self) -> tuple[int, int]:
        """(bits, group_size): what batches, prefix snapshots and session files must match."""
        return self.bits, self.group_size

    def _parts(self) -> list[mx.array]:
        return [] if self.keys is None else [*self.keys, *self.values]

    def _set_parts(self, parts: Sequence[mx.array]) -> None:
        self.keys, self.values = tuple(parts[:3]), tuple(parts[3:])

    def _empty_like(self) -> QuantizedKVCache:
        return QuantizedKVCache(self.group_size, self.bits)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Quantized, Quantized]:
        q_keys = mx.quantize(keys, self.group_size, self.bits)
        q_values = mx.quantize(values, self.group_size, self.bits)
        parts = self._store([*q_keys, *q_values])
        return tuple(parts[:3]), tuple(parts[3:])

    @property
    def state(self) -> tuple[Quantized | None, Quantized | None, int, int, int]:
        return self.keys, self.values, self.offset, self.group_size, self.bits

    @state.setter
    def state(self, value: tuple[Quantized, Quantized, int, int, int]) -> None:
        keys, values, self.offset, self.group_size, self.bits = value
        self.keys = None if keys is None else tuple(keys)
        self.values = None if values is None else tuple(values)

    def prefix(self, length: int) -> tuple[Quantized, Quantized]:
        """Copies of the first `length` positions of a one-row, unpadded cache: (keys, values)
        triples."""
        parts = self._prefix_parts(length)
        return tuple(parts[:3]), tuple(parts[3:])

    @classmethod
    def from_prefix(
        cls,
        keys: Quantized,
        values: Quantized,
        rope_delta: mx.array | None,
        group_size: int,
        bits: int,
    ) -> QuantizedKVCache:
        """A one-row cache holding copies of the `keys`/`values` triples."""
        cache = cls(group_size, bits)
        cache._fill([*keys, *values], rope_delta)
        return cache


def _zeros_rows(x: mx.array, rows: int) -> mx.array:
    """Zeros shaped like `x` with `rows` positions (axis 2)."""
    return mx.zeros((*x.shape[:2], rows, *x.shape[3:]), x.dtype)


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
    """cache[0]: conv state [B, K-1, C] (activation dtype); cache[1]: state [B, Hv, Dv, Dk] fp32.

    The recurrent state cannot be trimmed token by token, so speculative decoding asks the layer
    to record its per-token states during a verify call (`record_steps = True`): `steps` then holds
    (states [B, T, Hv, Dv, Dk] fp32, conv window u [B, K-1+T, C]) of that call, and
    `keep_steps(n)` rolls the cache back to just after its first n tokens without recomputing.
    """

    def __init__(self) -> None:
        self.cache: list[mx.array | None] = [None, None]
        self.record_steps = False
        self.steps: tuple[mx.array, mx.array] | None = None

    def keep_steps(self, n: int | mx.array) -> None:
        """Keep the first n tokens of the last recorded call (1 <= n <= T; an int, or one count
        per row as a [B] int array), then forget the recording."""
        if self.steps is None:
            raise RuntimeError("keep_steps needs a call made with record_steps = True")
        states, window = self.steps
        B, T = states.shape[:2]
        K1 = window.shape[1] - T  # K - 1
        if isinstance(n, int):
            if not 1 <= n <= T:
                raise ValueError(f"can keep 1 to {T} recorded tokens, got {n}")
            self.cache[1] = states[:, n - 1]
            self.cache[0] = mx.contiguous(window[:, n : n + K1])
        else:
            rows = mx.arange(B)
            self.cache[1] = states[rows, n - 1]
            taps = n[:, None] + mx.arange(K1)[None]  # [B, K-1]: the window rows to keep
            self.cache[0] = window[rows[:, None], taps]
        self.steps = None

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


def make_cache(layer_types: list[str]) -> list[Any]:
    return [GatedDeltaCache() if kind == "linear_attention" else KVCache() for kind in layer_types]


def check_kv_settings(
    kv_bits: int | None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    head_dim: int | None = None,
) -> None:
    """UserError for KV-cache settings that cannot run (head_dim: the model's, when known)."""
    if kv_bits is not None and kv_bits not in KV_BITS:
        raise UserError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))}, got {kv_bits}")
    if kv_group_size not in KV_GROUP_SIZES:
        raise UserError(
            f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, "
            f"got {kv_group_size}"
        )
    if quantized_kv_start < 0:
        raise UserError(f"quantized_kv_start must be >= 0, got {quantized_kv_start}")
    if kv_bits is not None and head_dim is not None and head_dim % kv_group_size:
        fits = [g for g in KV_GROUP_SIZES if head_dim % g == 0]
        hint = f"use kv_group_size {fits[-1]}" if fits else "run without kv_bits"
        raise UserError(
            f"kv_group_size {kv_group_size} does not divide the model's head_dim {head_dim}; {hint}"
        )


def maybe_quantize_kv_cache(
    cache: list[Any],
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    kv_bits: int | None = None,
) -> None:
    """mlx-lm's rule, in place: with kv_bits set, every KVCache of `cache` that holds at least
    `quantized_kv_start` positions is replaced by its quantized copy. Called after each model
    step, so the step that crosses the threshold still ran unquantized, and the rest quantized."""
    if kv_bits is None:
        return
    for i, c in enumerate(cache):
        if isinstance(c, KVCache) and c.offset >= quantized_kv_start and not c.empty():
            cache[i] = c.to_quantized(group_size=kv_group_size, bits=kv_bits)
