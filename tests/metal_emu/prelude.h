// The Metal Shading Language subset our kernels use, mapped onto C++17 for the CPU emulator.
//
// Included before the kernel text MLX generates. Address-space words vanish, `half` is
// `_Float16`, `bfloat` a round-to-nearest-even 16-bit type, `metal::` math forwards to the C
// library in single precision, and every SIMD-group function and barrier is a rendezvous handled
// by the runtime (runtime.cpp): the calling fiber blocks until its SIMD group (or threadgroup) has
// arrived, and a lane that reaches a different operation than its neighbours is reported.
// Threadgroup arrays are rewritten by the harness into MTLEMU_TG_ARRAY (one shared, poisoned,
// guarded block per threadgroup). Anything outside the subset fails to compile here on purpose.
#pragma once

#include "abi.h"

typedef _Float16 half;
typedef _Float16 float16_t;

// bfloat16 storage with round-to-nearest-even conversion from float; arithmetic happens in float.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u);  // quiet NaN
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = uint16_t(u >> 16);
    }
  }
  bfloat16_t(double d) : bfloat16_t(float(d)) {}
  bfloat16_t(int v) : bfloat16_t(float(v)) {}
  bfloat16_t(uint v) : bfloat16_t(float(v)) {}
  bfloat16_t(half v) : bfloat16_t(float(v)) {}
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
};
typedef bfloat16_t bfloat;

namespace metal {

enum class mem_flags : int {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
};
inline mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(int(a) | int(b));
}

inline float exp(float x) { return __builtin_expf(x); }
inline float exp2(float x) { return __builtin_exp2f(x); }
inline float log(float x) { return __builtin_logf(x); }
inline float log2(float x) { return __builtin_log2f(x); }
inline float sqrt(float x) { return __builtin_sqrtf(x); }
inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
inline float tanh(float x) { return __builtin_tanhf(x); }
inline float pow(float x, float y) { return __builtin_powf(x, y); }
inline float floor(float x) { return __builtin_floorf(x); }
inline float ceil(float x) { return __builtin_ceilf(x); }
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline float abs(float x) { return __builtin_fabsf(x); }
inline float fabs(float x) { return __builtin_fabsf(x); }
inline int abs(int x) { return x < 0 ? -x : x; }
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }
inline float min(float a, float b) { return __builtin_fminf(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline uint max(uint a, uint b) { return a > b ? a : b; }
inline uint min(uint a, uint b) { return a < b ? a : b; }
inline float clamp(float x, float lo, float hi) { return min(max(x, lo), hi); }
inline int clamp(int x, int lo, int hi) { return min(max(x, lo), hi); }
inline bool isnan(float x) { return __builtin_isnan(x); }
inline bool isinf(float x) { return __builtin_isinf(x); }

namespace precise {
using metal::exp;
using metal::log;
using metal::rsqrt;
using metal::sqrt;
}  // namespace precise

}  // namespace metal

namespace mtlemu {

template <class T>
struct simd_value {
  static_assert(sizeof(T) <= 8, "SIMD-group operations take scalars");
  static uint64_t to_bits(T v) {
    uint64_t b = 0;
    __builtin_memcpy(&b, &v, sizeof(T));
    return b;
  }
  static T from_bits(uint64_t b) {
    T v;
    __builtin_memcpy(&v, &b, sizeof(T));
    return v;
  }
};

struct Exchange {
  const uint64_t* values;
  int lane;
  int width;
};

template <class T>
inline Exchange exchange(int kind, int line, T x) {
  Exchange e;
  e.values = mtlemu_simd_exchange(kind, line, simd_value<T>::to_bits(x), &e.lane, &e.width);
  return e;
}

template <class T>
inline T lane_value(const Exchange& e, int lane) {
  return simd_value<T>::from_bits(e.values[lane]);
}

// A fixed pairwise tree over lanes in index order, so every lane gets the same bits.
template <class T, class F>
inline T tree_reduce(const Exchange& e, F combine) {
  T v[32];
  for (int i = 0; i < e.width; ++i) v[i] = lane_value<T>(e, i);
  for (int step = 1; step < e.width; step *= 2) {
    for (int i = 0; i + step < e.width; i += 2 * step) v[i] = combine(v[i], v[i + step]);
  }
  return v[0];
}

template <class T>
inline T shuffle_from(const Exchange& e, int src, int line) {
  if (src < 0 || src >= e.width) mtlemu_fail("SIMD shuffle reads a lane outside the SIMD group", line);
  return lane_value<T>(e, src);
}

}  // namespace mtlemu

template <class T>
inline T simd_sum(T x, int line = __builtin_LINE()) {
  auto e = mtlemu::exchange(mtlemu::OP_SUM, line, x);
  return mtlemu::tree_reduce<T>(e, [](T a, T b) { return T(a + b); });
}

template <class T>
inline T simd_max(T x, int line = __builtin_LINE()) {
  auto e = mtlemu::exchange(mtlemu::OP_MAX, line, x);
  return mtlemu::tree_reduce<T>(e, [](T a, T b) { return metal::max(a, b); });
}

template <class T>
inline T simd_min(T x, int line = __builtin_LINE()) {
  auto e = mtlemu::exchange(mtlemu::OP_MIN, line, x);
  return mtlemu::tree_reduce<T>(e, [](T a, T b) { return metal::min(a, b); });
}

template <class T>
inline T simd_shuffle(T x, ushort src, int line = __builtin_LINE()) {
  auto e = mtlemu::exchange(mtlemu::OP_SHUFFLE, line, x);
  return mtlemu::shuffle_from<T>(e, src, line);
}

template <class T>
inline T simd_shuffle_xor(T x, ushort mask, int line = __builtin_LINE()) {
  auto e = mtlemu::exchange(mtlemu::OP_SHUFFLE_XOR, line, x);
  return mtlemu::shuffle_from<T>(e, e.lane ^ mask, line);
}

template <class T>
inline T simd_shuffle_down(T x, ushort delta, int line = __builtin_LINE()) {
  auto e = mtlemu::exchange(mtlemu::OP_SHUFFLE_DOWN, line, x);
  int src = e.lane + delta;
  return src < e.width ? mtlemu::lane_value<T>(e, src) : x;  // the top lanes keep their value
}

template <class T>
inline T simd_shuffle_up(T x, ushort delta, int line = __builtin_LINE()) {
  auto e = mtlemu::exchange(mtlemu::OP_SHUFFLE_UP, line, x);
  int src = e.lane - int(delta);
  return src >= 0 ? mtlemu::lane_value<T>(e, src) : x;  // the bottom lanes keep their value
}

template <class T>
inline T simd_broadcast(T x, ushort src, int line = __builtin_LINE()) {
  auto e = mtlemu::exchange(mtlemu::OP_BROADCAST, line, x);
  return mtlemu::shuffle_from<T>(e, src, line);
}

template <class T>
inline T simd_prefix_exclusive_sum(T x, int line = __builtin_LINE()) {
  auto e = mtlemu::exchange(mtlemu::OP_PREFIX_EXCLUSIVE_SUM, line, x);
  T acc = T(0);
  for (int i = 0; i < e.lane; ++i) acc = T(acc + mtlemu::lane_value<T>(e, i));
  return acc;
}

template <class T>
inline T simd_prefix_inclusive_sum(T x, int line = __builtin_LINE()) {
  auto e = mtlemu::exchange(mtlemu::OP_PREFIX_INCLUSIVE_SUM, line, x);
  T acc = T(0);
  for (int i = 0; i <= e.lane; ++i) acc = T(acc + mtlemu::lane_value<T>(e, i));
  return acc;
}

inline bool simd_all(bool x, int line = __builtin_LINE()) {
  auto e = mtlemu::exchange(mtlemu::OP_ALL, line, x);
  for (int i = 0; i < e.width; ++i) {
    if (!mtlemu::lane_value<bool>(e, i)) return false;
  }
  return true;
}

inline bool simd_any(bool x, int line = __builtin_LINE()) {
  auto e = mtlemu::exchange(mtlemu::OP_ANY, line, x);
  for (int i = 0; i < e.width; ++i) {
    if (mtlemu::lane_value<bool>(e, i)) return true;
  }
  return false;
}

inline void threadgroup_barrier(metal::mem_flags, int line = __builtin_LINE()) {
  mtlemu_barrier(line);
}

inline void simdgroup_barrier(metal::mem_flags, int line = __builtin_LINE()) {
  mtlemu::exchange(mtlemu::OP_SIMDGROUP_BARRIER, line, 0);
}

using namespace metal;


// `threadgroup T name[N];` becomes a reference to one block shared by the threadgroup's fibers.
#define MTLEMU_TG_ARRAY(T, name, N)                                                 \
  T(&name)[N] = *reinterpret_cast<T(*)[N]>(                                         \
      mtlemu_tg_alloc(__LINE__, #name, sizeof(T) * size_t(N), alignof(T)))

// Address spaces carry no meaning on the CPU. A `threadgroup` word the harness did not rewrite
// (a pointer, a parameter, a nested declaration) is outside the supported subset.
#define device
#define constant
#define thread
#define threadgroup MTLEMU_UNSUPPORTED_threadgroup_usage
