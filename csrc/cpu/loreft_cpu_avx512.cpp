// x86-64-v4 build of the CPU kernels (AVX-512F/BW/VL + FMA + F16C: 16 floats a vector),
// chosen at run time when the CPU has them. CMake compiles this file with these -m flags
// on x86-64 only.
#define REFT_CPU_NS avx512
#include "kernels.inc"
