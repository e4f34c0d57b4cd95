// Public C++ API of medge's volume preprocessing: a series of stored-value
// slices becomes a model's 3-D (or 2.5-D) input in one pass: Modality LUT per
// slice, VOI, polarity, trilinear or nearest resampling, crop/pad to the ROI,
// (y - mean) / std, float32/float16. The per-voxel maths is pixel_math.h's,
// shared with the 2-D path; no pybind11 here (bindings.cpp is the only file
// that knows about Python).
#pragma once

#include <cstdint>
#include <string>

#include "medge/pixel_math.h"
#include "medge/preprocess.h"

namespace medge {

// How the display values are resampled onto the output grid.
enum class VolumeInterpolation : int32_t {
  kTrilinear = 0,  // half-voxel centres, as PyTorch F.interpolate(mode="trilinear", align_corners=False)
  kNearest = 1,    // nearest voxel centre, as PyTorch mode="nearest-exact" (labels, masks)
};

// The input series: `depth` slices of height x width stored values, one
// Modality LUT (slope, intercept) per slice; everything else is shared.
struct VolumeParams {
  // Voxel (0, 0, 0); host memory for the CPU, device memory for CUDA.
  // Aligned to the element size (checked).
  const void* pixels = nullptr;
  int64_t buffer_bytes = 0;  // bytes readable from `pixels` (checked against the geometry)
  int64_t depth = 0, height = 0, width = 0;
  int64_t slice_stride = 0;  // elements between the starts of consecutive slices
  int64_t row_stride = 0;    // elements between the starts of consecutive rows (>= width)
  PixelType pixel_type = PixelType::kInt16;
  int32_t bits_stored = 0;  // meaningful low bits; 0 = all bits of the container
  bool is_signed = false;   // Pixel Representation 1
  // `depth` values each, host memory (also for CUDA): x = slope[z] * stored + intercept[z].
  const double* rescale_slopes = nullptr;
  const double* rescale_intercepts = nullptr;
  VoiMode voi_mode = VoiMode::kWindow;
  VoiFunction voi_function = VoiFunction::kLinear;
  double window_center = 0.0;
  double window_width = 1.0;
  double range_low = 0.0;
  double range_high = 1.0;
  bool invert = false;  // MONOCHROME1
};

// Axis order of every 3-element array below: 0 = slices (D), 1 = rows (H), 2 = columns (W).
struct VolumeOutputParams {
  int64_t resampled[3] = {0, 0, 0};  // size the input is resampled to (its field of view kept)
  int64_t size[3] = {0, 0, 0};       // output size: the ROI after crop / pad
  int64_t offset[3] = {0, 0, 0};     // output index of resampled voxel 0 (> 0 pads before, < 0 crops)
  VolumeInterpolation interpolation = VolumeInterpolation::kTrilinear;
  // 2.5-D: 0 gives a (1, 1, D, H, W) output; k > 0 gives (D, 2k + 1, H, W), channel c of
  // slice d being output slice clamp(d + c - k, 0, D - 1) (edge slices repeated).
  int32_t neighbours = 0;
  float pad_value = 0.0f;  // display domain [0, 1], before normalisation
  float mean = 0.0f;       // out = (y - mean) / std
  float std = 1.0f;
  OutputType output_type = OutputType::kFloat32;
};

constexpr int32_t kMaxNeighbours = 16;
constexpr int64_t kMaxVolumeOffset = int64_t{1} << 20;

// Elements / bytes of the output described by `out`.
int64_t volume_output_elements(const VolumeOutputParams& out);
int64_t volume_output_bytes(const VolumeOutputParams& out);

// CPU: multi-threaded (num_threads <= 0: every hardware thread); the result does
// not depend on the thread count, bit for bit. Throws InvalidArgument before
// touching memory, ResourceError when the system refuses a worker thread.
void preprocess_volume_cpu(const VolumeParams& volume, const VolumeOutputParams& out, void* output,
                           int64_t output_bytes, int num_threads);

// CUDA, in two steps so that the caller owns every allocation and copy:
// volume_cuda_tables writes the launch tables (per-slice transforms holding the
// device address `volume.pixels`, per-axis taps) into host memory of
// volume_cuda_table_bytes bytes; the caller copies them to device memory aligned
// to 16 bytes; preprocess_volume_cuda enqueues the kernel on `stream` and returns
// without synchronising. Throws InvalidArgument, or CudaError (also when the
// build has no CUDA).
int64_t volume_cuda_table_bytes(const VolumeParams& volume, const VolumeOutputParams& out);
void volume_cuda_tables(const VolumeParams& volume, const VolumeOutputParams& out, void* host_tables,
                        int64_t table_bytes);
void preprocess_volume_cuda(const VolumeParams& volume, const VolumeOutputParams& out, const void* device_tables,
                            int64_t table_bytes, void* output, int64_t output_bytes, cudaStream_t stream);

// Tests: the CUDA kernel's per-element function (volume_detail::element) run on
// the CPU over every output element, on host memory, single-threaded.
void preprocess_volume_emulated(const VolumeParams& volume, const VolumeOutputParams& out, void* output,
                                int64_t output_bytes);

namespace volume_detail {

using detail::PreparedImage;

// One output coordinate along one axis: value = w0 * v[i0] + w1 * v[i1]
// (i1 == i0 and w1 == 0 for a single tap); i0 < 0 marks padding.
struct Tap {
  int32_t i0, i1;
  float w0, w1;
};

// Where the launch tables lie inside one buffer (byte offsets), and what the
// kernel needs besides them.
struct Layout {
  int64_t slices;  // PreparedImage[depth]
  int64_t taps_z;  // Tap[size[0]]
  int64_t taps_y;  // Tap[size[1]]
  int64_t taps_x;  // Tap[size[2]]
  int64_t bytes;
};

// Each table starts 16-byte aligned.
inline Layout table_layout(int64_t depth, const int64_t (&size)[3]) {
  auto round16 = [](int64_t n) { return (n + 15) / 16 * 16; };
  Layout l{};
  l.slices = 0;
  l.taps_z = round16(static_cast<int64_t>(sizeof(PreparedImage)) * depth);
  l.taps_y = l.taps_z + round16(static_cast<int64_t>(sizeof(Tap)) * size[0]);
  l.taps_x = l.taps_y + round16(static_cast<int64_t>(sizeof(Tap)) * size[1]);
  l.bytes = l.taps_x + round16(static_cast<int64_t>(sizeof(Tap)) * size[2]);
  return l;
}

struct KernelArgs {
  const PreparedImage* slices;
  const Tap* taps_z;
  const Tap* taps_y;
  const Tap* taps_x;
  void* output;
  int64_t total;  // output elements
  int32_t size_d, size_h, size_w;
  int32_t channels;  // 1 (3-D) or 2k + 1 (2.5-D)
  int32_t neighbours;
  int32_t half;  // output float16
  float pad_value, mean, inv_std;
};

MEDGE_HD float display_at(const PreparedImage& im, int32_t y, int32_t x, PixelType type) {
  const int64_t at = static_cast<int64_t>(y) * im.row_stride + x;
  switch (type) {
    case PixelType::kUInt8: return detail::display_value(im, detail::centred_value<uint8_t>(im, static_cast<const uint8_t*>(im.pixels)[at]));
    case PixelType::kUInt16: return detail::display_value(im, detail::centred_value<uint16_t>(im, static_cast<const uint16_t*>(im.pixels)[at]));
    case PixelType::kInt16: return detail::display_value(im, detail::centred_value<int16_t>(im, static_cast<const int16_t*>(im.pixels)[at]));
    case PixelType::kInt32: return detail::display_value(im, detail::centred_value<int32_t>(im, static_cast<const int32_t*>(im.pixels)[at]));
    case PixelType::kFloat32: return detail::display_value(im, detail::centred_value<float>(im, static_cast<const float*>(im.pixels)[at]));
  }
  return 0.0f;
}

// One slice resampled at (ty, tx): rows first, then columns, the CPU path's order.
MEDGE_HD float plane_value(const PreparedImage& im, const Tap& ty, const Tap& tx) {
  const PixelType type = im.pixel_type;
  float v0 = ty.w0 * display_at(im, ty.i0, tx.i0, type);
  if (ty.w1 != 0.0f) v0 += ty.w1 * display_at(im, ty.i1, tx.i0, type);
  float value = tx.w0 * v0;
  if (tx.w1 != 0.0f) {
    float v1 = ty.w0 * display_at(im, ty.i0, tx.i1, type);
    if (ty.w1 != 0.0f) v1 += ty.w1 * display_at(im, ty.i1, tx.i1, type);
    value += tx.w1 * v1;
  }
  return value;
}

// Display value (before normalisation) of output slice `od`, row `oy`, column `ox`.
MEDGE_HD float display_element(const KernelArgs& a, int32_t od, int32_t oy, int32_t ox) {
  const Tap tz = a.taps_z[od], ty = a.taps_y[oy], tx = a.taps_x[ox];
  if (tz.i0 < 0 || ty.i0 < 0 || tx.i0 < 0) return a.pad_value;
  float value = tz.w0 * plane_value(a.slices[tz.i0], ty, tx);
  if (tz.w1 != 0.0f) value += tz.w1 * plane_value(a.slices[tz.i1], ty, tx);
  return value;
}

// Output element e (flat index into the (1, 1, D, H, W) or (D, C, H, W) output):
// its normalised value.
MEDGE_HD float element(const KernelArgs& a, int64_t e) {
  const int32_t ox = static_cast<int32_t>(e % a.size_w);
  int64_t rest = e / a.size_w;
  const int32_t oy = static_cast<int32_t>(rest % a.size_h);
  rest /= a.size_h;
  int32_t od;
  if (a.neighbours == 0) {
    od = static_cast<int32_t>(rest);
  } else {
    const int32_t c = static_cast<int32_t>(rest % a.channels);
    const int64_t d = rest / a.channels;
    int64_t s = d + c - a.neighbours;
    s = s < 0 ? 0 : (s >= a.size_d ? a.size_d - 1 : s);
    od = static_cast<int32_t>(s);
  }
  return (display_element(a, od, oy, ox) - a.mean) * a.inv_std;
}

}  // namespace volume_detail
}  // namespace medge
