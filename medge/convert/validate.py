"""Accuracy of every precision against FP32, measured by running it.

For each precision graph and each batch size of the optimisation profile
(1, opt, max: TensorRT engines are known to disagree across profile points),
the validation inputs are run and compared with the FP32 graph at batch 1:
max / mean absolute error of the raw outputs, top-1 agreement, and, with
labels, accuracy, sensitivity, specificity and ROC AUC (and its drop from
FP32). A graph that nothing here can execute is reported as "not measured"
with the reason, never guessed.

Execution is ONNX Runtime's CPU provider. It runs the FP32 and the INT8 Q/DQ
graphs on any machine. For the FP16 graph it executes float16 weights and
float16 tensors between nodes, so rounding to fp16 is measured. Inside a
node a CPU kernel may accumulate in float32, as GPU fp16 kernels usually
do too.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .._progress import Progress
from ..errors import ConversionError
from ..postprocess import activate
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


@dataclass
class AccuracyReport:
    reference: str
    images: int
    labelled: bool
    activation: str
    positive_class: Optional[str]
    results: list[PrecisionResult] = field(default_factory=list)

    def to_manifest(self) -> dict:
        data = asdict(self)
        data["results"] = [asdict(r) for r in self.results]
        return data

    def result(self, precision: str, batch_size: int) -> Optional[PrecisionResult]:
        return next((r for r in self.results if r.precision == precision and r.batch_size == batch_size), None)

    def table(self) -> str:
        """The report as an aligned text table."""
        header = ["precision", "batch", "max|err|", "mean|err|", "top-1 agr", "accuracy", "sens", "spec", "AUC",
                  "AUC drop"]
        rows = []
        for r in self.results:
            if not r.measured:
                rows.append([r.precision, str(r.batch_size), f"not measured: {r.reason}"])
                continue
            rows.append([r.precision, str(r.batch_size), _fmt(r.max_abs_error, ".2e"), _fmt(r.mean_abs_error, ".2e"),
                         _fmt(r.top1_agreement, ".2%"), _fmt(r.accuracy, ".2%"), _fmt(r.sensitivity, ".2%"),
                         _fmt(r.specificity, ".2%"), _fmt(r.auc, ".4f"), _fmt(r.auc_drop, "+.4f")])
        widths = [max(len(header[i]), *(len(row[i]) for row in rows if len(row) > i and len(row) == len(header)))
                  for i in range(len(header))]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        for row in rows:
            if len(row) == len(header):
                lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
            else:
                lines.append("  ".join(c.ljust(w) for c, w in zip(row[:2], widths)) + "  " + row[2])
        return "\n".join(lines)


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ---------------------------------------------------------------------------
# Metrics (numpy only)


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> Optional[float]:
    """Area under the ROC curve (Mann-Whitney U with tie-averaged ranks); None with one class only."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def predicted_classes(outputs: np.ndarray, activation: str) -> np.ndarray:
    if outputs.ndim == 2 and outputs.shape[1] > 1:
        return outputs.argmax(axis=1)
    return (activate(outputs.reshape(len(outputs), -1), activation)[:, 0] >= 0.5).astype(np.int64)


def positive_scores(outputs: np.ndarray, activation: str, positive_index: int) -> np.ndarray:
    scores = activate(outputs.reshape(len(outputs), -1), activation)
    return scores[:, positive_index] if scores.shape[1] > 1 else scores[:, 0]


def classification_metrics(outputs: np.ndarray, labels: np.ndarray, activation: str, positive_index: int) -> dict:
    predicted = predicted_classes(outputs, activation)
    metrics = {"accuracy": float((predicted == labels).mean())}
    binary = set(np.unique(labels)).issubset({0, 1}) and (outputs.ndim == 1 or outputs.shape[1] <= 2)
    if binary:
        positive = labels == positive_index if outputs.shape[1] > 1 else labels == 1
        predicted_positive = predicted == (positive_index if outputs.shape[1] > 1 else 1)
        tp = int((positive & predicted_positive).sum())
        tn = int((~positive & ~predicted_positive).sum())
        metrics["sensitivity"] = tp / int(positive.sum()) if positive.any() else None
        metrics["specificity"] = tn / int((~positive).sum()) if (~positive).any() else None
        metrics["auc"] = roc_auc(positive_scores(outputs, activation, positive_index), positive)
    else:  # macro one-vs-rest AUC
        scores = activate(outputs, activation)
        aucs = [roc_auc(scores[:, c], labels == c) for c in range(scores.shape[1])]
        aucs = [a for a in aucs if a is not None]
        metrics["auc"] = float(np.mean(aucs)) if aucs else None
    return metrics


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


def run_graph(path: Path, inputs: np.ndarray, batch_size: int, progress: Optional[Progress] = None) -> np.ndarray:
    """Outputs of graph ``path`` on ``inputs`` in batches of ``batch_size`` (last batch may be smaller)."""
    session = ort_session(path)
    meta = session.get_inputs()[0]
    dtype = np.float16 if meta.type == "tensor(float16)" else np.float32
    outputs = []
    for start in range(0, len(inputs), batch_size):
        batch = np.ascontiguousarray(inputs[start : start + batch_size], dtype=dtype)
        outputs.append(session.run(None, {meta.name: batch})[0].astype(np.float32))
        if progress is not None:
            progress.update(len(batch))
    return np.concatenate(outputs)


def evaluate(
    graphs: dict[str, Path],
    inputs: np.ndarray,
    *,
    batch_sizes: Iterable[int],
    labels: Optional[np.ndarray] = None,
    class_labels: Sequence[str] = (),
    activation: str = "softmax",
    positive_class: Optional[str] = None,
    progress: Optional[bool] = None,
) -> AccuracyReport:
    """Run every precision graph at every batch size and compare with FP32 at batch 1.

    Args:
        graphs: precision name -> ONNX path; must include "fp32".
        inputs: (N, C, H, W) float32 validation inputs from medge's preprocessing.
        batch_sizes: e.g. (1, opt, max) of the optimisation profile.
        labels: optional (N,) class indices.
        class_labels: class names (index order).
        activation: "softmax" or "sigmoid" (how outputs become scores).
        positive_class: class whose score gives ROC AUC, sensitivity and
            specificity (default: the last class, e.g. "lesion").
        progress: progress line (None: when stderr is a terminal).

    Returns:
        AccuracyReport.
    """
    if REFERENCE_PRECISION not in graphs:
        raise ConversionError("the accuracy report needs the fp32 graph as its reference")
    if inputs.ndim != 4 or len(inputs) == 0:
        raise ConversionError(f"validation inputs must be a non-empty (N, C, H, W) array, got {inputs.shape}")
    batch_sizes = sorted(set(int(b) for b in batch_sizes))
    if positive_class is not None and positive_class not in class_labels:
        raise ConversionError(f"positive class {positive_class!r} is not one of {list(class_labels)}")
    positive_index = class_labels.index(positive_class) if positive_class else max(len(class_labels) - 1, 1)
    report = AccuracyReport(REFERENCE_PRECISION, int(len(inputs)), labels is not None, activation,
                            class_labels[positive_index] if class_labels else None)
    order = [REFERENCE_PRECISION] + [p for p in graphs if p != REFERENCE_PRECISION]
    bar = Progress("validating", len(order) * len(batch_sizes) * len(inputs), enabled=progress)
    reference = None
    reference_metrics: dict = {}
    try:
        for precision in order:
            for batch in batch_sizes:
                try:
                    outputs = run_graph(graphs[precision], inputs, batch, bar)
                except ConversionError as exc:
                    if precision == REFERENCE_PRECISION:
                        raise
                    report.results.append(PrecisionResult(
                        precision, batch, measured=False, executed_by="onnxruntime CPU",
                        reason=f"ONNX Runtime's CPU provider cannot run it here ({str(exc)[:300]}); "
                               "it is measured where its engine runs"))
                    bar.update(len(inputs))
                    continue
                if reference is None:
                    reference = outputs
                    if labels is not None:
                        reference_metrics = classification_metrics(outputs, labels, activation, positive_index)
                diff = np.abs(outputs.astype(np.float64) - reference)
                result = PrecisionResult(
                    precision, batch, measured=True, executed_by="onnxruntime CPU", images=int(len(inputs)),
                    max_abs_error=float(diff.max()), mean_abs_error=float(diff.mean()),
                    top1_agreement=float((predicted_classes(outputs, activation)
                                          == predicted_classes(reference, activation)).mean()),
                )
                if labels is not None:
                    metrics = classification_metrics(outputs, labels, activation, positive_index)
                    result.accuracy = metrics["accuracy"]
                    result.sensitivity = metrics.get("sensitivity")
                    result.specificity = metrics.get("specificity")
                    result.auc = metrics.get("auc")
                    if result.auc is not None and reference_metrics.get("auc") is not None:
                        result.auc_drop = reference_metrics["auc"] - result.auc
                report.results.append(result)
    finally:
        bar.close()
    return report


def check_thresholds(report: AccuracyReport, *, max_auc_drop: Optional[float] = None,
                     min_top1_agreement: Optional[float] = None,
                     max_abs_error: Optional[float] = None) -> list[str]:
    """Regressions beyond the given limits, one line each (empty: all within limits)."""
    failures = []
    for r in report.results:
        if not r.measured or r.precision == REFERENCE_PRECISION and r.batch_size == 1:
            continue
        where = f"{r.precision} at batch {r.batch_size}"
        if max_auc_drop is not None and r.auc_drop is not None and r.auc_drop > max_auc_drop:
            failures.append(f"{where}: AUC drop {r.auc_drop:.4f} > {max_auc_drop}")
        if min_top1_agreement is not None and r.top1_agreement < min_top1_agreement:
            failures.append(f"{where}: top-1 agreement {r.top1_agreement:.2%} < {min_top1_agreement:.2%}")
        if max_abs_error is not None and r.max_abs_error > max_abs_error:
            failures.append(f"{where}: max abs error {r.max_abs_error:.3g} > {max_abs_error:g}")
    if max_auc_drop is not None and not report.labelled:
        failures.append("--max-auc-drop needs validation labels (--labels CSV)")
    return failures
