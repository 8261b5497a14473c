// CUDA kernels of the fused LoReFT edit, as templates; loreft_<dtype>.cu instantiate them
// one dtype per file (so a -jN build compiles the dtypes in parallel) and loreft_cuda.cu
// holds the entry points of reft_core.h.
//
// Per selected row x (d) with M = W - R (r, d):  z = x M^T + b,  y = x + z R.
// Backward with g = dL/dy:  gz = g R^T,  dx = g + gz M,  dW = sum gz^T x,  db = sum gz,
// dR = sum z^T g - dW.
//
// Work split. A block of NT threads (NT a multiple of 32, at most 256, a function of d
// only) owns whole rows: thread `tid` owns the columns (it * NT + tid) * VEC + e, for
// it = 0, 1, ... and e < VEC, where VEC = 16 bytes / sizeof(h element). That ownership,
// and so every summation order, depends on d alone: the vectorised path (16-byte loads,
// rows cached in registers) and the scalar path (any alignment, any d, rows re-read from
// L1/L2 in the second pass) give bitwise identical results, whatever the alignment of h,
// the number of rows per block or the rank chunking.
//
// Dot products over d are summed per thread, then across the warp by a butterfly with
// xor offsets 16, 8, 4, 2, 1 (also for the transposed multi-row form below), then across
// warps in warp order: a fixed order, no atomics.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "dispatch.cuh"

// Kernel launches and dynamic shared memory are spelt through these two macros so that
// tests/cuemu can build this very source for its CPU emulation (its force-included header
// defines them first); nothing else in the kernels differs between the two builds.
#ifndef REFT_CUDA_LAUNCH
#define REFT_CUDA_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define REFT_CUDA_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace reft {
namespace cuda {

constexpr int kMaxThreads = 256;
// Row kernels: at least two 256-thread blocks per SM (<= 128 registers per thread), so one
// block's loads overlap the other's reductions and syncs.
constexpr int kMinBlocks = 2;
constexpr int kMaxWarps = kMaxThreads / 32;
// Ranks reduced per shared-memory round; r <= kQChunk takes the register-cached fast path.
constexpr int kQChunk = 64;
// Parameter-gradient kernel: ranks per block and the fixed number of rows' worth of
// parallelism it aims for (a shape-only rule, so the reduction order never depends on
// the GPU).
constexpr int kParamQ = 8;
constexpr int64_t kParamColsPerTile = 128;
constexpr int64_t kParamTargetBlocks = 2048;

// Throws std::runtime_error with the CUDA error string when the last launch failed.
void check_launch(const char* what);

// Everything a kernel needs besides the row tensors; trivially copyable (kernel argument).
struct KernelArgs {
  int64_t B, T, P, d, r, n;  // n = B * P slots
  int64_t N;                 // bank entries (1 without an index)
  Positions pos;             // (B, P)
  Positions index;           // (B, P) bank index; data == nullptr: none
  const void* R;             // (r, d); with a bank, entry 0 of (N, r, d)
  const void* W;             // (r, d); with a bank, entry 0 of (N, r, d)
  const void* b;             // (r,); with a bank, entry 0 of (N, r)
  bool R_f32, W_f32, b_f32;  // else h's dtype
  int iters;                 // column iterations per thread: ceil(d / (NT * VEC))
};

template <typename S, int N>
struct alignas(sizeof(S) * N) Vec {
  S v[N];
};

template <typename T>
constexpr int vec_of() { return int(16 / sizeof(T)); }

// Makes the compiler forget the value of a cached 16-byte row piece. Used once per rank in
// the z pass: otherwise nvcc hoists the element conversions out of the rank loop and
// holds every cached element as a float (twice the registers for 16-bit h), which spills.
template <typename T, int VEC>
__device__ __forceinline__ void launder(Vec<T, VEC>& v) {
  static_assert(sizeof(Vec<T, VEC>) == 16, "16-byte pieces only");
  uint4 u;
  memcpy(&u, &v, 16);
  asm volatile("" : "+r"(u.x), "+r"(u.y), "+r"(u.z), "+r"(u.w));
  memcpy(&v, &u, 16);
}

__device__ __forceinline__ int64_t table_at(const Positions& p, int64_t i, int64_t j) {
  const int64_t off = i * p.stride_b + j * p.stride_p;
  return p.is_int64 ? static_cast<const int64_t*>(p.data)[off]
                    : int64_t(static_cast<const int32_t*>(p.data)[off]);
}

// Token index of slot s = i * P + j, or -1 for an empty slot; `entry` receives the slot's
// bank entry (0 without an index). A slot is empty when its position or its index is -1.
// Out-of-range positions and index values also give -1: both are validated before any
// launch, but under CUDA graph capture that host check cannot run, and a kernel must then
// still never touch memory outside h or the parameters.
__device__ __forceinline__ int64_t slot_token(const KernelArgs& a, int64_t s, int64_t& i,
                                              int64_t& j, int64_t& entry) {
  i = s / a.P;
  j = s - i * a.P;
  const int64_t t = table_at(a.pos, i, j);
  entry = 0;
  if (a.index.data != nullptr) {
    entry = table_at(a.index, i, j);
    if (entry < 0 || entry >= a.N) return -1;
  }
  return (t >= 0 && t < a.T) ? t : -1;
}

// Points a's parameters at bank entry e (a kernel's own copy of its arguments). Only the
// one-row general kernels (ROWS == 1, ITERS == 0) take a bank with N > 1: a block then
// holds one slot, so one entry, and the other variants keep their registers.
template <typename T>
__device__ __forceinline__ void select_entry(KernelArgs& a, int64_t e) {
  const int64_t rd = e * a.r * a.d;
  a.R = a.R_f32 ? static_cast<const void*>(static_cast<const float*>(a.R) + rd)
                : static_cast<const void*>(static_cast<const T*>(a.R) + rd);
  a.W = a.W_f32 ? static_cast<const void*>(static_cast<const float*>(a.W) + rd)
                : static_cast<const void*>(static_cast<const T*>(a.W) + rd);
  a.b = a.b_f32 ? static_cast<const void*>(static_cast<const float*>(a.b) + e * a.r)
                : static_cast<const void*>(static_cast<const T*>(a.b) + e * a.r);
}

// N consecutive elements of S at p, converted to A. p is aligned to min(16, N*sizeof(S)).
template <typename S, int N, typename A>
__device__ __forceinline__ void load_acc(const S* p, A (&out)[N]) {
  constexpr int kPer = (16 / int(sizeof(S))) < N ? 16 / int(sizeof(S)) : N;
  static_assert(N % kPer == 0, "vector width must divide N");
#pragma unroll
  for (int c = 0; c < N / kPer; ++c) {
    const Vec<S, kPer> v = reinterpret_cast<const Vec<S, kPer>*>(p)[c];
#pragma unroll
    for (int e = 0; e < kPer; ++e) out[c * kPer + e] = to_acc<A>(v.v[e]);
  }
}

// Parameter elements [off, off + N): float32 or h's dtype T, read as A.
template <typename T, int N, typename A>
__device__ __forceinline__ void load_param(const void* p, bool f32, int64_t off, A (&out)[N]) {
  if (f32) load_acc<float, N>(static_cast<const float*>(p) + off, out);
  else load_acc<T, N>(static_cast<const T*>(p) + off, out);
}

// As load_param, one element at a time and only those below `limit` (others read as 0).
template <typename T, int N, typename A>
__device__ __forceinline__ void load_param_tail(const void* p, bool f32, int64_t off,
                                                int64_t valid, A (&out)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) {
    out[e] = A(0);
    if (e < valid)
      out[e] = f32 ? A(static_cast<const float*>(p)[off + e])
                   : to_acc<A>(static_cast<const T*>(p)[off + e]);
  }
}

template <typename T, typename A>
__device__ __forceinline__ A load_param1(const void* p, bool f32, int64_t off) {
  return f32 ? A(static_cast<const float*>(p)[off]) : to_acc<A>(static_cast<const T*>(p)[off]);
}

// Warp sums of N values per lane at once (N a power of two <= 32): each butterfly step
// hands half of the values to the partner lane, so N values cost N - 1 + log2(32 / N)
// shuffles instead of 5 N. Returns, on every lane, the warp sum of v[lane / (32 / N)].
// The pairs combined at each step are those of a plain xor butterfly (offsets 16, 8, 4,
// 2, 1), so each sum is bitwise the same as reducing that value alone.
template <int N, typename A>
__device__ __forceinline__ A warp_sum_transposed(A (&v)[N], int lane) {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "N must be a power of two <= 32");
#pragma unroll
  for (int n = N, off = 16; n > 1; n >>= 1, off >>= 1) {
    const bool upper = lane & off;
#pragma unroll
    for (int i = 0; i < n / 2; ++i) {
      const A send = upper ? v[i] : v[i + n / 2];
      const A keep = upper ? v[i + n / 2] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
  }
  A s = v[0];
#pragma unroll
  for (int off = 16 / N; off >= 1; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

// Row x of element type T for one thread's VEC columns starting at k: vector load when the
// row is aligned and complete there, else element by element (missing elements are 0).
template <typename T, int VEC, bool ALIGNED>
__device__ __forceinline__ Vec<T, VEC> load_row(const T* row, int64_t k, int64_t d) {
  Vec<T, VEC> v;
  if (ALIGNED) {
    v = *reinterpret_cast<const Vec<T, VEC>*>(row + k);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) v.v[e] = (k + e < d) ? row[k + e] : from_acc<T>(acc_t<T>(0));
  }
  return v;
}

template <typename T, int VEC, bool ALIGNED>
__device__ __forceinline__ void store_row(T* row, int64_t k, int64_t d, const Vec<T, VEC>& v) {
  if (ALIGNED) {
    *reinterpret_cast<Vec<T, VEC>*>(row + k) = v;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      if (k + e < d) row[k + e] = v.v[e];
  }
}

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> zero_vec() {
  Vec<T, VEC> v;
#pragma unroll
  for (int e = 0; e < VEC; ++e) v.v[e] = from_acc<T>(acc_t<T>(0));
  return v;
}

// M = W - R and R at one thread's VEC columns of rank q (tail-safe when !ALIGNED).
template <typename T, int VEC, bool ALIGNED, typename A>
__device__ __forceinline__ void load_m_r(const KernelArgs& a, int64_t q, int64_t k,
                                         A (&m)[VEC], A (&rr)[VEC]) {
  A w[VEC];
  const int64_t off = q * a.d + k;
  if (ALIGNED) {
    load_param<T, VEC>(a.W, a.W_f32, off, w);
    load_param<T, VEC>(a.R, a.R_f32, off, rr);
  } else {
    load_param_tail<T, VEC>(a.W, a.W_f32, off, a.d - k, w);
    load_param_tail<T, VEC>(a.R, a.R_f32, off, a.d - k, rr);
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) m[e] = w[e] - rr[e];
}

template <typename T, int VEC, bool ALIGNED, typename A>
__device__ __forceinline__ void load_r(const KernelArgs& a, int64_t q, int64_t k, A (&rr)[VEC]) {
  if (ALIGNED) load_param<T, VEC>(a.R, a.R_f32, q * a.d + k, rr);
  else load_param_tail<T, VEC>(a.R, a.R_f32, q * a.d + k, a.d - k, rr);
}

// ---------------------------------------------------------------------------------------
// The two passes both row kernels are made of. ITERS > 0: the rows are cached in registers
// (cache[row][it], the thread's columns k = (it * nt + tid) * VEC, requires ALIGNED);
// ITERS == 0: they are re-read through the row pointers on each use (any alignment, any
// d). Both walk the same columns in the same order, so both give the same bits.

template <int ITERS>
using cache_iters = std::integral_constant<int, (ITERS > 0 ? ITERS : 1)>;

// Calls f(k, it) for this thread's column groups k < d in increasing order. With ITERS > 0
// the loop is unrolled to ITERS steps, so that it (the cache index) is a constant.
template <int ITERS, int VEC, typename F>
__device__ __forceinline__ void for_columns(int64_t d, int nt, int tid, F&& f) {
  if (ITERS > 0) {
#pragma unroll
    for (int it = 0; it < cache_iters<ITERS>::value; ++it) {
      const int64_t k = (int64_t(it) * nt + tid) * VEC;
      if (k < d) f(k, it);
    }
  } else {
    for (int64_t k = int64_t(tid) * VEC; k < d; k += int64_t(nt) * VEC) f(k, 0);
  }
}

// Dot pass for rank q: part[row] += x_row . M_q over this thread's columns and, WITH_G,
// part[ROWS + row] += g_row . R_q. Rows whose x pointer is null are empty slots (cached as
// zeros, skipped when re-read).
template <typename T, int VEC, int ROWS, int ITERS, bool ALIGNED, bool WITH_G, typename A,
          int NPART>
__device__ __forceinline__ void dot_pass(const KernelArgs& a, int64_t q, int nt, int tid,
                                         Vec<T, VEC> (&xv)[ROWS][cache_iters<ITERS>::value],
                                         Vec<T, VEC> (&gv)[ROWS][cache_iters<ITERS>::value],
                                         const T* const* xr, const T* const* gr,
                                         A (&part)[NPART]) {
  static_assert(NPART == (WITH_G ? 2 : 1) * ROWS, "one partial per row (and per g row)");
  for_columns<ITERS, VEC>(a.d, nt, tid, [&](int64_t k, int it) {
    A m[VEC], rr[VEC];
    load_m_r<T, VEC, ALIGNED>(a, q, k, m, rr);
#pragma unroll
    for (int row = 0; row < ROWS; ++row) {
      Vec<T, VEC> x, gg;
      if (ITERS > 0) {
        launder(xv[row][it]);
        x = xv[row][it];
        if (WITH_G) {
          launder(gv[row][it]);
          gg = gv[row][it];
        }
      } else {
        if (xr[row] == nullptr) continue;
        x = load_row<T, VEC, ALIGNED>(xr[row], k, a.d);
        if (WITH_G) gg = load_row<T, VEC, ALIGNED>(gr[row], k, a.d);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        part[row] += to_acc<A>(x.v[e]) * m[e];
        if (WITH_G) part[ROWS + row] += to_acc<A>(gg.v[e]) * rr[e];
      }
    }
  });
}

// Combine pass: out_row = base_row + sum_q coef[q * ROWS + row] * P_q over this thread's
// columns, accumulated rank by rank like the CPU kernel, with P = M (USE_M: the backward's
// dx = g + gz M) or R (the forward's y = x + z R). Rows whose out pointer is null are not
// stored (and, re-read, not computed). base and out may be the same row (the forward's
// in-place edit): each thread reads its columns before it writes them.
template <typename T, int VEC, int ROWS, int ITERS, bool ALIGNED, bool USE_M, typename A>
__device__ __forceinline__ void combine_pass(const KernelArgs& a, int nt, int tid,
                                             Vec<T, VEC> (&cache)[ROWS][cache_iters<ITERS>::value],
                                             const T* const* base, T* const* out,
                                             const A* coef) {
  for_columns<ITERS, VEC>(a.d, nt, tid, [&](int64_t k, int it) {
    if (ITERS == 0) {
      bool any = false;
#pragma unroll
      for (int row = 0; row < ROWS; ++row) any = any || out[row] != nullptr;
      if (!any) return;
    }
    A acc[ROWS][VEC];
#pragma unroll
    for (int row = 0; row < ROWS; ++row) {
      const Vec<T, VEC> b = ITERS > 0 ? cache[row][it]
                            : out[row] != nullptr ? load_row<T, VEC, ALIGNED>(base[row], k, a.d)
                                                  : zero_vec<T, VEC>();
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[row][e] = to_acc<A>(b.v[e]);
    }
#pragma unroll 1
    for (int64_t q = 0; q < a.r; ++q) {
      A p[VEC];
      if (USE_M) {
        A rr[VEC];
        load_m_r<T, VEC, ALIGNED>(a, q, k, p, rr);
      } else {
        load_r<T, VEC, ALIGNED>(a, q, k, p);
      }
#pragma unroll
      for (int row = 0; row < ROWS; ++row) {
        const A c = coef[q * ROWS + row];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[row][e] += c * p[e];
      }
    }
#pragma unroll
    for (int row = 0; row < ROWS; ++row) {
      if (out[row] == nullptr) continue;
      Vec<T, VEC> y;
#pragma unroll
      for (int e = 0; e < VEC; ++e) y.v[e] = from_acc<T>(acc[row][e]);
      store_row<T, VEC, ALIGNED>(out[row], k, a.d, y);
    }
  });
}

// ---------------------------------------------------------------------------------------
// Forward. Block = ROWS slots; ITERS > 0: the rows stay in registers between the z and y
// passes (requires ALIGNED, r <= kQChunk); ITERS == 0: any d and r, the y pass re-reads
// x (the same thread reads x[k] and then writes y[k], so the in-place edit is safe).
//
// skip: when non-null and *skip != 0 (positions found invalid on the device while the
// host could not look, i.e. during CUDA graph capture), nothing is written.
template <typename T, int ROWS, int ITERS, bool ALIGNED>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
forward_kernel(KernelArgs a, Rows io, Rows saved, const int32_t* skip) {
  using A = acc_t<T>;
  constexpr int VEC = vec_of<T>();
  constexpr bool kCached = ITERS > 0;
  static_assert(!kCached || ALIGNED, "the register-cached path needs aligned rows");
  constexpr bool kBank = ROWS == 1 && !kCached;  // may take a bank with N > 1
  __shared__ A red[kMaxWarps][kQChunk][ROWS];
  REFT_CUDA_DYNAMIC_SHARED(unsigned char, dyn_smem);
  A* z_s = reinterpret_cast<A*>(dyn_smem);  // (r, ROWS)
  // Row pointers live in shared memory: ROWS 64-bit pointers per thread would cost
  // registers that the cached rows need.
  __shared__ T* rows[ROWS];
  __shared__ T* saves[ROWS];
  __shared__ int64_t entry_s;  // the block's bank entry (kBank)
  if (skip != nullptr && *skip != 0) return;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nt = blockDim.x, nwarps = nt >> 5;
  const int64_t d = a.d, r = a.r;
  if (tid < ROWS) {
    const int row = tid;
    rows[row] = nullptr;
    saves[row] = nullptr;
    if (kBank) entry_s = 0;
    const int64_t s = int64_t(blockIdx.x) * ROWS + row;
    int64_t i, j, e;
    if (s < a.n) {
      const int64_t t = slot_token(a, s, i, j, e);
      if (t >= 0) {
        rows[row] = static_cast<T*>(io.data) + i * io.stride_b + t * io.stride_t;
        if (kBank) entry_s = e;
      }
      // Every slot of saved is written (zeros for empty slots): it is an op output.
      if (saved.data != nullptr)
        saves[row] = static_cast<T*>(saved.data) + i * saved.stride_b + j * saved.stride_t;
    }
  }
  __syncthreads();
  if (kBank && a.N > 1) select_entry<T>(a, entry_s);

  // Pass 1: read x once (and copy it to `saved`).
  Vec<T, VEC> xv[ROWS][kCached ? ITERS : 1];
  if (kCached) {
#pragma unroll
    for (int it = 0; it < (kCached ? ITERS : 1); ++it) {
      const int64_t k = (int64_t(it) * nt + tid) * VEC;
#pragma unroll
      for (int row = 0; row < ROWS; ++row) {
        xv[row][it] = zero_vec<T, VEC>();
        if (k < d && rows[row] != nullptr) {
          xv[row][it] = load_row<T, VEC, true>(rows[row], k, d);
          if (saves[row] != nullptr) store_row<T, VEC, true>(saves[row], k, d, xv[row][it]);
        } else if (k < d && saves[row] != nullptr) {
          store_row<T, VEC, true>(saves[row], k, d, zero_vec<T, VEC>());
        }
      }
    }
  } else if (saved.data != nullptr) {
    for (int64_t k = int64_t(tid) * VEC; k < d; k += int64_t(nt) * VEC)
#pragma unroll
      for (int row = 0; row < ROWS; ++row)
        if (saves[row] != nullptr)
          store_row<T, VEC, ALIGNED>(saves[row], k, d,
                                     rows[row] != nullptr ? load_row<T, VEC, ALIGNED>(rows[row], k, d)
                                                          : zero_vec<T, VEC>());
  }

  // z = x M^T + b, kQChunk ranks per shared-memory round.
  for (int64_t q0 = 0; q0 < r; q0 += kQChunk) {
    const int qn = int(r - q0 < kQChunk ? r - q0 : kQChunk);
#pragma unroll 1
    for (int qq = 0; qq < qn; ++qq) {
      const int64_t q = q0 + qq;
      A part[ROWS];
#pragma unroll
      for (int row = 0; row < ROWS; ++row) part[row] = A(0);
      dot_pass<T, VEC, ROWS, ITERS, ALIGNED, false>(a, q, nt, tid, xv, xv, rows, rows, part);
      const A sum = warp_sum_transposed<ROWS>(part, lane);
      if ((lane & (32 / ROWS - 1)) == 0) red[warp][qq][lane / (32 / ROWS)] = sum;
    }
    __syncthreads();
    for (int e = tid; e < qn * ROWS; e += nt) {
      const int qq = e / ROWS, row = e % ROWS;
      A s = A(0);
      for (int w = 0; w < nwarps; ++w) s += red[w][qq][row];
      z_s[(q0 + qq) * ROWS + row] = s + load_param1<T, A>(a.b, a.b_f32, q0 + qq);
    }
    __syncthreads();
  }

  // Pass 2: y = x + z R.
  combine_pass<T, VEC, ROWS, ITERS, ALIGNED, false>(a, nt, tid, xv, rows, rows, z_s);
}

// ---------------------------------------------------------------------------------------
// Backward, launch 1 of 2: per row, z = x M^T + b and gz = g R^T (one pass over x and g),
// dx = g + gz M written to dx's row, and (z, gz) stored to zg (n, 2r) for launch 2.
// g and dx are different tensors: launch 2 reads g again.
template <typename T, int ROWS, int ITERS, bool ALIGNED>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
backward_rows_kernel(KernelArgs a, Rows g, Rows dx, Rows x, bool x_gathered, acc_t<T>* zg,
                     int32_t* counters, int n_counters) {
  using A = acc_t<T>;
  constexpr int VEC = vec_of<T>();
  constexpr bool kCached = ITERS > 0;
  constexpr int N2 = 2 * ROWS;
  static_assert(!kCached || ALIGNED, "the register-cached path needs aligned rows");
  constexpr bool kBank = ROWS == 1 && !kCached;  // may take a bank with N > 1
  __shared__ A red[kMaxWarps][kQChunk][N2];
  REFT_CUDA_DYNAMIC_SHARED(unsigned char, dyn_smem);
  A* z_s = reinterpret_cast<A*>(dyn_smem);  // (r, ROWS)
  A* gz_s = z_s + a.r * ROWS;               // (r, ROWS)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nt = blockDim.x, nwarps = nt >> 5;
  const int64_t d = a.d, r = a.r;
  // Launch 2's completion counters start at zero every call (this launch precedes it).
  if (blockIdx.x == 0)
    for (int e = tid; e < n_counters; e += nt) counters[e] = 0;

  // Row pointers in shared memory, as in the forward. xr[row] == nullptr: empty slot.
  __shared__ const T* xr[ROWS];
  __shared__ const T* gr[ROWS];
  __shared__ T* dr[ROWS];
  __shared__ int64_t entry_s;  // the block's bank entry (kBank)
  if (tid < ROWS) {
    const int row = tid;
    xr[row] = nullptr;
    gr[row] = nullptr;
    dr[row] = nullptr;
    if (kBank) entry_s = 0;
    const int64_t s = int64_t(blockIdx.x) * ROWS + row;
    int64_t i, j, e;
    if (s < a.n) {
      const int64_t t = slot_token(a, s, i, j, e);
      if (t >= 0) {
        xr[row] = static_cast<const T*>(x.data) + i * x.stride_b + (x_gathered ? j : t) * x.stride_t;
        gr[row] = static_cast<const T*>(g.data) + i * g.stride_b + t * g.stride_t;
        dr[row] = static_cast<T*>(dx.data) + i * dx.stride_b + t * dx.stride_t;
        if (kBank) entry_s = e;
      }
    }
  }
  __syncthreads();
  if (kBank && a.N > 1) select_entry<T>(a, entry_s);

  Vec<T, VEC> xv[ROWS][kCached ? ITERS : 1];
  Vec<T, VEC> gv[ROWS][kCached ? ITERS : 1];
  if (kCached) {
#pragma unroll
    for (int it = 0; it < (kCached ? ITERS : 1); ++it) {
      const int64_t k = (int64_t(it) * nt + tid) * VEC;
#pragma unroll
      for (int row = 0; row < ROWS; ++row) {
        const bool ok = xr[row] != nullptr && k < d;
        xv[row][it] = ok ? load_row<T, VEC, true>(xr[row], k, d) : zero_vec<T, VEC>();
        gv[row][it] = ok ? load_row<T, VEC, true>(gr[row], k, d) : zero_vec<T, VEC>();
      }
    }
  }

  for (int64_t q0 = 0; q0 < r; q0 += kQChunk) {
    const int qn = int(r - q0 < kQChunk ? r - q0 : kQChunk);
#pragma unroll 1
    for (int qq = 0; qq < qn; ++qq) {
      const int64_t q = q0 + qq;
      A part[N2];  // [0, ROWS): x . M_q, [ROWS, 2 ROWS): g . R_q
#pragma unroll
      for (int c = 0; c < N2; ++c) part[c] = A(0);
      dot_pass<T, VEC, ROWS, ITERS, ALIGNED, true>(a, q, nt, tid, xv, gv, xr, gr, part);
      const A sum = warp_sum_transposed<N2>(part, lane);
      if ((lane & (32 / N2 - 1)) == 0) red[warp][qq][lane / (32 / N2)] = sum;
    }
    __syncthreads();
    for (int e = tid; e < qn * N2; e += nt) {
      const int qq = e / N2, c = e % N2;
      A s = A(0);
      for (int w = 0; w < nwarps; ++w) s += red[w][qq][c];
      const int64_t q = q0 + qq;
      if (c < ROWS) z_s[q * ROWS + c] = s + load_param1<T, A>(a.b, a.b_f32, q);
      else gz_s[q * ROWS + (c - ROWS)] = s;
    }
    __syncthreads();
  }

  for (int row = 0; row < ROWS; ++row) {
    if (xr[row] == nullptr) continue;
    const int64_t s = int64_t(blockIdx.x) * ROWS + row;
    for (int64_t q = tid; q < r; q += nt) {
      zg[s * 2 * r + q] = z_s[q * ROWS + row];
      zg[s * 2 * r + r + q] = gz_s[q * ROWS + row];
    }
  }

  // dx = g + gz M.
  combine_pass<T, VEC, ROWS, ITERS, ALIGNED, true>(a, nt, tid, gv, gr, dr, gz_s);
}

// ---------------------------------------------------------------------------------------
// Backward, launch 2 of 2: parameter gradients. Grid (column tiles of 32 * VEC2 columns,
// rank groups of kParamQ, row chunks). Each warp of a block walks every 8th row of the
// block's chunk and accumulates gz^T x, z^T g and gz for its lanes' columns; the 8 warps
// are summed in a fixed tree in shared memory; the block writes its chunk's partial sums
// to the workspace. The last block to finish a (column tile, rank group) — found with an
// integer counter, the only atomic — sums the chunks' partials in chunk order and writes
// dW, dR = (sum z^T g) - dW and db. The order depends on the shape only.
//
// Bank (N > 1): grid z is N x nchunks, block z = e * nchunks + chunk; each block sums
// only the slots of its chunk that use entry e, into its own partials, and the counters
// and last block are per (entry, tile, rank group), writing entry e's dR, dW, db. The
// slot partition does not depend on the index, so the sums' order depends on the shape
// and the index values only; an entry no slot uses gets exact zeros (sums of +0.0).
// Every block walks its whole chunk (N times the index reads of one entry's work): a
// bank's slots are not sorted by entry.
template <typename T, int VEC2>
__global__ void __launch_bounds__(kMaxThreads)
backward_params_kernel(KernelArgs a, Rows g, Rows x, bool x_gathered, const acc_t<T>* zg,
                       acc_t<T>* partials, int32_t* counters, int64_t nchunks,
                       acc_t<T>* dR, acc_t<T>* dW, acc_t<T>* db) {
  // nchunks: row chunks per bank entry.
  using A = acc_t<T>;
  constexpr int Q = kParamQ;
  constexpr int L = 2 * Q * VEC2 + Q;  // per lane: A part, Z part, db part
  constexpr int kWarps = kMaxThreads / 32;
  __shared__ A buf[kWarps / 2][L][32];
  __shared__ int is_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t d = a.d, r = a.r, n = a.n;
  const int64_t tile_cols = 32 * VEC2;
  const int64_t ct = blockIdx.x, qg = blockIdx.y;
  const int64_t zc = blockIdx.z, nz = a.N * nchunks;  // this block's partial slot, all slots
  const int64_t entry = zc / nchunks, chunk = zc - entry * nchunks;
  const int64_t k = ct * tile_cols + int64_t(lane) * VEC2;
  const int64_t q0 = qg * Q;
  const int qn = int(r - q0 < Q ? r - q0 : Q);
  const int64_t per = (n + nchunks - 1) / nchunks;
  const int64_t s_begin = chunk * per;
  const int64_t s_end = s_begin + per < n ? s_begin + per : n;

  A acc[L];
#pragma unroll
  for (int v = 0; v < L; ++v) acc[v] = A(0);
  for (int64_t s = s_begin + warp; s < s_end; s += kWarps) {
    int64_t i, j, slot_entry;
    const int64_t t = slot_token(a, s, i, j, slot_entry);
    if (t < 0 || slot_entry != entry) continue;
    A xx[VEC2], gg[VEC2];
#pragma unroll
    for (int e = 0; e < VEC2; ++e) xx[e] = gg[e] = A(0);
    if (k < d) {
      const T* xrow = static_cast<const T*>(x.data) + i * x.stride_b + (x_gathered ? j : t) * x.stride_t;
      const T* grow = static_cast<const T*>(g.data) + i * g.stride_b + t * g.stride_t;
      load_acc<T, VEC2>(xrow + k, xx);
      load_acc<T, VEC2>(grow + k, gg);
    }
    const A* zrow = zg + s * 2 * r;
#pragma unroll
    for (int qq = 0; qq < Q; ++qq) {
      if (qq >= qn) break;
      const A zq = zrow[q0 + qq], gq = zrow[r + q0 + qq];
#pragma unroll
      for (int e = 0; e < VEC2; ++e) {
        acc[qq * VEC2 + e] += gq * xx[e];
        acc[Q * VEC2 + qq * VEC2 + e] += zq * gg[e];
      }
      acc[2 * Q * VEC2 + qq] += gq;
    }
  }

  // Fixed tree over the warps: w += w + 4, then w += w + 2, then w += w + 1.
#pragma unroll
  for (int half = kWarps / 2; half >= 1; half >>= 1) {
    if (warp >= half && warp < 2 * half)
#pragma unroll
      for (int v = 0; v < L; ++v) buf[warp - half][v][lane] = acc[v];
    __syncthreads();
    if (warp < half)
#pragma unroll
      for (int v = 0; v < L; ++v) acc[v] += buf[warp][v][lane];
    __syncthreads();
  }

  // Partials: A (N nchunks, r, d), Z (N nchunks, r, d), db (N nchunks, r).
  A* pA = partials + zc * r * d;
  A* pZ = partials + nz * r * d + zc * r * d;
  A* pB = partials + 2 * nz * r * d + zc * r;
  if (warp == 0) {
#pragma unroll
    for (int qq = 0; qq < Q; ++qq) {  // unrolled: acc must be indexed by constants
      if (qq >= qn) break;
      const int64_t q = q0 + qq;
#pragma unroll
      for (int e = 0; e < VEC2; ++e) {
        if (k + e >= d) break;
        pA[q * d + k + e] = acc[qq * VEC2 + e];
        pZ[q * d + k + e] = acc[Q * VEC2 + qq * VEC2 + e];
      }
      if (ct == 0 && lane == 0) pB[q] = acc[2 * Q * VEC2 + qq];
    }
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const int prev = atomicAdd(&counters[(entry * gridDim.y + qg) * gridDim.x + ct], 1);
    is_last = prev == int(nchunks) - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  // Last block of this tile: chunk-ordered sums, read from L2 (other blocks wrote them).
  const int64_t c0 = entry * nchunks;
  dW += entry * r * d;
  dR += entry * r * d;
  db += entry * r;
  for (int64_t e = tid; e < int64_t(qn) * tile_cols; e += blockDim.x) {
    const int64_t q = q0 + e / tile_cols, kk = ct * tile_cols + e % tile_cols;
    if (kk >= d) continue;
    A sa = A(0), sz = A(0);
    for (int64_t c = c0; c < c0 + nchunks; ++c) {
      sa += __ldcg(partials + c * r * d + q * d + kk);
      sz += __ldcg(partials + nz * r * d + c * r * d + q * d + kk);
    }
    dW[q * d + kk] = sa;
    dR[q * d + kk] = sz - sa;
  }
  if (ct == 0)
    for (int qq = tid; qq < qn; qq += blockDim.x) {
      A sb = A(0);
      for (int64_t c = c0; c < c0 + nchunks; ++c) sb += __ldcg(partials + 2 * nz * r * d + c * r + q0 + qq);
      db[q0 + qq] = sb;
    }
}

// ---------------------------------------------------------------------------------------
// Host side.

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads per block: enough 32-lane warps to give every thread one VEC-column group,
// at most 256. A function of d (and the dtype) only, like the column ownership.
template <typename T>
int threads_for(int64_t d) {
  const int64_t groups = ceil_div(d, vec_of<T>());
  return int(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, ceil_div(groups, 32) * 32)));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
bool rows_aligned(const Rows& rows, int64_t d) {
  constexpr int VEC = vec_of<T>();
  return rows.data == nullptr ||
         (aligned16(rows.data) && rows.stride_b % VEC == 0 && rows.stride_t % VEC == 0 && d % VEC == 0);
}

inline bool params_aligned(const Problem& p) {
  return aligned16(p.params.R) && aligned16(p.params.W);
}

// Register-cached column iterations for d (a power of two <= 8), or 0: the general path.
template <typename T>
int cached_iters(int64_t d) {
  const int64_t need = ceil_div(d, int64_t(threads_for<T>(d)) * vec_of<T>());
  for (int it = 1; it <= 8; it *= 2)
    if (need <= it) return it;
  return 0;
}

inline KernelArgs make_args(const Problem& p) {
  KernelArgs a;
  a.B = p.B; a.T = p.T; a.P = p.P; a.d = p.d; a.r = p.r; a.n = p.B * p.P;
  a.N = p.index.data != nullptr ? p.N : 1;
  a.pos = p.pos;
  a.index = p.index;
  a.R = p.params.R; a.W = p.params.W; a.b = p.params.b;
  a.R_f32 = p.params.R_dtype == kFloat32;
  a.W_f32 = p.params.W_dtype == kFloat32;
  a.b_f32 = p.params.b_dtype == kFloat32;
  a.iters = 0;
  return a;
}

// A bank of N > 1 entries runs the one-row general kernels only (kBank in the kernels):
// one slot per block is what lets a block point its parameters at one entry. With N == 1
// every slot uses entry 0 and any kernel path applies (slot_token honours the index's -1).
inline bool multi_entry(const KernelArgs& a) { return a.index.data != nullptr && a.N > 1; }

// Largest bank the parameter kernel takes: N x (row chunks per entry) blocks along grid z.
constexpr int64_t kMaxBankEntries = 65535;

template <typename T, int ROWS, int ITERS, bool ALIGNED>
void launch_forward(const KernelArgs& a, Rows io, Rows saved, const int32_t* skip, int nt,
                    cudaStream_t stream) {
  const size_t smem = size_t(a.r) * ROWS * sizeof(acc_t<T>);
  REFT_CUDA_LAUNCH(unsigned(ceil_div(a.n, ROWS)), nt, smem, stream,
                   forward_kernel<T, ROWS, ITERS, ALIGNED>)(a, io, saved, skip);
  check_launch("loreft forward kernel");
}

template <typename T>
void forward_launch(const Problem& p, Rows io, Rows saved, const int32_t* skip) {
  const KernelArgs a = make_args(p);
  if (a.n == 0) return;
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const int nt = threads_for<T>(p.d);
  const bool aligned = rows_aligned<T>(io, p.d) && rows_aligned<T>(saved, p.d) && params_aligned(p);
  const int iters = (aligned && p.r <= kQChunk && !multi_entry(a)) ? cached_iters<T>(p.d) : 0;
  // Rows per block: enough to reuse each parameter load several times, few enough that
  // the cached rows (ROWS * ITERS * 16 bytes per thread) stay in registers.
  switch (iters) {
    case 1: return launch_forward<T, 8, 1, true>(a, io, saved, skip, nt, stream);
    case 2: return launch_forward<T, 8, 2, true>(a, io, saved, skip, nt, stream);
    case 4: return launch_forward<T, 4, 4, true>(a, io, saved, skip, nt, stream);
    case 8: return launch_forward<T, 2, 8, true>(a, io, saved, skip, nt, stream);
    default:
      if (aligned) return launch_forward<T, 1, 0, true>(a, io, saved, skip, nt, stream);
      return launch_forward<T, 1, 0, false>(a, io, saved, skip, nt, stream);
  }
}

// Workspace layout (bytes, each part 256-byte aligned): zg (n, 2r) | counters (int32) |
// partials (2 N nchunks r d + N nchunks r). All in the accumulation type. nchunks is per
// bank entry (N = 1 without an index).
struct BackwardLayout {
  int64_t n_col_tiles, n_q_groups, nchunks, n_counters;
  int64_t zg_off, counters_off, partials_off, total;
};

inline int64_t align256(int64_t x) { return (x + 255) / 256 * 256; }

// Column tiles of the parameter kernel use kParamColsPerTile for the chunk rule whatever
// the vector width, so the row partition (and the sums' order) depends on the shape only.
inline BackwardLayout backward_layout(const Problem& p, int64_t acc_bytes, int64_t tile_cols) {
  BackwardLayout l;
  const int64_t n = p.B * p.P;
  l.n_col_tiles = ceil_div(p.d, tile_cols);
  l.n_q_groups = ceil_div(p.r, kParamQ);
  const int64_t base = ceil_div(p.d, kParamColsPerTile) * l.n_q_groups;
  l.nchunks = std::max<int64_t>(1, std::min<int64_t>({ceil_div(kParamTargetBlocks, base),
                                                      ceil_div(std::max<int64_t>(n, 1), 64),
                                                      int64_t(1024)}));
  // A bank splits the chunks among its entries (a shape-only rule again), so that the
  // partials stay at most max(N, nchunks) r d: no bigger than the gradients themselves
  // once N passes nchunks, instead of N times one entry's.
  const int64_t N = p.index.data != nullptr ? p.N : 1;
  l.nchunks = std::max<int64_t>(1, l.nchunks / N);
  const int64_t nz = N * l.nchunks;
  l.n_counters = N * l.n_col_tiles * l.n_q_groups;
  l.zg_off = 0;
  l.counters_off = align256(n * 2 * p.r * acc_bytes);
  l.partials_off = l.counters_off + align256(l.n_counters * 4);
  l.total = l.partials_off + align256((2 * nz * p.r * p.d + nz * p.r) * acc_bytes);
  return l;
}

// The smallest parameter-kernel tile (scalar path) bounds the counter count of both paths.
template <typename T>
int64_t backward_workspace(const Problem& p) {
  if (p.B * p.P == 0) return 0;
  return backward_layout(p, sizeof(acc_t<T>), 32).total;
}

template <typename T, int ROWS, int ITERS, bool ALIGNED>
void launch_backward_rows(const KernelArgs& a, Rows g, Rows dx, Rows x, bool x_gathered,
                          acc_t<T>* zg, int32_t* counters, int n_counters, int nt,
                          cudaStream_t stream) {
  const size_t smem = size_t(2) * a.r * ROWS * sizeof(acc_t<T>);
  REFT_CUDA_LAUNCH(unsigned(ceil_div(a.n, ROWS)), nt, smem, stream,
                   backward_rows_kernel<T, ROWS, ITERS, ALIGNED>)(a, g, dx, x, x_gathered, zg,
                                                                  counters, n_counters);
  check_launch("loreft backward row kernel");
}

template <typename T>
void backward_launch(const Problem& p, Rows g, Rows dx, Rows x, bool x_gathered, void* dR,
                     void* dW, void* db, void* workspace, int64_t workspace_bytes) {
  using A = acc_t<T>;
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const KernelArgs a = make_args(p);
  if (a.n == 0) {
    // Nothing selected: the gradients are exactly zero (dx is g, already in place). p.N,
    // not a.N: an empty index may have no data pointer, but the buffers still hold N
    // entries.
    const int64_t N = std::max<int64_t>(p.N, 1);
    cudaError_t e = cudaMemsetAsync(dR, 0, size_t(N * p.r * p.d) * sizeof(A), stream);
    if (e == cudaSuccess) e = cudaMemsetAsync(dW, 0, size_t(N * p.r * p.d) * sizeof(A), stream);
    if (e == cudaSuccess) e = cudaMemsetAsync(db, 0, size_t(N * p.r) * sizeof(A), stream);
    if (e != cudaSuccess)
      throw std::runtime_error(std::string("reft_ext: cudaMemsetAsync failed: ") + cudaGetErrorString(e));
    return;
  }
  if (g.data == dx.data)
    throw std::invalid_argument("reft_ext: backward needs g and dx in different buffers");
  if (a.N > kMaxBankEntries)
    throw std::invalid_argument("reft_ext: a bank of " + std::to_string(a.N) +
                                " entries exceeds the CUDA backward's limit of " +
                                std::to_string(kMaxBankEntries));
  const bool aligned = rows_aligned<T>(g, p.d) && rows_aligned<T>(dx, p.d) &&
                       rows_aligned<T>(x, p.d) && params_aligned(p);
  constexpr int VEC2 = vec_of<T>() > 4 ? 4 : vec_of<T>();
  const int64_t tile_cols = aligned ? 32 * VEC2 : 32;
  const BackwardLayout l = backward_layout(p, sizeof(A), tile_cols);
  if (workspace_bytes < backward_workspace<T>(p))
    throw std::invalid_argument("reft_ext: backward workspace too small (" +
                                std::to_string(workspace_bytes) + " < " +
                                std::to_string(backward_workspace<T>(p)) + " bytes)");
  char* ws = static_cast<char*>(workspace);
  A* zg = reinterpret_cast<A*>(ws + l.zg_off);
  int32_t* counters = reinterpret_cast<int32_t*>(ws + l.counters_off);
  A* partials = reinterpret_cast<A*>(ws + l.partials_off);

  const int nt = threads_for<T>(p.d);
  // x and g are both cached: beyond 4 column iterations (d > 8192 for 16-bit h) they no
  // longer fit in 128 registers, and the general path (second pass re-reads g) takes over.
  int iters = (aligned && p.r <= kQChunk && !multi_entry(a)) ? cached_iters<T>(p.d) : 0;
  if (iters > 4) iters = 0;
  const int nc = int(l.n_counters);
  switch (iters) {
    case 1: launch_backward_rows<T, 4, 1, true>(a, g, dx, x, x_gathered, zg, counters, nc, nt, stream); break;
    case 2: launch_backward_rows<T, 2, 2, true>(a, g, dx, x, x_gathered, zg, counters, nc, nt, stream); break;
    case 4: launch_backward_rows<T, 1, 4, true>(a, g, dx, x, x_gathered, zg, counters, nc, nt, stream); break;
    default:
      if (aligned) launch_backward_rows<T, 1, 0, true>(a, g, dx, x, x_gathered, zg, counters, nc, nt, stream);
      else launch_backward_rows<T, 1, 0, false>(a, g, dx, x, x_gathered, zg, counters, nc, nt, stream);
  }

  const dim3 grid(unsigned(l.n_col_tiles), unsigned(l.n_q_groups), unsigned(a.N * l.nchunks));
  if (aligned)
    REFT_CUDA_LAUNCH(grid, kMaxThreads, 0, stream, backward_params_kernel<T, VEC2>)(
        a, g, x, x_gathered, zg, partials, counters, l.nchunks, static_cast<A*>(dR),
        static_cast<A*>(dW), static_cast<A*>(db));
  else
    REFT_CUDA_LAUNCH(grid, kMaxThreads, 0, stream, backward_params_kernel<T, 1>)(
        a, g, x, x_gathered, zg, partials, counters, l.nchunks, static_cast<A*>(dR),
        static_cast<A*>(dW), static_cast<A*>(db));
  check_launch("loreft backward parameter kernel");
}

}  // namespace cuda
}  // namespace reft
