"""medge.preprocess against the independent float64 reference (tests/reference.py).

Every test that produces pixels runs on each device through the same function:
the "cuda" case skips, with the reason, where no CUDA device is visible.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import medge
from medge import PreprocessSpec, preprocess
from medge.errors import DicomError, PreprocessError, SpecError
from medge.image import FrameTransform, Image, PixelSemantics, Window

from . import reference as ref

# Tolerances from the issue: relative to the output range (1/std per channel).
TOLERANCE = {"float32": 1e-4, "float16": 1e-3}


def _cuda_skip_reason() -> str:
    from medge import _C

    if not _C.cuda_compiled():
        return "this medge build has no CUDA kernels (nvcc was not found at build time)"
    return f"no CUDA device visible ({_C.cuda_status()})"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cuda" and not medge.cuda_available():
        pytest.skip(_cuda_skip_reason())
    return request.param


def to_numpy(result) -> np.ndarray:
    """Host copy of a preprocess() result from any device."""
    if isinstance(result, np.ndarray):
        return result
    if hasattr(result, "to_host"):
        return result.to_host()
    if hasattr(result, "get"):  # CuPy
        return result.get()
    return np.asarray(result.cpu())  # torch


def make_image(raw, *, bits_stored=None, signed=None, slope=1.0, intercept=0.0, windows=(), function="LINEAR",
               photometric="MONOCHROME2") -> Image:
    raw = raw if raw.ndim == 3 else raw[None]
    bits_allocated = raw.dtype.itemsize * 8
    semantics = PixelSemantics(
        rows=raw.shape[1],
        columns=raw.shape[2],
        number_of_frames=raw.shape[0],
        bits_allocated=bits_allocated,
        bits_stored=bits_allocated if bits_stored is None else bits_stored,
        pixel_representation=int(raw.dtype.kind == "i") if signed is None else int(signed),
        photometric_interpretation=photometric,
        frames=(FrameTransform(slope, intercept, tuple(Window(c, w) for c, w in windows), function),),
    )
    return Image(raw, semantics)


def reference_for(image: Image, spec: PreprocessSpec) -> np.ndarray:
    """Reference output of every frame of ``image`` under ``spec``."""
    frames = []
    sem = image.semantics
    for f in range(image.number_of_frames):
        t = sem.frame_transform(f)
        if spec.voi == "range":
            voi = ("range", *spec.value_range)
        elif spec.voi == "window":
            voi = ("window", *spec.window, spec.voi_function or "LINEAR")
        else:
            w = t.windows[spec.window_index]
            voi = ("window", w.center, w.width, spec.voi_function or t.voi_function)
        frames.append(
            ref.reference_frame(
                image.pixels[f],
                bits_stored=sem.bits_stored,
                signed=sem.pixel_representation == 1,
                slope=t.rescale_slope,
                intercept=t.rescale_intercept,
                voi=voi,
                invert=sem.inverted,
                out_h=spec.height,
                out_w=spec.width,
                channels=spec.channels,
                fit=spec.fit,
                pad_value=spec.pad_value,
                resample=spec.resample,
                mean=spec.mean,
                std=spec.std,
            )
        )
    return np.stack(frames)


def assert_matches(out: np.ndarray, expected: np.ndarray, spec: PreprocessSpec) -> None:
    assert out.shape == expected.shape
    assert out.dtype == np.dtype(spec.dtype)
    stds = np.abs(np.broadcast_to(np.asarray(spec.std, dtype=np.float64), (spec.channels,)))
    # Error in display units = error relative to the output range of each channel.
    error = np.abs(out.astype(np.float64) - expected) * stds[None, :, None, None]
    worst = float(error.max()) if error.size else 0.0
    assert worst <= TOLERANCE[spec.dtype], f"max error {worst:.3g} (relative to output range)"


# ---------------------------------------------------------------------------
# Random cases: every option, random sizes and values, mixed batches


DTYPES = ["uint8", "uint16", "int16", "int32", "float32"]


@st.composite
def frame_cases(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    h = draw(st.integers(1, 48))
    w = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        scale = draw(st.sampled_from([1.0, 1000.0, 1e6]))
        raw = (rng.standard_normal((h, w)) * scale).astype(np.float32)
        bits, signed = 32, True
    else:
        info = np.iinfo(dtype)
        bits_alloc = dtype.itemsize * 8
        bits = draw(st.integers(1, bits_alloc))
        signed = draw(st.booleans())
        # Full container range: junk above Bits Stored must be ignored.
        raw = rng.integers(info.min, info.max, size=(h, w), endpoint=True, dtype=dtype)
    slope = draw(st.sampled_from([1.0, 0.5, 2.5, -1.0, 0.001]))
    intercept = draw(st.sampled_from([0.0, -1024.0, 100.25, 3.0e5]))
    stored = ref.stored_values(raw, bits if dtype.kind != "f" else 32, signed)
    modality = ref.modality_lut(stored, slope, intercept)
    lo, hi = float(modality.min()), float(modality.max())
    spread = max(hi - lo, 1.0)
    center = lo + draw(st.floats(-0.2, 1.2)) * spread
    function = draw(st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID"]))
    width = draw(st.sampled_from([0.05, 0.3, 1.0, 3.0])) * spread
    if function == "LINEAR":
        width = draw(st.sampled_from([1.0, max(width, 1.0)]))
    image = make_image(
        raw,
        bits_stored=bits if dtype.kind != "f" else None,
        signed=signed if dtype.kind != "f" else None,
        slope=slope,
        intercept=intercept,
        windows=[(center, width)],
        function=function,
        photometric=draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2"])),
    )
    return image, (lo, hi)


@st.composite
def spec_cases(draw, value_range):
    channels = draw(st.sampled_from([1, 3]))
    voi = draw(st.sampled_from(["dicom", "range"]))
    kwargs = {}
    if voi == "range":
        lo, hi = value_range
        kwargs["value_range"] = (lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo) + 1.0)
    n_stats = draw(st.sampled_from([1, channels]))
    mean = tuple(draw(st.floats(-0.5, 0.5)) for _ in range(n_stats))
    std = tuple(draw(st.sampled_from([0.1, 0.229, 1.0, 2.0, -1.0])) for _ in range(n_stats))
    return PreprocessSpec(
        height=draw(st.integers(1, 40)),
        width=draw(st.integers(1, 40)),
        channels=channels,
        voi=voi,
        fit=draw(st.sampled_from(["stretch", "letterbox"])),
        pad_value=draw(st.sampled_from([0.0, 1.0, 0.25])),
        resample=draw(st.sampled_from(["bilinear", "bilinear_antialias"])),
        mean=mean,
        std=std,
        dtype=draw(st.sampled_from(["float32", "float16"])),
        **kwargs,
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_batches_match_reference(device, data):
    """Mixed batches (different dtypes, sizes, bits, rescale, window, polarity) vs the reference."""
    cases = [data.draw(frame_cases()) for _ in range(data.draw(st.integers(1, 3)))]
    images = [image for image, _ in cases]
    spec = data.draw(spec_cases(cases[0][1]))
    out = to_numpy(preprocess(images, spec, device=device))
    expected = np.concatenate([reference_for(image, spec) for image in images])
    assert_matches(out, expected, spec)


@pytest.mark.parametrize("in_shape,out_shape", [((512, 512), (224, 224)), ((300, 500), (64, 96)), ((7, 5), (31, 17))])
@pytest.mark.parametrize("resample", ["bilinear", "bilinear_antialias"])
@pytest.mark.parametrize("fit", ["stretch", "letterbox"])
def test_ct_like_sizes(device, in_shape, out_shape, resample, fit):
    """Realistic sizes (shrink a lot, enlarge, aspect changes) with CT encoding and a 40/400 window."""
    rng = np.random.default_rng(1)
    raw = rng.integers(-1024, 3071, size=in_shape, dtype=np.int16)
    image = make_image(raw, intercept=-1024.0 + 1024, windows=[(40, 400)])
    spec = PreprocessSpec(*out_shape, resample=resample, fit=fit, pad_value=0.0, mean=(0.5,), std=(0.25,))
    out = to_numpy(preprocess(image, spec, device=device))
    assert_matches(out, reference_for(image, spec), spec)


def test_float16_output_is_float32_output_rounded(device):
    """fp16 output equals the fp32 output rounded to nearest even, bit for bit (checks the half conversion)."""
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 4096, size=(130, 70), dtype=np.uint16)
    image = make_image(raw, bits_stored=12, windows=[(2048, 3000)])
    spec32 = PreprocessSpec(50, 40, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 1e-4))
    out32 = to_numpy(preprocess(image, spec32, device=device))
    out16 = to_numpy(preprocess(image, spec32.replace(dtype="float16"), device=device))
    np.testing.assert_array_equal(out16.view(np.uint16), out32.astype(np.float16).view(np.uint16))
    assert np.isinf(out16[:, 2]).any() or np.abs(out16[:, 2]).max() > 1000  # 1/1e-4 scaling reaches the fp16 range


# ---------------------------------------------------------------------------
# Hand-checked values (small enough to verify by eye)


def test_window_formulas_at_known_points(device):
    """LINEAR, LINEAR_EXACT and SIGMOID at values worked out from PS3.3 C.11.2 by hand."""
    raw = np.array([[-200, -161, -160, 40, 239, 240, 500]], dtype=np.int16)
    # Same size in and out, bilinear: resampling is the identity.
    spec = PreprocessSpec(1, 7, resample="bilinear")
    linear = to_numpy(preprocess(make_image(raw, windows=[(40, 400)], function="LINEAR"), spec, device=device))
    # c=40, w=400: x <= -160.0 -> 0; x > 239.0 -> 1; else (x - 39.5) / 399 + 0.5
    np.testing.assert_allclose(linear[0, 0, 0], [0, 0, 0, (40 - 39.5) / 399 + 0.5, 1, 1, 1], atol=1e-6)
    exact = to_numpy(preprocess(make_image(raw, windows=[(40, 400)], function="LINEAR_EXACT"), spec, device=device))
    # x <= -160 -> 0; x > 240 -> 1; else (x - 40) / 400 + 0.5
    np.testing.assert_allclose(exact[0, 0, 0], [0, 0, 0, 0.5, (239 - 40) / 400 + 0.5, 1, 1], atol=1e-6)
    sigmoid = to_numpy(preprocess(make_image(raw, windows=[(40, 400)], function="SIGMOID"), spec, device=device))
    np.testing.assert_allclose(sigmoid[0, 0, 0, 3], 0.5, atol=1e-6)
    np.testing.assert_allclose(sigmoid[0, 0, 0, 5], 1 / (1 + np.exp(-4 * 200 / 400)), atol=1e-6)


def test_linear_width_one_is_a_threshold(device):
    raw = np.array([[98, 99, 100, 101]], dtype=np.uint16)
    out = to_numpy(preprocess(make_image(raw, windows=[(100, 1)]), PreprocessSpec(1, 4, resample="bilinear"),
                              device=device))
    np.testing.assert_array_equal(out[0, 0, 0], [0, 0, 1, 1])  # x <= c - 0.5 -> 0, else 1


def test_monochrome1_inverts_after_voi(device):
    raw = np.array([[0, 1000, 4095]], dtype=np.uint16)
    spec = PreprocessSpec(1, 3, voi="range", value_range=(0, 4095), resample="bilinear")
    m2 = to_numpy(preprocess(make_image(raw), spec, device=device))
    m1 = to_numpy(preprocess(make_image(raw, photometric="MONOCHROME1"), spec, device=device))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    np.testing.assert_allclose(m1[0, 0, 0], [1.0, 1 - 1000 / 4095, 0.0], atol=1e-6)


def test_bits_stored_masks_junk_and_sign_extends(device):
    # 12 bits stored in 16: 0xF7FF holds junk 0xF000 above 0x7FF; as signed 12-bit 0x800 is -2048.
    raw = np.array([[0xF7FF, 0x0800, 0x0FFF, 0x0001]], dtype=np.uint16)
    spec = PreprocessSpec(1, 4, voi="range", value_range=(-2048, 2047), resample="bilinear")
    unsigned = to_numpy(preprocess(make_image(raw, bits_stored=12, signed=False), spec, device=device))
    np.testing.assert_allclose(unsigned[0, 0, 0], np.clip((np.array([0x7FF, 0x800, 0xFFF, 1]) + 2048) / 4095, 0, 1),
                               atol=1e-6)
    signed = to_numpy(preprocess(make_image(raw, bits_stored=12, signed=True), spec, device=device))
    np.testing.assert_allclose(signed[0, 0, 0], (np.array([2047, -2048, -1, 1]) + 2048) / 4095, atol=1e-6)


def test_antialias_two_to_one_is_the_triangle_average(device):
    """Shrinking 4 -> 2 with antialias: taps weigh 1/8, 3/8, 3/8, 1/8 (edges renormalised)."""
    raw = np.array([[0, 100, 200, 300]], dtype=np.uint16).repeat(2, axis=0)
    spec = PreprocessSpec(1, 2, voi="range", value_range=(0, 1000), resample="bilinear_antialias")
    out = to_numpy(preprocess(make_image(raw), spec, device=device))[0, 0, 0]
    # Output 0: centre 1.0, support 2: weights for j=0,1,2 = 0.75, 0.75, 0.25 -> normalised by 1.75.
    np.testing.assert_allclose(out[0], (0.75 * 0 + 0.75 * 100 + 0.25 * 200) / 1.75 / 1000, atol=1e-6)
    plain = to_numpy(preprocess(make_image(raw), spec.replace(resample="bilinear"), device=device))[0, 0, 0]
    np.testing.assert_allclose(plain[0], 50 / 1000, atol=1e-6)  # src 0.5: halfway between 0 and 100


def test_letterbox_pads_outside_the_region(device):
    raw = np.full((10, 20), 500, dtype=np.uint16)
    spec = PreprocessSpec(20, 20, voi="range", value_range=(0, 1000), fit="letterbox", pad_value=0.25,
                          resample="bilinear")
    out = to_numpy(preprocess(make_image(raw), spec, device=device))[0, 0]
    top, left, rh, rw = ref.letterbox_region(10, 20, 20, 20)
    assert (top, left, rh, rw) == (5, 0, 10, 20)
    np.testing.assert_allclose(out[:5], 0.25)
    np.testing.assert_allclose(out[15:], 0.25)
    np.testing.assert_allclose(out[5:15], 0.5, atol=1e-6)


def test_extreme_int32_values_keep_precision(device):
    """A narrow window far from zero on int32 data: float pivoting must keep 1e-4."""
    base = 2_000_000_000
    raw = (base + np.arange(-50, 50, dtype=np.int64)).astype(np.int32).reshape(10, 10)
    image = make_image(raw, slope=1.0, intercept=-1.5e9, windows=[(base - 1.5e9, 37.0)], function="LINEAR_EXACT")
    spec = PreprocessSpec(10, 10, resample="bilinear")
    out = to_numpy(preprocess(image, spec, device=device))
    assert_matches(out, reference_for(image, spec), spec)
    assert 0 < out.mean() < 1


def test_centre_far_outside_a_small_container(device):
    """Found by hypothesis: a value range whose centre, in stored units (2.18e9 with slope 0.001), is far
    outside int32 must saturate correctly on 8/16-bit containers instead of wrapping."""
    raw = np.array([[95, 0]], dtype=np.uint8)
    image = make_image(raw, bits_stored=1, slope=0.001, photometric="MONOCHROME1")
    spec = PreprocessSpec(1, 2, voi="range", value_range=(2179375.5, 2179376.5), resample="bilinear")
    out = to_numpy(preprocess(image, spec, device=device))
    np.testing.assert_array_equal(out[0, 0, 0], [1.0, 1.0])  # below the range -> 0, MONOCHROME1 -> 1
    assert_matches(out, reference_for(image, spec), spec)


@pytest.mark.parametrize("in_shape,out_shape", [((3, 65536), (2, 17)), ((2, 40000), (3, 300)), ((5, 3), (7, 16384))])
@pytest.mark.parametrize("resample", ["bilinear", "bilinear_antialias"])
def test_extreme_sizes_keep_coordinate_precision(device, in_shape, out_shape, resample):
    """Resampling coordinates are exact integer ratios: float32 coordinates would be off by ~1e-3 here."""
    raw = np.random.default_rng(7).integers(0, 4096, size=in_shape, dtype=np.uint16)
    image = make_image(raw)
    spec = PreprocessSpec(*out_shape, voi="range", value_range=(0, 4095), resample=resample)
    assert_matches(to_numpy(preprocess(image, spec, device=device)), reference_for(image, spec), spec)


def test_multiframe_and_mixed_batch_order(device):
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 4000, size=(3, 20, 30), dtype=np.uint16)
    multi = make_image(frames, windows=[(2000, 1000)])
    single = make_image(rng.integers(-500, 500, size=(40, 10), dtype=np.int16), windows=[(0, 300)])
    spec = PreprocessSpec(16, 16)
    out = to_numpy(preprocess([single, multi, single], spec, device=device))
    assert out.shape == (5, 1, 16, 16)
    expected = np.concatenate([reference_for(single, spec), reference_for(multi, spec), reference_for(single, spec)])
    assert_matches(out, expected, spec)


def test_per_frame_transforms_are_honoured(device):
    """Enhanced multi-frame: each frame with its own rescale and window."""
    raw = np.tile(np.arange(100, dtype=np.uint16).reshape(10, 10), (2, 1, 1))
    semantics = PixelSemantics(
        rows=10, columns=10, number_of_frames=2, bits_allocated=16, bits_stored=16,
        frames=(FrameTransform(1.0, 0.0, (Window(50, 100),)), FrameTransform(2.0, 100.0, (Window(150, 60),))),
    )
    image = Image(raw, semantics)
    spec = PreprocessSpec(10, 10, resample="bilinear")
    out = to_numpy(preprocess(image, spec, device=device))
    assert_matches(out, reference_for(image, spec), spec)
    assert not np.allclose(out[0], out[1])


def test_window_selection_and_overrides(device):
    raw = np.arange(400, dtype=np.int16).reshape(20, 20)
    image = make_image(raw, windows=[(100, 50), (300, 200)])
    for spec in (
        PreprocessSpec(8, 8, window_index=1),
        PreprocessSpec(8, 8, voi="window", window=(200, 80), voi_function="SIGMOID"),
        PreprocessSpec(8, 8, voi_function="LINEAR_EXACT"),
    ):
        assert_matches(to_numpy(preprocess(image, spec, device=device)), reference_for(image, spec), spec)


def test_noncontiguous_and_big_endian_inputs(device):
    rng = np.random.default_rng(4)
    base = rng.integers(-1000, 1000, size=(40, 60), dtype=np.int16)
    spec = PreprocessSpec(12, 12, voi="range", value_range=(-1000, 1000))
    expected = to_numpy(preprocess(base.copy(), spec, device=device))
    big = base.astype(">i2")
    np.testing.assert_array_equal(to_numpy(preprocess(big, spec, device=device)), expected)
    strided = np.zeros((40, 120), dtype=np.int16)
    strided[:, ::2] = base
    np.testing.assert_array_equal(to_numpy(preprocess(strided[:, ::2], spec, device=device)), expected)
    padded_rows = np.zeros((40, 64), dtype=np.int16)
    padded_rows[:, :60] = base
    np.testing.assert_array_equal(to_numpy(preprocess(padded_rows[:, :60], spec, device=device)), expected)


def test_output_buffer_is_written_in_place_cpu():
    raw = np.arange(64, dtype=np.uint8).reshape(8, 8)
    spec = PreprocessSpec(4, 4, voi="range", value_range=(0, 255))
    out = np.full((3, 1, 4, 4), np.nan, dtype=np.float32)
    result = preprocess([raw, raw, raw], spec, out=out)
    assert result is out
    assert np.isfinite(out).all()


def test_baseline_cpu_path_matches_reference_too():
    """The portable x86-64 build of the CPU kernel (what machines without AVX2 run) passes the same
    reference tests: re-run them in a subprocess with MEDGE_CPU_BASELINE=1."""
    import os
    import subprocess
    import sys

    from medge import _C

    if os.environ.get("MEDGE_CPU_BASELINE"):
        pytest.skip("already running on the forced baseline path")
    if _C.cpu_kernel_variant() == "portable":
        pytest.skip("not an x86-64 build: there is only one CPU code path")
    env = dict(os.environ, MEDGE_CPU_BASELINE="1")
    check = subprocess.run([sys.executable, "-c", "import medge._C as c; print(c.cpu_kernel_variant())"],
                           env=env, capture_output=True, text=True, check=True)
    assert check.stdout.strip() == "x86-64 baseline"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cpu and not baseline", __file__],
        env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_thread_count_does_not_change_results():
    rng = np.random.default_rng(5)
    images = [make_image(rng.integers(0, 4096, size=(97, 131), dtype=np.uint16), windows=[(2000, 2500)])
              for _ in range(5)]
    spec = PreprocessSpec(70, 45, channels=3)
    single = preprocess(images, spec, num_threads=1)
    many = preprocess(images, spec, num_threads=7)
    np.testing.assert_array_equal(single, many)


# ---------------------------------------------------------------------------
# PreprocessSpec


def test_spec_json_round_trip():
    spec = PreprocessSpec(224, 256, channels=3, voi="window", window=(-600, 1500), voi_function="SIGMOID",
                          fit="letterbox", pad_value=0.5, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                          dtype="float16")
    text = spec.to_json()
    assert json.loads(text)["schema_version"] == 1
    assert PreprocessSpec.from_json(text) == spec
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(height=0, width=10), "height"),
        (dict(height=10, width=10, channels=2), "channels"),
        (dict(height=10, width=10, voi="window"), "window"),
        (dict(height=10, width=10, voi="window", window=(0, 0.5)), "width"),
        (dict(height=10, width=10, voi="window", window=(0, float("nan"))), "finite"),
        (dict(height=10, width=10, voi="range", value_range=(5, 5)), "high > low"),
        (dict(height=10, width=10, std=(0.0,)), "non-zero"),
        (dict(height=10, width=10, channels=3, mean=(0.1, 0.2)), "mean"),
        (dict(height=10, width=10, dtype="int8"), "dtype"),
        (dict(height=10, width=10, resample="bicubic"), "resample"),
        (dict(height=10, width=10, voi_function="GAMMA"), "voi_function"),
    ],
)
def test_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(SpecError, match=message):
        PreprocessSpec(**kwargs)


def test_spec_json_errors():
    with pytest.raises(SpecError, match="not valid JSON"):
        PreprocessSpec.from_json("{")
    with pytest.raises(SpecError, match="unknown"):
        PreprocessSpec.from_dict({"height": 1, "width": 1, "colour": "red"})
    with pytest.raises(SpecError, match="schema version"):
        PreprocessSpec.from_dict({"schema_version": 99, "height": 1, "width": 1})
    with pytest.raises(SpecError, match="missing"):
        PreprocessSpec.from_dict({"height": 1})


# ---------------------------------------------------------------------------
# Bad input answered, nothing written out of bounds


def test_bad_output_buffers_are_refused():
    raw = np.zeros((8, 8), dtype=np.uint16)
    spec = PreprocessSpec(4, 4, voi="range", value_range=(0, 1))
    with pytest.raises(PreprocessError, match="shape"):
        preprocess(raw, spec, out=np.empty((2, 1, 4, 4), np.float32))
    with pytest.raises(PreprocessError, match="dtype"):
        preprocess(raw, spec, out=np.empty((1, 1, 4, 4), np.float64))
    readonly = np.empty((1, 1, 4, 4), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(PreprocessError, match="read-only"):
        preprocess(raw, spec, out=readonly)
    with pytest.raises(PreprocessError, match="C-contiguous"):
        preprocess(raw, spec, out=np.empty((1, 1, 4, 8), np.float32)[..., ::2])


def test_missing_window_is_a_clear_error():
    with pytest.raises(DicomError, match="no Window Center/Width"):
        preprocess(np.zeros((4, 4), np.int16), PreprocessSpec(2, 2))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_pixels_are_refused(bad):
    raw = np.zeros((8, 8), np.float32)
    raw[3, 4] = bad
    with pytest.raises(PreprocessError, match="NaN or infinity"):
        preprocess(raw, PreprocessSpec(4, 4, voi="range", value_range=(0, 1)))


def test_unsupported_dtypes_and_values():
    spec = PreprocessSpec(2, 2, voi="range", value_range=(0, 1))
    with pytest.raises(PreprocessError, match="2\\*\\*31"):
        preprocess(np.full((4, 4), 2**31, np.uint32), spec)
    with pytest.raises(PreprocessError, match="integer or float|not supported"):
        preprocess(np.zeros((4, 4), np.complex64), spec)
    with pytest.raises(PreprocessError, match="cannot preprocess"):
        preprocess([object()], spec)
    with pytest.raises(PreprocessError, match="device"):
        preprocess(np.zeros((4, 4), np.uint8), spec, device="tpu")


def test_native_validation_rejects_bad_parameters():
    """The native entry points check sizes, pointers and parameters themselves (no Python in between)."""
    from medge import _C

    out = _C.OutputParams()
    out.height, out.width = 4, 4

    def params(**changes):
        p = _C.ImageParams()
        p.pixels_address = 4096
        p.height, p.width, p.row_stride = 8, 8, 8
        p.pixel_type = _C.PixelType.uint16
        p.buffer_bytes = 128
        for key, value in changes.items():
            setattr(p, key, value)
        return p

    _C.validate_params([params()], out)  # the baseline is valid
    cases = {
        "pointer is null": dict(pixels_address=0),
        "needs 128": dict(buffer_bytes=127),
        "row stride": dict(row_stride=7),
        "size": dict(height=0),
        "bits stored": dict(bits_stored=17),
        "slope": dict(rescale_slope=0.0),
        "window width": dict(window_width=-1.0),
        "window centre": dict(window_center=float("inf")),
        ">= 1 for VOI LUT Function LINEAR": dict(window_width=0.5),
        "high > low": dict(voi_mode=_C.VoiMode.range, range_low=1.0, range_high=1.0),
    }
    for message, change in cases.items():
        with pytest.raises(PreprocessError, match=message):
            _C.validate_params([params(**change)], out)
    bad_out = _C.OutputParams()
    bad_out.height, bad_out.width, bad_out.channels = 4, 4, 2
    with pytest.raises(PreprocessError, match="channels"):
        _C.validate_params([params()], bad_out)
    huge = _C.OutputParams()
    huge.height, huge.width = 1 << 20, 4
    with pytest.raises(PreprocessError, match="output size"):
        _C.validate_params([params()], huge)


def test_cuda_entry_point_validates_before_touching_memory():
    """Even without a GPU, the CUDA entry point refuses bad parameters and undersized outputs."""
    from medge import _C

    out = _C.OutputParams()
    out.height, out.width = 4, 4
    p = _C.ImageParams()
    p.pixels_address, p.height, p.width, p.row_stride, p.buffer_bytes = 4096, 8, 8, 8, 128
    if not _C.cuda_compiled():
        with pytest.raises(medge.errors.CudaError, match="no CUDA support"):
            _C.preprocess_cuda([p], 4096, 64, out, 0)
        return
    with pytest.raises(PreprocessError, match="output buffer holds"):
        _C.preprocess_cuda([p], 4096, 10, out, 0)
    p.buffer_bytes = 1
    with pytest.raises(PreprocessError, match="buffer holds 1 bytes"):
        _C.preprocess_cuda([p], 4096, 64, out, 0)


def test_cuda_unavailable_is_a_clear_error():
    if medge.cuda_available():
        pytest.skip("a CUDA device is present: this tests the message given without one")
    with pytest.raises(medge.errors.MedgeError, match="CUDA|cuda"):
        preprocess(np.zeros((4, 4), np.uint8), PreprocessSpec(2, 2, voi="range", value_range=(0, 1)), device="cuda")


# ---------------------------------------------------------------------------
# Never a silent wrong answer, never anything but a MedgeError (issue 8)

_THREAD_LIMIT_SCRIPT = r"""
import os, re, resource, sys
import numpy as np
from medge import PreprocessSpec, preprocess
from medge.errors import MedgeError

raw = np.arange(256 * 256, dtype=np.uint16).reshape(256, 256)
spec = PreprocessSpec(2048, 64, voi="range", value_range=(0, 65535))  # 64 bands: 64 threads asked for
out = np.empty((1, 1, 2048, 64), np.float32)
preprocess(raw, spec, out=out, num_threads=1)  # everything imported and allocated before the limit
mode = sys.argv[1]
if mode == "nproc":
    if os.getuid() == 0:  # root is exempt from RLIMIT_NPROC: become nobody
        try:
            os.setgid(65534)
            os.setuid(65534)
        except OSError as exc:
            print("SKIP cannot drop root to apply RLIMIT_NPROC:", exc, flush=True)
            sys.exit(0)
    threads = int(re.search(r"Threads:\s+(\d+)", open("/proc/self/status").read()).group(1))
    resource.setrlimit(resource.RLIMIT_NPROC, (threads + 3, resource.getrlimit(resource.RLIMIT_NPROC)[1]))
else:  # address space: room for a few thread stacks only
    vm = int(re.search(r"VmSize:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    preprocess(raw, spec, out=out, num_threads=64)
    outcome = "no error"
except BaseException as exc:
    outcome = f"{type(exc).__name__} medge={isinstance(exc, MedgeError)} {exc}"
if mode != "nproc":
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
print("OUTCOME", outcome, flush=True)
"""


@pytest.mark.parametrize("limit", ["nproc", "address_space"])
def test_refused_worker_threads_are_a_preprocess_error_not_an_abort(limit):
    """The OS refusing a worker thread used to escape as std::system_error while other
    std::threads were joinable: std::terminate, the host process aborted. Now the started
    workers are joined and the caller gets a PreprocessError. Run in a subprocess so an abort
    fails this test instead of killing pytest."""
    import os
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("uses Linux resource limits and /proc")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _THREAD_LIMIT_SCRIPT, limit], env=env, capture_output=True,
                            text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, f"the process died (status {result.returncode}): {result.stderr[-2000:]}"
    if result.stdout.startswith("SKIP"):
        pytest.skip(result.stdout.strip())
    line = next((line for line in result.stdout.splitlines() if line.startswith("OUTCOME")), result.stdout)
    assert "PreprocessError medge=True" in line, line
    # The system refused a thread (or, under the address-space limit, a worker's scratch memory).
    assert "could not start worker thread" in line or "not enough memory" in line, line
    if limit == "nproc":
        assert "could not start worker thread" in line and "num_threads" in line, line


def _misaligned(array: np.ndarray, offset: int = 1) -> np.ndarray:
    """A copy of ``array`` whose data starts ``offset`` bytes past an aligned address."""
    buffer = bytearray(array.nbytes + 16)
    start = (-np.frombuffer(buffer, np.uint8).ctypes.data) % 16 + offset
    view = np.frombuffer(buffer, dtype=array.dtype, count=array.size, offset=start).reshape(array.shape)
    view[...] = array
    return view


@pytest.mark.parametrize("dtype", ["uint16", "int16", "int32", "float32"])
def test_misaligned_inputs_give_the_aligned_result(device, dtype):
    """Pixel data at an odd address (np.frombuffer at an offset; float32 Pixel Data at 2 mod 4 in
    a DICOM byte string) is copied to an aligned buffer before the kernels see it."""
    rng = np.random.default_rng(11)
    frames = (rng.standard_normal((2, 37, 53)) * 1000).astype(dtype)
    spec = PreprocessSpec(16, 24, voi="range", value_range=(-1500, 1500), fit="letterbox")
    expected = to_numpy(preprocess(frames, spec, device=device))
    for offset in range(1, np.dtype(dtype).itemsize):
        shifted = _misaligned(frames, offset)
        assert not shifted.flags.aligned
        np.testing.assert_array_equal(to_numpy(preprocess(shifted, spec, device=device)), expected)
        np.testing.assert_array_equal(to_numpy(preprocess(list(shifted), spec, device=device)), expected)
    assert_matches(expected, reference_for(make_image(frames), spec), spec)


def test_native_entry_points_refuse_misaligned_pointers():
    """The kernels load whole elements; a misaligned pointer reaching them is undefined behaviour
    (and a fault on the GPU), so the native layer refuses it for callers that bypass Python."""
    from medge import _C

    out = _C.OutputParams()
    out.height, out.width = 4, 4
    p = _C.ImageParams()
    p.pixels_address, p.height, p.width, p.row_stride, p.buffer_bytes = 4097, 8, 8, 8, 128
    p.pixel_type = _C.PixelType.uint16
    with pytest.raises(PreprocessError, match="not aligned to its 2-byte element size"):
        _C.validate_params([p], out)
    p.pixel_type = _C.PixelType.uint8
    _C.validate_params([p], out)  # bytes are always aligned
    p.pixels_address, p.pixel_type = 4098, _C.PixelType.float32
    with pytest.raises(PreprocessError, match="not aligned to its 4-byte element size"):
        _C.validate_params([p], out)
    if _C.cuda_compiled():  # the CUDA entry point validates before it looks for a device
        with pytest.raises(PreprocessError, match="not aligned to its 4-byte element size"):
            _C.preprocess_cuda([p], 4096, 64, out, 0)
        p.pixels_address = 4096
        with pytest.raises(PreprocessError, match="output pointer is not aligned"):
            _C.preprocess_cuda([p], 4098, 64, out, 0)


def test_misaligned_output_buffers_are_refused():
    raw = np.zeros((8, 8), np.uint16)
    for dtype in ("float32", "float16"):
        spec = PreprocessSpec(4, 4, voi="range", value_range=(0, 1), dtype=dtype)
        shifted = _misaligned(np.zeros((1, 1, 4, 4), dtype))
        assert shifted.flags.writeable and not shifted.flags.aligned
        with pytest.raises(PreprocessError, match="not aligned"):
            preprocess(raw, spec, out=shifted)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(dtype="float16", std=(1e-5,)), "std"),  # (1 - 0) / 1e-5 = 1e5 > 65504
        (dict(dtype="float16", mean=(-70000.0,)), "std \\(with mean\\)"),
        (dict(dtype="float16", fit="letterbox", pad_value=70000.0), "pad_value"),
        (dict(fit="letterbox", pad_value=1e38, std=(0.1,)), "pad_value"),  # 1e39: float32 inf
        (dict(std=(1e-39,)), "std"),  # 1 / std overflows float32
        (dict(std=(1e-300,)), "std"),  # 0 in float32
        (dict(mean=(1e39,)), "mean"),
        (dict(mean=(3.4028e38,), std=(2.0,)), "mean"),  # the product fits; the float32 y - mean does not
        (dict(mean=(3.4e38,), std=(2.0,), fit="letterbox", pad_value=-5e35), "pad_value"),  # pad - mean overflows
        (dict(pad_value=3.4028235677973366e38, std=(2.0,)), "pad_value"),  # inf once the kernels hold it in float
        (dict(channels=3, std=(1.0, 1.0, 1e-6), dtype="float16"), "std"),
        (dict(value_range=(-1e308, 1e308)), "value_range"),  # high - low overflows
        (dict(mean=(10**400,)), "mean"),
        (dict(pad_value=10**400), "pad_value"),
    ],
)
def test_spec_refuses_values_whose_output_would_be_inf(kwargs, field):
    base = dict(height=8, width=8, voi="range", value_range=(0, 255))
    with pytest.raises(SpecError, match=field):
        PreprocessSpec(**{**base, **kwargs})


def test_spec_limits_are_exact_enough_to_keep_useful_specs():
    """At the float16 limit the output is 65504, finite; a hair beyond is refused."""
    raw = np.array([[0, 255], [255, 0]], np.uint8)
    spec = PreprocessSpec(2, 2, voi="range", value_range=(0, 255), std=(1 / 65504,), dtype="float16",
                          resample="bilinear")
    out = preprocess(raw, spec)
    assert np.isfinite(out).all() and float(out.max()) == 65504.0
    with pytest.raises(SpecError, match="std"):
        spec.replace(std=(1 / 65600,))
    wide = PreprocessSpec(2, 2, voi="range", value_range=(0, 255), std=(1e-38,))  # float32: 1e38 is finite
    assert np.isfinite(preprocess(raw, wide)).all()


@settings(max_examples=300, deadline=None)
@given(
    mean=st.floats(allow_nan=True, allow_infinity=True, width=64),
    std=st.floats(allow_nan=True, allow_infinity=True, width=64),
    pad=st.one_of(st.floats(-2.0, 3.0), st.floats(allow_nan=True, allow_infinity=True)),
    dtype=st.sampled_from(["float32", "float16"]),
)
def test_an_accepted_spec_never_writes_inf_or_nan(mean, std, pad, dtype):
    """Either the spec is refused with SpecError, or every output value is finite: display values
    0 and 1 and the letterbox pad all occur in this image."""
    try:
        spec = PreprocessSpec(6, 6, voi="range", value_range=(0, 255), fit="letterbox", pad_value=pad,
                              mean=mean, std=std, dtype=dtype)
    except SpecError:
        return
    raw = np.tile(np.array([0, 255], np.uint8), (2, 3))  # 2 x 6: letterboxed into 2 rows of 6
    with np.errstate(all="ignore"):
        out = preprocess(raw, spec)
    assert np.isfinite(out).all()


_ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.binary(max_size=4), st.lists(st.floats(allow_nan=True), max_size=4),
    st.lists(st.text(max_size=2), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.sampled_from([np.int64(3), np.float32(0.5), np.float16(2), np.array([1, 3]), np.array(2.0), np.float32,
                     np.dtype("float16"), object(), (1, 2, 3), ("1", "2"), 1j]),
)


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from([f.name for f in dataclasses.fields(PreprocessSpec)]), value=_ANY_VALUE,
       voi=st.sampled_from(["range", "window", "dicom"]))
def test_spec_fields_of_any_type_are_accepted_or_a_spec_error(field, value, voi):
    base = dict(height=8, width=8, voi=voi, **dict(range=dict(value_range=(0, 100)), window=dict(window=(40, 400)),
                                                    dicom={})[voi])
    try:
        spec = PreprocessSpec(**{**base, field: value})
    except SpecError:
        return
    assert PreprocessSpec.from_json(spec.to_json()) == spec  # an accepted spec is plain data


_U16 = np.zeros((8, 8), np.uint16)
_SPEC = PreprocessSpec(4, 4, voi="range", value_range=(0, 1))


def _preprocess_into_overlapping_out():
    storage = np.zeros((2, 1, 4, 4), np.float32)
    frame = storage.reshape(-1)[8:24].reshape(4, 4)  # shares half its memory with the first output image
    return preprocess(frame, _SPEC, out=storage[:1])


_BAD_CALLS = {
    "images None": (lambda: preprocess(None, _SPEC), PreprocessError, "cannot preprocess NoneType"),
    "images int": (lambda: preprocess(5, _SPEC), PreprocessError, "cannot preprocess int"),
    "0-d array": (lambda: preprocess(np.array(3, np.uint16), _SPEC), PreprocessError, "2-D"),
    "1-d array": (lambda: preprocess(np.zeros(5, np.uint16), _SPEC), PreprocessError, "2-D"),
    "4-d array": (lambda: preprocess(np.zeros((1, 1, 5, 5), np.uint16), _SPEC), PreprocessError, "2-D"),
    "object array": (lambda: preprocess(np.array([[1, None]], dtype=object), _SPEC), PreprocessError, "dtype"),
    "empty array": (lambda: preprocess(np.zeros((0, 5), np.uint16), _SPEC), PreprocessError, "no pixels"),
    "list of lists": (lambda: preprocess([[1, 2], [3, 4]], _SPEC), PreprocessError, "cannot preprocess list"),
    "float64 beyond float32": (lambda: preprocess(np.full((4, 4), 1e300), _SPEC), PreprocessError, "float32 range"),
    "side beyond 65536": (lambda: preprocess(np.zeros((1, 70000), np.uint8), _SPEC), PreprocessError, "65536"),
    "device cuda:x": (lambda: preprocess(_U16, _SPEC, device="cuda:x"), PreprocessError, "cuda:N"),
    "device None": (lambda: preprocess(_U16, _SPEC, device=None), PreprocessError, "device"),
    "num_threads str": (lambda: preprocess(_U16, _SPEC, num_threads="4"), PreprocessError, "num_threads"),
    "num_threads float": (lambda: preprocess(_U16, _SPEC, num_threads=2.5), PreprocessError, "num_threads"),
    "num_threads negative": (lambda: preprocess(_U16, _SPEC, num_threads=-1), PreprocessError, "num_threads"),
    "num_threads beyond int": (lambda: preprocess(_U16, _SPEC, num_threads=2**40), PreprocessError, "num_threads"),
    "num_threads None": (lambda: preprocess(_U16, _SPEC, num_threads=None), PreprocessError, "num_threads"),
    "out list": (lambda: preprocess(_U16, _SPEC, out=[0.0]), PreprocessError, "numpy array"),
    "out 0-d": (lambda: preprocess(_U16, _SPEC, out=np.array(1.0, np.float32)), PreprocessError, "shape"),
    "out object dtype": (lambda: preprocess(_U16, _SPEC, out=np.empty((1, 1, 4, 4), object)), PreprocessError,
                         "dtype"),
    "out overlaps input": (_preprocess_into_overlapping_out, PreprocessError, "overlaps"),
    "out is the input": (lambda: (lambda a: preprocess(a[0, 0], _SPEC, out=a))(np.zeros((1, 1, 4, 4), np.float32)),
                         PreprocessError, "overlaps"),
    "batch beyond the native limit": (lambda: preprocess(np.zeros((65537, 1, 1), np.uint8), _SPEC),
                                      PreprocessError, "split the batch"),
    "output too big for memory": (lambda: preprocess(np.zeros((4000, 1, 1), np.uint8),
                                                     PreprocessSpec(16384, 16384, channels=3, voi="range",
                                                                    value_range=(0, 1))),
                                  PreprocessError, "not enough memory"),
    "spec window scalar": (lambda: PreprocessSpec(4, 4, voi="window", window=5), SpecError, "window"),
    "spec pad_value text": (lambda: _SPEC.replace(pad_value="0"), SpecError, "pad_value"),
    "spec mean None": (lambda: _SPEC.replace(mean=None), SpecError, "mean"),
    "spec channels array": (lambda: _SPEC.replace(channels=np.array([1, 3])), SpecError, "channels"),
    "spec voi array": (lambda: _SPEC.replace(voi=np.array(["range", "dicom"])), SpecError, "voi"),
    "spec unknown field": (lambda: _SPEC.replace(colour="red"), SpecError, "colour"),
}


@pytest.mark.parametrize("name", list(_BAD_CALLS))
def test_every_bad_argument_is_a_medge_error(name):
    """Table of inputs that used to escape as TypeError / ValueError / OverflowError / MemoryError
    (or were silently accepted); each is now a MedgeError subclass with a clear message."""
    call, error, message = _BAD_CALLS[name]
    with pytest.raises(error, match=message):
        call()


def test_numpy_scalars_and_dtypes_in_a_spec_are_plain_data():
    spec = PreprocessSpec(np.int64(8), np.int32(6), channels=np.int64(3), mean=np.float32(0.5),
                          std=[np.float16(0.25)], dtype=np.float16, window_index=np.int64(0))
    assert (spec.height, spec.width, spec.channels, spec.mean, spec.std, spec.dtype) == (8, 6, 3, (0.5,), (0.25,),
                                                                                         "float16")
    assert type(spec.height) is int and PreprocessSpec.from_json(spec.to_json()) == spec
    assert PreprocessSpec(4, 4, dtype=np.dtype("float32")).dtype == "float32"


def test_broadcast_and_overlapping_row_views_are_copied():
    """Views with a zero or overlapping row stride (np.broadcast_to, as_strided) are copied, not refused."""
    row = np.arange(12, dtype=np.uint16)
    spec = PreprocessSpec(4, 6, voi="range", value_range=(0, 11))
    expected = preprocess(np.tile(row, (5, 1)), spec)
    np.testing.assert_array_equal(preprocess(np.broadcast_to(row, (5, 12)), spec), expected)
    overlapping = np.lib.stride_tricks.as_strided(np.arange(20, dtype=np.uint16), shape=(5, 12), strides=(2, 2))
    np.testing.assert_array_equal(preprocess(overlapping, spec), preprocess(overlapping.copy(), spec))


# ---------------------------------------------------------------------------
# CUDA path around the kernel (issue 12, part 1), with the recording fake of CUDA of
# test_preprocess_cuda_ordering.py: no GPU needed.

from .test_preprocess_cuda_ordering import FakeDeviceImage, fake_cuda  # noqa: E402,F401 - the fixture
from .test_preprocess_cuda_ordering import run as _run_fake_cuda  # noqa: E402


def test_a_kernel_fault_found_by_the_final_sync_is_raised(fake_cuda, monkeypatch):
    """Host images: the synchronise after the launch is where a fault inside the kernel shows. It used to be
    swallowed, so preprocess() returned normally and the sticky error surfaced later inside TensorRT."""
    from medge import _preprocess_cuda
    from medge.runtime import cuda as mc

    rec, native = fake_cuda

    def faulting_sync(handle):
        rec("sync", handle)
        raise medge.errors.CudaError("cudaStreamSynchronize failed with cudaErrorIllegalAddress (700)")

    monkeypatch.setattr(mc, "_synchronize", faulting_sync)

    class CallerStream:
        handle = 0x7777

    for stream in (None, CallerStream()):  # medge's own stream, and the caller's
        with pytest.raises(medge.errors.CudaError, match="preprocessing kernel failed.*cudaErrorIllegalAddress"):
            _run_fake_cuda(native, [np.zeros((8, 8), np.uint16)], stream=stream)
    # A buffer whose stream failed is never lent again.
    assert not _preprocess_cuda._STAGING._free.get(0)


def test_a_failed_launch_stays_the_reported_error_when_the_sync_fails_too(fake_cuda, monkeypatch):
    from medge.runtime import cuda as mc

    rec, native = fake_cuda
    native.fail = True
    monkeypatch.setattr(mc, "_synchronize", lambda handle: (_ for _ in ()).throw(medge.errors.CudaError("sticky")))
    with pytest.raises(medge.errors.CudaError, match="launch failed"):
        _run_fake_cuda(native, [np.zeros((8, 8), np.uint16)])


def test_staging_memory_is_allocated_once_and_reused(fake_cuda):
    """No cudaMalloc / cudaFree per call: cudaFree synchronises the device, which invalidates a CUDA graph that
    another thread is capturing at that moment (TensorRT's, on the same GPU)."""
    rec, native = fake_cuda
    for _ in range(5):
        _run_fake_cuda(native, [np.zeros((8, 8), np.uint16), np.zeros((16, 4), np.int16)])
    names = rec.names()
    assert names.count("staging_alloc") == 1 and "staging_free" not in names
    assert names.count("h2d") == 10 and names.count("launch") == 5


def test_staging_memory_grows_geometrically_and_keeps_the_larger_buffer(fake_cuda):
    from medge import _preprocess_cuda

    rec, native = fake_cuda
    small = [np.zeros((8, 8), np.uint16)]
    large = [np.zeros((1024, 1024), np.uint16)] * 3  # 6 MiB: beyond the first 1 MiB buffer
    for batch in (small, large, small, large, large):
        _run_fake_cuda(native, batch)
    allocs = [e for e in rec.events if e[0] == "staging_alloc"]
    frees = [e for e in rec.events if e[0] == "staging_free"]
    assert [a[1] for a in allocs] == [_preprocess_cuda._STAGING_MIN_BYTES, 6 << 20]
    assert [f[1] for f in frees] == [_preprocess_cuda._STAGING_MIN_BYTES]  # replaced once, when outgrown


def test_concurrent_calls_and_devices_never_share_a_staging_buffer(fake_cuda, monkeypatch):
    """A call lends its buffer until its stream has finished: a call that starts meanwhile (another thread,
    another stream) gets another buffer, and each device has its own."""
    from medge import _preprocess_cuda

    rec, native = fake_cuda
    used = []
    real_launch = type(native).preprocess_cuda
    nested = {"done": False}

    def launch(self, params, out_ptr, out_bytes, out_params, stream):
        used.append(params[0].pixels_address)
        if not nested["done"]:  # a second call arrives while the first one's buffer is in use
            nested["done"] = True
            _run_fake_cuda(self, [np.zeros((8, 8), np.uint16)])
        return real_launch(self, params, out_ptr, out_bytes, out_params, stream)

    monkeypatch.setattr(type(native), "preprocess_cuda", launch)
    _run_fake_cuda(native, [np.zeros((8, 8), np.uint16)])
    assert len(set(used)) == 2
    _run_fake_cuda(native, [np.zeros((8, 8), np.uint16)])  # both buffers idle now: one is reused
    assert set(used[2:]) <= set(used[:2]) and len(used) == 3
    _preprocess_cuda._STAGING.acquire(mc_module(), 1, 10)  # another device: a buffer of its own
    assert [e[2] for e in rec.events if e[0] == "staging_alloc"] == [0, 0, 1]


def mc_module():
    from medge.runtime import cuda as mc

    return mc


def test_staged_rows_are_padded_to_16_bytes_for_vector_loads(fake_cuda, monkeypatch):
    from medge.runtime import cuda as mc

    rec, native = fake_cuda
    seen = {}
    monkeypatch.setattr(native, "preprocess_cuda",
                        lambda params, *a: seen.update(p=[(p.width, p.row_stride, p.buffer_bytes) for p in params]),
                        raising=False)
    copies = []
    monkeypatch.setattr(mc, "host_to_device", lambda dst, src, stream=None, nbytes=None: copies.append(src.copy()))
    odd = np.arange(5 * 7, dtype=np.uint16).reshape(5, 7)
    _run_fake_cuda(native, [odd, np.zeros((3, 8), np.int16), np.zeros((2, 3), np.float32)])
    assert seen["p"] == [(7, 8, 5 * 8 * 2), (8, 8, 3 * 8 * 2), (3, 4, 2 * 4 * 4)]
    np.testing.assert_array_equal(copies[0][:, :7], odd)
