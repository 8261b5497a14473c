// CPU kernels of the fused LoReFT edit (the fallback, and what CI exercises).
//
// Work is split over the flattened (B*P) slot list. Threads come from the caller (torch's
// get_num_threads()) and are plain std::threads: no second OpenMP runtime beside torch's.
#include <algorithm>
#include <cstdio>
#include <thread>
#include <vector>

#include "../reft_core.h"
#include "dtype.h"

namespace reft {
namespace {

inline int64_t position_at(const Positions& pos, int64_t i, int64_t j) {
  const char* base = static_cast<const char*>(pos.data);
  if (pos.is_int64)
    return reinterpret_cast<const int64_t*>(base)[i * pos.stride_b + j * pos.stride_p];
  return reinterpret_cast<const int32_t*>(base)[i * pos.stride_b + j * pos.stride_p];
}

template <typename S>
inline S* row_ptr(const Rows& rows, int64_t i, int64_t t) {
  return static_cast<S*>(rows.data) + i * rows.stride_b + t * rows.stride_t;
}

// Runs fn(begin, end) over [0, n) split into contiguous ranges, one per thread. Small
// problems run on the calling thread: spawning costs ~20 us.
template <typename Fn>
void parallel_for(int64_t n, int num_threads, int64_t work_per_item, Fn fn) {
  constexpr int64_t kMinWorkPerThread = 1 << 16;
  int64_t by_work = std::max<int64_t>(1, (n * work_per_item) / kMinWorkPerThread);
  int64_t threads = std::min<int64_t>({int64_t(std::max(num_threads, 1)), n, by_work});
  if (threads <= 1) {
    if (n > 0) fn(int64_t(0), n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  int64_t chunk = (n + threads - 1) / threads;
  for (int64_t t = 1; t < threads; ++t) {
    int64_t begin = t * chunk, end = std::min(n, begin + chunk);
    if (begin < end) pool.emplace_back([=, &fn] { fn(begin, end); });
  }
  fn(int64_t(0), std::min(n, chunk));
  for (auto& th : pool) th.join();
}

// Reads a parameter array of `count` elements stored in `dtype` into acc_t.
template <typename acc_t>
void load_param(const void* src, int dtype, int64_t count, acc_t* dst) {
  REFT_DISPATCH_FLOAT(dtype, S, [&] {
    const S* s = static_cast<const S*>(src);
    for (int64_t k = 0; k < count; ++k) dst[k] = acc_t(to_float(s[k]));
  });
}

// Parameters converted once per call: R (r, d), M = W - R (r, d), b (r).
template <typename acc_t>
struct AccParams {
  std::vector<acc_t> R, M, b;
  AccParams(const Problem& p) : R(p.r * p.d), M(p.r * p.d), b(p.r) {
    std::vector<acc_t> W(p.r * p.d);
    load_param(p.params.R, p.params.R_dtype, p.r * p.d, R.data());
    load_param(p.params.W, p.params.W_dtype, p.r * p.d, W.data());
    load_param(p.params.b, p.params.b_dtype, p.r, b.data());
    for (int64_t k = 0; k < p.r * p.d; ++k) M[k] = W[k] - R[k];
  }
};

// Dot product with 8 independent partial sums, so the compiler vectorises it without
// -ffast-math; the fixed order keeps results identical run after run.
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int u = 0; u < 8; ++u) s[u] += a[k + u] * b[k + u];
  acc_t tail = 0;
  for (; k < n; ++k) tail += a[k] * b[k];
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + tail;
}

template <typename scalar_t>
void forward_impl(const Problem& p, Rows io, Rows saved) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t d = p.d, r = p.r, n = p.B * p.P;
  AccParams<acc_t> w(p);
  parallel_for(n, p.num_threads, 4 * r * d + d, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(d), y(d), z(r);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t i = s / p.P, j = s % p.P, t = position_at(p.pos, i, j);
      if (t < 0) continue;
      scalar_t* row = row_ptr<scalar_t>(io, i, t);
      if (saved.data) std::copy(row, row + d, row_ptr<scalar_t>(saved, i, j));
      for (int64_t k = 0; k < d; ++k) x[k] = acc_t(to_float(row[k]));
      for (int64_t q = 0; q < r; ++q) z[q] = dot(x.data(), &w.M[q * d], d) + w.b[q];
      std::copy(x.begin(), x.end(), y.begin());
      for (int64_t q = 0; q < r; ++q) {
        const acc_t zq = z[q];
        const acc_t* Rq = &w.R[q * d];
        for (int64_t k = 0; k < d; ++k) y[k] += zq * Rq[k];
      }
      for (int64_t k = 0; k < d; ++k) row[k] = store_as<scalar_t>(y[k]);
    }
  });
}

// Number of slot chunks whose parameter-gradient partials are reduced in fixed order.
// Depends only on the shape, so gradients are bitwise reproducible across thread counts.
int64_t num_chunks(int64_t slots, int64_t r, int64_t d, int64_t acc_bytes) {
  constexpr int64_t kMaxChunks = 64, kMinSlotsPerChunk = 8;
  constexpr int64_t kBudgetBytes = int64_t(64) << 20;  // partial sums of all chunks
  int64_t per_chunk = (2 * r * d + r) * acc_bytes;
  int64_t by_budget = std::max<int64_t>(1, kBudgetBytes / std::max<int64_t>(per_chunk, 1));
  int64_t by_slots = std::max<int64_t>(1, slots / kMinSlotsPerChunk);
  return std::min({kMaxChunks, by_budget, by_slots});
}

template <typename scalar_t>
void backward_impl(const Problem& p, Rows gio, Rows xs, bool x_gathered, void* dR_out,
                   void* dW_out, void* db_out) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t d = p.d, r = p.r, n = p.B * p.P;
  AccParams<acc_t> w(p);
  const int64_t chunks = num_chunks(n, r, d, sizeof(acc_t));
  const int64_t per_chunk = (n + chunks - 1) / chunks;
  // Per chunk: A = sum gz^T x (r, d), Z = sum z^T g (r, d), db (r).
  const int64_t stride = 2 * r * d + r;
  std::vector<acc_t> partial(chunks * stride, acc_t(0));
  parallel_for(chunks, p.num_threads, per_chunk * (6 * r * d + 2 * d),
               [&](int64_t c_begin, int64_t c_end) {
    std::vector<acc_t> x(d), g(d), dx(d), z(r), gz(r);
    for (int64_t c = c_begin; c < c_end; ++c) {
      acc_t* A = &partial[c * stride];
      acc_t* Z = A + r * d;
      acc_t* db = Z + r * d;
      for (int64_t s = c * per_chunk; s < std::min(n, (c + 1) * per_chunk); ++s) {
        const int64_t i = s / p.P, j = s % p.P, t = position_at(p.pos, i, j);
        if (t < 0) continue;
        const scalar_t* xrow = x_gathered ? row_ptr<scalar_t>(xs, i, j) : row_ptr<scalar_t>(xs, i, t);
        scalar_t* grow = row_ptr<scalar_t>(gio, i, t);
        for (int64_t k = 0; k < d; ++k) x[k] = acc_t(to_float(xrow[k]));
        for (int64_t k = 0; k < d; ++k) g[k] = acc_t(to_float(grow[k]));
        for (int64_t q = 0; q < r; ++q) {
          z[q] = dot(x.data(), &w.M[q * d], d) + w.b[q];
          gz[q] = dot(g.data(), &w.R[q * d], d);
        }
        std::copy(g.begin(), g.end(), dx.begin());
        for (int64_t q = 0; q < r; ++q) {
          const acc_t gq = gz[q], zq = z[q];
          const acc_t* Mq = &w.M[q * d];
          acc_t* Aq = A + q * d;
          acc_t* Zq = Z + q * d;
          for (int64_t k = 0; k < d; ++k) {
            dx[k] += gq * Mq[k];
            Aq[k] += gq * x[k];
            Zq[k] += zq * g[k];
          }
          db[q] += gq;
        }
        for (int64_t k = 0; k < d; ++k) grow[k] = store_as<scalar_t>(dx[k]);
      }
    }
  });
  // Fixed-order reduction over chunks, parallel over parameter elements.
  acc_t* dR = static_cast<acc_t*>(dR_out);
  acc_t* dW = static_cast<acc_t*>(dW_out);
  acc_t* dbo = static_cast<acc_t*>(db_out);
  parallel_for(r * d + r, p.num_threads, chunks * 2, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      if (e < r * d) {
        acc_t a = 0, zsum = 0;
        for (int64_t c = 0; c < chunks; ++c) {
          a += partial[c * stride + e];
          zsum += partial[c * stride + r * d + e];
        }
        dW[e] = a;
        dR[e] = zsum - a;
      } else {
        acc_t s = 0;
        for (int64_t c = 0; c < chunks; ++c) s += partial[c * stride + 2 * r * d + (e - r * d)];
        dbo[e - r * d] = s;
      }
    }
  });
}

}  // namespace

bool check_positions_cpu(const Problem& p, char* msg, int64_t msg_size) {
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

void loreft_forward_cpu(const Problem& p, Rows io, Rows saved) {
  REFT_DISPATCH_FLOAT(p.h_dtype, scalar_t, [&] { forward_impl<scalar_t>(p, io, saved); });
}

void loreft_backward_cpu(const Problem& p, Rows gio, Rows x, bool x_gathered, void* dR,
                         void* dW, void* db) {
  REFT_DISPATCH_FLOAT(p.h_dtype, scalar_t,
                      [&] { backward_impl<scalar_t>(p, gio, x, x_gathered, dR, dW, db); });
}

}  // namespace reft
