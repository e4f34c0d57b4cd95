// Bodies of medge's CUDA preprocessing kernels, written once and compiled
// twice: by nvcc into the real kernels (preprocess_cuda.cu) and by the host
// compiler into an emulator that runs them without a GPU (preprocess_emulation.cpp,
// through cuda_shim.h), so CI checks their indexing against the CPU path.
// Also the launch plan both of them execute (launch_plan.cpp).
//
// Tiled kernel, one tile = up to kTileRows x tile_w output pixels of one image:
//   phase_context     thread 0 decides the tile's region part and input columns
//   phase_tables      vertical taps of the tile's rows (and horizontal ones past
//                     kRegisterTaps) into shared memory, normalised as on the CPU
//   phase_vertical    each thread walks a 16-byte column chunk of the input down
//                     its rows: decode + modality + VOI once per input pixel, the
//                     vertical filter accumulated in registers; the filtered rows
//                     (input width, output rows) land in shared memory
//   phase_horizontal  each thread takes a pair of output columns: horizontal taps
//                     from shared memory, normalisation, half2 / float2 stores
// Barriers separate the phases; a block loops over tiles (persistent grid).
// The emulator runs each phase for every thread of a block before the next,
// which is what the barriers guarantee on the GPU.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "medge/cuda_shim.h"
#include "medge/pixel_math.h"
#include "medge/preprocess.h"

namespace medge {
namespace kernels {

using detail::AxisTaps;
using detail::PreparedImage;
using detail::Shape;

constexpr int kBlockThreads = 128;    // tiled kernel
constexpr int kTileRows = 16;         // output rows per tile
constexpr int kRowGroups = 2;         // threads per column chunk in phase_vertical (each walks kGroupRows rows)
constexpr int kGroupRows = kTileRows / kRowGroups;
constexpr int kMaxTileWidth = 256;    // output columns per tile, at most
constexpr int kImagesPerLaunch = 64;  // KernelImage is 104 bytes: 6.8 KB of parameters (CUDA 12.1+: up to 32 KB)
constexpr int kRegisterTaps = 8;      // horizontal taps held in registers; wider filters read a shared table
constexpr int kMaxTaps = 64;          // per axis in the tiled kernel (shrinking by up to 32x); beyond: gather kernel
constexpr int kSharedBudgetBytes = 48 * 1024;  // dynamic shared memory per block (no opt-in needed anywhere)
constexpr int kGatherBlockX = 32;
constexpr int kGatherBlockY = 8;

// Input elements per thread and vector load: 16 bytes (8 for uint8, whose 16
// values would cost 48 registers of accumulators).
template <typename T>
struct Chunk {
  static constexpr int kElems = sizeof(T) == 1 ? 8 : static_cast<int>(16 / sizeof(T));
  static constexpr int kBytes = kElems * static_cast<int>(sizeof(T));
};

MEDGE_HD int chunk_elems(PixelType type) {
  return type == PixelType::kUInt8 ? 8 : (type == PixelType::kInt32 || type == PixelType::kFloat32 ? 4 : 8);
}

enum ImageFlags : uint32_t {
  kVectorRows = 1u,  // pixels and row pitch are aligned to the chunk: whole chunks load as one vector
  kPushRows = 2u,    // vertical axis antialiased while shrinking: rows are pushed into two accumulators
};

struct KernelImage {
  PreparedImage im;
  int32_t batch_index;  // n of the output
  int32_t taps_x;       // window width of the horizontal filter (K >= every output column's taps)
  int32_t taps_y;       // most taps of any output row
  uint32_t flags;
};

struct KernelOutput {
  void* data;
  int64_t elements;  // of the whole output (bounds checks in emulation)
  int32_t height, width, channels;
  int32_t half;       // float16 output (else float32)
  int32_t vec_store;  // pairs of columns may be stored as one half2 / float2
  int32_t antialias;
  float pad_value;
  float mean[3];
  float inv_std[3];
};

struct TiledLaunch {
  KernelOutput out;
  int32_t count;  // images in images[]
  int32_t tile_w, tiles_x, tiles_y, total_tiles;
  // Shared memory layout, in 4-byte words from the start.
  int32_t ky_stride;  // y weights per row
  int32_t kx_stride;  // x weights per column (0: no image of this launch needs the x table)
  int32_t off_ylo, off_yhi, off_yw, off_xfirst, off_xw, off_vbuf;
  int32_t vbuf_cols;   // input columns a vbuf row holds
  int32_t vbuf_pitch;  // words per vbuf row (skewed: vbuf_cols + vbuf_cols / 32 + 1)
  int32_t smem_words;
  KernelImage images[kImagesPerLaunch];
};

struct GatherLaunch {
  KernelOutput out;
  int32_t count;
  KernelImage images[kImagesPerLaunch];
};

// The tile a block is working on: written by thread 0, read by all.
struct TileContext {
  int32_t img;         // index into TiledLaunch::images
  int32_t y0, x0;      // output origin
  int32_t rows, cols;  // output pixels of the tile (clipped to the output)
  int32_t ry0, nry;    // region rows of the tile (region coordinates); nry == 0: all padding
  int32_t rx0, nrx;    // region columns of the tile
  int32_t cs;          // first input column held in vbuf (a multiple of the chunk)
  int32_t nchunks;     // column chunks held in vbuf
};
constexpr int kContextWords = (static_cast<int>(sizeof(TileContext)) + 15) / 16 * 4;

// Shared memory of one block, with bounds checks in emulation.
struct Shared {
  uint32_t* words;
  int32_t size;
  MEDGE_HD float& f(int32_t i) const {
    MEDGE_EMU_CHECK(i >= 0 && i < size, "shared memory (float) index out of range");
    return reinterpret_cast<float*>(words)[i];
  }
  MEDGE_HD int32_t& i(int32_t i) const {
    MEDGE_EMU_CHECK(i >= 0 && i < size, "shared memory (int) index out of range");
    return reinterpret_cast<int32_t*>(words)[i];
  }
  MEDGE_HD TileContext& context() const { return *reinterpret_cast<TileContext*>(words); }
};

// vbuf column of input column offset `c` (from TileContext::cs): one word of
// skew per 32 columns, so the horizontal filter's strided reads (2, 4, 8 words
// apart when shrinking 1x, 2x, 4x) fall in distinct banks.
MEDGE_HD int32_t skewed(int32_t c) { return c + (c >> 5); }

MEDGE_HD int32_t clamp_int(int32_t v, int32_t lo, int32_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// ---------------------------------------------------------------------------
// Loads and decoding

template <int Bytes>
struct RawWords {
  uint32_t w[Bytes / 4];
};

template <int Bytes>
MEDGE_HD RawWords<Bytes> load_vector(const void* p) {
  RawWords<Bytes> r;
#if defined(MEDGE_EMULATION)
  MEDGE_EMU_CHECK(reinterpret_cast<std::uintptr_t>(p) % Bytes == 0, "misaligned vector load");
  MEDGE_EMU_CHECK_READ(p, Bytes);
  std::memcpy(r.w, p, Bytes);
#else
  if constexpr (Bytes == 16) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    r.w[0] = v.x, r.w[1] = v.y, r.w[2] = v.z, r.w[3] = v.w;
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    r.w[0] = v.x, r.w[1] = v.y;
  }
#endif
  return r;
}

template <typename T>
MEDGE_HD T read_element(const T* p) {
  MEDGE_EMU_CHECK_READ(p, sizeof(T));
  return *p;
}

template <typename T>
MEDGE_HD T element_of(const uint32_t* words, int e) {
  if constexpr (sizeof(T) == 4) {
    T v;
    std::memcpy(&v, &words[e], 4);
    return v;
  } else if constexpr (sizeof(T) == 2) {
    return static_cast<T>(static_cast<uint16_t>(words[e >> 1] >> ((e & 1) * 16)));
  } else {
    return static_cast<T>(static_cast<uint8_t>(words[e >> 2] >> ((e & 3) * 8)));
  }
}

// Display value of one stored value: the CPU path's display_row, term for term.
template <typename T, Shape S>
MEDGE_HD float display_of(const PreparedImage& im, T raw) {
  const float v = detail::apply_shape<S>((detail::centred_value<T>(im, raw) - im.frac) * im.scale + im.offset);
  return im.invert ? 1.0f - v : v;
}

// Display values of input row `row`, columns [col, col + kElems). Columns at or
// past the image width are not read (0). One vector load when the chunk lies
// inside the row and rows are vector-aligned, element loads otherwise.
template <typename T, Shape S>
MEDGE_HD void load_display_chunk(const KernelImage& k, int32_t row, int32_t col, float (&d)[Chunk<T>::kElems]) {
  constexpr int V = Chunk<T>::kElems;
  const PreparedImage& im = k.im;
  MEDGE_EMU_CHECK(row >= 0 && row < im.in_height && col >= 0 && col < im.in_width, "read outside the image");
  const T* src = static_cast<const T*>(im.pixels) + static_cast<int64_t>(row) * im.row_stride + col;
  T raw[V];
  if ((k.flags & kVectorRows) && col + V <= im.in_width) {
    const RawWords<Chunk<T>::kBytes> words = load_vector<Chunk<T>::kBytes>(src);
MEDGE_UNROLL
    for (int e = 0; e < V; ++e) raw[e] = element_of<T>(words.w, e);
  } else {
MEDGE_UNROLL
    for (int e = 0; e < V; ++e) raw[e] = col + e < im.in_width ? read_element(src + e) : T(0);
  }
MEDGE_UNROLL
  for (int e = 0; e < V; ++e) d[e] = display_of<T, S>(im, raw[e]);
}

// ---------------------------------------------------------------------------
// Tiled kernel phases

// Thread 0: which tile, which part of it shows the image, which input columns it needs.
MEDGE_HD void phase_context(const TiledLaunch& p, int32_t tile, const Shared& sm) {
  if (threadIdx.x != 0) return;
  TileContext c;
  const int32_t per_image = p.tiles_x * p.tiles_y;
  c.img = tile / per_image;
  const int32_t rest = tile - c.img * per_image;
  const int32_t ty = rest / p.tiles_x;
  const int32_t tx = rest - ty * p.tiles_x;
  c.y0 = ty * kTileRows;
  c.x0 = tx * p.tile_w;
  c.rows = p.out.height - c.y0 < kTileRows ? p.out.height - c.y0 : kTileRows;
  c.cols = p.out.width - c.x0 < p.tile_w ? p.out.width - c.x0 : p.tile_w;
  const KernelImage& k = p.images[c.img];
  const PreparedImage& im = k.im;
  const int32_t ry_end = clamp_int(c.y0 + c.rows - im.region_top, 0, im.region_height);
  const int32_t rx_end = clamp_int(c.x0 + c.cols - im.region_left, 0, im.region_width);
  c.ry0 = clamp_int(c.y0 - im.region_top, 0, im.region_height);
  c.rx0 = clamp_int(c.x0 - im.region_left, 0, im.region_width);
  c.nry = ry_end - c.ry0;
  c.nrx = rx_end - c.rx0;
  c.cs = 0;
  c.nchunks = 0;
  if (c.nry <= 0 || c.nrx <= 0) {
    c.nry = c.nrx = 0;
  } else {
    const int32_t V = chunk_elems(im.pixel_type);
    const bool aa = p.out.antialias != 0;
    const AxisTaps left = detail::axis_taps32(c.rx0, im.region_width, im.in_width, aa);
    const AxisTaps right = detail::axis_taps32(rx_end - 1, im.region_width, im.in_width, aa);
    const int32_t lo = detail::fixed_window_first(left, im.in_width, k.taps_x);
    const int32_t hi = detail::fixed_window_first(right, im.in_width, k.taps_x) + k.taps_x;
    c.cs = lo / V * V;
    c.nchunks = (hi - c.cs + V - 1) / V;
    // The plan sized vbuf from a bound on this; a tile beyond it would overwrite shared memory.
    MEDGE_EMU_CHECK(c.nchunks * V <= p.vbuf_cols, "tile needs more vbuf columns than the plan reserved");
#if defined(__CUDA_ARCH__)
    if (c.nchunks * V > p.vbuf_cols) __trap();
#endif
  }
  sm.context() = c;
}

// Vertical taps of the tile's region rows; horizontal ones when wider than kRegisterTaps.
MEDGE_HD void phase_tables(const TiledLaunch& p, const Shared& sm) {
  const TileContext c = sm.context();
  if (c.nry == 0) return;
  const KernelImage& k = p.images[c.img];
  const PreparedImage& im = k.im;
  const bool aa = p.out.antialias != 0;
  for (int32_t q = threadIdx.x; q < c.nry; q += blockDim.x) {
    const AxisTaps t = detail::axis_taps32(c.ry0 + q, im.region_height, im.in_height, aa);
    const float total = detail::taps_total(t);
    const int32_t base = p.off_yw + q * p.ky_stride;
    if (k.flags & kPushRows) {  // the real window [first, first + count)
      MEDGE_EMU_CHECK(t.count <= p.ky_stride, "more vertical taps than the plan reserved");
      sm.i(p.off_ylo + q) = t.first;
      sm.i(p.off_yhi + q) = t.first + t.count;
      for (int32_t j = 0; j < t.count; ++j) sm.f(base + j) = detail::window_weight(t, t.first, j, total);
    } else {  // bilinear: a window of taps_y (2, or 1 for a one-row image) kept inside the image
      const int32_t first = detail::fixed_window_first(t, im.in_height, k.taps_y);
      sm.i(p.off_ylo + q) = first;
      sm.i(p.off_yhi + q) = first + k.taps_y;
      for (int32_t j = 0; j < k.taps_y; ++j) sm.f(base + j) = detail::window_weight(t, first, j, total);
    }
  }
  if (k.taps_x > kRegisterTaps) {
    for (int32_t q = threadIdx.x; q < c.nrx; q += blockDim.x) {
      const AxisTaps t = detail::axis_taps32(c.rx0 + q, im.region_width, im.in_width, aa);
      const float total = detail::taps_total(t);
      const int32_t first = detail::fixed_window_first(t, im.in_width, k.taps_x);
      sm.i(p.off_xfirst + q) = first - c.cs;
      for (int32_t j = 0; j < k.taps_x; ++j)
        sm.f(p.off_xw + q * p.kx_stride + j) = detail::window_weight(t, first, j, total);
    }
  }
}

template <int V>
MEDGE_HD void store_vbuf(const TiledLaunch& p, const Shared& sm, int32_t q, int32_t local_col, const float (&v)[V]) {
  const int32_t base = p.off_vbuf + q * p.vbuf_pitch + skewed(local_col);  // V divides 32: one skew for the chunk
MEDGE_UNROLL
  for (int e = 0; e < V; ++e) sm.f(base + e) = v[e];
}

// Antialiased shrinking: every input row of the group is decoded once and
// pushed into the (at most two) output rows whose windows hold it. Two,
// because windows are 2*support long and their centres support apart: a half-
// open interval of that length holds exactly two of them (clamping at the
// image edges only shortens windows).
template <typename T, Shape S>
MEDGE_HD void vertical_push(const TiledLaunch& p, const Shared& sm, const KernelImage& k, int32_t q0, int32_t q1,
                            int32_t col, int32_t local_col) {
  constexpr int V = Chunk<T>::kElems;
  float a[V], b[V], d[V];  // a: output row j, b: row j + 1
MEDGE_UNROLL
  for (int e = 0; e < V; ++e) a[e] = b[e] = 0.0f;
  int32_t j = q0;
  int32_t lo0 = sm.i(p.off_ylo + j), hi0 = sm.i(p.off_yhi + j);
  int32_t lo1 = j + 1 < q1 ? sm.i(p.off_ylo + j + 1) : 0x7fffffff;
  for (int32_t r = lo0;; ++r) {
    MEDGE_EMU_CHECK(r >= lo0 && r < hi0, "vertical push: row outside the current output's window");
    MEDGE_EMU_CHECK(j + 2 >= q1 || r < sm.i(p.off_ylo + j + 2), "vertical push: a row in three windows");
    load_display_chunk<T, S>(k, r, col, d);
    const float w0 = sm.f(p.off_yw + j * p.ky_stride + (r - lo0));
    const float w1 = r >= lo1 ? sm.f(p.off_yw + (j + 1) * p.ky_stride + (r - lo1)) : 0.0f;
MEDGE_UNROLL
    for (int e = 0; e < V; ++e) {
      a[e] += w0 * d[e];
      b[e] += w1 * d[e];
    }
    while (r == hi0 - 1) {  // output row j is complete (twice only at the image's last row)
      store_vbuf<V>(p, sm, j, local_col, a);
      if (++j >= q1) return;
MEDGE_UNROLL
      for (int e = 0; e < V; ++e) {
        a[e] = b[e];
        b[e] = 0.0f;
      }
      lo0 = lo1;
      hi0 = sm.i(p.off_yhi + j);
      lo1 = j + 1 < q1 ? sm.i(p.off_ylo + j + 1) : 0x7fffffff;
    }
  }
}

// Bilinear rows (enlarging, or no antialiasing): a window of taps_y rows per
// output row; the two decoded rows stay in registers while consecutive output
// rows share them.
template <typename T, Shape S>
MEDGE_HD void vertical_gather(const TiledLaunch& p, const Shared& sm, const KernelImage& k, int32_t q0, int32_t q1,
                              int32_t col, int32_t local_col) {
  constexpr int V = Chunk<T>::kElems;
  float ra[V], rb[V], v[V];
MEDGE_UNROLL
  for (int e = 0; e < V; ++e) ra[e] = rb[e] = 0.0f;
  const bool two = k.taps_y == 2;
  int32_t cached = -2;
  for (int32_t j = q0; j < q1; ++j) {
    const int32_t f = sm.i(p.off_ylo + j);
    const float w0 = sm.f(p.off_yw + j * p.ky_stride);
    const float w1 = two ? sm.f(p.off_yw + j * p.ky_stride + 1) : 0.0f;
    if (f != cached) {
      if (two && f == cached + 1) {
MEDGE_UNROLL
        for (int e = 0; e < V; ++e) ra[e] = rb[e];
      } else {
        load_display_chunk<T, S>(k, f, col, ra);
      }
      if (two) load_display_chunk<T, S>(k, f + 1, col, rb);
      cached = f;
    }
MEDGE_UNROLL
    for (int e = 0; e < V; ++e) {
      v[e] = w0 * ra[e];  // the CPU path's order: first row, then the second added (one fma)
      v[e] += w1 * rb[e];
    }
    store_vbuf<V>(p, sm, j, local_col, v);
  }
}

template <typename T, Shape S>
MEDGE_HD void vertical_items(const TiledLaunch& p, const Shared& sm, const TileContext& c) {
  constexpr int V = Chunk<T>::kElems;
  const KernelImage& k = p.images[c.img];
  const int32_t items = kRowGroups * c.nchunks;
  for (int32_t item = threadIdx.x; item < items; item += blockDim.x) {
    const int32_t g = item / c.nchunks;
    const int32_t chunk = item - g * c.nchunks;
    const int32_t q0 = g * kGroupRows;
    const int32_t q1 = q0 + kGroupRows < c.nry ? q0 + kGroupRows : c.nry;
    if (q0 >= q1) continue;
    const int32_t local_col = chunk * V;
    if (k.flags & kPushRows) {
      vertical_push<T, S>(p, sm, k, q0, q1, c.cs + local_col, local_col);
    } else {
      vertical_gather<T, S>(p, sm, k, q0, q1, c.cs + local_col, local_col);
    }
  }
}

template <typename T>
MEDGE_HD void phase_vertical(const TiledLaunch& p, const Shared& sm) {
  const TileContext c = sm.context();
  if (c.nry == 0) return;
  switch (p.images[c.img].im.shape) {  // uniform per tile
    case Shape::kClamp: return vertical_items<T, Shape::kClamp>(p, sm, c);
    case Shape::kStep: return vertical_items<T, Shape::kStep>(p, sm, c);
    case Shape::kSigmoid: return vertical_items<T, Shape::kSigmoid>(p, sm, c);
  }
}

// Output writes: one pair of columns (x, x + 1) of row y, every channel.
template <bool Half>
MEDGE_HD void store_pair(const KernelOutput& o, int32_t n, int32_t y, int32_t x, bool second, float va, float vb) {
  const int64_t plane = static_cast<int64_t>(o.height) * o.width;
  const int64_t pixel = static_cast<int64_t>(y) * o.width + x;
  for (int32_t ch = 0; ch < o.channels; ++ch) {
    const float a = (va - o.mean[ch]) * o.inv_std[ch];
    const float b = (vb - o.mean[ch]) * o.inv_std[ch];
    const int64_t index = (static_cast<int64_t>(n) * o.channels + ch) * plane + pixel;
    MEDGE_EMU_CHECK(index >= 0 && index + (second ? 2 : 1) <= o.elements, "write outside the output");
    if constexpr (Half) {
      __half* dst = static_cast<__half*>(o.data) + index;
      if (second && o.vec_store) {
        MEDGE_EMU_CHECK(reinterpret_cast<std::uintptr_t>(dst) % 4 == 0, "misaligned half2 store");
        *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
      } else {
        dst[0] = __float2half_rn(a);
        if (second) dst[1] = __float2half_rn(b);
      }
    } else {
      float* dst = static_cast<float*>(o.data) + index;
      if (second && o.vec_store) {
        MEDGE_EMU_CHECK(reinterpret_cast<std::uintptr_t>(dst) % 8 == 0, "misaligned float2 store");
        float2 v;
        v.x = a, v.y = b;
        *reinterpret_cast<float2*>(dst) = v;
      } else {
        dst[0] = a;
        if (second) dst[1] = b;
      }
    }
  }
}

// Horizontal taps of one output column (region column rx), K in registers.
template <int K>
struct ColumnTaps {
  int32_t first;  // vbuf column offset (from TileContext::cs)
  float w[K];
};

template <int K>
MEDGE_HD ColumnTaps<K> column_taps(const KernelImage& k, int32_t rx, int32_t cs, bool aa) {
  const PreparedImage& im = k.im;
  const AxisTaps t = detail::axis_taps32(rx, im.region_width, im.in_width, aa);
  const float total = detail::taps_total(t);
  const int32_t first = detail::fixed_window_first(t, im.in_width, K);
  ColumnTaps<K> c;
  c.first = first - cs;
MEDGE_UNROLL
  for (int j = 0; j < K; ++j) c.w[j] = detail::window_weight(t, first, j, total);
  return c;
}

template <int K>
MEDGE_HD float filter_row(const Shared& sm, int32_t row_base, const ColumnTaps<K>& t) {
  float acc = 0.0f;
MEDGE_UNROLL
  for (int j = 0; j < K; ++j) acc += t.w[j] * sm.f(row_base + skewed(t.first + j));
  return acc;
}

// K = 0: the shared x table (taps_x > kRegisterTaps), else K taps in registers.
template <int K, bool Half>
MEDGE_HD void horizontal_pairs(const TiledLaunch& p, const Shared& sm, const TileContext& c) {
  const KernelImage& k = p.images[c.img];
  const PreparedImage& im = k.im;
  const bool aa = p.out.antialias != 0;
  const int32_t pairs = (c.cols + 1) / 2;
  for (int32_t pi = threadIdx.x; pi < pairs; pi += blockDim.x) {
    const int32_t x = c.x0 + 2 * pi;
    const bool second = 2 * pi + 1 < c.cols;
    const int32_t rxa = x - im.region_left - c.rx0, rxb = rxa + 1;  // tile-local region columns
    const bool ina = c.nrx > 0 && rxa >= 0 && rxa < c.nrx;
    const bool inb = second && c.nrx > 0 && rxb >= 0 && rxb < c.nrx;
    constexpr int KR = K > 0 ? K : 1;
    ColumnTaps<KR> ta{}, tb{};
    if (K > 0) {
      if (ina) ta = column_taps<KR>(k, c.rx0 + rxa, c.cs, aa);
      if (inb) tb = column_taps<KR>(k, c.rx0 + rxb, c.cs, aa);
    }
    for (int32_t q = 0; q < c.rows; ++q) {
      const int32_t y = c.y0 + q;
      const int32_t ry = y - im.region_top - c.ry0;  // tile-local region row
      const bool row_in = ry >= 0 && ry < c.nry;
      float va = p.out.pad_value, vb = p.out.pad_value;
      if (row_in) {
        const int32_t row_base = p.off_vbuf + ry * p.vbuf_pitch;
        if (K > 0) {
          if (ina) va = filter_row<KR>(sm, row_base, ta);
          if (inb) vb = filter_row<KR>(sm, row_base, tb);
        } else {
          const int32_t kx = k.taps_x;
          if (ina) {
            const int32_t f = sm.i(p.off_xfirst + rxa), wb = p.off_xw + rxa * p.kx_stride;
            float acc = 0.0f;
            for (int32_t j = 0; j < kx; ++j) acc += sm.f(wb + j) * sm.f(row_base + skewed(f + j));
            va = acc;
          }
          if (inb) {
            const int32_t f = sm.i(p.off_xfirst + rxb), wb = p.off_xw + rxb * p.kx_stride;
            float acc = 0.0f;
            for (int32_t j = 0; j < kx; ++j) acc += sm.f(wb + j) * sm.f(row_base + skewed(f + j));
            vb = acc;
          }
        }
      }
      store_pair<Half>(p.out, k.batch_index, y, x, second, va, vb);
    }
  }
}

template <bool Half>
MEDGE_HD void phase_horizontal(const TiledLaunch& p, const Shared& sm) {
  const TileContext c = sm.context();
  const int32_t kx = c.nry == 0 ? 1 : p.images[c.img].taps_x;  // padding only: no taps needed
  switch (kx) {
    case 1: return horizontal_pairs<1, Half>(p, sm, c);
    case 2: return horizontal_pairs<2, Half>(p, sm, c);
    case 3: return horizontal_pairs<3, Half>(p, sm, c);
    case 4: return horizontal_pairs<4, Half>(p, sm, c);
    case 5: return horizontal_pairs<5, Half>(p, sm, c);
    case 6: return horizontal_pairs<6, Half>(p, sm, c);
    case 7: return horizontal_pairs<7, Half>(p, sm, c);
    case 8: return horizontal_pairs<8, Half>(p, sm, c);
    default: return horizontal_pairs<0, Half>(p, sm, c);
  }
}

// The whole tiled kernel. Block::run(f) runs phase f for every thread of the
// block and then lets them all past a barrier: f() then __syncthreads() on the
// GPU; a loop over the threads in the emulator.
template <typename T, bool Half, class Block>
MEDGE_HD void tiled_body(Block& block, const TiledLaunch& p, const Shared& sm) {
  for (int32_t tile = static_cast<int32_t>(blockIdx.x); tile < p.total_tiles;
       tile += static_cast<int32_t>(gridDim.x)) {
    block.run([&] { phase_context(p, tile, sm); });
    block.run([&] { phase_tables(p, sm); });
    block.run([&] { phase_vertical<T>(p, sm); });
    block.run([&] { phase_horizontal<Half>(p, sm); });
  }
}

// ---------------------------------------------------------------------------
// Gather kernel: one thread per output pixel, every tap read straight from the
// stored values. For what the tiled kernel does not take (more than kMaxTaps
// taps on an axis, tiles whose input does not fit the shared budget).

template <typename T>
MEDGE_HD float gather_display(const PreparedImage& im, int32_t ry, int32_t rx, bool antialias) {
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
      if (wx == 0.0f) continue;
      const int32_t y = ty.first + ky, x = tx.first + kx;
      MEDGE_EMU_CHECK(y >= 0 && y < im.in_height && x >= 0 && x < im.in_width, "read outside the image");
      const T* src = static_cast<const T*>(im.pixels) + static_cast<int64_t>(y) * im.row_stride + x;
      row += wx * detail::display_value(im, detail::centred_value<T>(im, read_element(src)));  // = load_display
    }
    acc += wy * row;
  }
  return acc / (wy_total * wx_total);
}

MEDGE_HD void gather_body(const GatherLaunch& p) {
  const int32_t x = static_cast<int32_t>(blockIdx.x * kGatherBlockX + threadIdx.x);
  const int32_t y = static_cast<int32_t>(blockIdx.y * kGatherBlockY + threadIdx.y);
  const KernelOutput& out = p.out;
  if (x >= out.width || y >= out.height) return;
  const KernelImage& k = p.images[blockIdx.z];
  const PreparedImage& im = k.im;
  const int32_t ry = y - im.region_top;
  const int32_t rx = x - im.region_left;
  float display = out.pad_value;
  if (ry >= 0 && ry < im.region_height && rx >= 0 && rx < im.region_width) {
    const bool aa = out.antialias != 0;
    switch (im.pixel_type) {  // uniform per block: blockIdx.z is one image
      case PixelType::kUInt8: display = gather_display<uint8_t>(im, ry, rx, aa); break;
      case PixelType::kUInt16: display = gather_display<uint16_t>(im, ry, rx, aa); break;
      case PixelType::kInt16: display = gather_display<int16_t>(im, ry, rx, aa); break;
      case PixelType::kInt32: display = gather_display<int32_t>(im, ry, rx, aa); break;
      case PixelType::kFloat32: display = gather_display<float>(im, ry, rx, aa); break;
    }
  }
  const int64_t plane = static_cast<int64_t>(out.height) * out.width;
  const int64_t pixel = static_cast<int64_t>(y) * out.width + x;
  for (int32_t ch = 0; ch < out.channels; ++ch) {
    const float v = (display - out.mean[ch]) * out.inv_std[ch];
    const int64_t index = (static_cast<int64_t>(k.batch_index) * out.channels + ch) * plane + pixel;
    MEDGE_EMU_CHECK(index >= 0 && index < out.elements, "write outside the output");
    if (out.half) {
      static_cast<__half*>(out.data)[index] = __float2half_rn(v);
    } else {
      static_cast<float*>(out.data)[index] = v;
    }
  }
}

// ---------------------------------------------------------------------------
// Launch plan (host): which images go to which kernel, in how many launches,
// with what tile width and shared memory. launch_plan.cpp.

struct Launch {
  bool tiled = true;
  PixelType pixel_type = PixelType::kUInt16;  // tiled launches hold one pixel type
  int32_t blocks = 0;  // tiled: tiles (the launcher caps the grid at what stays resident)
  int32_t gather_grid[3] = {0, 0, 0};  // gather launches (x, y, z); no dim3: this struct is shared with host-only code
  int32_t smem_bytes = 0;
  TiledLaunch tiled_params{};
  GatherLaunch gather_params{};
};

// Plans the launches for `count` prepared images writing into `output`.
// images_per_launch <= kImagesPerLaunch (smaller values: tests of the chunking).
std::vector<Launch> plan_launches(const PreparedImage* images, int64_t count, const OutputParams& out, void* output,
                                  int images_per_launch);

}  // namespace kernels
}  // namespace medge
