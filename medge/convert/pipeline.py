"""medge.convert.convert: trained model + DICOMs -> verified, signed deployment bundle.

Steps, each failing with a ConversionError that says what to fix:
1. import the model as a checked FP32 ONNX graph (PyTorch sources are
   compared with ONNX Runtime first);
2. preprocess the calibration (and validation) DICOMs with the bundle's
   PreprocessSpec, through medge's own fused preprocessing;
3. make the precision graphs (FP16, INT8 calibrated on those inputs);
4. measure every precision against FP32 at batch 1, opt and max;
5. build TensorRT / TensorRT-RTX engines (optional);
6. write the bundle: manifest, artifacts, SHA-256 of each, optional signature.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .._inputs import collect_inputs
from .._progress import Progress
from ..errors import ConversionError, MedgeError
from ..preprocess import PreprocessSpec, preprocess
from .export import ImportedModel, import_model
from .precision import DEFAULT_MIN_CALIBRATION_IMAGES, CalibrationSummary, make_fp16, make_int8
from ..runtime.checks import DEFAULT_CHECK_VECTORS, CheckVectors
from ..runtime.envelope import Envelope
from ..tasks import ClassificationTask
from .validate import AccuracyReport, evaluate, gate_verdicts, read_labels

_LOG = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
ENGINE_FLAVOURS = ("tensorrt", "tensorrt_rtx", "none")


@dataclass
class Inputs:
    """Model inputs built from files, with the names each one can be looked up by."""

    array: np.ndarray  # (N, C, H, W) float32
    keys: list[list[str]]  # per input: file name (with #frame for multi-frame) and SOP Instance UID
    source: str
    skipped: list[str] = field(default_factory=list)  # "name: reason"
    headers: list = field(default_factory=list)  # per DICOM file read: _Header (for the validated envelope)


@dataclass(frozen=True)
class _Header:
    """What the validated envelope needs of one image, without its pixels."""

    semantics: Any
    acquisition: Any


def load_inputs(source: Any, spec: PreprocessSpec, *, what: str, progress: Optional[bool] = None) -> Inputs:
    """Model inputs from a folder of DICOM files, a folder of .npy files, or one .npy file.

    DICOM files go through ``read_dicom`` and ``preprocess`` with ``spec``
    (float32 output); every frame is one input. ``.npy`` files must hold
    already-preprocessed (N, C, H, W) or (C, H, W) arrays. Unreadable DICOM
    files are skipped and listed in ``skipped``.

    Raises:
        ConversionError: the source does not exist or yields no input.
    """
    from ..dicom import read_dicom

    path = Path(source)
    spec32 = spec.replace(dtype="float32")
    if not path.exists():
        raise ConversionError(f"{what} source {path} does not exist")
    if path.is_file() and path.suffix.lower() == ".npy":
        array = _load_npy(path, spec32)
        return Inputs(array, [[f"{path.name}[{i}]"] for i in range(len(array))], str(path))
    if not path.is_dir():
        raise ConversionError(f"{what} source {path} must be a folder of DICOM files or .npy arrays, or a .npy file")
    npy_files = sorted(path.rglob("*.npy"))
    if npy_files:
        arrays = [_load_npy(f, spec32) for f in npy_files]
        keys = [[f"{f.name}[{i}]"] for f, a in zip(npy_files, arrays) for i in range(len(a))]
        return Inputs(np.concatenate(arrays), keys, str(path))
    # The same rules as medge run: DICOM by content (UID-named files included), every skip listed.
    found = collect_inputs([str(path)])
    files = found.files
    for entry in found.skipped:
        _LOG.info("%s folder: skipped %s (%s)", what, entry.name, entry.reason)
    if not files:
        raise ConversionError(f"no DICOM files (by content) or .npy files in {what} folder {path}"
                              + (f"; {found.summary()}" if found.skipped else ""))
    outputs, keys, skipped, headers = [], [], [], []
    with Progress(f"preprocessing {what} images", len(files), enabled=progress) as bar:
        for file in files:
            bar.update()
            try:
                image = read_dicom(file.path, force=file.bare)
                batch = preprocess(image, spec32)
            except MedgeError as exc:
                skipped.append(f"{file.name}: {exc}")
                _LOG.warning("skipping %s file %s: %s", what, file.name, exc)
                continue
            outputs.append(batch)
            headers.append(_Header(image.semantics, image.acquisition))
            for frame in range(batch.shape[0]):
                # Looked up in a labels CSV by file name, by path relative to the folder, or by SOP Instance UID.
                names = list(dict.fromkeys([file.path.name, file.name]))
                if batch.shape[0] > 1:
                    names = [f"{n}#{frame}" for n in names]
                keys.append(names + ([image.sop_instance_uid] if image.sop_instance_uid else []))
    if not outputs:
        raise ConversionError(f"none of the {len(files)} {what} files could be read:\n  " + "\n  ".join(skipped[:10]))
    return Inputs(np.concatenate(outputs), keys, str(path), skipped, headers)


def _load_npy(path: Path, spec: PreprocessSpec) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)  # never unpickle: .npy object arrays could run code
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot load {path.name} as a numpy array: {exc}") from exc
    if array.ndim == 3:
        array = array[None]
    expected = spec.output_shape_per_image
    if array.ndim != 4 or tuple(array.shape[1:]) != expected:
        raise ConversionError(f"{path.name} holds shape {array.shape}; inputs of (N, {', '.join(map(str, expected))}) "
                              "are expected (already preprocessed with the spec)")
    return np.ascontiguousarray(array, dtype=np.float32)


@dataclass
class ConversionResult:
    bundle_path: Path
    imported: ImportedModel
    report: Optional[AccuracyReport]
    calibration: Optional[CalibrationSummary]
    engines: list[dict]
    threshold_failures: list[str]
    manifest: dict


def parse_batch(text: str) -> tuple[int, int, int]:
    """'1:4:8' -> (1, 4, 8); '8' -> (1, 8, 8)."""
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        raise ConversionError(f"--batch must be MIN:OPT:MAX (e.g. 1:4:8), got {text!r}") from None
    if len(parts) == 1:
        parts = [1, parts[0], parts[0]]
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2] <= 4096:
        raise ConversionError(f"--batch must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX <= 4096, got {text!r}")
    return parts[0], parts[1], parts[2]


def convert(
    model: Any,
    output: Path,
    *,
    spec: Optional[PreprocessSpec] = None,
    task: str = "classification",
    volume_spec: Any = None,
    roi: Optional[Sequence[int]] = None,
    overlap: float = 0.25,
    sw_mode: str = "gaussian",
    sigma_scale: float = 0.125,
    sw_batch: Optional[int] = None,
    threshold: Optional[float] = None,
    min_dice: Optional[float] = None,
    max_probability_error: Optional[float] = None,
    calibration: Any = None,
    validation: Any = None,
    labels: Optional[Path] = None,
    precisions: Sequence[str] = PRECISIONS,
    batch: Sequence[int] = (1, 4, 8),
    engine: str = "tensorrt_rtx",
    name: Optional[str] = None,
    version: str = "1",
    class_labels: Sequence[str] = (),
    activation: str = "softmax",
    positive_class: Optional[str] = None,
    calibration_method: str = "entropy",
    min_calibration_images: int = DEFAULT_MIN_CALIBRATION_IMAGES,
    example_input: Optional[np.ndarray] = None,
    compute_capabilities: Optional[Sequence[str]] = None,
    workspace_bytes: Optional[int] = None,
    optimization_level: int = 3,
    timing_cache: Optional[Path] = None,
    sign_key: Any = None,
    overwrite: bool = False,
    max_auc_drop: Optional[float] = None,
    min_top1_agreement: Optional[float] = None,
    max_abs_error: Optional[float] = None,
    gates: bool = True,
    operating_point: Optional[str] = None,
    explain: bool = False,
    check_inputs: Any = None,
    check_vector_count: int = DEFAULT_CHECK_VECTORS,
    progress: Optional[bool] = None,
    log: Callable[[str], None] = print,
) -> ConversionResult:
    """Convert ``model`` into a deployment bundle at ``output`` (a ``NAME.medge`` directory).

    Args:
        model: .onnx / .pt2 / TorchScript path, or a torch.nn.Module (with ``example_input``).
        output: bundle path to write (refused if it exists, unless ``overwrite``).
        spec: classification: the PreprocessSpec the model was trained with; stored in the bundle.
        task: "classification" (default) or "segmentation".
        volume_spec: segmentation: the ``medge.VolumeSpec`` (series -> network
            input grid) the model was trained with; stored in the bundle as
            ``preprocess`` (with ``"kind": "volume"``). ``calibration`` and
            ``validation`` are then folders of DICOM series (one or several).
        roi: segmentation: the network's window, (D, H, W) or (H, W); default
            (and it must equal) the model's input size.
        overlap, sw_mode, sigma_scale, sw_batch: segmentation: the sliding
            window (MONAI's overlap, "gaussian" / "constant", sigma fraction;
            windows per backend call, default the profile's opt batch).
        threshold: segmentation with sigmoid outputs: the mask threshold (0.5).
        min_dice, max_probability_error: segmentation gates (None: Dice >= 0.95
            against FP32 for every label present, probability error not gated).
        calibration: DICOM folder / .npy for INT8 calibration (required for int8).
        validation: DICOM folder / .npy for the accuracy report (default: none).
        labels: CSV of validation labels (``filename`` or ``sop_instance_uid``, ``label``).
        precisions: subset of fp32, fp16, int8 (fp32 is always made: it is the reference).
        batch: (min, opt, max) of the optimisation profile.
        engine: "tensorrt_rtx", "tensorrt" or "none".
        class_labels, activation, positive_class: how outputs become predictions.
        calibration_method: minmax, entropy or percentile.
        min_calibration_images: refuse fewer calibration images.
        example_input: (N, C, H, W) for nn.Module / TorchScript sources.
        compute_capabilities: TensorRT-RTX targets, e.g. ["8.6", "8.9"].
        workspace_bytes, optimization_level, timing_cache: engine build options.
        sign_key: Ed25519 private key (PEM path) to sign the manifest.
        overwrite: replace an existing bundle.
        max_auc_drop, min_top1_agreement, max_abs_error: regression gates
            (None: the task's default, e.g. top-1 agreement >= 0.99 and, with
            labels, AUC drop <= 0.01 for classification). Violations are listed
            in ``threshold_failures`` (the CLI exits 3) and the graph's verdict
            in the manifest is "failed": the runtime never picks it by default.
        gates: False switches the gates off (recorded; graphs are "ungated").
        operating_point: binary tasks with labels: "sensitivity=0.95",
            "specificity=0.9" or "youden" chooses the decision threshold on
            FP32's validation scores (with bootstrap intervals); the runtime's
            label uses it, scores are unchanged.
        explain: add class activation maps (CAM, equal to Grad-CAM for global
            average pooling + linear heads) as a second output of every
            precision's graph; other heads are refused.
        check_inputs: .npy / DICOM folder of check vectors (default: chosen
            from the validation set, else the calibration set).
        check_vector_count: how many check vectors the bundle carries.
        progress: progress lines (None: on a terminal).
        log: where step messages go.

    Returns:
        ConversionResult.

    Raises:
        ConversionError, BundleError, MissingDependency, MedgeError.
    """
    from ..bundle import BundleWriter

    started = time.monotonic()
    if task not in ("classification", "segmentation"):
        raise ConversionError(f"task must be 'classification' or 'segmentation', got {task!r}")
    if task == "segmentation":
        return _convert_segmentation(
            model, Path(output), volume_spec=volume_spec, spec=spec, roi=roi, overlap=overlap, sw_mode=sw_mode,
            sigma_scale=sigma_scale, sw_batch=sw_batch, threshold=threshold, calibration=calibration,
            validation=validation, labels=labels, precisions=precisions, batch=batch, engine=engine, name=name,
            version=version, class_labels=class_labels, activation=activation,
            calibration_method=calibration_method, min_calibration_images=min_calibration_images,
            example_input=example_input, compute_capabilities=compute_capabilities,
            workspace_bytes=workspace_bytes, optimization_level=optimization_level, timing_cache=timing_cache,
            sign_key=sign_key, overwrite=overwrite, gates=gates, min_dice=min_dice,
            max_probability_error=max_probability_error,
            classification_only={"max_auc_drop": max_auc_drop, "min_top1_agreement": min_top1_agreement,
                                 "max_abs_error": max_abs_error, "operating_point": operating_point,
                                 "explain": explain or None, "check_inputs": check_inputs, "positive_class": positive_class},
            check_vector_count=check_vector_count, progress=progress, log=log, started=started)
    if spec is None:
        raise ConversionError("give the preprocessing spec (spec=PreprocessSpec(...), or --spec / --size ...)")
    if volume_spec is not None:
        raise ConversionError("a volume spec is for task='segmentation' (--task segmentation)")
    precisions = list(dict.fromkeys(["fp32", *precisions]))
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ConversionError(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
    if engine not in ENGINE_FLAVOURS:
        raise ConversionError(f"engine must be one of {', '.join(ENGINE_FLAVOURS)}, got {engine!r}")
    batch = tuple(int(b) for b in batch)
    if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise ConversionError(f"batch must be (min, opt, max) with 1 <= min <= opt <= max, got {batch}")
    if "int8" in precisions and calibration is None:
        raise ConversionError("int8 needs calibration images (--calib DIR): DICOMs that look like deployment data")
    if operating_point is not None:
        from .operating_point import parse_operating_point

        parse_operating_point(operating_point)  # a typo fails now, not after the long work
        if labels is None:
            raise ConversionError("--operating-point needs labelled validation images (--val and --labels)")
    if labels is not None and validation is None:
        raise ConversionError("--labels needs --val (the validation images they label)")
    output = Path(output)
    if output.exists() and not overwrite:
        raise ConversionError(f"{output} already exists; choose another name or pass --overwrite")
    if calibration is None and validation is None and check_inputs is None:
        raise ConversionError(
            "give validation images (--val) or at least calibration images (--calib): the bundle's check vectors "
            "and validated input envelope are taken from them, and a model validated on nothing would be run "
            "on anything")
    if not 1 <= int(check_vector_count) <= 256:
        raise ConversionError(f"check_vector_count must be within 1..256, got {check_vector_count}")
    if engine == "tensorrt_rtx":
        from .engine import check_rtx_targets

        # Before any data is generated or validated: an impossible target must not cost the whole run.
        compute_capabilities = check_rtx_targets(compute_capabilities)
    if not gates and any(v is not None for v in (max_auc_drop, min_top1_agreement, max_abs_error)):
        raise ConversionError("gate limits were given together with --no-gates; give one or the other")
    options = _GateOptions(gates, {"max_auc_drop": max_auc_drop, "min_top1_agreement": min_top1_agreement,
                                   "max_abs_error": max_abs_error}, check_inputs, int(check_vector_count),
                           operating_point, explain)
    writer = BundleWriter(output, overwrite=overwrite)  # fail on an unwritable destination before the long work
    try:
        return _convert(writer, model, output, spec, calibration, validation, labels, precisions, batch, engine, name,
                        version, class_labels, activation, positive_class, calibration_method,
                        min_calibration_images, example_input, compute_capabilities, workspace_bytes,
                        optimization_level, timing_cache, sign_key, options, progress, log, started)
    except BaseException:
        writer.abort()  # an interrupted or failed conversion leaves no bundle and no temporary files
        raise


def _convert(writer, model, output, spec, calibration, validation, labels, precisions, batch, engine, name, version,
             class_labels, activation, positive_class, calibration_method, min_calibration_images, example_input,
             compute_capabilities, workspace_bytes, optimization_level, timing_cache, sign_key, options, progress, log,
             started) -> ConversionResult:
    with tempfile.TemporaryDirectory(prefix="medge-convert-") as tmp:
        work = Path(tmp)
        calib = load_inputs(calibration, spec, what="calibration", progress=progress) if calibration is not None else None
        val = load_inputs(validation, spec, what="validation", progress=progress) if validation is not None else None

        log("1/5 importing the model")
        samples = calib.array[:4] if calib is not None else (val.array[:4] if val is not None else None)
        imported = import_model(model, work, example_input=example_input if example_input is not None else samples,
                                sample_inputs=samples)
        expected = tuple(imported.input.shape[1:])
        if expected != spec.output_shape_per_image:
            raise ConversionError(
                f"the model takes {expected} per image but the preprocessing spec produces "
                f"{spec.output_shape_per_image}; fix --size / --channels or the spec file"
            )
        # The task decides whether the outputs can be interpreted at all: refused here, before any
        # quantisation, rather than flattened into a meaningless score vector later.
        task = ClassificationTask.for_outputs(imported.outputs[0].shape, labels=class_labels, activation=activation,
                                              positive_class=positive_class)
        explanation = None
        if options.explain:
            from .explain import add_class_activation_maps
            from .export import TensorSpec

            explained = work / "model.explain.onnx"
            explanation = add_class_activation_maps(imported.onnx_path, explained,
                                                    input_size=(spec.height, spec.width))
            imported.onnx_path = explained  # every precision graph is made from this one, so all carry the maps
            imported.outputs.append(TensorSpec(explanation.output, ["batch", *explanation.output_shape], "float32"))
            task = dataclasses.replace(task, heatmap_output=explanation.output)
            log(f"    class activation maps from {explanation.feature_map} {explanation.feature_shape}, upsampled "
                f"to {spec.height}x{spec.width}, as output {explanation.output!r}")
        if imported.torch_check:
            log(f"    ONNX Runtime vs PyTorch on {imported.torch_check['samples']} inputs: max abs error "
                f"{imported.torch_check['max_abs_error']:.3g}")

        log("2/5 making precision graphs: " + ", ".join(precisions))
        # Accuracy control aims at the conversion's own top-1 gate (layers kept in float until the INT8 graph
        # agrees with FP32 on the calibration images); --no-gates switches it off with the gates.
        agreement_target = (options.limits.get("min_top1_agreement")
                            if options.limits.get("min_top1_agreement") is not None
                            else task.default_gates.get("min_top1_agreement")) if options.enabled else None
        if agreement_target is not None and not agreement_target > 0:
            agreement_target = None  # a gate of 0 asks for no agreement: nothing to aim at

        def quantize(out_path: Path, target: str) -> CalibrationSummary:
            return make_int8(imported.onnx_path, out_path, calib.array, method=calibration_method,
                             batch_size=batch[1], min_images=min_calibration_images, source=calib.source,
                             target=target, min_top1_agreement=agreement_target, progress=progress)

        graphs, graph_meta, calibration_summary = _precision_graphs(imported.onnx_path, precisions, work, quantize,
                                                                    "images", log)

        report, chosen_point = None, None
        limits = {name: default if options.limits.get(name) is None else options.limits[name]
                  for name, default in task.default_gates.items()}
        if val is not None:
            log(f"3/5 measuring accuracy on {len(val.array)} validation images at batch {', '.join(map(str, sorted(set(batch))))}")
            label_array = read_labels(labels, val.keys, class_labels) if labels is not None else None
            if options.operating_point is not None:
                task, chosen_point = _choose_operating_point(task, graphs["fp32"], val.array, label_array,
                                                             options.operating_point, log)
            report = evaluate(graphs, val.array, batch_sizes=sorted(set(batch)), labels=label_array, task=task,
                              progress=progress)
        else:
            log("3/5 no validation set (--val): accuracy not measured; only fp32 will run by default")
        verdicts, failures = gate_verdicts(report, graphs, task, limits, enabled=options.enabled)
        explicit = [name for name, value in options.limits.items() if value is not None]
        if options.enabled and report is None and explicit:
            failures.append("accuracy gates were given but there is no validation set (--val)")
        if options.enabled and report is not None and not report.labelled and options.limits.get("max_auc_drop") is not None:
            failures.append("--max-auc-drop needs validation labels (--labels CSV)")
        for graph, verdict in verdicts.items():
            log(f"    {graph}: {verdict['verdict']}" + (f" ({'; '.join(verdict['reasons'])})" if verdict["reasons"]
                                                         and verdict["verdict"] != "ungated" else ""))
        checks = _check_vectors(options, spec, val, calib, graphs, task, report, progress)
        envelope = Envelope.observe([*(calib.headers if calib else []), *(val.headers if val else [])],
                                    [what for what, s in (("calibration", calib), ("validation", val))
                                     if s is not None and s.headers])

        engines = _build_engines(graphs, precisions, engine, work, batch, log, workspace_bytes=workspace_bytes,
                                 optimization_level=optimization_level, timing_cache_path=timing_cache,
                                 compute_capabilities=compute_capabilities)
        log(f"5/5 writing the bundle {output}")
        engine_entries = _add_artifacts(writer, graphs, graph_meta, engines)
        manifest = {
            "model": {"name": name or _default_name(model), "version": str(version), "source": imported.source,
                      "opset": imported.opset, "export_check": imported.torch_check},
            "inputs": [t.to_manifest() for t in imported.inputs],
            "outputs": [t.to_manifest() for t in imported.outputs],
            "preprocess": spec.to_dict(),
            "task": task.to_manifest(),
            "operating_point": chosen_point.to_manifest() if chosen_point else None,
            "explanation": explanation.to_manifest() if explanation else None,
            "labels": list(class_labels),
            "postprocess": {"activation": activation,
                            "positive_class": report.positive_class if report else positive_class},
            "profile": {"min": batch[0], "opt": batch[1], "max": batch[2]},
            "graphs": graph_meta,
            "calibration": calibration_summary.to_manifest() if calibration_summary else None,
            "accuracy": report.to_manifest() if report else None,
            "gates": {"enabled": options.enabled, "passed": not failures, "failures": failures, "limits": limits,
                      "explicit": explicit, "verdicts": verdicts},
            "envelope": envelope.to_manifest() if envelope else None,
            "check_vectors": checks.write(writer),
            "engines": engine_entries,
            "inputs_skipped": {"calibration": calib.skipped if calib else [], "validation": val.skipped if val else []},
            "conversion_seconds": round(time.monotonic() - started, 2),
        }
        if report is not None:
            manifest["reports"] = {"accuracy_json": writer.add_json(report.to_manifest(), "reports/accuracy.json"),
                                   "accuracy_table": writer.add_file(report.table().encode() + b"\n",
                                                                     "reports/accuracy.txt")}
        bundle = writer.commit(manifest, sign_key=sign_key)
    return ConversionResult(Path(bundle.path), imported, report, calibration_summary,
                            engine_entries, failures, bundle.manifest)


#: The INT8 graphs a bundle carries, from one calibration: TensorRT's Q/DQ placement (the engines' source; OpenVINO
#: runs it with int8 kernels) and ONNX Runtime's (its CPU provider fuses only its own placement).
INT8_GRAPHS = (("int8", "tensorrt"), ("int8-ort", "onnxruntime"))


def _precision_graphs(fp32_path: Path, precisions: Sequence[str], work: Path,
                      quantize: Callable[[Path, str], CalibrationSummary], unit: str,
                      log: Callable[[str], None]) -> tuple[dict, dict, Optional[CalibrationSummary]]:
    """Every precision graph of the bundle (graph name -> file), its manifest entries, and the calibration summary.

    Shared by the classification and segmentation conversions; ``quantize(out_path, target)`` writes one INT8
    graph from the task's own calibration inputs (``unit`` names them in the log: images, windows).
    """
    graphs = {"fp32": Path(fp32_path)}
    graph_meta = {"fp32": {"precision": "fp32", "target": "any", "input_dtype": "float32", "output_dtype": "float32"}}
    calibration_summary = None
    if "fp16" in precisions:
        info = make_fp16(fp32_path, work / "model.fp16.onnx")
        graphs["fp16"] = work / "model.fp16.onnx"
        graph_meta["fp16"] = {"precision": "fp16", "target": "any", "input_dtype": info["input_dtype"],
                              "output_dtype": info["output_dtype"]}
    if "int8" in precisions:
        for graph, target in INT8_GRAPHS:
            summary = quantize(work / f"model.{graph}.onnx", target)
            graphs[graph] = work / f"model.{graph}.onnx"
            graph_meta[graph] = {"precision": "int8", "target": target, "input_dtype": "float32",
                                 "output_dtype": "float32", "quantization": summary.to_manifest()}
            calibration_summary = calibration_summary or summary
            log(f"    INT8 for {target}: {summary.method} calibration on {summary.images} {unit}, "
                f"{summary.quantized_tensors} tensors quantised")
    return graphs, graph_meta, calibration_summary


def _build_engines(graphs: dict, precisions: Sequence[str], engine: str, work: Path, batch: Sequence[int],
                   log: Callable[[str], None], **options: Any) -> list:
    """One engine per precision graph (``engine`` "none": none); ``options`` go to build_engine."""
    if engine == "none":
        log("4/5 no engines (--engine none)")
        return []
    from .engine import build_engine

    log(f"4/5 building {engine} engines")
    engines = []
    for precision in precisions:
        info = build_engine(graphs[precision], work / f"model.{precision}.{engine}.engine", flavour=engine,
                            precision=precision, batch=batch, **options)
        engines.append(info)
        log(f"    {precision}: {info.size_bytes / 1e6:.2f} MB, layers {info.layer_precisions}, "
            f"{info.build_seconds:.1f} s")
    return engines


def _add_artifacts(writer, graphs: dict, graph_meta: dict, engines: list) -> list:
    """Graph and engine files into the bundle; each graph's manifest entry gets its file; the engines' entries."""
    for precision, path in graphs.items():
        graph_meta[precision]["file"] = writer.add_file(path, f"models/{path.name}")
    entries = []
    for info in engines:
        entry = info.to_manifest()
        entry["file"] = writer.add_file(Path(info.file), f"engines/{Path(info.file).name}")
        if info.layers_file:
            entry["layers_file"] = writer.add_file(Path(info.layers_file), f"engines/{Path(info.layers_file).name}")
        entries.append(entry)
    return entries


@dataclass(frozen=True)
class _GateOptions:
    enabled: bool
    limits: dict  # name -> value given by the caller (None: the task's default)
    check_inputs: Any
    check_vector_count: int
    operating_point: Optional[str] = None
    explain: bool = False


def _check_vectors(options, spec, val, calib, graphs, task, report, progress) -> CheckVectors:
    """The bundle's check vectors: given inputs, else chosen from the validation (else calibration) set."""
    from .validate import run_graph

    if options.check_inputs is not None:
        given = load_inputs(options.check_inputs, spec, what="check vector", progress=progress)
        candidates, source = given.array, f"given ({Path(given.source).name})"
    elif val is not None:
        candidates, source = val.array, "validation set"
    elif calib is not None:
        candidates, source = calib.array, "calibration set"
    else:
        raise ConversionError("the bundle needs check vectors: give --val, --calib or --check-inputs")
    if len(candidates) > 4096:  # choosing needs FP32 outputs of each candidate; a few thousand is plenty
        candidates = candidates[np.linspace(0, len(candidates) - 1, 4096).round().astype(np.int64)]
    reference = run_graph(graphs["fp32"], candidates, 8)
    errors = {graph: (max((r.max_abs_error for r in report.results if r.precision == graph and r.measured),
                          default=None) if report is not None else None) for graph in graphs}
    count = options.check_vector_count if options.check_inputs is None else min(len(candidates), 256)
    return CheckVectors.choose(candidates, reference, task, errors, source, count=count)


def _choose_operating_point(task, fp32_graph, inputs, labels, text, log):
    """The task with its decision threshold set from FP32's validation scores, and the operating point."""
    from .operating_point import choose_operating_point, parse_operating_point
    from .validate import run_graph

    target, goal = parse_operating_point(text)
    if not getattr(task, "binary", False):
        raise ConversionError("--operating-point needs a binary task: two softmax classes or one sigmoid output")
    outputs = run_graph(fp32_graph, inputs, 8)
    positive_index = task.positive_index if task.classes > 1 else 1
    point = choose_operating_point(task.positive_scores(outputs), labels == positive_index, target, goal)
    log("    " + point.describe())
    return dataclasses.replace(task, threshold=point.threshold), point


def _default_name(model: Any) -> str:
    if isinstance(model, (str, Path)):
        return Path(model).stem
    return type(model).__name__


# ---------------------------------------------------------------------------
# Segmentation


#: The check vectors' FP32 outputs of a segmentation bundle stay below this (a window's outputs are
#: classes x window voxels; a dozen classes over a 96^3 window are 40 MB each).
_SEG_CHECK_BYTES = 32 << 20
#: Calibration windows kept (evenly over all the windows of all calibration series) at most ...
_SEG_MAX_CALIBRATION_WINDOWS = 256
#: ... and within this many bytes of float32 inputs.
_SEG_CALIBRATION_BYTES = 512 << 20


def _convert_segmentation(model, output: Path, *, volume_spec, spec, roi, overlap, sw_mode, sigma_scale, sw_batch,
                          threshold, calibration, validation, labels, precisions, batch, engine, name, version,
                          class_labels, activation, calibration_method, min_calibration_images, example_input,
                          compute_capabilities, workspace_bytes, optimization_level, timing_cache, sign_key,
                          overwrite, gates, min_dice, max_probability_error, classification_only,
                          check_vector_count, progress, log, started) -> ConversionResult:
    """The segmentation task: series folders in, sliding-window accuracy report, 5-D graphs and engines."""
    from ..bundle import BundleWriter
    from ..volume import VolumeSpec

    if not isinstance(volume_spec, VolumeSpec):
        raise ConversionError("task='segmentation' needs volume_spec=medge.VolumeSpec(...) (--volume-spec FILE "
                              "or the volume flags): how a series becomes the network's input grid")
    if spec is not None:
        raise ConversionError("a segmentation bundle takes a volume spec, not a 2-D PreprocessSpec (spec=)")
    given = [key for key, value in classification_only.items() if value is not None]
    if given:
        raise ConversionError(f"{', '.join(given)} apply to classification; segmentation is gated with "
                              "min_dice / max_probability_error (--min-dice, --max-probability-error)")
    if labels is not None:
        raise ConversionError("--labels (a CSV of class labels) applies to classification; the segmentation "
                              "report compares every precision's masks with FP32's")
    if volume_spec.roi_size is not None and volume_spec.roi_fit == "crop_or_pad":
        _LOG.info("the volume spec crops to its ROI: the sliding window then covers one window per series")
    precisions = list(dict.fromkeys(["fp32", *precisions]))
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ConversionError(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
    if engine not in ENGINE_FLAVOURS:
        raise ConversionError(f"engine must be one of {', '.join(ENGINE_FLAVOURS)}, got {engine!r}")
    batch = tuple(int(b) for b in batch)
    if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise ConversionError(f"batch must be (min, opt, max) with 1 <= min <= opt <= max, got {batch}")
    sw_batch = batch[1] if sw_batch is None else int(sw_batch)
    if not 1 <= sw_batch <= batch[2]:
        raise ConversionError(f"the sliding-window batch must be within 1..{batch[2]} (the profile's max), "
                              f"got {sw_batch}")
    if "int8" in precisions and calibration is None:
        raise ConversionError("int8 needs calibration series (--calib DIR): CT/MR series like deployment data")
    if calibration is None and validation is None:
        raise ConversionError("give validation series (--val) or at least calibration series (--calib): the "
                              "check vectors and the validated input envelope are taken from them")
    if not 1 <= int(check_vector_count) <= 256:
        raise ConversionError(f"check_vector_count must be within 1..256, got {check_vector_count}")
    if engine == "tensorrt_rtx":
        from .engine import check_rtx_targets

        compute_capabilities = check_rtx_targets(compute_capabilities)
    if not gates and (min_dice is not None or max_probability_error is not None):
        raise ConversionError("gate limits were given together with --no-gates; give one or the other")
    if min_dice is not None and not 0.0 <= float(min_dice) <= 1.0:
        raise ConversionError(f"min_dice must be within 0..1, got {min_dice}")
    if output.exists() and not overwrite:
        raise ConversionError(f"{output} already exists; choose another name or pass --overwrite")
    writer = BundleWriter(output, overwrite=overwrite)
    try:
        return _segmentation_bundle(
            writer, model, output, volume_spec, roi, overlap, sw_mode, sigma_scale, sw_batch, threshold, calibration,
            validation, precisions, batch, engine, name, version, class_labels, activation, calibration_method,
            min_calibration_images, example_input, compute_capabilities, workspace_bytes, optimization_level,
            timing_cache, sign_key, gates, {"min_dice": min_dice, "max_probability_error": max_probability_error},
            int(check_vector_count), progress, log, started)
    except BaseException:
        writer.abort()
        raise


def _segmentation_bundle(writer, model, output, volume_spec, roi, overlap, sw_mode, sigma_scale, sw_batch, threshold,
                         calibration, validation, precisions, batch, engine, name, version, class_labels, activation,
                         calibration_method, min_calibration_images, example_input, compute_capabilities,
                         workspace_bytes, optimization_level, timing_cache, sign_key, gates_enabled, given_limits,
                         check_vector_count, progress, log, started) -> ConversionResult:
    from ..segmentation import read_volumes, window_inputs
    from ..tasks import SegmentationTask
    from .validate import evaluate_volumes, run_graph

    with tempfile.TemporaryDirectory(prefix="medge-convert-") as tmp:
        work = Path(tmp)
        calib = read_volumes(calibration, volume_spec, what="calibration", log=log) if calibration is not None else None
        val = read_volumes(validation, volume_spec, what="validation", log=log) if validation is not None else None
        some = (calib or val).arrays[0]

        log("1/5 importing the model")
        imported = _import_segmentation_model(model, work, example_input, roi, some, volume_spec)
        task = SegmentationTask.for_outputs(imported.outputs[0].shape, imported.input.shape, labels=class_labels,
                                            activation=activation, threshold=threshold, roi=roi, overlap=overlap,
                                            mode=sw_mode, sigma_scale=sigma_scale, sw_batch=sw_batch)
        channels = int(imported.input.shape[1])
        if channels != some.shape[0]:
            raise ConversionError(
                f"the model takes {channels} channel(s) but the volume spec makes {some.shape[0]} "
                f"({'2k + 1 with neighbours k' if volume_spec.neighbours else 'one per voxel, neighbours 0'}): "
                "fix the spec's neighbours or the model")
        if task.spatial_dims == 3 and volume_spec.neighbours:
            raise ConversionError("2.5-D input (neighbours > 0) feeds 2-D networks; this network is 3-D")
        log(f"    {task.spatial_dims}-D network, window {task.roi}, {task.classes} output channels "
            f"({task.activation}), labels {', '.join(task.labels)}")
        if imported.torch_check:
            log(f"    ONNX Runtime vs PyTorch on {imported.torch_check['samples']} inputs: max abs error "
                f"{imported.torch_check['max_abs_error']:.3g}")

        log("2/5 making precision graphs: " + ", ".join(precisions))
        windows = None
        if "int8" in precisions:
            windows = _calibration_windows(calib.arrays, task, batch[1])
            if len(windows) < min_calibration_images:
                raise ConversionError(
                    f"the calibration series give {len(windows)} sliding windows of {task.roi}; INT8 calibration "
                    f"needs at least {min_calibration_images} (more calibration series, a larger --overlap, or "
                    "--min-calibration-images N knowingly: each window is a whole network input)")
            log(f"    calibration: {len(windows)} windows of {task.roi} from {len(calib.arrays)} series (the "
                "windows the sliding window feeds)")

        def quantize(out_path: Path, target: str) -> CalibrationSummary:
            return _make_int8_any_rank(imported.onnx_path, out_path, windows, work, method=calibration_method,
                                       batch_size=batch[1], min_images=min_calibration_images, source=calib.source,
                                       target=target, progress=progress)

        graphs, graph_meta, calibration_summary = _precision_graphs(imported.onnx_path, precisions, work, quantize,
                                                                    "windows", log)

        limits = {key: default if given_limits.get(key) is None else float(given_limits[key])
                  for key, default in task.default_gates.items()}
        report = None
        if val is not None:
            log(f"3/5 measuring accuracy on {len(val.arrays)} validation series (whole volumes through the sliding "
                f"window) at batch {', '.join(map(str, sorted(set(batch))))}")
            report = evaluate_volumes(graphs, val.arrays, task, batch_sizes=sorted(set(batch)), progress=progress)
        else:
            log("3/5 no validation series (--val): accuracy not measured; only fp32 will run by default")
        verdicts, failures = gate_verdicts(report, graphs, task, limits, enabled=gates_enabled,
                                           no_report_reason="no validation series (--val)")
        explicit = [key for key, value in given_limits.items() if value is not None]
        if gates_enabled and report is None and explicit:
            failures.append("accuracy gates were given but there is no validation set (--val)")
        for graph, verdict in verdicts.items():
            log(f"    {graph}: {verdict['verdict']}" + (f" ({'; '.join(verdict['reasons'])})" if verdict["reasons"]
                                                         and verdict["verdict"] != "ungated" else ""))

        source_set = val if val is not None else calib
        candidates = np.concatenate([window_inputs(a, task) for a in source_set.arrays])
        if len(candidates) > 512:
            candidates = candidates[np.linspace(0, len(candidates) - 1, 512).round().astype(np.int64)]
        reference = run_graph(graphs["fp32"], candidates, batch[2])
        per_window = reference[0].nbytes
        count = max(1, min(int(check_vector_count), _SEG_CHECK_BYTES // max(per_window, 1)))
        errors = {graph: (max((r.max_abs_error for r in report.results if r.precision == graph and r.measured),
                              default=None) if report is not None else None) for graph in graphs}
        checks = CheckVectors.choose(candidates, reference, task, errors,
                                     "validation set" if val is not None else "calibration set", count=count)
        sets = [(what, s) for what, s in (("calibration", calib), ("validation", val)) if s is not None]
        envelope = Envelope.observe([h for _, s in sets for h in s.headers], [what for what, _ in sets], unit="series")

        engines = _build_engines(graphs, precisions, engine, work, batch, log, workspace_bytes=workspace_bytes,
                                 optimization_level=optimization_level, timing_cache_path=timing_cache,
                                 compute_capabilities=compute_capabilities)
        log(f"5/5 writing the bundle {output}")
        engine_entries = _add_artifacts(writer, graphs, graph_meta, engines)
        manifest = {
            "model": {"name": name or _default_name(model), "version": str(version), "source": imported.source,
                      "opset": imported.opset, "export_check": imported.torch_check},
            "inputs": [t.to_manifest() for t in imported.inputs],
            "outputs": [t.to_manifest() for t in imported.outputs],
            # "kind" tells the runtime and the schema check which spec this is (a 2-D PreprocessSpec has none).
            "preprocess": {"kind": "volume", **volume_spec.to_dict()},
            "task": task.to_manifest(),
            "operating_point": None,
            "explanation": None,
            "labels": list(task.labels),
            "postprocess": {"activation": task.activation, "positive_class": None},
            "profile": {"min": batch[0], "opt": batch[1], "max": batch[2]},
            "graphs": graph_meta,
            "calibration": calibration_summary.to_manifest() if calibration_summary else None,
            "accuracy": report.to_manifest() if report else None,
            "gates": {"enabled": gates_enabled, "passed": not failures, "failures": failures, "limits": limits,
                      "explicit": explicit, "verdicts": verdicts},
            "envelope": envelope.to_manifest() if envelope else None,
            "check_vectors": checks.write(writer),
            "engines": engine_entries,
            "inputs_skipped": {"calibration": calib.skipped if calib else [], "validation": val.skipped if val else []},
            "conversion_seconds": round(time.monotonic() - started, 2),
        }
        if report is not None:
            manifest["reports"] = {"accuracy_json": writer.add_json(report.to_manifest(), "reports/accuracy.json"),
                                   "accuracy_table": writer.add_file(report.table().encode() + b"\n",
                                                                     "reports/accuracy.txt")}
        bundle = writer.commit(manifest, sign_key=sign_key)
    return ConversionResult(Path(bundle.path), imported, report, calibration_summary, engine_entries, failures,
                            bundle.manifest)


def _import_segmentation_model(model, work: Path, example_input, roi, some: np.ndarray, volume_spec) -> ImportedModel:
    """The FP32 ONNX graph of a 2-D or 3-D segmentation network (a torch module needs a window-sized example)."""
    samples = None
    if example_input is None and not isinstance(model, (str, Path)):
        if roi is None:
            raise ConversionError("a torch module records no input size: give roi=(D, H, W) (or (H, W) for a 2-D "
                                  "network) or example_input")
        # Real windows, not zeros: normalisation layers (instance norm) are ill-conditioned on constant input,
        # and the ONNX vs PyTorch comparison must see what the network will see.
        example_input = samples = _centre_windows(some, [int(r) for r in roi])
    elif example_input is not None:
        samples = np.asarray(example_input, dtype=np.float32)[:2]
    elif Path(model).suffix.lower() != ".onnx":
        # torch.export / TorchScript files: compared with ONNX Runtime on real windows too.
        window = [int(r) for r in roi] if roi is not None else _recorded_window(Path(model))
        if window is not None:
            samples = _centre_windows(some, window)
            if Path(model).suffix.lower() != ".pt2":
                example_input = samples
    try:
        return import_model(model, work, example_input=example_input, sample_inputs=samples, spatial_dims=(2, 3))
    except ConversionError as exc:
        if example_input is None or isinstance(model, (str, Path)):
            raise
        channels = int(np.asarray(example_input).shape[1])
        raise ConversionError(
            f"the network was exported on windows of the volume spec, {channels} channel(s) ("
            f"{'2k + 1 with neighbours k = ' + str(volume_spec.neighbours) if volume_spec.neighbours else 'neighbours 0'}"
            f"): if it takes another channel count, fix the spec's neighbours. {exc}") from None


def _recorded_window(path: Path):
    """The spatial input size a torch.export program records (None for other files)."""
    if path.suffix.lower() != ".pt2":
        return None
    from .export import _example_for, _load_exported_program

    return [int(d) for d in _example_for(_load_exported_program(path), "torch.export", None).shape[2:]]


def _centre_windows(array: np.ndarray, roi: list) -> np.ndarray:
    """Two windows of ``roi`` from a (C, D, H, W) input (centre and corner; padded where it is smaller)."""
    window = roi if len(roi) == 3 else [1, *roi]
    pads = [(0, 0)] + [(0, max(r - n, 0)) for n, r in zip(array.shape[1:], window)]
    data = np.pad(array, pads)
    picks = []
    for start in ([(n - r) // 2 for n, r in zip(data.shape[1:], window)], [0, 0, 0]):
        picks.append(data[(slice(None), *(slice(a, a + r) for a, r in zip(start, window)))])
    windows = np.stack(picks)
    return np.ascontiguousarray(windows[:, :, 0] if len(roi) == 2 else windows, dtype=np.float32)


def _calibration_windows(arrays: list, task, batch_size: int) -> np.ndarray:
    """The windows the sliding window feeds the network, from every calibration series, evenly thinned to
    at most _SEG_MAX_CALIBRATION_WINDOWS (and _SEG_CALIBRATION_BYTES), and to a multiple of the calibration
    batch: ONNX Runtime's entropy and percentile calibrators fail on a last, smaller batch (numpy's
    "inhomogeneous shape" ValueError when they stack the per-batch histograms)."""
    from ..segmentation import window_inputs

    windows = np.concatenate([window_inputs(a, task) for a in arrays])
    limit = max(1, min(_SEG_MAX_CALIBRATION_WINDOWS, _SEG_CALIBRATION_BYTES // max(windows[0].nbytes, 1)))
    limit = min(limit, len(windows))
    if limit >= batch_size:
        limit -= limit % batch_size
    if len(windows) > limit:
        windows = windows[np.linspace(0, len(windows) - 1, limit).round().astype(np.int64)]
    return np.ascontiguousarray(windows)


def _make_int8_any_rank(fp32_path: Path, out_path: Path, windows: np.ndarray, work: Path, **kwargs) -> CalibrationSummary:
    """make_int8 for 4-D inputs as it is; for 5-D (3-D networks) through a graph whose input is folded to 4-D.

    medge.convert.precision.make_int8 takes (N, C, H, W) calibration inputs only. A 3-D network's graph gets a
    4-D input (N, C, D, H*W) followed by a Reshape to (N, C, D, H, W); it is calibrated and quantised as is, and
    the quantised graph's input is declared 5-D again: the Reshape (to -1, C, D, H, W) is then a no-op on the
    5-D input, and the Q/DQ placed on the input (per tensor) does not depend on its shape.
    """
    if windows.ndim == 4:
        return make_int8(fp32_path, out_path, windows, **kwargs)
    folded = work / (Path(out_path).stem + ".folded-input.onnx")
    dims = _fold_input(fp32_path, folded)
    flat = windows.reshape(len(windows), dims[0], dims[1], dims[2] * dims[3])
    summary = make_int8(folded, out_path, flat, **kwargs)
    _unfold_input(out_path, dims)
    folded.unlink(missing_ok=True)
    return summary


def _fold_input(fp32_path: Path, out_path: Path) -> tuple:
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(fp32_path))
    graph = model.graph
    entry = graph.input[0]
    dims = [d.dim_value for d in entry.type.tensor_type.shape.dim][1:]  # C, D, H, W
    inner = entry.name + "__medge_5d"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == entry.name:
                node.input[i] = inner
    for out in graph.output:  # an identity network: the input is an output
        if out.name == entry.name:
            raise ConversionError("the network's output is its input; nothing to quantise")
    shape = numpy_helper.from_array(np.array([-1, *dims], dtype=np.int64), name=entry.name + "__medge_5d_shape")
    graph.initializer.append(shape)
    graph.node.insert(0, helper.make_node("Reshape", [entry.name, shape.name], [inner], name="medge_unfold_input"))
    tensor_dims = entry.type.tensor_type.shape.dim
    tensor_dims[3].dim_value = dims[2] * dims[3]
    del tensor_dims[4]
    del graph.value_info[:]
    onnx.save(model, str(out_path))
    return tuple(dims)


def _unfold_input(path: Path, dims: tuple) -> None:
    import onnx

    model = onnx.load(str(path))
    tensor_dims = model.graph.input[0].type.tensor_type.shape.dim
    tensor_dims[3].dim_value = dims[2]
    tensor_dims.add().dim_value = dims[3]
    del model.graph.value_info[:]  # shapes inferred for the folded input; recomputed by every runtime
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
