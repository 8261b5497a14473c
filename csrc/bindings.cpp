// The thin pybind11 module reft_ext._C. Tensors cross this boundary as integers (data
// pointers), sizes, strides and dtype codes; reft_ext/_ops.py builds them from torch
// tensors and has already checked shapes, dtypes and devices.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "reft_core.h"

namespace py = pybind11;
using reft::Problem;
using reft::Rows;

namespace {

void* as_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

// Problem description, shared by every entry point.
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

PYBIND11_MODULE(_C, m) {
  m.doc() = "reft_ext native kernels (private; use reft_ext.loreft / reft_ext.loreft_)";

  // Validates the positions' values, then edits; returns '' or why nothing was written.
  // coef: 0, or a contiguous (B, P, r) buffer of the accumulation type for z.
  m.def("forward_cpu", [](PROBLEM_ARGS, uintptr_t io, int64_t io_sb, int64_t io_st,
                          uintptr_t saved, int64_t saved_sb, int64_t saved_st,
                          uintptr_t coef) {
    Problem p = PROBLEM;
    char msg[256] = {0};
    {
      py::gil_scoped_release release;
      if (reft::check_positions_cpu(p, msg, sizeof(msg)))
        reft::loreft_forward_cpu(p, Rows{as_ptr(io), io_sb, io_st},
                                 Rows{as_ptr(saved), saved_sb, saved_st}, as_ptr(coef));
    }
    return std::string(msg);
  });

  m.def("check_positions_cpu", [](PROBLEM_ARGS) {
    Problem p = PROBLEM;
    char msg[256] = {0};
    py::gil_scoped_release release;
    reft::check_positions_cpu(p, msg, sizeof(msg));
    return std::string(msg);
  }, "Returns '' when positions are valid, else the reason. Reads only the positions.");

  // coef: 0, or forward_cpu's coef for these x and parameters (z is then not recomputed).
  // delta: 0 (dx written into gio), or (B, P, d) rows receiving dx - g (gio only read).
  m.def("backward_cpu", [](PROBLEM_ARGS, uintptr_t gio, int64_t g_sb, int64_t g_st,
                           uintptr_t x, int64_t x_sb, int64_t x_st, bool x_gathered,
                           uintptr_t coef, uintptr_t dR, uintptr_t dW, uintptr_t db,
                           uintptr_t delta, int64_t delta_sb, int64_t delta_st) {
    Problem p = PROBLEM;
    py::gil_scoped_release release;
    reft::loreft_backward_cpu(p, Rows{as_ptr(gio), g_sb, g_st}, Rows{as_ptr(x), x_sb, x_st},
                              x_gathered, reinterpret_cast<const void*>(coef), as_ptr(dR),
                              as_ptr(dW), as_ptr(db), Rows{as_ptr(delta), delta_sb, delta_st});
  });

  m.def("cpu_isa", &reft::cpu_isa, "Instruction set of the CPU kernels on this machine.");
  m.attr("cxx_compiler") = std::string(REFT_EXT_CXX_COMPILER);

#ifdef REFT_EXT_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def("cuda_runtime_version", &reft::cuda_runtime_version);
  m.def("cuda_driver_version", &reft::cuda_driver_version);
  m.attr("cuda_compiler") = std::string(REFT_EXT_CUDA_COMPILER);
  m.attr("cuda_archs") = std::string(reft::cuda_archs());
  m.def("cuda_device_count", [] {
    int count = 0;
    char msg[256] = {0};
    int err = reft::cuda_device_count(&count, msg, sizeof(msg));
    return py::make_tuple(err, count, std::string(msg));
  });
  m.def("check_positions_cuda", [](PROBLEM_ARGS, uintptr_t status) {
    Problem p = PROBLEM;
    reft::check_positions_cuda(p, reinterpret_cast<int32_t*>(status));
  });
  m.attr("cuda_max_rank") = reft::kCudaMaxRank;
  // skip: 0 once positions were seen valid, else the device status of check_positions_cuda.
  m.def("forward_cuda", [](PROBLEM_ARGS, uintptr_t io, int64_t io_sb, int64_t io_st,
                           uintptr_t saved, int64_t saved_sb, int64_t saved_st,
                           uintptr_t skip) {
    Problem p = PROBLEM;
    reft::loreft_forward_cuda(p, Rows{as_ptr(io), io_sb, io_st},
                              Rows{as_ptr(saved), saved_sb, saved_st},
                              reinterpret_cast<const int32_t*>(skip));
  });
  m.def("backward_cuda_workspace", [](PROBLEM_ARGS) {
    return reft::loreft_backward_cuda_workspace(PROBLEM);
  });
  // g (read) and dx (written at the selected rows) must be different buffers.
  m.def("backward_cuda", [](PROBLEM_ARGS, uintptr_t g, int64_t g_sb, int64_t g_st,
                            uintptr_t dx, int64_t dx_sb, int64_t dx_st, uintptr_t x,
                            int64_t x_sb, int64_t x_st, bool x_gathered, uintptr_t dR,
                            uintptr_t dW, uintptr_t db, uintptr_t ws, int64_t ws_bytes) {
    Problem p = PROBLEM;
    reft::loreft_backward_cuda(p, Rows{as_ptr(g), g_sb, g_st}, Rows{as_ptr(dx), dx_sb, dx_st},
                               Rows{as_ptr(x), x_sb, x_st}, x_gathered, as_ptr(dR),
                               as_ptr(dW), as_ptr(db), as_ptr(ws), ws_bytes);
  });
#else
  m.attr("has_cuda") = false;
  m.attr("cuda_archs") = std::string();
#endif
}
