// CPU entry points: position validation, and dispatch to the kernels built for the best
// instruction set this CPU has (kernels.inc, compiled per ISA).
//
// Work is split over the flattened (B*P) slot list. Threads come from the caller (torch's
// get_num_threads()) and run on a pool of plain std::threads (thread_pool.h): no second
// OpenMP runtime beside torch's.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../reft_core.h"
#include "dtype.h"

namespace reft {
namespace base {
void forward_any(const Problem& p, Rows io, Rows saved, void* coef);
void backward_any(const Problem& p, Rows gio, Rows x, bool x_gathered, const void* coef,
                  void* dR, void* dW, void* db, Rows delta);
}  // namespace base
#if defined(REFT_EXT_CPU_AVX2)
namespace avx2 {
void forward_any(const Problem& p, Rows io, Rows saved, void* coef);
void backward_any(const Problem& p, Rows gio, Rows x, bool x_gathered, const void* coef,
                  void* dR, void* dW, void* db, Rows delta);
}  // namespace avx2
namespace avx512 {
void forward_any(const Problem& p, Rows io, Rows saved, void* coef);
void backward_any(const Problem& p, Rows gio, Rows x, bool x_gathered, const void* coef,
                  void* dR, void* dW, void* db, Rows delta);
}  // namespace avx512
#endif

namespace {

// The widest ISA this CPU supports, capped by REFT_EXT_CPU_ISA=baseline|avx2|avx512 (so
// that tests and benchmarks can run every variant on one machine).
enum Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
  int isa = kBaseline;
#if defined(REFT_EXT_CPU_AVX2)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    isa = kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      isa = kAvx512;
  }
#endif
  if (const char* cap = std::getenv("REFT_EXT_CPU_ISA")) {
    const int want = std::strcmp(cap, "baseline") == 0 ? kBaseline
                     : std::strcmp(cap, "avx2") == 0   ? kAvx2
                                                       : kAvx512;
    isa = std::min(isa, want);
  }
  return Isa(isa);
}

Isa cpu_isa_level() {
  static const Isa isa = detect_isa();
  return isa;
}

bool use_avx512() { return cpu_isa_level() == kAvx512; }
bool use_avx2() { return cpu_isa_level() == kAvx2; }

}  // namespace

const char* cpu_isa() {
  return use_avx512() ? "avx512" : use_avx2() ? "avx2+fma" : "baseline";
}

bool check_positions_cpu(const Problem& p, char* msg, int64_t msg_size) {
  if (p.index.data)
    for (int64_t i = 0; i < p.B; ++i)
      for (int64_t j = 0; j < p.P; ++j) {
        const int64_t e = position_at(p.index, i, j);
        if (e < -1 || e >= p.N) {
          std::snprintf(msg, msg_size,
                        "index[%lld, %lld] = %lld is out of range: expected -1 (empty slot) "
                        "or a bank entry in [0, N=%lld)",
                        (long long)i, (long long)j, (long long)e, (long long)p.N);
          return false;
        }
      }
  std::vector<int64_t> seen_at;  // last row that used each token index, for large P
  if (p.P > 32) seen_at.assign(p.T, -1);
  for (int64_t i = 0; i < p.B; ++i) {
    for (int64_t j = 0; j < p.P; ++j) {
      const int64_t t = position_at(p.pos, i, j);
      if (t == -1) continue;
      if (t < -1 || t >= p.T) {
        std::snprintf(msg, msg_size,
                      "positions[%lld, %lld] = %lld is out of range: expected -1 (empty slot) "
                      "or a token index in [0, %lld)",
                      (long long)i, (long long)j, (long long)t, (long long)p.T);
        return false;
      }
      bool repeated = false;
      int64_t first = -1;
      if (p.P > 32) {
        repeated = seen_at[t] == i;
        seen_at[t] = i;
        if (repeated)
          for (int64_t k = 0; k < j; ++k)
            if (position_at(p.pos, i, k) == t) { first = k; break; }
      } else {
        for (int64_t k = 0; k < j; ++k)
          if (position_at(p.pos, i, k) == t) { repeated = true; first = k; break; }
      }
      if (repeated) {
        std::snprintf(msg, msg_size,
                      "positions[%lld] repeats token index %lld (slots %lld and %lld): each "
                      "index may appear at most once per row; deduplicate or use -1",
                      (long long)i, (long long)t, (long long)first, (long long)j);
        return false;
      }
    }
  }
  return true;
}

void loreft_forward_cpu(const Problem& p, Rows io, Rows saved, void* coef) {
#if defined(REFT_EXT_CPU_AVX2)
  if (use_avx512()) return avx512::forward_any(p, io, saved, coef);
  if (use_avx2()) return avx2::forward_any(p, io, saved, coef);
#endif
  base::forward_any(p, io, saved, coef);
}

void loreft_backward_cpu(const Problem& p, Rows gio, Rows x, bool x_gathered,
                         const void* coef, void* dR, void* dW, void* db, Rows delta) {
#if defined(REFT_EXT_CPU_AVX2)
  if (use_avx512())
    return avx512::backward_any(p, gio, x, x_gathered, coef, dR, dW, db, delta);
  if (use_avx2()) return avx2::backward_any(p, gio, x, x_gathered, coef, dR, dW, db, delta);
#endif
  base::backward_any(p, gio, x, x_gathered, coef, dR, dW, db, delta);
}

}  // namespace reft
