// Stand-in for preprocess_cuda.cu in builds made without nvcc (CPU-only):
// reports that CUDA is absent instead of failing to link, so `import medge._C`
// and the CPU path work everywhere.
#include "medge/preprocess.h"

namespace medge {

bool cuda_compiled() { return false; }

int cuda_device_count() { return 0; }

std::string cuda_architectures() { return ""; }

std::string cuda_status() { return "this build has no CUDA kernels (nvcc was not found when it was built)"; }

void preprocess_cuda(const ImageParams*, int64_t, const OutputParams&, void*, int64_t, cudaStream_t) {
  throw CudaError(
      "this medge build has no CUDA support (nvcc was not found when it was built); reinstall with "
      "the CUDA toolkit on PATH, e.g. CUDACXX=/usr/local/cuda/bin/nvcc pip install --no-binary medge medge");
}

}  // namespace medge
