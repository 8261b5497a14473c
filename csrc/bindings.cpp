// The thin pybind11 module reft_ext._C. Tensors cross this boundary as a described
// problem: a reft::Problem arrives as a tuple of named fields, in the order PROBLEM_FIELDS
// lists (reft_ext/ops/_marshal.py builds a namedtuple of those names, by keyword, from
// torch tensors after checking shapes, dtypes and devices), and each reft::Rows as
// (data, stride_b, stride_t). So no entry point takes a long positional list in which a
// swapped stride or dtype code would pass for another argument. A tuple, not a bound
// class: pybind11's keyword constructor of a class costs several times more per call,
// and the ops call this per layer per step.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "problem_caster.h"
#include "reft_core.h"

namespace py = pybind11;
using reft::Problem;
using reft::Rows;

using reft_bind::as_ptr;

PYBIND11_MODULE(_C, m) {
  m.doc() = "reft_ext native kernels (private; use reft_ext.loreft / reft_ext.loreft_)";
  m.attr("PROBLEM_FIELDS") = reft_bind::problem_fields();

  // Validates the positions' values, then edits; returns '' or why nothing was written.
  // coef: 0, or a contiguous (B, P, r) buffer of the accumulation type for z.
  m.def("forward_cpu", [](const Problem& p, Rows io, Rows saved, uintptr_t coef) {
    char msg[256] = {0};
    {
      py::gil_scoped_release release;
      if (reft::check_positions_cpu(p, msg, sizeof(msg)))
        reft::loreft_forward_cpu(p, io, saved, as_ptr(coef));
    }
    return std::string(msg);
  }, py::arg("problem"), py::arg("io"), py::arg("saved"), py::arg("coef"));

  m.def("check_positions_cpu", [](const Problem& p) {
    char msg[256] = {0};
    py::gil_scoped_release release;
    reft::check_positions_cpu(p, msg, sizeof(msg));
    return std::string(msg);
  }, "Returns '' when positions are valid, else the reason. Reads only the positions.");

  // coef: 0, or forward_cpu's coef for these x and parameters (z is then not recomputed).
  // delta: 0 (dx written into gio), or (B, P, d) rows receiving dx - g (gio only read).
  m.def("backward_cpu", [](const Problem& p, Rows gio, Rows x, bool x_gathered,
                           uintptr_t coef, uintptr_t dR, uintptr_t dW, uintptr_t db,
                           Rows delta) {
    py::gil_scoped_release release;
    reft::loreft_backward_cpu(p, gio, x, x_gathered, reinterpret_cast<const void*>(coef),
                              as_ptr(dR), as_ptr(dW), as_ptr(db), delta);
  }, py::arg("problem"), py::arg("gio"), py::arg("x"), py::arg("x_gathered"),
     py::arg("coef"), py::arg("dR"), py::arg("dW"), py::arg("db"), py::arg("delta"));

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
  m.def("check_positions_cuda", [](const Problem& p, uintptr_t status) {
    reft::check_positions_cuda(p, reinterpret_cast<int32_t*>(status));
  });
  m.attr("cuda_max_rank") = reft::kCudaMaxRank;
  // skip: 0 once positions were seen valid, else the device status of check_positions_cuda.
  m.def("forward_cuda", [](const Problem& p, Rows io, Rows saved, uintptr_t skip) {
    reft::loreft_forward_cuda(p, io, saved, reinterpret_cast<const int32_t*>(skip));
  }, py::arg("problem"), py::arg("io"), py::arg("saved"), py::arg("skip"));
  m.def("backward_cuda_workspace", [](const Problem& p) {
    return reft::loreft_backward_cuda_workspace(p);
  });
  // g (read) and dx (written at the selected rows) must be different buffers.
  m.def("backward_cuda", [](const Problem& p, Rows g, Rows dx, Rows x, bool x_gathered,
                            uintptr_t dR, uintptr_t dW, uintptr_t db, uintptr_t ws,
                            int64_t ws_bytes) {
    reft::loreft_backward_cuda(p, g, dx, x, x_gathered, as_ptr(dR), as_ptr(dW), as_ptr(db),
                               as_ptr(ws), ws_bytes);
  }, py::arg("problem"), py::arg("g"), py::arg("dx"), py::arg("x"), py::arg("x_gathered"),
     py::arg("dR"), py::arg("dW"), py::arg("db"), py::arg("ws"), py::arg("ws_bytes"));
#else
  m.attr("has_cuda") = false;
  m.attr("cuda_archs") = std::string();
#endif
}
