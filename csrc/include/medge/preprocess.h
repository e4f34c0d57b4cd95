// Public C++ API of medge's fused DICOM preprocessing: plain structs and two
// entry points (CPU and CUDA) that turn a batch of stored-value images into an
// NCHW float32/float16 tensor in one pass. No pybind11 here: bindings.cpp is
// the only file that knows about Python.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

// cudaStream_t without pulling in the CUDA headers (identical to the typedef in
// driver_types.h; C++ allows the redeclaration), so CPU-only builds compile.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace medge {

// Container type of the stored values handed to the kernels.
enum class PixelType : int32_t { kUInt8 = 0, kUInt16 = 1, kInt16 = 2, kInt32 = 3, kFloat32 = 4 };

// How modality values become display values in [0, 1] (DICOM PS3.3 C.11.2).
enum class VoiMode : int32_t {
  kWindow = 0,  // window centre/width with a VOI LUT Function
  kRange = 1,   // fixed modality-value range [range_low, range_high] -> [0, 1], clamped
};

enum class VoiFunction : int32_t { kLinear = 0, kLinearExact = 1, kSigmoid = 2 };

enum class Fit : int32_t {
  kStretch = 0,    // scale each axis independently to the output size
  kLetterbox = 1,  // keep the aspect ratio, centre, pad the rest with pad_value
};

enum class Resample : int32_t {
  kBilinear = 0,           // half-pixel centres (PyTorch align_corners=False, OpenCV INTER_LINEAR)
  kBilinearAntialias = 1,  // triangle filter widened by the scale on shrinking axes (torchvision antialias=True)
};

enum class OutputType : int32_t { kFloat32 = 0, kFloat16 = 1 };

// One image (one frame) of the batch: where its stored values are and what
// they mean. Everything that comes from the DICOM header is per image, so a
// batch may mix series.
struct ImageParams {
  // First stored value; host memory for CPU, device for CUDA. Must be aligned
  // to the element size (checked): the kernels load whole elements, which a
  // misaligned pointer makes undefined behaviour (and a fault on the GPU).
  const void* pixels = nullptr;
  int64_t buffer_bytes = 0;      // bytes readable from `pixels` (checked against the geometry)
  int64_t height = 0;
  int64_t width = 0;
  int64_t row_stride = 0;        // elements between the starts of consecutive rows (>= width)
  PixelType pixel_type = PixelType::kUInt16;
  int32_t bits_stored = 0;       // meaningful low bits; 0 = all bits of the container
  bool is_signed = false;        // Pixel Representation 1: two's complement in bits_stored bits
  double rescale_slope = 1.0;    // Modality LUT: x = slope * stored + intercept
  double rescale_intercept = 0.0;
  VoiMode voi_mode = VoiMode::kWindow;
  VoiFunction voi_function = VoiFunction::kLinear;
  double window_center = 0.0;
  double window_width = 1.0;
  double range_low = 0.0;        // VoiMode::kRange
  double range_high = 1.0;
  bool invert = false;           // MONOCHROME1: y' = 1 - y after VOI
};

// What every image of the batch becomes: shared by the whole batch.
struct OutputParams {
  int64_t height = 0;
  int64_t width = 0;
  int32_t channels = 1;         // 1, or 3 (the grey value replicated, normalised per channel)
  Fit fit = Fit::kStretch;
  float pad_value = 0.0f;       // letterbox padding, in the display domain [0, 1] before normalisation
  Resample resample = Resample::kBilinear;
  float mean[3] = {0.0f, 0.0f, 0.0f};  // out = (y - mean[c]) / std[c]
  float std[3] = {1.0f, 1.0f, 1.0f};
  OutputType output_type = OutputType::kFloat32;
};

// Bad arguments (sizes, pointers, parameters). Raised before anything is read or written.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// The system refused a resource the CPU path needs: a worker thread (process or
// thread limit, memory for its stack) or memory.
class ResourceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A CUDA runtime call or kernel launch failed.
class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Size limits the entry points enforce (decompression bombs and int overflow
// are stopped here even when the Python layer is bypassed).
constexpr int64_t kMaxImageSide = 1 << 16;   // per input axis
constexpr int64_t kMaxOutputSide = 1 << 14;  // per output axis
constexpr int64_t kMaxBatch = 1 << 16;

inline int64_t pixel_type_size(PixelType type) {
  switch (type) {
    case PixelType::kUInt8: return 1;
    case PixelType::kUInt16: return 2;
    case PixelType::kInt16: return 2;
    case PixelType::kInt32: return 4;
    case PixelType::kFloat32: return 4;
  }
  return 0;
}

inline int64_t output_type_size(OutputType type) { return type == OutputType::kFloat16 ? 2 : 4; }

// Bytes of the NCHW output for `count` images.
int64_t output_bytes_required(const OutputParams& out, int64_t count);

// Largest finite value of each output type: OutputParams whose normalisation
// can exceed it ((y - mean) / std over y in [min(0, pad), max(1, pad)]) are
// refused, so a valid spec never writes inf.
constexpr double kFloat32Max = 3.4028234663852886e38;
constexpr double kFloat16Max = 65504.0;

// CPU: writes images[i] at batch index i of `output` (host, `output_bytes` long,
// aligned to the output element size). num_threads <= 0 uses every hardware
// thread. Throws InvalidArgument, or ResourceError when the system refuses a
// worker thread (the threads already started are joined first).
void preprocess_cpu(const ImageParams* images, int64_t count, const OutputParams& out, void* output,
                    int64_t output_bytes, int num_threads);

// Which CPU code path preprocess_cpu runs here (chosen once from CPUID;
// MEDGE_CPU_BASELINE=1 in the environment forces the portable one).
std::string cpu_kernel_variant();

// True when this build contains the CUDA implementation.
bool cuda_compiled();

// Number of visible CUDA devices; 0 when CUDA is not compiled in, or there is
// no driver or no device (never throws).
int cuda_device_count();

// Why CUDA is or is not usable: "N CUDA device(s)", or the CUDA error (e.g.
// cudaErrorInsufficientDriver when the driver is older than the runtime needs).
std::string cuda_status();

// Architectures this build embeds (e.g. "75;80;86;87;89;90;90-virtual"), empty without CUDA.
std::string cuda_architectures();

// CUDA: same contract (alignment included) with device pointers, enqueued on `stream`; returns
// without synchronising. Throws InvalidArgument, or CudaError (also when the
// build has no CUDA).
void preprocess_cuda(const ImageParams* images, int64_t count, const OutputParams& out, void* output,
                     int64_t output_bytes, cudaStream_t stream);

}  // namespace medge
