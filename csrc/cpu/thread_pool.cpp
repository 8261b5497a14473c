#include "thread_pool.h"

#include <unistd.h>
#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace reft {
namespace {

struct Job {
  int64_t n = 0, grain = 1;
  void (*fn)(void*, int64_t, int64_t) = nullptr;
  void* ctx = nullptr;
  std::atomic<int64_t> next{0}, done{0};
  int helpers_wanted = 0;  // workers that may still join (guarded by Pool::m)
  int helpers_in = 0;      // workers inside the job (guarded by Pool::m)
};

struct Pool {
  std::mutex m;
  std::condition_variable wake, finished;
  Job* job = nullptr;
  int workers = 0;
  std::mutex submit;  // one job at a time; other callers run alone
  const pid_t pid = getpid();

  // Claims pieces until none is left; returns after the last piece it ran.
  static void work(Job* j) {
    for (;;) {
      const int64_t b = j->next.fetch_add(j->grain);
      if (b >= j->n) return;
      const int64_t e = std::min(j->n, b + j->grain);
      j->fn(j->ctx, b, e);
      j->done.fetch_add(e - b);
    }
  }

  void worker_loop() {
#if defined(__linux__)
    pthread_setname_np(pthread_self(), "reft_ext_pool");  // for top, gdb and the tests
#endif
    std::unique_lock<std::mutex> lock(m);
    for (;;) {
      wake.wait(lock, [&] { return job != nullptr && job->helpers_wanted > 0; });
      Job* j = job;
      --j->helpers_wanted;
      ++j->helpers_in;
      lock.unlock();
      work(j);
      lock.lock();
      if (--j->helpers_in == 0 || j->done.load() == j->n) finished.notify_all();
    }
  }

  void ensure_workers(int count) {
    // Workers are detached and the pool is never destroyed: nothing to join at exit.
    while (workers < count) {
      std::thread t([this] { worker_loop(); });
      handles.push_back(t.native_handle());
      t.detach();
      ++workers;
#if defined(__linux__)
      any_steered = false;  // the new worker has the process's mask
#endif
    }
  }

  std::vector<std::thread::native_handle_type> handles;
#if defined(__linux__)
  cpu_set_t steered{};  // the workers' mask, as last set
  bool any_steered = false;
#endif

  // Keeps the workers off the CPU the caller runs on (Linux). A thread woken by a futex is
  // placed next to its waker when the scheduler sees fit (wake-affine): the worker then
  // takes turns with the caller on one CPU until load balancing moves one of them, which
  // is longer than a small call, which then takes as long as on one thread (how often:
  // bench/results/code-measurements.md). The mask is
  // the caller's own affinity less its current CPU, so a user's pinning is respected; it
  // is set again only when it changes. Guarded by m.
  void steer_workers() {
#if defined(__linux__)
    const int me = sched_getcpu();
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    if (me < 0 || sched_getaffinity(0, sizeof(allowed), &allowed) != 0 ||
        !CPU_ISSET(me, &allowed))
      return;
    CPU_CLR(me, &allowed);
    if (CPU_COUNT(&allowed) == 0) return;  // one CPU: nowhere else to go
    if (any_steered && CPU_EQUAL(&allowed, &steered)) return;
    for (auto h : handles) pthread_setaffinity_np(h, sizeof(allowed), &allowed);
    steered = allowed;
    any_steered = true;
#endif
  }
};

Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

}  // namespace

void run_parallel(int64_t n, int64_t grain, int num_threads,
                  void (*fn)(void*, int64_t, int64_t), void* ctx) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t pieces = (n + grain - 1) / grain;
  const int helpers = int(std::min<int64_t>(num_threads - 1, pieces - 1));
  Pool& p = pool();
  if (helpers <= 0 || getpid() != p.pid) {
    fn(ctx, 0, n);
    return;
  }
  std::unique_lock<std::mutex> submit(p.submit, std::try_to_lock);
  if (!submit.owns_lock()) {
    fn(ctx, 0, n);
    return;
  }
  Job j;
  j.n = n;
  j.grain = grain;
  j.fn = fn;
  j.ctx = ctx;
  {
    std::lock_guard<std::mutex> lock(p.m);
    p.ensure_workers(std::min(helpers, 255));
    p.steer_workers();
    j.helpers_wanted = helpers;
    p.job = &j;
  }
  p.wake.notify_all();
  Pool::work(&j);
  std::unique_lock<std::mutex> lock(p.m);
  // No new worker may join now; wait for the pieces in flight and for the workers inside
  // to leave, since j lives on this stack.
  j.helpers_wanted = 0;
  p.job = nullptr;
  p.finished.wait(lock, [&] { return j.done.load() == j.n && j.helpers_in == 0; });
}

}  // namespace reft
