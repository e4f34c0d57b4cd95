// Per-pixel maths shared by the CPU and CUDA implementations, compiled by both
// the host compiler and nvcc, so the two paths compute the same function. The
// DICOM parameters are folded on the host (double precision) into a float
// affine map around an integer pivot; see prepare_image() in prepare.cpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "medge/preprocess.h"

#if defined(__CUDACC__)
#define MEDGE_HD __host__ __device__ __forceinline__
#else
#define MEDGE_HD inline
#endif

namespace medge {
namespace detail {

// How the affine value u becomes the display value y in [0, 1].
enum class Shape : int32_t {
  kClamp = 0,    // LINEAR (width > 1), LINEAR_EXACT, fixed range: y = clamp(u, 0, 1)
  kStep = 1,     // LINEAR with width == 1: y = u > 0
  kSigmoid = 2,  // SIGMOID: y = 1 / (1 + exp(-4 u))
};

// One image, ready for the kernels: geometry, decoding and value transform.
struct PreparedImage {
  const void* pixels;
  int64_t row_stride;
  int32_t in_height, in_width;
  PixelType pixel_type;
  Shape shape;
  int32_t invert;
  // Stored-value decoding for integer containers: keep bits_stored low bits,
  // then sign-extend when sign_bit != 0.
  uint32_t value_mask;
  uint32_t sign_bit;
  // u = ((stored - pivot) - frac) * scale + offset, where pivot + frac is the
  // stored value s0 at the transform's centre (window centre, range middle),
  // pivot an integer and |frac| <= 0.5, and offset = u(s0) is 0 or 0.5.
  // (stored - pivot) is exact in float for every value that is not clamped
  // anyway, and the float error of u is ~1e-7 of the display range however
  // steep the window and however far from zero the data (int32 included).
  int64_t pivot;      // integer containers
  float pivot_float;  // float32 container
  float frac;
  float scale;
  float offset;
  // Where the image lands in the output (letterbox region; whole output for stretch).
  int32_t region_top, region_left, region_height, region_width;
};

// Turns validated public parameters into a PreparedImage. Host only.
// Throws InvalidArgument with a message that names the image index.
PreparedImage prepare_image(const ImageParams& image, const OutputParams& out, int64_t index);
void validate_output(const OutputParams& out);
// Output pointer non-null, aligned to the output element size, and at least
// output_bytes_required(out, count) long. Host only; throws InvalidArgument.
void check_output_buffer(const void* output, int64_t output_bytes, const OutputParams& out, int64_t count);

template <typename T>
struct Wide {
  using type = int32_t;
};
template <>
struct Wide<int32_t> {
  using type = int64_t;  // an int32 container needs 64-bit room for masking and the pivot difference
};

// Stored value -> (stored - pivot) as float, honouring Bits Stored and Pixel Representation.
template <typename T>
MEDGE_HD float centred_value(const PreparedImage& im, T raw) {
  using W = typename Wide<T>::type;
  // Reinterpret the container's bits as unsigned, keep the stored bits, then
  // sign-extend branch-free: (v ^ s) - s flips the sign bit's weight from +s
  // to -s, and is the identity when sign_bit is 0 (unsigned).
  const uint32_t bits = static_cast<uint32_t>(static_cast<typename std::make_unsigned<T>::type>(raw)) & im.value_mask;
  const W value = static_cast<W>(bits ^ im.sign_bit) - static_cast<W>(im.sign_bit);
  return static_cast<float>(value - static_cast<W>(im.pivot));
}

template <>
MEDGE_HD float centred_value<float>(const PreparedImage& im, float raw) {
  return raw - im.pivot_float;
}

// a < b ? a : b and a > b ? a : b keep the first operand (u) when it is NaN,
// exactly like the comparisons they replace, and vectorise on every target.
MEDGE_HD float fminf_fast(float a, float b) { return b < a ? b : a; }
MEDGE_HD float fmaxf_fast(float a, float b) { return b > a ? b : a; }

// VOI shape applied to the affine value u.
template <Shape S>
MEDGE_HD float apply_shape(float u) {
  // min/max rather than nested conditionals: they map to vector min/max instructions.
  if (S == Shape::kClamp) return fminf_fast(fmaxf_fast(u, 0.0f), 1.0f);
  if (S == Shape::kStep) return u > 0.0f ? 1.0f : 0.0f;
#if defined(__CUDA_ARCH__)
  return 1.0f / (1.0f + __expf(-4.0f * u));
#else
  return 1.0f / (1.0f + std::exp(-4.0f * u));
#endif
}

// Centred value -> display value in [0, 1] (VOI then polarity).
MEDGE_HD float display_value(const PreparedImage& im, float centred) {
  const float u = (centred - im.frac) * im.scale + im.offset;
  float y;
  if (im.shape == Shape::kClamp) {
    y = apply_shape<Shape::kClamp>(u);
  } else if (im.shape == Shape::kStep) {
    y = apply_shape<Shape::kStep>(u);
  } else {
    y = apply_shape<Shape::kSigmoid>(u);
  }
  return im.invert ? 1.0f - y : y;
}

template <typename T>
MEDGE_HD float load_display(const PreparedImage& im, int64_t y, int64_t x) {
  const T* row = static_cast<const T*>(im.pixels) + y * im.row_stride;
  return display_value(im, centred_value<T>(im, row[x]));
}

// Taps of one output coordinate along one axis. `antialias` applies only
// when shrinking (in_size > region); otherwise plain half-pixel bilinear.
//
// Coordinates are exact: output d of a region of `region` pixels maps to the
// input coordinate (2d + 1) * in / (2 * region) (pixel centres), a ratio of
// integers, so its integer part and remainder are computed in int64 and only
// the final fraction is rounded, once, to float. Float32 coordinates would
// lose ~1e-3 of a pixel at 65536-pixel sizes and differ between compilers
// (FMA contraction); these are identical on CPU and GPU at every size.
struct AxisTaps {
  int32_t first;     // first input index
  int32_t count;     // number of taps
  int32_t center_i;  // antialias: filter centre = center_i + center_f (input pixels);
  float center_f;    // bilinear: center_f is the weight of the second tap
  float inv_support;  // antialias: 1 / support (support = in / region); 0 for bilinear
};

MEDGE_HD AxisTaps axis_taps(int32_t dst, int32_t region, int32_t in_size, bool antialias) {
  AxisTaps t;
  const int64_t den = 2 * static_cast<int64_t>(region);
  const int64_t num = (2 * static_cast<int64_t>(dst) + 1) * in_size;  // centre * den
  if (antialias && in_size > region) {
    // As PyTorch's _upsample_bilinear2d_aa: support = scale = in / region,
    // taps in [int(centre - support + 0.5), int(centre + support + 0.5)).
    t.center_i = static_cast<int32_t>(num / den);
    t.center_f = static_cast<float>(num % den) / static_cast<float>(den);
    // lo = floor(centre - support + 0.5) = floor((num - 2 in + region) / den), clamped at 0.
    const int64_t lo_num = num - 2 * static_cast<int64_t>(in_size) + region;
    int64_t lo = lo_num <= 0 ? 0 : lo_num / den;
    // hi = floor(centre + support + 0.5) = floor((num + 2 in + region) / den), clamped at in_size.
    int64_t hi = (num + 2 * static_cast<int64_t>(in_size) + region) / den;
    if (hi > in_size) hi = in_size;
    t.first = static_cast<int32_t>(lo);
    t.count = static_cast<int32_t>(hi - lo);
    t.inv_support = static_cast<float>(region) / static_cast<float>(in_size);
  } else {
    // src = centre - 0.5 = (num - region) / den, clamped at 0 (PyTorch align_corners=False).
    const int64_t src_num = num - region;
    const int64_t i0 = src_num <= 0 ? 0 : src_num / den;
    t.center_i = 0;
    t.inv_support = 0.0f;
    if (i0 >= in_size - 1) {
      // At (or past) the last sample the edge value is taken whole, as PyTorch does.
      t.first = in_size - 1;
      t.count = 1;
      t.center_f = 0.0f;
    } else {
      t.first = static_cast<int32_t>(i0);
      t.count = 2;
      t.center_f = src_num <= 0 ? 0.0f : static_cast<float>(src_num % den) / static_cast<float>(den);
    }
  }
  return t;
}

// Unnormalised weight of tap k (input index t.first + k).
MEDGE_HD float tap_weight(const AxisTaps& t, int32_t k) {
  if (t.inv_support == 0.0f) return k == 0 ? 1.0f - t.center_f : t.center_f;
  // Distance from the centre in exact integer pixels plus a small float part.
  float d = (static_cast<float>(t.first + k - t.center_i) + (0.5f - t.center_f)) * t.inv_support;
  d = d < 0.0f ? -d : d;
  return d < 1.0f ? 1.0f - d : 0.0f;
}

// axis_taps in 32-bit unsigned arithmetic, for the GPU (where a 64-bit
// division is a long software routine): the same integers, hence the same
// taps, for every size the entry points accept. (2 dst + 1) * in < 2^31 and
// num + 2 in + region < 2^32 because dst < region <= kMaxOutputSide = 2^14
// and in <= kMaxImageSide = 2^16.
static_assert(kMaxOutputSide <= (1 << 14) && kMaxImageSide <= (1 << 16), "axis_taps32 needs these bounds");
MEDGE_HD AxisTaps axis_taps32(int32_t dst, int32_t region, int32_t in_size, bool antialias) {
  AxisTaps t;
  const uint32_t in = static_cast<uint32_t>(in_size);
  const uint32_t reg = static_cast<uint32_t>(region);
  const uint32_t den = 2u * reg;
  const uint32_t num = (2u * static_cast<uint32_t>(dst) + 1u) * in;
  if (antialias && in_size > region) {
    const uint32_t q = num / den;
    t.center_i = static_cast<int32_t>(q);
    t.center_f = static_cast<float>(num - q * den) / static_cast<float>(den);
    const uint32_t plus = num + reg, twice = 2u * in;
    const uint32_t lo = plus <= twice ? 0u : (plus - twice) / den;
    uint32_t hi = (num + twice + reg) / den;
    if (hi > in) hi = in;
    t.first = static_cast<int32_t>(lo);
    t.count = static_cast<int32_t>(hi - lo);
    t.inv_support = static_cast<float>(region) / static_cast<float>(in_size);
  } else {
    const bool at_start = num <= reg;
    const uint32_t src = at_start ? 0u : num - reg;
    const uint32_t i0 = src / den;
    t.center_i = 0;
    t.inv_support = 0.0f;
    if (static_cast<int64_t>(i0) >= static_cast<int64_t>(in_size) - 1) {
      t.first = in_size - 1;
      t.count = 1;
      t.center_f = 0.0f;
    } else {
      t.first = static_cast<int32_t>(i0);
      t.count = 2;
      t.center_f = at_start ? 0.0f : static_cast<float>(src - i0 * den) / static_cast<float>(den);
    }
  }
  return t;
}

// Fixed-width window of `width` taps (t.count <= width <= in_size) shifted to
// lie inside [0, in_size): returns its first input index and writes the
// normalised weights, zero where the window extends past the real taps. The
// CPU path's tap tables (build_axis) use exactly this rule and arithmetic.
MEDGE_HD int32_t fixed_window_first(const AxisTaps& t, int32_t in_size, int32_t width) {
  const int32_t last = in_size - width;
  return t.first < 0 ? 0 : (t.first > last ? last : t.first);
}

MEDGE_HD float taps_total(const AxisTaps& t) {
  float total = 0.0f;
  for (int32_t k = 0; k < t.count; ++k) total += tap_weight(t, k);
  return total;
}

// Weight of window position `slot` of a window starting at `first`.
MEDGE_HD float window_weight(const AxisTaps& t, int32_t first, int32_t slot, float total) {
  const int32_t k = slot - (t.first - first);
  if (k < 0 || k >= t.count || !(total > 0.0f)) return 0.0f;
  return tap_weight(t, k) / total;
}

// float -> IEEE half bits, round to nearest even, with subnormals, inf and NaN
// (F. Giesen's float_to_half_fast3_rtne, public domain): the CPU path's
// portable conversion and the emulated __float2half_rn. Host only.
inline uint16_t float_to_half_bits(float value) {
  uint32_t x;
  std::memcpy(&x, &value, 4);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint16_t h;
  if (x >= 0x47800000u) {  // >= 65536: inf, or NaN (kept quiet)
    h = x > 0x7F800000u ? 0x7E00 : 0x7C00;
  } else if (x < 0x38800000u) {  // below the smallest normal half: let the FPU round into a subnormal
    const uint32_t magic_bits = ((127 - 15) + (23 - 10) + 1) << 23;
    float magic, f;
    std::memcpy(&magic, &magic_bits, 4);
    std::memcpy(&f, &x, 4);
    f += magic;
    std::memcpy(&x, &f, 4);
    h = static_cast<uint16_t>(x - magic_bits);
  } else {
    const uint32_t mantissa_odd = (x >> 13) & 1u;
    x += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu;
    x += mantissa_odd;
    h = static_cast<uint16_t>(x >> 13);
  }
  return static_cast<uint16_t>(h | (sign >> 16));
}

}  // namespace detail
}  // namespace medge
