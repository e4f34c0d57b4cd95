// The few CUDA names the kernel bodies (preprocess_kernels.h) use, for a host
// C++ build that runs them without a GPU (preprocess_emulation.cpp): dim3,
// blockIdx / threadIdx / blockDim / gridDim as thread-locals the emulator sets,
// __half as a host fp16 type with the device's round-to-nearest-even, the
// vector types, and MEDGE_EMU_CHECK, which throws in emulation builds and
// compiles to nothing for the GPU. Under nvcc it only includes the real headers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define MEDGE_DEVICE_CODE 1

#else  // host emulation of the kernel bodies

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "medge/pixel_math.h"

#ifndef __host__
#define __host__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#ifndef __restrict__
#define __restrict__ __restrict
#endif

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  constexpr dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};
struct alignas(8) uint2 {
  uint32_t x, y;
};
struct alignas(8) float2 {
  float x, y;
};

// Set by the emulator before each (block, thread) runs a phase of a kernel body.
namespace medge {
namespace shim {
inline thread_local dim3 threadIdx_, blockIdx_, blockDim_, gridDim_;
}  // namespace shim
}  // namespace medge
#define threadIdx (::medge::shim::threadIdx_)
#define blockIdx (::medge::shim::blockIdx_)
#define blockDim (::medge::shim::blockDim_)
#define gridDim (::medge::shim::gridDim_)

// IEEE binary16 with the device conversion's rounding (nearest, ties to even).
struct __half {
  uint16_t bits;
};
struct alignas(4) __half2 {
  __half x, y;
};
inline __half __float2half_rn(float v) { return __half{::medge::detail::float_to_half_bits(v)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline float __expf(float v) { return std::exp(v); }

namespace medge {
namespace shim {
// A violated kernel invariant (read outside an image, shared memory out of
// range, a misaligned vector access...): the emulated launch stops with this.
class KernelFault : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};
[[noreturn]] inline void fault(const char* what, const char* file, int line) {
  throw KernelFault(std::string("emulated CUDA kernel: ") + what + " (" + file + ":" + std::to_string(line) + ")");
}
// The input buffers of the emulated launch (each image's [pixels, pixels + buffer_bytes)):
// every pixel load must lie inside one of them.
struct Readable {
  const char* begin;
  const char* end;
};
inline thread_local std::vector<Readable> readable_;
inline void check_read(const void* p, std::size_t bytes, const char* file, int line) {
  const char* b = static_cast<const char*>(p);
  for (const Readable& r : readable_)
    if (b >= r.begin && b + bytes <= r.end) return;
  fault("read outside every input image's buffer", file, line);
}
}  // namespace shim
}  // namespace medge

#define MEDGE_EMULATION 1

#endif

namespace medge {
namespace shim {
// clamp(v, 0, 1) in one instruction on the GPU (FFMA.SAT / FADD.SAT); NaN -> 0 on both sides.
#if defined(__CUDACC__)
__host__ __device__ __forceinline__ float saturate(float v) {
#if defined(__CUDA_ARCH__)
  return __saturatef(v);
#else
  return v > 0.0f ? (v < 1.0f ? v : 1.0f) : 0.0f;
#endif
}
#else
inline float saturate(float v) { return v > 0.0f ? (v < 1.0f ? v : 1.0f) : 0.0f; }
#endif
}  // namespace shim
}  // namespace medge

// Full unrolling of the short fixed-count loops (register arrays stay registers).
#if defined(__CUDACC__)
#define MEDGE_UNROLL _Pragma("unroll")
#elif defined(__GNUC__) && !defined(__clang__)
#define MEDGE_UNROLL _Pragma("GCC unroll 16")
#elif defined(__clang__)
#define MEDGE_UNROLL _Pragma("unroll")
#else
#define MEDGE_UNROLL
#endif

#if defined(MEDGE_EMULATION)
#define MEDGE_EMU_CHECK(cond, what)                                       \
  do {                                                                    \
    if (!(cond)) ::medge::shim::fault(what, __FILE__, __LINE__);          \
  } while (0)
#define MEDGE_EMU_CHECK_READ(ptr, bytes) ::medge::shim::check_read(ptr, bytes, __FILE__, __LINE__)
#else
#define MEDGE_EMU_CHECK(cond, what) \
  do {                              \
  } while (0)
#define MEDGE_EMU_CHECK_READ(ptr, bytes) \
  do {                                   \
  } while (0)
#endif
