"""tools/bench_volume.py on a tiny series: both chains compute the same masks, the table and the Dice are right.

The benchmark's numbers come from the script (never timed here). What this
checks is what makes them meaningful: the MONAI chain and the medge chain run
the same network on the same voxels and give the same mask (Dice >= 0.99 on a
random-weight UNet, whose masks have no margins, so a transposed axis, a
flipped slice order or a different intensity scaling would show), the Dice is
computed correctly on known masks, and the table has every stage. Needs
torch, MONAI, ONNX Runtime and highdicom (skipped with the reason otherwise).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench():
    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_volume.py"
    spec = importlib.util.spec_from_file_location("medge_tools_bench_volume", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _needs_chains():
    pytest.importorskip("torch", reason="torch is not installed: the MONAI chain runs the UNet in PyTorch")
    pytest.importorskip("monai", reason="MONAI is not installed (pip install monai, after torch==2.13.0)")
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed: the medge chain runs the graph on it")
    pytest.importorskip("highdicom", reason="highdicom is not installed: both chains write DICOM SEG with it")


def test_dice_per_class_on_known_masks(bench):
    reference = np.zeros((4, 6, 6), np.uint8)
    mask = np.zeros_like(reference)
    reference[0, :2, :4] = 1  # 8 voxels of class 1
    mask[0, :2, 2:6] = 1  # 8 voxels, 4 shared with the reference: Dice 2 * 4 / 16
    reference[2, 0, :3] = 2  # 3 voxels of class 2, mask has none: Dice 0
    # Class 3 absent from both: agreement, 1.0.
    assert bench.dice_per_class(mask, reference, 4) == pytest.approx([0.5, 0.0, 1.0])
    assert bench.dice_per_class(reference, reference, 4) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="shape"):
        bench.dice_per_class(mask[:2], reference, 2)


def test_table_has_every_stage_ratio_and_dice(bench):
    monai = bench.ChainResult("MONAI", "fp32")
    medge = bench.ChainResult("medge", "fp32")
    for result, seconds in ((monai, 3.0), (medge, 1.0)):
        for stage in (*bench.STAGES, *bench.DETAILS):
            result.times[stage] = [seconds, seconds * 2, seconds * 4]  # median: seconds * 2
        result.times["network"] = [seconds / 2] * 3
    monai.dice, medge.dice = [1.0], [0.995]
    text = bench.table([monai, medge])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()[2:]}
    for stage in bench.STAGES:
        assert rows[f"{stage} (ms)"] == ["6000", "2000"]
    assert rows["total MONAI / total chain"] == ["1.00", "3.00"]
    assert rows["- of which the network's calls (ms)"] == ["1500", "500"]
    assert rows["- of which window gather + blend (ms)"] == ["4500", "1500"]
    assert rows["Dice 'sphere' vs MONAI"] == ["1.0000", "0.9950"]


def test_monai_and_medge_chains_give_the_same_mask(bench, tmp_path):
    """Same random UNet, same series: MONAI's FP32 mask and medge's FP32 mask agree (Dice >= 0.99)."""
    _needs_chains()
    bench.quiet_known_warnings()
    # Target spacing = the series' own: both chains resample onto the same grid (MONAI's Spacing keeps the
    # first voxel centre, medge's keeps the field of view; they coincide only without resampling), so with
    # a network whose masks have no margins any disagreement is a real difference in what the chains compute.
    recipe = bench.Recipe(spacing=(0.7, 0.7, 2.5), roi=(16, 32, 24), overlap=0.25, mode="gaussian", sw_batch=2)
    # Instance norm: at initialisation a batch-norm UNet gives one class everywhere (nothing to compare).
    net = bench.Net(channels=(4, 8, 16), strides=(2, 2), num_res_units=1, classes=2, norm="instance")
    folder = bench.series_folder(tmp_path / "cache", slices=20, size=48, seed=3)
    module = bench.make_unet(net, seed=1)
    monai = bench.MonaiChain(module, recipe, threads=2)
    onnx_path = bench.export_onnx(module, tmp_path / "unet.onnx", recipe.roi)
    medge = bench.MedgePiecesChain(onnx_path, recipe, threads=2, classes=net.classes)
    results = bench.interleaved([monai, medge], folder, 1, tmp_path / "out", net.classes,
                                truth=bench.truth_mask(folder), log=lambda _: None)

    monai_mask, _ = monai.run(folder, tmp_path / "again_monai")
    medge_mask, timings = medge.run(folder, tmp_path / "again_medge")
    assert monai_mask.shape == medge_mask.shape == (20, 48, 48)
    foreground = int((monai_mask == 1).sum())
    assert 0.05 * monai_mask.size < foreground < 0.95 * monai_mask.size, "a mask that is all one class tests nothing"
    dice = bench.dice_per_class(medge_mask, monai_mask, net.classes)
    assert dice[0] >= 0.99, dice
    assert results[1].dice == pytest.approx(dice)
    assert results[0].dice == [1.0]
    # Every stage was timed, and the stages add up to (at most) the total.
    for result in results:
        for stage in (*bench.STAGES, *bench.DETAILS):
            assert len(result.times[stage]) == 1 and result.times[stage][0] > 0, (result.name, stage)
        assert result.times["network"][0] < result.times["inference"][0]
        parts = sum(result.times[s][0] for s in bench.STAGES if s != "total")
        assert parts <= result.times["total"][0] * 1.001
    assert set(timings) == {*bench.STAGES, *bench.DETAILS}
    # Each chain wrote one DICOM SEG that references the series.
    import pydicom

    for out in (tmp_path / "again_monai", tmp_path / "again_medge"):
        written = list(out.glob("*.dcm"))
        assert len(written) == 1
        seg = pydicom.dcmread(written[0])
        assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    text = bench.table(results)
    for stage in bench.STAGES:
        assert f"| {stage} (ms) |" in text


def test_monai_chain_and_model_segment_give_the_same_mask(bench, tmp_path):
    """The benchmark's medge chain proper (bundle, medge.load, model.segment, model.write_segmentation) at FP32
    against the MONAI chain on the same random UNet: Dice >= 0.99, every stage timed."""
    _needs_chains()
    from medge.runtime.model import Model

    if not hasattr(Model, "segment"):
        pytest.skip("this medge has no segmentation task (Model.segment): the benchmark uses medge's pieces")
    bench.quiet_known_warnings()
    recipe = bench.Recipe(spacing=(0.7, 0.7, 2.5), roi=(16, 32, 24), overlap=0.25, mode="gaussian", sw_batch=2)
    net = bench.Net(channels=(4, 8, 16), strides=(2, 2), num_res_units=1, classes=2, norm="instance")
    folder = bench.series_folder(tmp_path / "cache", slices=20, size=48, seed=3)
    module = bench.make_unet(net, seed=1)
    bundle = bench.build_bundle(tmp_path / "cache", module, recipe, net, folder, folder, ["fp32"], log=lambda _: None)
    medge = bench.MedgeModelChain(bundle, "fp32", backend="onnxruntime")
    assert medge.precision == "fp32"
    monai = bench.MonaiChain(module, recipe, threads=2, post="softmax-linear")
    results = bench.interleaved([monai, medge], folder, 1, tmp_path / "out", net.classes, log=lambda _: None)
    monai_mask, _ = monai.run(folder, tmp_path / "again_monai")
    foreground = int((monai_mask == 1).sum())
    assert 0.05 * monai_mask.size < foreground < 0.95 * monai_mask.size, "a mask that is all one class tests nothing"
    assert results[1].dice[0] >= 0.99, results[1].dice
    for stage in (*bench.STAGES, *bench.DETAILS):
        assert results[1].times[stage][0] > 0, stage
    parts = sum(results[1].times[s][0] for s in bench.STAGES if s != "total")
    assert parts <= results[1].times["total"][0] * 1.001
