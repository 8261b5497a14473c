// Instantiates the LoReFT kernels for h of type float (one dtype per file: parallel builds).
#include "loreft_kernels.cuh"

namespace reft {
namespace cuda {
template void forward_launch<float>(const Problem&, Rows, Rows, const int32_t*);
template void backward_launch<float>(const Problem&, Rows, Rows, Rows, bool, void*, void*, void*,
                                  void*, int64_t);
}  // namespace cuda
}  // namespace reft
