// CPU implementation of the fused preprocessing, multi-threaded over (image,
// band of output rows). Separable: each needed input row is decoded and
// windowed once into a float row, filtered horizontally, then the band's
// output rows are filtered vertically, normalised and written. Same maths as
// the CUDA kernel (pixel_math.h); it is also the parity reference for it.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#include "medge/pixel_math.h"
#include "medge/preprocess.h"

namespace medge {
namespace {

using detail::AxisTaps;
using detail::PreparedImage;

// float -> IEEE half, round to nearest even, with subnormals, inf and NaN
// (F. Giesen's float_to_half_fast3_rtne, public domain). Portable where
// _Float16 / F16C are not.
inline uint16_t float_to_half(float value) {
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

// Tap table of one axis for one image: offsets/counts per output coordinate
// and the normalised weights, computed once per image.
struct AxisTable {
  std::vector<int32_t> first, count, weight_offset;
  std::vector<float> weights;
};

AxisTable build_axis(int32_t dst_size, float scale, int32_t in_size, bool antialias) {
  AxisTable t;
  t.first.resize(dst_size);
  t.count.resize(dst_size);
  t.weight_offset.resize(dst_size);
  for (int32_t d = 0; d < dst_size; ++d) {
    const AxisTaps taps = detail::axis_taps(d, scale, in_size, antialias);
    t.first[d] = taps.first;
    t.count[d] = taps.count;
    t.weight_offset[d] = static_cast<int32_t>(t.weights.size());
    float total = 0.0f;
    for (int32_t k = 0; k < taps.count; ++k) total += detail::tap_weight(taps, k);
    for (int32_t k = 0; k < taps.count; ++k)
      t.weights.push_back(total > 0.0f ? detail::tap_weight(taps, k) / total : 0.0f);
  }
  return t;
}

struct ImagePlan {
  PreparedImage image;
  AxisTable rows, cols;
};

// Decodes and windows one input row into `dst` (in_width floats). The shape
// and polarity are template parameters and the parameters are copied to a
// local, so the loop has no branches and no reloads through possibly
// aliasing float stores: the compiler vectorises it.
template <typename T, detail::Shape S, bool Invert>
void display_row(const PreparedImage& image, int32_t y, float* __restrict__ dst) {
  const PreparedImage im = image;
  const T* __restrict__ src = static_cast<const T*>(im.pixels) + static_cast<int64_t>(y) * im.row_stride;
  const float frac = im.frac, scale = im.scale, offset = im.offset;
  for (int32_t x = 0; x < im.in_width; ++x) {
    const float v = detail::apply_shape<S>((detail::centred_value<T>(im, src[x]) - frac) * scale + offset);
    dst[x] = Invert ? 1.0f - v : v;
  }
}

template <typename T>
void display_row_typed(const PreparedImage& im, int32_t y, float* dst) {
  using detail::Shape;
  const bool inv = im.invert != 0;
  switch (im.shape) {
    case Shape::kClamp: return inv ? display_row<T, Shape::kClamp, true>(im, y, dst) : display_row<T, Shape::kClamp, false>(im, y, dst);
    case Shape::kStep: return inv ? display_row<T, Shape::kStep, true>(im, y, dst) : display_row<T, Shape::kStep, false>(im, y, dst);
    case Shape::kSigmoid: return inv ? display_row<T, Shape::kSigmoid, true>(im, y, dst) : display_row<T, Shape::kSigmoid, false>(im, y, dst);
  }
}

void display_row_any(const PreparedImage& im, int32_t y, float* dst) {
  switch (im.pixel_type) {
    case PixelType::kUInt8: return display_row_typed<uint8_t>(im, y, dst);
    case PixelType::kUInt16: return display_row_typed<uint16_t>(im, y, dst);
    case PixelType::kInt16: return display_row_typed<int16_t>(im, y, dst);
    case PixelType::kInt32: return display_row_typed<int32_t>(im, y, dst);
    case PixelType::kFloat32: return display_row_typed<float>(im, y, dst);
  }
}

// Writes one output row segment of display values, normalised per channel.
struct RowWriter {
  const OutputParams& out;
  void* output;

  void write(int64_t n, int64_t y, int64_t x0, const float* values, int64_t len) const {
    for (int32_t c = 0; c < out.channels; ++c) {
      const float mean = out.mean[c];
      const float inv_std = 1.0f / out.std[c];
      const int64_t base = ((n * out.channels + c) * out.height + y) * out.width + x0;
      if (out.output_type == OutputType::kFloat32) {
        float* dst = static_cast<float*>(output) + base;
        for (int64_t i = 0; i < len; ++i) dst[i] = (values[i] - mean) * inv_std;
      } else {
        uint16_t* dst = static_cast<uint16_t*>(output) + base;
        for (int64_t i = 0; i < len; ++i) dst[i] = float_to_half((values[i] - mean) * inv_std);
      }
    }
  }

  void fill(int64_t n, int64_t y, int64_t x0, int64_t len, float display, std::vector<float>& scratch) const {
    if (len <= 0) return;
    scratch.assign(static_cast<size_t>(len), display);
    write(n, y, x0, scratch.data(), len);
  }
};

constexpr int32_t kBandRows = 32;

// One work item: output rows [y0, y1) of image n.
void run_band(const ImagePlan& plan, const OutputParams& out, const RowWriter& writer, int64_t n, int32_t y0,
              int32_t y1, std::vector<float>& row_buffer, std::vector<float>& horizontal,
              std::vector<float>& line, std::vector<float>& pad_scratch) {
  const PreparedImage& im = plan.image;
  const int32_t region_w = im.region_width;
  line.resize(static_cast<size_t>(std::max<int64_t>(out.width, region_w)));

  // Input rows this band's region rows need.
  int32_t in_lo = im.in_height, in_hi = 0;
  for (int32_t y = y0; y < y1; ++y) {
    const int32_t ry = y - im.region_top;
    if (ry < 0 || ry >= im.region_height) continue;
    in_lo = std::min(in_lo, plan.rows.first[ry]);
    in_hi = std::max(in_hi, plan.rows.first[ry] + plan.rows.count[ry]);
  }
  if (in_hi > in_lo) {
    row_buffer.resize(static_cast<size_t>(im.in_width));
    horizontal.resize(static_cast<size_t>(in_hi - in_lo) * region_w);
    for (int32_t iy = in_lo; iy < in_hi; ++iy) {
      display_row_any(im, iy, row_buffer.data());
      float* h = horizontal.data() + static_cast<size_t>(iy - in_lo) * region_w;
      for (int32_t x = 0; x < region_w; ++x) {
        const float* w = plan.cols.weights.data() + plan.cols.weight_offset[x];
        const float* src = row_buffer.data() + plan.cols.first[x];
        float acc = 0.0f;
        for (int32_t k = 0; k < plan.cols.count[x]; ++k) acc += w[k] * src[k];
        h[x] = acc;
      }
    }
  }

  for (int32_t y = y0; y < y1; ++y) {
    const int32_t ry = y - im.region_top;
    if (ry < 0 || ry >= im.region_height) {
      writer.fill(n, y, 0, out.width, out.pad_value, pad_scratch);
      continue;
    }
    std::fill(line.begin(), line.begin() + region_w, 0.0f);
    const float* w = plan.rows.weights.data() + plan.rows.weight_offset[ry];
    for (int32_t k = 0; k < plan.rows.count[ry]; ++k) {
      const float* h = horizontal.data() + static_cast<size_t>(plan.rows.first[ry] + k - in_lo) * region_w;
      const float wk = w[k];
      for (int32_t x = 0; x < region_w; ++x) line[x] += wk * h[x];
    }
    writer.write(n, y, im.region_left, line.data(), region_w);
    if (im.region_left > 0 || im.region_left + region_w < out.width) {
      writer.fill(n, y, 0, im.region_left, out.pad_value, pad_scratch);
      writer.fill(n, y, im.region_left + region_w, out.width - im.region_left - region_w, out.pad_value,
                  pad_scratch);
    }
  }
}

}  // namespace

void preprocess_cpu(const ImageParams* images, int64_t count, const OutputParams& out, void* output,
                    int64_t output_bytes, int num_threads) {
  detail::validate_output(out);
  if (count < 0 || count > kMaxBatch) throw InvalidArgument("batch size out of range");
  if (count == 0) return;
  if (images == nullptr) throw InvalidArgument("image parameter array is null");
  if (output == nullptr) throw InvalidArgument("output pointer is null");
  const int64_t needed = output_bytes_required(out, count);
  if (output_bytes < needed) {
    std::ostringstream msg;
    msg << "output buffer holds " << output_bytes << " bytes but " << count << " images need " << needed;
    throw InvalidArgument(msg.str());
  }

  // Validate everything before touching memory.
  std::vector<ImagePlan> plans(static_cast<size_t>(count));
  const bool antialias = out.resample == Resample::kBilinearAntialias;
  for (int64_t i = 0; i < count; ++i) {
    ImagePlan& plan = plans[static_cast<size_t>(i)];
    plan.image = detail::prepare_image(images[i], out, i);
    plan.rows = build_axis(plan.image.region_height, plan.image.scale_y, plan.image.in_height, antialias);
    plan.cols = build_axis(plan.image.region_width, plan.image.scale_x, plan.image.in_width, antialias);
  }

  const int32_t bands = static_cast<int32_t>((out.height + kBandRows - 1) / kBandRows);
  const int64_t items = count * bands;
  int threads = num_threads > 0 ? num_threads : static_cast<int>(std::thread::hardware_concurrency());
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, items)));

  const RowWriter writer{out, output};
  std::atomic<int64_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  auto worker = [&]() {
    std::vector<float> row_buffer, horizontal, line, pad_scratch;
    try {
      for (int64_t item = next.fetch_add(1); item < items; item = next.fetch_add(1)) {
        const int64_t n = item / bands;
        const int32_t band = static_cast<int32_t>(item % bands);
        const int32_t y0 = band * kBandRows;
        const int32_t y1 = static_cast<int32_t>(std::min<int64_t>(out.height, y0 + kBandRows));
        run_band(plans[static_cast<size_t>(n)], out, writer, n, y0, y1, row_buffer, horizontal, line,
                 pad_scratch);
      }
    } catch (...) {  // std::bad_alloc; keep the first and stop the others
      std::lock_guard<std::mutex> lock(failure_mutex);
      if (!failure) failure = std::current_exception();
      next.store(items);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace medge
