"""The sequential gated delta recurrence: the definition of correct, not a fast path.

Per (batch, value head), state S ∈ ℝ^{Dv×Dk} in fp32, for t = 1..T:

    S ← g_t·S;   δ = β_t·(v_t − S k_t);   S ← S + δ k_tᵀ;   y_t = S q_t

(spec §3.1 step 7 with the state stored transposed, as mlx-lm and `mx.fast.gated_delta_update`
do). Value head j reads key head j // (Hv / Hk): repeat-interleave, never tiling.
"""

from __future__ import annotations

import mlx.core as mx


def gated_delta_reference(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv]; state [B, Hv, Dv, Dk] or None.

    Returns (y [B, T, Hv, Dv] in v.dtype, new state [B, Hv, Dv, Dk] fp32). Builds T small steps of
    graph; use it for tests and as the "ops" backend.
    """
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    f32 = mx.float32
    out_dtype = v.dtype
    r = Hv // Hk
    q = mx.repeat(q.astype(f32), r, axis=2)
    k = mx.repeat(k.astype(f32), r, axis=2)
    v = v.astype(f32)
    g = g.astype(f32)
    beta = beta.astype(f32)
    S = mx.zeros((B, Hv, Dv, Dk), f32) if state is None else state.astype(f32)
    ys = []
    for t in range(T):
        kt = k[:, t, :, :, None]  # [B, Hv, Dk, 1]
        S = g[:, t, :, None, None] * S
        delta = beta[:, t, :, None] * (v[:, t] - (S @ kt)[..., 0])  # [B, Hv, Dv]
        S = S + delta[..., None] * kt.swapaxes(-1, -2)
        ys.append((S @ q[:, t, :, :, None])[..., 0])
    y = mx.stack(ys, axis=1) if ys else mx.zeros((B, 0, Hv, Dv), f32)
    return y.astype(out_dtype), S
