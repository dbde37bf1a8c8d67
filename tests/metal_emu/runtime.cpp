// CPU runtime of the Metal emulator: threadgroups run as fibers on one OS thread.
//
// Every thread of a threadgroup is a fiber with its own stack. A fiber runs until it reaches a
// SIMD-group operation, a threadgroup barrier or its end; the scheduler then picks the next ready
// fiber by a fixed priority (lowest index first, highest first, or seeded random), so a SIMD group
// runs as far as it can before the next one starts. That order is what exposes missing barriers:
// data another SIMD group has not written yet is still the NaN poison.
//
// A SIMD-group operation completes when all lanes of the group have deposited a value at the same
// operation (same kind, same source line); lanes that arrive at different operations, or that
// return while the others wait, are reported as divergent. Buffers come from mtlemu_alloc: each
// ends on a page boundary followed by unmapped pages and starts after guard bytes, so an access
// past the end faults (caught here and reported) and a write before the start is found by
// mtlemu_check_guard. Threadgroup arrays get the same treatment and are re-poisoned per threadgroup.

// The hand-written context switch is for x86-64 Linux; elsewhere (or with -DMTLEMU_UCONTEXT)
// fibers use ucontext.
#if defined(__x86_64__) && defined(__linux__) && !defined(MTLEMU_UCONTEXT)
#define MTLEMU_ASM_SWITCH 1
#else
#define MTLEMU_ASM_SWITCH 0
#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700  // macOS declares the (deprecated) ucontext calls only with it
#endif
#endif

#include "abi.h"

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#if !MTLEMU_ASM_SWITCH
#include <ucontext.h>
#endif

namespace {

constexpr size_t kStackSize = 256 * 1024;
constexpr size_t kGuard = 256 * 1024;  // unmapped bytes around every buffer
constexpr size_t kThreadgroupMemoryLimit = 32 * 1024;
constexpr int kMaxThreadsPerThreadgroup = 1024;
constexpr unsigned char kSlackByte = 0xA5;

size_t page_size() {
  static size_t p = size_t(sysconf(_SC_PAGESIZE));
  return p;
}

size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

// ----------------------------------------------------------------------------- context switch
#if MTLEMU_ASM_SWITCH
struct Context {
  void* sp = nullptr;
};
extern "C" void mtlemu_switch(void** save_sp, void* load_sp);
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer, then restores the same set from the other stack and returns into it.
asm(R"(
  .text
  .globl mtlemu_switch
  .hidden mtlemu_switch
  .type mtlemu_switch,@function
mtlemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mtlemu_switch, .-mtlemu_switch
)");
void switch_context(Context& from, Context& to) { mtlemu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ----------------------------------------------------------------------------- guarded memory
struct Mapping {
  char* base;      // start of the whole mapping (guard, data pages, guard)
  size_t size;     // bytes of the whole mapping
  char* pages;     // first accessible page
  char* data;      // first byte handed out (data + nbytes == end of the accessible pages)
  size_t nbytes;
  std::string what;
};

std::map<char*, Mapping>& mappings() {
  static std::map<char*, Mapping> m;
  return m;
}

Mapping map_guarded(size_t nbytes, size_t align, const std::string& what) {
  size_t ps = page_size();
  size_t pages = round_up(nbytes == 0 ? 1 : nbytes, ps);
  size_t total = kGuard + pages + kGuard;
  void* base = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) abort();
  char* p = static_cast<char*>(base) + kGuard;
  if (mprotect(p, pages, PROT_READ | PROT_WRITE) != 0) abort();
  char* data = p + pages - nbytes;
  data -= reinterpret_cast<uintptr_t>(data) % align;
  memset(p, kSlackByte, size_t(data - p));
  return Mapping{static_cast<char*>(base), total, p, data, nbytes, what};
}

std::string describe_address(uintptr_t addr);

// ----------------------------------------------------------------------------- launch state
enum FiberState { READY, RUNNING, WAIT_SIMD, WAIT_BARRIER, DONE };

struct Fiber {
  Context ctx;
  mtlemu_attrs attrs;
  int state = READY;
  int kind = 0;
  int line = 0;
  int sg = 0;
  int lane = 0;
  char* stack = nullptr;  // lowest usable byte; a PROT_NONE page lies below it
};

struct Group {
  int width = 0;
  int arrived = 0;
  uint64_t values[32];
  uint64_t snapshot[32];
  int kinds[32];
  int lines[32];
};

struct Region {
  int line;
  std::string name;
  Mapping map;
};

typedef void (*Entry)(void**, const mtlemu_attrs*);

struct Launch {
  Entry entry = nullptr;
  void** bufs = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Group> groups;
  std::vector<uint64_t> ready;  // bitset over fibers
  std::vector<Region> regions;  // threadgroup arrays
  size_t tg_bytes = 0;
  int nthreads = 0;
  int current = -1;
  int barrier_arrived = 0;
  int schedule = 0;  // 0: lowest index first, 1: highest first, 2: seeded random
  uint64_t rng = 0;
  Context scheduler;
  bool failed = false;
  std::string error;
  pthread_t thread;
  sigjmp_buf abort_env;
  uint3 tg_pos;
  double timeout = 0;       // seconds of CPU time before the watchdog fails the launch
  volatile int ticks = 0;
};

Launch* g_launch = nullptr;

std::vector<char*>& stack_pool() {
  static std::vector<char*> pool;
  return pool;
}

char* get_stack(size_t i) {
  auto& pool = stack_pool();
  while (pool.size() <= i) {
    size_t ps = page_size();
    void* m = mmap(nullptr, kStackSize + ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (m == MAP_FAILED) abort();
    mprotect(m, ps, PROT_NONE);  // overflow faults instead of corrupting a neighbour
    pool.push_back(static_cast<char*>(m) + ps);
  }
  return pool[i];
}

const char* op_name(int kind) {
  switch (kind) {
    case mtlemu::OP_SUM: return "simd_sum";
    case mtlemu::OP_MAX: return "simd_max";
    case mtlemu::OP_MIN: return "simd_min";
    case mtlemu::OP_SHUFFLE: return "simd_shuffle";
    case mtlemu::OP_SHUFFLE_XOR: return "simd_shuffle_xor";
    case mtlemu::OP_SHUFFLE_DOWN: return "simd_shuffle_down";
    case mtlemu::OP_SHUFFLE_UP: return "simd_shuffle_up";
    case mtlemu::OP_BROADCAST: return "simd_broadcast";
    case mtlemu::OP_PREFIX_EXCLUSIVE_SUM: return "simd_prefix_exclusive_sum";
    case mtlemu::OP_PREFIX_INCLUSIVE_SUM: return "simd_prefix_inclusive_sum";
    case mtlemu::OP_ALL: return "simd_all";
    case mtlemu::OP_ANY: return "simd_any";
    case mtlemu::OP_SIMDGROUP_BARRIER: return "simdgroup_barrier";
    case mtlemu::OP_THREADGROUP_BARRIER: return "threadgroup_barrier";
  }
  return "?";
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

std::string where(const Launch& L) {
  return fmt("threadgroup (%u, %u, %u)", L.tg_pos.x, L.tg_pos.y, L.tg_pos.z);
}

// "lanes 0-15 at simd_sum (line 40); lanes 16-31 at simd_shuffle_xor (line 52)"
std::string summarize(const std::vector<int>& ids, const std::vector<std::string>& labels,
                      const char* unit) {
  std::vector<std::string> order;
  std::map<std::string, std::vector<int>> by;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!by.count(labels[i])) order.push_back(labels[i]);
    by[labels[i]].push_back(ids[i]);
  }
  std::string out;
  for (auto& label : order) {
    auto& v = by[label];
    std::string list;
    size_t i = 0;
    while (i < v.size()) {
      size_t j = i;
      while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
      if (!list.empty()) list += ",";
      list += j > i ? fmt("%d-%d", v[i], v[j]) : fmt("%d", v[i]);
      i = j + 1;
    }
    if (!out.empty()) out += "; ";
    out += fmt("%s %s %s", unit, list.c_str(), label.c_str());
  }
  return out;
}

std::string state_label(const Fiber& f) {
  switch (f.state) {
    case WAIT_SIMD: return fmt("wait at %s (line %d)", op_name(f.kind), f.line);
    case WAIT_BARRIER: return fmt("wait at threadgroup_barrier (line %d)", f.line);
    case DONE: return "returned";
    default: return "running";
  }
}

void set_ready(Launch& L, int i) {
  L.fibers[i].state = READY;
  L.ready[i / 64] |= uint64_t(1) << (i % 64);
}

int pick(Launch& L) {
  int words = int(L.ready.size());
  if (L.schedule == 1) {
    for (int w = words - 1; w >= 0; --w) {
      if (L.ready[w]) return w * 64 + 63 - __builtin_clzll(L.ready[w]);
    }
    return -1;
  }
  int start = 0;
  if (L.schedule == 2) {
    L.rng ^= L.rng << 13;
    L.rng ^= L.rng >> 7;
    L.rng ^= L.rng << 17;
    start = int(L.rng % uint64_t(L.nthreads));
  }
  for (int k = 0; k <= words; ++k) {
    int w = (start / 64 + k) % words;
    uint64_t bits = L.ready[w];
    if (k == 0) bits &= ~uint64_t(0) << (start % 64);
    if (bits) return w * 64 + __builtin_ctzll(bits);
  }
  return -1;
}

[[noreturn]] void yield_forever(Launch& L) {
  Fiber& f = L.fibers[L.current];
  switch_context(f.ctx, L.scheduler);
  abort();  // a failed or finished fiber is never resumed
}

void yield(Launch& L) {
  Fiber& f = L.fibers[L.current];
  switch_context(f.ctx, L.scheduler);
}

void fail(Launch& L, const std::string& msg) {
  if (!L.failed) {
    L.failed = true;
    L.error = msg;
  }
}

void fiber_main() {
  Launch& L = *g_launch;
  Fiber& f = L.fibers[L.current];
  L.entry(L.bufs, &f.attrs);
  f.state = DONE;
  yield_forever(L);
}

void complete_simd(Launch& L, Group& g, int first) {
  bool same = true;
  for (int i = 1; i < g.width; ++i) {
    same = same && g.kinds[i] == g.kinds[0] && g.lines[i] == g.lines[0];
  }
  if (!same) {
    std::vector<int> ids;
    std::vector<std::string> labels;
    for (int i = 0; i < g.width; ++i) {
      ids.push_back(i);
      labels.push_back(fmt("at %s (line %d)", op_name(g.kinds[i]), g.lines[i]));
    }
    fail(L, fmt("divergent SIMD-group operation in SIMD group %d of %s: %s", L.fibers[first].sg,
                where(L).c_str(), summarize(ids, labels, "lanes").c_str()));
    return;
  }
  memcpy(g.snapshot, g.values, sizeof(uint64_t) * size_t(g.width));
  g.arrived = 0;
  for (int i = 0; i < g.width; ++i) set_ready(L, first + i);
}

void complete_barrier(Launch& L) {
  bool same = true;
  for (auto& f : L.fibers) same = same && f.line == L.fibers[0].line;
  if (!same) {
    std::vector<int> ids;
    std::vector<std::string> labels;
    for (int i = 0; i < L.nthreads; ++i) {
      ids.push_back(i);
      labels.push_back(fmt("at threadgroup_barrier (line %d)", L.fibers[i].line));
    }
    fail(L, fmt("threads of %s reach different barriers: %s", where(L).c_str(),
                summarize(ids, labels, "threads").c_str()));
    return;
  }
  L.barrier_arrived = 0;
  for (int i = 0; i < L.nthreads; ++i) set_ready(L, i);
}

void report_deadlock(Launch& L) {
  std::vector<int> ids;
  std::vector<std::string> labels;
  for (int i = 0; i < L.nthreads; ++i) {
    ids.push_back(i);
    labels.push_back(state_label(L.fibers[i]));
  }
  fail(L, fmt("divergent control flow in %s: not every thread reaches the same SIMD-group "
              "operation or barrier: %s",
              where(L).c_str(), summarize(ids, labels, "threads").c_str()));
}

void start_fiber(Fiber& f) {
#if MTLEMU_ASM_SWITCH
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackSize) & ~uintptr_t(15);
  uint64_t* s = reinterpret_cast<uint64_t*>(top);
  *--s = 0;                                        // fake return address: keeps ABI alignment
  *--s = reinterpret_cast<uint64_t>(&fiber_main);  // where mtlemu_switch's `ret` goes
  for (int i = 0; i < 6; ++i) *--s = 0;            // rbp rbx r12 r13 r14 r15
  *--s = 0x0000037F00001F80ull;                    // MXCSR 0x1F80, x87 control word 0x037F
  f.ctx.sp = s;
#else
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = f.stack;
  f.ctx.uc.uc_stack.ss_size = kStackSize;
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, fiber_main, 0);
#endif
}

uint3 u3(uint x, uint y, uint z) { return uint3{x, y, z}; }

bool run_threadgroup(Launch& L, const int64_t* grid, const uint3& disp, uint3 pos) {
  L.tg_pos = pos;
  uint3 size{uint(std::min<int64_t>(disp.x, grid[0] - int64_t(pos.x) * disp.x)),
             uint(std::min<int64_t>(disp.y, grid[1] - int64_t(pos.y) * disp.y)),
             uint(std::min<int64_t>(disp.z, grid[2] - int64_t(pos.z) * disp.z))};
  int n = int(size.x * size.y * size.z);
  int ngroups = (n + 31) / 32;
  int dispatch_n = int(disp.x * disp.y * disp.z);
  L.nthreads = n;
  L.fibers.assign(size_t(n), Fiber());
  L.groups.assign(size_t(ngroups), Group());
  L.ready.assign(size_t((n + 63) / 64), 0);
  L.barrier_arrived = 0;
  for (auto& r : L.regions) memset(r.map.pages, 0xFF, round_up(r.map.nbytes, page_size()));
  for (int g = 0; g < ngroups; ++g) L.groups[size_t(g)].width = std::min(32, n - 32 * g);
  uint3 tgs{uint((grid[0] + disp.x - 1) / disp.x), uint((grid[1] + disp.y - 1) / disp.y),
            uint((grid[2] + disp.z - 1) / disp.z)};
  for (int i = 0; i < n; ++i) {
    Fiber& f = L.fibers[size_t(i)];
    uint lx = uint(i) % size.x, ly = (uint(i) / size.x) % size.y, lz = uint(i) / (size.x * size.y);
    mtlemu_attrs& a = f.attrs;
    a.dispatch_quadgroups_per_threadgroup = uint((dispatch_n + 3) / 4);
    a.dispatch_simdgroups_per_threadgroup = uint((dispatch_n + 31) / 32);
    a.dispatch_threads_per_threadgroup = disp;
    a.grid_origin = u3(0, 0, 0);
    a.grid_size = u3(uint(grid[0]), uint(grid[1]), uint(grid[2]));
    a.quadgroup_index_in_threadgroup = uint(i / 4);
    a.quadgroups_per_threadgroup = uint((n + 3) / 4);
    a.simdgroup_index_in_threadgroup = uint(i / 32);
    a.simdgroups_per_threadgroup = uint(ngroups);
    a.thread_execution_width = 32;
    a.thread_index_in_quadgroup = uint(i % 4);
    a.thread_index_in_simdgroup = uint(i % 32);
    a.thread_index_in_threadgroup = uint(i);
    a.thread_position_in_grid =
        u3(pos.x * disp.x + lx, pos.y * disp.y + ly, pos.z * disp.z + lz);
    a.thread_position_in_threadgroup = u3(lx, ly, lz);
    a.threadgroup_position_in_grid = pos;
    a.threadgroups_per_grid = tgs;
    a.threads_per_grid = a.grid_size;
    a.threads_per_simdgroup = 32;
    a.threads_per_threadgroup = size;
    f.sg = i / 32;
    f.lane = i % 32;
    f.stack = get_stack(size_t(i));
    start_fiber(f);
    set_ready(L, i);
  }
  int done = 0;
  while (done < n) {
    int i = pick(L);
    if (i < 0) {
      report_deadlock(L);
      return false;
    }
    L.ready[size_t(i / 64)] &= ~(uint64_t(1) << (i % 64));
    L.current = i;
    Fiber& f = L.fibers[size_t(i)];
    f.state = RUNNING;
    switch_context(L.scheduler, f.ctx);
    if (L.failed) return false;
    if (f.state == DONE) ++done;
  }
  return true;
}

constexpr int kSignals = 5;
struct sigaction g_old_actions[kSignals];
const int g_signals[kSignals] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGPROF};
stack_t g_old_altstack;
constexpr double kTick = 0.25;  // seconds of process CPU time between watchdog ticks

void on_signal(int sig, siginfo_t* info, void*) {
  Launch* L = g_launch;
  bool ours = L != nullptr && pthread_equal(pthread_self(), L->thread);
  if (sig == SIGPROF) {
    // The watchdog: a kernel that never reaches its end (an infinite loop) fails the launch.
    if (!ours) return;
    L->ticks = L->ticks + 1;
    if (L->ticks * kTick < L->timeout) return;
    fail(*L, fmt("kernel still running after %.0f s of CPU time (an endless loop?) in thread %d "
                 "of %s",
                 L->timeout, L->current, where(*L).c_str()));
    siglongjmp(L->abort_env, 1);
  }
  if (!ours) {
    for (int i = 0; i < kSignals; ++i) {
      if (g_signals[i] == sig) sigaction(sig, &g_old_actions[i], nullptr);
    }
    return;  // the fault repeats and the previous handler sees it
  }
  std::string what = sig == SIGFPE ? "arithmetic exception (integer division by zero?)"
                                   : describe_address(reinterpret_cast<uintptr_t>(info->si_addr));
  fail(*L, fmt("%s in thread %d of %s", what.c_str(), L->current, where(*L).c_str()));
  siglongjmp(L->abort_env, 1);
}

std::string describe_address(uintptr_t addr) {
  for (auto& kv : mappings()) {
    const Mapping& m = kv.second;
    uintptr_t lo = reinterpret_cast<uintptr_t>(m.base);
    uintptr_t data = reinterpret_cast<uintptr_t>(m.data);
    if (addr >= lo && addr < lo + m.size) {
      long off = long(addr - data);
      if (off >= 0) {
        return fmt("out-of-bounds access to %s: byte %ld past its end (%zu bytes)",
                   m.what.c_str(), off - long(m.nbytes), m.nbytes);
      }
      return fmt("out-of-bounds access to %s: %ld bytes before its start", m.what.c_str(), -off);
    }
  }
  if (g_launch != nullptr) {
    for (auto& r : g_launch->regions) {
      uintptr_t lo = reinterpret_cast<uintptr_t>(r.map.base);
      if (addr >= lo && addr < lo + r.map.size) {
        long off = long(addr - reinterpret_cast<uintptr_t>(r.map.data));
        return fmt("out-of-bounds access to threadgroup array '%s' (line %d): offset %ld of %zu "
                   "bytes",
                   r.name.c_str(), r.line, off, r.map.nbytes);
      }
    }
  }
  for (char* s : stack_pool()) {
    uintptr_t lo = reinterpret_cast<uintptr_t>(s) - page_size();
    if (addr >= lo && addr < lo + page_size()) return "stack overflow in a kernel thread";
  }
  return fmt("invalid memory access at %p", reinterpret_cast<void*>(addr));
}

}  // namespace

extern "C" {

const uint64_t* mtlemu_simd_exchange(int kind, int line, uint64_t bits, int* lane, int* width) {
  Launch& L = *g_launch;
  Fiber& f = L.fibers[size_t(L.current)];
  Group& g = L.groups[size_t(f.sg)];
  g.values[f.lane] = bits;
  g.kinds[f.lane] = kind;
  g.lines[f.lane] = line;
  f.state = WAIT_SIMD;
  f.kind = kind;
  f.line = line;
  if (++g.arrived == g.width) complete_simd(L, g, f.sg * 32);
  yield(L);
  *lane = f.lane;
  *width = g.width;
  return g.snapshot;
}

void mtlemu_barrier(int line) {
  Launch& L = *g_launch;
  Fiber& f = L.fibers[size_t(L.current)];
  f.state = WAIT_BARRIER;
  f.kind = mtlemu::OP_THREADGROUP_BARRIER;
  f.line = line;
  if (++L.barrier_arrived == L.nthreads) complete_barrier(L);
  yield(L);
}

void* mtlemu_tg_alloc(int line, const char* name, size_t nbytes, size_t align) {
  Launch& L = *g_launch;
  for (auto& r : L.regions) {
    if (r.line == line && r.name == name) return r.map.data;
  }
  Region r{line, name, map_guarded(nbytes, align, fmt("threadgroup array '%s'", name))};
  memset(r.map.pages, 0xFF, round_up(nbytes, page_size()));
  L.regions.push_back(r);
  L.tg_bytes += nbytes;
  if (L.tg_bytes > kThreadgroupMemoryLimit) {
    fail(L, fmt("threadgroup memory %zu bytes exceeds the 32 KiB Metal limit (line %d)",
                L.tg_bytes, line));
    yield_forever(L);
  }
  return L.regions.back().map.data;
}

void mtlemu_fail(const char* what, int line) {
  Launch& L = *g_launch;
  fail(L, fmt("%s (line %d, thread %d of %s)", what, line, L.current, where(L).c_str()));
  yield_forever(L);
}

// A buffer of `nbytes` that ends on a page boundary before unmapped memory; the bytes between the
// page start and the buffer are guard bytes. Returns the buffer's first byte.
void* mtlemu_alloc(size_t nbytes, size_t align, const char* what) {
  Mapping m = map_guarded(nbytes, align, what);
  mappings()[m.data] = m;
  return m.data;
}

// -1 when the guard bytes before the buffer are intact, else how far before the start the first
// overwritten byte is.
long mtlemu_check_guard(void* data) {
  auto it = mappings().find(static_cast<char*>(data));
  if (it == mappings().end()) return -2;
  const Mapping& m = it->second;
  for (char* p = m.pages; p < m.data; ++p) {
    if (static_cast<unsigned char>(*p) != kSlackByte) return long(m.data - p);
  }
  return -1;
}

void mtlemu_free(void* data) {
  auto it = mappings().find(static_cast<char*>(data));
  if (it == mappings().end()) return;
  munmap(it->second.base, it->second.size);
  mappings().erase(it);
}

int mtlemu_uses_ucontext() { return MTLEMU_ASM_SWITCH ? 0 : 1; }

// Runs the whole grid. Returns 0, or 1 with a message in `err`.
int mtlemu_launch(Entry entry, void** bufs, const int64_t* grid, const int64_t* threadgroup,
                  int schedule, uint64_t seed, double timeout, char* err, int errlen) {
  Launch L;
  L.timeout = timeout;
  L.entry = entry;
  L.bufs = bufs;
  L.schedule = schedule;
  L.rng = seed * 0x9E3779B97F4A7C15ull + 1;
  L.thread = pthread_self();
  // MLX clamps the threadgroup to the grid before dispatchThreads.
  uint3 disp{uint(std::min(threadgroup[0], grid[0])), uint(std::min(threadgroup[1], grid[1])),
             uint(std::min(threadgroup[2], grid[2]))};
  int64_t tg_threads = int64_t(disp.x) * disp.y * disp.z;
  if (tg_threads > kMaxThreadsPerThreadgroup || tg_threads <= 0) {
    snprintf(err, size_t(errlen), "threadgroup of %lld threads (Metal allows 1..%d)",
             static_cast<long long>(tg_threads), kMaxThreadsPerThreadgroup);
    return 1;
  }
  static char altstack[64 * 1024];
  stack_t ss;
  ss.ss_sp = altstack;
  ss.ss_size = sizeof altstack;
  ss.ss_flags = 0;
  sigaltstack(&ss, &g_old_altstack);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_signal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  for (int i = 0; i < kSignals; ++i) sigaction(g_signals[i], &sa, &g_old_actions[i]);
  struct itimerval tick, old_tick;
  tick.it_interval.tv_sec = 0;
  tick.it_interval.tv_usec = suseconds_t(kTick * 1e6);
  tick.it_value = tick.it_interval;
  g_launch = &L;
  setitimer(ITIMER_PROF, &tick, &old_tick);
  if (sigsetjmp(L.abort_env, 1) == 0) {
    int64_t nx = (grid[0] + disp.x - 1) / disp.x, ny = (grid[1] + disp.y - 1) / disp.y,
            nz = (grid[2] + disp.z - 1) / disp.z;
    for (int64_t z = 0; z < nz && !L.failed; ++z) {
      for (int64_t y = 0; y < ny && !L.failed; ++y) {
        for (int64_t x = 0; x < nx && !L.failed; ++x) {
          run_threadgroup(L, grid, disp, u3(uint(x), uint(y), uint(z)));
        }
      }
    }
  }
  setitimer(ITIMER_PROF, &old_tick, nullptr);
  g_launch = nullptr;
  for (int i = 0; i < kSignals; ++i) sigaction(g_signals[i], &g_old_actions[i], nullptr);
  sigaltstack(&g_old_altstack, nullptr);
  for (auto& r : L.regions) munmap(r.map.base, r.map.size);
  if (L.failed) {
    snprintf(err, size_t(errlen), "%s", L.error.c_str());
    return 1;
  }
  return 0;
}

}  // extern "C"
