// reft_cuemu: the CUDA entry points of reft_core.h, built from the real csrc/cuda sources
// against the CPU emulation (cuemu.h), over host memory. They take the arguments of the CUDA
// functions of reft_ext._C (the same described problem, csrc/problem_caster.h), so the tests
// marshal them with reft_ext.ops._marshal exactly as the shipped op does.
#include <pybind11/pybind11.h>

#include <string>

#include "cuemu.h"
#include "problem_caster.h"
#include "reft_core.h"

namespace py = pybind11;
using reft::Problem;
using reft::Rows;
using reft_bind::as_ptr;

PYBIND11_MODULE(reft_cuemu, m) {
  m.doc() = "reft_ext's CUDA kernels run on the CPU by emulation (tests only)";
  m.attr("sanitizer") = std::string(REFT_CUEMU_SANITIZER);
  m.attr("cuda_max_rank") = reft::kCudaMaxRank;
  m.attr("PROBLEM_FIELDS") = reft_bind::problem_fields();

  m.def("check_positions_cuda", [](const Problem& p, uintptr_t status) {
    py::gil_scoped_release release;
    reft::check_positions_cuda(p, reinterpret_cast<int32_t*>(status));
  });
  m.def("forward_cuda", [](const Problem& p, Rows io, Rows saved, uintptr_t skip) {
    py::gil_scoped_release release;
    reft::loreft_forward_cuda(p, io, saved, reinterpret_cast<const int32_t*>(skip));
  });
  m.def("backward_cuda_workspace", [](const Problem& p) {
    return reft::loreft_backward_cuda_workspace(p);
  });
  m.def("backward_cuda", [](const Problem& p, Rows g, Rows dx, Rows x, bool x_gathered,
                            uintptr_t dR, uintptr_t dW, uintptr_t db, uintptr_t ws,
                            int64_t ws_bytes) {
    py::gil_scoped_release release;
    reft::loreft_backward_cuda(p, g, dx, x, x_gathered, as_ptr(dR), as_ptr(dW), as_ptr(db),
                               as_ptr(ws), ws_bytes);
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
