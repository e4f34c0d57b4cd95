// Runs medge's CUDA preprocessing kernels on the CPU, for tests: the kernel
// bodies of preprocess_kernels.h built as host code (cuda_shim.h), launched
// with the same plan as preprocess_cuda, on host memory. Not for production:
// one emulated thread at a time.
#pragma once

#include <cstdint>
#include <string>

#include "medge/preprocess.h"

namespace medge {

// Same contract as preprocess_cuda, with host pointers. images_per_launch
// (1..64, 0 = the real 64) and max_blocks (grid size of each tiled launch,
// 0 = one block per tile) shrink launches so tests cover the chunking and the
// blocks' tile loops. A violated kernel invariant (a read outside an image or
// outside its buffer, a shared-memory index out of range, a misaligned vector
// access, a write outside the output) throws std::logic_error naming it.
// `fault` tests those checks themselves: "" (none), "wide_image" (the kernels
// see every image 8 columns wider than its buffer holds), "small_vbuf" (the
// plan reserves one chunk of shared memory too few per row).
void preprocess_cuda_emulated(const ImageParams* images, int64_t count, const OutputParams& out, void* output,
                              int64_t output_bytes, int images_per_launch, int max_blocks,
                              const std::string& fault = "");

}  // namespace medge
