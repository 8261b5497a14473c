// A process-wide pool of worker threads for the CPU kernels (shared by every ISA build).
#pragma once

#include <cstdint>

namespace reft {

// Calls fn(ctx, begin, end) over [0, n) in pieces of `grain` items, on the calling thread
// and up to num_threads - 1 pool workers. Pieces are claimed from a shared counter, and the
// caller waits only for pieces already claimed: a worker the OS has not scheduled yet
// never delays the call (threads spawned per call stalled small calls by a whole scheduler
// slice on a busy machine). Which thread runs a piece varies from call to
// call, so fn's results must not depend on it. Concurrent calls from other threads, and
// calls in a forked child, run on their own thread.
void run_parallel(int64_t n, int64_t grain, int num_threads,
                  void (*fn)(void* ctx, int64_t begin, int64_t end), void* ctx);

}  // namespace reft
