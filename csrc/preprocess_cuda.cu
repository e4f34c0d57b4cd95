// CUDA implementation of the fused preprocessing: one launch per chunk of up
// to kImagesPerLaunch images, one thread per output pixel. Each thread
// gathers its resampling taps straight from the stored values, applies the
// Modality LUT / VOI / polarity per tap (pixel_math.h, shared with the CPU
// path), normalises and writes every channel. Per-image parameters travel by
// value in the kernel's parameter space (no device allocation, no H2D copy),
// which also keeps the launch capturable in a CUDA graph.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <sstream>
#include <vector>

#include "medge/pixel_math.h"
#include "medge/preprocess.h"

#ifndef MEDGE_CUDA_ARCHITECTURES
#define MEDGE_CUDA_ARCHITECTURES ""
#endif

namespace medge {
namespace {

using detail::AxisTaps;
using detail::PreparedImage;

constexpr int kImagesPerLaunch = 32;
constexpr int kBlockX = 32;
constexpr int kBlockY = 8;

struct KernelOutput {
  void* data;
  int64_t first_image;  // batch index of the chunk's first image
  int32_t height, width, channels;
  int32_t output_type;
  int32_t antialias;
  float pad_value;
  float mean[3];
  float inv_std[3];
};

struct LaunchParams {
  KernelOutput out;
  PreparedImage images[kImagesPerLaunch];
};

// The classic 4 KB kernel parameter limit holds on every architecture we target.
static_assert(sizeof(LaunchParams) <= 4000, "kernel parameters exceed the 4 KB launch limit");

template <typename T>
__device__ float resample_display(const PreparedImage& im, int32_t ry, int32_t rx, bool antialias) {
  const AxisTaps ty = detail::axis_taps(ry, im.region_height, im.in_height, antialias);
  const AxisTaps tx = detail::axis_taps(rx, im.region_width, im.in_width, antialias);
  float wx_total = 0.0f;
  for (int32_t kx = 0; kx < tx.count; ++kx) wx_total += detail::tap_weight(tx, kx);
  float acc = 0.0f, wy_total = 0.0f;
  for (int32_t ky = 0; ky < ty.count; ++ky) {
    const float wy = detail::tap_weight(ty, ky);
    if (wy == 0.0f) continue;
    wy_total += wy;
    float row = 0.0f;
    for (int32_t kx = 0; kx < tx.count; ++kx) {
      const float wx = detail::tap_weight(tx, kx);
      if (wx != 0.0f) row += wx * detail::load_display<T>(im, ty.first + ky, tx.first + kx);
    }
    acc += wy * row;
  }
  return acc / (wy_total * wx_total);
}

__global__ void preprocess_kernel(const __grid_constant__ LaunchParams params) {
  const int32_t x = blockIdx.x * kBlockX + threadIdx.x;
  const int32_t y = blockIdx.y * kBlockY + threadIdx.y;
  const KernelOutput& out = params.out;
  if (x >= out.width || y >= out.height) return;
  const PreparedImage& im = params.images[blockIdx.z];

  const int32_t ry = y - im.region_top;
  const int32_t rx = x - im.region_left;
  float display = out.pad_value;
  if (ry >= 0 && ry < im.region_height && rx >= 0 && rx < im.region_width) {
    const bool aa = out.antialias != 0;
    switch (im.pixel_type) {  // uniform per block: blockIdx.z is one image
      case PixelType::kUInt8: display = resample_display<uint8_t>(im, ry, rx, aa); break;
      case PixelType::kUInt16: display = resample_display<uint16_t>(im, ry, rx, aa); break;
      case PixelType::kInt16: display = resample_display<int16_t>(im, ry, rx, aa); break;
      case PixelType::kInt32: display = resample_display<int32_t>(im, ry, rx, aa); break;
      case PixelType::kFloat32: display = resample_display<float>(im, ry, rx, aa); break;
    }
  }
  const int64_t n = out.first_image + blockIdx.z;
  const int64_t plane = static_cast<int64_t>(out.height) * out.width;
  const int64_t pixel = static_cast<int64_t>(y) * out.width + x;
  for (int32_t c = 0; c < out.channels; ++c) {
    const float v = (display - out.mean[c]) * out.inv_std[c];
    const int64_t index = (n * out.channels + c) * plane + pixel;
    if (out.output_type == static_cast<int32_t>(OutputType::kFloat16)) {
      static_cast<__half*>(out.data)[index] = __float2half_rn(v);
    } else {
      static_cast<float*>(out.data)[index] = v;
    }
  }
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

  LaunchParams params{};
  params.out.data = output;
  params.out.height = static_cast<int32_t>(out.height);
  params.out.width = static_cast<int32_t>(out.width);
  params.out.channels = out.channels;
  params.out.output_type = static_cast<int32_t>(out.output_type);
  params.out.antialias = out.resample == Resample::kBilinearAntialias ? 1 : 0;
  params.out.pad_value = out.pad_value;
  for (int c = 0; c < 3; ++c) {
    params.out.mean[c] = out.mean[c];
    params.out.inv_std[c] = 1.0f / out.std[c];
  }
  const dim3 block(kBlockX, kBlockY, 1);
  for (int64_t first = 0; first < count; first += kImagesPerLaunch) {
    const int64_t chunk = std::min<int64_t>(kImagesPerLaunch, count - first);
    params.out.first_image = first;
    for (int64_t k = 0; k < chunk; ++k) params.images[k] = prepared[static_cast<size_t>(first + k)];
    const dim3 grid(static_cast<unsigned>((out.width + kBlockX - 1) / kBlockX),
                    static_cast<unsigned>((out.height + kBlockY - 1) / kBlockY), static_cast<unsigned>(chunk));
    preprocess_kernel<<<grid, block, 0, stream>>>(params);
    err = cudaGetLastError();
    if (err != cudaSuccess) throw_cuda(err, "preprocess kernel launch failed");
  }
}

}  // namespace medge
