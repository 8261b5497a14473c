// reft_cuemu: the CUDA entry points of reft_core.h, built from the real csrc/cuda sources
// against the CPU emulation (cuemu.h), over host memory. The arguments are those of the
// CUDA functions of reft_ext._C (csrc/bindings.cpp), so the tests marshal them with
// reft_ext._ops._problem exactly as the shipped op does.
#include <pybind11/pybind11.h>

#include <string>

#include "cuemu.h"
#include "reft_core.h"

namespace py = pybind11;
using reft::Problem;
using reft::Rows;

namespace {

void* as_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

Problem make_problem(py::tuple sizes, int h_dtype, uintptr_t pos, bool pos_int64,
                     int64_t pos_sb, int64_t pos_sp, uintptr_t R, int R_dtype, uintptr_t W,
                     int W_dtype, uintptr_t b, int b_dtype, int num_threads, uintptr_t stream) {
  if (sizes.size() != 5) throw std::invalid_argument("sizes must be (B, T, P, d, r)");
  Problem p;
  p.B = sizes[0].cast<int64_t>();
  p.T = sizes[1].cast<int64_t>();
  p.P = sizes[2].cast<int64_t>();
  p.d = sizes[3].cast<int64_t>();
  p.r = sizes[4].cast<int64_t>();
  p.h_dtype = h_dtype;
  p.pos = {reinterpret_cast<const void*>(pos), pos_int64, pos_sb, pos_sp};
  p.params = {as_ptr(R), R_dtype, as_ptr(W), W_dtype, as_ptr(b), b_dtype};
  p.num_threads = num_threads;
  p.stream = as_ptr(stream);
  return p;
}

#define PROBLEM_ARGS                                                                   \
  py::tuple sizes, int h_dtype, uintptr_t pos, bool pos_int64, int64_t pos_sb,         \
      int64_t pos_sp, uintptr_t R, int R_dtype, uintptr_t W, int W_dtype, uintptr_t b, \
      int b_dtype, int num_threads, uintptr_t stream
#define PROBLEM                                                                        \
  make_problem(sizes, h_dtype, pos, pos_int64, pos_sb, pos_sp, R, R_dtype, W, W_dtype, \
               b, b_dtype, num_threads, stream)

}  // namespace

PYBIND11_MODULE(reft_cuemu, m) {
  m.doc() = "reft_ext's CUDA kernels run on the CPU by emulation (tests only)";
  m.attr("sanitizer") = std::string(REFT_CUEMU_SANITIZER);
  m.attr("cuda_max_rank") = reft::kCudaMaxRank;

  m.def("check_positions_cuda", [](PROBLEM_ARGS, uintptr_t status) {
    Problem p = PROBLEM;
    py::gil_scoped_release release;
    reft::check_positions_cuda(p, reinterpret_cast<int32_t*>(status));
  });
  m.def("forward_cuda", [](PROBLEM_ARGS, uintptr_t io, int64_t io_sb, int64_t io_st,
                           uintptr_t saved, int64_t saved_sb, int64_t saved_st,
                           uintptr_t skip) {
    Problem p = PROBLEM;
    py::gil_scoped_release release;
    reft::loreft_forward_cuda(p, Rows{as_ptr(io), io_sb, io_st},
                              Rows{as_ptr(saved), saved_sb, saved_st},
                              reinterpret_cast<const int32_t*>(skip));
  });
  m.def("backward_cuda_workspace", [](PROBLEM_ARGS) {
    return reft::loreft_backward_cuda_workspace(PROBLEM);
  });
  m.def("backward_cuda", [](PROBLEM_ARGS, uintptr_t g, int64_t g_sb, int64_t g_st,
                            uintptr_t dx, int64_t dx_sb, int64_t dx_st, uintptr_t x,
                            int64_t x_sb, int64_t x_st, bool x_gathered, uintptr_t dR,
                            uintptr_t dW, uintptr_t db, uintptr_t ws, int64_t ws_bytes) {
    Problem p = PROBLEM;
    py::gil_scoped_release release;
    reft::loreft_backward_cuda(p, Rows{as_ptr(g), g_sb, g_st}, Rows{as_ptr(dx), dx_sb, dx_st},
                               Rows{as_ptr(x), x_sb, x_st}, x_gathered, as_ptr(dR),
                               as_ptr(dW), as_ptr(db), as_ptr(ws), ws_bytes);
  });

  m.def("set_block_order", [](const std::string& order, uint64_t seed) {
    if (order == "forward") cuemu::set_block_order(cuemu::BlockOrder::kForward, seed);
    else if (order == "reverse") cuemu::set_block_order(cuemu::BlockOrder::kReverse, seed);
    else if (order == "shuffled") cuemu::set_block_order(cuemu::BlockOrder::kShuffled, seed);
    else throw std::invalid_argument("block order must be forward, reverse or shuffled");
  }, py::arg("order"), py::arg("seed") = 0,
     "Order in which the following launches run their blocks.");
  m.def("stats", [] {
    const cuemu::Stats s = cuemu::stats();
    return py::dict(py::arg("launches") = s.launches, py::arg("blocks") = s.blocks,
                    py::arg("threads") = s.threads);
  }, "Launches, blocks and threads run so far (launches refused by the limits not counted).");
}
