"""Accuracy of every precision against FP32, measured by running it.

For each precision graph and each batch size of the optimisation profile
(1, opt, max: TensorRT engines are known to disagree across profile points),
the validation inputs are run and compared with the FP32 graph at batch 1:
max / mean absolute error of the raw outputs, top-1 agreement, and, with
labels, accuracy, sensitivity, specificity and ROC AUC (and its drop from
FP32). A graph that nothing here can execute is reported as "not measured"
with the reason, never guessed.

Execution is every CPU engine installed: ONNX Runtime's CPU provider (the
reference, FP32 at batch 1, always runs on it) and OpenVINO when it is
installed, each row saying which engine ran it (``executed_by``). ONNX
Runtime runs the FP32 and the INT8 Q/DQ graphs on any machine. For the FP16
graph it executes float16 weights and float16 tensors between nodes, so
rounding to fp16 is measured. Inside a node a CPU kernel may accumulate in
float32, as GPU fp16 kernels usually do too. OpenVINO runs each graph as
medge's runtime does (the same backend class and settings: dynamic batch,
f32 inference precision), so its rows are what ``medge.load`` will run; a
graph it cannot compile (or that crashes it, in a child process) is "not
measured" on it, with the reason.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .._progress import Progress
from ..errors import ConversionError
from ..tasks import Task
from ..tasks.classification import ClassificationTask, roc_auc
from .export import ort_session

REFERENCE_PRECISION = "fp32"


@dataclass
class PrecisionResult:
    """One precision at one batch size, compared with FP32 at batch 1."""

    precision: str
    batch_size: int
    measured: bool
    reason: Optional[str] = None
    executed_by: Optional[str] = None
    images: int = 0
    max_abs_error: Optional[float] = None
    mean_abs_error: Optional[float] = None
    top1_agreement: Optional[float] = None
    accuracy: Optional[float] = None
    sensitivity: Optional[float] = None
    specificity: Optional[float] = None
    auc: Optional[float] = None
    auc_drop: Optional[float] = None
    balanced_accuracy: Optional[float] = None
    pr_auc: Optional[float] = None
    per_class_recall: Optional[list] = None
    confusion_matrix: Optional[list] = None  # rows: true class, columns: decided class
    heatmap_correlation: Optional[float] = None  # --explain: mean correlation of the maps with FP32's
    # Segmentation: per label 1.. (None: absent from both masks), pooled over the validation volumes.
    dice: Optional[list] = None
    min_dice: Optional[float] = None
    max_probability_error: Optional[float] = None
    voxel_agreement: Optional[float] = None


@dataclass
class AccuracyReport:
    reference: str
    images: int
    labelled: bool
    activation: str
    positive_class: Optional[str]
    results: list[PrecisionResult] = field(default_factory=list)
    kind: str = "classification"  # the task's kind: which columns the table shows
    labels: list = field(default_factory=list)  # segmentation: label names, background first

    def to_manifest(self) -> dict:
        data = asdict(self)
        data["results"] = [asdict(r) for r in self.results]
        return data

    def result(self, precision: str, batch_size: int) -> Optional[PrecisionResult]:
        return next((r for r in self.results if r.precision == precision and r.batch_size == batch_size), None)

    def table(self) -> str:
        """The report as an aligned text table."""
        if self.kind == "segmentation":
            return self._segmentation_table()
        header = ["precision", "batch", "max|err|", "mean|err|", "top-1 agr", "accuracy", "bal acc", "sens", "spec",
                  "AUC", "AUC drop", "PR-AUC", "CAM r"]
        rows = []
        for r in self.results:
            if not r.measured:
                rows.append([r.precision, str(r.batch_size), f"not measured: {r.reason}"])
                continue
            rows.append([r.precision, str(r.batch_size), _fmt(r.max_abs_error, ".2e"), _fmt(r.mean_abs_error, ".2e"),
                         _fmt(r.top1_agreement, ".2%"), _fmt(r.accuracy, ".2%"), _fmt(r.balanced_accuracy, ".2%"),
                         _fmt(r.sensitivity, ".2%"), _fmt(r.specificity, ".2%"), _fmt(r.auc, ".4f"),
                         _fmt(r.auc_drop, "+.4f"), _fmt(r.pr_auc, ".4f"), _fmt(r.heatmap_correlation, ".4f")])
        return _aligned(header, rows)


    def _segmentation_table(self) -> str:
        names = list(self.labels[1:])
        header = ["precision", "batch", "engine", "max|err|", "max|p err|", "voxel agr", "min Dice",
                  *[f"Dice {n}" for n in names]]
        rows = []
        for r in self.results:
            engine = (r.executed_by or "").replace(" CPU", "")
            if not r.measured:
                rows.append([r.precision, str(r.batch_size), engine, f"not measured: {r.reason}"])
                continue
            rows.append([r.precision, str(r.batch_size), engine, _fmt(r.max_abs_error, ".2e"),
                         _fmt(r.max_probability_error, ".2e"), _fmt(r.voxel_agreement, ".4%"),
                         _fmt(r.min_dice, ".4f"), *[_fmt(d, ".4f") for d in (r.dice or [None] * len(names))]])
        return _aligned(header, rows)


def _aligned(header: list, rows: list) -> str:
    """Columns padded to their widest cell; a short row (its key cells, then a note) keeps its note unpadded."""
    widths = [max([len(header[i])] + [len(row[i]) for row in rows if len(row) == len(header)])
              for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    for row in rows:
        if len(row) == len(header):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1])
    return "\n".join(lines)


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ---------------------------------------------------------------------------
# Metrics: the task's (kept here under their old names for callers of the report)


def classification_metrics(outputs: np.ndarray, labels: np.ndarray, activation: str, positive_index: int) -> dict:
    """Accuracy, sensitivity, specificity and AUC of (N, classes) outputs: the classification task's metrics."""
    classes = int(np.asarray(outputs).reshape(len(outputs), -1).shape[1])
    names = tuple(f"class{i}" for i in range(max(classes, 2) if classes == 1 else classes))
    task = ClassificationTask(classes=classes, labels=names, activation=activation,
                              positive_class=names[positive_index] if classes > 1 else None)
    return task.metrics(outputs, labels)


# ---------------------------------------------------------------------------
# Labels


def read_labels(csv_path: Path, keys: Sequence[Sequence[str]], class_labels: Sequence[str]) -> np.ndarray:
    """Labels for the validation images from a CSV file.

    The CSV needs a header with a ``label`` column (a class index or a class
    name) and a key column: ``filename``, ``file`` or ``sop_instance_uid``.
    ``keys[i]`` lists the names image i may be found under (file name, SOP
    Instance UID).

    Raises:
        ConversionError: unreadable CSV, missing columns, an unknown class,
            or an image with no label.
    """
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ConversionError(f"cannot read the labels file {csv_path}: {exc.strerror}") from exc
    if not rows or "label" not in rows[0]:
        raise ConversionError(f"{Path(csv_path).name} needs a header row with a 'label' column")
    key_columns = [c for c in ("filename", "file", "sop_instance_uid") if c in rows[0]]
    if not key_columns:
        raise ConversionError(f"{Path(csv_path).name} needs a 'filename' or 'sop_instance_uid' column")
    names = {name: i for i, name in enumerate(class_labels)}
    table: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        raw = (row.get("label") or "").strip()
        if raw in names:
            value = names[raw]
        else:
            try:
                value = int(raw)
            except ValueError:
                raise ConversionError(
                    f"{Path(csv_path).name} line {line}: label {raw!r} is neither a class index nor one of "
                    f"{list(class_labels)}"
                ) from None
            if class_labels and not 0 <= value < len(class_labels):
                raise ConversionError(f"{Path(csv_path).name} line {line}: class index {value} out of range")
        for column in key_columns:
            if row.get(column):
                table[row[column].strip()] = value
    labels = []
    for image_keys in keys:
        found = next((table[k] for k in image_keys if k in table), None)
        if found is None:
            raise ConversionError(f"no label in {Path(csv_path).name} for {image_keys[0]}")
        labels.append(found)
    return np.asarray(labels, dtype=np.int64)


# ---------------------------------------------------------------------------
# Running


#: CPU engines the accuracy report can run graphs on, in report order (the first is the reference's).
CPU_ENGINES = ("onnxruntime", "openvino")
_EXECUTED_BY = {"onnxruntime": "onnxruntime CPU", "openvino": "openvino CPU"}


def installed_cpu_engines() -> list[str]:
    """The CPU engines installed here: ONNX Runtime, and OpenVINO when its package is present."""
    import importlib.util

    return [e for e in CPU_ENGINES if e == "onnxruntime" or importlib.util.find_spec(e) is not None]


def openvino_runner(path: Path, max_batch: int):
    """An OpenVINO backend for graph ``path`` set up as ``medge.load`` sets it up (its compile isolated).

    Raises:
        ConversionError: OpenVINO cannot read, compile or run it (with OpenVINO's reason).
    """
    from ..errors import BackendUnavailable
    from ..runtime.backends.openvino import OpenVINOBackend

    try:
        return OpenVINOBackend(Path(path).read_bytes(), precision=Path(path).stem, max_batch=max_batch)
    except BackendUnavailable as exc:
        raise ConversionError(f"OpenVINO cannot run {Path(path).name}: {exc}") from None


def run_graph(path: Path, inputs: np.ndarray, batch_size: int, progress: Optional[Progress] = None, *,
              extra_output: Optional[str] = None, runner=None):
    """Outputs of graph ``path`` on ``inputs`` in batches of ``batch_size`` (last batch may be smaller).

    Returns the first output, float32; with ``extra_output`` (e.g. the class
    activation maps), the pair (first output, that output). ``runner``: a
    runtime backend (e.g. from :func:`openvino_runner`) to run instead of
    ONNX Runtime; its ``max_batch`` must be at least ``batch_size``.
    """
    if runner is not None:
        return _run_backend(runner, inputs, batch_size, progress, extra_output)
    session = ort_session(path)
    meta = session.get_inputs()[0]
    dtype = np.float16 if meta.type == "tensor(float16)" else np.float32
    names = [session.get_outputs()[0].name] + ([extra_output] if extra_output else [])
    outputs: list = [[] for _ in names]
    for start in range(0, len(inputs), batch_size):
        batch = np.ascontiguousarray(inputs[start : start + batch_size], dtype=dtype)
        for collected, value in zip(outputs, session.run(names, {meta.name: batch})):
            collected.append(value.astype(np.float32))
        if progress is not None:
            progress.update(len(batch))
    joined = [np.concatenate(collected) for collected in outputs]
    return (joined[0], joined[1]) if extra_output else joined[0]


def _run_backend(backend, inputs: np.ndarray, batch_size: int, progress: Optional[Progress],
                 extra_output: Optional[str]):
    first = backend.outputs[0].name
    outputs: list = [[], []]
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        backend.load_input(np.ascontiguousarray(batch, dtype=backend.input.dtype))
        try:
            every = backend.execute_all(len(batch)) if extra_output else {first: backend.execute(len(batch))}
        except ConversionError:
            raise
        except Exception as exc:  # noqa: BLE001 - an engine's own error types: this graph is not measured on it
            raise ConversionError(f"{backend.name} failed running it: {type(exc).__name__}: {exc}") from None
        if extra_output and extra_output not in every:
            raise ConversionError(f"the graph run by {backend.name} has no output {extra_output!r} "
                                  f"(it has {', '.join(every)})")
        outputs[0].append(every[first])
        if extra_output:
            outputs[1].append(every[extra_output])
        if progress is not None:
            progress.update(len(batch))
    if extra_output:
        return np.concatenate(outputs[0]), np.concatenate(outputs[1])
    return np.concatenate(outputs[0])


def evaluate(
    graphs: dict[str, Path],
    inputs: np.ndarray,
    *,
    batch_sizes: Iterable[int],
    labels: Optional[np.ndarray] = None,
    task: Optional[Task] = None,
    class_labels: Sequence[str] = (),
    activation: str = "softmax",
    positive_class: Optional[str] = None,
    progress: Optional[bool] = None,
    engines: Optional[Sequence[str]] = None,
) -> AccuracyReport:
    """Run every precision graph at every batch size on every CPU engine, and compare with FP32 at batch 1.

    Args:
        graphs: precision name -> ONNX path; must include "fp32".
        inputs: (N, C, H, W) float32 validation inputs from medge's preprocessing.
        batch_sizes: e.g. (1, opt, max) of the optimisation profile.
        labels: optional (N,) class indices.
        task: what the outputs mean (compares and scores them). Default: a
            classification task built from the FP32 outputs, ``class_labels``,
            ``activation`` and ``positive_class``.
        progress: progress line (None: when stderr is a terminal).
        engines: CPU engines to run every graph on, "onnxruntime" first (it
            runs the reference); None: every one installed
            (:func:`installed_cpu_engines`). Each row names its engine in
            ``executed_by``.

    Returns:
        AccuracyReport.
    """
    if REFERENCE_PRECISION not in graphs:
        raise ConversionError("the accuracy report needs the fp32 graph as its reference")
    if inputs.ndim != 4 or len(inputs) == 0:
        raise ConversionError(f"validation inputs must be a non-empty (N, C, H, W) array, got {inputs.shape}")
    batch_sizes = sorted(set(int(b) for b in batch_sizes))
    engines = installed_cpu_engines() if engines is None else list(dict.fromkeys(engines))
    if not engines or engines[0] != CPU_ENGINES[0] or any(e not in CPU_ENGINES for e in engines):
        raise ConversionError(f"engines must start with onnxruntime (the reference runs on it) and come from "
                              f"{', '.join(CPU_ENGINES)}; got {engines}")
    order = [REFERENCE_PRECISION] + [p for p in graphs if p != REFERENCE_PRECISION]
    bar = Progress("validating", len(order) * len(engines) * len(batch_sizes) * len(inputs), enabled=progress)
    reference = reference_maps = None
    reference_metrics: dict = {}
    report = None
    heatmap = getattr(task, "heatmap_output", None)
    try:
        for precision, engine in ((p, e) for p in order for e in engines):
            runner, unusable = None, None
            if engine == "openvino":  # compiled once per graph (in a child first), run at every batch size
                try:
                    runner = openvino_runner(graphs[precision], max(batch_sizes))
                except ConversionError as exc:
                    unusable = exc
            for batch in batch_sizes:
                try:
                    if unusable is not None:
                        raise unusable
                    outputs = run_graph(graphs[precision], inputs, batch, bar, extra_output=heatmap, runner=runner)
                    outputs, maps = outputs if heatmap else (outputs, None)
                except ConversionError as exc:
                    if precision == REFERENCE_PRECISION and engine == engines[0]:
                        raise
                    reason = (f"ONNX Runtime's CPU provider cannot run it here ({str(exc)[:300]}); it is measured "
                              "where its engine runs" if engine == "onnxruntime" else str(exc)[:400])
                    report.results.append(PrecisionResult(precision, batch, measured=False,
                                                          executed_by=_EXECUTED_BY[engine], reason=reason))
                    bar.update(len(inputs))
                    continue
                if reference is None:
                    reference, reference_maps = outputs, maps
                    if task is None:
                        task = ClassificationTask.for_outputs(outputs.shape, labels=class_labels,
                                                              activation=activation, positive_class=positive_class)
                    positive = getattr(task, "positive_class", None) or (
                        task.labels[task.positive_index] if getattr(task, "labels", ()) else None)
                    report = AccuracyReport(REFERENCE_PRECISION, int(len(inputs)), labels is not None,
                                            getattr(task, "activation", ""), positive)
                    if labels is not None:
                        reference_metrics = task.metrics(outputs, labels)
                result = PrecisionResult(precision, batch, measured=True, executed_by=_EXECUTED_BY[engine],
                                         images=int(len(inputs)), **task.compare(outputs, reference))
                if maps is not None:
                    result.heatmap_correlation = task.heatmap_agreement(maps, reference_maps, reference)
                if labels is not None:
                    metrics = task.metrics(outputs, labels)
                    result.accuracy = metrics["accuracy"]
                    result.sensitivity = metrics.get("sensitivity")
                    result.specificity = metrics.get("specificity")
                    result.auc = metrics.get("auc")
                    result.balanced_accuracy = metrics.get("balanced_accuracy")
                    result.pr_auc = metrics.get("pr_auc")
                    result.per_class_recall = metrics.get("per_class_recall")
                    result.confusion_matrix = metrics.get("confusion_matrix")
                    if result.auc is not None and reference_metrics.get("auc") is not None:
                        result.auc_drop = reference_metrics["auc"] - result.auc
                report.results.append(result)
            if runner is not None:
                runner.close()
    finally:
        bar.close()
    return report


def _window_runner(path: Path, runner):
    """f(windows) -> first output of graph ``path`` (ONNX Runtime session, or a runtime backend), float32."""
    if runner is not None:
        def run_backend(windows: np.ndarray) -> np.ndarray:
            runner.load_input(np.ascontiguousarray(windows, dtype=runner.input.dtype))
            try:
                return np.array(runner.execute(len(windows)), dtype=np.float32, copy=True)
            except Exception as exc:  # noqa: BLE001 - an engine's own error types: not measured on it
                raise ConversionError(f"{runner.name} failed running it: {type(exc).__name__}: {exc}") from None

        return run_backend
    session = ort_session(path)
    meta = session.get_inputs()[0]
    dtype = np.float16 if meta.type == "tensor(float16)" else np.float32
    name = session.get_outputs()[0].name

    def run_session(windows: np.ndarray) -> np.ndarray:
        try:
            return session.run([name], {meta.name: np.ascontiguousarray(windows, dtype=dtype)})[0].astype(np.float32)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own error types
            raise ConversionError(f"{type(exc).__name__}: {exc}") from None

    return run_session


def evaluate_volumes(graphs: dict[str, Path], volumes: Sequence[np.ndarray], task: Task, *,
                     batch_sizes: Iterable[int], progress: Optional[bool] = None,
                     engines: Optional[Sequence[str]] = None) -> AccuracyReport:
    """Segmentation: every precision graph at every batch size on every CPU engine, over whole volumes.

    Each (C, D, H, W) validation input goes through the task's sliding window
    (the runtime's code, windows batched by the batch size) and the blended
    logits are compared with FP32's at batch 1 on ONNX Runtime: Dice per label
    of the masks, voxel agreement, max probability and logit errors, pooled
    over the volumes. So the report says what users get on whole series, not
    on single windows.
    """
    from ..segmentation import infer_logits

    if REFERENCE_PRECISION not in graphs:
        raise ConversionError("the accuracy report needs the fp32 graph as its reference")
    if not volumes:
        raise ConversionError("the accuracy report needs at least one validation volume")
    batch_sizes = sorted(set(int(b) for b in batch_sizes))
    engines = installed_cpu_engines() if engines is None else list(dict.fromkeys(engines))
    if not engines or engines[0] != CPU_ENGINES[0] or any(e not in CPU_ENGINES for e in engines):
        raise ConversionError(f"engines must start with onnxruntime (the reference runs on it) and come from "
                              f"{', '.join(CPU_ENGINES)}; got {engines}")
    order = [REFERENCE_PRECISION] + [p for p in graphs if p != REFERENCE_PRECISION]
    report = AccuracyReport(REFERENCE_PRECISION, len(volumes), False, task.activation, None, kind=task.kind,
                            labels=list(task.labels))
    reference: Optional[list] = None
    bar = Progress("validating volumes", len(order) * len(engines) * len(batch_sizes) * len(volumes),
                   enabled=progress)
    try:
        for precision, engine in ((p, e) for p in order for e in engines):
            runner, unusable = None, None
            if engine == "openvino":
                try:
                    runner = openvino_runner(graphs[precision], max(batch_sizes))
                except ConversionError as exc:
                    unusable = exc
            try:
                run = _window_runner(graphs[precision], runner) if unusable is None else None
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime cannot load the graph here
                unusable = ConversionError(f"{type(exc).__name__}: {exc}")
            for batch in batch_sizes:
                try:
                    if unusable is not None:
                        raise unusable
                    outputs = []
                    for array in volumes:
                        outputs.append(infer_logits(run, array, task, batch))
                        bar.update()
                except ConversionError as exc:
                    if precision == REFERENCE_PRECISION and engine == engines[0]:
                        raise
                    reason = (f"ONNX Runtime's CPU provider cannot run it here ({str(exc)[:300]}); it is measured "
                              "where its engine runs" if engine == "onnxruntime" else str(exc)[:400])
                    report.results.append(PrecisionResult(precision, batch, measured=False,
                                                          executed_by=_EXECUTED_BY[engine], reason=reason))
                    continue
                if reference is None:
                    reference = outputs
                report.results.append(PrecisionResult(precision, batch, measured=True,
                                                      executed_by=_EXECUTED_BY[engine], images=len(volumes),
                                                      **task.compare(outputs, reference)))
            if runner is not None:
                runner.close()
    finally:
        bar.close()
    return report


# ---------------------------------------------------------------------------
# Gates

def gate_verdicts(report: Optional[AccuracyReport], graphs: Iterable[str], task: Task,
                  limits: dict, *, enabled: bool = True, no_report_reason: str = "no validation set (--val)"
                  ) -> tuple[dict, list[str]]:
    """Each graph's verdict against ``limits``, and every gate failure (one line each).

    A graph is "failed" when any of its batch sizes violates a limit, "not
    measured" when any could not be run (it is never assumed good), "ungated"
    when gates were switched off, and FP32 is the "reference" (its other
    batch sizes are still gated: a batch-dependent engine bug shows there).

    Returns:
        ({graph: {"verdict": str, "reasons": [str]}}, failures)
    """
    verdicts: dict = {}
    failures: list[str] = []
    for graph in graphs:
        if report is None:
            verdicts[graph] = ({"verdict": "reference", "reasons": []} if graph == REFERENCE_PRECISION
                               else {"verdict": "not measured", "reasons": [no_report_reason]})
            continue
        rows = [r for r in report.results if r.precision == graph]
        reasons, unmeasured = [], []
        for r in rows:
            if not r.measured:
                unmeasured.append(f"batch {r.batch_size}: {r.reason}")
                continue
            if enabled and not (graph == REFERENCE_PRECISION and r.batch_size == 1):
                reasons.extend(f"batch {r.batch_size}: {line}" for line in task.gate_failures(asdict(r), limits))
        failures.extend(f"{graph} at {line}" for line in reasons)
        if graph == REFERENCE_PRECISION:
            verdicts[graph] = {"verdict": "reference", "reasons": reasons}
        elif unmeasured or not rows:
            verdicts[graph] = {"verdict": "not measured", "reasons": unmeasured or ["not in the accuracy report"]}
        elif not enabled:
            verdicts[graph] = {"verdict": "ungated", "reasons": ["gates were switched off at conversion (--no-gates)"]}
        else:
            verdicts[graph] = {"verdict": "failed" if reasons else "passed", "reasons": reasons}
    return verdicts, failures


def check_thresholds(report: AccuracyReport, *, max_auc_drop: Optional[float] = None,
                     min_top1_agreement: Optional[float] = None,
                     max_abs_error: Optional[float] = None) -> list[str]:
    """Regressions beyond the given limits, one line each (empty: all within limits)."""
    limits = {"max_auc_drop": max_auc_drop, "min_top1_agreement": min_top1_agreement,
              "max_abs_error": max_abs_error}
    graphs = list(dict.fromkeys(r.precision for r in report.results))
    classes = 2  # the limits below read report fields only; the class count does not matter to them
    _, failures = gate_verdicts(report, graphs, ClassificationTask(classes=classes), limits)
    if max_auc_drop is not None and not report.labelled:
        failures.append("--max-auc-drop needs validation labels (--labels CSV)")
    return failures
