// x86-64-v3 build of the CPU kernels (AVX2 + FMA + F16C), chosen at run time when the CPU
// has them. CMake compiles this file with -mavx2 -mfma -mf16c on x86-64 only.
#define REFT_CPU_NS avx2
#include "kernels.inc"
