"""3-D segmentation end to end, medge vs the MONAI chain a user writes today, side by side in one run (issue 9 item 6).

From DICOM files on disk to a DICOM Segmentation written, both chains on the
same synthetic CT series (``medge.synthetic.write_ct_volume_series``: air, a
body cylinder, a sphere "organ"; 128 slices of 512 x 512 by default, 0.7 mm
in-plane, 2.5 mm slices), the same MONAI 3-D UNet, a MONAI-spleen-like recipe
(spacing 1.5 x 1.5 x 2.0 mm, -57..164 HU -> 0..1 clipped, ROI 96^3, Gaussian
sliding window, 4 windows per batch):

MONAI chain (what a user writes today; dictionary transforms, as MONAI's
spleen bundle):
  read         LoadImaged(reader="PydicomReader") on the series folder
  preprocess   EnsureChannelFirstd, Spacingd(bilinear), ScaleIntensityRanged(clip)
               (no Orientationd: the network was trained in the series' own axis
               order, so no reorientation is needed; it also needs nibabel)
  inference    monai.inferers.sliding_window_inference, PyTorch eager,
               torch.inference_mode, threads = this machine's cores
  postprocess  argmax, Invertd(nearest_interp=True) back onto the series' grid,
               axes to the series' (slices, rows, columns) slice order
               (``--monai-post softmax-linear``: softmax, Invertd with bilinear
               probabilities, argmax, as MONAI's spleen bundle and as medge's
               model.segment; its mask is always computed once, untimed, for
               the Dice)
  seg_write    the source headers read with pydicom (stop_before_pixels) and
               sorted along the slice normal, highdicom.seg.Segmentation (BINARY,
               the same segment and algorithm descriptions medge writes), dcmwrite

medge chain:
  read         medge.read_series(folder)
  preprocess / inference / postprocess
               model.segment(volume) (its own stage timings), or, while the
               segmentation task is not in this checkout, the same steps from
               medge's pieces: preprocess_volume, sliding_window over an ONNX
               Runtime session on the exported FP32 graph, argmax,
               to_original_grid (``--medge-api pieces``)
  seg_write    model.write_segmentation / medge.seg_out.write_segmentation
               (a thin wrapper around highdicom.seg.Segmentation)

MONAI networks take (x, y, z) = (columns, rows, slices) arrays (LoadImage's
order); medge's Volume is (slices, rows, columns). The bundle is therefore made
from the network wrapped in two transposes (``MonaiAxes``), so both chains run
the same weights on the same voxels (checked by Dice on random weights in
tests/test_bench_volume.py).

The network: a MONAI UNet (channels 16..256, strides 2, 2 residual units, as
the spleen bundle, batch norm) trained here for ``--train-steps`` on CPU on synthetic
volumes at the recipe's spacing (sphere vs not), cached under
``~/.cache/medge/bench/volume`` (generated, never downloaded), so masks have
margins and mean something. ``--random-weights`` skips training.

medge runs (``--medge-runs``, default ``fp32,fp32@openvino,auto``): FP32 on the
backend medge.load picks for it, FP32 on OpenVINO, and what ``auto`` picks
(the fastest precision whose Dice gates passed at conversion). The bundle has
FP32 and INT8 graphs (INT8 calibrated on every sliding window of a second
series, which is also the validation series of its accuracy report). FP16 is
not converted by default; ``--precisions fp32,fp16,int8 --medge-runs
fp16@openvino,...`` adds it.

Rounds are interleaved (MONAI, medge FP32, medge auto, MONAI, ...) so machine
load affects every chain alike; the table gives medians. Dice per class is each
medge chain's mask against the MONAI chain's FP32 mask, on the series grid.

Usage:
  python tools/bench_volume.py                       # full size, 3 rounds
  python tools/bench_volume.py --slices 32 --size 128 --rounds 2 --train-steps 20   # smoke
  python tools/bench_volume.py --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/_machine.py, also when imported by the tests
from _machine import machine_name  # noqa: E402

#: Stages of both chains, in order; "total" is their sum as measured around the whole chain.
STAGES = ("read", "preprocess", "inference", "postprocess", "seg_write", "total")
#: Part of a stage, shown under the table: the network's own calls within "inference" (the rest of inference is
#: the sliding window's bookkeeping: gathering windows, blending with the importance map).
DETAILS = ("network",)
LABELS = ["background", "sphere"]
DEFAULT_CACHE = Path.home() / ".cache" / "medge" / "bench" / "volume"


@dataclass(frozen=True)
class Recipe:
    """The MONAI-spleen-like preprocessing and sliding window both chains use."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)  # (row, column, slice) mm; MONAI pixdim is (x, y, z)
    value_range: tuple[float, float] = (-57.0, 164.0)  # HU -> 0..1, clipped
    roi: tuple[int, int, int] = (96, 96, 96)  # (slices, rows, columns), medge's order
    overlap: float = 0.25
    mode: str = "gaussian"
    sw_batch: int = 4

    @property
    def pixdim_xyz(self) -> tuple[float, float, float]:
        row, column, slice_ = self.spacing
        return (column, row, slice_)

    @property
    def roi_xyz(self) -> tuple[int, int, int]:
        """The ROI in MONAI's (x, y, z) = (columns, rows, slices) order."""
        return tuple(reversed(self.roi))


@dataclass(frozen=True)
class Net:
    """The MONAI UNet's shape (spleen bundle's by default)."""

    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 2
    classes: int = 2
    norm: str = "batch"  # the spleen bundle's; batch statistics are constants at inference (folded in the graph)


# --------------------------------------------------------------------------- data and model


def series_folder(cache: Path, *, slices: int, size: int, seed: int, pixel_spacing: float = 0.7,
                  slice_spacing: float = 2.5, sphere: Optional[tuple[Sequence[float], float]] = None) -> Path:
    """A synthetic CT series written once into ``cache`` (reused while complete), shuffled file order.

    ``sphere``: (centre mm, radius mm); default: off the grid's centre (so a flipped axis would show in the
    Dice), radius a quarter of the smallest extent.
    """
    from medge.synthetic import write_ct_volume_series

    origin = (-size * pixel_spacing / 2, -size * pixel_spacing / 2, 0.0)
    extent = (size * pixel_spacing, size * pixel_spacing, slices * slice_spacing)
    if sphere is None:
        radius = 0.25 * min(extent)
        centre = (origin[0] + 0.45 * extent[0], origin[1] + 0.55 * extent[1], 0.4 * extent[2])
    else:
        centre, radius = tuple(sphere[0]), float(sphere[1])
    key = hashlib.sha256(json.dumps([slices, size, seed, pixel_spacing, slice_spacing, list(centre), radius])
                         .encode()).hexdigest()[:12]
    folder = cache / f"ct_{slices}x{size}x{size}_seed{seed}_{key}"
    truth_path = truth_file(folder)  # written last: the folder is complete when it exists (beside it: readers of
    if truth_path.exists():          # the folder see DICOM files only)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    _, truth = write_ct_volume_series(folder, slices=slices, rows=size, columns=size,
                                      pixel_spacing=(pixel_spacing, pixel_spacing), slice_spacing=slice_spacing,
                                      origin=origin, sphere_center_mm=centre, sphere_radius_mm=radius, seed=seed,
                                      shuffle=True)
    np.savez_compressed(truth_path, mask=np.packbits(truth.mask), shape=np.array(truth.mask.shape))
    return folder


def truth_file(folder: Path) -> Path:
    return folder.with_name(folder.name + ".truth.npz")


def truth_mask(folder: Path) -> np.ndarray:
    """The sphere's voxels on the series grid (slices ascending along the normal), as written."""
    with np.load(truth_file(folder)) as data:
        shape = tuple(int(v) for v in data["shape"])
        return np.unpackbits(data["mask"], count=int(np.prod(shape))).reshape(shape).astype(bool)


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".dcm")


def make_unet(net: Net = Net(), seed: int = 0):
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=1, out_channels=net.classes, channels=net.channels, strides=net.strides,
                num_res_units=net.num_res_units, norm=net.norm).eval()


def _training_volume(seed: int, recipe: Recipe, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic volume directly at the recipe's spacing: (x, y, z) scaled intensities and sphere labels."""
    from medge.synthetic import ct_volume_series

    slices, size = 80, 112
    extent = np.array([size * recipe.spacing[1], size * recipe.spacing[0], slices * recipe.spacing[2]])
    origin = np.array([-extent[0] / 2, -extent[1] / 2, 0.0])
    radius = float(rng.uniform(0.12, 0.3) * extent.min())
    centre = origin + extent * rng.uniform(0.3, 0.7, size=3)
    _, truth = ct_volume_series(seed=seed, slices=slices, rows=size, columns=size,
                                pixel_spacing=(recipe.spacing[0], recipe.spacing[1]), slice_spacing=recipe.spacing[2],
                                origin=tuple(origin), sphere_center_mm=tuple(centre), sphere_radius_mm=radius)
    low, high = recipe.value_range
    image = np.clip((truth.hu - low) / (high - low), 0.0, 1.0).astype(np.float32)
    return image.transpose(2, 1, 0).copy(), truth.mask.transpose(2, 1, 0).astype(np.int64)


def trained_unet(cache: Path, net: Net, recipe: Recipe, steps: int, log: Callable[[str], None] = print):
    """The UNet trained for ``steps`` Adam steps on CPU on synthetic sphere volumes (cached state_dict), and a note.

    Crops of 32^3 voxels, two per step: small enough that a few minutes of a loaded 2-core machine give masks
    with margins on these volumes (sphere 120 HU in a 40 HU body in air), which is all this benchmark needs.
    """
    import torch

    key = hashlib.sha256(json.dumps([asdict(net), asdict(recipe), steps, torch.__version__]).encode()).hexdigest()[:12]
    path = cache / f"unet_{key}.pt"
    model = make_unet(net)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        about = path.with_suffix(".json")
        note = json.loads(about.read_text())["note"] if about.exists() else (
            f"UNet trained here for {steps} steps on synthetic spheres")
        return model.eval(), f"{note} (cached {path.name})"
    rng = np.random.default_rng(0)
    volumes = [_training_volume(100 + i, recipe, rng) for i in range(8)]
    crop = 32
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
    model.train()
    start, loss_value = time.perf_counter(), float("nan")
    for _ in range(steps):
        images, labels = [], []
        for _ in range(2):
            image, label = volumes[int(rng.integers(len(volumes)))]
            corner = [int(rng.integers(0, n - crop + 1)) for n in image.shape]
            window = tuple(slice(c, c + crop) for c in corner)
            images.append(image[window][None])
            labels.append(label[window])
        x, y = torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))
        logits = model(x)
        probs = torch.softmax(logits, 1)[:, 1]
        soft_dice = 1 - (2 * (probs * y).sum() + 1) / (probs.sum() + y.sum() + 1)
        loss = torch.nn.functional.cross_entropy(logits, y) + soft_dice
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        loss_value = float(loss.detach())
    model.eval()
    cache.mkdir(parents=True, exist_ok=True)
    note = (f"UNet trained here for {steps} steps on synthetic spheres ({time.perf_counter() - start:.0f} s, "
            f"final loss {loss_value:.3f})")
    path.with_suffix(".json").write_text(json.dumps({"note": note}))
    torch.save(model.state_dict(), path)  # last: its presence says the training finished
    log(note)
    return model, note


def monai_axes(module):
    """The network fed (N, C, slices, rows, columns) as MONAI feeds it (N, C, x, y, z): two transposes around it."""
    import torch

    class MonaiAxes(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)

    return MonaiAxes(module).eval()


def weights_key(module) -> str:
    """SHA-256 of a module's state_dict (names and values): cache keys of what is derived from the weights."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def export_onnx(module, path: Path, roi: Sequence[int]) -> Path:
    """FP32 ONNX of ``monai_axes(module)`` with a dynamic batch (the TorchScript exporter: fast and enough here)."""
    import torch

    wrapped = monai_axes(module)
    example = torch.zeros((1, 1, *roi), dtype=torch.float32)  # (slices, rows, columns): medge's order
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(wrapped, (example,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    return path


# --------------------------------------------------------------------------- Dice


def dice_per_class(mask: np.ndarray, reference: np.ndarray, classes: int) -> list[float]:
    """Dice of each foreground class 1..classes-1 of ``mask`` against ``reference`` (1.0 where both are empty)."""
    mask, reference = np.asarray(mask), np.asarray(reference)
    if mask.shape != reference.shape:
        raise ValueError(f"masks differ in shape: {mask.shape} vs {reference.shape}")
    result = []
    for value in range(1, classes):
        a, b = mask == value, reference == value
        total = int(a.sum()) + int(b.sum())
        result.append(1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total)
    return result


# --------------------------------------------------------------------------- the chains


class MonaiChain:
    """The MONAI chain: LoadImaged -> transforms -> sliding_window_inference (eager) -> argmax, Invertd -> highdicom."""

    #: How the MONAI chain goes back onto the series' grid: "argmax-nearest" (argmax on the network's grid,
    #: Invertd with nearest_interp=True: the cheapest) or "softmax-linear" (MONAI's spleen bundle inference.json:
    #: softmax, Invertd with bilinear interpolation of the probabilities, then argmax: what medge's
    #: model.segment computes).
    POSTPROCESSING = ("argmax-nearest", "softmax-linear")

    def __init__(self, module, recipe: Recipe, threads: int, post: str = "argmax-nearest") -> None:
        import torch
        from monai.transforms import (Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityRanged, Spacingd)

        if post not in self.POSTPROCESSING:
            raise ValueError(f"post must be one of {self.POSTPROCESSING}, got {post!r}")
        torch.set_num_threads(threads)
        self.post = post
        self.name = f"MONAI ({post})"
        self.torch = torch
        self.module = module.eval()
        self.recipe = recipe
        self.load = LoadImaged(keys="image", reader="PydicomReader", image_only=True)
        low, high = recipe.value_range
        self.pre = Compose([
            EnsureChannelFirstd(keys="image"),
            Spacingd(keys="image", pixdim=recipe.pixdim_xyz, mode="bilinear"),
            ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        ])

    def run(self, folder: Path, out_dir: Path) -> tuple[np.ndarray, dict]:
        from monai.inferers import sliding_window_inference
        from monai.transforms import Invertd

        torch, recipe, t = self.torch, self.recipe, {}
        start = time.perf_counter()
        data = self.load({"image": str(folder)})
        t["read"] = time.perf_counter() - start

        mark = time.perf_counter()
        data = self.pre(data)
        t["preprocess"] = time.perf_counter() - mark

        network_s = [0.0]

        def predictor(windows):
            tick = time.perf_counter()
            out = self.module(windows)
            network_s[0] += time.perf_counter() - tick
            return out

        mark = time.perf_counter()
        with torch.inference_mode():
            logits = sliding_window_inference(data["image"][None], recipe.roi_xyz, sw_batch_size=recipe.sw_batch,
                                              predictor=predictor, overlap=recipe.overlap, mode=recipe.mode)
        t["inference"] = time.perf_counter() - mark
        t["network"] = network_s[0]

        mark = time.perf_counter()
        with torch.inference_mode():
            if self.post == "argmax-nearest":
                data["pred"] = torch.argmax(logits[0], dim=0, keepdim=True).to(torch.uint8)
            else:
                data["pred"] = torch.softmax(logits[0], dim=0)
        nearest = self.post == "argmax-nearest"
        data = Invertd(keys="pred", transform=self.pre, orig_keys="image", nearest_interp=nearest)(data)
        with torch.inference_mode():
            labels = data["pred"][0] if nearest else torch.argmax(data["pred"], dim=0)
        # (x, y, z) -> (slices, rows, columns); PydicomReader stacks slices ascending along the normal.
        mask = np.ascontiguousarray(np.asarray(labels).transpose(2, 1, 0)).astype(np.uint8)
        t["postprocess"] = time.perf_counter() - mark

        mark = time.perf_counter()
        write_seg_highdicom(folder, mask, out_dir)
        t["seg_write"] = time.perf_counter() - mark
        t["total"] = time.perf_counter() - start
        return mask, t


def write_seg_highdicom(folder: Path, mask: np.ndarray, out_dir: Path) -> Path:
    """What a MONAI user writes for DICOM SEG: headers read again with pydicom, highdicom.seg.Segmentation, dcmwrite.

    Same Segmentation content as medge.seg_out (BINARY, one segment per label, the same algorithm identification),
    so highdicom does the same work in both chains.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.coding import Code

    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in dicom_files(folder)]
    orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    headers.sort(key=lambda ds: float(np.asarray(ds.ImagePositionPatient, dtype=np.float64) @ normal))
    algorithm = hd.AlgorithmIdentificationSequence(
        name="bench-unet", family=Code("123110", "DCM", "Artificial Intelligence"), version="1", source="monai")
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=Code("85756007", "SCT", "Tissue"),
            segmented_property_type=Code("85756007", "SCT", "Tissue"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        for number, name in enumerate(LABELS[1:], start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=headers, pixel_array=mask, segmentation_type="BINARY", segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=9903, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="bench", manufacturer_model_name="bench-unet", software_versions="monai", device_serial_number="1")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "SEG_monai.dcm"
    seg.save_as(path)
    return path


class MedgePiecesChain:
    """medge from its pieces (before model.segment exists): read_series -> preprocess_volume -> sliding_window
    (ONNX Runtime session on the FP32 graph) -> argmax -> to_original_grid -> seg_out.write_segmentation."""

    def __init__(self, onnx_path: Path, recipe: Recipe, threads: int, classes: int) -> None:
        import onnxruntime as ort

        from medge.volume import VolumeSpec

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.recipe = recipe
        self.classes = classes
        self.name = "medge pieces FP32 (ONNX Runtime)"
        self.precision = "fp32"
        self.spec = VolumeSpec(voi="range", value_range=recipe.value_range, target_spacing=recipe.spacing,
                               roi_size=recipe.roi, roi_fit="pad")
        self.sha = hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()

    def run(self, folder: Path, out_dir: Path) -> tuple[np.ndarray, dict]:
        import medge
        from medge.seg_out import write_segmentation
        from medge.sliding_window import sliding_window
        from medge.volume import preprocess_volume, to_original_grid

        recipe, t = self.recipe, {}
        start = time.perf_counter()
        volume = medge.read_series(folder)
        t["read"] = time.perf_counter() - start

        mark = time.perf_counter()
        x = preprocess_volume(volume, spec=self.spec)
        t["preprocess"] = time.perf_counter() - mark

        mark = time.perf_counter()
        network_s = [0.0]

        def run_batch(windows):
            tick = time.perf_counter()
            out = self.session.run(None, {"input": windows})[0]
            network_s[0] += time.perf_counter() - tick
            return out

        probs = sliding_window(run_batch, x[0], recipe.roi, overlap=recipe.overlap, mode=recipe.mode,
                               batch_size=recipe.sw_batch)
        t["inference"] = time.perf_counter() - mark
        t["network"] = network_s[0]

        mark = time.perf_counter()
        labels = np.argmax(probs, axis=0).astype(np.uint8)
        mask = to_original_grid(labels, self.spec, volume.shape, volume.spacing, mode="nearest")
        t["postprocess"] = time.perf_counter() - mark

        mark = time.perf_counter()
        write_segmentation(volume, mask, labels=LABELS, bundle_name="bench-unet", bundle_version="1",
                           manifest_sha256=self.sha, out_dir=out_dir)
        t["seg_write"] = time.perf_counter() - mark
        t["total"] = time.perf_counter() - start
        return mask, t


#: model.segment()'s timings_ms keys (ms) -> this table's stages. Its "read" (the envelope check of the Volume
#: passed in) counts as preprocess; "windows" is a count, not a time.
SEGMENT_STAGE_NAMES = {"read": "preprocess", "preprocess": "preprocess", "infer": "inference",
                       "sliding_window": "inference", "postprocess": "postprocess"}


class MedgeModelChain:
    """medge's own API: read_series -> model.segment -> model.write_segmentation."""

    def __init__(self, bundle: Path, precision: Optional[str], backend: str = "auto") -> None:
        import medge

        self.model = medge.load(bundle, backend=backend, precision=precision)
        choice = self.model.backend
        self.precision = str(choice.precision)
        asked = precision or "auto"
        self.name = f"medge {asked}" + (f" -> {choice.precision}" if precision is None else "") + f" ({choice.name})"

    def run(self, folder: Path, out_dir: Path) -> tuple[np.ndarray, dict]:
        import medge

        t = {stage: 0.0 for stage in STAGES}
        start = time.perf_counter()
        volume = medge.read_series(folder)
        t["read"] = time.perf_counter() - start
        mark = time.perf_counter()
        seg = self.model.segment(volume)
        segment_s = time.perf_counter() - mark
        for key, ms in seg.timings_ms.items():
            stage = SEGMENT_STAGE_NAMES.get(key)
            if stage is not None:
                t[stage] += float(ms) / 1000.0
        t["network"] = float(seg.timings_ms.get("infer", float("nan"))) / 1000.0
        # What segment() spent outside the stages it times goes to postprocess, so the stages add up.
        t["postprocess"] += max(0.0, segment_s - (t["preprocess"] + t["inference"] + t["postprocess"]))
        mark = time.perf_counter()
        self.model.write_segmentation(volume, seg, out_dir)
        t["seg_write"] = time.perf_counter() - mark
        t["total"] = time.perf_counter() - start
        return np.asarray(seg.label_map), t


def segment_api_available() -> bool:
    """True when this checkout's medge has the segmentation task (Model.segment)."""
    try:
        from medge.runtime.model import Model
    except ImportError:
        return False
    return hasattr(Model, "segment")


# --------------------------------------------------------------------------- rounds and table


@dataclass
class ChainResult:
    name: str
    precision: str
    times: dict = field(default_factory=lambda: {s: [] for s in (*STAGES, *DETAILS)})
    dice: list = field(default_factory=list)
    truth_dice: list = field(default_factory=list)
    other_dice: dict = field(default_factory=dict)  # reference name -> Dice per class (masks not timed)

    def median_ms(self, stage: str) -> float:
        values = self.times[stage]
        return 1000.0 * statistics.median(values) if values else float("nan")


def interleaved(chains: Sequence[Any], folder: Path, rounds: int, out_root: Path, classes: int,
                truth: Optional[np.ndarray] = None, other_references: Optional[dict] = None,
                log: Callable[[str], None] = print) -> list[ChainResult]:
    """``rounds`` rounds of every chain in turn; chain 0 is the reference (its mask: Dice 1 by definition).

    A first unmeasured run of each chain warms caches (file cache, thread pools, lazy imports) for all alike;
    its mask gives the Dice against chain 0's, against each of ``other_references`` (name -> mask, e.g. the
    MONAI chain's other way back onto the grid) and, with ``truth`` (the sphere's voxels), against the truth.
    """
    results = [ChainResult(c.name, getattr(c, "precision", "fp32")) for c in chains]
    reference = None
    for index, chain in enumerate(chains):
        mask, _ = chain.run(folder, out_root / f"warm{index}")
        if index == 0:
            reference = mask
        results[index].dice = dice_per_class(mask, reference, classes)
        for name, other in (other_references or {}).items():
            results[index].other_dice[name] = dice_per_class(mask, other, classes)
        if truth is not None:
            results[index].truth_dice = dice_per_class(mask, truth.astype(np.uint8), 2)
    for r in range(rounds):
        for index, chain in enumerate(chains):
            _, t = chain.run(folder, out_root / f"round{r}_{index}")
            for stage in (*STAGES, *DETAILS):
                results[index].times[stage].append(t.get(stage, float("nan")))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{res.name} {res.times['total'][-1]:.1f} s" for res in results))
    return results


def table(results: Sequence[ChainResult]) -> str:
    """Markdown table: median ms per stage per chain, the MONAI / medge ratio of totals, Dice per class."""
    reference = results[0]
    head = "| stage | " + " | ".join(r.name for r in results) + " |"
    lines = [head, "|" + "---|" * (len(results) + 1)]
    for stage in STAGES:
        cells = [f"{r.median_ms(stage):.0f}" for r in results]
        lines.append(f"| {stage} (ms) | " + " | ".join(cells) + " |")
        if stage == "inference":
            cells = [f"{r.median_ms('network'):.0f}" for r in results]
            lines.append("| - of which the network's calls (ms) | " + " | ".join(cells) + " |")
            cells = [f"{r.median_ms('inference') - r.median_ms('network'):.0f}" for r in results]
            lines.append("| - of which window gather + blend (ms) | " + " | ".join(cells) + " |")
    ratio = ["1.00"] + [f"{reference.median_ms('total') / r.median_ms('total'):.2f}" for r in results[1:]]
    lines.append("| total MONAI / total chain | " + " | ".join(ratio) + " |")
    for k, name in enumerate(LABELS[1:]):
        cells = [f"{r.dice[k]:.4f}" if len(r.dice) > k else "-" for r in results]
        lines.append(f"| Dice '{name}' vs {reference.name} | " + " | ".join(cells) + " |")
    for other in results[0].other_dice:
        for k, name in enumerate(LABELS[1:]):
            cells = [f"{r.other_dice[other][k]:.4f}" for r in results]
            lines.append(f"| Dice '{name}' vs {other} (untimed) | " + " | ".join(cells) + " |")
    if all(r.truth_dice for r in results):
        cells = [f"{r.truth_dice[0]:.4f}" for r in results]
        lines.append("| Dice 'sphere' vs synthetic truth | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for dist in ("medge", "torch", "monai", "onnxruntime", "openvino", "highdicom", "pydicom"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# --------------------------------------------------------------------------- medge bundle


def print_accuracy(bundle: Path) -> None:
    """The bundle's accuracy report (validation series vs FP32), one line per precision, batch and engine."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    report = manifest.get("accuracy") or {}
    print(f"bundle accuracy report ({report.get('images', '?')} validation series, every precision vs FP32's masks):")
    for row in report.get("results", []):
        dice = ", ".join(f"{d:.4f}" for d in row.get("dice") or [])
        print(f"  {row.get('precision'):8s} batch {row.get('batch_size')}  {row.get('executed_by'):16s} "
              f"Dice [{dice}]  max probability error {row.get('max_probability_error')}")
    gates = manifest.get("gates") or {}
    verdicts = {name: v.get("verdict") for name, v in (gates.get("verdicts") or {}).items()}
    if verdicts:
        print(f"  gates {gates.get('limits')}: " + ", ".join(f"{k} {v}" for k, v in verdicts.items()))


def calibration_window_count(folder: Path, spec: Any, recipe: Recipe) -> int:
    """How many sliding windows the calibration series gives (what INT8 calibration sees)."""
    import medge
    from medge.sliding_window import window_starts

    volume = medge.read_series(folder)
    grid = spec.output_shape(volume.shape, volume.spacing)[2:]
    return len(window_starts(grid, recipe.roi, (recipe.overlap,) * 3))


def build_bundle(cache: Path, module, recipe: Recipe, net: Net, calibration: Path, validation: Path,
                 precisions: Sequence[str], log: Callable[[str], None] = print) -> Path:
    """The segmentation bundle of ``monai_axes(module)`` (converted once, cached by weights and recipe)."""
    from medge.convert.pipeline import convert
    from medge.volume import VolumeSpec

    key = hashlib.sha256(json.dumps([weights_key(module), asdict(recipe), list(precisions), str(calibration),
                                     str(validation)]).encode()).hexdigest()[:12]
    bundle = cache / f"unet_{key}.medge"
    if (bundle / "manifest.json").exists():
        return bundle
    spec = VolumeSpec(voi="range", value_range=recipe.value_range, target_spacing=recipe.spacing,
                      roi_size=recipe.roi, roi_fit="pad")
    onnx_path = export_onnx(module, cache / f"unet_{key}.onnx", recipe.roi)
    # medge's 32-image floor is for 2-D images; here every calibration "image" is a whole 3-D window (96^3 voxels
    # per channel), so the calibration series' own window count is the floor: all its windows are used.
    windows = calibration_window_count(calibration, spec, recipe)
    log(f"converting the bundle ({', '.join(precisions)}) into {bundle} ...")
    start = time.perf_counter()
    convert(onnx_path, bundle, task="segmentation", volume_spec=spec, roi=recipe.roi, overlap=recipe.overlap,
            sw_mode=recipe.mode, sw_batch=recipe.sw_batch, calibration=calibration, validation=validation,
            # opt batch 1: INT8 calibration runs in batches of the opt size, and ONNX Runtime's entropy
            # calibrator fails on a last, smaller batch (9 windows in batches of 4); sw_batch sets the windows
            # per call at run time.
            precisions=tuple(precisions), batch=(1, 1, recipe.sw_batch), engine="none",
            class_labels=LABELS, name="bench-unet", overwrite=True, min_calibration_images=min(32, windows), log=log)
    log(f"converted in {time.perf_counter() - start:.0f} s")
    return bundle


# --------------------------------------------------------------------------- main


def quiet_known_warnings() -> None:
    """Silence third-party warnings that say nothing about this benchmark (they would bury its table)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
    warnings.filterwarnings("ignore", message=".*operator 'instance_norm' is set to train=True.*")
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=128, help="slices of the bench series (default 128)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of the bench series (default 512)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per chain, interleaved (default 3)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--mode", choices=("gaussian", "constant"), default="gaussian")
    parser.add_argument("--train-steps", type=int, default=150,
                        help="Adam steps to train the UNet on CPU (cached; default 150, a few minutes)")
    parser.add_argument("--random-weights", action="store_true", help="no training: masks without margins")
    parser.add_argument("--medge-runs", default="fp32,fp32@openvino,auto",
                        help="medge chains to time, PRECISION[@BACKEND] (auto: medge.load's own choice); "
                             "default fp32,fp32@openvino,auto")
    parser.add_argument("--monai-post", choices=MonaiChain.POSTPROCESSING, default="argmax-nearest",
                        help="the MONAI chain's way back onto the series' grid (default argmax-nearest, the cheaper)")
    parser.add_argument("--precisions", default="fp32,int8", help="graphs to convert (default fp32,int8)")
    parser.add_argument("--medge-api", choices=("auto", "segment", "pieces"), default="auto",
                        help="segment: medge.load + model.segment; pieces: medge's building blocks with an ONNX "
                             "Runtime session (FP32); auto: segment when this medge has it")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    quiet_known_warnings()

    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    recipe = Recipe(overlap=args.overlap, mode=args.mode)
    net = Net()
    cache = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine_name()}; load average {' '.join(f'{v:.2f}' for v in load_before)}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))

    folder = series_folder(cache, slices=args.slices, size=args.size, seed=11)
    print(f"series: {args.slices} x {args.size} x {args.size}, 0.7 mm in-plane, 2.5 mm slices ({folder})")
    if args.random_weights:
        module, note = make_unet(net), "random-weight UNet (masks without margins)"
    else:
        module, note = trained_unet(cache, net, recipe, args.train_steps)
    print(f"network: MONAI UNet channels {net.channels}, strides {net.strides}, {net.num_res_units} residual units, "
          f"{net.classes} classes; {note}")
    print(f"recipe: spacing {recipe.spacing} mm (row, column, slice), {recipe.value_range} HU -> 0..1 clipped, "
          f"ROI {recipe.roi}, overlap {recipe.overlap}, {recipe.mode}, {recipe.sw_batch} windows per batch, "
          f"{cores} threads")

    api = args.medge_api
    if api == "auto":
        api = "segment" if segment_api_available() else "pieces"
    chains: list[Any] = [MonaiChain(module, recipe, cores, args.monai_post)]
    if api == "segment":
        calibration = series_folder(cache, slices=max(16, args.slices // 2), size=args.size, seed=12,
                                    sphere=None)
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        bundle = build_bundle(cache, module, recipe, net, calibration, calibration, precisions)
        print_accuracy(bundle)
        for run in (r.strip() for r in args.medge_runs.split(",") if r.strip()):
            precision, _, backend = run.partition("@")
            # "auto": what medge.load chooses (gates passed, fastest first); "fp32": FP32 on auto's backend.
            chains.append(MedgeModelChain(bundle, None if precision == "auto" else precision, backend or "auto"))
    else:
        print("medge: the segmentation task (model.segment) is not in this checkout: the medge chain is built from "
              "its pieces (read_series, preprocess_volume, sliding_window on ONNX Runtime FP32, to_original_grid, "
              "seg_out.write_segmentation)")
        onnx_path = export_onnx(module, cache / f"pieces_{weights_key(module)[:12]}.onnx", recipe.roi)
        chains.append(MedgePiecesChain(onnx_path, recipe, cores, net.classes))

    with tempfile.TemporaryDirectory(prefix="bench_volume_") as tmp:
        # The MONAI chain's other way back onto the grid, once, untimed: Dice against both ways.
        other_post = [p for p in MonaiChain.POSTPROCESSING if p != args.monai_post][0]
        other = MonaiChain(module, recipe, cores, other_post)
        other_mask, _ = other.run(folder, Path(tmp) / "other")
        results = interleaved(chains, folder, args.rounds, Path(tmp), net.classes, truth=truth_mask(folder),
                              other_references={other.name: other_mask})
    load = os.getloadavg()
    text = table(results)
    print()
    print(f"medians of {args.rounds} interleaved rounds; load average after: {' '.join(f'{v:.2f}' for v in load)}")
    print(text)
    if args.json:
        payload = {
            "machine": machine_name(), "load_average_before": load_before, "load_average_after": load,
            "versions": versions(),
            "series": {"slices": args.slices, "size": args.size}, "network": note, "recipe": asdict(recipe),
            "medge_api": api, "rounds": args.rounds,
            "chains": [{"name": r.name, "precision": r.precision, "dice": r.dice, "dice_vs_truth": r.truth_dice,
                        "dice_vs_other_references": r.other_dice,
                        "median_ms": {s: r.median_ms(s) for s in (*STAGES, *DETAILS)}, "seconds": r.times} for r in results],
            "table": text,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
