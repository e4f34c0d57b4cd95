// Bodies of medge's CUDA preprocessing kernels, written once and compiled
// twice: by nvcc into the real kernels (preprocess_cuda.cu) and by the host
// compiler into an emulator that runs them without a GPU (preprocess_emulation.cpp,
// through cuda_shim.h), so CI checks their indexing against the CPU path.
// Also the launch plan both of them execute (launch_plan.cpp).
//
// Tiled kernel, one tile = up to kTileRows x tile_w output pixels of one image:
//   phase_context     thread 0 decides the tile's region part and input columns
//   phase_tables      vertical taps of the tile's rows (horizontal ones too for
//                     unusual widths) into shared memory, normalised as on the CPU
//   phase_vertical    each thread walks a 16-byte column chunk of the input down
//                     its rows: decode + modality + VOI once per input pixel, the
//                     vertical filter accumulated in registers; the filtered rows
//                     (input width, output rows) land in shared memory
//   phase_horizontal  each thread takes a pair of output columns: horizontal taps
//                     from shared memory (contiguous, so one address per row and
//                     immediate offsets), polarity, normalisation, half2 / float2 stores
// Barriers separate the phases; a block loops over tiles (persistent grid).
// The emulator runs each phase for every thread of a block before the next,
// which is what the barriers guarantee on the GPU.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
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
constexpr int kMinBlocksPerSM = 6;    // register budget (80 per thread): 6 blocks fit a 2x shrink's ~35 KB of shared memory
constexpr int kTileRows = 16;         // output rows per tile
constexpr int kRowGroups = 2;         // threads per column chunk in phase_vertical (each walks kGroupRows rows)
constexpr int kGroupRows = kTileRows / kRowGroups;
constexpr int kMaxTileWidth = 256;    // output columns per tile, at most
constexpr int kImagesPerLaunch = 64;  // KernelImage is 104 bytes: 6.8 KB of parameters (CUDA 12.1+: up to 32 KB)
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
  kXTable = 4u,      // horizontal taps from a shared table (taps_x not one of kRegisterWindows)
  kHalfPivot = 8u,   // 8/16-bit clamp image whose transform centre is a multiple of 1/2 (see ChunkDecoder)
};

// Horizontal window widths with a register-only loop; other widths (1, 7 padded
// to 8 when the image is wide enough, and everything past 8) use the shared table.
constexpr int kRegisterWindows[] = {2, 3, 4, 5, 6, 8};

struct KernelImage {
  PreparedImage im;
  int32_t batch_index;  // n of the output
  int32_t taps_x;       // window width of the horizontal filter (>= every output column's taps)
  int32_t taps_y;       // most taps of any output row
  uint32_t flags;
  int32_t half_bias;    // kHalfPivot: 2 (stored - pivot - frac) = 2 value - half_bias, exactly
  float half_scale;     // kHalfPivot: scale / 2
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
  int32_t vbuf_pitch;  // words per vbuf row (vbuf_cols, a multiple of 4: rows stay 16-byte aligned)
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
  // Words [i, i + n) as one pointer, so that the compiler addresses them from one register.
  MEDGE_HD float* span(int32_t i, int32_t n) const {
    MEDGE_EMU_CHECK(i >= 0 && n >= 0 && i + n <= size, "shared memory span out of range");
    (void)n;
    return reinterpret_cast<float*>(words) + i;
  }
  // *p for a pointer into this block's shared memory (checked in emulation).
  MEDGE_HD float read(const float* p) const {
    MEDGE_EMU_CHECK(p >= reinterpret_cast<const float*>(words) && p < reinterpret_cast<const float*>(words) + size,
                    "shared memory read out of range");
    return *p;
  }
  MEDGE_HD TileContext& context() const { return *reinterpret_cast<TileContext*>(words); }
};

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

// How a chunk's stored values become display values (before polarity).
enum class Decode : int {
  kHalfPivot,  // clamp, 8/16-bit, (stored - pivot - frac) doubled into an exact integer: 6 instructions a value
  kClamp,      // clamp: the CPU path's ((stored - pivot) - frac) * scale + offset, clamped
  kAnyShape,   // any VOI shape, chosen per value (step, sigmoid; element loads)
};

// Decodes column chunks [col, col + kElems) of one image's rows into display
// values before polarity, the CPU path's display_row term for term (MONOCHROME1
// inversion is linear, so the tiled kernel applies it to resampled values:
// 1 - sum(w y) / sum(w) instead of sum(w (1 - y)) / sum(w), rounding apart).
// The image's parameters are copied into registers once per chunk, not read
// from the kernel parameters at every row. T is the container as stored:
// uint16_t serves int16 images too (Pixel Representation is in sign_bit).
template <typename T, Decode D>
struct ChunkDecoder {
  static constexpr int V = Chunk<T>::kElems;
  const char* base;      // row 0, column col
  int64_t row_bytes;
  int32_t valid;         // columns of the chunk inside the image (the rest is not read)
  uint32_t mask, sign;
  int32_t pivot32;       // 8/16-bit containers: (stored - pivot) in int32, as centred_value
  int32_t half_bias;
  int64_t pivot64;       // int32 container: in int64
  float pivot_float;     // float32 container
  float frac, scale, offset, half_scale;
  Shape shape;
#if defined(MEDGE_EMULATION)
  int32_t rows;
#endif

  MEDGE_HD ChunkDecoder(const KernelImage& k, int32_t col) {
    MEDGE_EMU_CHECK(col >= 0 && col < k.im.in_width, "chunk starts outside the image");
    base = static_cast<const char*>(k.im.pixels) + static_cast<int64_t>(col) * static_cast<int64_t>(sizeof(T));
    row_bytes = k.im.row_stride * static_cast<int64_t>(sizeof(T));
    valid = k.im.in_width - col < V ? k.im.in_width - col : V;
    mask = k.im.value_mask;
    sign = k.im.sign_bit;
    pivot32 = static_cast<int32_t>(k.im.pivot);
    half_bias = k.half_bias;
    pivot64 = k.im.pivot;
    pivot_float = k.im.pivot_float;
    frac = k.im.frac;
    scale = k.im.scale;
    offset = k.im.offset;
    half_scale = k.half_scale;
    shape = k.im.shape;
#if defined(MEDGE_EMULATION)
    rows = k.im.in_height;
#endif
  }

  // Display value (before polarity) of one container value; `bits` holds it zero-extended
  // (8/16-bit containers; bits above the container may be set: the mask removes them).
  MEDGE_HD float value(uint32_t bits, T raw) const {
    if constexpr (sizeof(T) <= 2 && D == Decode::kHalfPivot) {
      // Bits Stored <= container bits, so mask < 2^16 and (bits & mask) ^ sign is one LOP3;
      // 2 (stored - pivot - frac) = 2 ((bits & mask) ^ sign) - half_bias is exact (|.| < 2^24), and
      // (2 c) * (scale / 2) = c * scale exactly: the CPU's fma((c - frac), scale, offset), bit for bit.
      const int32_t c2 = 2 * static_cast<int32_t>((bits & mask) ^ sign) - half_bias;
      return shim::saturate(static_cast<float>(c2) * half_scale + offset);
    } else {
      float centred;
      if constexpr (sizeof(T) <= 2) {
        centred = static_cast<float>(static_cast<int32_t>((bits & mask) ^ sign) - static_cast<int32_t>(sign) - pivot32);
      } else if constexpr (std::is_same<T, float>::value) {
        centred = raw - pivot_float;
      } else {  // int32: 64-bit room, as centred_value's Wide<int32_t>
        const uint32_t b = static_cast<uint32_t>(raw) & mask;
        centred = static_cast<float>(static_cast<int64_t>(b ^ sign) - static_cast<int64_t>(sign) - pivot64);
      }
      const float u = (centred - frac) * scale + offset;
      if constexpr (D == Decode::kClamp) {
        if constexpr (std::is_same<T, float>::value) {
          return detail::apply_shape<Shape::kClamp>(u);  // keeps NaN, as the CPU path
        } else {
          return shim::saturate(u);  // integer inputs: u is never NaN; one .SAT
        }
      } else {
        if (shape == Shape::kClamp) return detail::apply_shape<Shape::kClamp>(u);
        if (shape == Shape::kStep) return detail::apply_shape<Shape::kStep>(u);
        return detail::apply_shape<Shape::kSigmoid>(u);
      }
    }
  }

  MEDGE_HD const char* row_start(int32_t row) const { return base + static_cast<int64_t>(row) * row_bytes; }

  // Row `row`, whose chunk starts at `src` (loops walking down rows pass a pointer they advance).
  // Vector: one aligned vector load (the caller checked it may); else element loads.
  template <bool Vector>
  MEDGE_HD void load_at(const char* src, int32_t row, float (&d)[V]) const {
    MEDGE_EMU_CHECK(row >= 0 && row < rows && src == row_start(row), "read outside the image (row)");
    (void)row;
    if constexpr (Vector) {
      const RawWords<Chunk<T>::kBytes> w = load_vector<Chunk<T>::kBytes>(src);
      MEDGE_UNROLL
      for (int e = 0; e < V; ++e) {
        if constexpr (sizeof(T) <= 2) {
          constexpr int per_word = 4 / static_cast<int>(sizeof(T));
          d[e] = value(w.w[e / per_word] >> ((e % per_word) * 8 * static_cast<int>(sizeof(T))), T(0));
        } else {
          T raw;
          std::memcpy(&raw, &w.w[e], 4);
          d[e] = value(0u, raw);
        }
      }
    } else {
      const T* q = reinterpret_cast<const T*>(src);
      MEDGE_UNROLL
      for (int e = 0; e < V; ++e) {
        const T raw = e < valid ? read_element(q + e) : T(0);
        if constexpr (sizeof(T) <= 2) {
          d[e] = value(static_cast<uint32_t>(raw), raw);  // T is unsigned for these containers
        } else {
          d[e] = value(0u, raw);
        }
      }
    }
  }

  template <bool Vector>
  MEDGE_HD void load(int32_t row, float (&d)[V]) const {
    load_at<Vector>(row_start(row), row, d);
  }
};

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

// Normalised weights of the window of `width` taps starting at `first`: each tap weight
// once, their sum in tap order, then one division each (build_axis on the CPU does the same).
MEDGE_HD void window_weights(const AxisTaps& t, int32_t first, int32_t width, float* w) {
  const int32_t shift = t.first - first;
  float total = 0.0f;
  for (int32_t j = 0; j < width; ++j) {
    const int32_t k = j - shift;
    w[j] = k >= 0 && k < t.count ? detail::tap_weight(t, k) : 0.0f;
    total += w[j];  // zeros outside the taps leave the CPU's sum unchanged
  }
  for (int32_t j = 0; j < width; ++j) w[j] = total > 0.0f ? w[j] / total : 0.0f;
}

// Vertical taps of the tile's region rows; horizontal ones for images with an x table.
MEDGE_HD void phase_tables(const TiledLaunch& p, const Shared& sm) {
  const TileContext c = sm.context();
  if (c.nry == 0) return;
  const KernelImage& k = p.images[c.img];
  const PreparedImage& im = k.im;
  const bool aa = p.out.antialias != 0;
  for (int32_t q = threadIdx.x; q < c.nry; q += blockDim.x) {
    const AxisTaps t = detail::axis_taps32(c.ry0 + q, im.region_height, im.in_height, aa);
    if (k.flags & kPushRows) {  // the real window [first, first + count)
      MEDGE_EMU_CHECK(t.count <= p.ky_stride, "more vertical taps than the plan reserved");
      sm.i(p.off_ylo + q) = t.first;
      sm.i(p.off_yhi + q) = t.first + t.count;
      window_weights(t, t.first, t.count, sm.span(p.off_yw + q * p.ky_stride, t.count));
    } else {  // bilinear: a window of taps_y (2, or 1 for a one-row image) kept inside the image
      const int32_t first = detail::fixed_window_first(t, im.in_height, k.taps_y);
      sm.i(p.off_ylo + q) = first;
      sm.i(p.off_yhi + q) = first + k.taps_y;
      window_weights(t, first, k.taps_y, sm.span(p.off_yw + q * p.ky_stride, k.taps_y));
    }
  }
  if (k.flags & kXTable) {
    MEDGE_EMU_CHECK(k.taps_x <= p.kx_stride, "more horizontal taps than the plan reserved");
    for (int32_t q = threadIdx.x; q < c.nrx; q += blockDim.x) {
      const AxisTaps t = detail::axis_taps32(c.rx0 + q, im.region_width, im.in_width, aa);
      const int32_t first = detail::fixed_window_first(t, im.in_width, k.taps_x);
      sm.i(p.off_xfirst + q) = first - c.cs;
      window_weights(t, first, k.taps_x, sm.span(p.off_xw + q * p.kx_stride, k.taps_x));
    }
  }
}

// One chunk of a vbuf row: V (4 or 8) words at a 16-byte aligned position, stored as float4s.
template <int V>
MEDGE_HD void store_vbuf(const TiledLaunch& p, const Shared& sm, int32_t q, int32_t local_col, const float (&v)[V]) {
  float* dst = sm.span(p.off_vbuf + q * p.vbuf_pitch + local_col, V);
#if defined(MEDGE_DEVICE_CODE) && defined(__CUDA_ARCH__)
  // st.shared.v4 spelled out: written as float4 stores, NVVM split them into scalar ones here.
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  MEDGE_UNROLL
  for (int e = 0; e < V; e += 4)
    asm("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(addr + 4 * e), "f"(v[e]), "f"(v[e + 1]), "f"(v[e + 2]),
        "f"(v[e + 3])
        : "memory");
#else
  MEDGE_EMU_CHECK(reinterpret_cast<std::uintptr_t>(dst) % 16 == 0, "misaligned vbuf store");
  MEDGE_UNROLL
  for (int e = 0; e < V; ++e) dst[e] = v[e];
#endif
}

template <typename T, Decode D>
struct PushState {
  const char* src;   // row r of the chunk
  int32_t r, j;      // next input row; output row being completed
  int32_t hi0, lo1;  // end of output j's window; start of output j + 1's (hi0 when there is none)
  const float* w0;   // weight of row r for output j
  const float* w1;   // weight of row max(r, lo1) for output j + 1
};

template <typename T, Decode D, bool Vector>
MEDGE_HD bool push_output(const TiledLaunch& p, const Shared& sm, const ChunkDecoder<T, D>& dec,
                          PushState<T, D>& st, int32_t q1, float (&cur)[Chunk<T>::kElems],
                          float (&nxt)[Chunk<T>::kElems], int32_t local_col) {
  constexpr int V = Chunk<T>::kElems;
  float d[V];
  MEDGE_EMU_CHECK(st.r >= sm.i(p.off_ylo + st.j) && st.r <= st.hi0 && st.lo1 >= st.r && st.lo1 <= st.hi0,
                  "vertical push: a row in three windows, or a gap between two");
  // Consecutive antialiased windows overlap (lo(j + 1) < hi(j)), so output j + 1 always gets its first
  // row below, where its accumulator is assigned rather than zeroed and added to.
  MEDGE_EMU_CHECK(st.j + 1 >= q1 || st.lo1 < st.hi0, "vertical push: consecutive windows do not overlap");
  for (; st.r < st.lo1; ++st.r, st.src += dec.row_bytes) {  // rows of output j alone
    dec.template load_at<Vector>(st.src, st.r, d);
    const float w = sm.read(st.w0++);
    MEDGE_UNROLL
    for (int e = 0; e < V; ++e) cur[e] += w * d[e];
  }
  if (st.r < st.hi0) {  // rows of outputs j and j + 1; the first one starts j + 1's sum (no zeroing needed)
    dec.template load_at<Vector>(st.src, st.r, d);
    const float w = sm.read(st.w0++), wn = sm.read(st.w1++);
    MEDGE_UNROLL
    for (int e = 0; e < V; ++e) {
      cur[e] += w * d[e];
      nxt[e] = wn * d[e];
    }
    ++st.r;
    st.src += dec.row_bytes;
  }
  for (; st.r < st.hi0; ++st.r, st.src += dec.row_bytes) {
    dec.template load_at<Vector>(st.src, st.r, d);
    const float w = sm.read(st.w0++), wn = sm.read(st.w1++);
    MEDGE_UNROLL
    for (int e = 0; e < V; ++e) {
      cur[e] += w * d[e];
      nxt[e] += wn * d[e];
    }
  }
  store_vbuf<V>(p, sm, st.j, local_col, cur);
  if (++st.j >= q1) return true;
  // Output j + 1 takes over: its weights continue where the double rows left them.
  st.w0 = st.w1;
  st.hi0 = sm.i(p.off_yhi + st.j);
  st.lo1 = st.j + 1 < q1 ? sm.i(p.off_ylo + st.j + 1) : st.hi0;
  st.w1 = sm.span(p.off_yw + (st.j + 1) * p.ky_stride, 0);
  return false;
}

// Antialiased shrinking: every input row of the group is decoded once and
// pushed into the (at most two) output rows whose windows hold it. Two,
// because windows are 2*support long and their centres support apart: a half-
// open interval of that length holds exactly two of them (clamping at the
// image edges only shortens windows), and consecutive windows overlap, so no
// row between them is skipped. `a` and `b` swap roles between outputs instead
// of being copied.
template <typename T, Decode D, bool Vector>
MEDGE_HD void vertical_push(const TiledLaunch& p, const Shared& sm, const ChunkDecoder<T, D>& dec, int32_t q0,
                            int32_t q1, int32_t local_col) {
  constexpr int V = Chunk<T>::kElems;
  float a[V], b[V];
  MEDGE_UNROLL
  for (int e = 0; e < V; ++e) a[e] = b[e] = 0.0f;
  PushState<T, D> st;
  st.j = q0;
  st.r = sm.i(p.off_ylo + q0);
  st.src = dec.row_start(st.r);
  st.hi0 = sm.i(p.off_yhi + q0);
  st.lo1 = q0 + 1 < q1 ? sm.i(p.off_ylo + q0 + 1) : st.hi0;
  st.w0 = sm.span(p.off_yw + q0 * p.ky_stride, st.hi0 - st.r);
  st.w1 = sm.span(p.off_yw + (q0 + 1) * p.ky_stride, 0);
  for (;;) {
    if (push_output<T, D, Vector>(p, sm, dec, st, q1, a, b, local_col)) return;
    if (push_output<T, D, Vector>(p, sm, dec, st, q1, b, a, local_col)) return;
  }
}

// Bilinear rows (enlarging, or no antialiasing): a window of taps_y rows per
// output row; the two decoded rows stay in registers while consecutive output
// rows share them.
template <typename T, Decode D, bool Vector>
MEDGE_HD void vertical_gather(const TiledLaunch& p, const Shared& sm, const ChunkDecoder<T, D>& dec, bool two,
                              int32_t q0, int32_t q1, int32_t local_col) {
  constexpr int V = Chunk<T>::kElems;
  float ra[V], rb[V], v[V];
  MEDGE_UNROLL
  for (int e = 0; e < V; ++e) ra[e] = rb[e] = 0.0f;
  int32_t cached = -2;
  for (int32_t j = q0; j < q1; ++j) {
    const int32_t f = sm.i(p.off_ylo + j);
    const float* w = sm.span(p.off_yw + j * p.ky_stride, two ? 2 : 1);
    const float w0 = w[0];
    const float w1 = two ? w[1] : 0.0f;
    if (f != cached) {
      if (two && f == cached + 1) {
        MEDGE_UNROLL
        for (int e = 0; e < V; ++e) ra[e] = rb[e];
      } else {
        dec.template load<Vector>(f, ra);
      }
      if (two) dec.template load<Vector>(f + 1, rb);
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

template <typename T, Decode D, bool Vector>
MEDGE_HD void vertical_rows(const TiledLaunch& p, const Shared& sm, const KernelImage& k, int32_t col,
                            int32_t q0, int32_t q1, int32_t local_col) {
  const ChunkDecoder<T, D> dec(k, col);
  if (k.flags & kPushRows) {
    vertical_push<T, D, Vector>(p, sm, dec, q0, q1, local_col);
  } else {
    vertical_gather<T, D, Vector>(p, sm, dec, k.taps_y == 2, q0, q1, local_col);
  }
}

// Threads take (row group, column chunk) items: each walks a 16-byte column
// chunk down the rows of kGroupRows output rows.
template <typename T>
MEDGE_HD void phase_vertical(const TiledLaunch& p, const Shared& sm) {
  constexpr int V = Chunk<T>::kElems;
  const TileContext c = sm.context();
  if (c.nry == 0) return;
  const KernelImage& k = p.images[c.img];
  const bool clamp = k.im.shape == Shape::kClamp;
  const bool half_pivot = (k.flags & kHalfPivot) != 0;
  const int32_t items = kRowGroups * c.nchunks;
  for (int32_t item = threadIdx.x; item < items; item += blockDim.x) {
    const int32_t g = item / c.nchunks;
    const int32_t chunk = item - g * c.nchunks;
    const int32_t q0 = g * kGroupRows;
    const int32_t q1 = q0 + kGroupRows < c.nry ? q0 + kGroupRows : c.nry;
    if (q0 >= q1) continue;
    const int32_t local_col = chunk * V;
    const int32_t col = c.cs + local_col;
    const bool vector = (k.flags & kVectorRows) && col + V <= k.im.in_width;
    if (!vector) {
      vertical_rows<T, Decode::kAnyShape, false>(p, sm, k, col, q0, q1, local_col);
    } else if (!clamp) {
      vertical_rows<T, Decode::kAnyShape, true>(p, sm, k, col, q0, q1, local_col);
    } else if (sizeof(T) <= 2 && half_pivot) {
      vertical_rows<T, Decode::kHalfPivot, true>(p, sm, k, col, q0, q1, local_col);
    } else {
      vertical_rows<T, Decode::kClamp, true>(p, sm, k, col, q0, q1, local_col);
    }
  }
}

// Output values of a pair of columns (x, x + 1) of one row; `index` is the
// element at column x. float16 or float32 by the launch (uniform branch).
MEDGE_HD void store_values(const KernelOutput& o, int64_t index, bool second, float a, float b) {
  MEDGE_EMU_CHECK(index >= 0 && index + (second ? 2 : 1) <= o.elements, "write outside the output");
  const bool pair = second && o.vec_store;
  if (o.half) {
    __half* dst = static_cast<__half*>(o.data) + index;
    if (pair) {
      MEDGE_EMU_CHECK(reinterpret_cast<std::uintptr_t>(dst) % 4 == 0, "misaligned half2 store");
      *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
    } else {
      dst[0] = __float2half_rn(a);
      if (second) dst[1] = __float2half_rn(b);
    }
  } else {
    float* dst = static_cast<float*>(o.data) + index;
    if (pair) {
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

// (y - mean) * (1 / std) per channel, as on the CPU. For a MONOCHROME1 image
// the resampled value v becomes y = 1 - v, folded in: (v - (1 - mean)) * (-1 / std).
struct Normalise {
  float mean[3], scale[3];
  MEDGE_HD Normalise(const KernelOutput& o, bool invert) {
    for (int c = 0; c < 3; ++c) {
      mean[c] = invert ? 1.0f - o.mean[c] : o.mean[c];
      scale[c] = invert ? -o.inv_std[c] : o.inv_std[c];
    }
  }
};

// A pair stored as one half2 (Mode 1) or float2 (Mode 2), every channel: the
// register loop's common case, without the run-time choices of store_values.
template <int Mode>
MEDGE_HD void store_pair_vector(const KernelOutput& o, int64_t index, int64_t plane, float va, float vb,
                                const Normalise& n) {
  for (int32_t ch = 0; ch < 3; ++ch, index += plane) {
    const float a = (va - n.mean[ch]) * n.scale[ch], b = (vb - n.mean[ch]) * n.scale[ch];
    MEDGE_EMU_CHECK(index >= 0 && index + 2 <= o.elements && o.vec_store, "write outside the output");
    if constexpr (Mode == 1) {
      __half* dst = static_cast<__half*>(o.data) + index;
      MEDGE_EMU_CHECK(reinterpret_cast<std::uintptr_t>(dst) % 4 == 0, "misaligned half2 store");
      *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
    } else {
      float* dst = static_cast<float*>(o.data) + index;
      MEDGE_EMU_CHECK(reinterpret_cast<std::uintptr_t>(dst) % 8 == 0, "misaligned float2 store");
      float2 v;
      v.x = a, v.y = b;
      *reinterpret_cast<float2*>(dst) = v;
    }
    if (o.channels == 1) break;  // validate_output allows 1 or 3
  }
}

// Column pair of values (va, vb) normalised with `na` / `nb`, every channel.
MEDGE_HD void store_pair(const KernelOutput& o, int64_t index, int64_t plane, bool second, float va, float vb,
                         const Normalise& na, const Normalise& nb) {
  store_values(o, index, second, (va - na.mean[0]) * na.scale[0], (vb - nb.mean[0]) * nb.scale[0]);
  if (o.channels == 3) {  // validate_output allows 1 or 3
    store_values(o, index + plane, second, (va - na.mean[1]) * na.scale[1], (vb - nb.mean[1]) * nb.scale[1]);
    store_values(o, index + 2 * plane, second, (va - na.mean[2]) * na.scale[2], (vb - nb.mean[2]) * nb.scale[2]);
  }
}

// Horizontal taps of one output column, K in registers: the window's first vbuf
// column (the taps are contiguous), computed once per tile, not at every row.
// No skew against bank conflicts: strided reads (2 words apart when shrinking
// 2x) cost a second shared-memory wavefront, which the shared pipe has room
// for, while skewed addresses would cost integer instructions at every tap.
template <int K>
struct ColumnTaps {
  int32_t first;
  float w[K];
};

template <int K>
MEDGE_HD ColumnTaps<K> column_taps(const KernelImage& k, int32_t rx, int32_t cs, bool aa) {
  const PreparedImage& im = k.im;
  const AxisTaps t = detail::axis_taps32(rx, im.region_width, im.in_width, aa);
  ColumnTaps<K> c;
  const int32_t first = detail::fixed_window_first(t, im.in_width, K);
  c.first = first - cs;
  window_weights(t, first, K, c.w);
  return c;
}

template <int K>
MEDGE_HD float filter_taps(const float* src, const ColumnTaps<K>& t) {
  float acc = 0.0f;
  MEDGE_UNROLL
  for (int j = 0; j < K; ++j) acc += t.w[j] * src[j];
  return acc;
}

// The common case: both columns of the pair show the image, K taps in registers.
template <int K>
MEDGE_HD void pair_rows_registers(const TiledLaunch& p, const Shared& sm, const TileContext& c, const KernelImage& k,
                                  int32_t rxa, int64_t index, int32_t row0, int32_t nrows, bool second) {
  const bool aa = p.out.antialias != 0;
  const ColumnTaps<K> ta = column_taps<K>(k, rxa, c.cs, aa);
  const ColumnTaps<K> tb = column_taps<K>(k, rxa + 1, c.cs, aa);
  const Normalise norm(p.out, k.im.invert != 0);
  const int32_t pitch = p.vbuf_pitch;
  const int64_t plane = static_cast<int64_t>(p.out.height) * p.out.width;
  const float* src_a = sm.span(row0 + ta.first, (nrows - 1) * pitch + K);
  const float* src_b = sm.span(row0 + tb.first, (nrows - 1) * pitch + K);
  const int32_t width = p.out.width;
  if (second && p.out.vec_store) {
    if (p.out.half) {
      for (int32_t q = 0; q < nrows; ++q, index += width, src_a += pitch, src_b += pitch)
        store_pair_vector<1>(p.out, index, plane, filter_taps<K>(src_a, ta), filter_taps<K>(src_b, tb), norm);
    } else {
      for (int32_t q = 0; q < nrows; ++q, index += width, src_a += pitch, src_b += pitch)
        store_pair_vector<2>(p.out, index, plane, filter_taps<K>(src_a, ta), filter_taps<K>(src_b, tb), norm);
    }
    return;
  }
  for (int32_t q = 0; q < nrows; ++q, index += width, src_a += pitch, src_b += pitch)
    store_pair(p.out, index, plane, second, filter_taps<K>(src_a, ta), filter_taps<K>(src_b, tb), norm, norm);
}

// Everything else: a column outside the region (padding), and images whose
// horizontal taps come from the shared x table or are computed here per row.
MEDGE_HD void pair_rows_general(const TiledLaunch& p, const Shared& sm, const TileContext& c, const KernelImage& k,
                                int32_t qa, bool ina, bool inb, int64_t index, int32_t row0, int32_t nrows,
                                bool second) {
  const bool aa = p.out.antialias != 0;
  const bool table = (k.flags & kXTable) != 0;
  const bool invert = k.im.invert != 0;
  const Normalise na(p.out, ina && invert), nb(p.out, inb && invert);  // padding is never inverted
  const int32_t pitch = p.vbuf_pitch;
  const int64_t plane = static_cast<int64_t>(p.out.height) * p.out.width;
  const float pad = p.out.pad_value;
  const int32_t width = k.taps_x;
  AxisTaps t[2];
  int32_t first[2] = {0, 0};
  float total[2] = {0.0f, 0.0f};
  for (int s = 0; s < 2; ++s) {
    if ((s == 0 ? ina : inb) && !table) {
      t[s] = detail::axis_taps32(c.rx0 + qa + s, k.im.region_width, k.im.in_width, aa);
      first[s] = detail::fixed_window_first(t[s], k.im.in_width, width);
      total[s] = detail::taps_total(t[s]);
    }
  }
  for (int32_t q = 0; q < nrows; ++q, index += p.out.width) {
    const int32_t row = row0 + q * pitch;
    float v[2] = {pad, pad};
    for (int s = 0; s < 2; ++s) {
      if (!(s == 0 ? ina : inb)) continue;
      float acc = 0.0f;
      if (table) {
        const int32_t f = sm.i(p.off_xfirst + qa + s);
        const float* w = sm.span(p.off_xw + (qa + s) * p.kx_stride, width);
        const float* src = sm.span(row + f, width);
        for (int32_t j = 0; j < width; ++j) acc += w[j] * src[j];
      } else {  // edge pairs only: weights recomputed per row rather than held in an indexed array
        const float* src = sm.span(row + first[s] - c.cs, width);
        for (int32_t j = 0; j < width; ++j) acc += detail::window_weight(t[s], first[s], j, total[s]) * src[j];
      }
      v[s] = acc;
    }
    store_pair(p.out, index, plane, second, v[0], v[1], na, nb);
  }
}

// Each thread takes a pair of output columns and walks down the tile's rows:
// padding rows, then region rows, then padding rows.
MEDGE_HD void phase_horizontal(const TiledLaunch& p, const Shared& sm) {
  const TileContext c = sm.context();
  const KernelImage& k = p.images[c.img];
  const KernelOutput& o = p.out;
  const Normalise pad_norm(o, false);
  const float pad = o.pad_value;
  const int32_t left = k.im.region_left + c.rx0;  // output column of tile-local region column 0
  // Output rows of the tile [r0, r1) show the image; tile-local region row = q - shift.
  const int32_t shift = k.im.region_top + c.ry0 - c.y0;
  const int32_t r0 = clamp_int(shift, 0, c.rows), r1 = clamp_int(shift + c.nry, r0, c.rows);
  const int32_t pairs = (c.cols + 1) / 2;
  const int64_t plane = static_cast<int64_t>(o.height) * o.width;
  const int64_t image_base = static_cast<int64_t>(k.batch_index) * o.channels * plane;
  const bool registers = !(k.flags & kXTable);
  for (int32_t pi = threadIdx.x; pi < pairs; pi += blockDim.x) {
    const int32_t x = c.x0 + 2 * pi;
    const bool second = 2 * pi + 1 < c.cols;
    const int32_t qa = x - left;  // tile-local region column of x
    const bool ina = qa >= 0 && qa < c.nrx;
    const bool inb = second && qa + 1 >= 0 && qa + 1 < c.nrx;
    const int64_t index0 = image_base + static_cast<int64_t>(c.y0) * o.width + x;
    for (int32_t q = 0; q < r0; ++q)
      store_pair(o, index0 + static_cast<int64_t>(q) * o.width, plane, second, pad, pad, pad_norm, pad_norm);
    for (int32_t q = r1; q < c.rows; ++q)
      store_pair(o, index0 + static_cast<int64_t>(q) * o.width, plane, second, pad, pad, pad_norm, pad_norm);
    if (r1 == r0) continue;
    const int64_t index = index0 + static_cast<int64_t>(r0) * o.width;
    const int32_t row0 = p.off_vbuf + (r0 - shift) * p.vbuf_pitch;  // vbuf word of the first region row
    const int32_t rxa = c.rx0 + qa;
    if (registers && ina && inb) {
      switch (k.taps_x) {  // uniform per tile
        case 2: pair_rows_registers<2>(p, sm, c, k, rxa, index, row0, r1 - r0, second); continue;
        case 3: pair_rows_registers<3>(p, sm, c, k, rxa, index, row0, r1 - r0, second); continue;
        case 4: pair_rows_registers<4>(p, sm, c, k, rxa, index, row0, r1 - r0, second); continue;
        case 5: pair_rows_registers<5>(p, sm, c, k, rxa, index, row0, r1 - r0, second); continue;
        case 6: pair_rows_registers<6>(p, sm, c, k, rxa, index, row0, r1 - r0, second); continue;
        case 8: pair_rows_registers<8>(p, sm, c, k, rxa, index, row0, r1 - r0, second); continue;
        default: break;
      }
    }
    pair_rows_general(p, sm, c, k, qa, ina, inb, index, row0, r1 - r0, second);
  }
}

// The whole tiled kernel. Block::run(f) runs phase f for every thread of the
// block and then lets them all past a barrier: f() then __syncthreads() on the
// GPU; a loop over the threads in the emulator. T: the container (uint16_t for
// int16 images too); the output type is read from the launch.
template <typename T, class Block>
MEDGE_HD void tiled_body(Block& block, const TiledLaunch& p, const Shared& sm) {
  for (int32_t tile = static_cast<int32_t>(blockIdx.x); tile < p.total_tiles;
       tile += static_cast<int32_t>(gridDim.x)) {
    block.run([&] { phase_context(p, tile, sm); });
    block.run([&] { phase_tables(p, sm); });
    block.run([&] { phase_vertical<T>(p, sm); });
    block.run([&] { phase_horizontal(p, sm); });
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
  PixelType pixel_type = PixelType::kUInt16;  // tiled launches: one container (uint16 for int16 images too)
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
