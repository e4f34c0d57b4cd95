// Volume preprocessing on the CPU (multi-threaded), the validation and launch
// tables shared with the CUDA path, and the CPU emulation of the CUDA kernel.
// Work items are (run of output slices, band of output rows): each input slice
// a band needs is decoded, windowed and resampled in-plane once into a cached
// plane, and output slices blend two such planes; see volume.h for the API.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <sstream>
#include <system_error>
#include <thread>
#include <vector>

#include "medge/pixel_math.h"
#include "medge/preprocess.h"
#include "medge/volume.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// As preprocess_cpu.cpp: the item worker is compiled for baseline x86-64 and for
// AVX2 + FMA + F16C, chosen once from CPUID; MEDGE_CPU_BASELINE=1 forces baseline.
#define MEDGE_VOLUME_X86_DISPATCH 1
#endif

namespace medge {

using detail::PreparedImage;
using volume_detail::Tap;

namespace {

constexpr int32_t kBandRows = 32;

[[noreturn]] void fail(const std::string& what) { throw InvalidArgument(what); }

// ---------------------------------------------------------------- validation and tables

void validate_volume_output(const VolumeOutputParams& out) {
  static const char* kAxis[3] = {"slices", "rows", "columns"};
  for (int a = 0; a < 3; ++a) {
    if (out.resampled[a] < 1 || out.resampled[a] > kMaxOutputSide || out.size[a] < 1 ||
        out.size[a] > kMaxOutputSide) {
      std::ostringstream msg;
      msg << "volume output " << kAxis[a] << ": resampled size " << out.resampled[a] << " and ROI size "
          << out.size[a] << " must be within 1.." << kMaxOutputSide;
      fail(msg.str());
    }
    if (out.offset[a] < -kMaxVolumeOffset || out.offset[a] > kMaxVolumeOffset) {
      std::ostringstream msg;
      msg << "volume output " << kAxis[a] << ": ROI offset " << out.offset[a] << " must be within +-"
          << kMaxVolumeOffset;
      fail(msg.str());
    }
  }
  if (out.interpolation != VolumeInterpolation::kTrilinear && out.interpolation != VolumeInterpolation::kNearest)
    fail("unknown volume interpolation");
  if (out.neighbours < 0 || out.neighbours > kMaxNeighbours) {
    std::ostringstream msg;
    msg << "2.5-D neighbours must be within 0.." << kMaxNeighbours << ", got " << out.neighbours;
    fail(msg.str());
  }
  // Normalisation, pad value and output type: the 2-D path's checks (finite, no overflow to inf).
  OutputParams o;
  o.height = out.size[1];
  o.width = out.size[2];
  o.channels = 1;
  o.pad_value = out.pad_value;
  o.mean[0] = out.mean;
  o.std[0] = out.std;
  o.output_type = out.output_type;
  detail::validate_output(o);
}

// Per-slice PreparedImage (validated by the 2-D path's prepare_image) for every slice.
std::vector<PreparedImage> prepare_slices(const VolumeParams& v) {
  if (v.pixels == nullptr) fail("volume pixel pointer is null");
  const int32_t type = static_cast<int32_t>(v.pixel_type);
  if (type < 0 || type > static_cast<int32_t>(PixelType::kFloat32)) fail("unknown pixel type");
  if (v.depth < 1 || v.height < 1 || v.width < 1 || v.depth > kMaxImageSide || v.height > kMaxImageSide ||
      v.width > kMaxImageSide) {
    std::ostringstream msg;
    msg << "volume size " << v.depth << " x " << v.height << " x " << v.width << " must be within 1.."
        << kMaxImageSide << " per axis";
    fail(msg.str());
  }
  const int64_t elem = pixel_type_size(v.pixel_type);
  const int64_t slice_extent = (v.height - 1) * v.row_stride + v.width;
  if (v.row_stride < v.width || v.row_stride > kMaxImageSide * 16)
    fail("volume row stride must be at least the width and at most 2^20 elements");
  if (v.slice_stride < slice_extent || v.slice_stride > (int64_t{1} << 40))
    fail("volume slice stride must be at least one slice's extent and at most 2^40 elements");
  const int64_t needed = ((v.depth - 1) * v.slice_stride + slice_extent) * elem;
  if (v.buffer_bytes < needed) {
    std::ostringstream msg;
    msg << "volume buffer holds " << v.buffer_bytes << " bytes but " << v.depth << " x " << v.height << " x "
        << v.width << " with these strides needs " << needed;
    fail(msg.str());
  }
  if (v.rescale_slopes == nullptr || v.rescale_intercepts == nullptr)
    fail("per-slice rescale slopes and intercepts are missing");

  OutputParams geometry;  // prepare_image's region is unused here: stretch onto 1 x 1
  geometry.height = 1;
  geometry.width = 1;
  std::vector<PreparedImage> slices(static_cast<size_t>(v.depth));
  for (int64_t z = 0; z < v.depth; ++z) {
    ImageParams p;
    p.pixels = static_cast<const char*>(v.pixels) + z * v.slice_stride * elem;
    p.buffer_bytes = v.buffer_bytes - z * v.slice_stride * elem;
    p.height = v.height;
    p.width = v.width;
    p.row_stride = v.row_stride;
    p.pixel_type = v.pixel_type;
    p.bits_stored = v.bits_stored;
    p.is_signed = v.is_signed;
    p.rescale_slope = v.rescale_slopes[z];
    p.rescale_intercept = v.rescale_intercepts[z];
    p.voi_mode = v.voi_mode;
    p.voi_function = v.voi_function;
    p.window_center = v.window_center;
    p.window_width = v.window_width;
    p.range_low = v.range_low;
    p.range_high = v.range_high;
    p.invert = v.invert;
    try {
      slices[static_cast<size_t>(z)] = detail::prepare_image(p, geometry, z);
    } catch (const InvalidArgument& e) {
      // prepare_image says "image <z>: ..."; here it is a slice.
      std::string what = e.what();
      if (what.rfind("image ", 0) == 0) what = "slice " + what.substr(6);
      throw InvalidArgument(what);
    }
  }
  return slices;
}

// Taps of every output coordinate of one axis (padding where the ROI lies outside the resampled volume).
std::vector<Tap> axis_table(int64_t size, int64_t offset, int64_t resampled, int64_t in, VolumeInterpolation mode) {
  std::vector<Tap> taps(static_cast<size_t>(size));
  for (int64_t o = 0; o < size; ++o) {
    const int64_t r = o - offset;
    Tap t{-1, -1, 0.0f, 0.0f};
    if (r >= 0 && r < resampled) {
      if (mode == VolumeInterpolation::kNearest) {
        // Nearest voxel centre: floor((r + 1/2) * in / resampled), exact in integers.
        const int64_t i = std::min(in - 1, ((2 * r + 1) * in) / (2 * resampled));
        t = Tap{static_cast<int32_t>(i), static_cast<int32_t>(i), 1.0f, 0.0f};
      } else {
        const detail::AxisTaps a = detail::axis_taps(static_cast<int32_t>(r), static_cast<int32_t>(resampled),
                                                     static_cast<int32_t>(in), false);
        if (a.count == 1) {
          t = Tap{a.first, a.first, 1.0f, 0.0f};
        } else {
          t = Tap{a.first, a.first + 1, 1.0f - a.center_f, a.center_f};
        }
      }
    }
    taps[static_cast<size_t>(o)] = t;
  }
  return taps;
}

struct Plan {
  std::vector<PreparedImage> slices;
  std::vector<Tap> z, y, x;
};

Plan make_plan(const VolumeParams& v, const VolumeOutputParams& out) {
  validate_volume_output(out);
  Plan plan;
  plan.slices = prepare_slices(v);
  plan.z = axis_table(out.size[0], out.offset[0], out.resampled[0], v.depth, out.interpolation);
  plan.y = axis_table(out.size[1], out.offset[1], out.resampled[1], v.height, out.interpolation);
  plan.x = axis_table(out.size[2], out.offset[2], out.resampled[2], v.width, out.interpolation);
  return plan;
}

void check_output(const void* output, int64_t output_bytes, const VolumeOutputParams& out) {
  if (output == nullptr) fail("output pointer is null");
  const int64_t elem = output_type_size(out.output_type);
  if (reinterpret_cast<std::uintptr_t>(output) % static_cast<std::uintptr_t>(elem) != 0) {
    std::ostringstream msg;
    msg << "output pointer is not aligned to its " << elem << "-byte element size";
    fail(msg.str());
  }
  const int64_t needed = volume_output_bytes(out);
  if (output_bytes < needed) {
    std::ostringstream msg;
    msg << "output buffer holds " << output_bytes << " bytes but the volume output needs " << needed;
    fail(msg.str());
  }
}

volume_detail::Layout table_layout(const VolumeParams& v, const VolumeOutputParams& out) {
  return volume_detail::table_layout(v.depth, out.size);
}

// IEEE half bits of a float, round to nearest even, with subnormals, inf and NaN
// (F. Giesen's float_to_half_fast3_rtne, public domain); the emulated __float2half_rn.
uint16_t half_bits(float value) {
  uint32_t x;
  std::memcpy(&x, &value, 4);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint16_t h;
  if (x >= 0x47800000u) {
    h = x > 0x7F800000u ? 0x7E00 : 0x7C00;
  } else if (x < 0x38800000u) {
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

// ---------------------------------------------------------------- CPU path

#ifdef MEDGE_VOLUME_X86_DISPATCH
bool baseline_forced() {
  const char* force = std::getenv("MEDGE_CPU_BASELINE");
  return force != nullptr && force[0] != '\0' && force[0] != '0';
}
const bool kHaveF16c = !baseline_forced() && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
const bool kUseAvx2 = !baseline_forced() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");

__attribute__((target("avx,f16c"))) void store_half_f16c(const float* v, int64_t n, float mean, float inv_std,
                                                          uint16_t* dst) {
  const __m256 m = _mm256_set1_ps(mean), s = _mm256_set1_ps(inv_std);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(v + i), m), s);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = half_bits((v[i] - mean) * inv_std);
}
#endif

// Normalises n display values into dst (float32 or float16 bits).
void store_normalised(const float* v, int64_t n, float mean, float inv_std, bool half, void* dst) {
  if (!half) {
    float* d = static_cast<float*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = (v[i] - mean) * inv_std;
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst);
#ifdef MEDGE_VOLUME_X86_DISPATCH
  if (kHaveF16c) return store_half_f16c(v, n, mean, inv_std, d);
#endif
  for (int64_t i = 0; i < n; ++i) d[i] = half_bits((v[i] - mean) * inv_std);
}

// Decodes and windows input row y, columns [x0, x1), of one slice into dst (branch-free, vectorised).
template <typename T, detail::Shape S, bool Invert>
void display_row(const PreparedImage& image, int32_t y, int32_t x0, int32_t x1, float* __restrict__ dst) {
  const PreparedImage im = image;
  const T* __restrict__ src = static_cast<const T*>(im.pixels) + static_cast<int64_t>(y) * im.row_stride;
  const float frac = im.frac, scale = im.scale, offset = im.offset;
  for (int32_t x = x0; x < x1; ++x) {
    const float v = detail::apply_shape<S>((detail::centred_value<T>(im, src[x]) - frac) * scale + offset);
    dst[x - x0] = Invert ? 1.0f - v : v;
  }
}

template <typename T>
void display_row_typed(const PreparedImage& im, int32_t y, int32_t x0, int32_t x1, float* dst) {
  using detail::Shape;
  const bool inv = im.invert != 0;
  switch (im.shape) {
    case Shape::kClamp:
      return inv ? display_row<T, Shape::kClamp, true>(im, y, x0, x1, dst)
                 : display_row<T, Shape::kClamp, false>(im, y, x0, x1, dst);
    case Shape::kStep:
      return inv ? display_row<T, Shape::kStep, true>(im, y, x0, x1, dst)
                 : display_row<T, Shape::kStep, false>(im, y, x0, x1, dst);
    case Shape::kSigmoid:
      return inv ? display_row<T, Shape::kSigmoid, true>(im, y, x0, x1, dst)
                 : display_row<T, Shape::kSigmoid, false>(im, y, x0, x1, dst);
  }
}

void display_row_any(const PreparedImage& im, int32_t y, int32_t x0, int32_t x1, float* dst) {
  switch (im.pixel_type) {
    case PixelType::kUInt8: return display_row_typed<uint8_t>(im, y, x0, x1, dst);
    case PixelType::kUInt16: return display_row_typed<uint16_t>(im, y, x0, x1, dst);
    case PixelType::kInt16: return display_row_typed<int16_t>(im, y, x0, x1, dst);
    case PixelType::kInt32: return display_row_typed<int32_t>(im, y, x0, x1, dst);
    case PixelType::kFloat32: return display_row_typed<float>(im, y, x0, x1, dst);
  }
}

// Everything the workers share, computed once per call.
struct CpuJob {
  const Plan* plan;
  const VolumeOutputParams* out;
  char* output;
  int64_t elem;  // output element bytes
  bool half;
  float inv_std;
  int32_t size_d, size_h, size_w;
  int32_t vy0, vy1, vx0, vx1;  // output rows / columns inside the resampled volume
  int32_t cx0, cx1;            // input columns they need
  int32_t channels;
  std::vector<std::vector<int64_t>> destinations;  // per output slice: element offsets of its (d, c) planes
  std::vector<char> pad_row;                       // one output row of the normalised pad value
};

// Scratch of one worker thread, reused across items.
struct Scratch {
  struct Slot {
    int32_t slice = -1;
    std::vector<float> data;  // band rows x visible columns
  } slots[2];
  int32_t band = -1;
  std::vector<float> decoded, vertical, line;
  std::vector<char> row;  // one normalised output row
};

// Input slice z resampled in-plane onto the output rows [b0, b1) x visible columns.
inline __attribute__((always_inline)) void compute_plane(const CpuJob& job, int32_t z, int32_t b0, int32_t b1,
                                                         Scratch& s, std::vector<float>& plane) {
  const Plan& plan = *job.plan;
  const PreparedImage& im = plan.slices[static_cast<size_t>(z)];
  const int32_t vw = job.vx1 - job.vx0;
  const int32_t y0 = std::max(b0, job.vy0), y1 = std::min(b1, job.vy1);
  plane.resize(static_cast<size_t>(b1 - b0) * vw);
  if (y0 >= y1) return;
  const int32_t in_lo = plan.y[static_cast<size_t>(y0)].i0;
  const int32_t in_hi = plan.y[static_cast<size_t>(y1 - 1)].i1 + 1;
  const int32_t cols = job.cx1 - job.cx0;
  s.decoded.resize(static_cast<size_t>(in_hi - in_lo) * cols);
  for (int32_t iy = in_lo; iy < in_hi; ++iy)
    display_row_any(im, iy, job.cx0, job.cx1, s.decoded.data() + static_cast<size_t>(iy - in_lo) * cols);
  s.vertical.resize(static_cast<size_t>(cols));
  float* __restrict__ vertical = s.vertical.data();
  const Tap* __restrict__ tx = plan.x.data() + job.vx0;
  for (int32_t oy = y0; oy < y1; ++oy) {
    const Tap ty = plan.y[static_cast<size_t>(oy)];
    const float* __restrict__ a = s.decoded.data() + static_cast<size_t>(ty.i0 - in_lo) * cols;
    const float* __restrict__ b = s.decoded.data() + static_cast<size_t>(ty.i1 - in_lo) * cols;
    const float w0 = ty.w0, w1 = ty.w1;
    if (w1 != 0.0f) {
      for (int32_t x = 0; x < cols; ++x) vertical[x] = w0 * a[x] + w1 * b[x];
    } else {
      for (int32_t x = 0; x < cols; ++x) vertical[x] = w0 * a[x];
    }
    float* __restrict__ dst = plane.data() + static_cast<size_t>(oy - b0) * vw;
    const int32_t cx0 = job.cx0;
    for (int32_t i = 0; i < vw; ++i) {
      const Tap t = tx[i];
      // w1 == 0 (one tap) adds exactly 0: the same value as the CUDA kernel's branch.
      dst[i] = t.w0 * vertical[t.i0 - cx0] + t.w1 * vertical[t.i1 - cx0];
    }
  }
}

// The cached plane of input slice z for the item's band, computing it if needed.
inline __attribute__((always_inline)) const float* plane_for(const CpuJob& job, int32_t z, int32_t keep,
                                                              int32_t b0, int32_t b1, Scratch& s) {
  for (auto& slot : s.slots)
    if (slot.slice == z) return slot.data.data();
  Scratch::Slot& slot = s.slots[0].slice == keep ? s.slots[1] : s.slots[0];
  slot.slice = -1;
  compute_plane(job, z, b0, b1, s, slot.data);
  slot.slice = z;
  return slot.data.data();
}

// One work item: output slices [s0, s1) x output rows [b0, b1).
inline __attribute__((always_inline)) void run_item_body(const CpuJob& job, int32_t s0, int32_t s1, int32_t b0,
                                                         int32_t b1, Scratch& s) {
  const Plan& plan = *job.plan;
  const VolumeOutputParams& out = *job.out;
  if (s.band != b0) {  // planes are per band
    s.slots[0].slice = s.slots[1].slice = -1;
    s.band = b0;
  }
  const int32_t W = job.size_w, vw = job.vx1 - job.vx0;
  const size_t row_bytes = static_cast<size_t>(W) * job.elem;
  s.line.resize(static_cast<size_t>(std::max(vw, 1)));
  s.row.resize(row_bytes);
  for (int32_t od = s0; od < s1; ++od) {
    const Tap tz = plan.z[static_cast<size_t>(od)];
    const std::vector<int64_t>& dests = job.destinations[static_cast<size_t>(od)];
    if (dests.empty()) continue;
    const float* p0 = nullptr;
    const float* p1 = nullptr;
    if (tz.i0 >= 0) {
      // Two slots: fetching the second plane never evicts the first (keep).
      const bool two = tz.w1 != 0.0f;
      p0 = plane_for(job, tz.i0, two ? tz.i1 : -1, b0, b1, s);
      p1 = two ? plane_for(job, tz.i1, tz.i0, b0, b1, s) : p0;
    }
    for (int32_t oy = b0; oy < b1; ++oy) {
      const char* src;
      if (tz.i0 < 0 || oy < job.vy0 || oy >= job.vy1) {
        src = job.pad_row.data();
      } else {
        const float* __restrict__ a = p0 + static_cast<size_t>(oy - b0) * vw;
        const float* __restrict__ b = p1 + static_cast<size_t>(oy - b0) * vw;
        float* __restrict__ line = s.line.data();
        const float w0 = tz.w0, w1 = tz.w1;
        if (w1 != 0.0f) {
          for (int32_t i = 0; i < vw; ++i) line[i] = w0 * a[i] + w1 * b[i];
        } else {
          for (int32_t i = 0; i < vw; ++i) line[i] = w0 * a[i];
        }
        char* row = s.row.data();
        const size_t head = static_cast<size_t>(job.vx0) * job.elem;
        const size_t body = static_cast<size_t>(vw) * job.elem;
        std::memcpy(row, job.pad_row.data(), head);
        store_normalised(line, vw, out.mean, job.inv_std, job.half, row + head);
        std::memcpy(row + head + body, job.pad_row.data() + head + body, row_bytes - head - body);
        src = row;
      }
      for (const int64_t dest : dests)
        std::memcpy(job.output + (dest + static_cast<int64_t>(oy) * W) * job.elem, src, row_bytes);
    }
  }
}

__attribute__((flatten)) void run_item_baseline(const CpuJob& job, int32_t s0, int32_t s1, int32_t b0, int32_t b1,
                                                Scratch& s) {
  run_item_body(job, s0, s1, b0, b1, s);
}

#ifdef MEDGE_VOLUME_X86_DISPATCH
__attribute__((target("avx2,fma,f16c"), flatten)) void run_item_avx2(const CpuJob& job, int32_t s0, int32_t s1,
                                                                     int32_t b0, int32_t b1, Scratch& s) {
  run_item_body(job, s0, s1, b0, b1, s);
}
#endif

void run_item(const CpuJob& job, int32_t s0, int32_t s1, int32_t b0, int32_t b1, Scratch& s) {
#ifdef MEDGE_VOLUME_X86_DISPATCH
  if (kUseAvx2) return run_item_avx2(job, s0, s1, b0, b1, s);
#endif
  run_item_baseline(job, s0, s1, b0, b1, s);
}

// The visible (non-padding) range [lo, hi) of an axis table; lo == hi when none.
void visible_range(const std::vector<Tap>& taps, int32_t& lo, int32_t& hi) {
  lo = 0;
  while (lo < static_cast<int32_t>(taps.size()) && taps[static_cast<size_t>(lo)].i0 < 0) ++lo;
  hi = lo;
  while (hi < static_cast<int32_t>(taps.size()) && taps[static_cast<size_t>(hi)].i0 >= 0) ++hi;
}

}  // namespace

int64_t volume_output_elements(const VolumeOutputParams& out) {
  const int64_t channels = out.neighbours > 0 ? 2 * static_cast<int64_t>(out.neighbours) + 1 : 1;
  return channels * out.size[0] * out.size[1] * out.size[2];
}

int64_t volume_output_bytes(const VolumeOutputParams& out) {
  return volume_output_elements(out) * output_type_size(out.output_type);
}

void preprocess_volume_cpu(const VolumeParams& volume, const VolumeOutputParams& out, void* output,
                           int64_t output_bytes, int num_threads) {
  const Plan plan = make_plan(volume, out);
  check_output(output, output_bytes, out);

  CpuJob job;
  job.plan = &plan;
  job.out = &out;
  job.output = static_cast<char*>(output);
  job.half = out.output_type == OutputType::kFloat16;
  job.elem = output_type_size(out.output_type);
  job.inv_std = 1.0f / out.std;
  job.size_d = static_cast<int32_t>(out.size[0]);
  job.size_h = static_cast<int32_t>(out.size[1]);
  job.size_w = static_cast<int32_t>(out.size[2]);
  visible_range(plan.y, job.vy0, job.vy1);
  visible_range(plan.x, job.vx0, job.vx1);
  job.cx0 = job.vx1 > job.vx0 ? plan.x[static_cast<size_t>(job.vx0)].i0 : 0;
  job.cx1 = job.vx1 > job.vx0 ? plan.x[static_cast<size_t>(job.vx1 - 1)].i1 + 1 : 0;
  job.channels = out.neighbours > 0 ? 2 * out.neighbours + 1 : 1;

  // Where each output slice's rows go: one plane for 3-D; for 2.5-D every (d, c) with
  // clamp(d + c - k) == that slice.
  const int64_t plane_elems = static_cast<int64_t>(job.size_h) * job.size_w;
  job.destinations.resize(static_cast<size_t>(job.size_d));
  if (out.neighbours == 0) {
    for (int32_t d = 0; d < job.size_d; ++d) job.destinations[static_cast<size_t>(d)].push_back(d * plane_elems);
  } else {
    for (int32_t d = 0; d < job.size_d; ++d)
      for (int32_t c = 0; c < job.channels; ++c) {
        const int32_t src = std::min(job.size_d - 1, std::max(0, d + c - out.neighbours));
        job.destinations[static_cast<size_t>(src)].push_back((static_cast<int64_t>(d) * job.channels + c) *
                                                             plane_elems);
      }
  }
  {
    std::vector<float> pads(static_cast<size_t>(job.size_w), out.pad_value);
    job.pad_row.resize(static_cast<size_t>(job.size_w) * job.elem);
    store_normalised(pads.data(), job.size_w, out.mean, job.inv_std, job.half, job.pad_row.data());
  }

  // Items: runs of output slices x bands of rows, enough for dynamic balancing; a run
  // shares its cached planes (consecutive output slices blend the same input slices).
  const int32_t bands = (job.size_h + kBandRows - 1) / kBandRows;
  int threads = num_threads > 0 ? num_threads : static_cast<int>(std::thread::hardware_concurrency());
  threads = std::max(1, threads);
  const int64_t runs_wanted = std::max<int64_t>(1, (8 * static_cast<int64_t>(threads) + bands - 1) / bands);
  const int32_t run_length = static_cast<int32_t>(std::max<int64_t>(1, (job.size_d + runs_wanted - 1) / runs_wanted));
  const int32_t runs = (job.size_d + run_length - 1) / run_length;
  const int64_t items = static_cast<int64_t>(runs) * bands;
  threads = static_cast<int>(std::min<int64_t>(threads, items));

  std::atomic<int64_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  auto worker = [&]() {
    Scratch scratch;
    try {
      for (int64_t item = next.fetch_add(1); item < items; item = next.fetch_add(1)) {
        // Band-major order: a thread's consecutive items tend to share a band's planes.
        const int32_t band = static_cast<int32_t>(item / runs);
        const int32_t run = static_cast<int32_t>(item % runs);
        const int32_t s0 = run * run_length, s1 = std::min(job.size_d, s0 + run_length);
        const int32_t b0 = band * kBandRows, b1 = std::min(job.size_h, b0 + kBandRows);
        run_item(job, s0, s1, b0, b1, scratch);
      }
    } catch (...) {  // std::bad_alloc: keep the first, stop the others
      std::lock_guard<std::mutex> lock(failure_mutex);
      if (!failure) failure = std::current_exception();
      next.store(items);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  for (int t = 1; t < threads; ++t) {
    try {
      pool.emplace_back(worker);
    } catch (const std::system_error& e) {
      // As preprocess_cpu: stop and join the started workers, then report (never std::terminate).
      next.store(items);
      for (auto& th : pool) th.join();
      std::ostringstream msg;
      msg << "could not start worker thread " << t + 1 << " of " << threads
          << " (the operating system refused: " << e.what()
          << "); pass a smaller num_threads, or raise the process/thread limit (ulimit -u, cgroup pids.max)";
      throw ResourceError(msg.str());
    }
  }
  worker();
  for (auto& th : pool) th.join();
  if (failure) std::rethrow_exception(failure);
}

// ---------------------------------------------------------------- CUDA launch tables, emulation

int64_t volume_cuda_table_bytes(const VolumeParams& volume, const VolumeOutputParams& out) {
  validate_volume_output(out);
  if (volume.depth < 1 || volume.depth > kMaxImageSide) fail("volume depth out of range");
  return table_layout(volume, out).bytes;
}

void volume_cuda_tables(const VolumeParams& volume, const VolumeOutputParams& out, void* host_tables,
                        int64_t table_bytes) {
  const Plan plan = make_plan(volume, out);
  const volume_detail::Layout l = table_layout(volume, out);
  if (host_tables == nullptr || table_bytes < l.bytes) {
    std::ostringstream msg;
    msg << "table buffer holds " << table_bytes << " bytes but the launch tables need " << l.bytes;
    fail(msg.str());
  }
  if (reinterpret_cast<std::uintptr_t>(host_tables) % 16 != 0) fail("table buffer is not aligned to 16 bytes");
  char* base = static_cast<char*>(host_tables);
  std::memset(base, 0, static_cast<size_t>(l.bytes));
  std::memcpy(base + l.slices, plan.slices.data(), plan.slices.size() * sizeof(PreparedImage));
  std::memcpy(base + l.taps_z, plan.z.data(), plan.z.size() * sizeof(Tap));
  std::memcpy(base + l.taps_y, plan.y.data(), plan.y.size() * sizeof(Tap));
  std::memcpy(base + l.taps_x, plan.x.data(), plan.x.size() * sizeof(Tap));
}

void preprocess_volume_emulated(const VolumeParams& volume, const VolumeOutputParams& out, void* output,
                                int64_t output_bytes) {
  const int64_t bytes = volume_cuda_table_bytes(volume, out);
  std::vector<uint64_t> storage(static_cast<size_t>((bytes + 15) / 16 * 2));  // 16-byte aligned
  void* tables = storage.data();
  if (reinterpret_cast<std::uintptr_t>(tables) % 16 != 0) {
    storage.resize(storage.size() + 2);
    tables = reinterpret_cast<void*>((reinterpret_cast<std::uintptr_t>(storage.data()) + 15) / 16 * 16);
  }
  volume_cuda_tables(volume, out, tables, bytes);
  check_output(output, output_bytes, out);
  const volume_detail::Layout l = table_layout(volume, out);
  const char* base = static_cast<const char*>(tables);
  volume_detail::KernelArgs a{};
  a.slices = reinterpret_cast<const PreparedImage*>(base + l.slices);
  a.taps_z = reinterpret_cast<const Tap*>(base + l.taps_z);
  a.taps_y = reinterpret_cast<const Tap*>(base + l.taps_y);
  a.taps_x = reinterpret_cast<const Tap*>(base + l.taps_x);
  a.output = output;
  a.total = volume_output_elements(out);
  a.size_d = static_cast<int32_t>(out.size[0]);
  a.size_h = static_cast<int32_t>(out.size[1]);
  a.size_w = static_cast<int32_t>(out.size[2]);
  a.neighbours = out.neighbours;
  a.channels = out.neighbours > 0 ? 2 * out.neighbours + 1 : 1;
  a.half = out.output_type == OutputType::kFloat16 ? 1 : 0;
  a.pad_value = out.pad_value;
  a.mean = out.mean;
  a.inv_std = 1.0f / out.std;
  for (int64_t e = 0; e < a.total; ++e) {
    const float v = volume_detail::element(a, e);
    if (a.half)
      static_cast<uint16_t*>(output)[e] = half_bits(v);
    else
      static_cast<float*>(output)[e] = v;
  }
}

#ifndef MEDGE_VOLUME_CUDA
// Builds without nvcc: the CUDA entry point reports that CUDA is absent.
void preprocess_volume_cuda(const VolumeParams&, const VolumeOutputParams&, const void*, int64_t, void*, int64_t,
                            cudaStream_t) {
  throw CudaError(
      "this medge build has no CUDA support (nvcc was not found when it was built); reinstall with "
      "the CUDA toolkit on PATH, e.g. CUDACXX=/usr/local/cuda/bin/nvcc pip install --no-binary medge medge");
}
#endif

}  // namespace medge
