"""The fused single-token gated delta step, and short runs of it.

One step reads the state once for both of its products: S·[k q] gives S k and S q in one GEMM per
key head, and then, with δ = β (v − g S k),

    y = g (S q) + (k·q) δ        S' = g S + δ kᵀ

(the output uses the state after the token: S' q = g S q + δ (kᵀ q)). Reductions written as
`(S * k).sum(-1)` are ~8x slower than a matmul on MLX's CPU backend, and the rank-1 update δ kᵀ is
an `addmm` onto g S. GQA: the r = Hv / Hk value heads of a key head are consecutive, so the state
viewed as [B, Hk, r·Dv, Dk] multiplies that key head's [k q] in one GEMM.
"""

from __future__ import annotations

import mlx.core as mx


@mx.compile
def _step(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    B, Hk, Dk = k.shape
    Hv, Dv = v.shape[1:]
    r = Hv // Hk
    f32 = mx.float32
    k = k.astype(f32)[:, :, None, :]  # [B, Hk, 1, Dk]
    q = q.astype(f32)[:, :, None, :]
    kq = mx.concatenate([k, q], axis=2)  # [B, Hk, 2, Dk]
    s_kq = (state.reshape(B, Hk, r * Dv, Dk) @ kq.swapaxes(-1, -2)).reshape(B, Hk, r, Dv, 2)
    g = g.astype(f32).reshape(B, Hk, r, 1)
    beta = beta.astype(f32).reshape(B, Hk, r, 1)
    delta = beta * (v.astype(f32).reshape(B, Hk, r, Dv) - g * s_kq[..., 0])
    y = g * s_kq[..., 1] + (k * q).sum(-1, keepdims=True) * delta
    decayed = g[..., None] * state.reshape(B, Hk, r, Dv, Dk)
    new_state = mx.addmm(decayed, delta[..., None], k[:, :, None])
    return y.reshape(B, Hv, Dv), new_state.reshape(B, Hv, Dv, Dk)


def gated_delta_step(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """One token: q, k [B, Hk, Dk]; v [B, Hv, Dv]; g, beta [B, Hv]; state [B, Hv, Dv, Dk] fp32.

    Returns (y [B, Hv, Dv] fp32, new state fp32).
    """
    return _step(q, k, v, g, beta, state.astype(mx.float32))


def gated_delta_steps(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
    *,
    per_token_states: bool = False,
) -> tuple[mx.array, ...]:
    """T fused steps, shapes as `gated_delta_update`; for decode and short verify blocks.

    Returns (y [B, T, Hv, Dv] in v.dtype, final state [B, Hv, Dv, Dk] fp32), plus, with
    `per_token_states`, the state after each token [B, T, Hv, Dv, Dk] fp32.
    """
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    S = mx.zeros((B, Hv, Dv, Dk), mx.float32) if state is None else state.astype(mx.float32)
    ys, states = [], []
    for t in range(T):
        y, S = _step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S)
        ys.append(y)
        states.append(S)
    if T == 0:
        y = mx.zeros((B, 0, Hv, Dv), v.dtype)
    else:
        y = (ys[0][:, None] if T == 1 else mx.stack(ys, axis=1)).astype(v.dtype)
    if per_token_states:
        per_token = mx.stack(states, axis=1) if states else mx.zeros((B, 0, Hv, Dv, Dk))
        return y, S, per_token
    return y, S
