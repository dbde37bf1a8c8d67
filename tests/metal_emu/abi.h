// What the emulator's runtime (runtime.cpp) and the compiled kernels (prelude.h) share.
#pragma once

#include <stddef.h>
#include <stdint.h>

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

struct uint3 {
  uint x, y, z;
};

// Per-thread values of the Metal kernel attributes MLX may add to the signature.
struct mtlemu_attrs {
  uint dispatch_quadgroups_per_threadgroup;
  uint dispatch_simdgroups_per_threadgroup;
  uint3 dispatch_threads_per_threadgroup;
  uint3 grid_origin;
  uint3 grid_size;
  uint quadgroup_index_in_threadgroup;
  uint quadgroups_per_threadgroup;
  uint simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup;
  uint thread_execution_width;
  uint thread_index_in_quadgroup;
  uint thread_index_in_simdgroup;
  uint thread_index_in_threadgroup;
  uint3 thread_position_in_grid;
  uint3 thread_position_in_threadgroup;
  uint3 threadgroup_position_in_grid;
  uint3 threadgroups_per_grid;
  uint3 threads_per_grid;
  uint threads_per_simdgroup;
  uint3 threads_per_threadgroup;
};

// The synchronising operations, named in error messages by runtime.cpp.
namespace mtlemu {
enum OpKind {
  OP_SUM = 1,
  OP_MAX,
  OP_MIN,
  OP_SHUFFLE,
  OP_SHUFFLE_XOR,
  OP_SHUFFLE_DOWN,
  OP_SHUFFLE_UP,
  OP_BROADCAST,
  OP_PREFIX_EXCLUSIVE_SUM,
  OP_PREFIX_INCLUSIVE_SUM,
  OP_ALL,
  OP_ANY,
  OP_SIMDGROUP_BARRIER,
  OP_THREADGROUP_BARRIER,
};
}  // namespace mtlemu

extern "C" {
// Deposit this lane's value for a SIMD-group operation and block until the group has arrived;
// returns the 32 deposited values (raw bits) and this lane's index and the group's width.
const uint64_t* mtlemu_simd_exchange(int kind, int line, uint64_t bits, int* lane, int* width);
// Block until every thread of the threadgroup has reached a barrier (the same one).
void mtlemu_barrier(int line);
// The block behind `threadgroup T name[N]` for the running threadgroup (poisoned, guarded).
void* mtlemu_tg_alloc(int line, const char* name, size_t nbytes, size_t align);
// Stop the launch with an error attributed to a source line.
__attribute__((noreturn)) void mtlemu_fail(const char* what, int line);
}
