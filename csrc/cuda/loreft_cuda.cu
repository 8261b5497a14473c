// CUDA entry points of reft_core.h: dtype dispatch to the per-dtype instantiations,
// the positions check and build/runtime information.
#include <cuda_runtime.h>

#include <cstdio>
#include <stdexcept>
#include <string>

#include "../reft_core.h"
#include "dispatch.cuh"
#include "loreft_kernels.cuh"

#ifndef REFT_EXT_CUDA_ARCHS
#define REFT_EXT_CUDA_ARCHS ""
#endif

namespace reft {
namespace cuda {

// Compiled in loreft_<dtype>.cu.
#define REFT_EXTERN_LAUNCHERS(T)                                                              \
  extern template void forward_launch<T>(const Problem&, Rows, Rows, const int32_t*);         \
  extern template void backward_launch<T>(const Problem&, Rows, Rows, Rows, bool, void*,      \
                                          void*, void*, void*, int64_t);
REFT_EXTERN_LAUNCHERS(float)
REFT_EXTERN_LAUNCHERS(__half)
REFT_EXTERN_LAUNCHERS(__nv_bfloat16)
REFT_EXTERN_LAUNCHERS(double)
#undef REFT_EXTERN_LAUNCHERS

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("reft_ext: CUDA error after launching ") + what + ": " +
                             cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

namespace {

// One block per batch row i. Status bits: 1 = an entry outside {-1} U [0, T), 2 = a token
// index repeated within a row, 4 = a bank index entry outside {-1} U [0, N). Repeats are
// found with a shared-memory bitmap of the T token indices (one atomicOr per entry), or by
// pairwise comparison when T is too large for it. A repeat counts whatever the slots'
// index (reft_core.h): the index never makes a repeated position valid.
__global__ void __launch_bounds__(256)
check_positions_kernel(Positions pos, Positions index, int64_t P, int64_t T, int64_t N,
                       bool bitmap, int32_t* status) {
  REFT_CUDA_DYNAMIC_SHARED(uint32_t, seen);  // ceil(T / 32) words when bitmap
  const int64_t i = blockIdx.x;
  const int64_t words = (T + 31) / 32;
  if (bitmap) {
    for (int64_t w = threadIdx.x; w < words; w += blockDim.x) seen[w] = 0;
    __syncthreads();
  }
  auto at = [&](int64_t j) -> int64_t {
    const int64_t off = i * pos.stride_b + j * pos.stride_p;
    return pos.is_int64 ? static_cast<const int64_t*>(pos.data)[off]
                        : int64_t(static_cast<const int32_t*>(pos.data)[off]);
  };
  int flags = 0;
  for (int64_t j = threadIdx.x; j < P; j += blockDim.x) {
    if (index.data != nullptr) {
      const int64_t e = table_at(index, i, j);
      if (e < -1 || e >= N) flags |= 4;
    }
    const int64_t t = at(j);
    if (t == -1) continue;
    if (t < -1 || t >= T) {
      flags |= 1;
      continue;
    }
    if (bitmap) {
      const uint32_t bit = 1u << (t & 31);
      if (atomicOr(&seen[t >> 5], bit) & bit) flags |= 2;
    } else {
      for (int64_t k = 0; k < j; ++k)
        if (at(k) == t) {
          flags |= 2;
          break;
        }
    }
  }
  if (flags) atomicOr(status, flags);
}

constexpr int64_t kBitmapMaxBytes = 32 * 1024;

}  // namespace
}  // namespace cuda

void check_positions_cuda(const Problem& p, int32_t* status) {
  if (p.B == 0 || p.P == 0) return;
  const int64_t bitmap_bytes = (p.T + 31) / 32 * 4;
  const bool bitmap = bitmap_bytes <= cuda::kBitmapMaxBytes;
  REFT_CUDA_LAUNCH(unsigned(p.B), 256, bitmap ? size_t(bitmap_bytes) : 0,
                   static_cast<cudaStream_t>(p.stream),
                   cuda::check_positions_kernel)(p.pos, p.index, p.P, p.T, p.N, bitmap,
                                                 status);
  cuda::check_launch("positions check kernel");
}

static void check_rank(const Problem& p) {
  if (p.r > kCudaMaxRank)
    throw std::invalid_argument("reft_ext: rank r=" + std::to_string(p.r) +
                                " exceeds the CUDA kernels' limit of " +
                                std::to_string(kCudaMaxRank));
}

void loreft_forward_cuda(const Problem& p, Rows io, Rows saved, const int32_t* skip) {
  check_rank(p);
  REFT_CUDA_DISPATCH_FLOAT(p.h_dtype, scalar_t,
                           [&] { cuda::forward_launch<scalar_t>(p, io, saved, skip); });
}

void loreft_backward_cuda(const Problem& p, Rows g, Rows dx, Rows x, bool x_gathered, void* dR,
                          void* dW, void* db, void* workspace, int64_t workspace_bytes) {
  check_rank(p);
  REFT_CUDA_DISPATCH_FLOAT(p.h_dtype, scalar_t, [&] {
    cuda::backward_launch<scalar_t>(p, g, dx, x, x_gathered, dR, dW, db, workspace,
                                    workspace_bytes);
  });
}

int64_t loreft_backward_cuda_workspace(const Problem& p) {
  return REFT_CUDA_DISPATCH_FLOAT(p.h_dtype, scalar_t,
                                  [&] { return cuda::backward_workspace<scalar_t>(p); });
}

int cuda_runtime_version() { return CUDART_VERSION; }

int cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;  // no driver installed
  return v;
}

const char* cuda_archs() { return REFT_EXT_CUDA_ARCHS; }

int cuda_device_count(int* count, char* msg, int64_t msg_size) {
  *count = 0;
  const cudaError_t e = cudaGetDeviceCount(count);
  if (e != cudaSuccess) {
    std::snprintf(msg, size_t(msg_size), "%s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
    *count = 0;
    cudaGetLastError();  // clear it, so that a later launch check does not report it
    return int(e);
  }
  return 0;
}

}  // namespace reft
