"""Classification: one score vector per image, (batch, classes).

Outputs are logits (or scores) that the manifest's activation turns into
scores: softmax over the classes, or an independent sigmoid per class. A
single sigmoid output is a binary classifier whose two labels are (negative,
positive). Anything else, in particular per-pixel outputs, is refused: a
segmentation map flattened into 131,072 "classes" would give a plausible but
meaningless score (segmentation networks are the ``segmentation`` task).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Sequence

import numpy as np

from ..errors import BundleError, ConversionError
from ..postprocess import ACTIVATIONS, activate
from .base import Task


@dataclass(frozen=True)
class ClassificationTask(Task):
    """A classifier's outputs: ``classes`` scores per image.

    Attributes:
        classes: the output's class axis length.
        labels: class names in output order (empty: unnamed; two names for one sigmoid output).
        activation: "softmax" or "sigmoid".
        positive_class: the class whose score gives AUC, sensitivity and specificity.
        threshold: binary tasks: the positive class's score at or above which
            the label is positive (the operating point chosen at conversion);
            None: argmax (0.5 for a single sigmoid output). Scores are unchanged.
        heatmap_output: the graph output holding class activation maps
            (N, classes, H, W) when converted with ``--explain``; None otherwise.
    """

    classes: int
    labels: tuple = ()
    activation: str = "softmax"
    positive_class: Optional[str] = None
    threshold: Optional[float] = None
    heatmap_output: Optional[str] = None

    kind: ClassVar[str] = "classification"
    default_gates: ClassVar[Mapping[str, Optional[float]]] = {
        "min_top1_agreement": 0.99, "max_auc_drop": 0.01, "max_abs_error": None}

    # ------------------------------------------------------------------ construction

    @classmethod
    def for_outputs(cls, output_shape: Sequence[Any], *, labels: Sequence[str] = (), activation: str = "softmax",
                    positive_class: Optional[str] = None, threshold: Optional[float] = None) -> "ClassificationTask":
        """The task for a model whose first output has ``output_shape`` (batch axis first).

        Raises:
            ConversionError: the output is not (batch, classes) with a fixed
                class count, the labels do not match it, or the activation
                would make every score constant.
        """
        shape = list(output_shape)
        _check_rank(shape, ConversionError)
        task = cls(classes=int(shape[1]), labels=tuple(labels), activation=activation,
                   positive_class=positive_class, threshold=threshold)
        task._check_consistent(ConversionError)
        return task

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> "ClassificationTask":
        classes, labels = entry.get("classes"), entry.get("labels", [])
        activation, positive = entry.get("activation"), entry.get("positive_class")
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
            raise BundleError("the manifest's task.classes must be a positive integer")
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise BundleError("the manifest's task.labels must be a list of strings")
        if activation not in ACTIVATIONS:
            raise BundleError(f"the manifest's task.activation must be one of {', '.join(ACTIVATIONS)}")
        if positive is not None and not isinstance(positive, str):
            raise BundleError("the manifest's task.positive_class must be a string or null")
        threshold = entry.get("threshold")
        if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)):
            raise BundleError("the manifest's task.threshold must be a number or null")
        heatmap = entry.get("heatmap_output")
        if heatmap is not None and not isinstance(heatmap, str):
            raise BundleError("the manifest's task.heatmap_output must be a string or null")
        task = cls(classes=classes, labels=tuple(labels), activation=activation, positive_class=positive,
                   threshold=None if threshold is None else float(threshold), heatmap_output=heatmap)
        task._check_consistent(BundleError)
        return task

    def to_manifest(self) -> dict:
        return {"kind": self.kind, "classes": self.classes, "labels": list(self.labels),
                "activation": self.activation, "positive_class": self.positive_class, "threshold": self.threshold,
                "heatmap_output": self.heatmap_output}

    def _check_consistent(self, error: type) -> None:
        if self.activation not in ACTIVATIONS:
            raise error(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.classes == 1:
            if self.activation != "sigmoid":
                raise error("the model has one output per image: softmax over one class is always 1.0; "
                            "use --activation sigmoid (a binary classifier scoring the positive class)")
            if self.labels and len(self.labels) != 2:
                raise error(f"a single sigmoid output is a binary classifier: give two class names "
                            f"(negative,positive), got {len(self.labels)}")
        elif self.labels and len(self.labels) != self.classes:
            raise error(f"the model outputs {self.classes} classes but {len(self.labels)} class names were given "
                        f"({', '.join(self.labels)})")
        if len(set(self.labels)) != len(self.labels):
            raise error("class names must be unique")
        if self.positive_class is not None and self.positive_class not in self.labels:
            raise error(f"positive class {self.positive_class!r} is not one of the class names {list(self.labels)}")
        if self.threshold is not None:
            if not self.binary:
                raise error("an operating point (threshold) needs a binary task: two classes, or one sigmoid output")
            if not 0.0 < self.threshold < 1.0:
                raise error(f"the threshold must lie strictly between 0 and 1, got {self.threshold}")

    # ------------------------------------------------------------------ outputs

    def check_output_shape(self, shape: Sequence[Any], error: type) -> None:
        shape = list(shape)
        _check_rank(shape, error)
        if int(shape[1]) != self.classes:
            raise error(f"the output has {shape[1]} classes per image but the bundle's task declares "
                        f"{self.classes}")

    @property
    def positive_index(self) -> int:
        """Index of the positive class in the output (a single sigmoid output: 0)."""
        if self.classes == 1:
            return 0
        if self.positive_class is not None and self.positive_class in self.labels:
            return self.labels.index(self.positive_class)
        return self.classes - 1

    @property
    def binary(self) -> bool:
        """Two exclusive classes (softmax over 2, or one sigmoid output): operating points apply."""
        return self.classes == 1 or (self.classes == 2 and self.activation == "softmax")

    def positive_scores(self, outputs: np.ndarray) -> np.ndarray:
        """The positive class's score per image (binary tasks)."""
        return self.scores(outputs)[:, self.positive_index]

    def scores(self, outputs: np.ndarray) -> np.ndarray:
        """(N, classes) float64 scores from raw (N, classes) outputs."""
        return activate(np.asarray(outputs).reshape(len(outputs), self.classes), self.activation)

    def predicted_indices(self, outputs: np.ndarray) -> np.ndarray:
        """The decision per image (index into labels): argmax, or for binary tasks the positive class when its
        score reaches the threshold (0.5 for a single sigmoid output without an operating point)."""
        if self.classes == 1:
            return (self.scores(outputs)[:, 0] >= (0.5 if self.threshold is None else self.threshold)).astype(np.int64)
        if self.threshold is None:
            return np.asarray(outputs).reshape(len(outputs), self.classes).argmax(axis=1)
        positive = self.positive_scores(outputs) >= self.threshold
        return np.where(positive, self.positive_index, 1 - self.positive_index).astype(np.int64)

    def interpret(self, outputs: np.ndarray) -> list[tuple[np.ndarray, int, Optional[str]]]:
        """Per image: (scores float32, top-1 index, its label or None)."""
        scores = self.scores(outputs)
        indices = self.predicted_indices(outputs)
        return [(scores[k].astype(np.float32), int(indices[k]),
                 self.labels[int(indices[k])] if int(indices[k]) < len(self.labels) else None)
                for k in range(len(scores))]

    def heatmap_channel(self, index: int) -> int:
        """The activation-map channel that explains decision ``index`` (a single sigmoid output has one)."""
        return 0 if self.classes == 1 else int(index)

    def heatmap_agreement(self, maps: np.ndarray, reference_maps: np.ndarray, reference: np.ndarray) -> Optional[float]:
        """Mean Pearson correlation, over images, of the map explaining FP32's decision, against FP32's map
        (images where either map is constant, e.g. all zero after the ReLU, are left out; None if all are)."""
        decided = self.predicted_indices(reference)
        values = []
        for k, index in enumerate(decided):
            channel = self.heatmap_channel(int(index))
            a = np.asarray(maps[k, channel], dtype=np.float64).ravel()
            b = np.asarray(reference_maps[k, channel], dtype=np.float64).ravel()
            if a.std() == 0 or b.std() == 0:
                continue
            values.append(float(np.corrcoef(a, b)[0, 1]))
        return float(np.mean(values)) if values else None

    # ------------------------------------------------------------------ measuring

    def compare(self, outputs: np.ndarray, reference: np.ndarray) -> dict:
        diff = np.abs(np.asarray(outputs, dtype=np.float64) - np.asarray(reference, dtype=np.float64))
        return {"max_abs_error": float(diff.max()), "mean_abs_error": float(diff.mean()),
                "top1_agreement": float((self.predicted_indices(outputs) == self.predicted_indices(reference)).mean())}

    def metrics(self, outputs: np.ndarray, labels: np.ndarray) -> dict:
        """Accuracy, balanced accuracy, per-class recall, confusion matrix (rows: truth), AUC and PR-AUC;
        for binary tasks also sensitivity and specificity, all at the task's decision rule (its threshold)."""
        labels = np.asarray(labels)
        predicted = self.predicted_indices(outputs)
        n_classes = max(self.classes, 2)
        confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
        np.add.at(confusion, (labels.clip(0, n_classes - 1), predicted.clip(0, n_classes - 1)), 1)
        support = confusion.sum(axis=1)
        recall = [float(confusion[c, c] / support[c]) if support[c] else None for c in range(n_classes)]
        present = [r for r in recall if r is not None]
        metrics: dict = {"accuracy": float((predicted == labels).mean()), "confusion_matrix": confusion.tolist(),
                         "per_class_recall": recall,
                         "balanced_accuracy": float(np.mean(present)) if present else None}
        if self.binary and set(np.unique(labels).tolist()).issubset({0, 1}):
            positive_index = self.positive_index if self.classes > 1 else 1
            positive = labels == positive_index
            predicted_positive = predicted == positive_index
            tp = int((positive & predicted_positive).sum())
            tn = int((~positive & ~predicted_positive).sum())
            metrics["sensitivity"] = tp / int(positive.sum()) if positive.any() else None
            metrics["specificity"] = tn / int((~positive).sum()) if (~positive).any() else None
            scores = self.positive_scores(outputs)
            metrics["auc"] = roc_auc(scores, positive)
            metrics["pr_auc"] = average_precision(scores, positive)
        else:  # macro one-vs-rest
            scores = self.scores(outputs)
            aucs = [roc_auc(scores[:, c], labels == c) for c in range(scores.shape[1])]
            aucs = [a for a in aucs if a is not None]
            metrics["auc"] = float(np.mean(aucs)) if aucs else None
            aps = [average_precision(scores[:, c], labels == c) for c in range(scores.shape[1])]
            aps = [a for a in aps if a is not None]
            metrics["pr_auc"] = float(np.mean(aps)) if aps else None
        return metrics

    def gate_failures(self, result: Mapping[str, Any], limits: Mapping[str, Optional[float]]) -> list[str]:
        failures = []
        agreement, auc_drop, error = result.get("top1_agreement"), result.get("auc_drop"), result.get("max_abs_error")
        minimum = limits.get("min_top1_agreement")
        if minimum is not None and agreement is not None and agreement < minimum:
            failures.append(f"top-1 agreement {agreement:.2%} < {minimum:.2%}")
        limit = limits.get("max_auc_drop")
        if limit is not None and auc_drop is not None and auc_drop > limit:
            failures.append(f"AUC drop {auc_drop:.4f} > {limit}")
        limit = limits.get("max_abs_error")
        if limit is not None and error is not None and error > limit:
            failures.append(f"max abs error {error:.3g} > {limit:g}")
        return failures

    def check_failures(self, outputs: np.ndarray, reference: np.ndarray, tolerance: float) -> list[str]:
        outputs = np.asarray(outputs, dtype=np.float64).reshape(len(reference), -1)
        reference = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
        failures = []
        if not np.isfinite(outputs).all():
            failures.append("non-finite outputs")
            return failures
        error = float(np.abs(outputs - reference).max())
        if error > tolerance:
            failures.append(f"max abs error {error:.3g} > {tolerance:.3g}")
        flipped = int((self.predicted_indices(outputs) != self.predicted_indices(reference)).sum())
        if flipped:
            failures.append(f"top-1 class differs from FP32 on {flipped} of {len(reference)} check vectors")
        return failures

    def margins(self, reference: np.ndarray) -> np.ndarray:
        """How far each reference output is from changing its decision, in output units."""
        reference = np.asarray(reference, dtype=np.float64).reshape(len(reference), self.classes)
        cut = 0.0 if self.threshold is None else float(np.log(self.threshold / (1.0 - self.threshold)))
        if self.classes == 1:
            # score >= t <=> logit >= logit(t) for a sigmoid
            return np.abs(reference[:, 0] - cut)
        if self.threshold is not None:
            # softmax over two: p_pos >= t <=> l_pos - l_neg >= logit(t); each logit may move by half the gap
            gap = reference[:, self.positive_index] - reference[:, 1 - self.positive_index]
            return np.abs(gap - cut) / 2.0
        ordered = np.sort(reference, axis=1)
        # Top-1 flips when the best and second-best outputs meet: each may move by half the gap.
        return (ordered[:, -1] - ordered[:, -2]) / 2.0


def _check_rank(shape: list, error: type) -> None:
    if len(shape) == 2 and isinstance(shape[1], int) and not isinstance(shape[1], bool) and shape[1] >= 1:
        return
    shown = "(" + ", ".join("batch" if i == 0 else str(d) for i, d in enumerate(shape)) + ")"
    if len(shape) >= 3:
        raise error(f"the model's output is {shown}, a per-pixel (or per-element) map, not (batch, classes): "
                    "a classifier cannot score it; if it is a segmentation network, convert it with "
                    "--task segmentation (task='segmentation' and a VolumeSpec in Python)")
    if len(shape) == 2:
        raise error(f"the model's output is {shown}: the class axis must have a fixed size")
    raise error(f"the model's output is {shown}: medge converts classifiers whose output is (batch, classes)")


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


def average_precision(scores: np.ndarray, positives: np.ndarray) -> Optional[float]:
    """Area under the precision-recall curve as average precision (precision at each positive's rank,
    ties broken pessimistically within a tie group); None without positives."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos = int(positives.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, hits = scores[order], positives[order]
    # Cut only at the end of each group of equal scores: a threshold cannot split ties.
    ends = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    tp = np.cumsum(hits)[ends]
    predicted = ends + 1
    precision = tp / predicted
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float((precision * recall_step).sum())
