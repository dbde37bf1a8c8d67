"""Chunkwise-parallel gated delta prefill (WY / UT transform), in plain MLX ops.

The algorithm and its numerics are those of `design/gated_delta.md`. Per (batch, value head) and
chunk of C tokens with start state S₀ (kept transposed as H = S₀ᵀ ∈ ℝ^{Dk×Dv}):

    D[t,i] = ∏_{i<s≤t} g_s (i ≤ t)     γ_t = ∏_{s≤t} g_s     d_i = γ_C/γ_i = D[C,i]
    A = strict_tril(diag(β)(D ⊙ K Kᵀ))   T = (I + A)⁻¹       P = tril(D ⊙ Q Kᵀ)
    U₀ = T diag(β) V     W = T diag(βγ) K     Y₀ = P U₀      Q̃ = diag(γ) Q − P W
    sequential:  U = U₀ − W H;   Y = Y₀ + Q̃ H;   H ← γ_C H + Kᵀ diag(d) U

How that maps onto few, large MLX ops (each choice was measured on the CPU backend):
- [K; Q] is laid out once per segment so that one GEMM gives both K Kᵀ and Q Kᵀ, per *key* head:
  under GQA the r value heads of a key head share them.
- D comes from a cumulative product of the masked g matrix, never from exp of cumulative-log
  differences: exact products, no exp (≈14 ns/element on MLX CPU), and a g that underflows to 0
  just gives zeros (log(0) would give NaN).
- Masks are applied by multiplying with 0/1 float matrices: `mx.where` is ~6x slower on CPU.
- With N = −A, T = (I − N)⁻¹ satisfies T = I + N T, so [I; 0] + [N; P] T = [T; P T] in one GEMM.
  Scaling its top rows by d folds the diagonal of the state update into U:
  R = [diag(d) T; P T], R·diag(β)V = [d ⊙ U₀; Y₀] and R·diag(βγ)K = [d ⊙ W; P W].
  The sequential step is then two GEMMs per chunk: Z = [d⊙U₀; Y₀] + [−d⊙W; Q̃] H gives d⊙U and
  Y at once, and H ← γ_C H + Kᵀ (d⊙U) (Kᵀ shared by the key head's r value heads).
- (I − N)⁻¹ is computed on 8×8 diagonal blocks as (I + N)(I + N²)(I + N⁴) and merged by doubling,
  [[T₁₁, 0], [T₂₂ N₂₁ T₁₁, T₂₂]], up to C. One nilpotent series over a whole chunk explodes when
  keys repeat with g ≈ 1, β ≈ 1; `mx.linalg` runs on the CPU only.
- Decay products below FLUSH_BELOW (1e-9) become exact zeros. Heads that decay fast (g ~ 0.05
  per token) otherwise fill D, γ and everything made from them with subnormal floats, which x86
  CPUs compute ~100x slower (MLX does not set flush-to-zero on its CPU threads): the whole
  recurrence measured ~10x slower on such heads, ~3x with the flush (products of a few kept
  factors, as in N⁴, can still be subnormal; 1e-9 keeps those of up to four normal). What is
  dropped weighs <= 1e-9 against the D = 1 diagonal, below fp32 rounding (6e-8).
- The tail is padded with g = 1, β = 0, q = k = v = 0: the state passes through it unchanged.
- Long prompts are cut into segments of ~512 tokens carrying H, which bounds the intermediates
  (large fresh buffers page-fault on every call on Linux).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from ...errors import UserError

DEFAULT_CHUNK_SIZE = 32
DEFAULT_SEGMENT_TOKENS = 512
# Decay products smaller than this are flushed to 0 (see the module docstring).
FLUSH_BELOW = 1e-9


def check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 8 or chunk_size & (chunk_size - 1):
        raise UserError(
            f"gated delta chunk_size must be a power of two >= 8, got {chunk_size}; use 32 or 64"
        )


@lru_cache(maxsize=8)
def _constants(C: int) -> dict[str, mx.array]:
    t = mx.arange(C)[:, None]
    i = mx.arange(C)[None, :]
    f32 = mx.float32
    strict = (t > i).astype(f32)
    consts = {
        "strict": strict,
        "not_strict": 1.0 - strict,
        # Row blocks of the stacked [N; P]: N lives strictly below the diagonal, P on and below.
        "mask2": mx.stack([strict, (t >= i).astype(f32)]),
        "eye_top": mx.concatenate([mx.eye(C, dtype=f32), mx.zeros((C, C), f32)]),
        "eye8": mx.eye(8, dtype=f32),
    }
    mx.eval(*consts.values())
    return consts


def _diagonal_blocks(x: mx.array, m: int, row_half: int) -> mx.array:
    """Blocks (2b + row_half, 2b) of size m of x [N, C, C], as [N, C // 2m, m, m]."""
    N, C = x.shape[0], x.shape[-1]
    nb = C // (2 * m)
    x7 = x.reshape(N, nb, 2, m, nb, 2, m)[:, :, row_half, :, :, 0, :]
    return mx.diagonal(x7, axis1=1, axis2=3).transpose(0, 3, 1, 2)


def unit_lower_inverse(n_lower: mx.array) -> mx.array:
    """(I − N)⁻¹ for strictly lower triangular N [..., C, C], C a power of two ≥ 8."""
    shape = n_lower.shape
    C = shape[-1]
    x = n_lower.reshape(-1, C, C)
    N = x.shape[0]
    n8 = mx.diagonal(x.reshape(N, C // 8, 8, C // 8, 8), axis1=1, axis2=3)
    n8 = mx.contiguous(n8.transpose(0, 3, 1, 2))  # [N, C/8, 8, 8]
    # N⁸ = 0 on an 8×8 block, so (I − N)⁻¹ = I + N + … + N⁷ = (I + N)(I + N²)(I + N⁴).
    n2 = n8 @ n8
    n4 = n2 @ n2
    inv = _constants(C)["eye8"] + n8
    inv = mx.addmm(inv, inv, n2)
    inv = mx.addmm(inv, inv, n4)
    m = 8
    while m < C:
        t11 = inv[:, 0::2]
        t22 = inv[:, 1::2]
        t21 = (t22 @ _diagonal_blocks(x, m, 1)) @ t11
        top = mx.concatenate([t11, mx.zeros_like(t11)], axis=-1)
        inv = mx.concatenate([top, mx.concatenate([t21, t22], axis=-1)], axis=-2)
        m *= 2
    return inv.reshape(shape)


def _flush(decay: mx.array) -> mx.array:
    """Decay products below FLUSH_BELOW set to 0 (see the module docstring)."""
    return decay * (decay >= FLUSH_BELOW)


def _segment_inputs(q, k, v, g, beta, C):
    """Chunk-major layouts of one segment, padded to a multiple of C."""
    B, L, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    r = Hv // Hk
    pad = -L % C
    if pad:
        q = mx.concatenate([q, mx.zeros((B, pad, Hk, Dk), q.dtype)], axis=1)
        k = mx.concatenate([k, mx.zeros((B, pad, Hk, Dk), k.dtype)], axis=1)
        v = mx.concatenate([v, mx.zeros((B, pad, Hv, Dv), v.dtype)], axis=1)
        g = mx.concatenate([g, mx.ones((B, pad, Hv), g.dtype)], axis=1)
        beta = mx.concatenate([beta, mx.zeros((B, pad, Hv), beta.dtype)], axis=1)
    n = (L + pad) // C

    def heads_first(x, *head_shape):
        x = x.reshape(B, n, C, *head_shape, *x.shape[3:])
        nh = len(head_shape)
        # [B, n, C, heads..., D] -> [n, B, heads..., C, D]
        perm = (1, 0, *range(3, 3 + nh), 2, *range(3 + nh, x.ndim))
        return x.transpose(perm)

    kq = mx.concatenate([heads_first(k, Hk), heads_first(q, Hk)], axis=-2).astype(mx.float32)
    vs = heads_first(v, Hk, r)
    gs = heads_first(g.astype(mx.float32)[..., None], Hk, r)[..., 0]
    bs = heads_first(beta.astype(mx.float32)[..., None], Hk, r)[..., 0]
    return kq, vs, gs, bs, n


def _segment(q, k, v, g, beta, H, C):
    """One segment; H is the transposed state [B*Hv, Dk, Dv]. Returns (outputs, H)."""
    B, L, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    r = Hv // Hk
    c = _constants(C)
    kq, vs, gs, bs, n = _segment_inputs(q, k, v, g, beta, C)
    ks = kq[..., :C, :]  # [n, B, Hk, C, Dk]

    kqk = (kq @ ks.swapaxes(-1, -2)).reshape(n, B, Hk, 1, 2, C, C)  # [K Kᵀ; Q Kᵀ] per key head
    decay = _flush(mx.cumprod(c["strict"] * gs[..., None] + c["not_strict"], axis=-2))  # D
    gamma = _flush(mx.cumprod(gs, axis=-1))
    row_scale = mx.stack([-bs, mx.ones_like(bs)], axis=-2)[..., None]  # [−β; 1]
    mixed = (decay[..., None, :, :] * kqk) * (c["mask2"] * row_scale)  # [N; P], N = −A
    inv = unit_lower_inverse(mixed[..., 0, :, :])
    rr = mx.addmm(c["eye_top"], mixed.reshape(n, B, Hk, r, 2 * C, C), inv)  # [T; P T]
    d = decay[..., C - 1, :]
    rr = rr * mx.concatenate([d, mx.ones_like(d)], axis=-1)[..., None]  # [diag(d) T; P T]

    z0 = rr @ (bs[..., None] * vs)  # [d ⊙ U₀; Y₀]
    wk = rr @ ((bs * gamma)[..., None] * ks[:, :, :, None])  # [d ⊙ W; P W]
    g_q = mx.concatenate([mx.zeros_like(gamma), gamma], axis=-1)[..., None]
    m = g_q * kq[:, :, :, None] - wk  # [−d ⊙ W; γ Q − P W]

    z0 = z0.reshape(n, B * Hv, 2 * C, Dv)
    m = m.reshape(n, B * Hv, 2 * C, Dk)
    k_t = ks.swapaxes(-1, -2)[:, :, :, None]  # [n, B, Hk, 1, Dk, C]
    g_last = gamma[..., C - 1].reshape(n, B * Hv, 1, 1)
    outs = []
    for j in range(n):
        z = mx.addmm(z0[j], m[j], H)
        u = z[:, :C].reshape(B, Hk, r, C, Dv)
        decayed = (g_last[j] * H).reshape(B, Hk, r, Dk, Dv)
        H = mx.addmm(decayed, k_t[j], u).reshape(B * Hv, Dk, Dv)
        outs.append(z[:, C:].reshape(B, Hv, C, Dv).swapaxes(1, 2))
    return outs, H


def chunked_gated_delta(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    segment_tokens: int = DEFAULT_SEGMENT_TOKENS,
) -> tuple[mx.array, mx.array]:
    """Gated delta recurrence over a whole prompt, chunkwise parallel.

    Shapes as `gated_delta_update`: q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv];
    state [B, Hv, Dv, Dk] fp32 or None. Returns (y [B, T, Hv, Dv] in v.dtype, state fp32).
    """
    check_chunk_size(chunk_size)
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    if state is None:
        H = mx.zeros((B * Hv, Dk, Dv), mx.float32)
    else:
        H = state.astype(mx.float32).swapaxes(-1, -2).reshape(B * Hv, Dk, Dv)
    seg = chunk_size * max(1, segment_tokens // chunk_size)
    outs = []
    for s in range(0, T, seg):
        e = min(s + seg, T)
        seg_outs, H = _segment(
            q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], H, chunk_size
        )
        outs.extend(seg_outs)
    if not outs:
        y = mx.zeros((B, 0, Hv, Dv), mx.float32)
    else:
        y = mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    if y.shape[1] != T:
        y = y[:, :T]
    return y.astype(v.dtype), H.reshape(B, Hv, Dk, Dv).swapaxes(-1, -2)
