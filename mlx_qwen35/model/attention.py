"""Softmax attention of the full-attention layers over their cache, plain or quantized.

One entry point, `attention`, picks how:
- a quantized cache (keys/values as `mx.quantize` triples): scores and outputs through
  `mx.quantized_matmul`, as mlx-lm's `quantized_scaled_dot_product_attention` does; on the CPU a
  multi-token step instead dequantizes the keys/values and multiplies them with BLAS, ~20x faster
  there than MLX's CPU quantized matmul (a dequantized element is exactly the value the quantized
  matmul multiplies by);
- plain keys/values: `mx.fast.scaled_dot_product_attention`, a block of queries at a time.

Memory stays bounded however long the context. A long prefill step would otherwise score all
T x S pairs at once (the unfused paths do, and MLX has no fused kernel for head_dim 256 prompts),
so the queries go in blocks of at most `SCORE_BUDGET` scores, and a causal block reads only the
keys it can see (so a prompt's first step skips the masked half, as a block-causal kernel
would). On the CPU this also beat the block-causal attention with a polynomial exp that
`cpu_fast` used to have (measured on the 2-core x86 development machine, 0.8B head sizes: 0.83 s
against 1.82 s for a 2048-token step, 4.8 s against 8.2 s after 6144 cached tokens), whose
unfused softmax held ~7 arrays of a block's scores where MLX's fallback holds one. With
several blocks, each is evaluated before the next is built: MLX schedules independent work
ahead (breadth first, allocating outputs as it goes), which would hold many blocks' scores at
once. Left padding comes as a `PaddingMask` (the keys' [B, S] validity) rather
than a [B, 1, T, S] boolean mask, so each block builds only its own slice of the mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .cpu_fast import on_cpu

# Most scores (B x heads x query rows x keys) one block may hold: 256 MB in fp32, whatever the
# context length (64K cached tokens at 0.8B: blocks of 128 queries; smaller blocks cost speed).
SCORE_BUDGET = 1 << 26
# Steps of at most this many queries (decode, speculative verify) score everything at once.
SMALL_STEP = 8


@dataclass(frozen=True)
class PaddingMask:
    """Causal attention in which some keys are never visible: key_mask [B, S] is False at
    left-padding positions (S = the keys after this step)."""

    key_mask: mx.array


def query_block(batch: int, heads: int, keys: int, rows: int) -> int:
    """How many query rows one block takes so that batch x heads x block x keys <= budget."""
    return max(1, min(rows, SCORE_BUDGET // max(1, batch * heads * keys)))


def _is_causal(mask: Any) -> bool:
    return isinstance(mask, PaddingMask) or (isinstance(mask, str) and mask == "causal")


def _blockwise(T: int, rows: int, block: Callable[[int, int], mx.array]) -> mx.array:
    """block(start, end) over the query rows [0, T) in blocks of `rows`, joined on axis -2."""
    if rows >= T:
        return block(0, T)
    outs = []
    for start in range(0, T, rows):
        out = block(start, min(start + rows, T))
        mx.eval(out)  # see the module docstring: one block's scores alive at a time
        outs.append(out)
    return mx.concatenate(outs, axis=-2)


def _block_mask(mask: Any, past: int, start: int, end: int, seen: int) -> Any:
    """The mask of query rows [start, end) over the first `seen` keys: None, "causal" (lower
    right aligned), [B, 1, rows, seen] bool for a PaddingMask, or the caller's array's slice."""
    if mask is None or isinstance(mask, str):
        return mask
    if isinstance(mask, PaddingMask):
        causal = mx.arange(past + start, past + end)[:, None] >= mx.arange(seen)[None]
        return causal[None, None] & mask.key_mask[:, None, None, :seen]
    return mask[..., start:end, :seen]


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
    past = S - T

    def block(start: int, end: int) -> mx.array:
        seen = past + end if _is_causal(mask) else S
        return mx.fast.scaled_dot_product_attention(
            queries[..., start:end, :],
            keys[..., :seen, :],
            values[..., :seen, :],
            scale=scale,
            mask=_block_mask(mask, past, start, end, seen),
        )

    rows = T if T <= SMALL_STEP else query_block(B, nh, S, T)
    return _blockwise(T, rows, block)


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

    def block(start: int, end: int) -> mx.array:
        seen = past + end if _is_causal(mask) else S
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
        return mx.quantized_matmul(
            weights,
            *(x[..., :seen, :] for x in v_q),
            transpose=False,
            group_size=group_size,
            bits=bits,
        )

    rows = T if T <= SMALL_STEP else query_block(B, nh, S, T)
    return _blockwise(T, rows, block).reshape(B, nh, T, D)


def _gqa_mask(mask: Any, nkv: int, rep: int) -> Any:
    """A [B, heads or 1, rows, keys] mask as [B, nkv or 1, rep or 1, rows, keys], to broadcast
    against scores laid out [B, nkv, rep, rows, keys]."""
    if not isinstance(mask, mx.array) or mask.ndim < 4:
        return mask
    lead = (nkv, rep) if mask.shape[1] > 1 else (1, 1)
    return mask.reshape(mask.shape[0], *lead, *mask.shape[2:])
