"""Batched hybrid caches: the per-layer caches of several requests as one batch.

Each layer's cache class knows how to stack rows (`merge`), keep some (`filter`) and copy one out
(`extract`); see model/cache.py. Why left padding rather than per-row offsets for the KV of rows of
different lengths: the model already masks padded keys (`key_mask`) and shifts rotary positions per
row (`rope_delta`), so with rows right-aligned every decode step writes one common cache index, a
plain in-place slice update, and attention needs no gather; per-row offsets would need a scatter
per step and per-row masks all the same. Padding costs attention over the longest row's length
(dropped again when rows leave) and a copy of the batch's KV when a row joins or leaves, which
happens once per request, never per token. The DeltaNet conv and recurrent states have no time
axis and are simply stacked, so padding never touches a recurrent state: rows are prefilled alone
and join the batch with their own states.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import mlx.core as mx


def merge_rows(batch: list[Any] | None, rows: list[Any]) -> list[Any]:
    """The batch's caches with the rows of `rows` (a one-row cache, per layer) appended."""
    if batch is None:
        return rows
    return [type(b).merge([b, r]) for b, r in zip(batch, rows, strict=True)]


def filter_rows(batch: list[Any], keep: Sequence[int]) -> None:
    """Keep only the rows `keep`, in place."""
    for c in batch:
        c.filter(keep)


def extract_row(batch: list[Any], row: int) -> list[Any]:
    """Row `row` as a one-row cache per layer (copies, without padding)."""
    if all(c.batch_size == 1 for c in batch):
        return batch
    return [c.extract(row) for c in batch]


def cache_nbytes(cache: Sequence[Any] | None) -> int:
    return 0 if cache is None else sum(c.nbytes for c in cache)


class Batch:
    """The running rows' caches, one batched cache per KV format.

    Rows are numbered in the scheduler's order (row i is its i-th running request). Rows whose
    full-attention caches share a format (plain, or quantized with the same bits, group size and
    start) form one group, stacked as above and decoded in one forward; a step runs one forward
    per group, so requests with different KV settings run side by side, each exactly as it would
    alone. Why not stack every row into one cache: a quantized and a plain KV cannot share
    arrays, and converting a row with another's threshold would change its tokens. In the usual
    case (one setting for all, as a server's --kv-bits gives) there is one group, or two while
    some rows are still below quantized_kv_start.
    """

    def __init__(self) -> None:
        self.groups: list[tuple[Any, list[Any], list[int]]] = []  # (format, caches, rows)

    @property
    def size(self) -> int:
        return sum(len(rows) for _, _, rows in self.groups)

    def __iter__(self) -> Iterator[Any]:
        """The per-layer caches, while every row shares one KV format (the usual case)."""
        if len(self.groups) != 1:
            raise ValueError(f"the batch holds {len(self.groups)} KV formats; see .groups")
        return iter(self.groups[0][1])

    def add(self, cache: list[Any], kv_format: Any, row: int | None = None) -> None:
        """Append a one-row cache as row `row` (default: the next number)."""
        row = self.size if row is None else row
        for j, (key, caches, rows) in enumerate(self.groups):
            if key == kv_format:
                self.groups[j] = (key, merge_rows(caches, cache), [*rows, row])
                return
        self.groups.append((kv_format, cache, [row]))

    def _find(self, row: int) -> tuple[int, int]:
        for j, (_, _, rows) in enumerate(self.groups):
            if row in rows:
                return j, rows.index(row)
        raise IndexError(f"no row {row} in the batch")

    def format_of(self, row: int) -> Any:
        return self.groups[self._find(row)[0]][0]

    def forward(self, model: Any, tokens: mx.array) -> mx.array:
        """Logits [B, V] of the last position for `tokens` [B] (one per row, in row order)."""
        return self.per_row(lambda caches, idx: model(tokens[idx][:, None], cache=caches)[:, -1])

    def per_row(self, fn: Callable[[list[Any], mx.array], mx.array], axis: int = 0) -> mx.array:
        """fn(caches, rows) of each group (rows: its row numbers), joined along `axis` in row
        order: one call per KV format."""
        outs, order = [], []
        for _, caches, rows in self.groups:
            outs.append(fn(caches, mx.array(rows)))
            order.extend(rows)
        if order == list(range(len(order))):
            return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=axis)
        joined = mx.concatenate(outs, axis=axis)
        return mx.take(joined, mx.argsort(mx.array(order)), axis=axis)

    def filter(self, keep: Sequence[int]) -> None:
        """Keep the rows `keep` (ascending), renumbered 0, 1, ... in that order."""
        new = {old: i for i, old in enumerate(keep)}
        groups = []
        for key, caches, rows in self.groups:
            local = [k for k, row in enumerate(rows) if row in new]
            if not local:
                continue
            if len(local) < len(rows):
                filter_rows(caches, local)
            groups.append((key, caches, [new[rows[k]] for k in local]))
        self.groups = groups

    def extract(self, row: int) -> list[Any]:
        """Row `row` as a one-row cache per layer (copies, without padding)."""
        j, k = self._find(row)
        return extract_row(self.groups[j][1], k)

    def move(self, row: int, cache: list[Any], kv_format: Any) -> None:
        """Replace row `row` by `cache` (one row, of format `kv_format`), keeping its number."""
        j, k = self._find(row)
        key, caches, rows = self.groups[j]
        if len(rows) == 1:
            del self.groups[j]
        else:
            filter_rows(caches, [i for i in range(len(rows)) if i != k])
            self.groups[j] = (key, caches, rows[:k] + rows[k + 1 :])
        self.add(cache, kv_format, row)

    def arrays(self) -> list[mx.array]:
        """Every array of every cache (to evaluate along with a step)."""
        out: list[mx.array] = []
        for _, caches, _ in self.groups:
            for c in caches:
                _collect(c.state, out)
        return out


def _collect(x: Any, out: list[mx.array]) -> None:
    """The arrays of a nested state (quantized KV holds triples), appended to `out`. (A module
    function: a recursive closure would be a reference cycle holding the arrays until gc.)"""
    if isinstance(x, mx.array):
        out.append(x)
    elif isinstance(x, (tuple, list)):
        for y in x:
            _collect(y, out)
