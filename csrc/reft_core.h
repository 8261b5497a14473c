// reft_ext core: torch-free interface of the fused LoReFT kernels.
//
// Everything here takes raw pointers, sizes, strides (in elements) and dtype codes, so that
// the kernels build without torch and a stable-ABI wrapper could be added later.
//
// The edit, for every selected row x = h[i, pos[i, j]] (row vectors, M = W - R):
//   z  = x M^T + b                       (r)
//   y  = x + z R                         (d)
// backward, with g = dL/dy at that row:
//   gz = g R^T                           (r)
//   dx = g + gz M                        (d)
//   dW = sum gz^T x,  db = sum gz,  dR = sum (z^T g - gz^T x)
#pragma once
#include <cstdint>

namespace reft {

// Element type codes shared by the binding and every kernel.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Rows of a (B, T, d) tensor whose last dimension is contiguous.
struct Rows {
  void* data;          // element (i, t, k) lives at data + i*stride_b + t*stride_t + k
  int64_t stride_b;    // in elements
  int64_t stride_t;    // in elements
};

// Gathered position table: pos (B, P), int64 or int32, -1 marks an empty slot.
struct Positions {
  const void* data;
  bool is_int64;
  int64_t stride_b;    // in elements
  int64_t stride_p;    // in elements
};

// Intervention parameters: a bank of N entries. Each of R, W (N, r, d) and b (N, r) is
// contiguous (entry e's R at R + e * r * d), and has its own dtype: h's dtype or float32.
struct Params {
  const void* R; int R_dtype;
  const void* W; int W_dtype;
  const void* b; int b_dtype;
};

struct Problem {
  int64_t B, T, P, d, r;
  int64_t N;           // bank entries (1 without an index)
  int h_dtype;         // dtype of the (B, T, d) tensors (h, out, grad)
  Positions pos;
  // Bank index (B, P), int64 or int32, same layout rules as pos; data == nullptr: none
  // (every slot uses entry 0, N == 1). Entry index[i, j] in [0, N) edits slot (i, j) with
  // that entry's parameters; -1 leaves the slot empty, like a -1 position. A slot is
  // edited when both its position and its index are >= 0.
  Positions index;
  Params params;
  int num_threads;     // CPU only; <= 1 runs on the calling thread
  void* stream;        // CUDA only: cudaStream_t of the caller
};

// Checks every position is -1 or in [0, T) and appears at most once per row (among the
// slots whose position is not -1, whatever their index), and every index entry is -1 or
// in [0, N).
// Returns true when valid; otherwise fills msg (NUL-terminated, at most msg_size bytes).
bool check_positions_cpu(const Problem& p, char* msg, int64_t msg_size);

// Forward, in place on io: for each valid slot (i, j), with t = pos[i, j]:
//   saved[i, j, :] = io[i, t, :]   (when saved.data != nullptr; (B, P, d) in h's dtype;
//                                    empty slots are set to zeros)
//   io[i, t, :]    = Phi(io[i, t, :])
//   coef[i, j, :]  = z of that row (when coef != nullptr; contiguous (B, P, r) in the
//                    accumulation type; empty slots get zeros)
// Rows not selected are never read or written.
void loreft_forward_cpu(const Problem& p, Rows io, Rows saved, void* coef);

// Backward. gio holds g = dL/dy on entry (all B*T rows) and receives dL/dh at the selected
// rows (other rows are left as they are, which is their gradient). x gives the forward's
// input rows: when x_gathered, row (i, j) is at x.data + i*stride_b + j*stride_t, else at
// row (i, pos[i, j]). dR, dW (r, d) and db (r,) are written (not accumulated) in the
// accumulation type: float64 when h is float64, float32 otherwise; with a bank, (N, r, d)
// and (N, r), entry e's the sum over the slots that use it (zeros for unused entries). The reduction over rows
// uses a fixed partition that depends only on the problem's shape (and the index's
// values), never on thread count.
// coef: nullptr, or the forward's coef for these x and parameters, which the backward then
// reads instead of computing z again (the same values: a row's z does not depend on the
// tiling). delta: when delta.data != nullptr, gio is only read, and slot (i, j) of delta
// (a (B, P, d) tensor in h's dtype, like x_gathered rows) receives dx - g = gz M for its
// row instead (zeros for empty slots): the row correction of h's gradient, added to g
// by the caller (reft_ext/ops/_grad_reuse.py: autograd, in place when it holds g alone).
void loreft_backward_cpu(const Problem& p, Rows gio, Rows x, bool x_gathered,
                         const void* coef, void* dR, void* dW, void* db, Rows delta);

// Instruction set the CPU kernels use on this machine ("avx2+fma" or "baseline").
const char* cpu_isa();

#ifdef REFT_EXT_WITH_CUDA
// CUDA versions: same contracts as the CPU kernels, pointers on the current device, work
// launched on p.stream (asynchronous: the functions return before the kernels finish).
// A failed launch throws std::runtime_error with the CUDA error string.

// Largest rank the CUDA kernels take: a block keeps z and gz of its rows in shared memory.
constexpr int64_t kCudaMaxRank = 2048;

// Validates the positions on the device: ORs into the int32 at `status` (device memory,
// zeroed by the caller) the value 1 when an entry is neither -1 nor in [0, T), and 2 when
// a token index repeats within a row (so 3 when both), and 4 when an index entry is
// neither -1 nor in [0, N). Nothing else is written.
void check_positions_cuda(const Problem& p, int32_t* status);

// Forward, in place on io, as loreft_forward_cpu, except that the slots of saved whose
// position is -1 are zero-filled (saved needs no memset). skip: nullptr once the caller
// has seen a zero status; otherwise a device int32 (check_positions_cuda's status) that
// makes the kernel write nothing when nonzero, for callers that cannot read it back
// before the launch (CUDA graph capture). Positions outside [0, T) and index entries
// outside [0, N) are never dereferenced (their slots are left empty).
void loreft_forward_cuda(const Problem& p, Rows io, Rows saved, const int32_t* skip);

// Backward. Unlike the CPU version, g = dL/dy (read at the selected rows only) and dx
// (receives dL/dh at the selected rows; other rows are left as they are) are separate
// buffers, because the second launch reads g again. x as for the CPU. dR, dW (r, d)
// and db (r,) (with a bank: (N, r, d) and (N, r), zeros for unused entries) are written
// in the accumulation type, with a reduction order that depends on the shape
// (B, P, d, r, N), the dtype and the index's values only. workspace: device memory of
// at least loreft_backward_cuda_workspace(p) bytes, any content.
void loreft_backward_cuda(const Problem& p, Rows g, Rows dx, Rows x, bool x_gathered,
                          void* dR, void* dW, void* db, void* workspace,
                          int64_t workspace_bytes);
int64_t loreft_backward_cuda_workspace(const Problem& p);

// Build information for reft_ext.build_info().
int cuda_runtime_version();  // CUDART_VERSION the module was built with, e.g. 13000
int cuda_driver_version();   // CUDA version the installed driver supports; 0 if none
const char* cuda_archs();    // e.g. "75-real,80-real,...,120-virtual"
// Returns 0 and fills count, or the cudaError_t code with a readable reason in msg (no
// driver, no device): never crashes on a machine without a GPU.
int cuda_device_count(int* count, char* msg, int64_t msg_size);
#endif

}  // namespace reft
