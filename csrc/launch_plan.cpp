// Launch plan of the CUDA preprocessing, host only and GPU-free: which images
// the tiled kernel takes (grouped by pixel type, up to kImagesPerLaunch per
// launch), its tile width and shared-memory layout, and what goes to the
// gather kernel. Executed by preprocess_cuda.cu and by the emulator alike.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <vector>

#include "medge/preprocess_kernels.h"

namespace medge {
namespace kernels {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int32_t even_up(int64_t v) { return static_cast<int32_t>(v + (v & 1)); }

// Horizontal window: the smallest register width that holds every column's taps and fits the
// image, else the taps themselves from a shared table.
void choose_x_window(KernelImage& k, int32_t taps) {
  for (int w : kRegisterWindows) {
    if (w >= taps && w <= k.im.in_width) {
      k.taps_x = w;
      return;
    }
  }
  k.taps_x = taps;
  k.flags |= kXTable;
}

// kHalfPivot: an 8/16-bit clamp image whose transform centre s0 = pivot + frac is a multiple of 1/2
// (CT windows: c - 0.5 with an integer intercept; LINEAR_EXACT and ranges with integer ends) decodes
// as 2 (stored - pivot - frac) * (scale / 2), exactly the CPU's (stored - pivot - frac) * scale.
void choose_decode(KernelImage& k) {
  const PreparedImage& im = k.im;
  if (pixel_type_size(im.pixel_type) > 2 || im.shape != detail::Shape::kClamp) return;
  const float twice = 2.0f * im.frac;
  if (twice != static_cast<float>(static_cast<int32_t>(twice))) return;
  if (im.pivot > (1 << 22) || im.pivot < -(1 << 22)) return;  // |stored - pivot - frac| < 2^23: exact in float
  const float half_scale = 0.5f * im.scale;
  if (!(half_scale * 2.0f == im.scale) || !(std::fabs(half_scale) >= 1.17549435e-38f)) return;  // normal
  k.flags |= kHalfPivot;
  k.half_scale = half_scale;
  k.half_bias = static_cast<int32_t>(2 * static_cast<int64_t>(im.sign_bit) + 2 * im.pivot +
                                     static_cast<int64_t>(twice));
}

int32_t axis_window(int32_t in, int32_t region, bool antialias) {
  // Antialiased shrinking: at most ceil(2 in / region) taps (the window is 2 * support long, see
  // vertical_push); bilinear: 2, or 1 for a one-pixel axis.
  if (antialias && in > region) return static_cast<int32_t>(std::min<int64_t>(in, ceil_div(2LL * in, region)));
  return std::min(2, in);
}

// Input columns a tile of `tile_w` output columns may need in vbuf, chunk-aligned: the fixed windows of
// its first and last column start at most ceil((tile_w - 1) * in / region) apart (both window rules are
// floor((integer + d * 2 in) / (2 region)) clamped, and clamping shrinks distances), plus the window.
int64_t vbuf_columns(const KernelImage& k, int32_t tile_w) {
  const PreparedImage& im = k.im;
  const int64_t v = chunk_elems(im.pixel_type);
  const int64_t span = std::min<int64_t>(im.in_width, ceil_div(static_cast<int64_t>(tile_w - 1) * im.in_width,
                                                               im.region_width) + k.taps_x);
  return std::min(ceil_div(span + v - 1, v), ceil_div(im.in_width, v)) * v;
}

struct Layout {
  int64_t words = 0;
  int32_t ky_stride = 0, kx_stride = 0, vbuf_cols = 0;
};

Layout layout_for(const std::vector<const KernelImage*>& group, int32_t tile_w) {
  Layout l;
  int64_t cols = 0;
  for (const KernelImage* k : group) {
    l.ky_stride = std::max(l.ky_stride, k->taps_y);
    if (k->flags & kXTable) l.kx_stride = std::max(l.kx_stride, k->taps_x);
    cols = std::max(cols, vbuf_columns(*k, tile_w));
  }
  l.vbuf_cols = static_cast<int32_t>(cols);
  const int64_t pitch = cols;
  l.words = kContextWords + 2 * kTileRows + static_cast<int64_t>(kTileRows) * l.ky_stride +
            (l.kx_stride > 0 ? static_cast<int64_t>(tile_w) * (1 + l.kx_stride) : 0) + 3 + kTileRows * pitch;
  return l;
}

bool fits(const Layout& l) { return l.words * 4 <= kSharedBudgetBytes; }

int32_t first_tile_width(int64_t out_width) {
  if (out_width <= kMaxTileWidth) return even_up(out_width);
  return even_up(ceil_div(out_width, ceil_div(out_width, kMaxTileWidth)));
}

KernelOutput kernel_output(const OutputParams& out, void* output, int64_t count) {
  KernelOutput o{};
  o.data = output;
  o.elements = count * out.channels * out.height * out.width;
  o.height = static_cast<int32_t>(out.height);
  o.width = static_cast<int32_t>(out.width);
  o.channels = out.channels;
  o.half = out.output_type == OutputType::kFloat16 ? 1 : 0;
  const std::uintptr_t pair_bytes = o.half ? 4 : 8;
  o.vec_store = out.width % 2 == 0 && reinterpret_cast<std::uintptr_t>(output) % pair_bytes == 0 ? 1 : 0;
  o.antialias = out.resample == Resample::kBilinearAntialias ? 1 : 0;
  o.pad_value = out.pad_value;
  for (int c = 0; c < 3; ++c) {
    o.mean[c] = out.mean[c];
    o.inv_std[c] = 1.0f / out.std[c];
  }
  return o;
}

}  // namespace

std::vector<Launch> plan_launches(const PreparedImage* images, int64_t count, const OutputParams& out, void* output,
                                  int images_per_launch) {
  if (images_per_launch <= 0 || images_per_launch > kImagesPerLaunch) images_per_launch = kImagesPerLaunch;
  const KernelOutput kout = kernel_output(out, output, count);
  const bool antialias = kout.antialias != 0;

  std::vector<KernelImage> all(static_cast<size_t>(count));
  std::map<int, std::vector<const KernelImage*>> tiled;  // by container (int16 and uint16 share one)
  std::vector<const KernelImage*> gather;
  for (int64_t i = 0; i < count; ++i) {
    KernelImage& k = all[static_cast<size_t>(i)];
    k.im = images[i];
    k.batch_index = static_cast<int32_t>(i);
    const PreparedImage& im = k.im;
    k.flags = 0;
    k.half_bias = 0;
    k.half_scale = 0.0f;
    const int32_t taps_x = axis_window(im.in_width, im.region_width, antialias);
    choose_x_window(k, taps_x);
    choose_decode(k);
    k.taps_y = axis_window(im.in_height, im.region_height, antialias);
    if (antialias && im.in_height > im.region_height) k.flags |= kPushRows;
    const int64_t vector_bytes = static_cast<int64_t>(chunk_elems(im.pixel_type)) * pixel_type_size(im.pixel_type);
    if (reinterpret_cast<std::uintptr_t>(im.pixels) % static_cast<std::uintptr_t>(vector_bytes) == 0 &&
        (im.row_stride * pixel_type_size(im.pixel_type)) % vector_bytes == 0)
      k.flags |= kVectorRows;
    const bool small_taps = taps_x <= kMaxTaps && k.taps_y <= kMaxTaps;
    if (small_taps && fits(layout_for({&k}, 2))) {
      const PixelType container = im.pixel_type == PixelType::kInt16 ? PixelType::kUInt16 : im.pixel_type;
      tiled[static_cast<int>(container)].push_back(&k);
    } else {
      gather.push_back(&k);
    }
  }

  std::vector<Launch> launches;
  for (auto& [type, group_all] : tiled) {
    for (size_t start = 0; start < group_all.size(); start += static_cast<size_t>(images_per_launch)) {
      const size_t end = std::min(group_all.size(), start + static_cast<size_t>(images_per_launch));
      const std::vector<const KernelImage*> group(group_all.begin() + static_cast<std::ptrdiff_t>(start),
                                                  group_all.begin() + static_cast<std::ptrdiff_t>(end));
      int32_t tile_w = first_tile_width(out.width);
      Layout layout = layout_for(group, tile_w);
      while (!fits(layout) && tile_w > 2) {  // every image fits at 2 (checked above): this ends
        tile_w = even_up(tile_w / 2);
        layout = layout_for(group, tile_w);
      }
      Launch l;
      l.tiled = true;
      l.pixel_type = static_cast<PixelType>(type);
      TiledLaunch& p = l.tiled_params;
      p.out = kout;
      p.count = static_cast<int32_t>(group.size());
      for (size_t i = 0; i < group.size(); ++i) p.images[i] = *group[i];
      p.tile_w = tile_w;
      p.tiles_x = static_cast<int32_t>(ceil_div(out.width, tile_w));
      p.tiles_y = static_cast<int32_t>(ceil_div(out.height, kTileRows));
      p.total_tiles = p.count * p.tiles_x * p.tiles_y;
      p.ky_stride = layout.ky_stride;
      p.kx_stride = layout.kx_stride;
      int32_t at = kContextWords;
      p.off_ylo = at;
      at += kTileRows;
      p.off_yhi = at;
      at += kTileRows;
      p.off_yw = at;
      at += kTileRows * p.ky_stride;
      p.off_xfirst = at;
      p.off_xw = at + (p.kx_stride > 0 ? tile_w : 0);
      at = p.off_xw + (p.kx_stride > 0 ? tile_w * p.kx_stride : 0);
      at = (at + 3) / 4 * 4;  // vbuf rows start 16-byte aligned (float4 stores)
      p.off_vbuf = at;
      p.vbuf_cols = layout.vbuf_cols;
      p.vbuf_pitch = layout.vbuf_cols;
      p.smem_words = at + kTileRows * p.vbuf_pitch;
      l.blocks = p.total_tiles;
      l.smem_bytes = p.smem_words * 4;
      launches.push_back(l);
    }
  }
  for (size_t start = 0; start < gather.size(); start += static_cast<size_t>(images_per_launch)) {
    const size_t end = std::min(gather.size(), start + static_cast<size_t>(images_per_launch));
    Launch l;
    l.tiled = false;
    GatherLaunch& p = l.gather_params;
    p.out = kout;
    p.count = static_cast<int32_t>(end - start);
    for (size_t i = start; i < end; ++i) p.images[i - start] = *gather[i];
    l.gather_grid[0] = static_cast<int32_t>(ceil_div(out.width, kGatherBlockX));
    l.gather_grid[1] = static_cast<int32_t>(ceil_div(out.height, kGatherBlockY));
    l.gather_grid[2] = p.count;
    launches.push_back(l);
  }
  return launches;
}

}  // namespace kernels
}  // namespace medge
