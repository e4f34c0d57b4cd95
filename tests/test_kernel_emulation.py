"""The CUDA kernels, run on the CPU by medge._C's emulator, against the CPU path and the float64 reference.

medge._C._emulate_cuda_preprocess builds the kernel bodies of csrc/include/medge/preprocess_kernels.h as host
code (csrc/include/medge/cuda_shim.h): each block's threads run phase by phase between the barriers, with
the launch plan the CUDA path uses. Reads outside an image, shared-memory indices out of range, misaligned
vector accesses and writes outside the output raise RuntimeError from inside the emulated kernel. Here, on
random mixed batches (every pixel type, letterbox, antialias, 1 and 3 channels, float16 / float32, more
images than one launch holds, tiny grids so that blocks loop over tiles, pitched rows whose margins are
poisoned, outputs pre-filled with NaN): every output pixel is written and equals the CPU path's within the
reference tolerances. This catches indexing bugs before a GPU does; speed is a GPU question (docs/gpu.md).
"""

from __future__ import annotations

import numpy as np
import pytest

from medge import PreprocessSpec
from medge.preprocess import _frame_params, _native, _output_params

from . import reference as ref
from .test_preprocess import TOLERANCE, make_image, reference_for

_C = _native()
DTYPES = ["uint8", "uint16", "int16", "int32", "float32"]


def poisoned_layout(raw: np.ndarray, rng: np.random.Generator, kind: str) -> np.ndarray:
    """``raw`` as a view inside a larger buffer whose margins hold values that would show in the output.

    kind: "contiguous" (a plain copy), "aligned" (rows start 16-byte aligned, pitch a multiple of 16 bytes:
    the kernels' vector loads), "odd" (arbitrary pitch and offset: element loads).
    """
    h, w = raw.shape
    if kind == "contiguous":
        return np.ascontiguousarray(raw)
    item = raw.dtype.itemsize
    if raw.dtype.kind == "f":
        poison = np.nan  # any read of it makes a NaN output
    else:
        poison = np.iinfo(raw.dtype).max if rng.random() < 0.5 else np.iinfo(raw.dtype).min
    if kind == "aligned":
        lead = 16 // item
        pitch = -(-(w + 2 * lead) * item // 16) * 16 // item
        extra = 64 // item
        big = np.full((h + 2) * pitch + 2 * extra, poison, raw.dtype)
        start = (-big.ctypes.data % 16) // item + lead  # 16-byte aligned start plus one aligned lead
        assert (big.ctypes.data + start * item) % 16 == 0
        view = big[pitch + start:pitch + start + h * pitch].reshape(h, pitch)[:, :w]
    else:
        lead = int(rng.integers(1, 7))
        pitch = w + lead + int(rng.integers(0, 9))
        big = np.full((h + 2) * pitch + 16, poison, raw.dtype)
        view = big[pitch + lead:pitch + lead + h * pitch].reshape(h, pitch)[:, :w]
    view[...] = raw
    return view


def random_frame(rng: np.random.Generator, size_class: str):
    dtype = np.dtype(rng.choice(DTYPES))
    if size_class == "small":
        h, w = (int(v) for v in rng.integers(1, 70, 2))
    elif size_class == "large":
        h, w = (int(v) for v in rng.integers(100, 700, 2))
    else:  # extreme aspect or strong shrink: gather kernel, narrow tiles, one-pixel axes
        h, w = [(1, int(rng.integers(1, 3000))), (int(rng.integers(1, 3000)), 1), (int(rng.integers(1500, 2600)), 7),
                (3, int(rng.integers(2000, 4000)))][int(rng.integers(0, 4))]
    if dtype.kind == "f":
        raw = (rng.standard_normal((h, w)) * float(rng.choice([1.0, 1000.0]))).astype(np.float32)
        bits, signed = None, None
    else:
        info = np.iinfo(dtype)
        bits = int(rng.integers(1, dtype.itemsize * 8 + 1))
        signed = bool(rng.integers(0, 2))
        raw = rng.integers(info.min, info.max, size=(h, w), endpoint=True, dtype=dtype)
    slope = float(rng.choice([1.0, 0.5, -1.0, 2.5]))
    intercept = float(rng.choice([0.0, -1024.0, 100.25]))
    stored = ref.stored_values(raw, bits or 32, bool(signed) if signed is not None else True)
    modality = ref.modality_lut(stored, slope, intercept)
    lo, hi = float(modality.min()), float(modality.max())
    spread = max(hi - lo, 1.0)
    function = str(rng.choice(["LINEAR", "LINEAR_EXACT", "SIGMOID"]))
    width = float(rng.choice([0.05, 0.3, 1.0])) * spread
    if function == "LINEAR":
        width = max(width, 1.0) if rng.random() < 0.9 else 1.0
    image = make_image(raw, bits_stored=bits, signed=signed, slope=slope, intercept=intercept,
                       windows=[(lo + float(rng.uniform(-0.2, 1.2)) * spread, width)], function=function,
                       photometric=str(rng.choice(["MONOCHROME1", "MONOCHROME2"])))
    return image, (lo, hi)


def random_spec(rng: np.random.Generator, value_range, large: bool) -> PreprocessSpec:
    channels = int(rng.choice([1, 3]))
    if large:
        height, width = (int(v) for v in rng.integers(100, 600, 2))
    else:
        height, width = (int(v) for v in rng.integers(1, 48, 2))
    voi = str(rng.choice(["dicom", "range"]))
    kwargs = {}
    if voi == "range":
        lo, hi = value_range
        kwargs["value_range"] = (lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo) + 1.0)
    return PreprocessSpec(
        height=height, width=width, channels=channels, voi=voi,
        fit=str(rng.choice(["stretch", "letterbox"])), pad_value=float(rng.choice([0.0, 1.0, 0.25])),
        resample=str(rng.choice(["bilinear", "bilinear_antialias"])),
        mean=tuple(float(v) for v in rng.uniform(-0.5, 0.5, channels)),
        std=tuple(float(v) for v in rng.choice([0.229, 1.0, 2.0, -1.0], channels)),
        dtype=str(rng.choice(["float32", "float16"])), **kwargs,
    )


def run_both(images, spec, rng, *, images_per_launch=0, max_blocks=0, layouts=("contiguous", "aligned", "odd")):
    """CPU path and emulated CUDA kernels on the same frames; the emulated output starts as NaN."""
    arrays, params = [], []
    for index, image in enumerate(images):
        for frame in range(image.number_of_frames):
            arrays.append(poisoned_layout(image.pixels[frame], rng, str(rng.choice(layouts))))
            params.append(_frame_params(_C, image.semantics, frame, spec, f"image {index}"))
    out_params = _output_params(_C, spec)
    shape = (len(arrays), *spec.output_shape_per_image)
    cpu = np.empty(shape, spec.dtype)
    _C.preprocess_cpu(arrays, params, cpu, out_params)
    emulated = np.full(shape, np.nan, spec.dtype)
    _C._emulate_cuda_preprocess(arrays, params, emulated, out_params, images_per_launch, max_blocks)
    return cpu, emulated


def assert_close(emulated, cpu, expected, spec):
    assert not np.isnan(emulated).any(), f"{int(np.isnan(emulated).sum())} output values never written"
    stds = np.abs(np.broadcast_to(np.asarray(spec.std, dtype=np.float64), (spec.channels,)))[None, :, None, None]
    vs_ref = float((np.abs(emulated.astype(np.float64) - expected) * stds).max())
    assert vs_ref <= TOLERANCE[spec.dtype], f"emulated kernel vs reference: {vs_ref:.3g}"
    # Against the CPU path (same tap tables, same order of sums): rounding differences only.
    vs_cpu = float((np.abs(emulated.astype(np.float64) - cpu.astype(np.float64)) * stds).max())
    assert vs_cpu <= (1e-3 if spec.dtype == "float16" else 1e-5), f"emulated kernel vs CPU path: {vs_cpu:.3g}"


@pytest.mark.parametrize("seed", range(12))
def test_random_mixed_batches_match_the_cpu_path_and_reference(seed):
    rng = np.random.default_rng(1000 + seed)
    size_class = ["small", "small", "large", "extreme"][seed % 4]
    cases = [random_frame(rng, size_class if rng.random() < 0.7 else "small")
             for _ in range(int(rng.integers(1, 6)))]
    images = [image for image, _ in cases]
    spec = random_spec(rng, cases[0][1], large=seed % 3 == 2)
    cpu, emulated = run_both(images, spec, rng, images_per_launch=int(rng.choice([0, 1, 2])),
                             max_blocks=int(rng.choice([0, 1, 3])))
    expected = np.concatenate([reference_for(image, spec) for image in images])
    assert_close(emulated, cpu, expected, spec)


def test_more_images_than_one_launch_holds():
    """65 images (one launch holds 64) of several pixel types: several tiled launches, batch order kept."""
    rng = np.random.default_rng(7)
    cases = [random_frame(rng, "small") for _ in range(65)]
    images = [image for image, _ in cases]
    spec = random_spec(rng, cases[0][1], large=False)
    cpu, emulated = run_both(images, spec, rng)
    expected = np.concatenate([reference_for(image, spec) for image in images])
    assert_close(emulated, cpu, expected, spec)


@pytest.mark.parametrize("resample", ["bilinear", "bilinear_antialias"])
@pytest.mark.parametrize("out_dtype", ["float16", "float32"])
def test_the_benchmark_shape_on_every_pixel_type(resample, out_dtype):
    """512x512 -> 256x256 (the GPU benchmark's shape, smaller batch), letterboxed 3-channel variant too."""
    rng = np.random.default_rng(11)
    for dtype in DTYPES:
        info = np.iinfo(dtype) if dtype != "float32" else None
        raw = (rng.integers(info.min, info.max, (512, 512), endpoint=True, dtype=dtype) if info
               else rng.standard_normal((512, 512)).astype(np.float32) * 500)
        image = make_image(raw, windows=[(float(np.median(raw)), float(raw.std() * 2 + 1))])
        # An integer window centre with an integer intercept (CT): the 8/16-bit kernels' half-pivot decoding.
        ct = make_image(raw, intercept=-1024.0, windows=[(float(round(float(np.median(raw)))) + 1024.0 - 1024.0,
                                                          float(round(float(raw.std()) * 2 + 2)))],
                        photometric="MONOCHROME1")
        for spec in (PreprocessSpec(256, 256, resample=resample, dtype=out_dtype),
                     PreprocessSpec(200, 256, channels=3, fit="letterbox", pad_value=0.25, resample=resample,
                                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), dtype=out_dtype)):
            cpu, emulated = run_both([image, ct], spec, rng, max_blocks=5)
            assert_close(emulated, cpu, np.concatenate([reference_for(image, spec), reference_for(ct, spec)]), spec)


@pytest.mark.parametrize("in_size,out_size", [(2048, 256), (3000, 224), (300, 2000), (65536, 16), (16, 16384)])
def test_strong_shrinks_and_enlargements_along_one_axis(in_size, out_size):
    """Wide filters (more taps than registers hold: the shared x table; past 64: the gather kernel) and
    strong enlargement, on one long axis so that the emulation stays quick."""
    rng = np.random.default_rng(in_size + out_size)
    raw = rng.integers(0, 4096, (3, in_size), dtype=np.uint16)
    image = make_image(raw, windows=[(2048.0, 4096.0)])
    for resample in ("bilinear", "bilinear_antialias"):
        for spec in (PreprocessSpec(2, out_size, resample=resample, voi="dicom"),
                     PreprocessSpec(out_size if out_size <= 600 else 40, 2, resample=resample, voi="dicom")):
            img = image if spec.width > 2 else make_image(np.ascontiguousarray(raw.T), windows=[(2048.0, 4096.0)])
            cpu, emulated = run_both([img], spec, rng)
            assert_close(emulated, cpu, reference_for(img, spec), spec)


@pytest.mark.parametrize("fault,message", [("wide_image", "read outside every input image's buffer"),
                                           ("small_vbuf", "more vbuf columns than the plan reserved")])
@pytest.mark.parametrize("resample", ["bilinear", "bilinear_antialias"])
def test_the_emulator_catches_planted_faults(fault, message, resample):
    """The checks themselves work: kernels that see each image 8 columns wider than its buffer read past
    its end; a plan one chunk short of shared memory is caught before anything overflows. Either stops the
    emulated kernel with a RuntimeError naming the fault, never the process."""
    rng = np.random.default_rng(3)
    image = make_image(rng.integers(0, 100, (40, 40), dtype=np.uint16), windows=[(50.0, 100.0)])
    spec = PreprocessSpec(20, 30, resample=resample)
    p = _frame_params(_C, image.semantics, 0, spec, "image 0")
    out = np.full((1, 1, 20, 30), np.nan, np.float32)
    _C._emulate_cuda_preprocess([image.pixels[0]], [p], out, _output_params(_C, spec))
    assert not np.isnan(out).any()
    with pytest.raises(RuntimeError, match=message):
        _C._emulate_cuda_preprocess([image.pixels[0]], [p], out, _output_params(_C, spec), fault=fault)


@pytest.mark.parametrize("antialias", [False, True])
def test_the_kernels_32_bit_tap_arithmetic_equals_the_64_bit_one(antialias):
    """axis_taps32 (the GPU's) against axis_taps (the CPU's) on every output coordinate, extremes included."""
    rng = np.random.default_rng(5)
    sizes = [(1, 1), (65536, 16384), (65536, 1), (1, 16384), (65535, 16383), (3, 2), (2, 3), (512, 224)]
    sizes += [(int(rng.integers(1, 65537)), int(rng.integers(1, 16385))) for _ in range(20)]
    for in_size, region in sizes:
        assert _C._axis_taps32_matches(in_size, region, antialias), (in_size, region)


def plan_for(shapes_dtypes, spec, layout="contiguous", window=(0.3, 10.0), intercept=0.0):
    rng = np.random.default_rng(0)
    arrays, params = [], []
    for shape, dtype in shapes_dtypes:
        raw = np.zeros(shape, dtype)
        image = make_image(raw, windows=[window], intercept=intercept)
        arrays.append(poisoned_layout(raw, rng, layout))
        params.append(_frame_params(_C, image.semantics, 0, spec, "image"))
    return _C._cuda_launch_plan(arrays, params, _output_params(_C, spec))


def test_the_launch_plan_takes_each_path_the_tests_rely_on():
    """What the comparisons above cover: the tiled kernel for the benchmark shape (one launch, full-width tiles,
    antialiased rows pushed, vector loads), the shared x table past 8 taps, the gather kernel past 64, one
    launch per pixel type, element loads for unaligned rows."""
    aa = PreprocessSpec(256, 256, resample="bilinear_antialias", dtype="float16")
    ct = {"window": (40.0, 400.0), "intercept": -1024.0}  # LINEAR: centre 39.5 HU = stored 1063.5, a half
    [bench] = plan_for([((512, 512), np.int16)] * 64, aa, **ct)
    assert bench["kernel"] == "tiled" and bench["images"] == list(range(64)) and bench["tile_w"] == 256
    assert set(bench["taps_x"]) == set(bench["taps_y"]) == {4} and all(bench["push_rows"] + bench["vector_rows"])
    assert all(bench["half_pivot"]) and not any(bench["x_table"])
    assert bench["vbuf_cols"] == 512 and bench["smem_bytes"] <= 48 * 1024 and bench["tiles"] == 64 * 16
    assert plan_for([((512, 512), np.int16)], aa)[0]["half_pivot"] == [False]  # centre 0.3: not a half
    [imagenet] = plan_for([((512, 512), np.uint16)], PreprocessSpec(224, 224, resample="bilinear_antialias"))
    assert imagenet["taps_x"] == [5] and imagenet["x_table"] == [False]  # 2.29x: 5 taps in registers
    [wide] = plan_for([((2048, 2048), np.uint16)], aa)
    assert wide["kernel"] == "tiled" and wide["taps_x"] == [16] and wide["x_table"] == [True]
    assert wide["tile_w"] < 256
    [huge] = plan_for([((3, 65536), np.uint16)], PreprocessSpec(2, 16, resample="bilinear_antialias"))
    assert huge["kernel"] == "gather" and huge["taps_x"] == [8192]
    mixed = plan_for([((30, 40), np.uint8), ((30, 40), np.float32), ((30, 40), np.uint8)],
                     PreprocessSpec(16, 16, resample="bilinear"))
    assert [(p["kernel"], p["images"], p["push_rows"]) for p in mixed] == [
        ("tiled", [0, 2], [False, False]), ("tiled", [1], [False])]
    [shorts] = plan_for([((30, 40), np.int16), ((30, 40), np.uint16)], PreprocessSpec(16, 16))
    assert shorts["images"] == [0, 1]  # int16 and uint16 share one kernel (Pixel Representation is a parameter)
    [odd] = plan_for([((30, 41), np.int16)], PreprocessSpec(16, 16), layout="odd")
    assert odd["vector_rows"] == [False]
