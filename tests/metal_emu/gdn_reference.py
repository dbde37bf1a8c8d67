"""Sequential float64 references for the gated-delta kernels (numpy, written from spec §3.1)."""

from __future__ import annotations

import numpy as np


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def recurrence(q, k, v, g, beta, state=None, *, per_token: bool = False):
    """q, k [B,T,Hk,Dk] (normalised), v [B,T,Hv,Dv], g, beta [B,T,Hv], state [B,Hv,Dv,Dk].

    Returns y [B,T,Hv,Dv], final state, and (per_token) the state after every token.
    """
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    r = Hv // Hk
    S = np.zeros((B, Hv, Dv, Dk)) if state is None else np.array(state, np.float64)
    y = np.zeros((B, T, Hv, Dv))
    states = np.zeros((B, T, Hv, Dv, Dk))
    for t in range(T):
        for h in range(Hv):
            kk = k[:, t, h // r]  # [B, Dk]: repeat_interleave head mapping
            qq = q[:, t, h // r]
            S[:, h] *= g[:, t, h][:, None, None]
            kv = np.einsum("bvk,bk->bv", S[:, h], kk)
            delta = beta[:, t, h][:, None] * (v[:, t, h] - kv)
            S[:, h] += delta[:, :, None] * kk[:, None, :]
            y[:, t, h] = np.einsum("bvk,bk->bv", S[:, h], qq)
        states[:, t] = S
    return (y, S, states) if per_token else (y, S)


def core(qkv, a, b, conv_w, A_log, dt_bias, conv_state, state, *, Hk, Hv, Dk, Dv, per_token=False):
    """The fused layer core in float64. conv_w [C, K] (or [C, K, 1]); conv_state [B, K-1, C].

    Returns dict(o, conv_state, state, states, u, q, k, v, g, beta).
    """
    qkv = np.asarray(qkv, np.float64)
    B, T, C = qkv.shape
    w = np.asarray(conv_w, np.float64).reshape(C, -1)
    K = w.shape[1]
    cs = np.zeros((B, K - 1, C)) if conv_state is None else np.asarray(conv_state, np.float64)
    u = np.concatenate([cs, qkv], axis=1)
    conv = np.zeros((B, T, C))
    for j in range(K):
        conv += w[:, j] * u[:, j : j + T]
    x = conv * _sigmoid(conv)
    q = x[..., : Hk * Dk].reshape(B, T, Hk, Dk)
    k = x[..., Hk * Dk : 2 * Hk * Dk].reshape(B, T, Hk, Dk)
    v = x[..., 2 * Hk * Dk :].reshape(B, T, Hv, Dv)
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) * Dk**-0.5
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    a = np.asarray(a, np.float64)
    A = np.exp(np.asarray(A_log, np.float64))
    g = np.exp(-A * _softplus(a + np.asarray(dt_bias, np.float64)))
    beta = _sigmoid(np.asarray(b, np.float64))
    y, S, states = recurrence(q, k, v, g, beta, state, per_token=True)
    return dict(
        o=y, conv_state=u[:, T:], state=S, states=states, u=u, q=q, k=k, v=v, g=g, beta=beta
    )
