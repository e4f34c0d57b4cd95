// CUDA implementation of the volume preprocessing: one thread per output
// element (grid-stride), each gathering its trilinear (or nearest) taps from
// the stored values through volume_detail::element, the function the CPU
// emulation runs too. Launch tables (per-slice transforms, per-axis taps) are
// built on the host and copied to the device by the caller (volume.h).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <sstream>

#include "medge/pixel_math.h"
#include "medge/preprocess.h"
#include "medge/volume.h"

namespace medge {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

__global__ void volume_kernel(const __grid_constant__ volume_detail::KernelArgs args) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < args.total; e += stride) {
    const float v = volume_detail::element(args, e);
    if (args.half)
      static_cast<__half*>(args.output)[e] = __float2half_rn(v);
    else
      static_cast<float*>(args.output)[e] = v;
  }
}

void check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  std::ostringstream msg;
  msg << what << " failed: " << cudaGetErrorName(err) << " (" << cudaGetErrorString(err) << ")";
  throw CudaError(msg.str());
}

}  // namespace

void preprocess_volume_cuda(const VolumeParams& volume, const VolumeOutputParams& out, const void* device_tables,
                            int64_t table_bytes, void* output, int64_t output_bytes, cudaStream_t stream) {
  const int64_t needed_tables = volume_cuda_table_bytes(volume, out);  // validates `out`
  if (device_tables == nullptr || table_bytes < needed_tables) {
    std::ostringstream msg;
    msg << "device tables hold " << table_bytes << " bytes but the launch needs " << needed_tables
        << " (build them with volume_cuda_tables)";
    throw InvalidArgument(msg.str());
  }
  if (reinterpret_cast<std::uintptr_t>(device_tables) % 16 != 0)
    throw InvalidArgument("device tables are not aligned to 16 bytes");
  if (output == nullptr) throw InvalidArgument("output pointer is null");
  const int64_t elem = output_type_size(out.output_type);
  if (reinterpret_cast<std::uintptr_t>(output) % static_cast<std::uintptr_t>(elem) != 0)
    throw InvalidArgument("output pointer is not aligned to its element size");
  if (output_bytes < volume_output_bytes(out)) {
    std::ostringstream msg;
    msg << "output buffer holds " << output_bytes << " bytes but the volume output needs " << volume_output_bytes(out);
    throw InvalidArgument(msg.str());
  }

  const volume_detail::Layout l = volume_detail::table_layout(volume.depth, out.size);
  const char* base = static_cast<const char*>(device_tables);

  volume_detail::KernelArgs args{};
  args.slices = reinterpret_cast<const detail::PreparedImage*>(base + l.slices);
  args.taps_z = reinterpret_cast<const volume_detail::Tap*>(base + l.taps_z);
  args.taps_y = reinterpret_cast<const volume_detail::Tap*>(base + l.taps_y);
  args.taps_x = reinterpret_cast<const volume_detail::Tap*>(base + l.taps_x);
  args.output = output;
  args.total = volume_output_elements(out);
  args.size_d = static_cast<int32_t>(out.size[0]);
  args.size_h = static_cast<int32_t>(out.size[1]);
  args.size_w = static_cast<int32_t>(out.size[2]);
  args.neighbours = out.neighbours;
  args.channels = out.neighbours > 0 ? 2 * out.neighbours + 1 : 1;
  args.half = out.output_type == OutputType::kFloat16 ? 1 : 0;
  args.pad_value = out.pad_value;
  args.mean = out.mean;
  args.inv_std = 1.0f / out.std;
  if (args.total == 0) return;

  const int64_t blocks = std::min<int64_t>(kMaxBlocks, (args.total + kThreads - 1) / kThreads);
  volume_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
  check_cuda(cudaGetLastError(), "volume preprocessing kernel launch");
}

}  // namespace medge
