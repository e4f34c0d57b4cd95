"""medge.volume: volume preprocessing against the independent float64 reference (tests/volume_reference.py).

Devices: "cpu" (the multi-threaded C++ path), "emulated" (the CUDA kernel's
per-element function and launch tables run on the CPU, so the GPU algorithm is
checked without a GPU) and "cuda" (marked gpu; skipped with the CUDA status
when there is no device).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import medge
from medge.errors import BackendUnavailable, MedgeError, PreprocessError, SpecError
from medge.image import FrameTransform, PixelSemantics
from medge.volume import VolumeSpec, preprocess_volume, resample_labels, to_original_grid

from . import volume_reference as ref

# Error relative to the output range (display units), as for the 2-D path.
TOLERANCE = {"float32": 1e-4, "float16": 1e-3}


def _cuda_skip_reason() -> str:
    from medge import _C

    if not _C.cuda_compiled():
        return "this medge build has no CUDA kernels (nvcc was not found at build time)"
    return f"no CUDA device visible ({_C.cuda_status()})"


@pytest.fixture(params=["cpu", "emulated", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cuda" and not medge.cuda_available():
        pytest.skip(_cuda_skip_reason())
    return request.param


def run(device, pixels, semantics, spacing, spec, **kwargs):
    """preprocess_volume on `device`, as a host array."""
    if device == "emulated":
        return _emulated(pixels, semantics, spacing, spec)
    result = preprocess_volume(pixels, semantics, spacing, spec, device=device, **kwargs)
    return result if isinstance(result, np.ndarray) else result.to_host()


def _emulated(pixels, semantics, spacing, spec):
    """The CUDA kernel's function on the CPU, through the same Python preparation as preprocess_volume."""
    from medge import _C
    from medge import volume as mv

    array = mv._kernel_volume(pixels)
    sem = mv._slice_semantics(semantics, array.shape[0])
    mv._bad_slopes(sem)
    params, out_params = mv._native_params(_C, array, sem, spec, spacing)
    out = np.empty(spec.output_shape(array.shape, spacing), dtype=spec.dtype)
    _C._emulate_volume_cuda(array, sem.slopes, sem.intercepts, params, out, out_params)
    return out


def expected_for(raw, *, bits, signed, slopes, intercepts, invert, spacing, spec):
    if spec.voi == "window":
        voi = ("window", *spec.window, spec.voi_function or "LINEAR")
    else:
        voi = ("range", *spec.value_range)
    return ref.reference_volume(
        raw, bits_stored=bits, signed=signed, slopes=slopes, intercepts=intercepts, voi_mode=voi, invert=invert,
        spacing=spacing, target_spacing=spec.target_spacing, target_size=spec.target_size,
        interpolation=spec.interpolation, roi=spec.roi_size, fit=spec.roi_fit, pad_value=spec.pad_value,
        mean=spec.mean, std=spec.std, neighbours=spec.neighbours)


def assert_matches(out, expected, spec):
    assert out.shape == expected.shape
    assert out.dtype == np.dtype(spec.dtype)
    error = np.abs(out.astype(np.float64) - expected) * abs(spec.std)
    worst = float(error.max()) if error.size else 0.0
    assert worst <= TOLERANCE[spec.dtype], f"max error {worst:.3g} (relative to the output range)"


def semantics_for(depth, bits, signed, slopes, intercepts, invert, dtype):
    """One PixelSemantics with a FrameTransform per slice (as a Volume carries them)."""
    return PixelSemantics(
        rows=1, columns=1, number_of_frames=depth, bits_allocated=np.dtype(dtype).itemsize * 8, bits_stored=bits,
        pixel_representation=int(signed), photometric_interpretation="MONOCHROME1" if invert else "MONOCHROME2",
        frames=tuple(FrameTransform(float(s), float(i)) for s, i in zip(slopes, intercepts)))


# ---------------------------------------------------------------------------
# Random cases against the reference

DTYPES = ["uint8", "uint16", "int16", "int32", "float32"]


@st.composite
def volume_cases(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype.kind == "f":
        raw = (rng.standard_normal(shape) * draw(st.sampled_from([1.0, 1000.0]))).astype(np.float32)
        bits, signed = 32, True
    else:
        info = np.iinfo(dtype)
        bits = draw(st.integers(1, dtype.itemsize * 8))
        signed = draw(st.booleans())
        raw = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)  # junk above Bits Stored
    depth = shape[0]
    if draw(st.booleans()):
        slopes = rng.choice([1.0, 0.5, 2.5, -1.0, 0.001], size=depth)
        intercepts = rng.choice([0.0, -1024.0, 100.25, 3.0e5], size=depth)
    else:
        slopes = np.full(depth, draw(st.sampled_from([1.0, 0.5, -1.0])))
        intercepts = np.full(depth, draw(st.sampled_from([0.0, -1024.0])))
    modality = ref.stored_values(raw, bits, signed) * slopes[:, None, None] + intercepts[:, None, None]
    lo, hi = float(modality.min()), float(modality.max())
    spread = max(hi - lo, 1.0)
    if draw(st.booleans()):
        function = draw(st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID"]))
        width = draw(st.sampled_from([0.05, 0.3, 1.0, 3.0])) * spread
        if function == "LINEAR":
            width = max(width, 1.0)
        voi = {"voi": "window", "window": (lo + draw(st.floats(-0.2, 1.2)) * spread, width),
               "voi_function": function}
    else:
        voi = {"voi": "range", "value_range": (lo + 0.1 * spread, hi - 0.1 * spread + 1.0)}
    spacing = tuple(draw(st.sampled_from([0.5, 0.7, 1.0, 2.5])) for _ in range(3))
    geometry = draw(st.sampled_from(["none", "spacing", "size"]))
    if geometry == "spacing":
        voi["target_spacing"] = tuple(draw(st.sampled_from([0.6, 1.0, 1.5, 3.0])) for _ in range(3))
    elif geometry == "size":
        voi["target_size"] = (draw(st.integers(1, 8)), draw(st.integers(1, 14)), draw(st.integers(1, 14)))
    if draw(st.booleans()):
        voi["roi_size"] = (draw(st.integers(1, 8)), draw(st.integers(1, 14)), draw(st.integers(1, 14)))
        voi["roi_fit"] = draw(st.sampled_from(["crop_or_pad", "pad"]))
    spec = VolumeSpec(
        interpolation=draw(st.sampled_from(["trilinear", "nearest"])),
        pad_value=draw(st.sampled_from([0.0, 1.0, 0.25])),
        mean=draw(st.floats(-0.5, 0.5)),
        std=draw(st.sampled_from([0.1, 0.229, 1.0, -1.0])),
        dtype=draw(st.sampled_from(["float32", "float16"])),
        neighbours=draw(st.sampled_from([0, 0, 1, 2])),
        **voi,
    )
    invert = draw(st.booleans())
    return raw, bits, signed, slopes, intercepts, invert, spacing, spec


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=volume_cases())
def test_random_volumes_match_reference(device, case):
    """Every option (dtype, Bits Stored, per-slice rescale, VOI, polarity, geometry, ROI, 2.5-D) vs the reference."""
    raw, bits, signed, slopes, intercepts, invert, spacing, spec = case
    semantics = semantics_for(raw.shape[0], bits, signed, slopes, intercepts, invert, raw.dtype)
    out = run(device, raw, semantics, spacing, spec)
    expected = expected_for(raw, bits=bits, signed=signed, slopes=slopes, intercepts=intercepts, invert=invert,
                            spacing=spacing, spec=spec)
    assert_matches(out, expected, spec)


@pytest.mark.parametrize("interpolation", ["trilinear", "nearest"])
def test_ct_like_volume(device, interpolation):
    """A CT-like series (int16, intercept -1024, 0.7 x 0.7 x 2.5 mm) to 1.5 mm with a soft-tissue window, cropped."""
    rng = np.random.default_rng(3)
    raw = rng.integers(-1024, 3071, size=(12, 96, 80), dtype=np.int16)
    spec = VolumeSpec(window=(40, 400), target_spacing=(1.5, 1.5, 1.5), interpolation=interpolation,
                      roi_size=(24, 32, 64), mean=0.5, std=0.25)
    spacing = (0.7, 0.7, 2.5)
    slopes, intercepts = np.ones(12), np.full(12, -1024.0)
    out = run(device, raw + 1024, (slopes, intercepts), spacing, spec)
    expected = expected_for(raw + 1024, bits=16, signed=True, slopes=slopes, intercepts=intercepts, invert=False,
                            spacing=spacing, spec=spec)
    assert_matches(out, expected, spec)


# ---------------------------------------------------------------------------
# The reference itself follows PyTorch's and MONAI's rules


@pytest.mark.parametrize("n_in,n_out", [(1, 1), (1, 4), (5, 3), (3, 5), (7, 16), (16, 7), (10, 10), (512, 213)])
def test_reference_resampling_is_pytorchs(n_in, n_out):
    torch = pytest.importorskip("torch", reason="torch checks the reference's resampling rules")
    F = torch.nn.functional
    rng = np.random.default_rng(n_in * 1000 + n_out)
    x = rng.standard_normal((2, 3, n_in))
    size = (2, 3, n_out)
    t = torch.from_numpy(x)[None, None]
    linear = F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()
    nearest = F.interpolate(t, size=size, mode="nearest-exact")[0, 0].numpy()
    mine_linear = np.einsum("ai,bj,ck,ijk->abc", ref.linear_matrix(2, 2), ref.linear_matrix(3, 3),
                            ref.linear_matrix(n_in, n_out), x)
    mine_nearest = x @ ref.nearest_matrix(n_in, n_out).T
    np.testing.assert_allclose(mine_linear, linear, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(mine_nearest, nearest)


def test_reference_crop_pad_is_monais():
    monai = pytest.importorskip("monai", reason="monai checks the reference's crop / pad rule")
    del monai
    from monai.transforms import ResizeWithPadOrCrop

    x = np.arange(5 * 6 * 7, dtype=np.float64).reshape(5, 6, 7)
    for roi in [(3, 3, 3), (8, 9, 10), (5, 2, 12), (4, 6, 6)]:
        theirs = np.asarray(ResizeWithPadOrCrop(roi, mode="constant", value=0.5)(x[None]))[0]
        np.testing.assert_array_equal(ref.crop_or_pad(x, roi, "crop_or_pad", 0.5), theirs)


# ---------------------------------------------------------------------------
# Exactness and determinism


def test_thread_count_does_not_change_results():
    """The CPU path gives the same bits with 1, 2, 3 and 16 threads (fp32, fp16, 2.5-D, crop and pad)."""
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 4096, size=(23, 70, 61), dtype=np.uint16)
    specs = [
        VolumeSpec(voi="range", value_range=(100, 4000), target_size=(37, 45, 90)),
        VolumeSpec(window=(2000, 1500), voi_function="SIGMOID", target_spacing=(0.8, 1.1, 0.9), dtype="float16",
                   roi_size=(30, 40, 100), pad_value=0.5, mean=0.2, std=0.3),
        VolumeSpec(window=(1000, 3000), target_size=(9, 33, 33), neighbours=2, roi_size=(12, 32, 40)),
        VolumeSpec(voi="range", value_range=(0, 4095), interpolation="nearest", target_size=(50, 20, 130)),
    ]
    slopes = rng.uniform(0.5, 2.0, 23)
    intercepts = rng.uniform(-100, 100, 23)
    for spec in specs:
        outs = [preprocess_volume(raw, (slopes, intercepts), (1.0, 1.0, 1.0), spec, num_threads=n)
                for n in (1, 2, 3, 16)]
        for other in outs[1:]:
            assert other.tobytes() == outs[0].tobytes()


_BASELINE_SCRIPT = r"""
import numpy as np
from medge import _C
from medge import volume as mv
rng = np.random.default_rng(11)
raw = rng.integers(-2000, 3000, size=(9, 31, 27), dtype=np.int16)
spec = mv.VolumeSpec(window=(100, 900), voi_function="LINEAR_EXACT", target_size=(14, 20, 40), roi_size=(12, 24, 36),
                     pad_value=0.25, mean=0.1, std=0.7, neighbours=1)
sem = (rng.uniform(0.5, 2, 9), rng.uniform(-50, 50, 9))
cpu = mv.preprocess_volume(raw, sem, None, spec, num_threads=2)
array = mv._kernel_volume(raw)
s = mv._slice_semantics(sem, 9)
params, out_params = mv._native_params(_C, array, s, spec, None)
emulated = np.empty_like(cpu)
_C._emulate_volume_cuda(array, s.slopes, s.intercepts, params, emulated, out_params)
print("same" if cpu.tobytes() == emulated.tobytes() else "different", float(np.abs(cpu - emulated).max()))
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="baseline x86-64 has no FMA; elsewhere (aarch64) the compiler may contract differently")
def test_baseline_cpu_path_equals_the_cuda_kernels_function_bit_for_bit():
    """Without FMA contraction (MEDGE_CPU_BASELINE=1), the CPU path and the CUDA kernel's per-element function
    (emulated) perform the same float operations in the same order: identical bits."""
    env = dict(os.environ, MEDGE_CPU_BASELINE="1")
    result = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "same", result.stdout


def test_nearest_labels_are_exact(device):
    """Nearest resampling of a label map returns exactly the chosen voxels' labels (PyTorch nearest-exact)."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 8, size=(7, 19, 23), dtype=np.uint8)
    spec = VolumeSpec(voi="range", value_range=(0, 7), interpolation="nearest", target_size=(11, 13, 40))
    out = run(device, labels, None, None, spec)[0, 0]
    expected = np.einsum("ai,bj,ck,ijk->abc", ref.nearest_matrix(7, 11), ref.nearest_matrix(19, 13),
                         ref.nearest_matrix(23, 40), labels.astype(np.float64))
    np.testing.assert_array_equal(np.rint(out * 7).astype(np.uint8), expected.astype(np.uint8))
    assert np.abs(out * 7 - expected).max() < 1e-5


def test_resample_labels_is_exact_and_keeps_the_dtype():
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 5, size=(2, 6, 9, 11)).astype(np.int64)  # leading class / batch axis kept
    out = resample_labels(labels, (6, 9, 11), (13, 4, 11))
    assert out.dtype == labels.dtype and out.shape == (2, 13, 4, 11)
    expected = np.einsum("ai,bj,ck,nijk->nabc", ref.nearest_matrix(6, 13), ref.nearest_matrix(9, 4),
                         ref.nearest_matrix(11, 11), labels.astype(np.float64))
    np.testing.assert_array_equal(out, expected.astype(np.int64))
    same = resample_labels(labels[0], labels[0], labels[0].shape)  # geometry from an array
    np.testing.assert_array_equal(same, labels[0])
    assert not np.shares_memory(same, labels)
    torch = pytest.importorskip("torch")
    theirs = torch.nn.functional.interpolate(torch.from_numpy(labels[None].astype(np.float32)), size=(13, 4, 11),
                                             mode="nearest-exact")[0].numpy()
    np.testing.assert_array_equal(out, theirs.astype(np.int64))


def test_two_point_five_d_channels_are_neighbouring_slices(device):
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 1000, size=(6, 20, 24), dtype=np.uint16)
    base = VolumeSpec(voi="range", value_range=(0, 1000), target_size=(9, 16, 16), roi_size=(9, 16, 20),
                      mean=0.3, std=0.2)
    volume = run(device, raw, None, None, base)[0, 0]
    for k in (1, 3):
        stacked = run(device, raw, None, None, base.replace(neighbours=k))
        assert stacked.shape == (9, 2 * k + 1, 16, 20)
        for d in range(9):
            for c in range(2 * k + 1):
                np.testing.assert_array_equal(stacked[d, c], volume[min(8, max(0, d + c - k))])


def test_crop_and_pad_follow_monai():
    """Centre crop starts at size // 2 - roi // 2, padding puts (roi - size) // 2 before; 'pad' never crops."""
    raw = np.arange(6 * 5 * 4, dtype=np.uint8).reshape(6, 5, 4)
    spec = VolumeSpec(voi="range", value_range=(0, 255), roi_size=(3, 8, 4), pad_value=1.0)
    out = preprocess_volume(raw, None, None, spec)[0, 0]
    assert out.shape == (3, 8, 4)
    expected = np.full((3, 8, 4), 1.0)
    expected[:, 1:6, :] = raw[2:5] / 255.0  # 6 // 2 - 3 // 2 = 2; (8 - 5) // 2 = 1 before
    np.testing.assert_allclose(out, expected, atol=1e-6)
    padded = preprocess_volume(raw, None, None, spec.replace(roi_fit="pad"))[0, 0]
    assert padded.shape == (6, 8, 4)
    np.testing.assert_allclose(padded[:, 1:6], raw / 255.0, atol=1e-6)


def test_float16_is_float32_rounded():
    rng = np.random.default_rng(4)
    raw = rng.integers(-1000, 2000, size=(5, 30, 30), dtype=np.int16)
    spec = VolumeSpec(window=(300, 1500), target_size=(8, 21, 37), mean=0.4, std=0.2)
    full = preprocess_volume(raw, None, None, spec)
    half = preprocess_volume(raw, None, None, spec.replace(dtype="float16"))
    np.testing.assert_array_equal(half, full.astype(np.float16))


# ---------------------------------------------------------------------------
# Inputs and semantics


def test_every_semantics_form_gives_the_same_result():
    rng = np.random.default_rng(6)
    raw = rng.integers(-500, 1500, size=(4, 10, 12), dtype=np.int16)
    slopes, intercepts = np.array([1.0, 0.5, 2.0, 1.0]), np.array([-1024.0, 0.0, 10.0, -3.5])
    spec = VolumeSpec(window=(0, 800), target_size=(6, 8, 8))
    per_slice = [PixelSemantics(rows=10, columns=12, bits_allocated=16, bits_stored=16, pixel_representation=1,
                                frames=(FrameTransform(s, i),)) for s, i in zip(slopes, intercepts)]
    transforms = [FrameTransform(s, i) for s, i in zip(slopes, intercepts)]
    one = semantics_for(4, 16, True, slopes, intercepts, False, np.int16)

    class Volume:  # duck-typed medge Volume
        pixels = raw
        semantics = one
        spacing = (1.0, 1.0, 1.0)

    image = medge.Image(raw, PixelSemantics(rows=10, columns=12, number_of_frames=4, bits_allocated=16,
                                            bits_stored=16, pixel_representation=1, frames=tuple(transforms)))
    # (a multi-frame Image is a volume too)
    results = [
        preprocess_volume(raw, (slopes, intercepts), None, spec),
        preprocess_volume(image, spec=spec),
        preprocess_volume(raw, (list(slopes), list(intercepts)), None, spec),
        preprocess_volume(raw, per_slice, None, spec),
        preprocess_volume(raw, transforms, None, spec),
        preprocess_volume(raw, one, None, spec),
        preprocess_volume(Volume(), spec=spec),
        preprocess_volume(Volume(), spec),
    ]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    constant = preprocess_volume(raw, (1.0, -1024.0), None, spec)
    np.testing.assert_array_equal(constant, preprocess_volume(raw, (np.ones(4), np.full(4, -1024.0)), None, spec))


def test_strided_and_big_endian_inputs():
    rng = np.random.default_rng(8)
    base = rng.integers(0, 3000, size=(10, 40, 50), dtype=np.uint16)
    spec = VolumeSpec(voi="range", value_range=(0, 3000), target_size=(4, 9, 11))
    view = base[::2, 5:30, ::-1]
    expected = preprocess_volume(np.ascontiguousarray(view), None, None, spec)
    np.testing.assert_array_equal(preprocess_volume(view, None, None, spec), expected)
    np.testing.assert_array_equal(preprocess_volume(view.astype(">u2"), None, None, spec), expected)


def test_output_is_written_in_place():
    raw = np.zeros((3, 4, 5), np.uint8)
    spec = VolumeSpec(voi="range", value_range=(0, 1), mean=0.5)
    out = np.full(spec.output_shape(raw.shape), 7.0, np.float32)
    assert preprocess_volume(raw, None, None, spec, out=out) is out
    np.testing.assert_array_equal(out, -0.5)
    for bad in (np.empty((1, 1, 3, 4, 6), np.float32), np.empty((1, 1, 3, 4, 5), np.float16),
                np.empty((1, 1, 3, 4, 10), np.float32)[..., ::2]):
        with pytest.raises(PreprocessError):
            preprocess_volume(raw, None, None, spec, out=bad)


# ---------------------------------------------------------------------------
# Back onto the original grid


def test_to_original_grid_inverts_the_geometry():
    spec = VolumeSpec(voi="range", value_range=(0, 1), target_spacing=(2.0, 2.0, 2.0), roi_size=(5, 12, 6))
    original, spacing = (16, 20, 16), (1.0, 1.0, 1.0)  # resampled (8, 10, 8): crop slices and columns, pad rows
    assert spec.resampled_size(original, spacing) == (8, 10, 8)
    assert spec.output_shape(original, spacing) == (1, 1, 5, 12, 6)
    rng = np.random.default_rng(1)
    labels_resampled = rng.integers(1, 4, size=(8, 10, 8)).astype(np.uint8)
    roi = ref.crop_or_pad(labels_resampled.astype(np.float64), spec.roi_size, "crop_or_pad", 0).astype(np.uint8)
    back = to_original_grid(roi, spec, original, spacing)
    assert back.shape == original and back.dtype == np.uint8
    # The crop kept resampled slices 8 // 2 - 5 // 2 = 2 .. 6 and columns 1 .. 6: background elsewhere.
    kept = np.zeros((8, 10, 8), bool)
    kept[2:7, :, 1:7] = True
    np.testing.assert_array_equal(back, resample_labels(np.where(kept, labels_resampled, 0), (8, 10, 8), original))
    probabilities = np.full((3, 5, 12, 6), 0.25, np.float32)
    smooth = to_original_grid(probabilities, spec, original, spacing)
    assert smooth.shape == (3, *original) and smooth.dtype == np.float32
    coverage = to_original_grid(np.ones((5, 12, 6), np.float32), spec, original, spacing)  # 1 where fully seen
    assert coverage.max() == 1.0 and coverage.min() == 0.0
    np.testing.assert_allclose(smooth, np.broadcast_to(0.25 * coverage, smooth.shape), atol=1e-7)  # linear map


def test_to_original_grid_round_trips_an_integer_zoom():
    spec = VolumeSpec(voi="range", value_range=(0, 1), target_size=(8, 12, 20), interpolation="nearest")
    labels = np.random.default_rng(0).integers(0, 6, size=(4, 6, 10)).astype(np.int32)
    up = resample_labels(labels, labels.shape, (8, 12, 20))
    np.testing.assert_array_equal(to_original_grid(up, spec, labels.shape), labels)


# ---------------------------------------------------------------------------
# Spec and errors


def test_spec_json_round_trip():
    spec = VolumeSpec(window=(40, 400), voi_function="SIGMOID", target_spacing=(0.8, 0.8, 1.5), interpolation="nearest",
                      roi_size=(64, 128, 128), roi_fit="pad", pad_value=0.5, mean=0.1, std=0.2, dtype="float16",
                      neighbours=2)
    text = spec.to_json()
    assert json.loads(text)["schema_version"] == 1
    assert VolumeSpec.from_json(text) == spec
    assert hash(VolumeSpec.from_json(text)) == hash(spec)
    numpy_made = VolumeSpec(voi="range", value_range=np.array([0, 1.5]), roi_size=np.array([4, 5, 6]),
                            mean=np.float32(0.25), dtype=np.float16, neighbours=np.int64(1))
    assert VolumeSpec.from_json(numpy_made.to_json()) == numpy_made
    assert isinstance(numpy_made.roi_size[0], int) and numpy_made.dtype == "float16"


@pytest.mark.parametrize("kwargs,message", [
    ({}, "needs window"),
    ({"window": (40, 0)}, "width > 0"),
    ({"window": (40, 0.5)}, ">= 1 for LINEAR"),
    ({"voi": "range"}, "needs value_range"),
    ({"voi": "range", "value_range": (1, 1)}, "high > low"),
    ({"window": (1, 2), "value_range": (0, 1)}, "only used with"),
    ({"window": (1, 2), "target_spacing": (1, 1, 1), "target_size": (2, 2, 2)}, "not both"),
    ({"window": (1, 2), "target_spacing": (1, 0, 1)}, "positive"),
    ({"window": (1, 2), "target_size": (2, 2)}, "3 integers"),
    ({"window": (1, 2), "roi_size": (2, 2, 2.5)}, "3 integers"),
    ({"window": (1, 2), "roi_size": (2, 0, 2)}, "within 1.."),
    ({"window": (1, 2), "interpolation": "cubic"}, "interpolation"),
    ({"window": (1, 2), "roi_fit": "crop"}, "roi_fit"),
    ({"window": (1, 2), "neighbours": 17}, "neighbours"),
    ({"window": (1, 2), "neighbours": True}, "neighbours"),
    ({"window": (1, 2), "std": 0}, "non-zero"),
    ({"window": (1, 2), "std": 1e-9, "dtype": "float16"}, "inf"),
    ({"window": (1, 2), "mean": float("nan")}, "finite"),
    ({"window": (1, 2), "dtype": "int8"}, "dtype"),
])
def test_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(SpecError, match=message):
        VolumeSpec(**kwargs)


def test_spec_json_errors():
    with pytest.raises(SpecError, match="not valid JSON"):
        VolumeSpec.from_json("{")
    with pytest.raises(SpecError, match="unknown"):
        VolumeSpec.from_dict({"window": [1, 2], "colour": 1})
    with pytest.raises(SpecError, match="schema version"):
        VolumeSpec.from_dict({"schema_version": 9, "window": [1, 2]})


@pytest.mark.parametrize("call,message", [
    (lambda s: preprocess_volume(np.zeros((4, 4), np.int16), None, None, s), "3-D"),
    (lambda s: preprocess_volume(np.zeros((2, 4, 4), np.int16), (np.ones(3), np.zeros(3)), None, s),
     "one value per slice"),
    (lambda s: preprocess_volume(np.zeros((2, 4, 4), np.int16), (np.array([1.0, 0.0]), 0.0), None, s),
     "slice 1: Rescale Slope"),
    (lambda s: preprocess_volume(np.zeros((2, 4, 4), np.int16), [FrameTransform()], None, s), "1 slice semantics"),
    (lambda s: preprocess_volume(np.zeros((2, 4, 4), np.int16), semantics_for(3, 16, True, [1] * 3, [0] * 3, False,
                                                                              np.int16), None, s),
     "3 frame transforms but the volume has 2 slices"),
    (lambda s: preprocess_volume(np.full((2, 4, 4), np.nan, np.float32), None, None, s), "NaN"),
    (lambda s: preprocess_volume(np.zeros((2, 4, 4), np.complex64), None, None, s), "not supported"),
    (lambda s: preprocess_volume(np.zeros((2, 4, 4), np.int16), None, None, s.replace(target_spacing=(1, 1, 1))),
     "spacing"),
    (lambda s: preprocess_volume(np.zeros((2, 4, 4), np.int16), None, (1, -1, 1), s.replace(target_spacing=(1, 1, 1))),
     "spacing must be"),
    (lambda s: preprocess_volume(np.zeros((2, 4, 4), np.int16), None, (1, 1, 1),
                                 s.replace(target_spacing=(1e-4, 1, 1))), "beyond"),
    (lambda s: preprocess_volume(np.zeros((2, 4, 4), np.int16), None, None, None), "VolumeSpec"),
    (lambda s: preprocess_volume(np.zeros((2, 4, 4), np.int16), None, None, s, num_threads=-1), "num_threads"),
    (lambda s: preprocess_volume(np.zeros((2, 4, 4), np.int16), None, None, s, device="tpu"), "device"),
    (lambda s: preprocess_volume(np.zeros((2, 4, 4), np.int16), object(), None, s), "slice semantics"),
    (lambda s: to_original_grid(np.zeros((3, 3, 3)), s, (4, 4, 4)), "output grid"),
    (lambda s: resample_labels(np.zeros((3, 3, 3)), (3, 3, 4), (2, 2, 2)), "from_geometry"),
])
def test_bad_arguments_are_preprocess_errors(call, message):
    with pytest.raises(PreprocessError, match=message):
        call(VolumeSpec(window=(1, 2)))


def test_native_validation_names_the_slice():
    """The native layer refuses bad parameters itself (the Python checks bypassed), naming the slice."""
    from medge import _C

    spec = VolumeSpec(window=(1, 2))
    array = np.zeros((3, 4, 4), np.int16)
    from medge import volume as mv

    sem = mv._slice_semantics((np.array([1.0, 1.0, np.inf]), np.zeros(3)), 3)
    params, out_params = mv._native_params(_C, array, sem, spec, None)
    out = np.empty((1, 1, 3, 4, 4), np.float32)
    with pytest.raises(PreprocessError, match="slice 2: rescale slope"):
        _C.preprocess_volume_cpu(array, sem.slopes, sem.intercepts, params, out, out_params)
    out_params.neighbours = 99
    out = np.empty((3, 199, 4, 4), np.float32)
    with pytest.raises(PreprocessError, match="neighbours must be within 0..16"):
        _C.preprocess_volume_cpu(array, np.ones(3), np.zeros(3), params, out, out_params)


def test_cuda_entry_point_without_a_gpu():
    """The CUDA entry point exists in every build; it validates before touching memory (or says CUDA is absent)."""
    from medge import _C

    params = _C.VolumeParams()
    params.pixels_address, params.depth, params.height, params.width = 4096, 2, 4, 4
    params.row_stride, params.slice_stride, params.buffer_bytes = 4, 16, 64
    params.voi_mode = _C.VoiMode.range
    out = _C.VolumeOutputParams()
    out.resampled = out.size = [2, 4, 4]
    tables = _C.volume_cuda_tables(params, np.ones(2), np.zeros(2), out)  # host bytes, no device needed
    assert tables.nbytes >= 2 * 64
    if not _C.cuda_compiled():
        with pytest.raises(medge.errors.CudaError, match="no CUDA support"):
            _C.preprocess_volume_cuda(params, out, 4096, tables.nbytes, 8192, 128, 0)
        return
    with pytest.raises(PreprocessError, match="device tables hold"):
        _C.preprocess_volume_cuda(params, out, 4096, 8, 8192, 128, 0)
    with pytest.raises(PreprocessError, match="output buffer holds"):
        _C.preprocess_volume_cuda(params, out, 4096, tables.nbytes, 8192, 4, 0)


@pytest.mark.gpu
def test_cuda_volume_kernel_runs():
    """On a GPU: the compiled kernel matches the CPU path (the random cases above cover the reference)."""
    if not medge.cuda_available():
        pytest.skip(_cuda_skip_reason())
    rng = np.random.default_rng(12)
    raw = rng.integers(-1024, 3000, size=(40, 128, 96), dtype=np.int16)
    spec = VolumeSpec(window=(40, 400), target_spacing=(1.5, 1.5, 1.5), roi_size=(48, 64, 64), neighbours=1)
    cpu = preprocess_volume(raw, (1.0, -1024.0), (0.7, 0.7, 2.5), spec)
    gpu = preprocess_volume(raw, (1.0, -1024.0), (0.7, 0.7, 2.5), spec, device="cuda").to_host()
    assert np.abs(gpu - cpu).max() <= 1e-5


def test_cuda_unavailable_is_a_clear_error():
    if medge.cuda_available():
        pytest.skip("a CUDA device is present: this tests the message given without one")
    with pytest.raises(BackendUnavailable, match="CUDA|cuda"):
        preprocess_volume(np.zeros((2, 4, 4), np.uint8), None, None, VolumeSpec(window=(1, 2)), device="cuda")


def test_errors_are_medge_errors():
    assert issubclass(SpecError, MedgeError) and issubclass(PreprocessError, MedgeError)
