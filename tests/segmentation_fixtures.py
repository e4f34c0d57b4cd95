"""Session fixtures of the segmentation tests: synthetic CT series and a tiny trained 3-D MONAI UNet bundle.

Random-weight masks have no margins (every voxel is nearly tied), so the
3-D UNet is trained here for a few seconds on ``ct_volume_series``' sphere
truth: its masks then mean something (Dice against the truth is checked),
and Dice against FP32 measures a precision, not noise. Nothing is downloaded.

Imported by test_segmentation.py and test_segmentation_run.py. pytest makes
one fixture definition per module that imports a fixture, so session scope
alone would convert twice; the results are also kept in ``_MADE`` (one
process, one session) so a full run converts the bundle once.
"""

from __future__ import annotations

import numpy as np
import pytest

#: What the session fixtures made, by name (see the module docstring).
_MADE: dict = {}

#: Series geometry shared by calibration, validation and deployment (the envelope records rows x columns).
SERIES = dict(slices=24, rows=48, columns=48)
ROI = (16, 32, 32)
WINDOW = (40.0, 400.0)


def train_unet(seed: int = 0):
    """A MONAI 3-D UNet (4, 8 channels) trained ~35 Adam steps on ROI windows of two synthetic series."""
    torch = pytest.importorskip("torch", reason="torch is not installed (the test extra installs it)")
    nets = pytest.importorskip("monai.networks.nets", reason="monai is not installed (test dependency)")
    from medge.segmentation import model_input
    from medge.series import read_series
    from medge.synthetic import ct_volume_series
    from medge.volume import VolumeSpec

    spec = VolumeSpec(voi="window", window=WINDOW)
    inputs, masks = [], []
    for series_seed in (101, 102):
        datasets, truth = ct_volume_series(seed=series_seed, **SERIES)
        inputs.append(model_input(read_series(datasets), spec))
        masks.append(truth.mask)
    torch.manual_seed(seed)
    net = nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0)
    optimiser = torch.optim.Adam(net.parameters(), lr=0.03)
    rng = np.random.default_rng(seed)
    # The sphere is a few % of the voxels: weigh it up so the net does not settle on "all background".
    weight = torch.tensor([1.0, 4.0])
    for _ in range(35):
        batch_x, batch_y = [], []
        for _ in range(2):
            k = int(rng.integers(len(inputs)))
            d, h, w = (int(rng.integers(0, n - r + 1)) for n, r in zip(masks[k].shape, ROI))
            batch_x.append(inputs[k][:, d:d + ROI[0], h:h + ROI[1], w:w + ROI[2]])
            batch_y.append(masks[k][d:d + ROI[0], h:h + ROI[1], w:w + ROI[2]])
        logits = net(torch.from_numpy(np.stack(batch_x)))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(np.stack(batch_y).astype(np.int64)),
                                                 weight=weight)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net.eval()


@pytest.fixture(scope="session")
def seg_data(tmp_path_factory):
    """Folders: calib (2 series), val (1), deploy (2 good series + 1 gapped), each series in its own folder."""
    from medge.synthetic import write_ct_volume_series

    if "data" in _MADE:
        return _MADE["data"]
    root = tmp_path_factory.mktemp("segdata")
    truths = {}
    for name, seed in (("calib/a", 101), ("calib/b", 102), ("val/a", 103), ("deploy/one", 104),
                       ("deploy/two", 105)):
        _, truths[name] = write_ct_volume_series(root / name, seed=seed, shuffle=True, **SERIES)
    write_ct_volume_series(root / "deploy/gapped", seed=106, missing=[9], **SERIES)
    _MADE["data"] = root, truths
    return root, truths


@pytest.fixture(scope="session")
def seg_bundle(seg_data, tmp_path_factory):
    """The trained 3-D UNet converted (fp32, fp16, int8; --engine none; profile 1:2:2; overlap 0.5)."""
    pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install "medge[convert]"')
    from medge.convert.pipeline import convert
    from medge.volume import VolumeSpec

    if "bundle" in _MADE:
        return _MADE["bundle"]
    root, _ = seg_data
    net = train_unet()
    lines: list = []
    result = convert(net, tmp_path_factory.mktemp("segbundle") / "unet3d.medge", task="segmentation",
                     volume_spec=VolumeSpec(voi="window", window=WINDOW), roi=ROI, overlap=0.5,
                     calibration=root / "calib", validation=root / "val", class_labels=["background", "sphere"],
                     batch=(1, 2, 2), engine="none", min_calibration_images=8, name="unet3d", version="0.1",
                     log=lines.append)
    result.log = lines
    _MADE["bundle"] = result
    return result
