"""Tokens the engine sampled but has not handed out yet (see scheduler.py's pipelining)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..model.cache import owned_copy


class Pending:
    """Tokens sampled for the running rows but not yet handed out: tokens [B]; logits: each row's
    adjusted logits [V] (its own buffer when B > 1, so that an event kept by a consumer holds one
    row, not the batch's); top: the top log-probabilities (ids [B, k], values [B, k]) or None."""

    def __init__(self, tokens: mx.array, logits: list[mx.array], top: Any):
        self.tokens, self.logits, self.top = tokens, logits, top

    @classmethod
    def of(cls, tokens: mx.array, logits: mx.array, top: Any) -> Pending:
        B = logits.shape[0]
        rows = [logits[0]] if B == 1 else [owned_copy(logits[i]) for i in range(B)]
        return cls(tokens, rows, top)

    def schedule(self, extra: list[mx.array] = ()) -> None:
        """Queue the computation (the step after this one is built before these are read)."""
        mx.async_eval(self.tokens, self.logits, list(self.top or ()), list(extra))

    def top_lists(self) -> tuple[list, list] | None:
        return None if self.top is None else (self.top[0].tolist(), self.top[1].tolist())

    def select(self, keep: list[int]) -> Pending:
        sel = mx.array(keep)
        top = None if self.top is None else (self.top[0][sel], self.top[1][sel])
        return Pending(self.tokens[sel], [self.logits[i] for i in keep], top)

    def join(self, other: Pending) -> Pending:
        tokens = mx.concatenate([self.tokens, other.tokens])
        top = None
        if self.top is not None or other.top is not None:
            k = max(p.top[0].shape[1] for p in (self, other) if p.top is not None)
            (a_ids, a_vals), (b_ids, b_vals) = (p._top_padded(k) for p in (self, other))
            top = (mx.concatenate([a_ids, b_ids]), mx.concatenate([a_vals, b_vals]))
        return Pending(tokens, self.logits + other.logits, top)

    def _top_padded(self, k: int) -> tuple[mx.array, mx.array]:
        rows = self.tokens.size
        if self.top is None:
            return mx.zeros((rows, k), mx.uint32), mx.full((rows, k), -float("inf"))
        pad = k - self.top[0].shape[1]
        ids = mx.pad(self.top[0].astype(mx.uint32), [(0, 0), (0, pad)])
        vals = mx.pad(self.top[1], [(0, 0), (0, pad)], constant_values=-float("inf"))
        return ids, vals
