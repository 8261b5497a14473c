// The pybind11 side of the described problem that csrc/bindings.cpp (reft_ext._C) and the
// CUDA emulation's test module (tests/cuemu/module.cpp) take: a reft::Problem arrives as a
// tuple of named fields in the order PROBLEM_FIELDS lists, a reft::Rows as (data, stride_b,
// stride_t). One definition, so that the emulation is called exactly as the shipped module.
// Include only from a pybind11 module source (it is not part of the torch-free core).
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

#include "reft_core.h"

namespace reft_bind {

// The fields of a Problem, in the order they arrive; the enum indexes this list.
constexpr const char* kProblemFields[] = {
    "B", "T", "P", "d", "r", "N", "h_dtype", "pos", "pos_int64", "pos_stride_b",
    "pos_stride_p", "index", "index_int64", "index_stride_b", "index_stride_p", "R", "R_dtype", "W", "W_dtype", "b", "b_dtype", "num_threads", "stream"};
enum ProblemField : int {
  kB, kT, kP, kD, kR, kN, kHDtype, kPos, kPosInt64, kPosStrideB, kPosStrideP,
  kIndex, kIndexInt64, kIndexStrideB, kIndexStrideP, kRPtr, kRDtype, kWPtr, kWDtype, kBPtr, kBDtype, kNumThreads, kStream, kNumProblemFields
};
static_assert(sizeof(kProblemFields) / sizeof(kProblemFields[0]) == kNumProblemFields,
              "one name per Problem field");

inline void* as_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

// The names, for the module attribute PROBLEM_FIELDS (reft_ext/ops/_marshal.py reads it).
inline pybind11::tuple problem_fields() {
  pybind11::tuple fields(static_cast<size_t>(kNumProblemFields));
  for (int i = 0; i < kNumProblemFields; ++i) fields[i] = pybind11::str(kProblemFields[i]);
  return fields;
}

// Reads a tuple of n Python ints; false (and no Python error left) if it is not one.
template <int n, typename F>
bool read_ints(pybind11::handle src, F&& store) {
  PyObject* t = src.ptr();
  if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != n) return false;
  for (int i = 0; i < n; ++i) {
    PyObject* v = PyTuple_GET_ITEM(t, i);
    if (!PyLong_Check(v)) return false;
    long long x = PyLong_AsLongLong(v);
    if (x == -1 && PyErr_Occurred()) {  // a pointer above 2^63: read it unsigned
      PyErr_Clear();
      x = static_cast<long long>(PyLong_AsUnsignedLongLong(v));
      if (PyErr_Occurred()) { PyErr_Clear(); return false; }
    }
    store(i, static_cast<int64_t>(x));
  }
  return true;
}

}  // namespace reft_bind

namespace pybind11 {
namespace detail {

template <>
struct type_caster<reft::Problem> {
  PYBIND11_TYPE_CASTER(reft::Problem, const_name("Problem"));
  bool load(handle src, bool) {
    using namespace reft_bind;
    int64_t f[kNumProblemFields];
    if (!read_ints<kNumProblemFields>(src, [&](int i, int64_t x) { f[i] = x; })) return false;
    auto ptr = [&](int i) { return as_ptr(static_cast<uintptr_t>(f[i])); };
    value.B = f[kB]; value.T = f[kT]; value.P = f[kP]; value.d = f[kD]; value.r = f[kR];
    value.N = f[kN];
    value.h_dtype = static_cast<int>(f[kHDtype]);
    value.pos = {ptr(kPos), f[kPosInt64] != 0, f[kPosStrideB], f[kPosStrideP]};
    value.index = {ptr(kIndex), f[kIndexInt64] != 0, f[kIndexStrideB], f[kIndexStrideP]};
    value.params = {ptr(kRPtr), static_cast<int>(f[kRDtype]), ptr(kWPtr),
                    static_cast<int>(f[kWDtype]), ptr(kBPtr), static_cast<int>(f[kBDtype])};
    value.num_threads = static_cast<int>(f[kNumThreads]);
    value.stream = ptr(kStream);
    return true;
  }
  static handle cast(const reft::Problem&, return_value_policy, handle) {
    throw cast_error("reft_ext: a Problem is never returned to Python");
  }
};

template <>
struct type_caster<reft::Rows> {
  PYBIND11_TYPE_CASTER(reft::Rows, const_name("Rows"));
  bool load(handle src, bool) {  // (data, stride_b, stride_t); (0, 0, 0): no tensor
    int64_t f[3];
    if (!reft_bind::read_ints<3>(src, [&](int i, int64_t x) { f[i] = x; })) return false;
    value = reft::Rows{reft_bind::as_ptr(static_cast<uintptr_t>(f[0])), f[1], f[2]};
    return true;
  }
  static handle cast(const reft::Rows&, return_value_policy, handle) {
    throw cast_error("reft_ext: Rows are never returned to Python");
  }
};

}  // namespace detail
}  // namespace pybind11
