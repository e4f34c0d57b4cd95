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

#include "medge/pixel_math.h"
#include "medge/preprocess.h"

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
  m.def("validate_params", &validate_params, py::arg("params"), py::arg("out_params"),
        "Native validation of image and output parameters; raises PreprocessError. Reads no pixels.");
  m.def("output_bytes_required", &output_bytes_required, py::arg("out_params"), py::arg("count"));
  m.def("cpu_kernel_variant", &cpu_kernel_variant, "The CPU code path in use (e.g. 'x86-64 AVX2+FMA+F16C').");
  m.def("cuda_compiled", &cuda_compiled, "True when this build contains the CUDA kernels.");
  m.def("cuda_device_count", &cuda_device_count, "Visible CUDA devices (0 without driver or GPU; never raises).");
  m.def("cuda_status", &cuda_status, "Why CUDA is or is not usable here, e.g. the driver error.");
  m.def("cuda_architectures", &cuda_architectures, "CUDA architectures embedded in this build.");
}
