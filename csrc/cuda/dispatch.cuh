// Element types of the CUDA core and its one dtype-dispatch macro (the CUDA twin of
// csrc/cpu/dtype.h).
//
// Example:
//   REFT_CUDA_DISPATCH_FLOAT(p.h_dtype, scalar_t, [&] { launch<scalar_t>(p); });
// expands to a switch calling the lambda with scalar_t = float, __half, __nv_bfloat16 or
// double, and throws std::invalid_argument (a ValueError in Python) on any other code.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "../reft_core.h"

namespace reft {
namespace cuda {

// Accumulation type: float, except double for double h (the CPU core's rule).
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

template <typename A> __device__ __forceinline__ A to_acc(float v) { return A(v); }
template <typename A> __device__ __forceinline__ A to_acc(double v) { return A(v); }
template <typename A> __device__ __forceinline__ A to_acc(__half v) { return A(__half2float(v)); }
template <typename A> __device__ __forceinline__ A to_acc(__nv_bfloat16 v) {
  return A(__bfloat162float(v));
}

// Rounds an accumulator to the storage type once (round to nearest even, like the CPU
// core's from_float): a double accumulator of double h is stored as is.
template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T> __device__ __forceinline__ T from_acc(double v) {
  static_assert(std::is_same<T, double>::value, "double accumulators only for double h");
  return v;
}

}  // namespace cuda
}  // namespace reft

#define REFT_CUDA_DISPATCH_FLOAT(CODE, NAME, ...)                                          \
  [&] {                                                                                    \
    switch (CODE) {                                                                        \
      case ::reft::kFloat32: { using NAME = float; return __VA_ARGS__(); }                 \
      case ::reft::kFloat16: { using NAME = __half; return __VA_ARGS__(); }                \
      case ::reft::kBFloat16: { using NAME = __nv_bfloat16; return __VA_ARGS__(); }        \
      case ::reft::kFloat64: { using NAME = double; return __VA_ARGS__(); }                \
      default:                                                                             \
        throw std::invalid_argument("reft_ext: unsupported dtype code " +                  \
                                    std::to_string(CODE));                                 \
    }                                                                                      \
  }()
