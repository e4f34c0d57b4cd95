"""medge.sliding_window against MONAI's sliding_window_inference on the same network.

MONAI (pure Python, on torch) is an optional test dependency: the comparisons
skip with the reason when it is not installed. The numpy-only checks run
everywhere.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medge.errors import PreprocessError
from medge.sliding_window import importance_map, sliding_window, window_starts



def _monai():
    """MONAI (and torch, which runs the networks the windows go through), or a skip that says why."""
    pytest.importorskip("torch", reason="torch is not installed: the MONAI comparisons run networks in PyTorch")
    return pytest.importorskip("monai", reason="MONAI is not installed (pip install monai, after torch==2.13.0)")


def _unet(spatial_dims: int, in_channels: int, out_channels: int, seed: int):
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    net = UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, channels=(4, 8, 16),
               strides=(2, 2), num_res_units=1)
    return net.eval()


def _numpy_runner(net, calls=None):
    import torch

    def run(windows: np.ndarray) -> np.ndarray:
        if calls is not None:
            calls.append(windows.shape)
        with torch.no_grad():
            return net(torch.from_numpy(windows)).numpy()
    return run


def _monai_result(net, volume, roi, **kwargs):
    import torch
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        return sliding_window_inference(torch.from_numpy(volume[None]), roi, predictor=net, **kwargs)[0].numpy()


# (spatial dims, volume shape (C, *spatial), roi, mode, overlap, batch); the ROI is one the UNet (two
# stride-2 levels) accepts. Every blend mode, overlaps with and without remainders, odd and even sizes.
CASES = [
    (3, (1, 30, 41, 37), (16, 24, 32), "gaussian", 0.25, 4),
    (3, (2, 23, 30, 17), (16, 16, 8), "constant", 0.6, 2),
    (3, (1, 20, 20, 20), (8, 12, 16), "gaussian", 0.5, 3),
    (2, (1, 70, 45), (32, 32), "gaussian", 0.5, 1),
    (2, (3, 72, 80), (32, 16), "constant", 0.25, 3),
    (2, (1, 50, 64), (16, 32), "gaussian", 0.75, 8),
]


@pytest.mark.parametrize("dims,shape,roi,mode,overlap,batch", CASES, ids=[f"{c[0]}d-{c[3]}-{c[4]}" for c in CASES])
def test_equals_monai_on_a_unet(dims, shape, roi, mode, overlap, batch):
    _monai()
    net = _unet(dims, shape[0], 3, seed=sum(shape))
    volume = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    ours = sliding_window(_numpy_runner(net), volume, roi, overlap=overlap, mode=mode, batch_size=batch)
    theirs = _monai_result(net, volume, roi, sw_batch_size=batch, overlap=overlap, mode=mode)
    assert ours.shape == theirs.shape == (3, *shape[1:])
    assert ours.dtype == np.float32
    difference = float(np.abs(ours - theirs).max())
    scale = float(np.abs(theirs).max())
    print(f"max |medge - MONAI| = {difference:.3g} (output scale {scale:.3g})")
    assert difference <= 1e-5 * max(scale, 1.0), f"max |medge - MONAI| = {difference:.3g} (output scale {scale:.3g})"


@pytest.mark.parametrize("padding_mode", ["constant", "replicate", "reflect", "circular"])
def test_volume_smaller_than_the_roi_is_padded_as_monai_does(padding_mode):
    _monai()
    net = _unet(3, 1, 2, seed=4)
    volume = np.random.default_rng(4).standard_normal((1, 12, 30, 9)).astype(np.float32)
    roi = (16, 16, 16)
    ours = sliding_window(_numpy_runner(net), volume, roi, overlap=0.25, mode="gaussian", batch_size=2,
                          padding_mode=padding_mode, cval=0.5)
    extra = {"cval": 0.5} if padding_mode == "constant" else {}  # torch refuses a value for the other modes
    theirs = _monai_result(net, volume, roi, sw_batch_size=2, overlap=0.25, mode="gaussian",
                           padding_mode=padding_mode, **extra)
    assert ours.shape == theirs.shape == (2, 12, 30, 9)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("roi", [(16,), (7, 10), (16, 24, 32), (5, 6, 7), (1, 3, 2)])
@pytest.mark.parametrize("sigma_scale", [0.125, 0.3, (0.1, 0.2, 0.05)])
def test_importance_map_is_monais(roi, sigma_scale):
    _monai()
    from monai.data.utils import compute_importance_map

    if isinstance(sigma_scale, tuple):
        sigma_scale = sigma_scale[: len(roi)]
    for mode in ("gaussian", "constant"):
        theirs = compute_importance_map(roi, mode=mode, sigma_scale=sigma_scale, device="cpu").numpy()
        ours = importance_map(roi, mode, sigma_scale)
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)  # float32 exp: numpy and torch differ by ulps


def test_window_placement_is_monais():
    _monai()
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    rng = np.random.default_rng(0)
    for _ in range(300):
        ndim = int(rng.integers(1, 4))
        roi = tuple(int(v) for v in rng.integers(1, 20, ndim))
        image = tuple(int(r + rng.integers(0, 40)) for r in roi)
        overlap = tuple(float(v) for v in rng.choice([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99], ndim))
        interval = _get_scan_interval(image, roi, ndim, overlap)
        theirs = [tuple(s.start for s in window) for window in dense_patch_slices(image, roi, interval)]
        assert window_starts(image, roi, overlap) == theirs


def test_batching_options_do_not_change_the_result():
    volume = np.random.default_rng(1).standard_normal((1, 30, 40, 36)).astype(np.float32)
    roi = (16, 16, 16)
    weights = np.random.default_rng(2).standard_normal((2, 1)).astype(np.float32)

    def run(windows):  # a per-window model: each prediction depends only on its own window
        return np.einsum("oc,nc...->no...", weights, windows) ** 2

    calls: list = []

    def counted(windows):
        calls.append(windows.shape)
        return run(windows)

    reference = sliding_window(run, volume, roi, batch_size=1)
    buffer = np.empty((5, 1, *roi), np.float32)
    fixed = sliding_window(counted, volume, roi, batch_size=5, fixed_batch=True, window_buffer=buffer)
    assert all(shape == (5, 1, *roi) for shape in calls)  # the engine always sees its batch size
    np.testing.assert_allclose(fixed, reference, rtol=0, atol=1e-5)
    calls.clear()
    loose = sliding_window(counted, volume, roi, batch_size=5)
    windows = len(window_starts(volume.shape[1:], roi, (0.25,) * 3))
    assert sum(shape[0] for shape in calls) == windows and calls[-1][0] == (windows % 5 or 5)
    np.testing.assert_array_equal(loose, fixed)


def test_a_constant_model_blends_to_the_constant():
    """Any blend of identical predictions is that prediction: the weights are normalised per voxel."""
    volume = np.zeros((1, 50, 33, 20), np.float32)
    for mode in ("gaussian", "constant"):
        out = sliding_window(lambda w: np.full((w.shape[0], 2, *w.shape[2:]), 3.5, np.float32), volume, (16, 16, 8),
                             overlap=0.5, mode=mode, batch_size=3)
        np.testing.assert_allclose(out, 3.5, rtol=1e-6)


def test_every_voxel_is_covered_and_windows_stay_inside():
    for image, roi, overlap in itertools.product([(7,), (30, 17), (33, 16, 9)], [(4,), (8, 5), (16, 16, 9)],
                                                 [0.0, 0.25, 0.9]):
        if len(image) != len(roi):
            continue
        covered = np.zeros(image, bool)
        for start in window_starts(image, roi, (overlap,) * len(roi)):
            assert all(0 <= s and s + r <= n for s, r, n in zip(start, roi, image))
            covered[tuple(slice(s, s + r) for s, r in zip(start, roi))] = True
        assert covered.all()


@pytest.mark.parametrize("kwargs,message", [
    ({"roi": (0, 4, 4)}, "roi"),
    ({"roi": (4, 4)}, "3 numbers"),
    ({"overlap": 1.0}, "overlap"),
    ({"mode": "linear"}, "mode"),
    ({"batch_size": 0}, "batch_size"),
    ({"padding_mode": "mirror"}, "padding_mode"),
    ({"sigma_scale": 0}, "sigma_scale"),
    ({"window_buffer": np.empty((2, 1, 4, 4, 4), np.float32)}, "window_buffer"),
])
def test_bad_arguments_are_preprocess_errors(kwargs, message):
    args = {"roi": (4, 4, 4), **kwargs}
    roi = args.pop("roi")
    with pytest.raises(PreprocessError, match=message):
        sliding_window(lambda w: w, np.zeros((1, 8, 8, 8), np.float32), roi, **args)


def test_predictions_of_the_wrong_shape_are_refused():
    with pytest.raises(PreprocessError, match="run_batch returned"):
        sliding_window(lambda w: w[:, :, :2], np.zeros((1, 8, 8, 8), np.float32), (4, 4, 4))
    with pytest.raises(PreprocessError, match="run_batch returned"):
        sliding_window(lambda w: w[:1], np.zeros((1, 8, 8, 8), np.float32), (4, 4, 4), batch_size=2)
