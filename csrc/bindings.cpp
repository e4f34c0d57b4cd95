// pybind11 bindings of medge's native core as the private module medge._C.
// The only file that includes pybind11: it turns numpy arrays and integer
// device addresses into ImageParams / output pointers, releases the GIL
// around the work, and maps C++ errors onto medge.errors classes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <new>
#include <string>
#include <vector>

#include "medge/dicom_scan.h"
#include "medge/emulation.h"
#include "medge/pixel_math.h"
#include "medge/preprocess.h"
#include "medge/preprocess_kernels.h"

namespace py = pybind11;
using namespace medge;

namespace {

PixelType pixel_type_of(const py::array& array, int64_t index) {
  const py::dtype dt = array.dtype();
  if (dt.equal(py::dtype::of<uint8_t>())) return PixelType::kUInt8;
  if (dt.equal(py::dtype::of<uint16_t>())) return PixelType::kUInt16;
  if (dt.equal(py::dtype::of<int16_t>())) return PixelType::kInt16;
  if (dt.equal(py::dtype::of<int32_t>())) return PixelType::kInt32;
  if (dt.equal(py::dtype::of<float>())) return PixelType::kFloat32;
  throw InvalidArgument("image " + std::to_string(index) + ": dtype " + std::string(py::str(dt)) +
                        " is not one of uint8, uint16, int16, int32, float32 in native byte order");
}

// Fills the memory-describing fields of `params` from a 2-D numpy array.
void describe_host_array(const py::array& array, ImageParams& params, int64_t index) {
  const std::string where = "image " + std::to_string(index) + ": ";
  if (array.ndim() != 2) throw InvalidArgument(where + "expected a 2-D (rows, columns) array");
  params.pixel_type = pixel_type_of(array, index);
  const int64_t item = array.itemsize();
  if (array.shape(0) <= 0 || array.shape(1) <= 0) throw InvalidArgument(where + "array is empty");
  if (array.strides(1) != item || array.strides(0) <= 0 || array.strides(0) % item != 0 ||
      (array.shape(0) > 1 && array.strides(0) < array.shape(1) * item))
    throw InvalidArgument(where + "rows must be contiguous with a positive row stride");
  params.pixels = array.data();
  params.height = array.shape(0);
  params.width = array.shape(1);
  params.row_stride = array.shape(0) > 1 ? array.strides(0) / item : array.shape(1);
  params.buffer_bytes = ((params.height - 1) * params.row_stride + params.width) * item;
}

void check_output_array(const py::array& output, const OutputParams& out, int64_t count) {
  if (!output.writeable()) throw InvalidArgument("output array is read-only");
  if (!(output.flags() & py::array::c_style)) throw InvalidArgument("output array must be C-contiguous");
  const bool fp16 = out.output_type == OutputType::kFloat16;
  // Stores go through float / half pointers: a buffer at an odd address (e.g.
  // np.frombuffer with an offset) would be written with misaligned stores.
  if (reinterpret_cast<std::uintptr_t>(output.data()) % static_cast<std::uintptr_t>(fp16 ? 2 : 4) != 0)
    throw InvalidArgument("output array is not aligned to its element size (np.frombuffer at an odd offset?); "
                          "pass an array numpy allocated, e.g. np.empty");
  const py::dtype want = fp16 ? py::dtype("float16") : py::dtype::of<float>();
  if (!output.dtype().equal(want))
    throw InvalidArgument("output dtype must be " + std::string(py::str(want)) + ", got " +
                          std::string(py::str(output.dtype())));
  const std::array<int64_t, 4> shape{count, out.channels, out.height, out.width};
  bool ok = output.ndim() == 4;
  for (int d = 0; ok && d < 4; ++d) ok = output.shape(d) == shape[d];
  if (!ok)
    throw InvalidArgument("output shape must be (" + std::to_string(count) + ", " + std::to_string(out.channels) +
                          ", " + std::to_string(out.height) + ", " + std::to_string(out.width) + ")");
}

void run_cpu(const py::list& arrays, std::vector<ImageParams> params, py::array output, const OutputParams& out,
             int num_threads) {
  if (static_cast<size_t>(py::len(arrays)) != params.size())
    throw InvalidArgument("got " + std::to_string(py::len(arrays)) + " arrays but " +
                          std::to_string(params.size()) + " parameter sets");
  std::vector<py::array> keep;  // holds the arrays (and any buffers) while the GIL is released
  keep.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (!py::isinstance<py::array>(arrays[i]))
      throw InvalidArgument("image " + std::to_string(i) + ": not a numpy array");
    keep.push_back(py::reinterpret_borrow<py::array>(arrays[i]));
    describe_host_array(keep.back(), params[i], static_cast<int64_t>(i));
  }
  const int64_t count = static_cast<int64_t>(params.size());
  check_output_array(output, out, count);
  void* data = output.mutable_data();
  const int64_t bytes = output.nbytes();
  py::gil_scoped_release release;
  try {
    preprocess_cpu(params.data(), count, out, data, bytes, num_threads);
  } catch (const std::bad_alloc&) {
    // Plans and per-thread scratch rows are allocated natively: without this
    // pybind11 would raise a bare MemoryError, which is not medge's error path.
    throw ResourceError("not enough memory for the native preprocessing of " + std::to_string(count) +
                        " image(s); preprocess fewer images at a time or use fewer threads");
  }
}

// The CUDA kernels emulated on the CPU (tests): host arrays as for run_cpu.
void run_emulated(const py::list& arrays, std::vector<ImageParams> params, py::array output, const OutputParams& out,
                  int images_per_launch, int max_blocks, const std::string& fault) {
  if (static_cast<size_t>(py::len(arrays)) != params.size())
    throw InvalidArgument("got " + std::to_string(py::len(arrays)) + " arrays but " +
                          std::to_string(params.size()) + " parameter sets");
  std::vector<py::array> keep;
  keep.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (!py::isinstance<py::array>(arrays[i]))
      throw InvalidArgument("image " + std::to_string(i) + ": not a numpy array");
    keep.push_back(py::reinterpret_borrow<py::array>(arrays[i]));
    describe_host_array(keep.back(), params[i], static_cast<int64_t>(i));
  }
  const int64_t count = static_cast<int64_t>(params.size());
  check_output_array(output, out, count);
  void* data = output.mutable_data();
  const int64_t bytes = output.nbytes();
  py::gil_scoped_release release;
  preprocess_cuda_emulated(params.data(), count, out, data, bytes, images_per_launch, max_blocks, fault);
}

// The CUDA path's launch plan for host arrays (tests, docs): which kernel takes
// which images, with what tiles and shared memory.
py::list launch_plan(const py::list& arrays, std::vector<ImageParams> params, const OutputParams& out) {
  std::vector<py::array> keep;
  std::vector<detail::PreparedImage> prepared;
  detail::validate_output(out);
  for (size_t i = 0; i < params.size(); ++i) {
    keep.push_back(py::reinterpret_borrow<py::array>(arrays[i]));
    describe_host_array(keep.back(), params[i], static_cast<int64_t>(i));
    prepared.push_back(detail::prepare_image(params[i], out, static_cast<int64_t>(i)));
  }
  static float dummy_output[4];
  py::list result;
  for (const kernels::Launch& l : kernels::plan_launches(prepared.data(), static_cast<int64_t>(prepared.size()), out,
                                                         dummy_output, 0)) {
    py::dict d;
    py::list images, taps_x, taps_y, push_rows, vector_rows, x_table, half_pivot;
    const int32_t n = l.tiled ? l.tiled_params.count : l.gather_params.count;
    for (int32_t i = 0; i < n; ++i) {
      const kernels::KernelImage& k = l.tiled ? l.tiled_params.images[i] : l.gather_params.images[i];
      images.append(k.batch_index);
      taps_x.append(k.taps_x);
      taps_y.append(k.taps_y);
      push_rows.append((k.flags & kernels::kPushRows) != 0);
      vector_rows.append((k.flags & kernels::kVectorRows) != 0);
      x_table.append((k.flags & kernels::kXTable) != 0);
      half_pivot.append((k.flags & kernels::kHalfPivot) != 0);
    }
    d["kernel"] = l.tiled ? "tiled" : "gather";
    d["images"] = images;
    d["taps_x"] = taps_x;
    d["taps_y"] = taps_y;
    d["push_rows"] = push_rows;
    d["vector_rows"] = vector_rows;
    d["x_table"] = x_table;
    d["half_pivot"] = half_pivot;
    if (l.tiled) {
      d["pixel_type"] = l.pixel_type;
      d["tile_w"] = l.tiled_params.tile_w;
      d["tiles"] = l.tiled_params.total_tiles;
      d["smem_bytes"] = l.smem_bytes;
      d["vbuf_cols"] = l.tiled_params.vbuf_cols;
    }
    result.append(d);
  }
  return result;
}

// Every output coordinate of one axis gets the same taps from the GPU's 32-bit
// axis_taps32 as from the 64-bit axis_taps (tests).
bool axis_taps32_matches(int32_t in_size, int32_t region, bool antialias) {
  if (in_size < 1 || in_size > kMaxImageSide || region < 1 || region > kMaxOutputSide)
    throw InvalidArgument("sizes out of range");
  for (int32_t d = 0; d < region; ++d) {
    const detail::AxisTaps a = detail::axis_taps(d, region, in_size, antialias);
    const detail::AxisTaps b = detail::axis_taps32(d, region, in_size, antialias);
    if (a.first != b.first || a.count != b.count || a.center_i != b.center_i || a.center_f != b.center_f ||
        a.inv_support != b.inv_support)
      return false;
  }
  return true;
}

void run_cuda(std::vector<ImageParams> params, std::uintptr_t output, int64_t output_bytes, const OutputParams& out,
              std::uintptr_t stream) {
  const int64_t count = static_cast<int64_t>(params.size());
  py::gil_scoped_release release;
  preprocess_cuda(params.data(), count, out, reinterpret_cast<void*>(output), output_bytes,
                  reinterpret_cast<cudaStream_t>(stream));
}

// Runs the native validation (sizes, pointers, parameters) without touching memory.
void validate_params(const std::vector<ImageParams>& params, const OutputParams& out) {
  detail::validate_output(out);
  for (size_t i = 0; i < params.size(); ++i) detail::prepare_image(params[i], out, static_cast<int64_t>(i));
}

py::tuple float3(const float (&v)[3]) { return py::make_tuple(v[0], v[1], v[2]); }

void set_float3(float (&dst)[3], const std::vector<float>& src, const char* name) {
  if (src.empty() || src.size() > 3) throw InvalidArgument(std::string(name) + " needs 1 to 3 values");
  for (size_t i = 0; i < 3; ++i) dst[i] = src[std::min(i, src.size() - 1)];
}

}  // namespace

// ---------------------------------------------------------------- volume preprocessing (medge.volume)
// Numpy (D, H, W) stored values + per-slice slopes / intercepts -> the (1, 1, D, H, W) or 2.5-D
// (D, 2k + 1, H, W) output; CUDA takes device addresses and caller-owned launch tables (volume.h).
#include "medge/volume.h"

namespace {

// Slopes / intercepts as float64 vectors of `depth` values, wired into `volume`.
void wire_rescale(VolumeParams& volume, const py::array_t<double, py::array::c_style | py::array::forcecast>& slopes,
                  const py::array_t<double, py::array::c_style | py::array::forcecast>& intercepts) {
  if (slopes.ndim() != 1 || intercepts.ndim() != 1 || slopes.shape(0) != volume.depth ||
      intercepts.shape(0) != volume.depth)
    throw InvalidArgument("rescale slopes and intercepts need one value per slice (" + std::to_string(volume.depth) +
                          ")");
  volume.rescale_slopes = slopes.data();
  volume.rescale_intercepts = intercepts.data();
}

// Memory fields of `volume` from a host (D, H, W) array whose rows are contiguous.
void describe_host_volume(const py::array& array, VolumeParams& volume) {
  if (array.ndim() != 3) throw InvalidArgument("volume pixels must be a 3-D (slices, rows, columns) array");
  volume.pixel_type = pixel_type_of(array, 0);
  const int64_t item = array.itemsize();
  for (int d = 0; d < 3; ++d)
    if (array.shape(d) <= 0) throw InvalidArgument("volume pixel array is empty");
  const int64_t d = array.shape(0), h = array.shape(1), w = array.shape(2);
  const int64_t ss = array.strides(0), rs = array.strides(1);
  if (array.strides(2) != item || rs <= 0 || rs % item != 0 || (h > 1 && rs < w * item) || ss <= 0 ||
      ss % item != 0 || (d > 1 && ss < ((h - 1) * (rs / item) + w) * item))
    throw InvalidArgument("volume pixel rows must be contiguous with positive row and slice strides");
  volume.pixels = array.data();
  volume.depth = d;
  volume.height = h;
  volume.width = w;
  volume.row_stride = h > 1 ? rs / item : w;
  volume.slice_stride = d > 1 ? ss / item : (h - 1) * volume.row_stride + w;
  volume.buffer_bytes = ((d - 1) * volume.slice_stride + (h - 1) * volume.row_stride + w) * item;
}

void check_volume_output(const py::array& output, const VolumeOutputParams& out) {
  if (!output.writeable()) throw InvalidArgument("output array is read-only");
  if (!(output.flags() & py::array::c_style)) throw InvalidArgument("output array must be C-contiguous");
  const bool fp16 = out.output_type == OutputType::kFloat16;
  const py::dtype want = fp16 ? py::dtype("float16") : py::dtype::of<float>();
  if (!output.dtype().equal(want))
    throw InvalidArgument("output dtype must be " + std::string(py::str(want)) + ", got " +
                          std::string(py::str(output.dtype())));
  if (output.nbytes() != volume_output_bytes(out))
    throw InvalidArgument("output array has " + std::to_string(output.nbytes()) + " bytes but the volume needs " +
                          std::to_string(volume_output_bytes(out)));
}

void run_volume_cpu(const py::array& pixels, const py::array_t<double, py::array::c_style | py::array::forcecast>& slopes,
                    const py::array_t<double, py::array::c_style | py::array::forcecast>& intercepts,
                    VolumeParams volume, py::array output, const VolumeOutputParams& out, int num_threads,
                    bool emulate_cuda) {
  describe_host_volume(pixels, volume);
  wire_rescale(volume, slopes, intercepts);
  check_volume_output(output, out);
  void* data = output.mutable_data();
  const int64_t bytes = output.nbytes();
  py::gil_scoped_release release;
  try {
    if (emulate_cuda)
      preprocess_volume_emulated(volume, out, data, bytes);
    else
      preprocess_volume_cpu(volume, out, data, bytes, num_threads);
  } catch (const std::bad_alloc&) {
    throw ResourceError("not enough memory for the native volume preprocessing; use fewer threads or a smaller "
                        "volume / output");
  }
}

py::array_t<uint8_t> volume_tables(VolumeParams volume,
                                   const py::array_t<double, py::array::c_style | py::array::forcecast>& slopes,
                                   const py::array_t<double, py::array::c_style | py::array::forcecast>& intercepts,
                                   const VolumeOutputParams& out) {
  wire_rescale(volume, slopes, intercepts);
  const int64_t bytes = volume_cuda_table_bytes(volume, out);
  // numpy's allocator aligns to at least 16 bytes; checked natively.
  py::array_t<uint8_t> tables(static_cast<py::ssize_t>(bytes));
  volume_cuda_tables(volume, out, tables.mutable_data(), bytes);
  return tables;
}

void run_volume_cuda(VolumeParams volume, const VolumeOutputParams& out, std::uintptr_t tables, int64_t table_bytes,
                     std::uintptr_t output, int64_t output_bytes, std::uintptr_t stream) {
  py::gil_scoped_release release;
  preprocess_volume_cuda(volume, out, reinterpret_cast<const void*>(tables), table_bytes,
                         reinterpret_cast<void*>(output), output_bytes, reinterpret_cast<cudaStream_t>(stream));
}

std::vector<int64_t> get3(const int64_t (&v)[3]) { return {v[0], v[1], v[2]}; }
void set3(int64_t (&dst)[3], const std::vector<int64_t>& src, const char* name) {
  if (src.size() != 3) throw InvalidArgument(std::string(name) + " needs 3 values (slices, rows, columns)");
  for (int i = 0; i < 3; ++i) dst[i] = src[static_cast<size_t>(i)];
}

void register_volume(py::module_& m) {
  py::enum_<VolumeInterpolation>(m, "VolumeInterpolation")
      .value("trilinear", VolumeInterpolation::kTrilinear)
      .value("nearest", VolumeInterpolation::kNearest);
  py::class_<VolumeParams>(m, "VolumeParams")
      .def(py::init<>())
      .def_property(
          "pixels_address", [](const VolumeParams& p) { return reinterpret_cast<std::uintptr_t>(p.pixels); },
          [](VolumeParams& p, std::uintptr_t v) { p.pixels = reinterpret_cast<const void*>(v); })
      .def_readwrite("buffer_bytes", &VolumeParams::buffer_bytes)
      .def_readwrite("depth", &VolumeParams::depth)
      .def_readwrite("height", &VolumeParams::height)
      .def_readwrite("width", &VolumeParams::width)
      .def_readwrite("slice_stride", &VolumeParams::slice_stride)
      .def_readwrite("row_stride", &VolumeParams::row_stride)
      .def_readwrite("pixel_type", &VolumeParams::pixel_type)
      .def_readwrite("bits_stored", &VolumeParams::bits_stored)
      .def_readwrite("is_signed", &VolumeParams::is_signed)
      .def_readwrite("voi_mode", &VolumeParams::voi_mode)
      .def_readwrite("voi_function", &VolumeParams::voi_function)
      .def_readwrite("window_center", &VolumeParams::window_center)
      .def_readwrite("window_width", &VolumeParams::window_width)
      .def_readwrite("range_low", &VolumeParams::range_low)
      .def_readwrite("range_high", &VolumeParams::range_high)
      .def_readwrite("invert", &VolumeParams::invert);
  py::class_<VolumeOutputParams>(m, "VolumeOutputParams")
      .def(py::init<>())
      .def_property(
          "resampled", [](const VolumeOutputParams& o) { return get3(o.resampled); },
          [](VolumeOutputParams& o, const std::vector<int64_t>& v) { set3(o.resampled, v, "resampled"); })
      .def_property(
          "size", [](const VolumeOutputParams& o) { return get3(o.size); },
          [](VolumeOutputParams& o, const std::vector<int64_t>& v) { set3(o.size, v, "size"); })
      .def_property(
          "offset", [](const VolumeOutputParams& o) { return get3(o.offset); },
          [](VolumeOutputParams& o, const std::vector<int64_t>& v) { set3(o.offset, v, "offset"); })
      .def_readwrite("interpolation", &VolumeOutputParams::interpolation)
      .def_readwrite("neighbours", &VolumeOutputParams::neighbours)
      .def_readwrite("pad_value", &VolumeOutputParams::pad_value)
      .def_readwrite("mean", &VolumeOutputParams::mean)
      .def_readwrite("std", &VolumeOutputParams::std)
      .def_readwrite("output_type", &VolumeOutputParams::output_type);
  m.attr("MAX_VOLUME_NEIGHBOURS") = kMaxNeighbours;
  m.def("volume_output_bytes", &volume_output_bytes, py::arg("out_params"));
  m.def(
      "preprocess_volume_cpu",
      [](const py::array& pixels, const py::array_t<double, py::array::c_style | py::array::forcecast>& slopes,
         const py::array_t<double, py::array::c_style | py::array::forcecast>& intercepts, const VolumeParams& volume,
         py::array output, const VolumeOutputParams& out, int num_threads) {
        run_volume_cpu(pixels, slopes, intercepts, volume, output, out, num_threads, false);
      },
      py::arg("pixels"), py::arg("slopes"), py::arg("intercepts"), py::arg("params"), py::arg("output"),
      py::arg("out_params"), py::arg("num_threads") = 0,
      "Preprocess a host (D, H, W) volume into `output`; params' memory fields are filled from `pixels`. "
      "Releases the GIL.");
  m.def(
      "_emulate_volume_cuda",
      [](const py::array& pixels, const py::array_t<double, py::array::c_style | py::array::forcecast>& slopes,
         const py::array_t<double, py::array::c_style | py::array::forcecast>& intercepts, const VolumeParams& volume,
         py::array output, const VolumeOutputParams& out) {
        run_volume_cpu(pixels, slopes, intercepts, volume, output, out, 1, true);
      },
      py::arg("pixels"), py::arg("slopes"), py::arg("intercepts"), py::arg("params"), py::arg("output"),
      py::arg("out_params"),
      "Tests only: the CUDA volume kernel's per-element function and launch tables run on the CPU.");
  m.def("volume_cuda_tables", &volume_tables, py::arg("params"), py::arg("slopes"), py::arg("intercepts"),
        py::arg("out_params"),
        "Launch tables of the CUDA volume kernel (params carry the device address of the pixels), as host bytes "
        "to copy to 16-byte-aligned device memory.");
  m.def("preprocess_volume_cuda", &run_volume_cuda, py::arg("params"), py::arg("out_params"),
        py::arg("tables_address"), py::arg("table_bytes"), py::arg("output_address"), py::arg("output_bytes"),
        py::arg("stream"), "Enqueue the volume kernel on `stream` (device addresses); does not synchronise.");
}

}  // namespace
// ---------------------------------------------------------------- end of volume preprocessing

// ---------------------------------------------------------------- DICOM structure scanner
// medge.dicom's fast reader (medge/dicom_scan.h): where the wanted elements of a native
// little-endian Part 10 file lie. Values are converted in Python. The GIL is kept: a scan
// takes microseconds, less than releasing and re-taking it under contention.
namespace {

// `spec`: 8 bytes per wanted element, sorted by tag: tag (uint32 little endian), VR (2
// letters), kind (0 value, 1 refused, 2 pixel data), 0. Returns (status, reason, at,
// implicit_vr, values, pixel_offset, pixel_length, undefined): values holds, per wanted
// element, its value as bytes (kind 0, found) or None; pixel_offset is -1 when absent;
// undefined lists (tag, starts_with_item) for the caller's dictionary check.
py::tuple scan_dicom_py(const py::object& data, const py::bytes& spec) {
  const std::string_view packed = spec;
  if (packed.size() % 8 != 0) throw py::value_error("scan_dicom: spec must hold 8 bytes per element");
  std::vector<WantedElement> wanted(packed.size() / 8);
  for (std::size_t i = 0; i < wanted.size(); ++i) {
    const auto* p = reinterpret_cast<const uint8_t*>(packed.data()) + 8 * i;
    wanted[i].tag = static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
                    (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
    wanted[i].vr[0] = static_cast<char>(p[4]);
    wanted[i].vr[1] = static_cast<char>(p[5]);
    if (p[6] > 2) throw py::value_error("scan_dicom: unknown element kind");
    wanted[i].kind = static_cast<WantedKind>(p[6]);
    if (i > 0 && wanted[i].tag <= wanted[i - 1].tag) throw py::value_error("scan_dicom: spec must be sorted");
  }
  Py_buffer view;  // PyBUF_SIMPLE: one contiguous run of bytes, else BufferError
  if (PyObject_GetBuffer(data.ptr(), &view, PyBUF_SIMPLE) != 0) throw py::error_already_set();
  struct Release {
    Py_buffer* v;
    ~Release() { PyBuffer_Release(v); }
  } release{&view};
  const auto* bytes = static_cast<const uint8_t*>(view.buf);
  const ScanResult result =
      scan_dicom(bytes, static_cast<std::size_t>(view.len), wanted.data(), wanted.size());
  py::tuple values(wanted.size());
  for (std::size_t i = 0; i < wanted.size(); ++i) values[i] = py::none();
  long long pixel_offset = -1, pixel_length = 0;
  for (const FoundElement& e : result.found) {
    if (wanted[e.index].kind == WantedKind::kPixelData) {
      pixel_offset = static_cast<long long>(e.offset);
      pixel_length = static_cast<long long>(e.length);
    } else {
      values[e.index] = py::bytes(reinterpret_cast<const char*>(bytes + e.offset), e.length);
    }
  }
  py::list undefined;
  for (const UndefinedLength& u : result.undefined) undefined.append(py::make_tuple(u.tag, u.starts_with_item));
  return py::make_tuple(static_cast<int>(result.status), result.reason, result.at, result.implicit_vr, values,
                        pixel_offset, pixel_length, undefined);
}

}  // namespace
// ---------------------------------------------------------------- end of DICOM structure scanner

PYBIND11_MODULE(_C, m) {
  m.doc() = "medge native core (private: use medge.preprocess)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const InvalidArgument& e) {
      py::object cls = py::module_::import("medge.errors").attr("PreprocessError");
      PyErr_SetString(cls.ptr(), e.what());
    } catch (const ResourceError& e) {
      py::object cls = py::module_::import("medge.errors").attr("PreprocessError");
      PyErr_SetString(cls.ptr(), e.what());
    } catch (const CudaError& e) {
      py::object cls = py::module_::import("medge.errors").attr("CudaError");
      PyErr_SetString(cls.ptr(), e.what());
    }
  });

  py::enum_<PixelType>(m, "PixelType")
      .value("uint8", PixelType::kUInt8)
      .value("uint16", PixelType::kUInt16)
      .value("int16", PixelType::kInt16)
      .value("int32", PixelType::kInt32)
      .value("float32", PixelType::kFloat32);
  py::enum_<VoiMode>(m, "VoiMode").value("window", VoiMode::kWindow).value("range", VoiMode::kRange);
  py::enum_<VoiFunction>(m, "VoiFunction")
      .value("LINEAR", VoiFunction::kLinear)
      .value("LINEAR_EXACT", VoiFunction::kLinearExact)
      .value("SIGMOID", VoiFunction::kSigmoid);
  py::enum_<Fit>(m, "Fit").value("stretch", Fit::kStretch).value("letterbox", Fit::kLetterbox);
  py::enum_<Resample>(m, "Resample")
      .value("bilinear", Resample::kBilinear)
      .value("bilinear_antialias", Resample::kBilinearAntialias);
  py::enum_<OutputType>(m, "OutputType").value("float32", OutputType::kFloat32).value("float16", OutputType::kFloat16);

  py::class_<ImageParams>(m, "ImageParams")
      .def(py::init<>())
      .def_property(
          "pixels_address", [](const ImageParams& p) { return reinterpret_cast<std::uintptr_t>(p.pixels); },
          [](ImageParams& p, std::uintptr_t v) { p.pixels = reinterpret_cast<const void*>(v); })
      .def_readwrite("buffer_bytes", &ImageParams::buffer_bytes)
      .def_readwrite("height", &ImageParams::height)
      .def_readwrite("width", &ImageParams::width)
      .def_readwrite("row_stride", &ImageParams::row_stride)
      .def_readwrite("pixel_type", &ImageParams::pixel_type)
      .def_readwrite("bits_stored", &ImageParams::bits_stored)
      .def_readwrite("is_signed", &ImageParams::is_signed)
      .def_readwrite("rescale_slope", &ImageParams::rescale_slope)
      .def_readwrite("rescale_intercept", &ImageParams::rescale_intercept)
      .def_readwrite("voi_mode", &ImageParams::voi_mode)
      .def_readwrite("voi_function", &ImageParams::voi_function)
      .def_readwrite("window_center", &ImageParams::window_center)
      .def_readwrite("window_width", &ImageParams::window_width)
      .def_readwrite("range_low", &ImageParams::range_low)
      .def_readwrite("range_high", &ImageParams::range_high)
      .def_readwrite("invert", &ImageParams::invert);

  py::class_<OutputParams>(m, "OutputParams")
      .def(py::init<>())
      .def_readwrite("height", &OutputParams::height)
      .def_readwrite("width", &OutputParams::width)
      .def_readwrite("channels", &OutputParams::channels)
      .def_readwrite("fit", &OutputParams::fit)
      .def_readwrite("pad_value", &OutputParams::pad_value)
      .def_readwrite("resample", &OutputParams::resample)
      .def_readwrite("output_type", &OutputParams::output_type)
      .def_property(
          "mean", [](const OutputParams& o) { return float3(o.mean); },
          [](OutputParams& o, const std::vector<float>& v) { set_float3(o.mean, v, "mean"); })
      .def_property(
          "std", [](const OutputParams& o) { return float3(o.std); },
          [](OutputParams& o, const std::vector<float>& v) { set_float3(o.std, v, "std"); });

  // The native limits, so Python refuses an oversized batch before allocating its output.
  m.attr("MAX_BATCH") = kMaxBatch;
  m.attr("MAX_IMAGE_SIDE") = kMaxImageSide;
  m.attr("MAX_OUTPUT_SIDE") = kMaxOutputSide;

  m.def("preprocess_cpu", &run_cpu, py::arg("arrays"), py::arg("params"), py::arg("output"), py::arg("out_params"),
        py::arg("num_threads") = 0,
        "Preprocess 2-D host arrays (one per image) into `output` (N, C, H, W). Releases the GIL.");
  m.def("preprocess_cuda", &run_cuda, py::arg("params"), py::arg("output_address"), py::arg("output_bytes"),
        py::arg("out_params"), py::arg("stream"),
        "Enqueue preprocessing of device images (params carry device addresses) on `stream`; does not synchronise.");
  m.def("_emulate_cuda_preprocess", &run_emulated, py::arg("arrays"), py::arg("params"), py::arg("output"),
        py::arg("out_params"), py::arg("images_per_launch") = 0, py::arg("max_blocks") = 0, py::arg("fault") = "",
        "Tests only: the CUDA kernels run on the CPU (host arrays as for preprocess_cpu), with the CUDA path's "
        "launch plan; images_per_launch / max_blocks shrink launches and grids. A violated kernel invariant "
        "(read outside an image, shared memory out of range, misaligned vector access) raises RuntimeError; "
        "fault='wide_image' / 'small_vbuf' plants one to show that the checks work.");
  m.def("_cuda_launch_plan", &launch_plan, py::arg("arrays"), py::arg("params"), py::arg("out_params"),
        "Tests and docs: the CUDA path's launch plan for these images (host arrays stand in for device ones).");
  m.def("_axis_taps32_matches", &axis_taps32_matches, py::arg("in_size"), py::arg("region"), py::arg("antialias"),
        "Tests only: the kernels' 32-bit tap arithmetic agrees with the 64-bit one on every output coordinate.");
  m.def("validate_params", &validate_params, py::arg("params"), py::arg("out_params"),
        "Native validation of image and output parameters; raises PreprocessError. Reads no pixels.");
  m.def("output_bytes_required", &output_bytes_required, py::arg("out_params"), py::arg("count"));
  m.def("cpu_kernel_variant", &cpu_kernel_variant, "The CPU code path in use (e.g. 'x86-64 AVX2+FMA+F16C').");
  m.def("cuda_compiled", &cuda_compiled, "True when this build contains the CUDA kernels.");
  m.def("cuda_device_count", &cuda_device_count, "Visible CUDA devices (0 without driver or GPU; never raises).");
  m.def("cuda_status", &cuda_status, "Why CUDA is or is not usable here, e.g. the driver error.");
  m.def("cuda_architectures", &cuda_architectures, "CUDA architectures embedded in this build.");

  register_volume(m);  // volume preprocessing (medge.volume)
  m.def("scan_dicom", &scan_dicom_py, py::arg("data"), py::arg("spec"),
        "medge.dicom's fast reader: where the wanted elements of a native little-endian Part 10 buffer "
        "lie (status 0: accepted; anything else: read it with pydicom).");
}
