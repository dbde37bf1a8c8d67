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

from collections.abc import Sequence
from typing import Any


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
