// Emulated launches of the CUDA preprocessing kernels on the CPU (tests only):
// the kernel bodies of preprocess_kernels.h compiled as host code through
// cuda_shim.h, run with the launch plan preprocess_cuda uses. Each block's
// threads run one phase after another, as the barriers order them on the GPU;
// shared memory is poisoned (NaN) at every block start.
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "medge/emulation.h"
#include "medge/preprocess_kernels.h"

namespace medge {
namespace {

using kernels::Launch;

struct EmulatedBlock {
  template <class F>
  void run(F&& phase) {
    for (unsigned t = 0; t < blockDim.x; ++t) {
      threadIdx = dim3(t);
      phase();
    }
  }
};

template <typename T>
void run_tiled(const Launch& l, int max_blocks) {
  const kernels::TiledLaunch& p = l.tiled_params;
  const int32_t grid = max_blocks > 0 && max_blocks < l.blocks ? max_blocks : l.blocks;
  std::vector<uint32_t> shared(static_cast<size_t>(p.smem_words));
  uint32_t nan_bits;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(&nan_bits, &nan, 4);
  blockDim = dim3(kernels::kBlockThreads);
  gridDim = dim3(static_cast<unsigned>(grid));
  for (int32_t b = 0; b < grid; ++b) {
    blockIdx = dim3(static_cast<unsigned>(b));
    std::fill(shared.begin(), shared.end(), nan_bits);
    EmulatedBlock block;
    kernels::tiled_body<T>(block, p, kernels::Shared{shared.data(), p.smem_words});
  }
}

void run_gather(const Launch& l) {
  blockDim = dim3(kernels::kGatherBlockX, kernels::kGatherBlockY);
  gridDim = dim3(static_cast<unsigned>(l.gather_grid[0]), static_cast<unsigned>(l.gather_grid[1]),
                 static_cast<unsigned>(l.gather_grid[2]));
  for (unsigned bz = 0; bz < gridDim.z; ++bz)
    for (unsigned by = 0; by < gridDim.y; ++by)
      for (unsigned bx = 0; bx < gridDim.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        for (unsigned ty = 0; ty < blockDim.y; ++ty)
          for (unsigned tx = 0; tx < blockDim.x; ++tx) {
            threadIdx = dim3(tx, ty);
            kernels::gather_body(l.gather_params);
          }
      }
}

}  // namespace

void preprocess_cuda_emulated(const ImageParams* images, int64_t count, const OutputParams& out, void* output,
                              int64_t output_bytes, int images_per_launch, int max_blocks, const std::string& fault) {
  if (!fault.empty() && fault != "wide_image" && fault != "small_vbuf")
    throw InvalidArgument("unknown emulation fault '" + fault + "'");
  detail::validate_output(out);
  if (count < 0 || count > kMaxBatch) throw InvalidArgument("batch size out of range");
  if (count == 0) return;
  if (images == nullptr) throw InvalidArgument("image parameter array is null");
  detail::check_output_buffer(output, output_bytes, out, count);
  std::vector<detail::PreparedImage> prepared(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) prepared[static_cast<size_t>(i)] = detail::prepare_image(images[i], out, i);
  shim::readable_.clear();
  for (int64_t i = 0; i < count; ++i) {
    const char* begin = static_cast<const char*>(images[i].pixels);
    shim::readable_.push_back({begin, begin + images[i].buffer_bytes});
  }
  if (fault == "wide_image")
    for (detail::PreparedImage& im : prepared) im.in_width += 8;
  std::vector<Launch> launches = kernels::plan_launches(prepared.data(), count, out, output, images_per_launch);
  if (fault == "small_vbuf")
    for (Launch& l : launches)
      if (l.tiled) l.tiled_params.vbuf_cols -= kernels::chunk_elems(l.pixel_type);
  for (const Launch& l : launches) {
    if (!l.tiled) {
      run_gather(l);
      continue;
    }
    switch (l.pixel_type) {
      case PixelType::kUInt8: run_tiled<uint8_t>(l, max_blocks); break;
      case PixelType::kUInt16:
      case PixelType::kInt16: run_tiled<uint16_t>(l, max_blocks); break;
      case PixelType::kInt32: run_tiled<int32_t>(l, max_blocks); break;
      case PixelType::kFloat32: run_tiled<float>(l, max_blocks); break;
    }
  }
}

}  // namespace medge
