"""A request's KV-cache settings and where its cache changes format.

mlx-lm's names and rule: `kv_bits` (None, 4 or 8), `kv_group_size` (64), `quantized_kv_start`
(5000): the full-attention caches stay in the activation dtype until they hold quantized_kv_start
positions, then are replaced by quantized copies (`model.cache.maybe_quantize_kv_cache`).

One refinement makes the result independent of how the prompt is cut: mlx-lm converts after the
step that crosses the threshold, so where it lands depends on the prefill step size. Here a
prefill chunk ends at quantized_kv_start (`cut`), and the cache is converted as soon as it holds
that many positions (before the first token for 0), whatever the chunking, the prefix-cache
resume point or the batch: a request gives the same tokens alone, batched, resumed or saved and
loaded. During decoding a row reaches the threshold on its own step (`due_at`).

Which cached states a request may reuse follows from the same rule (`snapshot_key`): a state of n
positions from the prefix cache or a saved session is the one this request would have made if
it is unquantized and n < quantized_kv_start (a plain run's states serve every setting), or if
it was quantized with the same bits, group size and start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..model.cache import (
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_QUANTIZED_KV_START,
    KVCache,
    QuantizedKVCache,
    check_kv_settings,
)


@dataclass(frozen=True)
class KVSettings:
    """kv_bits None: keys/values stay in the activation dtype (the other fields then do nothing)."""

    kv_bits: int | None = None
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START

    def check(self, head_dim: int | None = None) -> None:
        check_kv_settings(self.kv_bits, self.kv_group_size, self.quantized_kv_start, head_dim)

    @property
    def quantized_format(self) -> tuple[int, int, int] | None:
        """What a quantized cache of this request is keyed by: (bits, group_size, start)."""
        if self.kv_bits is None:
            return None
        return self.kv_bits, self.kv_group_size, self.quantized_kv_start

    def format_at(self, length: int) -> tuple[int, int, int] | None:
        """The format of this request's cache once it holds `length` positions (None: plain)."""
        if self.kv_bits is None or length < self.quantized_kv_start:
            return None
        return self.quantized_format

    def cut(self, start: int, end: int) -> int:
        """A prefill chunk [start, end) shortened to end at quantized_kv_start if it crosses."""
        if self.kv_bits is not None and start < self.quantized_kv_start < end:
            return self.quantized_kv_start
        return end

    def draft_budget(self, length: int, k: int) -> int:
        """Draft tokens a speculative round of a row holding `length` positions may take: a
        round ends before the cache reaches quantized_kv_start (it verifies k + 1 tokens), so
        that the conversion lands where plain decoding puts it (0: decode this step plainly)."""
        if self.kv_bits is None or length >= self.quantized_kv_start:
            return k
        return max(0, min(k, self.quantized_kv_start - length - 1))

    def due_at(self, length: int) -> bool:
        """Whether a cache of `length` positions is quantized under these settings."""
        return self.kv_bits is not None and length >= self.quantized_kv_start

    def due(self, cache: list[Any], length: int) -> bool:
        """Whether `cache`, holding `length` positions, still has to be converted."""
        return self.due_at(length) and any(isinstance(c, KVCache) for c in cache)

    def convert(self, cache: list[Any]) -> None:
        """Replace the KV caches of `cache` by quantized copies, in place (an empty one by an
        empty quantized one: with quantized_kv_start 0 every position is stored quantized)."""
        for i, c in enumerate(cache):
            if isinstance(c, KVCache):
                cache[i] = c.to_quantized(self.kv_group_size, self.kv_bits)


def cache_format(cache: list[Any], settings: KVSettings) -> tuple[int, int, int] | None:
    """The format key of a cache made under `settings`: None while its KV is plain."""
    quantized = any(isinstance(c, QuantizedKVCache) for c in cache)
    return settings.quantized_format if quantized else None


def kv_settings(request: Any) -> KVSettings:
    """A request's KVSettings (from its kv_bits, kv_group_size, quantized_kv_start)."""
    return KVSettings(request.kv_bits, request.kv_group_size, request.quantized_kv_start)
