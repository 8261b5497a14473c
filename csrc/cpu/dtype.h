// Scalar conversions, the position-table lookup and the one dtype-dispatch macro of the CPU
// core.
//
// Example:
//   REFT_DISPATCH_FLOAT(p.h_dtype, scalar_t, [&] { run<scalar_t>(p); });
// expands to a switch calling the lambda with scalar_t = float, Half, BFloat16 or double.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../reft_core.h"

namespace reft {

// 16-bit storage types; arithmetic always happens after conversion to float.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }
inline float to_float(BFloat16 v) { return bits_to_float(uint32_t(v.bits) << 16); }
inline float to_float(Half v) {
  // IEEE binary16 -> binary32, exact (denormals and inf/nan included).
  uint32_t h = v.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    float f = float(man) * (1.0f / 16777216.0f);  // man * 2^-24
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

template <typename T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline BFloat16 from_float<BFloat16>(float v) {
  uint32_t u = float_to_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return BFloat16{uint16_t(u >> 16)};
}
template <> inline Half from_float<Half>(float v) {
  // binary32 -> binary16, round to nearest even (the same result as a hardware cvt).
  uint32_t u = float_to_bits(v), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return Half{uint16_t(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return Half{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (a < 0x38800000u) {  // result is subnormal or zero: round a * 2^24 to an integer
    float f = bits_to_float(a) * 16777216.0f;   // exact scaling by a power of two
    // f < 1024; round half to even via the float adder.
    float rounded = (f + 8388608.0f) - 8388608.0f;
    return Half{uint16_t(sign | uint32_t(rounded))};
  }
  uint32_t mant_odd = (a >> 13) & 1u;
  a += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
  return Half{uint16_t(sign | (a >> 13))};
}
template <> inline double from_float<double>(float v) { return v; }

// Rounds an accumulator value to the storage type (double stays double).
template <typename T, typename A> inline T store_as(A v) {
  if constexpr (std::is_same_v<T, double>) return v;
  else return from_float<T>(float(v));
}

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// positions[i, j] of the (B, P) int64 or int32 position table.
inline int64_t position_at(const Positions& pos, int64_t i, int64_t j) {
  const char* base = static_cast<const char*>(pos.data);
  if (pos.is_int64)
    return reinterpret_cast<const int64_t*>(base)[i * pos.stride_b + j * pos.stride_p];
  return reinterpret_cast<const int32_t*>(base)[i * pos.stride_b + j * pos.stride_p];
}

#define REFT_DISPATCH_FLOAT(CODE, NAME, ...)                               \
  [&] {                                                                    \
    switch (CODE) {                                                        \
      case ::reft::kFloat32: { using NAME = float; return __VA_ARGS__(); }   \
      case ::reft::kFloat16: { using NAME = ::reft::Half; return __VA_ARGS__(); } \
      case ::reft::kBFloat16: { using NAME = ::reft::BFloat16; return __VA_ARGS__(); } \
      case ::reft::kFloat64: { using NAME = double; return __VA_ARGS__(); }  \
      default: throw std::invalid_argument("reft_ext: unsupported dtype code " + std::to_string(CODE)); \
    }                                                                      \
  }()

}  // namespace reft
