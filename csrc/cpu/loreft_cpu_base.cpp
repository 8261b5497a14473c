// Portable build of the CPU kernels (baseline ISA of the target).
#define REFT_CPU_NS base
#include "kernels.inc"
