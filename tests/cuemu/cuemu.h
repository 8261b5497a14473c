// CPU emulation of the CUDA features csrc/cuda uses, force-included (g++ -include) before
// the real kernel sources so that they build and run as plain C++ under the sanitizers.
//
// Model: a launch runs its blocks one after another; the threads of a block are real
// std::threads, so ThreadSanitizer sees every unsynchronised access between them. Blocks
// never overlap, which is why `__shared__` can be `static` (one copy, reused by each block)
// and why the emulation cannot see the GPU's weak memory model across blocks.
//
// Everything that the GPU leaves undefined and that the kernels could get wrong is checked
// and aborts with a message instead of guessing: a __syncthreads that not every thread of the
// block reaches at the same call site (or reaches after a thread of the block exited), a
// warp shuffle with a partial mask or a partial warp, a launch beyond the hardware limits.
// Dynamic shared memory is a heap buffer of exactly the launch's size, filled with 0xFF
// bytes (NaN, -1) per block: AddressSanitizer sees an overflow, the tests see a read of
// memory the block never wrote.
#pragma once

// Before cuda_runtime.h: its host_defines.h keeps these when already defined, and would
// otherwise make __shared__ expand to nothing (a per-thread local) under a host compiler.
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// Thread and block coordinates, per emulated GPU thread.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace cuemu {

[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

void syncthreads(const char* file, int line);
uint64_t shfl_xor_bits(const char* file, int line, unsigned mask, uint64_t bits, int lane_mask,
                       int width);
unsigned char* dynamic_shared();

template <typename T>
T shfl_xor(const char* file, int line, unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shfl_xor_bits(file, line, mask, bits, lane_mask, width);
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  const char* kernel;  // the launch site's spelling of the kernel, for messages
};

// Runs body(thread) for every thread of every block (see cuemu.cpp); body is called on
// the emulated GPU thread. Returns without running anything, and records the CUDA error
// for cudaGetLastError, when the configuration would not launch on a GPU.
void run(const LaunchConfig& config, void (*body)(const void* ctx), const void* ctx);

template <typename... P>
struct Launcher {
  LaunchConfig config;
  void (*kernel)(P...);

  template <typename... A>
  void operator()(A&&... args) const {
    // Converted once, as the CUDA runtime copies the arguments at the launch; each thread
    // then calls the kernel with its own copy (by value, as on the GPU).
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    run(config,
        [](const void* p) {
          const Ctx& c = *static_cast<const Ctx*>(p);
          std::tuple<std::decay_t<P>...> mine = c.params;
          std::apply(c.kernel, mine);
        },
        &ctx);
  }
};

template <typename... P>
Launcher<P...> launcher(dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                        const char* name, void (*kernel)(P...)) {
  return Launcher<P...>{LaunchConfig{grid, block, smem, stream, name}, kernel};
}

// The block order of the following launches: in order, reversed, or shuffled with a seed.
// The kernels' results must not depend on it (no block may rely on another having run).
enum class BlockOrder { kForward = 0, kReverse = 1, kShuffled = 2 };
void set_block_order(BlockOrder order, uint64_t seed);

struct Stats {
  int64_t launches, blocks, threads;
};
Stats stats();

}  // namespace cuemu

// The project's launch and dynamic-shared-memory macros (see csrc/cuda/loreft_kernels.cuh).
#define REFT_CUDA_LAUNCH(grid, block, smem, stream, ...) \
  ::cuemu::launcher(grid, block, smem, stream, #__VA_ARGS__, __VA_ARGS__)
#define REFT_CUDA_DYNAMIC_SHARED(type, name) \
  type* const name = reinterpret_cast<type*>(::cuemu::dynamic_shared())

#define __syncthreads() ::cuemu::syncthreads(__FILE__, __LINE__)
#define __shfl_xor_sync(...) ::cuemu::shfl_xor(__FILE__, __LINE__, __VA_ARGS__)

// Device atomics: sequentially consistent builtins (stronger than the GPU's relaxed
// atomics, so a missing fence cannot show up here).
template <typename T>
T atomicAdd(T* p, T v) {
  static_assert(std::is_integral<T>::value, "integer atomics only");
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
template <typename T>
T atomicOr(T* p, T v) {
  static_assert(std::is_integral<T>::value, "integer atomics only");
  return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
// Cache-global load: only a cache hint on the GPU.
template <typename T>
T __ldcg(const T* p) { return *p; }
