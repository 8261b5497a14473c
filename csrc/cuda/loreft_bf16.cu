// Instantiates the LoReFT kernels for h of type __nv_bfloat16 (one dtype per file: parallel builds).
#include "loreft_kernels.cuh"

namespace reft {
namespace cuda {
template void forward_launch<__nv_bfloat16>(const Problem&, Rows, Rows, const int32_t*);
template void backward_launch<__nv_bfloat16>(const Problem&, Rows, Rows, Rows, bool, void*, void*, void*,
                                  void*, int64_t);
}  // namespace cuda
}  // namespace reft
