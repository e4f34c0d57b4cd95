// Validation of the public parameters and their folding into PreparedImage,
// shared by the CPU and CUDA entry points. All DICOM arithmetic that can be
// done once per image happens here, in double precision.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>

#include "medge/pixel_math.h"
#include "medge/preprocess.h"

namespace medge {
namespace detail {
namespace {

[[noreturn]] void fail_image(int64_t index, const std::string& what) {
  std::ostringstream msg;
  msg << "image " << index << ": " << what;
  throw InvalidArgument(msg.str());
}

int32_t container_bits(PixelType type) { return static_cast<int32_t>(pixel_type_size(type) * 8); }

bool is_valid_pixel_type(PixelType type) {
  const int32_t v = static_cast<int32_t>(type);
  return v >= 0 && v <= static_cast<int32_t>(PixelType::kFloat32);
}

// Round half up, the rule the Python reference documents for letterbox sizes.
int64_t round_half_up(double v) { return static_cast<int64_t>(std::floor(v + 0.5)); }

}  // namespace

void validate_output(const OutputParams& out) {
  if (out.height <= 0 || out.width <= 0 || out.height > kMaxOutputSide || out.width > kMaxOutputSide) {
    std::ostringstream msg;
    msg << "output size " << out.height << " x " << out.width << " must be within 1.." << kMaxOutputSide;
    throw InvalidArgument(msg.str());
  }
  if (out.channels != 1 && out.channels != 3) throw InvalidArgument("output channels must be 1 or 3");
  if (out.fit != Fit::kStretch && out.fit != Fit::kLetterbox) throw InvalidArgument("unknown fit mode");
  if (out.resample != Resample::kBilinear && out.resample != Resample::kBilinearAntialias)
    throw InvalidArgument("unknown resample mode");
  if (out.output_type != OutputType::kFloat32 && out.output_type != OutputType::kFloat16)
    throw InvalidArgument("unknown output type");
  if (!std::isfinite(out.pad_value)) throw InvalidArgument("pad value must be finite");
  // Display values lie in [0, 1] (every VOI shape is clamped or a sigmoid,
  // resampling weights are convex) or are the pad value, so the output's
  // extremes are at lo and hi below. The kernels compute (y - mean) * (1/std)
  // in float, so both the difference and the product must stay finite. The
  // float32 bounds keep a relative margin for the kernels' float rounding;
  // float16 overflows only at 65520, 2.4e-4 above its largest finite value,
  // far more than that rounding.
  const double lo = std::min(0.0, static_cast<double>(out.pad_value));
  const double hi = std::max(1.0, static_cast<double>(out.pad_value));
  const bool half = out.output_type == OutputType::kFloat16;
  const double float32_limit = kFloat32Max / (1.0 + 1e-5);
  const double limit = half ? kFloat16Max : float32_limit;
  for (int c = 0; c < out.channels; ++c) {
    if (!std::isfinite(out.mean[c]) || !std::isfinite(out.std[c]) || out.std[c] == 0.0f)
      throw InvalidArgument("normalisation mean must be finite and std finite and non-zero");
    const float inv_std = 1.0f / out.std[c];
    const double diff = std::max(std::fabs(lo - out.mean[c]), std::fabs(hi - out.mean[c]));
    const double worst = diff * std::fabs(inv_std);
    if (!std::isfinite(inv_std) || !(diff <= float32_limit) || !(worst <= limit)) {
      std::ostringstream msg;
      msg << "normalisation (y - mean) / std of channel " << c << " reaches " << worst << " for display values in ["
          << lo << ", " << hi << "] (pad value included), beyond the largest finite " << (half ? "float16" : "float32")
          << " (" << (half ? kFloat16Max : kFloat32Max) << "); use a larger std, a mean nearer [0, 1], or float32";
      throw InvalidArgument(msg.str());
    }
  }
}

void check_output_buffer(const void* output, int64_t output_bytes, const OutputParams& out, int64_t count) {
  if (output == nullptr) throw InvalidArgument("output pointer is null");
  const int64_t elem = output_type_size(out.output_type);
  if (reinterpret_cast<std::uintptr_t>(output) % static_cast<std::uintptr_t>(elem) != 0) {
    std::ostringstream msg;
    msg << "output pointer is not aligned to its " << elem << "-byte element size";
    throw InvalidArgument(msg.str());
  }
  const int64_t needed = output_bytes_required(out, count);
  if (output_bytes < needed) {
    std::ostringstream msg;
    msg << "output buffer holds " << output_bytes << " bytes but " << count << " images need " << needed;
    throw InvalidArgument(msg.str());
  }
}

PreparedImage prepare_image(const ImageParams& image, const OutputParams& out, int64_t index) {
  PreparedImage p{};
  if (image.pixels == nullptr) fail_image(index, "pixel pointer is null");
  if (!is_valid_pixel_type(image.pixel_type)) fail_image(index, "unknown pixel type");
  if (image.height <= 0 || image.width <= 0 || image.height > kMaxImageSide || image.width > kMaxImageSide) {
    std::ostringstream msg;
    msg << "size " << image.height << " x " << image.width << " must be within 1.." << kMaxImageSide;
    fail_image(index, msg.str());
  }
  if (image.row_stride < image.width || image.row_stride > kMaxImageSide * 16)
    fail_image(index, "row stride must be at least the width and at most 2^20 elements");
  const int64_t elem = pixel_type_size(image.pixel_type);
  // The kernels load whole elements through typed pointers: a misaligned one
  // is undefined behaviour on the CPU (the vectoriser may assume alignment)
  // and a sticky misaligned-address fault on the GPU. Python copies such
  // arrays; callers of the C++ API get this error instead of a wrong load.
  if (reinterpret_cast<std::uintptr_t>(image.pixels) % static_cast<std::uintptr_t>(elem) != 0) {
    std::ostringstream msg;
    msg << "pixel pointer is not aligned to its " << elem << "-byte element size";
    fail_image(index, msg.str());
  }
  const int64_t needed = ((image.height - 1) * image.row_stride + image.width) * elem;
  if (image.buffer_bytes < needed) {
    std::ostringstream msg;
    msg << "buffer holds " << image.buffer_bytes << " bytes but " << image.height << " x " << image.width
        << " with row stride " << image.row_stride << " needs " << needed;
    fail_image(index, msg.str());
  }

  p.pixels = image.pixels;
  p.row_stride = image.row_stride;
  p.in_height = static_cast<int32_t>(image.height);
  p.in_width = static_cast<int32_t>(image.width);
  p.pixel_type = image.pixel_type;
  p.invert = image.invert ? 1 : 0;

  // Stored-value decoding (PS3.3 C.7.6.3.1): only Bits Stored low bits count.
  if (image.pixel_type != PixelType::kFloat32) {
    const int32_t bits = container_bits(image.pixel_type);
    const int32_t stored = image.bits_stored == 0 ? bits : image.bits_stored;
    if (stored < 1 || stored > bits) {
      std::ostringstream msg;
      msg << "bits stored " << image.bits_stored << " must be within 1.." << bits << " for this pixel type";
      fail_image(index, msg.str());
    }
    p.value_mask = stored == 32 ? 0xFFFFFFFFu : ((1u << stored) - 1u);
    p.sign_bit = image.is_signed ? (1u << (stored - 1)) : 0u;
  }

  // Modality LUT then VOI, folded into u(stored) = a * (stored - s0) + u0
  // followed by a shape (see PreparedImage), all in double here. x0 is the
  // modality value at the transform's centre, s0 the stored value there.
  const double m = image.rescale_slope;
  const double b = image.rescale_intercept;
  if (!std::isfinite(m) || !std::isfinite(b) || m == 0.0)
    fail_image(index, "rescale slope must be finite and non-zero, intercept finite");
  double a = 0.0, x0 = 0.0, u0 = 0.0;
  if (image.voi_mode == VoiMode::kWindow) {
    const double c = image.window_center;
    const double w = image.window_width;
    if (!std::isfinite(c) || !std::isfinite(w) || w <= 0.0)
      fail_image(index, "window centre must be finite and window width finite and > 0");
    switch (image.voi_function) {
      case VoiFunction::kLinear:
        // PS3.3 C.11.2.1.2.1: y = (x - (c - 0.5)) / (w - 1) + 0.5, clamped to [0, 1].
        if (w < 1.0) fail_image(index, "window width must be >= 1 for VOI LUT Function LINEAR");
        x0 = c - 0.5;
        if (w == 1.0) {
          p.shape = Shape::kStep;  // x <= c - 0.5 -> 0, else 1: the sign of x - x0
          a = m;
          u0 = 0.0;
        } else {
          p.shape = Shape::kClamp;
          a = m / (w - 1.0);
          u0 = 0.5;
        }
        break;
      case VoiFunction::kLinearExact:
        // C.11.2.1.3.2: y = (x - c) / w + 0.5, clamped.
        p.shape = Shape::kClamp;
        x0 = c;
        a = m / w;
        u0 = 0.5;
        break;
      case VoiFunction::kSigmoid:
        // C.11.2.1.3.1: y = 1 / (1 + exp(-4 (x - c) / w)).
        p.shape = Shape::kSigmoid;
        x0 = c;
        a = m / w;
        u0 = 0.0;
        break;
      default:
        fail_image(index, "unknown VOI LUT function");
    }
  } else if (image.voi_mode == VoiMode::kRange) {
    const double lo = image.range_low, hi = image.range_high;
    if (!std::isfinite(lo) || !std::isfinite(hi) || !(hi > lo))
      fail_image(index, "value range must be finite with high > low");
    p.shape = Shape::kClamp;  // y = (x - lo) / (hi - lo), clamped
    x0 = 0.5 * (lo + hi);
    a = m / (hi - lo);
    u0 = 0.5;
  } else {
    fail_image(index, "unknown VOI mode");
  }
  const double s0 = (x0 - b) / m;
  if (!std::isfinite(a) || a == 0.0 || !std::isfinite(s0))
    fail_image(index, "rescale and window parameters overflow double precision");
  p.scale = static_cast<float>(a);
  if (!std::isfinite(p.scale) || p.scale == 0.0f)
    fail_image(index, "rescale and window parameters exceed float precision");
  p.offset = static_cast<float>(u0);

  // The pivot must fit the kernels' integer arithmetic (int32 for 8/16-bit
  // containers, int64 for int32): stored values lie within +-2^16 or +-2^32,
  // so bounding it to +-2^24 or +-2^40 keeps (stored - pivot) exact, and frac
  // carries the rest: such centres are far outside the data, which saturates.
  const double bound = image.pixel_type == PixelType::kInt32 ? 1099511627776.0 /* 2^40 */ : 16777216.0 /* 2^24 */;
  const double centre = std::max(-bound, std::min(bound, s0));
  if (image.pixel_type == PixelType::kFloat32) {
    p.pivot = 0;
    p.pivot_float = static_cast<float>(centre);
    p.frac = static_cast<float>(s0 - static_cast<double>(p.pivot_float));
  } else {
    p.pivot = static_cast<int64_t>(std::llround(centre));
    p.pivot_float = 0.0f;
    p.frac = static_cast<float>(s0 - static_cast<double>(p.pivot));
  }

  // Geometry.
  if (out.fit == Fit::kLetterbox) {
    const double s = std::min(static_cast<double>(out.height) / image.height,
                              static_cast<double>(out.width) / image.width);
    int64_t rh = round_half_up(image.height * s), rw = round_half_up(image.width * s);
    rh = std::max<int64_t>(1, std::min<int64_t>(rh, out.height));
    rw = std::max<int64_t>(1, std::min<int64_t>(rw, out.width));
    p.region_height = static_cast<int32_t>(rh);
    p.region_width = static_cast<int32_t>(rw);
    p.region_top = static_cast<int32_t>((out.height - rh) / 2);
    p.region_left = static_cast<int32_t>((out.width - rw) / 2);
  } else {
    p.region_height = static_cast<int32_t>(out.height);
    p.region_width = static_cast<int32_t>(out.width);
    p.region_top = 0;
    p.region_left = 0;
  }
  return p;
}

}  // namespace detail

int64_t output_bytes_required(const OutputParams& out, int64_t count) {
  return count * out.channels * out.height * out.width * output_type_size(out.output_type);
}

}  // namespace medge
