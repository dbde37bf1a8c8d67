"""Softmax attention of the full-attention layers over their cache, plain or quantized.

One entry point, `attention`, picks how:
- a quantized cache (keys/values as `mx.quantize` triples): scores and outputs through
  `mx.quantized_matmul`, as mlx-lm's `quantized_scaled_dot_product_attention` does; on the CPU a
  multi-token step instead dequantizes the keys/values it reads and multiplies them with BLAS,
  ~20x faster there than MLX's CPU quantized matmul (the values are the same: a dequantized
  element is exactly what the quantized matmul multiplies by);
- plain keys/values: `mx.fast.scaled_dot_product_attention`, or on the CPU the block-causal
  `cpu_fast.causal_attention` for prompts.

Memory stays bounded however long the context: every path that could score all T x S pairs of a
long prefill step at once (the unfused fallbacks do) takes the queries in blocks of at most
`SCORE_BUDGET` scores, and a block of a causal step reads only the keys it can see. Left padding
comes as a `PaddingMask` (the keys' [B, S] validity) rather than a [B, 1, T, S] boolean mask, so
each block builds only its own slice of the mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .cpu_fast import causal_attention, on_cpu

# Largest number of scores (B x heads x query rows x keys) one block may hold: 128 MB in fp32,
# whatever the context length.
SCORE_BUDGET = 1 << 25
# Steps of at most this many queries (decode, speculative verify) score everything at once.
SMALL_STEP = 8


@dataclass(frozen=True)
class PaddingMask:
    """Causal attention in which some keys are never visible: key_mask [B, S] is False at
    left-padding positions (S = the keys after this step)."""

    key_mask: mx.array


def query_block(batch: int, heads: int, keys: int, rows: int, budget: int = SCORE_BUDGET) -> int:
    """How many query rows one block takes so that batch x heads x block x keys <= budget."""
    return max(1, min(rows, budget // max(1, batch * heads * keys)))


def _blocks(T: int, block: int) -> Iterator[tuple[int, int]]:
    for start in range(0, T, block):
        yield start, min(start + block, T)


def _block_mask(mask: Any, past: int, start: int, end: int, seen: int) -> Any:
    """The mask of query rows [start, end) over the first `seen` keys, [B, 1, rows, seen] (or
    None / "causal" / the caller's array slice)."""
    if mask is None:
        return None
    if isinstance(mask, PaddingMask):
        causal = mx.arange(past + start, past + end)[:, None] >= mx.arange(seen)[None]
        return causal[None, None] & mask.key_mask[:, None, None, :seen]
    if isinstance(mask, str):
        return "causal"
    return mask[..., start:end, :seen]


def _sees_up_to(mask: Any, past: int, end: int, S: int) -> int:
    """How many leading keys the query rows up to `end` can see."""
    causal = isinstance(mask, PaddingMask) or (isinstance(mask, str) and mask == "causal")
    return past + end if causal else S


def attention(
    queries: mx.array, keys: Any, values: Any, *, scale: float, mask: Any, cache: Any = None
) -> mx.array:
    """softmax(q kᵀ * scale + mask) v for queries [B, nh, T, D] over the cache's keys/values
    ([B, nkv, S, D] arrays, or quantized triples when `cache` is a QuantizedKVCache).

    mask: None, "causal" (lower-right aligned: query i sees keys up to S - T + i), a PaddingMask,
    or an array broadcastable to [B, nh, T, S]. Returns [B, nh, T, D] in the queries' dtype.
    """
    if isinstance(keys, tuple):
        return _quantized(queries, keys, values, scale, mask, cache.group_size, cache.bits)
    B, nh, T, _ = queries.shape
    S = keys.shape[2]
    causal = isinstance(mask, PaddingMask) or (isinstance(mask, str) and mask == "causal")
    if on_cpu() and causal and T > 1:
        key_mask = mask.key_mask if isinstance(mask, PaddingMask) else None
        rows = query_block(B, nh, S, T)
        return causal_attention(queries, keys, values, scale, key_mask=key_mask, block=rows)
    if T <= SMALL_STEP:
        return mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=scale, mask=_block_mask(mask, S - T, 0, T, S)
        )
    rows = query_block(B, nh, S, T)
    past = S - T
    outs = []
    for start, end in _blocks(T, rows):
        seen = _sees_up_to(mask, past, end, S)
        outs.append(
            mx.fast.scaled_dot_product_attention(
                queries[..., start:end, :],
                keys[..., :seen, :],
                values[..., :seen, :],
                scale=scale,
                mask=_block_mask(mask, past, start, end, seen),
            )
        )
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def _quantized(
    queries: mx.array,
    keys: tuple[mx.array, ...],
    values: tuple[mx.array, ...],
    scale: float,
    mask: Any,
    group_size: int,
    bits: int,
) -> mx.array:
    B, nh, T, D = queries.shape
    nkv, S = keys[0].shape[1], keys[0].shape[2]
    if on_cpu() and T > SMALL_STEP:
        # CPU prefill over a quantized cache: BLAS on the dequantized keys/values (see above).
        k = mx.dequantize(*keys, group_size=group_size, bits=bits)
        v = mx.dequantize(*values, group_size=group_size, bits=bits)
        return attention(queries, k, v, scale=scale, mask=mask)
    rep = nh // nkv
    q = (queries * scale).reshape(B, nkv, rep, T, D)
    # A repeat axis of 1 lets each key head serve its `rep` query heads (GQA) by broadcasting.
    k_q = tuple(x[:, :, None] for x in keys)
    v_q = tuple(x[:, :, None] for x in values)
    past = S - T
    rows = query_block(B, nh, S, T)
    outs = []
    for start, end in _blocks(T, rows):
        seen = _sees_up_to(mask, past, end, S)
        scores = mx.quantized_matmul(
            q[..., start:end, :],
            *(x[..., :seen, :] for x in k_q),
            transpose=True,
            group_size=group_size,
            bits=bits,
        )
        block_mask = _gqa_mask(_block_mask(mask, past, start, end, seen), nkv, rep)
        if isinstance(block_mask, str):
            block_mask = mx.arange(past + start, past + end)[:, None] >= mx.arange(seen)[None]
        if block_mask is not None:
            if block_mask.dtype == mx.bool_:
                scores = mx.where(block_mask, scores, mx.finfo(scores.dtype).min)
            else:
                scores = scores + block_mask
        weights = mx.softmax(scores, axis=-1, precise=True)
        outs.append(
            mx.quantized_matmul(
                weights,
                *(x[..., :seen, :] for x in v_q),
                transpose=False,
                group_size=group_size,
                bits=bits,
            )
        )
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-2)
    return out.reshape(B, nh, T, D)


def _gqa_mask(mask: Any, nkv: int, rep: int) -> Any:
    """A [B, heads or 1, rows, keys] mask as [B, nkv or 1, rep or 1, rows, keys], to broadcast
    against scores laid out [B, nkv, rep, rows, keys]."""
    if not isinstance(mask, mx.array) or mask.ndim < 4:
        return mask
    heads = mask.shape[1]
    lead = (nkv, rep) if heads > 1 else (1, 1)
    return mask.reshape(mask.shape[0], *lead, *mask.shape[2:])
