"""Custom Metal kernels for the Gated DeltaNet layer (Apple GPUs).

Two kernels, both built lazily through `_kernel(name)` on first use (never at import), from
`mx.fast.metal_kernel` looked up at that moment, so tests can put a CPU emulator in its place:

* `gdn_fused` does the whole layer core in one pass per (batch, value head, block of value rows):
  conv-state update, causal depthwise conv + SiLU, the q/k/v split, fp32 L2 norms (eps 1e-6 on the
  sum) with the Dk^-1/2 query scale, beta = sigmoid(b), g = exp(-exp(A_log) * softplus(a +
  dt_bias)) in fp32, and the recurrence, reading and writing the fp32 state once. Instantiated with
  TB = 1 it is the decode kernel (T = 1); with TB = 8 it is the sequential prefill kernel for short
  prompts and chunks. Optionally it also writes the state after every token and the conv window
  (speculative decoding, T <= 8).
* `gdn_recurrent` is the recurrence alone (`gated_delta_update`: q, k already normalised).

Threadgroup layout (both kernels): 32 x NSG threads (NSG SIMD groups, 4). A value row of the
state (Dk floats) belongs to LPR lanes (4 for Dk <= 128, 8 for Dk <= 256), each holding Dk / LPR
elements interleaved (element i * LPR + lane), so a SIMD group holds RPS = 32 / LPR rows and a
threadgroup RPS * NSG rows. Row dot products are LPR-lane butterflies of simd_shuffle_xor. The
grid is (32, Dv / RPS, B * Hv) threads; the last threadgroup of a head may be partial (fewer
SIMD groups), which the kernels handle without `threads_per_threadgroup`.
Per block of TB tokens: every SIMD group prepares whole tokens (conv + SiLU of the q, k channels
of its key head and the v channels of the threadgroup's rows into threadgroup memory, the two
norms by simd_sum, the gates), a barrier, then every row steps through the TB tokens in
registers, a barrier before the next block reuses the threadgroup memory.

Shapes the kernels take (`supports`): activations fp32/bf16/fp16, state fp32; Dk a multiple of 4
up to 128, or of 8 up to 256; Dv a multiple of 32 / LPR (8 for Dk <= 128, 4 above); Hv a multiple
of Hk (value head j reads key head j // (Hv / Hk)); conv kernel K >= 2; any B >= 1 and T >= 1.

Dispatch rule (`is_eligible`, used by the portable dispatch): Metal available, shapes supported,
and T <= MAX_FUSED_T (64): the fused sequential kernel makes T dependent steps, while the portable
chunked path (MLX GEMMs, or mx.fast.gated_delta_update) does T / C of them; long prompts stay on
the portable path. Per-token states only for T <= MAX_PER_TOKEN_T (8).
The gated RMSNorm with z is not fused: it needs the whole Dv row of a head, which spans
threadgroups here.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

MAX_FUSED_T = 64
MAX_PER_TOKEN_T = 8
NSG = 4  # SIMD groups per threadgroup
PREFILL_TB = 8  # tokens per block in the prefill instantiation
_DTYPES = (mx.float32, mx.bfloat16, mx.float16)

# Scalar helpers only (no buffer pointers: their address space depends on the buffer size).
HEADER = """
inline float gdn_sigmoid(float x) {
  const float e = metal::exp(-metal::abs(x));
  return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

inline float gdn_softplus(float x) {
  // log1p is not in the Metal standard library: below 1e-3 the series e - e^2/2 is exact to fp32.
  const float e = metal::exp(-metal::abs(x));
  const float l = e < 1e-3f ? e * (1.0f - 0.5f * e) : metal::log(1.0f + e);
  return metal::max(x, 0.0f) + l;
}

inline float gdn_decay(float x, float a_log) {
  return metal::exp(-metal::exp(a_log) * gdn_softplus(x));
}
"""

# Index set-up shared by both kernels. A lane owns elements sub + i * LPR (i < NPL) of value row
# `dv`; the row's LPR lanes are neighbours in the SIMD group.
_SETUP = """
  constexpr int RPS = 32 / LPR;
  constexpr int NPL = Dk / LPR;
  constexpr int RPT = RPS * NSG;
  constexpr int R = Hv / Hk;

  threadgroup float tg_q[TB * Dk];
  threadgroup float tg_k[TB * Dk];
  threadgroup float tg_v[TB * RPT];
  threadgroup float tg_g[TB];
  threadgroup float tg_beta[TB];
  threadgroup float tg_rq[TB];
  threadgroup float tg_rk[TB];

  const int lane = int(thread_index_in_simdgroup);
  const int sg = int(simdgroup_index_in_threadgroup);
  const int sub = lane % LPR;
  const int n = int(threadgroup_position_in_grid.z);
  const int b_idx = n / Hv;
  const int hv = n % Hv;
  const int hk = hv / R;
  const int tgy = int(threadgroup_position_in_grid.y);
  // SIMD groups present in this threadgroup (the last one of a head may be partial).
  const int nsg = metal::min(NSG, Dv / RPS - tgy * NSG);
  const int row0 = tgy * RPT;
  const int nv = nsg * RPS;
  const int vrow = sg * RPS + lane / LPR;
  const int dv = row0 + vrow;
  const int T_ = T;

  float s[NPL];
  for (int i = 0; i < NPL; ++i) {
    s[i] = HasState ? state_in[(n * Dv + dv) * Dk + sub + i * LPR] : 0.0f;
  }
"""

# Conv of channel c for token t over u = [conv_state ; qkv] (K taps, last tap = this token).
_CONV = """        float acc = 0.0f;
        for (int j = 0; j < K; ++j) {
          const int r = t + j;
          float x = 0.0f;
          if (r >= K - 1) {
            x = static_cast<float>(qkv[(b_idx * T_ + r - (K - 1)) * C + c]);
          } else if (HasConv) {
            x = static_cast<float>(conv_state[(b_idx * (K - 1) + r) * C + c]);
          }
          acc += static_cast<float>(conv_w[c * K + j]) * x;
        }
        const float xs = acc * gdn_sigmoid(acc);
"""

_FUSED_PRELUDE = """
  constexpr int C = 2 * Hk * Dk + Hv * Dv;
  const int cq = hk * Dk;
  const int ck = Hk * Dk + hk * Dk;
  const int cv = 2 * Hk * Dk + hv * Dv;

  const int nthr = 32 * nsg;
  const int tid = sg * 32 + lane;

  // Conv state (or the whole window u) for this head's channels, by the head's first threadgroup:
  // q/k channels by the first value head of the key head, v channels by every value head.
  if (tgy == 0) {
    const int rows = Window ? K - 1 + T_ : K - 1;
    const int nqk = (hv % R == 0) ? 2 * Dk : 0;
    const int nch = nqk + Dv;
    for (int i = tid; i < rows * nch; i += nthr) {
      const int r = i / nch + (K - 1 + T_ - rows);
      const int j = i % nch;
      const int c = j < nqk ? (j < Dk ? cq + j : ck + j - Dk) : cv + j - nqk;
      float x = 0.0f;
      if (r >= K - 1) {
        x = static_cast<float>(qkv[(b_idx * T_ + r - (K - 1)) * C + c]);
      } else if (HasConv) {
        x = static_cast<float>(conv_state[(b_idx * (K - 1) + r) * C + c]);
      }
      conv_out[(b_idx * rows + r - (K - 1 + T_ - rows)) * C + c] = static_cast<OutT>(x);
    }
  }
  const float q_scale = metal::rsqrt(static_cast<float>(Dk));
"""

_FUSED_PREP = (
    """
    // Each SIMD group prepares whole tokens: conv + SiLU of the q, k channels of key head hk and
    // of the v channels of this threadgroup's rows, the two L2 norms, the gates.
    for (int tt = sg; tt < nt; tt += nsg) {
      const int t = t0 + tt;
      float sq = 0.0f;
      float sk = 0.0f;
      for (int jj = lane; jj < 2 * Dk + nv; jj += 32) {
        const int c = jj < Dk ? cq + jj : (jj < 2 * Dk ? ck + jj - Dk : cv + row0 + jj - 2 * Dk);
"""
    + _CONV
    + """        if (jj < Dk) {
          tg_q[tt * Dk + jj] = xs;
          sq += xs * xs;
        } else if (jj < 2 * Dk) {
          tg_k[tt * Dk + jj - Dk] = xs;
          sk += xs * xs;
        } else {
          tg_v[tt * RPT + jj - 2 * Dk] = xs;
        }
      }
      sq = simd_sum(sq);
      sk = simd_sum(sk);
      if (lane == 0) {
        const int gi = (b_idx * T_ + t) * Hv + hv;
        tg_rq[tt] = metal::rsqrt(sq + 1e-6f) * q_scale;
        tg_rk[tt] = metal::rsqrt(sk + 1e-6f);
        tg_g[tt] = gdn_decay(static_cast<float>(a[gi]) + static_cast<float>(dt_bias[hv]),
                             static_cast<float>(A_log[hv]));
        tg_beta[tt] = gdn_sigmoid(static_cast<float>(b[gi]));
      }
    }
"""
)

_PLAIN_PREP = """
    // Each SIMD group loads whole tokens: q, k of key head hk, v of this threadgroup's rows.
    for (int tt = sg; tt < nt; tt += nsg) {
      const int t = t0 + tt;
      for (int jj = lane; jj < 2 * Dk + nv; jj += 32) {
        if (jj < Dk) {
          tg_q[tt * Dk + jj] = static_cast<float>(q[((b_idx * T_ + t) * Hk + hk) * Dk + jj]);
        } else if (jj < 2 * Dk) {
          tg_k[tt * Dk + jj - Dk] =
              static_cast<float>(k[((b_idx * T_ + t) * Hk + hk) * Dk + jj - Dk]);
        } else {
          tg_v[tt * RPT + jj - 2 * Dk] =
              static_cast<float>(v[((b_idx * T_ + t) * Hv + hv) * Dv + row0 + jj - 2 * Dk]);
        }
      }
      if (lane == 0) {
        const int gi = (b_idx * T_ + t) * Hv + hv;
        tg_rq[tt] = 1.0f;
        tg_rk[tt] = 1.0f;
        tg_g[tt] = static_cast<float>(g[gi]);
        tg_beta[tt] = static_cast<float>(beta[gi]);
      }
    }
"""

# The recurrence over one block; the raw q, k are in threadgroup memory and their norms rq (with
# the query scale) and rk are applied to the row sums: k-hat = k * rk, q-hat = q * rq.
_STEP = """
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int tt = 0; tt < nt; ++tt) {
      const float gt = tg_g[tt];
      const float rk = tg_rk[tt];
      float kd = 0.0f;
      for (int i = 0; i < NPL; ++i) {
        s[i] *= gt;
        kd += s[i] * tg_k[tt * Dk + sub + i * LPR];
      }
      for (int o = LPR / 2; o > 0; o /= 2) {
        kd += simd_shuffle_xor(kd, ushort(o));
      }
      const float delta = tg_beta[tt] * (tg_v[tt * RPT + vrow] - kd * rk) * rk;
      float out = 0.0f;
      for (int i = 0; i < NPL; ++i) {
        s[i] += delta * tg_k[tt * Dk + sub + i * LPR];
        out += s[i] * tg_q[tt * Dk + sub + i * LPR];
      }
      for (int o = LPR / 2; o > 0; o /= 2) {
        out += simd_shuffle_xor(out, ushort(o));
      }
      const int yi = ((b_idx * T_ + t0 + tt) * Hv + hv) * Dv + dv;
      if (sub == 0) {
        y[yi] = static_cast<OutT>(out * tg_rq[tt]);
      }
{per_token}
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
"""

_PER_TOKEN_STORE = """      if (PerTok) {
        for (int i = 0; i < NPL; ++i) {
          states_pt[yi * Dk + sub + i * LPR] = s[i];
        }
      }"""


def _block_loop(prep: str, per_token: str) -> str:
    return (
        "\n  for (int t0 = 0; t0 < T_; t0 += TB) {\n"
        "    const int nt = metal::min(TB, T_ - t0);\n"
        + prep
        + _STEP.replace("{per_token}", per_token)
        + "  }\n"
    )


_STORE = """
  for (int i = 0; i < NPL; ++i) {
    state_out[(n * Dv + dv) * Dk + sub + i * LPR] = s[i];
  }
"""

FUSED_SOURCE = _SETUP + _FUSED_PRELUDE + _block_loop(_FUSED_PREP, _PER_TOKEN_STORE) + _STORE
RECURRENT_SOURCE = _SETUP + _block_loop(_PLAIN_PREP, "") + _STORE

# name -> the arguments of mx.fast.metal_kernel
KERNELS: dict[str, dict[str, Any]] = {
    "gdn_fused": dict(
        input_names=["qkv", "a", "b", "conv_w", "A_log", "dt_bias", "conv_state", "state_in", "T"],
        output_names=["y", "conv_out", "state_out", "states_pt"],
        source=FUSED_SOURCE,
        header=HEADER,
    ),
    "gdn_recurrent": dict(
        input_names=["q", "k", "v", "g", "beta", "state_in", "T"],
        output_names=["y", "state_out"],
        source=RECURRENT_SOURCE,
        header="",
    ),
}

_built: dict[tuple[str, Any], Any] = {}


def _kernel(name: str):
    """The kernel `name`, built on first use with whatever `mx.fast.metal_kernel` is now."""
    factory = mx.fast.metal_kernel
    key = (name, factory)
    if key not in _built:
        _built[key] = factory(name=name, ensure_row_contiguous=True, **KERNELS[name])
    return _built[key]


def lanes_per_row(head_k_dim: int) -> int:
    return 4 if head_k_dim <= 128 else 8


def supports(
    *, T: int, dtype: mx.Dtype, head_k_dim: int, head_v_dim: int, per_token_states: bool
) -> bool:
    """Whether the kernels can run these shapes at all (any T; see is_eligible for the rule)."""
    dk, dv = head_k_dim, head_v_dim
    if dtype not in _DTYPES or T < 1 or dk < 4 or dv < 1:
        return False
    if per_token_states and T > MAX_PER_TOKEN_T:
        return False
    lpr = lanes_per_row(dk)
    return dk <= 256 and dk % lpr == 0 and dv % (32 // lpr) == 0


def is_eligible(
    *, T: int, dtype: mx.Dtype, head_k_dim: int, head_v_dim: int, per_token_states: bool
) -> bool:
    """The dispatch rule: Metal present, shapes supported, and T <= MAX_FUSED_T."""
    return (
        mx.metal.is_available()
        and T <= MAX_FUSED_T
        and supports(
            T=T,
            dtype=dtype,
            head_k_dim=head_k_dim,
            head_v_dim=head_v_dim,
            per_token_states=per_token_states,
        )
    )


def _launch_shape(B: int, Hv: int, Dk: int, Dv: int) -> tuple[tuple, tuple, int]:
    lpr = lanes_per_row(Dk)
    return (32, Dv // (32 // lpr), B * Hv), (32, NSG, 1), lpr


def _check(T: int, dtype: mx.Dtype, Hk: int, Hv: int, Dk: int, Dv: int, per_token: bool) -> None:
    if Hk < 1 or Hv % Hk != 0:
        raise ValueError(f"num_v_heads ({Hv}) must be a multiple of num_k_heads ({Hk})")
    if not supports(T=T, dtype=dtype, head_k_dim=Dk, head_v_dim=Dv, per_token_states=per_token):
        raise ValueError(
            f"the Metal gated-delta kernels do not support T={T}, dtype={dtype}, head_k_dim={Dk}, "
            f"head_v_dim={Dv}, per_token_states={per_token} (see mlx_qwen35.gated_delta.metal)"
        )


def _dummy(dtype: mx.Dtype) -> mx.array:
    # Stands in for an absent conv_state / state; the kernel never reads it (HasConv/HasState).
    return mx.zeros((1,), dtype=dtype)


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
    per_token_states: bool = False,
) -> tuple[mx.array, ...]:
    """The fused layer core in one kernel launch; same contract as the portable version.

    Returns (o [B,T,Hv,Dv], new_conv_state [B,K-1,C], both in qkv.dtype, new_state [B,Hv,Dv,Dk]
    fp32), plus (states_per_token [B,T,Hv,Dv,Dk] fp32, conv_window u [B,K-1+T,C] in qkv.dtype)
    when per_token_states is set: new_conv_state is then the view u[:, T:].
    """
    B, T, C = qkv.shape
    Hk, Hv, Dk, Dv = num_k_heads, num_v_heads, head_k_dim, head_v_dim
    _check(T, qkv.dtype, Hk, Hv, Dk, Dv, per_token_states)
    if C != 2 * Hk * Dk + Hv * Dv:
        raise ValueError(
            f"qkv has {C} channels, expected 2*Hk*Dk + Hv*Dv = {2 * Hk * Dk + Hv * Dv}"
        )
    K = conv_weight.shape[1]
    if K < 2:
        raise ValueError("the conv kernel size must be at least 2")
    if conv_state is not None and tuple(conv_state.shape) != (B, K - 1, C):
        raise ValueError(f"conv_state has shape {conv_state.shape}, expected {(B, K - 1, C)}")
    if state is not None and tuple(state.shape) != (B, Hv, Dv, Dk):
        raise ValueError(f"state has shape {state.shape}, expected {(B, Hv, Dv, Dk)}")
    grid, threadgroup, lpr = _launch_shape(B, Hv, Dk, Dv)
    tb = 1 if T == 1 else PREFILL_TB
    window_rows = K - 1 + T if per_token_states else K - 1
    outs = _kernel("gdn_fused")(
        inputs=[
            qkv,
            a,
            b,
            conv_weight.reshape(C, K),
            A_log.astype(mx.float32),
            dt_bias,
            conv_state if conv_state is not None else _dummy(qkv.dtype),
            state.astype(mx.float32) if state is not None else _dummy(mx.float32),
            T,
        ],
        template=[
            ("OutT", qkv.dtype),
            ("Dk", Dk),
            ("Dv", Dv),
            ("Hk", Hk),
            ("Hv", Hv),
            ("K", K),
            ("LPR", lpr),
            ("NSG", NSG),
            ("TB", tb),
            ("HasConv", conv_state is not None),
            ("HasState", state is not None),
            ("PerTok", per_token_states),
            ("Window", per_token_states),
        ],
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[
            (B, T, Hv, Dv),
            (B, window_rows, C),
            (B, Hv, Dv, Dk),
            (B, T, Hv, Dv, Dk) if per_token_states else (1,),
        ],
        output_dtypes=[qkv.dtype, qkv.dtype, mx.float32, mx.float32],
    )
    o, conv_out, new_state, states_pt = outs
    if not per_token_states:
        return o, conv_out, new_state
    return o, conv_out[:, T:], new_state, states_pt, conv_out


def gated_delta_update(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """The recurrence alone: q, k [B,T,Hk,Dk] normalised (q scaled), v [B,T,Hv,Dv],
    g, beta [B,T,Hv]; returns (y [B,T,Hv,Dv] in v.dtype, state [B,Hv,Dv,Dk] fp32)."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    _check(T, v.dtype, Hk, Hv, Dk, Dv, False)
    if state is not None and tuple(state.shape) != (B, Hv, Dv, Dk):
        raise ValueError(f"state has shape {state.shape}, expected {(B, Hv, Dv, Dk)}")
    grid, threadgroup, lpr = _launch_shape(B, Hv, Dk, Dv)
    y, new_state = _kernel("gdn_recurrent")(
        inputs=[
            q,
            k,
            v,
            g.astype(mx.float32),
            beta.astype(mx.float32),
            state.astype(mx.float32) if state is not None else _dummy(mx.float32),
            T,
        ],
        template=[
            ("OutT", v.dtype),
            ("Dk", Dk),
            ("Dv", Dv),
            ("Hk", Hk),
            ("Hv", Hv),
            ("LPR", lpr),
            ("NSG", NSG),
            ("TB", 1 if T == 1 else PREFILL_TB),
            ("HasState", state is not None),
        ],
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[(B, T, Hv, Dv), (B, Hv, Dv, Dk)],
        output_dtypes=[v.dtype, mx.float32],
    )
    return y, new_state
