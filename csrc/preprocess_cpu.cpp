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
#include <system_error>
#include <thread>
#include <vector>

#include "medge/pixel_math.h"
#include "medge/preprocess.h"

#include <cstdlib>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// Wheels target baseline x86-64 (SSE2). The band worker is compiled a second
// time for AVX2 + FMA + F16C and chosen once from CPUID (cpu_kernel_variant);
// MEDGE_CPU_BASELINE=1 forces the portable build, so tests cover both.
#define MEDGE_X86_DISPATCH 1
#endif

namespace medge {
namespace {

using detail::AxisTaps;
using detail::PreparedImage;

inline uint16_t float_to_half(float value) { return detail::float_to_half_bits(value); }

// Tap table of one axis for one image: every output coordinate gets the
// same number of taps (`taps`, zero-padded, shifted to stay inside the
// input), so the filter loops have a constant trip count and unroll.
struct AxisTable {
  int32_t taps = 0;
  std::vector<int32_t> first;  // first input index of each output coordinate
  std::vector<float> weights;  // taps per output coordinate, normalised
};

AxisTable build_axis(int32_t dst_size, int32_t in_size, bool antialias) {
  std::vector<AxisTaps> all(static_cast<size_t>(dst_size));
  AxisTable t;
  for (int32_t d = 0; d < dst_size; ++d) {
    all[d] = detail::axis_taps(d, dst_size, in_size, antialias);
    t.taps = std::max(t.taps, all[d].count);
  }
  t.first.resize(static_cast<size_t>(dst_size));
  t.weights.assign(static_cast<size_t>(dst_size) * t.taps, 0.0f);
  for (int32_t d = 0; d < dst_size; ++d) {
    const AxisTaps& taps = all[d];
    const int32_t first = detail::fixed_window_first(taps, in_size, t.taps);
    t.first[d] = first;
    const float total = detail::taps_total(taps);
    float* w = t.weights.data() + static_cast<size_t>(d) * t.taps;
    for (int32_t k = 0; k < t.taps; ++k) w[k] = detail::window_weight(taps, first, k, total);
  }
  return t;
}

// out[x] = sum_k w[x * K + k] * src[first[x] + k], K known at compile time when small.
template <int K>
void filter_row_fixed(const AxisTable& t, const float* __restrict__ src, float* __restrict__ out, int32_t n) {
  const float* __restrict__ w = t.weights.data();
  const int32_t* __restrict__ first = t.first.data();
  for (int32_t x = 0; x < n; ++x) {
    const float* s = src + first[x];
    const float* wx = w + static_cast<size_t>(x) * K;
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) acc += wx[k] * s[k];
    out[x] = acc;
  }
}

void filter_row(const AxisTable& t, const float* src, float* out, int32_t n) {
  switch (t.taps) {
    case 1: return filter_row_fixed<1>(t, src, out, n);
    case 2: return filter_row_fixed<2>(t, src, out, n);
    case 3: return filter_row_fixed<3>(t, src, out, n);
    case 4: return filter_row_fixed<4>(t, src, out, n);
    case 5: return filter_row_fixed<5>(t, src, out, n);
    case 6: return filter_row_fixed<6>(t, src, out, n);
    case 7: return filter_row_fixed<7>(t, src, out, n);
    case 8: return filter_row_fixed<8>(t, src, out, n);
    default: break;
  }
  const int32_t taps = t.taps;
  for (int32_t x = 0; x < n; ++x) {
    const float* s = src + t.first[x];
    const float* wx = t.weights.data() + static_cast<size_t>(x) * taps;
    float acc = 0.0f;
    for (int32_t k = 0; k < taps; ++k) acc += wx[k] * s[k];
    out[x] = acc;
  }
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

// Normalises and stores n values as IEEE half, round to nearest even.
void store_half_portable(const float* values, int64_t n, float mean, float inv_std, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half((values[i] - mean) * inv_std);
}

#ifdef MEDGE_X86_DISPATCH
// Same result with the F16C instruction (vcvtps2ph, round to nearest even), 8 at a time.
__attribute__((target("avx,f16c"))) void store_half_f16c(const float* values, int64_t n, float mean, float inv_std,
                                                          uint16_t* dst) {
  const __m256 m = _mm256_set1_ps(mean), s = _mm256_set1_ps(inv_std);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(values + i), m), s);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  store_half_portable(values + i, n - i, mean, inv_std, dst + i);
}

// MEDGE_CPU_BASELINE=1 (anything but empty or "0"): use only baseline x86-64 code.
bool baseline_forced() {
  const char* force = std::getenv("MEDGE_CPU_BASELINE");
  return force != nullptr && force[0] != '\0' && force[0] != '0';
}

const bool kHaveF16c = !baseline_forced() && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
#endif

void store_half(const float* values, int64_t n, float mean, float inv_std, uint16_t* dst) {
#ifdef MEDGE_X86_DISPATCH
  if (kHaveF16c) return store_half_f16c(values, n, mean, inv_std, dst);
#endif
  store_half_portable(values, n, mean, inv_std, dst);
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
        store_half(values, len, mean, inv_std, static_cast<uint16_t*>(output) + base);
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

// Scratch memory of one worker thread, reused across work items.
struct Scratch {
  std::vector<float> decoded;   // the band's input rows, decoded and windowed
  std::vector<float> vertical;  // one output row before the horizontal filter (input width)
  std::vector<float> line;      // one output row of display values (region width)
  std::vector<float> pad;
};

// One work item: output rows [y0, y1) of image n. The band's input rows are
// decoded once; then, per output row, the vertical filter runs first over
// whole input rows (contiguous, vectorised) and the horizontal gather only on
// the output rows, which shrinking makes the cheaper order.
inline __attribute__((always_inline)) void run_band_body(const ImagePlan& plan, const OutputParams& out,
                                                          const RowWriter& writer, int64_t n, int32_t y0,
                                                          int32_t y1, Scratch& scratch) {
  const PreparedImage& im = plan.image;
  const int32_t region_w = im.region_width;
  const int32_t in_w = im.in_width;
  const int32_t taps_y = plan.rows.taps;

  int32_t in_lo = im.in_height, in_hi = 0;
  for (int32_t y = y0; y < y1; ++y) {
    const int32_t ry = y - im.region_top;
    if (ry < 0 || ry >= im.region_height) continue;
    in_lo = std::min(in_lo, plan.rows.first[ry]);
    in_hi = std::max(in_hi, plan.rows.first[ry] + taps_y);
  }
  if (in_hi > in_lo) {
    scratch.decoded.resize(static_cast<size_t>(in_hi - in_lo) * in_w);
    for (int32_t iy = in_lo; iy < in_hi; ++iy)
      display_row_any(im, iy, scratch.decoded.data() + static_cast<size_t>(iy - in_lo) * in_w);
  }
  scratch.vertical.resize(static_cast<size_t>(in_w));
  scratch.line.resize(static_cast<size_t>(region_w));

  for (int32_t y = y0; y < y1; ++y) {
    const int32_t ry = y - im.region_top;
    if (ry < 0 || ry >= im.region_height) {
      writer.fill(n, y, 0, out.width, out.pad_value, scratch.pad);
      continue;
    }
    float* __restrict__ vertical = scratch.vertical.data();
    const float* w = plan.rows.weights.data() + static_cast<size_t>(ry) * taps_y;
    const float* rows = scratch.decoded.data() + static_cast<size_t>(plan.rows.first[ry] - in_lo) * in_w;
    {
      const float w0 = w[0];
      for (int32_t x = 0; x < in_w; ++x) vertical[x] = w0 * rows[x];
    }
    for (int32_t k = 1; k < taps_y; ++k) {
      const float wk = w[k];
      if (wk == 0.0f) continue;
      const float* __restrict__ row = rows + static_cast<size_t>(k) * in_w;
      for (int32_t x = 0; x < in_w; ++x) vertical[x] += wk * row[x];
    }
    filter_row(plan.cols, vertical, scratch.line.data(), region_w);
    writer.write(n, y, im.region_left, scratch.line.data(), region_w);
    if (im.region_left > 0 || im.region_left + region_w < out.width) {
      writer.fill(n, y, 0, im.region_left, out.pad_value, scratch.pad);
      writer.fill(n, y, im.region_left + region_w, out.width - im.region_left - region_w, out.pad_value,
                  scratch.pad);
    }
  }
}

// `flatten` inlines the decode, filter and store loops into each variant.
__attribute__((flatten)) void run_band_baseline(const ImagePlan& plan, const OutputParams& out,
                                                const RowWriter& writer, int64_t n, int32_t y0, int32_t y1,
                                                Scratch& scratch) {
  run_band_body(plan, out, writer, n, y0, y1, scratch);
}

#ifdef MEDGE_X86_DISPATCH
__attribute__((target("avx2,fma,f16c"), flatten)) void run_band_avx2(const ImagePlan& plan, const OutputParams& out,
                                                                     const RowWriter& writer, int64_t n, int32_t y0,
                                                                     int32_t y1, Scratch& scratch) {
  run_band_body(plan, out, writer, n, y0, y1, scratch);
}

const bool kUseAvx2 = !baseline_forced() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
#endif

void run_band(const ImagePlan& plan, const OutputParams& out, const RowWriter& writer, int64_t n, int32_t y0,
              int32_t y1, Scratch& scratch) {
#ifdef MEDGE_X86_DISPATCH
  if (kUseAvx2) return run_band_avx2(plan, out, writer, n, y0, y1, scratch);
#endif
  run_band_baseline(plan, out, writer, n, y0, y1, scratch);
}

}  // namespace

std::string cpu_kernel_variant() {
#ifdef MEDGE_X86_DISPATCH
  return kUseAvx2 ? "x86-64 AVX2+FMA+F16C" : "x86-64 baseline";
#else
  return "portable";
#endif
}

void preprocess_cpu(const ImageParams* images, int64_t count, const OutputParams& out, void* output,
                    int64_t output_bytes, int num_threads) {
  detail::validate_output(out);
  if (count < 0 || count > kMaxBatch) throw InvalidArgument("batch size out of range");
  if (count == 0) return;
  if (images == nullptr) throw InvalidArgument("image parameter array is null");
  detail::check_output_buffer(output, output_bytes, out, count);

  // Validate everything before touching memory.
  std::vector<ImagePlan> plans(static_cast<size_t>(count));
  const bool antialias = out.resample == Resample::kBilinearAntialias;
  for (int64_t i = 0; i < count; ++i) {
    ImagePlan& plan = plans[static_cast<size_t>(i)];
    plan.image = detail::prepare_image(images[i], out, i);
    plan.rows = build_axis(plan.image.region_height, plan.image.in_height, antialias);
    plan.cols = build_axis(plan.image.region_width, plan.image.in_width, antialias);
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
    Scratch scratch;
    try {
      for (int64_t item = next.fetch_add(1); item < items; item = next.fetch_add(1)) {
        const int64_t n = item / bands;
        const int32_t band = static_cast<int32_t>(item % bands);
        const int32_t y0 = band * kBandRows;
        const int32_t y1 = static_cast<int32_t>(std::min<int64_t>(out.height, y0 + kBandRows));
        run_band(plans[static_cast<size_t>(n)], out, writer, n, y0, y1, scratch);
      }
    } catch (...) {  // std::bad_alloc; keep the first and stop the others
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
      // The OS refused a thread (process/thread limit, cgroup pids.max, no
      // memory for its stack). Letting this escape would destroy joinable
      // std::threads, which calls std::terminate and takes the host process
      // down: stop the workers already running (they finish their current
      // band), join them, then report. The output is incomplete, so this is
      // an error rather than a quiet fallback to fewer threads.
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

}  // namespace medge
