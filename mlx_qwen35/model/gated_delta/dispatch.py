"""The two entry points the model calls, and the one place that picks a backend.

Backends (names accepted by the `backend` argument and the environment variable):
- "ops": the sequential reference loop (`reference.py`), the definition of correct.
- "chunked": the chunkwise-parallel WY prefill (`chunked.py`).
- "metal": the custom Metal kernels of `metal.py` (Apple GPUs only).
- "mlx-core": `mx.fast.gated_delta_update` (state layout [B, Hv, Dv, Dk], as ours).
plus "steps", the fused single-token step of `decode.py` run token by token, which only the
default rule picks.

Which one runs:
1. the `backend` argument, if given; else
2. the environment variable MLX_QWEN35_GDN_BACKEND=ops|chunked|metal|mlx-core, if set; else
3. the default rule: if `mx.metal.is_available()` and `metal.is_eligible(...)` says yes for this
   call -> "metal"; else T <= SMALL_T (decode, T = 1, and short verify blocks) -> "steps";
   else -> "chunked".
A bad name raises UserError naming the valid ones; forcing "metal" where it cannot run raises
UserError too (it never silently runs something else). Per-token states (speculative decoding)
come from "metal", or else from a token-by-token run: "ops" and "mlx-core" step their own
implementation one token at a time, every other choice uses "steps" (the chunked form has no
per-token states).

`metal.py` is imported lazily inside the functions, never at module import time: it exists only
for Apple GPUs, and tests substitute its kernel factory.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx

from ...errors import UserError
from .chunked import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SEGMENT_TOKENS,
    check_chunk_size,
    chunked_gated_delta,
)
from .conv import conv_taps, conv_window
from .decode import gated_delta_steps
from .reference import gated_delta_reference

BACKENDS = ("ops", "chunked", "metal", "mlx-core")
ENV_VAR = "MLX_QWEN35_GDN_BACKEND"
# At and below this many tokens the fused steps beat the chunked path on MLX CPU (measured
# crossover 16-24 tokens at 0.8B and 9B head sizes: a chunked call has a fixed cost of ~40 ops).
SMALL_T = 16
# Per-token states are for verifying a few draft tokens; each costs Hv*Dv*Dk*4 bytes per layer.
MAX_PER_TOKEN_STATES_T = 8
L2_EPS = 1e-6
SEGMENT_TOKENS = DEFAULT_SEGMENT_TOKENS


def _requested_backend(backend: str | None) -> str | None:
    source = "backend argument"
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = ENV_VAR
    if backend is not None and backend not in BACKENDS:
        raise UserError(
            f"unknown gated delta backend {backend!r} (from {source}); "
            f"valid values: {', '.join(BACKENDS)}"
        )
    return backend


def select_backend(
    backend: str | None,
    *,
    T: int,
    dtype: mx.Dtype,
    head_k_dim: int,
    head_v_dim: int,
    per_token_states: bool = False,
) -> str:
    """The backend that runs this call: one of BACKENDS or "steps" (see the module docstring)."""
    requested = _requested_backend(backend)
    eligibility = dict(
        T=T,
        dtype=dtype,
        head_k_dim=head_k_dim,
        head_v_dim=head_v_dim,
        per_token_states=per_token_states,
    )
    if requested == "metal":
        if not mx.metal.is_available():
            raise UserError(
                "gated delta backend 'metal' needs an Apple GPU (mx.metal.is_available() is "
                f"False); unset {ENV_VAR} or choose one of {', '.join(BACKENDS)}"
            )
        from . import metal

        if not metal.is_eligible(**eligibility):
            raise UserError(
                f"gated delta backend 'metal' does not support this call ({eligibility}); "
                f"unset {ENV_VAR} to let the default rule pick"
            )
        return "metal"
    if requested is not None:
        return requested
    if mx.metal.is_available():
        from . import metal

        if metal.is_eligible(**eligibility):
            return "metal"
    return "steps" if T <= SMALL_T else "chunked"


def _check_update_shapes(q, k, v, g, beta, state) -> None:
    if q.ndim != 4 or k.shape != q.shape:
        raise UserError(
            f"q and k must both be [B, T, Hk, Dk], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    B, T, Hk, _ = q.shape
    if v.ndim != 4 or v.shape[:2] != (B, T):
        raise UserError(f"v must be [B, T, Hv, Dv] with B, T = {B}, {T}; got {tuple(v.shape)}")
    Hv = v.shape[2]
    if Hv % Hk:
        raise UserError(f"value heads ({Hv}) must be a multiple of key heads ({Hk})")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, Hv):
            raise UserError(f"{name} must be [B, T, Hv] = {(B, T, Hv)}, got {tuple(x.shape)}")
    expected = (B, Hv, v.shape[3], q.shape[3])
    if state is not None and state.shape != expected:
        raise UserError(
            f"recurrent state must be [B, Hv, Dv, Dk] = {expected}, got {tuple(state.shape)}"
        )


def _mlx_core(q, k, v, g, beta, state):
    y, new_state = mx.fast.gated_delta_update(q, k, v, g, beta, state)
    return y.astype(v.dtype), new_state.astype(mx.float32)


def _recurrence(name, q, k, v, g, beta, state, chunk_size):
    """Run one non-Metal backend; state may be None (zeros)."""
    if name == "ops":
        return gated_delta_reference(q, k, v, g, beta, state)
    if name == "mlx-core":
        if state is None:
            B, _, _, Dk = q.shape
            state = mx.zeros((B, *v.shape[2:], Dk), mx.float32)
        return _mlx_core(q, k, v, g, beta, state.astype(mx.float32))
    if name == "steps":
        return gated_delta_steps(q, k, v, g, beta, state)
    return chunked_gated_delta(q, k, v, g, beta, state, chunk_size=chunk_size)


def _per_token_recurrence(name, q, k, v, g, beta, state):
    """Like `_recurrence`, plus the state after every token [B, T, Hv, Dv, Dk] fp32."""
    if name not in ("ops", "mlx-core"):
        return gated_delta_steps(q, k, v, g, beta, state, per_token_states=True)
    ys, states = [], []
    for t in range(q.shape[1]):
        sl = slice(t, t + 1)
        y, state = _recurrence(
            name, q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], state, DEFAULT_CHUNK_SIZE
        )
        ys.append(y)
        states.append(state)
    return mx.concatenate(ys, axis=1), state, mx.stack(states, axis=1)


def gated_delta_update(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
    *,
    backend: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[mx.array, mx.array]:
    """The gated delta recurrence on prepared inputs.

    q, k: [B, T, Hk, Dk], already L2-normalised (q also scaled by Dk**-0.5), any float dtype.
    v: [B, T, Hv, Dv]; g (decay in (0, 1], fp32) and beta (fp32): [B, T, Hv]; value head j uses
    key head j // (Hv // Hk). state: [B, Hv, Dv, Dk] fp32, or None for zeros.
    Returns (y [B, T, Hv, Dv] in v.dtype, new state [B, Hv, Dv, Dk] fp32).
    """
    _check_update_shapes(q, k, v, g, beta, state)
    check_chunk_size(chunk_size)
    B, T, _, Dk = q.shape
    Hv, Dv = v.shape[2:]
    if T == 0:
        empty = mx.zeros((B, 0, Hv, Dv), v.dtype)
        return empty, mx.zeros((B, Hv, Dv, Dk), mx.float32) if state is None else state
    name = select_backend(backend, T=T, dtype=v.dtype, head_k_dim=Dk, head_v_dim=Dv)
    if name == "metal":
        from . import metal

        return metal.gated_delta_update(q, k, v, g, beta, state)
    return _recurrence(name, q, k, v, g, beta, state, chunk_size)


def _check_core_shapes(qkv, a, b, conv_weight, A_log, dt_bias, state, Hk, Hv, Dk, Dv) -> None:
    if Hk <= 0 or Hv % Hk:
        raise UserError(f"num_v_heads ({Hv}) must be a positive multiple of num_k_heads ({Hk})")
    C = 2 * Hk * Dk + Hv * Dv
    if qkv.ndim != 3 or qkv.shape[-1] != C:
        raise UserError(
            f"qkv must be [B, T, {C}] (2*Hk*Dk + Hv*Dv channels), got {tuple(qkv.shape)}"
        )
    B, T, _ = qkv.shape
    for name, x in (("a", a), ("b", b)):
        if x.shape != (B, T, Hv):
            raise UserError(f"{name} must be [B, T, Hv] = {(B, T, Hv)}, got {tuple(x.shape)}")
    for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
        if x.shape != (Hv,):
            raise UserError(f"{name} must have shape ({Hv},), got {tuple(x.shape)}")
    if conv_weight.ndim != 3 or conv_weight.shape[0] != C or conv_weight.shape[2] != 1:
        raise UserError(
            f"conv weight must be [{C}, K, 1] (MLX layout), got {tuple(conv_weight.shape)}"
        )
    if state is not None and state.shape != (B, Hv, Dv, Dk):
        raise UserError(
            f"recurrent state must be [B, Hv, Dv, Dk] = {(B, Hv, Dv, Dk)}, got {tuple(state.shape)}"
        )


@mx.compile
def _prepare(y, a, b, A_log, dt_bias, Hk, Hv, Dk, Dv):
    """Conv output (fp32, after SiLU) and gate inputs -> q, k, v, g, beta, all fp32.

    Compiled: at decode sizes these ~15 small ops cost more in dispatch than in arithmetic.
    """
    B, T, _ = y.shape
    nk = Hk * Dk
    q = y[..., :nk].reshape(B, T, Hk, Dk)
    k = y[..., nk : 2 * nk].reshape(B, T, Hk, Dk)
    v = y[..., 2 * nk :].reshape(B, T, Hv, Dv)
    # l2norm(x) = x / sqrt(Σx² + eps) = rms_norm(x, eps / Dk) / sqrt(Dk); q also gets Dk**-0.5.
    q = mx.fast.rms_norm(q, None, L2_EPS / Dk) * (1.0 / Dk)
    k = mx.fast.rms_norm(k, None, L2_EPS / Dk) * (1.0 / math.sqrt(Dk))
    f32 = mx.float32
    beta = mx.sigmoid(b.astype(f32))
    softplus = mx.logaddexp(a.astype(f32) + dt_bias.astype(f32), 0.0)
    g = mx.exp(-mx.exp(A_log.astype(f32)) * softplus)
    return q, k, v, g, beta


def gated_delta_core(
    qkv: mx.array,
    a: mx.array,
    b: mx.array,
    conv_weight: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    conv_state: mx.array | None,
    state: mx.array | None,
    *,
    num_k_heads: int,
    num_v_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    backend: str | None = None,
    per_token_states: bool = False,
) -> tuple[mx.array, ...]:
    """Everything of a Gated DeltaNet layer between its input projections and its gated norm.

    qkv: [B, T, C] raw in_proj_qkv output (C = 2*Hk*Dk + Hv*Dv); a, b: [B, T, Hv];
    conv_weight: [C, K, 1]; A_log, dt_bias: [Hv]; conv_state: [B, K-1, C] or None;
    state: [B, Hv, Dv, Dk] fp32 or None.
    Does spec §3.1 steps 2-7: causal conv + SiLU, split q|k|v, fp32 L2 norm (eps 1e-6 on the sum)
    with q * Dk**-0.5, beta = sigmoid(b), g = exp(-exp(A_log) * softplus(a + dt_bias)) in fp32,
    and the recurrence. The conv and everything after it run in fp32.

    Returns (o [B, T, Hv, Dv] in qkv.dtype, new conv state [B, K-1, C] in qkv.dtype, new state
    [B, Hv, Dv, Dk] fp32). With `per_token_states` (T <= 8, for speculative decoding) it returns
    a 5-tuple (o, new_conv_state, new_state, states, conv_window): states [B, T, Hv, Dv, Dk] fp32
    is the recurrent state after each token, and conv_window [B, K-1+T, C] is the conv input
    u = concat(conv_state, qkv). To keep only the first `a` tokens (1 <= a <= T), use
    state = states[:, a-1] and conv_state = conv_window[:, a : a+K-1].
    """
    Hk, Hv, Dk, Dv = num_k_heads, num_v_heads, head_k_dim, head_v_dim
    _check_core_shapes(qkv, a, b, conv_weight, A_log, dt_bias, state, Hk, Hv, Dk, Dv)
    B, T, _ = qkv.shape
    if per_token_states and not 1 <= T <= MAX_PER_TOKEN_STATES_T:
        raise UserError(
            f"per_token_states supports 1 to {MAX_PER_TOKEN_STATES_T} tokens per call, got {T}; "
            "verify fewer draft tokens at once"
        )
    if T == 0:
        new_conv_state = conv_window(qkv, conv_state, conv_weight.shape[1])
        new_state = mx.zeros((B, Hv, Dv, Dk), mx.float32) if state is None else state
        return mx.zeros((B, 0, Hv, Dv), qkv.dtype), new_conv_state, new_state
    name = select_backend(
        backend,
        T=T,
        dtype=qkv.dtype,
        head_k_dim=Dk,
        head_v_dim=Dv,
        per_token_states=per_token_states,
    )
    if name == "metal":
        from . import metal

        return metal.gated_delta_core(
            qkv,
            a,
            b,
            conv_weight,
            A_log,
            dt_bias,
            conv_state,
            state,
            num_k_heads=Hk,
            num_v_heads=Hv,
            head_k_dim=Dk,
            head_v_dim=Dv,
            per_token_states=per_token_states,
        )
    dims = (Hk, Hv, Dk, Dv)
    if per_token_states:
        u = conv_window(qkv, conv_state, conv_weight.shape[1])
        y = conv_taps(u, conv_weight, silu=True)
        q, k, v, g, beta = _prepare(y, a, b, A_log, dt_bias, *dims)
        o, new_state, states = _per_token_recurrence(name, q, k, v, g, beta, state)
        return o.astype(qkv.dtype), mx.contiguous(u[:, T:]), new_state, states, u
    # Long prompts run the whole pipeline segment by segment, carrying both states: the fp32
    # intermediates stay bounded (and small enough for the allocator to reuse on Linux).
    outs = []
    for s in range(0, T, SEGMENT_TOKENS):
        e = min(s + SEGMENT_TOKENS, T)
        u = conv_window(qkv[:, s:e], conv_state, conv_weight.shape[1])
        conv_state = mx.contiguous(u[:, e - s :])
        y = conv_taps(u, conv_weight, silu=True)
        q, k, v, g, beta = _prepare(y, a[:, s:e], b[:, s:e], A_log, dt_bias, *dims)
        o, state = _recurrence(name, q, k, v, g, beta, state, DEFAULT_CHUNK_SIZE)
        outs.append(o.astype(qkv.dtype))
    o = mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    return o, conv_state, state
