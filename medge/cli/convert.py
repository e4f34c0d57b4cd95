"""``medge-convert``: a trained model + DICOMs -> a verified, signed deployment bundle.

Exit status: 0 done; 2 user error (message, no traceback); 3 the bundle was
written but a precision failed its accuracy gates (the defaults, or
--max-auc-drop, --min-top1-agreement, --max-abs-error); that precision is
never chosen by default at run time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..errors import MedgeError

EXIT_GATE_FAILED = 3

EPILOG = """\
examples:
  medge-convert --demo
      convert the built-in demo model (synthetic CT lesion classifier) end to end
  medge-convert model.onnx --calib calib_dicoms/ --val val_dicoms/ --labels labels.csv \\
      --size 128 128 --window -600 1500 --labels-names no_lesion,lesion \\
      --precision fp32,fp16,int8 --batch 1:4:8 --engine tensorrt_rtx -o lesion.medge
  medge-convert model.pt2 --spec spec.json --calib calib/ --engine none -o model.medge --sign-key key.pem
  medge-convert unet3d.onnx --task segmentation --window 40 400 --spacing 1.5 1.5 2.0 --overlap 0.5 \
      --labels-names background,spleen --calib calib_series/ --val val_series/ --batch 1:2:4 -o spleen.medge
      a 2-D or 3-D segmentation network; --calib / --val are folders of DICOM series (one or several)

The preprocessing (--spec, or --size/--window/--range/...) must be what the model was
trained with: it is stored in the bundle and used for calibration, validation and
deployment alike. Loading a model never runs pickled code: use .onnx, .pt2
(torch.export.save) or TorchScript (torch.jit.save).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medge-convert",
        description="Convert a trained model into a medge bundle: FP32/FP16/INT8 graphs, an accuracy report "
                    "against FP32, TensorRT or TensorRT-RTX engines, SHA-256 of every file, optional signature.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", help="model file: .onnx, .pt2 (torch.export) or TorchScript")
    p.add_argument("--demo", action="store_true", help="convert the built-in demo model on generated sample DICOMs")
    p.add_argument("-o", "--output", help="bundle to write (a NAME.medge directory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")

    data = p.add_argument_group("data")
    data.add_argument("--calib", help="calibration images: a folder of DICOM files (or .npy arrays)")
    data.add_argument("--val", help="validation images: a folder of DICOM files (or .npy arrays)")
    data.add_argument("--labels", help="CSV with 'filename' (or 'sop_instance_uid') and 'label' columns")
    data.add_argument("--min-calibration-images", type=int, default=32, metavar="N",
                      help="refuse fewer calibration images than this (default 32)")
    data.add_argument("--check-inputs", metavar="PATH",
                      help="check vectors the bundle carries and re-runs at load: a DICOM folder or .npy "
                           "(default: chosen from --val, else --calib)")

    seg = p.add_argument_group(
        "segmentation (--task segmentation: 2-D or 3-D networks; --calib / --val are folders of DICOM series)")
    seg.add_argument("--task", default="classification", choices=["classification", "segmentation"],
                     help="what the outputs mean (default classification; per-pixel outputs need segmentation)")
    seg.add_argument("--volume-spec", metavar="FILE",
                     help="VolumeSpec JSON (medge.VolumeSpec.to_json) instead of the volume flags below")
    seg.add_argument("--spacing", type=float, nargs=3, metavar=("ROW", "COL", "SLICE"),
                     help="resample each series to this spacing in mm (default: keep its grid)")
    seg.add_argument("--target-size", type=int, nargs=3, metavar=("D", "H", "W"),
                     help="resample each series to this size instead of a spacing")
    seg.add_argument("--neighbours", type=int, default=0, metavar="K",
                     help="2-D networks trained on 2.5-D input: K neighbouring slices each side as channels")
    seg.add_argument("--roi", type=int, nargs="+", metavar="N",
                     help="the network's window, D H W (3-D) or H W (2-D); default: the model's input size")
    seg.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default 0.25)")
    seg.add_argument("--sw-mode", default="gaussian", choices=["gaussian", "constant"],
                     help="sliding-window blending (default gaussian, as MONAI)")
    seg.add_argument("--sigma-scale", type=float, default=0.125, help="Gaussian sigma / window (default 0.125)")
    seg.add_argument("--sw-batch", type=int, help="windows per backend call (default: the profile's opt batch)")
    seg.add_argument("--threshold", type=float, help="sigmoid outputs: mask threshold (default 0.5)")
    seg.add_argument("--min-dice", type=float,
                     help="gate: smallest Dice of each label's mask against FP32's (default 0.95)")
    seg.add_argument("--max-probability-error", type=float,
                     help="gate: largest probability error against FP32 (default: none)")

    pre = p.add_argument_group("preprocessing (what the model was trained with)")
    pre.add_argument("--spec", help="PreprocessSpec JSON file (instead of the flags below)")
    pre.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="model input height and width")
    pre.add_argument("--channels", type=int, default=1, choices=[1, 3],
                     help="input channels (3 repeats the greyscale image; default 1)")
    voi = pre.add_mutually_exclusive_group()
    voi.add_argument("--window", type=float, nargs=2, metavar=("CENTER", "WIDTH"), help="fixed window")
    voi.add_argument("--range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="fixed value range")
    pre.add_argument("--voi-function", choices=["LINEAR", "LINEAR_EXACT", "SIGMOID"],
                     help="VOI LUT function of --window (default: the standard's LINEAR)")
    pre.add_argument("--fit", default="stretch", choices=["stretch", "letterbox"],
                     help="stretch to the input size, or keep the aspect ratio and pad (default stretch)")
    pre.add_argument("--resample", default="bilinear_antialias", choices=["bilinear", "bilinear_antialias"],
                     help="resampling filter (default bilinear_antialias)")
    pre.add_argument("--mean", type=float, nargs="+", default=[0.0], help="per-channel mean subtracted after VOI")
    pre.add_argument("--std", type=float, nargs="+", default=[1.0], help="per-channel std divided by after VOI")

    model = p.add_argument_group("model")
    model.add_argument("--name", help="model name (default: the file name)")
    model.add_argument("--model-version", default="1", help="version recorded in the bundle (default 1)")
    model.add_argument("--labels-names", help="class names in output order, comma-separated")
    model.add_argument("--activation", default="softmax", choices=["softmax", "sigmoid"],
                       help="how outputs become scores (default softmax; one sigmoid output is a binary classifier)")
    model.add_argument("--positive-class", help="class scored for AUC / sensitivity (default: the last)")
    model.add_argument("--explain", action="store_true",
                       help="add class activation maps (equal to Grad-CAM for global-average-pooling + linear "
                            "heads) to every precision's graph: engines compute the map with the scores; "
                            "Prediction.heatmap gives it on the original image grid")
    model.add_argument("--operating-point", metavar="TARGET",
                       help="binary tasks: choose the decision threshold on the labelled validation set: "
                            "sensitivity=0.95, specificity=0.9 or youden (with bootstrap 95%% intervals); the "
                            "runtime's label uses it, scores are unchanged (default: argmax)")

    conv = p.add_argument_group("conversion")
    conv.add_argument("--precision", default="fp32,fp16,int8", help="comma-separated: fp32, fp16, int8")
    conv.add_argument("--batch", default="1:4:8", help="optimisation profile MIN:OPT:MAX (default 1:4:8)")
    conv.add_argument("--calib-method", default="entropy", choices=["minmax", "entropy", "percentile"],
                      help="INT8 activation range calibration (default entropy)")
    conv.add_argument("--engine", default="tensorrt_rtx", choices=["tensorrt_rtx", "tensorrt", "none"],
                      help="engines to build (default tensorrt_rtx, which needs no GPU; none: graphs only)")
    conv.add_argument("--compute-capability", action="append", metavar="X.Y",
                      help="TensorRT-RTX target (repeatable), e.g. 8.6")
    conv.add_argument("--workspace-mb", type=int, help="builder workspace limit")
    conv.add_argument("--opt-level", type=int, default=3, choices=range(0, 6), help="builder optimisation level")
    conv.add_argument("--timing-cache", help="TensorRT timing cache file (reused across builds)")
    conv.add_argument("--sign-key", help="Ed25519 private key (PEM) to sign the bundle manifest")

    gates = p.add_argument_group(
        "accuracy gates",
        "Every precision is gated against FP32 (default: top-1 agreement >= 0.99 and, with --labels, AUC drop "
        "<= 0.01). A precision that fails, or was never measured, is recorded as such and never chosen by "
        "default at run time. The bundle is still written; the exit status is 3.")
    gates.add_argument("--max-auc-drop", type=float, help="largest AUC drop against FP32 (default 0.01, needs --labels)")
    gates.add_argument("--min-top1-agreement", type=float, help="smallest top-1 agreement with FP32, a fraction "
                                                                "(default 0.99)")
    gates.add_argument("--max-abs-error", type=float, help="largest absolute output error against FP32 (default: none)")
    gates.add_argument("--no-gates", action="store_true",
                       help="switch the gates off (recorded in the bundle; every measured precision is 'ungated')")

    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: when stderr is a terminal)")
    return p


def _spec(args):
    from ..preprocess import PreprocessSpec

    if args.spec:
        try:
            return PreprocessSpec.from_json(Path(args.spec).read_text())
        except OSError as exc:
            raise MedgeError(f"cannot read the spec file {args.spec}: {exc.strerror}") from exc
    if not args.size:
        raise MedgeError("give the preprocessing: --spec FILE, or at least --size H W (with --window or --range)")
    kwargs = dict(height=args.size[0], width=args.size[1], channels=args.channels, fit=args.fit,
                  resample=args.resample, mean=tuple(args.mean), std=tuple(args.std), voi_function=args.voi_function)
    if args.window:
        kwargs.update(voi="window", window=tuple(args.window))
    elif args.range:
        kwargs.update(voi="range", value_range=tuple(args.range), voi_function=None)
    return PreprocessSpec(**kwargs)


def _volume_spec(args):
    from ..volume import VolumeSpec

    if args.volume_spec:
        try:
            return VolumeSpec.from_json(Path(args.volume_spec).read_text())
        except OSError as exc:
            raise MedgeError(f"cannot read the volume spec file {args.volume_spec}: {exc.strerror}") from exc
    if not (args.window or args.range):
        raise MedgeError("give the volume preprocessing: --volume-spec FILE, or --window CENTER WIDTH / --range LOW "
                         "HIGH (with --spacing or --target-size to resample)")
    if len(args.mean) != 1 or len(args.std) != 1:
        raise MedgeError("a volume is normalised with one --mean and one --std")
    kwargs = dict(target_spacing=tuple(args.spacing) if args.spacing else None,
                  target_size=tuple(args.target_size) if args.target_size else None,
                  mean=args.mean[0], std=args.std[0], neighbours=args.neighbours)
    if args.window:
        kwargs.update(voi="window", window=tuple(args.window), voi_function=args.voi_function)
    else:
        kwargs.update(voi="range", value_range=tuple(args.range))
    return VolumeSpec(**kwargs)


def _segmentation_options(args) -> dict:
    if args.labels:
        raise MedgeError("--labels (a CSV of class labels) applies to classification")
    if args.roi is not None and len(args.roi) not in (2, 3):
        raise MedgeError("--roi takes D H W (3-D networks) or H W (2-D networks)")
    if args.spec or args.size:
        raise MedgeError("--spec / --size describe 2-D classifier inputs; a segmentation bundle takes --volume-spec "
                         "or the volume flags (--window/--range, --spacing, --roi)")
    return dict(task="segmentation", volume_spec=_volume_spec(args), roi=tuple(args.roi) if args.roi else None,
                overlap=args.overlap, sw_mode=args.sw_mode, sigma_scale=args.sigma_scale, sw_batch=args.sw_batch,
                threshold=args.threshold, min_dice=args.min_dice, max_probability_error=args.max_probability_error)


def run(args) -> int:
    from ..convert.pipeline import convert, parse_batch

    common = dict(
        precisions=[p.strip() for p in args.precision.split(",") if p.strip()],
        batch=parse_batch(args.batch), engine=args.engine, calibration_method=args.calib_method,
        compute_capabilities=args.compute_capability, optimization_level=args.opt_level,
        workspace_bytes=args.workspace_mb * (1 << 20) if args.workspace_mb else None,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None, sign_key=args.sign_key,
        overwrite=args.overwrite, max_auc_drop=args.max_auc_drop, min_top1_agreement=args.min_top1_agreement,
        max_abs_error=args.max_abs_error, gates=not args.no_gates, operating_point=args.operating_point,
        explain=args.explain,
        progress=args.progress,
    )
    if args.demo:
        if args.model:
            raise MedgeError("--demo converts the built-in model: do not give a model file with it")
        from ..convert.demo import convert_demo

        result = convert_demo(Path(args.output) if args.output else None, **common)
    else:
        if not args.model:
            raise MedgeError("give a model file (or --demo); see medge-convert --help")
        if not args.output:
            raise MedgeError("give the bundle to write with -o NAME.medge")
        names = [n.strip() for n in args.labels_names.split(",")] if args.labels_names else []
        if args.task == "segmentation":
            for flag, value in (("--explain", args.explain), ("--operating-point", args.operating_point),
                                ("--max-auc-drop", args.max_auc_drop),
                                ("--min-top1-agreement", args.min_top1_agreement),
                                ("--max-abs-error", args.max_abs_error), ("--check-inputs", args.check_inputs),
                                ("--positive-class", args.positive_class)):
                if value:
                    raise MedgeError(f"{flag} applies to classification, not --task segmentation")
            for key in ("explain", "operating_point", "max_auc_drop", "min_top1_agreement", "max_abs_error"):
                common.pop(key)
            result = convert(
                args.model, Path(args.output), calibration=args.calib, validation=args.val, name=args.name,
                version=args.model_version, class_labels=names, activation=args.activation,
                min_calibration_images=args.min_calibration_images, **_segmentation_options(args), **common)
            print_summary(result)
            if result.threshold_failures:
                print("accuracy gates FAILED:\n  " + "\n  ".join(result.threshold_failures), file=sys.stderr)
                return EXIT_GATE_FAILED
            return 0
        segmentation_only = [flag for flag, value in (
            ("--volume-spec", args.volume_spec), ("--spacing", args.spacing), ("--target-size", args.target_size),
            ("--roi", args.roi), ("--min-dice", args.min_dice), ("--threshold", args.threshold),
            ("--max-probability-error", args.max_probability_error), ("--sw-batch", args.sw_batch)) if value]
        if segmentation_only:
            raise MedgeError(f"{', '.join(segmentation_only)} apply to --task segmentation")
        result = convert(
            args.model, Path(args.output), spec=_spec(args), calibration=args.calib, validation=args.val,
            labels=Path(args.labels) if args.labels else None, name=args.name, version=args.model_version,
            class_labels=names, activation=args.activation, positive_class=args.positive_class,
            min_calibration_images=args.min_calibration_images, check_inputs=args.check_inputs, **common)
    print_summary(result)
    if result.threshold_failures:
        print("accuracy gates FAILED:\n  " + "\n  ".join(result.threshold_failures), file=sys.stderr)
        return EXIT_GATE_FAILED
    return 0


def print_summary(result) -> None:
    print()
    if result.report is not None and result.report.kind == "segmentation":
        print(f"accuracy against fp32 at batch 1 on ONNX Runtime CPU ({result.report.images} validation series, "
              "whole volumes through the sliding window; Dice of each label's mask against FP32's):")
        print(result.report.table())
    elif result.report is not None:
        print(f"accuracy against fp32 at batch 1 ({result.report.images} validation images, "
              f"executed by ONNX Runtime CPU):")
        print(result.report.table())
    if result.engines:
        print("\nengines:")
        for e in result.engines:
            print(f"  {e['precision']:5s} {e['flavour']} {e.get('flavour_version', '')}: "
                  f"{e['size_bytes'] / 1e6:.2f} MB, profile {e['profile']}, layers {e.get('layer_precisions')}")
    signed = (Path(result.bundle_path) / "manifest.json.sig").exists()
    print(f"\nbundle: {result.bundle_path} ({'signed' if signed else 'unsigned'}); inspect it with: "
          f"medge inspect {result.bundle_path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ._run import run_command

    args = build_parser().parse_args(argv)
    return run_command("medge-convert", lambda: run(args), interrupted="interrupted; no bundle was written")


if __name__ == "__main__":
    sys.exit(main())
