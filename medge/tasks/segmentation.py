"""Segmentation: one score per class and pixel (2-D networks) or voxel (3-D networks).

Outputs are (batch, classes, *spatial): (N, K, H, W) for 2-D networks and
(N, K, D, H, W) for 3-D ones, logits that the manifest's activation turns into
probabilities: softmax over the classes (mutually exclusive labels, channel 0
the background), or an independent sigmoid per channel (multi-label) with a
threshold. Labels always include the background at index 0: softmax networks
name their K channels (channel 0 is the background); sigmoid networks name
their K channels and the background is prepended, so label value ``v`` in a
label map is ``labels[v]`` either way.

Agreement with FP32 is measured on masks, not on single numbers: the Dice of
each class's mask against FP32's mask (pooled over the voxels compared), the
fraction of voxels whose label changed, and the largest probability error.
The default gate is a Dice >= 0.95 against FP32 for every class present in
FP32's or the precision's masks. Why 0.95: a precision graph only moves the
voxels whose classes are nearly tied (boundaries); on a network that
separates its classes that is a thin shell, well under 5% of a structure of
a few thousand voxels, while an INT8 graph whose activation ranges were
calibrated wrongly changes whole regions and falls far below it. Inter-reader
Dice of expert contours is typically 0.8-0.9, so 0.95 against the same
network in FP32 keeps a precision's change well inside the disagreement
users already live with, without failing graphs on boundary rounding. Small
or thin structures lose Dice faster per voxel: raise or lower it with
``--min-dice`` knowingly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Sequence

import numpy as np

from ..errors import BundleError, ConversionError
from ..postprocess import ACTIVATIONS
from .base import Task

#: Window blending modes the sliding window knows (medge.sliding_window.MODES).
_SW_MODES = ("constant", "gaussian")


@dataclass(frozen=True)
class SegmentationTask(Task):
    """A segmentation network's outputs and how the runtime covers a volume with it.

    Attributes:
        classes: the output's channel count K.
        labels: label names by label value, index 0 the background
            (K names for softmax, K + 1 for sigmoid).
        activation: "softmax" (argmax) or "sigmoid" (per channel, threshold).
        threshold: sigmoid only: the probability at or above which a voxel
            belongs to a channel's class.
        spatial_dims: 2 (the network takes slices: (N, C, H, W)) or 3 ((N, C, D, H, W)).
        roi: the network's input window, (H, W) or (D, H, W).
        overlap: fraction of the window neighbouring windows share.
        mode: window blending, "gaussian" or "constant".
        sigma_scale: Gaussian sigma as a fraction of the window.
        sw_batch: windows per backend call (at most the profile's max batch).
    """

    classes: int
    labels: tuple = ()
    activation: str = "softmax"
    threshold: Optional[float] = None
    spatial_dims: int = 3
    roi: tuple = ()
    overlap: float = 0.25
    mode: str = "gaussian"
    sigma_scale: float = 0.125
    sw_batch: int = 1

    kind: ClassVar[str] = "segmentation"
    default_gates: ClassVar[Mapping[str, Optional[float]]] = {"min_dice": 0.95, "max_probability_error": None}

    # ------------------------------------------------------------------ construction

    @classmethod
    def for_outputs(cls, output_shape: Sequence[Any], input_shape: Sequence[Any], *, labels: Sequence[str] = (),
                    activation: str = "softmax", threshold: Optional[float] = None, roi: Optional[Sequence[int]] = None,
                    overlap: float = 0.25, mode: str = "gaussian", sigma_scale: float = 0.125,
                    sw_batch: int = 1) -> "SegmentationTask":
        """The task for a network with ``input_shape`` and first output ``output_shape`` (batch axes first).

        Raises:
            ConversionError: the output is not (batch, classes, *spatial) with the input's spatial size, the
                labels do not match the classes, or the sliding-window settings are invalid.
        """
        out, inp = list(output_shape), list(input_shape)
        if len(out) not in (4, 5):
            shown = "(" + ", ".join("batch" if i == 0 else str(d) for i, d in enumerate(out)) + ")"
            raise ConversionError(f"the model's output is {shown}; a segmentation network outputs (batch, classes, "
                                  "height, width) or (batch, classes, depth, height, width)")
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in out[1:]):
            raise ConversionError(f"the model's output {out} must have fixed classes and spatial sizes")
        spatial = tuple(int(d) for d in out[2:])
        if len(inp) != len(out) or tuple(inp[2:]) != spatial:
            raise ConversionError(f"the model's output {out[1:]} does not cover its input {inp[1:]} pixel for pixel; "
                                  "medge segments with networks whose output has the input's spatial size")
        if roi is not None and tuple(int(r) for r in roi) != spatial:
            raise ConversionError(f"--roi {tuple(roi)} differs from the model's input window {spatial}: the ROI is "
                                  "the network's input size (export the model for that size)")
        if activation == "sigmoid" and threshold is None:
            threshold = 0.5
        names = tuple(labels)
        classes = int(out[1])
        if not names:
            names = ("background",) + tuple(f"class{i}" for i in range(1, classes + (activation == "sigmoid")))
        elif activation == "sigmoid" and len(names) == classes:
            names = ("background",) + names
        task = cls(classes=classes, labels=names, activation=activation, threshold=threshold,
                   spatial_dims=len(spatial), roi=spatial, overlap=float(overlap), mode=mode,
                   sigma_scale=float(sigma_scale), sw_batch=int(sw_batch))
        task._check_consistent(ConversionError)
        return task

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> "SegmentationTask":
        def number(key: str, optional: bool = False):
            value = entry.get(key)
            if value is None and optional:
                return None
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise BundleError(f"the manifest's task.{key} must be a number")
            return float(value)

        classes, labels, roi = entry.get("classes"), entry.get("labels"), entry.get("roi")
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
            raise BundleError("the manifest's task.classes must be a positive integer")
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise BundleError("the manifest's task.labels must be a list of strings")
        if entry.get("activation") not in ACTIVATIONS:
            raise BundleError(f"the manifest's task.activation must be one of {', '.join(ACTIVATIONS)}")
        if not isinstance(roi, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in roi):
            raise BundleError("the manifest's task.roi must be a list of integers")
        dims, batch = entry.get("spatial_dims"), entry.get("sw_batch")
        for key, value in (("spatial_dims", dims), ("sw_batch", batch)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise BundleError(f"the manifest's task.{key} must be an integer")
        if not isinstance(entry.get("mode"), str):
            raise BundleError("the manifest's task.mode must be a string")
        task = cls(classes=classes, labels=tuple(labels), activation=entry["activation"],
                   threshold=number("threshold", optional=True), spatial_dims=dims, roi=tuple(roi),
                   overlap=number("overlap"), mode=entry["mode"], sigma_scale=number("sigma_scale"), sw_batch=batch)
        task._check_consistent(BundleError)
        return task

    def to_manifest(self) -> dict:
        return {"kind": self.kind, "classes": self.classes, "labels": list(self.labels),
                "activation": self.activation, "threshold": self.threshold, "spatial_dims": self.spatial_dims,
                "roi": list(self.roi), "overlap": self.overlap, "mode": self.mode, "sigma_scale": self.sigma_scale,
                "sw_batch": self.sw_batch}

    def _check_consistent(self, error: type) -> None:
        if self.activation not in ACTIVATIONS:
            raise error(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.spatial_dims not in (2, 3) or len(self.roi) != self.spatial_dims or not all(r >= 1 for r in self.roi):
            raise error(f"a segmentation network is 2-D or 3-D with a positive window per axis, got "
                        f"{self.spatial_dims}-D window {self.roi}")
        if self.activation == "softmax":
            if self.classes < 2:
                raise error("a softmax segmentation needs at least two channels (background and a class); a "
                            "single-channel output is a sigmoid mask: use --activation sigmoid")
            if self.threshold is not None:
                raise error("a threshold applies to sigmoid outputs; softmax masks are the argmax")
        elif self.threshold is None or not 0.0 < self.threshold < 1.0:
            raise error(f"the sigmoid threshold must lie strictly between 0 and 1, got {self.threshold}")
        if len(self.labels) != self.label_count:
            what = ("the background and one name per output channel" if self.activation == "sigmoid"
                    else "one name per output channel, the background first")
            raise error(f"the model's {self.classes} output channels need {self.label_count} label names ({what}), "
                        f"got {len(self.labels)} ({', '.join(self.labels)})")
        if len(set(self.labels)) != len(self.labels):
            raise error("label names must be unique")
        if self.label_count > 255:
            raise error(f"{self.label_count} labels do not fit a uint8 label map (at most 255)")
        if not 0.0 <= self.overlap < 1.0:
            raise error(f"the sliding-window overlap must be in [0, 1), got {self.overlap}")
        if self.mode not in _SW_MODES:
            raise error(f"the sliding-window mode must be one of {', '.join(_SW_MODES)}, got {self.mode!r}")
        if not self.sigma_scale > 0:
            raise error(f"sigma_scale must be positive, got {self.sigma_scale}")
        if self.sw_batch < 1:
            raise error(f"the sliding-window batch must be at least 1, got {self.sw_batch}")

    # ------------------------------------------------------------------ outputs

    @property
    def label_count(self) -> int:
        """Label values in a label map, background included."""
        return self.classes + (1 if self.activation == "sigmoid" else 0)

    @property
    def window(self) -> tuple:
        """The window on the volume's (slices, rows, columns) grid: a 2-D network sees one slice at a time."""
        return tuple(self.roi) if self.spatial_dims == 3 else (1, *self.roi)

    def check_output_shape(self, shape: Sequence[Any], error: type) -> None:
        shape = list(shape)
        if len(shape) != self.spatial_dims + 2 or int(shape[1]) != self.classes or tuple(shape[2:]) != self.roi:
            raise error(f"the output is {shape[1:]} per window but the bundle's task declares "
                        f"[{self.classes}, {', '.join(map(str, self.roi))}]")

    def probabilities(self, outputs: np.ndarray, axis: int = 1) -> np.ndarray:
        """float32 probabilities of logits along the class ``axis`` (softmax, or sigmoid per channel)."""
        x = np.asarray(outputs, dtype=np.float32)
        if self.activation == "sigmoid":
            return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)

    def labels_of(self, outputs: np.ndarray, axis: int = 1, *, probabilities: bool = False) -> np.ndarray:
        """uint8 label values along the class ``axis`` of logits (or of probabilities with ``probabilities``).

        Softmax: the argmax (0 = background). Sigmoid: 0 where no channel
        reaches the threshold, else 1 + the channel with the highest
        probability among those that do (a label map holds one label per
        voxel; :meth:`masks` gives overlapping ones).
        """
        x = np.asarray(outputs)
        if self.activation == "softmax":
            return _argmax(x, axis)[0]
        if not probabilities:  # sigmoid(l) >= t <=> l >= logit(t): no exp over the whole volume
            best, highest = _argmax(x, axis)
            cut = float(np.log(self.threshold / (1.0 - self.threshold)))
        else:
            best, highest = _argmax(x, axis)
            cut = self.threshold
        best += 1
        best[highest < cut] = 0
        return best

    def masks(self, outputs: np.ndarray, axis: int = 1) -> np.ndarray:
        """Per label 1..: a bool mask along a new leading axis (sigmoid masks may overlap; softmax ones do not)."""
        x = np.asarray(outputs)
        if self.activation == "sigmoid":
            return np.moveaxis(self.probabilities(x, axis) >= self.threshold, axis, 0)
        labels = self.labels_of(x, axis)
        return np.stack([labels == v for v in range(1, self.label_count)])

    # ------------------------------------------------------------------ measuring

    def compare(self, outputs: Any, reference: Any) -> dict:
        """Dice per label (vs FP32's masks), voxel agreement, max probability error, max / mean logit error.

        ``outputs`` and ``reference`` are logits (N, K, *spatial), or lists of
        (K, *spatial) arrays (whole volumes of different sizes); counts are
        pooled over all of them. Dice is None for a label absent from both.
        """
        outs = list(outputs) if isinstance(outputs, (list, tuple)) else [np.asarray(outputs)]
        refs = list(reference) if isinstance(reference, (list, tuple)) else [np.asarray(reference)]
        axis = 0 if isinstance(outputs, (list, tuple)) else 1
        inter = np.zeros(self.label_count - 1)
        sizes = np.zeros(self.label_count - 1)
        agree = total = 0
        max_err = max_prob = 0.0
        abs_sum = 0.0
        for out, ref in zip(outs, refs):
            out = np.asarray(out, dtype=np.float32)
            ref = np.asarray(ref, dtype=np.float32)
            diff = np.abs(out - ref)
            max_err = max(max_err, float(diff.max()))
            abs_sum += float(diff.sum(dtype=np.float64))
            max_prob = max(max_prob, float(np.abs(self.probabilities(out, axis) - self.probabilities(ref, axis)).max()))
            a, b = self.masks(out, axis), self.masks(ref, axis)
            inter += (a & b).reshape(len(a), -1).sum(axis=1)
            sizes += a.reshape(len(a), -1).sum(axis=1) + b.reshape(len(b), -1).sum(axis=1)
            la, lb = self.labels_of(out, axis), self.labels_of(ref, axis)
            agree += int((la == lb).sum())
            total += la.size
        dice = [float(2 * i / s) if s else None for i, s in zip(inter, sizes)]
        present = [d for d in dice if d is not None]
        count = sum(np.asarray(o).size for o in outs)
        return {"max_abs_error": max_err, "mean_abs_error": abs_sum / max(count, 1),
                "max_probability_error": max_prob, "dice": dice, "min_dice": min(present) if present else None,
                "voxel_agreement": agree / max(total, 1)}

    def metrics(self, outputs: np.ndarray, labels: np.ndarray) -> dict:
        """Dice per label against ground-truth label maps of the same shape (pooled)."""
        truth = np.asarray(labels)
        a = self.masks(outputs)
        b = np.stack([truth == v for v in range(1, self.label_count)])
        sizes = a.reshape(len(a), -1).sum(axis=1) + b.reshape(len(b), -1).sum(axis=1)
        inter = (a & b).reshape(len(a), -1).sum(axis=1)
        return {"dice": [float(2 * i / s) if s else None for i, s in zip(inter, sizes)]}

    def gate_failures(self, result: Mapping[str, Any], limits: Mapping[str, Optional[float]]) -> list[str]:
        failures = []
        minimum = limits.get("min_dice")
        dice = result.get("dice") or []
        if minimum is not None:
            for name, value in zip(self.labels[1:], dice):
                if value is not None and value < minimum:
                    failures.append(f"Dice of {name} vs fp32 {value:.4f} < {minimum}")
        limit = limits.get("max_probability_error")
        error = result.get("max_probability_error")
        if limit is not None and error is not None and error > limit:
            failures.append(f"max probability error {error:.3g} > {limit:g}")
        return failures

    def check_failures(self, outputs: np.ndarray, reference: np.ndarray, tolerance: float) -> list[str]:
        outputs = np.asarray(outputs, dtype=np.float64)
        reference = np.asarray(reference, dtype=np.float64)
        if not np.isfinite(outputs).all():
            return ["non-finite outputs"]
        failures = []
        error = float(np.abs(outputs - reference).max())
        if error > tolerance:
            failures.append(f"max abs error {error:.3g} > {tolerance:.3g}")
        # Only voxels FP32 decided by more than the tolerance must keep their label: a precision within its
        # tolerance cannot move those, one that does is not the network that was validated.
        decisive = self._voxel_margins(reference) > tolerance
        changed = int(((self.labels_of(outputs) != self.labels_of(reference)) & decisive).sum())
        if changed:
            failures.append(f"labels differ from FP32 on {changed} of {int(decisive.sum())} decisive voxels of "
                            f"{len(reference)} check windows")
        return failures

    def _voxel_margins(self, reference: np.ndarray) -> np.ndarray:
        """Per voxel, how far its logits are from a different label, in output units (N, *spatial)."""
        ref = np.asarray(reference, dtype=np.float64)
        if self.activation == "sigmoid":
            cut = float(np.log(self.threshold / (1.0 - self.threshold)))
            return np.abs(ref - cut).min(axis=1)
        ordered = np.sort(ref, axis=1)
        return (ordered[:, -1] - ordered[:, -2]) / 2.0

    def margins(self, reference: np.ndarray) -> np.ndarray:
        """Per window: the median voxel margin (every window has boundary voxels near zero; the check asks
        decisive voxels only, so windows mostly decided clearly make good check vectors)."""
        margins = self._voxel_margins(reference)
        return np.median(margins.reshape(len(margins), -1), axis=1)

    def predicted_indices(self, outputs: np.ndarray) -> np.ndarray:
        """Per window: the most frequent non-background label (0 when only background), so check vectors
        cover every class the validation set shows."""
        labels = self.labels_of(outputs).reshape(len(outputs), -1)
        counts = np.stack([(labels == v).sum(axis=1) for v in range(self.label_count)], axis=1)
        counts[:, 0] = 0
        return np.where(counts.max(axis=1) > 0, counts.argmax(axis=1), 0)


def _argmax(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 index of the largest value along ``axis``, that value), first index on ties like numpy's argmax.

    One pass per class with running maxima: numpy's argmax over a short leading axis of a large volume
    walks it with a stride and is several times slower.
    """
    count = x.shape[axis]
    index = [slice(None)] * x.ndim

    def channel(k: int) -> np.ndarray:  # a view, not a copy (np.take would copy)
        index[axis] = k
        return x[tuple(index)]

    highest = np.array(channel(0), copy=True)
    best = np.zeros(highest.shape, dtype=np.uint8)
    better = np.empty(highest.shape, dtype=bool)
    for k in range(1, count):
        values = channel(k)
        np.greater(values, highest, out=better)
        np.copyto(best, np.uint8(k), where=better)
        np.maximum(highest, values, out=highest)
    return best, highest
