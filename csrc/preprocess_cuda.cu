// CUDA implementation of the fused preprocessing: the launcher and the
// __global__ wrappers around the kernel bodies of preprocess_kernels.h (shared
// with the CPU emulator that tests them). The tiled, separable kernel takes
// every image whose filters and input tiles fit; a per-pixel gather kernel the
// rest. Per-image parameters travel by value in the kernel parameter space
// (no device allocation, no H2D copy), which keeps the launches capturable in
// a CUDA graph.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <tuple>
#include <vector>

#include "medge/pixel_math.h"
#include "medge/preprocess.h"
#include "medge/preprocess_kernels.h"

#ifndef MEDGE_CUDA_ARCHITECTURES
#define MEDGE_CUDA_ARCHITECTURES ""
#endif

namespace medge {
namespace {

using detail::PreparedImage;
using kernels::GatherLaunch;
using kernels::Launch;
using kernels::TiledLaunch;

// Parameters above 4 KB need CUDA 12.1+ (driver and toolkit) and compute capability 7.0+, which every
// architecture this builds for has; the limit is 32764 bytes.
static_assert(sizeof(TiledLaunch) <= 32764 && sizeof(GatherLaunch) <= 32764, "kernel parameters exceed 32764 bytes");

struct DeviceBlock {
  template <class F>
  __device__ __forceinline__ void run(F&& phase) {
    phase();
    __syncthreads();
  }
};

// T: the container (uint16_t serves int16 images too); float16 / float32 output is read from p.
template <typename T>
__global__ void __launch_bounds__(kernels::kBlockThreads, kernels::kMinBlocksPerSM)
    tiled_kernel(const __grid_constant__ TiledLaunch p) {
  extern __shared__ uint4 shared_words[];
  DeviceBlock block;
  kernels::tiled_body<T>(block, p, kernels::Shared{reinterpret_cast<uint32_t*>(shared_words), p.smem_words});
}

__global__ void __launch_bounds__(kernels::kGatherBlockX * kernels::kGatherBlockY)
    gather_kernel(const __grid_constant__ GatherLaunch p) {
  kernels::gather_body(p);
}

using TiledFn = void (*)(TiledLaunch);

TiledFn tiled_function(PixelType container) {
  switch (container) {
    case PixelType::kUInt8: return tiled_kernel<uint8_t>;
    case PixelType::kUInt16:
    case PixelType::kInt16: return tiled_kernel<uint16_t>;
    case PixelType::kInt32: return tiled_kernel<int32_t>;
    case PixelType::kFloat32: return tiled_kernel<float>;
  }
  return nullptr;
}

void throw_cuda(cudaError_t err, const char* what) {
  std::ostringstream msg;
  msg << what << ": " << cudaGetErrorName(err) << " (" << cudaGetErrorString(err) << ")";
  throw CudaError(msg.str());
}

// A pointer the kernel may dereference: device, managed, or pinned host memory
// registered with CUDA, on the current device. Pageable host memory is refused
// here instead of faulting inside the kernel.
void check_device_pointer(const void* ptr, int device, const std::string& what) {
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls are unaffected
    throw InvalidArgument(what + " is not a CUDA pointer (" + cudaGetErrorName(err) + ")");
  }
  if (attr.type == cudaMemoryTypeUnregistered)
    throw InvalidArgument(what + " points to ordinary host memory; the CUDA path needs device memory");
  if (attr.type == cudaMemoryTypeHost && attr.devicePointer != ptr)
    throw InvalidArgument(what + " is registered host memory whose device address differs from its host address; "
                                 "pass the device pointer (cudaHostGetDevicePointer) or device memory");
  if (attr.type == cudaMemoryTypeDevice && attr.device != device) {
    std::ostringstream msg;
    msg << what << " is on device " << attr.device << " but the current device is " << device;
    throw InvalidArgument(msg.str());
  }
}

// Blocks of `fn` with `smem` bytes that fit on the device at once (cached: the
// occupancy query is not free and the answer never changes).
int resident_blocks(int device, const void* fn, int smem) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int>, int> cache;
  const auto key = std::make_tuple(device, fn, smem);
  std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  int per_sm = 0, sms = 0;
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, kernels::kBlockThreads, smem);
  if (err != cudaSuccess) throw_cuda(err, "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) throw_cuda(err, "cudaDeviceGetAttribute(multiprocessor count)");
  const int blocks = std::max(1, per_sm) * std::max(1, sms);
  cache.emplace(key, blocks);
  return blocks;
}

// Blocks of a tiled launch. Persistent by default: as many as stay resident at once, each looping
// over tiles. MEDGE_TILED_GRID (read at each launch, for benchmarks) picks another rule: "balanced"
// (every block gets the same number of tiles: no second round for a few blocks while the rest of
// the GPU idles, at the price of fewer resident warps), "tiles" (one block per tile).
int tiled_grid(int tiles, int resident) {
  const char* mode = std::getenv("MEDGE_TILED_GRID");
  if (mode != nullptr && std::strcmp(mode, "tiles") == 0) return tiles;
  if (mode != nullptr && std::strcmp(mode, "balanced") == 0) {
    const int rounds = (tiles + resident - 1) / resident;
    return (tiles + rounds - 1) / rounds;
  }
  return std::min(tiles, resident);
}

}  // namespace

bool cuda_compiled() { return true; }

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::string cuda_status() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    std::string status = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    // The static runtime reports a missing driver the same way as an old one.
    if (err == cudaErrorInsufficientDriver)
      status += " (no NVIDIA driver is installed, or it is older than this build's CUDA runtime needs)";
    return status;
  }
  return std::to_string(count) + " CUDA device(s)";
}

std::string cuda_architectures() { return MEDGE_CUDA_ARCHITECTURES; }

void preprocess_cuda(const ImageParams* images, int64_t count, const OutputParams& out, void* output,
                     int64_t output_bytes, cudaStream_t stream) {
  detail::validate_output(out);
  if (count < 0 || count > kMaxBatch) throw InvalidArgument("batch size out of range");
  if (count == 0) return;
  if (images == nullptr) throw InvalidArgument("image parameter array is null");
  detail::check_output_buffer(output, output_bytes, out, count);
  // Parameters first, so bad ones are reported as such even without a device.
  std::vector<PreparedImage> prepared(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) prepared[static_cast<size_t>(i)] = detail::prepare_image(images[i], out, i);

  if (cuda_device_count() == 0) throw CudaError("no CUDA device is available: " + cuda_status());
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) throw_cuda(err, "cudaGetDevice");
  for (int64_t i = 0; i < count; ++i)
    check_device_pointer(images[i].pixels, device, "image " + std::to_string(i) + " pixel pointer");
  check_device_pointer(output, device, "output pointer");

  for (const Launch& l : kernels::plan_launches(prepared.data(), count, out, output, 0)) {
    if (l.tiled) {
      const TiledFn fn = tiled_function(l.pixel_type);
      const int grid = tiled_grid(l.blocks, resident_blocks(device, reinterpret_cast<const void*>(fn), l.smem_bytes));
      fn<<<grid, kernels::kBlockThreads, static_cast<size_t>(l.smem_bytes), stream>>>(l.tiled_params);
    } else {
      const dim3 grid(static_cast<unsigned>(l.gather_grid[0]), static_cast<unsigned>(l.gather_grid[1]),
                      static_cast<unsigned>(l.gather_grid[2]));
      gather_kernel<<<grid, dim3(kernels::kGatherBlockX, kernels::kGatherBlockY), 0, stream>>>(l.gather_params);
    }
    err = cudaGetLastError();
    if (err != cudaSuccess) throw_cuda(err, "preprocess kernel launch failed");
  }
}

}  // namespace medge
