"""The prefix cache: model states at known prompt positions, reused by later requests.

Qwen3.5's Gated DeltaNet layers carry one recurrent state that cannot be rewound token by token,
so a conversation cannot simply trim its KV cache back to the last token a new request shares.
Instead the engine keeps snapshots: at the message boundaries a request names
(`Request.boundaries`, the end of each message as the chat template renders it) and, when asked
(`Request.cache_final`), at the end of a reply. A snapshot holds the KV of every position before
it, the DeltaNet conv and recurrent states, and the rotary offset (`rope_delta`); it is keyed by its
token ids and by the content keys of the images and videos inside it.

A request resumes from the longest snapshot whose tokens are a strict prefix of its prompt (one
token at least is left to run: the next token's logits come from it), whose media match, and that
does not end strictly inside a media span (an image's tokens are encoded together). It reports how
many tokens that saved (`cached_tokens`).

Entries are immutable copies (a view into a live cache would keep its whole buffer alive and make
the next in-place write copy it), and the cache is a least-recently-used store bounded in bytes.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..model.cache import CACHE_KINDS, KVCache, owned_copy
from .request import MediaSpan

# Default bound of one engine's prefix cache. At 0.8B (fp32 KV, 6 attention layers) a token costs
# 24.6 KB and a snapshot's DeltaNet states ~19 MB; 2 GiB holds a few long conversations.
DEFAULT_PREFIX_CACHE_BYTES = 2 << 30

_clock = itertools.count()


@dataclass(eq=False)
class PrefixEntry:
    """The model state after `tokens`.

    layers: per decoder layer, (kind, arrays): the cache class's snapshot, e.g. ("kv", (keys
    [1, n_kv, n, d], values)) or ("gdn", (conv [1, K-1, C], state [1, Hv, Dv, Dk] fp32)); see
    model/cache.py (`snapshot`, `from_snapshot`, `CACHE_KINDS`). rope_delta: [1] int32 or None
    (the token at index n has position n + rope_delta). media: the media spans inside `tokens`,
    with their content keys.
    kind: "boundary" (a message end) or "final" (the end of a reply). owners: the tags of the
    requests that made or reached it (`Request.cache_owner`): an entry with owners lives until
    the last one releases it (or LRU eviction), one without lives by LRU alone.
    """

    tokens: tuple[int, ...] = field(repr=False)
    layers: list[tuple[str, tuple[mx.array, ...]]] = field(repr=False)
    rope_delta: mx.array | None = field(default=None, repr=False)
    media: tuple[MediaSpan, ...] = ()
    kind: str = "boundary"
    owners: set = field(default_factory=set, repr=False)
    last_used: int = field(default_factory=lambda: next(_clock))

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        total = sum(a.nbytes for _, arrays in self.layers for a in arrays)
        return total + (self.rope_delta.nbytes if self.rope_delta is not None else 0)

    @property
    def next_position(self) -> int:
        """The rotary position of the token after `tokens`."""
        delta = int(self.rope_delta.item()) if self.rope_delta is not None else 0
        return self.length + delta

    @property
    def key(self) -> tuple:
        return (self.tokens, self.media)

    def make_cache(self) -> list[Any]:
        """A fresh one-row cache holding this state (the entry stays untouched)."""
        return [
            CACHE_KINDS[kind].from_snapshot(arrays, self.rope_delta) for kind, arrays in self.layers
        ]

    @classmethod
    def from_cache(
        cls,
        cache: Sequence[Any],
        tokens: Sequence[int],
        media: Iterable[MediaSpan] = (),
        **info: Any,
    ) -> PrefixEntry:
        """A snapshot of a one-row, unpadded cache that holds exactly `tokens` (copies)."""
        n = len(tokens)
        rope_delta = None
        for c in cache:
            if isinstance(c, KVCache):
                if c.offset != n:
                    raise ValueError(f"the cache holds {c.offset} tokens, not {n}")
                if c.rope_delta is not None:
                    rope_delta = owned_copy(c.rope_delta)
        layers = [(c.kind, c.snapshot(n)) for c in cache]
        mx.eval(
            [a for _, arrays in layers for a in arrays], [] if rope_delta is None else rope_delta
        )
        media = tuple(m for m in media if m.end <= n)
        owner = info.pop("owner", None)
        owners = {owner} if owner is not None else set()
        return cls(tuple(tokens), layers, rope_delta, media, owners=owners, **info)


def _inside(position: int, spans: Iterable[MediaSpan]) -> bool:
    return any(s.start < position < s.end for s in spans)


class PrefixCache:
    """Snapshots by token prefix, least recently used evicted first, bounded by `max_bytes`.
    Thread-safe (the server and chat sessions look up while the engine inserts)."""

    def __init__(self, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES):
        self._lock = threading.Lock()
        self._entries: dict[tuple, PrefixEntry] = {}
        self._bytes = 0
        self.max_bytes = max_bytes

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, got {value!r}")
        with self._lock:
            self._max_bytes = value
            self._evict()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self, owner: Any = None) -> list[PrefixEntry]:
        """The entries (of one owner, when given), shortest first."""
        with self._lock:
            found = [e for e in self._entries.values() if owner is None or owner in e.owners]
        return sorted(found, key=lambda e: (e.length, e.last_used))

    def lookup(
        self,
        tokens: Sequence[int],
        media: Sequence[MediaSpan] = (),
        *,
        limit: int | None = None,
    ) -> PrefixEntry | None:
        """The longest entry whose tokens are a prefix of `tokens`, at most `limit` long
        (default len(tokens) - 1), not ending strictly inside a span of `media`, whose own media
        are exactly the spans of `media` it covers (same positions and keys). Marks it used."""
        limit = len(tokens) - 1 if limit is None else min(limit, len(tokens) - 1)
        media = tuple(media)
        best: PrefixEntry | None = None
        with self._lock:
            for entry in self._entries.values():
                n = entry.length
                if n > limit or (best is not None and n < best.length) or _inside(n, media):
                    continue
                if entry.media != tuple(m for m in media if m.end <= n):
                    continue
                if any(s.key is None for s in entry.media):
                    continue
                if tuple(tokens[:n]) != entry.tokens:
                    continue
                if best is None or n > best.length or entry.last_used > best.last_used:
                    best = entry
            if best is not None:
                best.last_used = next(_clock)
        return best

    def insert(self, entry: PrefixEntry) -> bool:
        """Add `entry`; an entry with the same key stays and takes on its owners. False if it
        alone exceeds max_bytes."""
        size = entry.nbytes
        with self._lock:
            old = self._entries.get(entry.key)
            if old is not None:
                old.owners |= entry.owners
                old.last_used = next(_clock)
                return True
            if size > self._max_bytes:
                return False
            entry.last_used = next(_clock)
            self._entries[entry.key] = entry
            self._bytes += size
            self._evict()
        return True

    def adopt(
        self, tokens: Sequence[int], media: Sequence[MediaSpan] = (), owner: Any = None
    ) -> bool:
        """Whether an entry for exactly these tokens (and media) exists; if so it is marked used
        and gains `owner`."""
        n = len(tokens)
        key = (tuple(tokens), tuple(m for m in media if m.end <= n))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.last_used = next(_clock)
                if owner is not None:
                    entry.owners.add(owner)
            return entry is not None

    def release(self, entry: PrefixEntry, owner: Any) -> None:
        """`owner` no longer needs `entry`: it goes when no owner is left."""
        with self._lock:
            entry.owners.discard(owner)
            if not entry.owners and self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
                self._bytes -= entry.nbytes

    def remove(self, entry: PrefixEntry) -> None:
        with self._lock:
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
                self._bytes -= entry.nbytes

    def clear(self, owner: Any = None) -> None:
        """Drop every entry, or release every entry of one owner."""
        with self._lock:
            for key, entry in list(self._entries.items()):
                if owner is not None:
                    if owner not in entry.owners:
                        continue
                    entry.owners.discard(owner)
                    if entry.owners:
                        continue
                del self._entries[key]
                self._bytes -= entry.nbytes

    def _evict(self) -> None:
        while self._bytes > self._max_bytes and self._entries:
            key, entry = min(self._entries.items(), key=lambda kv: kv[1].last_used)
            del self._entries[key]
            self._bytes -= entry.nbytes
