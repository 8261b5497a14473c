// Host side of the CUDA emulation (cuemu.h): launches, the checked barriers, warp shuffles
// and the few runtime calls csrc/cuda makes.
#include "cuemu.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace cuemu {

[[noreturn]] void fail(const char* fmt, ...) {
  std::va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "cuemu: ");
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  va_end(args);
  std::abort();
}

namespace {

// A barrier that waits too long is a deadlock (threads waiting at different barriers, or
// for a thread that never arrives): abort with where everyone is rather than hang CI.
// Between two barriers a block does at most a few milliseconds of work, even under TSan.
std::chrono::seconds deadlock_timeout() {
  const char* env = std::getenv("CUEMU_DEADLOCK_SECONDS");
  return std::chrono::seconds(env ? std::atoi(env) : 60);
}

// Threads of one barrier (the block's __syncthreads, or one warp's shuffle exchange).
// Every participant must arrive at the same call site; a participant that exits while
// others wait, or before a barrier the others then reach, is an error: on the GPU this is
// undefined behaviour (a hang or a barrier that silently does not synchronise).
class CheckedBarrier {
 public:
  void init(const char* what, int expected) {
    what_ = what;
    expected_ = expected;
  }

  void arrive(const char* file, int line, int tid) {
    std::unique_lock<std::mutex> lock(m_);
    if (exited_ > 0)
      fail("%s at %s:%d reached by thread %d after %d thread(s) of the %s exited "
           "(block %u,%u,%u)", what_, file, line, tid, exited_, scope(), blockIdx.x,
           blockIdx.y, blockIdx.z);
    if (arrived_ == 0) {
      file_ = file;
      line_ = line;
    } else if (line_ != line || std::strcmp(file_, file) != 0) {
      fail("divergent %s: thread %d at %s:%d while %d thread(s) wait at %s:%d (block %u,%u,%u)",
           what_, tid, file, line, arrived_, file_, line_, blockIdx.x, blockIdx.y, blockIdx.z);
    }
    if (++arrived_ == expected_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    const uint64_t gen = generation_;
    if (!cv_.wait_for(lock, deadlock_timeout(), [&] { return generation_ != gen; }))
      fail("deadlock: %d of %d threads waited %llds at %s %s:%d (block %u,%u,%u); the others "
           "never arrived", arrived_, expected_, (long long)deadlock_timeout().count(), what_,
           file_, line_, blockIdx.x, blockIdx.y, blockIdx.z);
  }

  void exit(int tid) {
    std::lock_guard<std::mutex> lock(m_);
    if (arrived_ > 0)
      fail("thread %d exited while %d thread(s) of its %s wait at %s %s:%d (block %u,%u,%u)",
           tid, arrived_, scope(), what_, file_, line_, blockIdx.x, blockIdx.y, blockIdx.z);
    ++exited_;
  }

 private:
  const char* scope() const { return expected_ == 32 && what_[0] == 'w' ? "warp" : "block"; }

  std::mutex m_;
  std::condition_variable cv_;
  const char* what_ = "";
  int expected_ = 0, arrived_ = 0, exited_ = 0;
  uint64_t generation_ = 0;
  const char* file_ = "";
  int line_ = 0;
};

struct Warp {
  CheckedBarrier barrier;
  int size = 0;
  // Two slot sets used alternately: a lane may write the next shuffle's value only after
  // the previous exchange's barrier, so one barrier per shuffle suffices.
  uint64_t slots[2][32] = {};
  int phase[32] = {};
};

struct Block {
  CheckedBarrier barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  unsigned char* smem = nullptr;
};

// An unchecked barrier between the launching thread and the emulated threads, which
// start and end each block together (blocks never overlap).
class LaunchBarrier {
 public:
  explicit LaunchBarrier(int n) : n_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(m_);
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    const uint64_t gen = generation_;
    cv_.wait(lock, [&] { return generation_ != gen; });
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, arrived_ = 0;
  uint64_t generation_ = 0;
};

thread_local Block* t_block = nullptr;
thread_local int t_tid = -1;

std::mutex g_launch_mutex;  // one launch at a time (the static __shared__ copies are global)
BlockOrder g_order = BlockOrder::kForward;
uint64_t g_seed = 0;
Stats g_stats{0, 0, 0};
thread_local cudaError_t g_last_error = cudaSuccess;

// GPU limits every architecture the project builds for shares (sm_75 and newer); dynamic
// shared memory beyond 48 KiB needs an opt-in the kernels do not make.
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDimZ = 64;
constexpr uint64_t kMaxGridX = (1ull << 31) - 1;
constexpr unsigned kMaxGridYZ = 65535;
constexpr size_t kMaxDynamicSmem = 48 * 1024;

bool check_config(const LaunchConfig& c) {
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  const char* why = nullptr;
  cudaError_t err = cudaErrorInvalidConfiguration;
  if (threads == 0 || threads > kMaxThreadsPerBlock || c.block.z > kMaxBlockDimZ)
    why = "block size outside [1, 1024] threads";
  else if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.x > kMaxGridX ||
           c.grid.y > kMaxGridYZ || c.grid.z > kMaxGridYZ)
    why = "grid outside the limits (x < 2^31, y and z <= 65535, none 0)";
  else if (c.smem > kMaxDynamicSmem)
    why = "dynamic shared memory above 48 KiB", err = cudaErrorInvalidValue;
  if (why == nullptr) return true;
  if (std::getenv("CUEMU_VERBOSE"))
    std::fprintf(stderr, "cuemu: launch of %s refused: %s (grid %u,%u,%u block %u,%u,%u smem "
                 "%zu)\n", c.kernel, why, c.grid.x, c.grid.y, c.grid.z, c.block.x, c.block.y,
                 c.block.z, c.smem);
  g_last_error = err;
  return false;
}

}  // namespace

void set_block_order(BlockOrder order, uint64_t seed) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_order = order;
  g_seed = seed;
}

Stats stats() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  return g_stats;
}

unsigned char* dynamic_shared() { return t_block->smem; }

void syncthreads(const char* file, int line) {
  if (t_block == nullptr) fail("__syncthreads outside a kernel (%s:%d)", file, line);
  t_block->barrier.arrive(file, line, t_tid);
}

uint64_t shfl_xor_bits(const char* file, int line, unsigned mask, uint64_t bits,
                       int lane_mask, int width) {
  if (t_block == nullptr) fail("__shfl_xor_sync outside a kernel (%s:%d)", file, line);
  const int lane = t_tid & 31;
  Warp& w = *t_block->warps[size_t(t_tid >> 5)];
  // The kernels shuffle whole warps only; anything else is a bug there, and on the GPU
  // an undefined result rather than an error.
  if (mask != 0xffffffffu || w.size != 32)
    fail("__shfl_xor_sync at %s:%d with mask 0x%08x in a warp of %d threads (thread %d): "
         "only full warps and full masks are supported", file, line, mask, w.size, t_tid);
  if (width != 32 || lane_mask < 0 || lane_mask >= 32)
    fail("__shfl_xor_sync at %s:%d: lane mask %d / width %d outside the warp", file, line,
         lane_mask, width);
  const int ph = w.phase[lane];
  w.phase[lane] ^= 1;
  w.slots[ph][lane] = bits;
  w.barrier.arrive(file, line, t_tid);
  return w.slots[ph][lane ^ lane_mask];
}

void run(const LaunchConfig& c, void (*body)(const void*), const void* ctx) {
  if (!check_config(c)) return;
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const int nt = int(c.block.x * c.block.y * c.block.z);
  const uint64_t nblocks = uint64_t(c.grid.x) * c.grid.y * c.grid.z;
  std::vector<uint64_t> order(nblocks);
  std::iota(order.begin(), order.end(), uint64_t(0));
  if (g_order == BlockOrder::kReverse) std::reverse(order.begin(), order.end());
  if (g_order == BlockOrder::kShuffled) std::shuffle(order.begin(), order.end(), std::mt19937_64(g_seed));
  ++g_stats.launches;
  g_stats.blocks += int64_t(nblocks);
  g_stats.threads += int64_t(nblocks) * nt;

  LaunchBarrier start(nt + 1), done(nt + 1);
  std::unique_ptr<Block> block;
  auto worker = [&](int tid) {
    t_tid = tid;
    threadIdx = uint3{unsigned(tid) % c.block.x, unsigned(tid) / c.block.x % c.block.y,
                      unsigned(tid) / (c.block.x * c.block.y)};
    blockDim = c.block;
    gridDim = c.grid;
    for (uint64_t b : order) {
      start.arrive_and_wait();
      t_block = block.get();
      blockIdx = uint3{unsigned(b % c.grid.x), unsigned(b / c.grid.x % c.grid.y),
                       unsigned(b / (uint64_t(c.grid.x) * c.grid.y))};
      body(ctx);
      t_block->warps[size_t(tid >> 5)]->barrier.exit(tid);
      t_block->barrier.exit(tid);
      t_block = nullptr;
      done.arrive_and_wait();
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(size_t(nt));
  for (int t = 0; t < nt; ++t) threads.emplace_back(worker, t);
  for (uint64_t b = 0; b < nblocks; ++b) {
    (void)b;
    block = std::make_unique<Block>();
    block->barrier.init("__syncthreads", nt);
    for (int w = 0; w < (nt + 31) / 32; ++w) {
      block->warps.push_back(std::make_unique<Warp>());
      block->warps.back()->size = std::min(32, nt - 32 * w);
      block->warps.back()->barrier.init("warp shuffle", block->warps.back()->size);
    }
    void* smem = nullptr;
    if (posix_memalign(&smem, 16, c.smem) != 0) fail("out of memory for shared memory");
    std::memset(smem, 0xff, c.smem);
    block->smem = static_cast<unsigned char*>(smem);
    start.arrive_and_wait();
    done.arrive_and_wait();
    std::free(block->smem);
    block.reset();
  }
  for (std::thread& t : threads) t.join();
}

}  // namespace cuemu

// The CUDA runtime calls csrc/cuda makes, over host memory.
extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = cuemu::g_last_error;
  cuemu::g_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    default: return "cudaError(emulated)";
  }
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    default: return "emulated CUDA error";
  }
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t) {
  std::memset(p, value, count);
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaErrorNoDevice;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 0;
  return cudaErrorNoDevice;
}

}  // extern "C"
