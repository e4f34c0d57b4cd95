"""Operating points for binary tasks: the decision threshold chosen on the validation set for a stated target.

Argmax at 0.5 is rarely the threshold a radiologist signs off: diagnostic
classes are imbalanced and the cost of a miss differs from that of a false
alarm. ``--operating-point`` chooses the threshold on the FP32 scores of the
labelled validation set:

- ``sensitivity=0.95``: the best specificity whose sensitivity is at least
  0.95 (among equals, the best sensitivity);
- ``specificity=0.90``: the best sensitivity whose specificity is at least
  0.90 (among equals, the best specificity);
- ``youden``: the threshold maximising sensitivity + specificity - 1.

The threshold is placed in the middle of the gap between the validation
scores it separates, so small score shifts (FP16, INT8, another machine) do
not flip the decision of an image that sat on it.

At that threshold, 95% confidence intervals for sensitivity and specificity
come from a percentile bootstrap over the validation cases (seeded, so the
report is reproducible); a rate of exactly 0 or 1, where the bootstrap
collapses to a point, gets the Wilson score interval instead. A target met on a handful of positives is not
evidence: when the interval of the targeted measure is wider than
``MAX_INTERVAL_WIDTH`` the operating point is recorded as not reliable, with
the reason, and the converter says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from ..errors import ConversionError

TARGETS = ("sensitivity", "specificity", "youden")
#: Bootstrap resamples for the intervals.
BOOTSTRAP_SAMPLES = 2000
#: An interval wider than this (on the targeted measure) is reported as too wide for the validation set.
MAX_INTERVAL_WIDTH = 0.10
_SEED = 20261206


@dataclass(frozen=True)
class OperatingPoint:
    """A chosen threshold and what it achieves on the validation set (FP32)."""

    target: str
    goal: Optional[float]
    threshold: float
    sensitivity: float
    specificity: float
    sensitivity_ci: tuple
    specificity_ci: tuple
    positives: int
    negatives: int
    reliable: bool
    note: str

    def to_manifest(self) -> dict:
        data = asdict(self)
        data["sensitivity_ci"] = list(self.sensitivity_ci)
        data["specificity_ci"] = list(self.specificity_ci)
        return data

    def describe(self) -> str:
        goal = f"{self.target}={self.goal}" if self.goal is not None else self.target
        return (f"operating point {goal}: threshold {self.threshold:.4g} on the positive score; sensitivity "
                f"{self.sensitivity:.3f} (95% CI {self.sensitivity_ci[0]:.3f}-{self.sensitivity_ci[1]:.3f}), "
                f"specificity {self.specificity:.3f} (95% CI {self.specificity_ci[0]:.3f}-"
                f"{self.specificity_ci[1]:.3f}) on {self.positives} positive and {self.negatives} negative "
                f"validation images" + ("" if self.reliable else f"; NOT RELIABLE: {self.note}"))


def parse_operating_point(text: str) -> tuple[str, Optional[float]]:
    """'sensitivity=0.95' -> ("sensitivity", 0.95); 'youden' -> ("youden", None).

    Raises:
        ConversionError: an unknown target or a goal outside (0, 1).
    """
    name, _, value = str(text).strip().partition("=")
    name = name.strip().lower()
    if name not in TARGETS:
        raise ConversionError(f"--operating-point must be sensitivity=X, specificity=X or youden, got {text!r}")
    if name == "youden":
        if value:
            raise ConversionError("--operating-point youden takes no value")
        return name, None
    try:
        goal = float(value)
    except ValueError:
        raise ConversionError(f"--operating-point {name}= needs a fraction, e.g. {name}=0.95, got {text!r}") from None
    if not 0.0 < goal < 1.0:
        raise ConversionError(f"--operating-point {name} must lie strictly between 0 and 1, got {goal}")
    return name, goal


def _rates(scores: np.ndarray, positives: np.ndarray, threshold: float) -> tuple[float, float]:
    called = scores >= threshold
    sensitivity = float((called & positives).sum() / positives.sum())
    specificity = float((~called & ~positives).sum() / (~positives).sum())
    return sensitivity, specificity


def choose_operating_point(scores: np.ndarray, positives: np.ndarray, target: str,
                           goal: Optional[float]) -> OperatingPoint:
    """The threshold on ``scores`` (positive class, in [0, 1]) for ``target``, with bootstrap intervals.

    Raises:
        ConversionError: one class is missing from the labels, or the target cannot be met.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        raise ConversionError("an operating point needs validation labels with both classes "
                              f"({n_pos} positive, {n_neg} negative)")
    # Candidate thresholds: each distinct score (calling it and everything above positive), plus one above
    # the maximum (nothing positive). Sensitivity falls and specificity rises as the threshold rises.
    candidates = np.unique(scores)
    candidates = np.r_[candidates, np.nextafter(candidates[-1], np.inf)]
    rates = np.array([_rates(scores, positives, t) for t in candidates])
    sensitivity, specificity = rates[:, 0], rates[:, 1]
    if target == "sensitivity":
        # The best specificity that keeps the target; among equals, the best sensitivity.
        ok = np.flatnonzero(sensitivity >= goal)
        index = int(ok[np.lexsort((-sensitivity[ok], -specificity[ok]))[0]])
    elif target == "specificity":
        ok = np.flatnonzero(specificity >= goal)
        if not len(ok):
            raise ConversionError(f"no threshold reaches specificity {goal} on the validation set")
        index = int(ok[np.lexsort((-specificity[ok], -sensitivity[ok]))[0]])
    else:
        youden = sensitivity + specificity - 1.0
        index = int(np.flatnonzero(youden == youden.max())[0])
    # Calling "score >= candidates[index]" positive is the same, on the validation set, as any threshold in
    # the gap above the next lower score. Take the middle of that gap: the decision then survives the small
    # score shifts of FP16 / INT8 and of other machines, instead of sitting on a validation image's score.
    low = candidates[index - 1] if index > 0 else 0.0
    threshold = float((low + candidates[index]) / 2.0)
    # A threshold of exactly 0 or 1 would make the label ignore the score: keep it strictly inside (0, 1).
    threshold = min(max(threshold, 1e-12), 1.0 - 1e-12)
    sens, spec = _rates(scores, positives, threshold)
    sens_ci, spec_ci = _bootstrap(scores, positives, threshold)
    targeted = {"sensitivity": sens_ci, "specificity": spec_ci}.get(target)
    widths = [sens_ci[1] - sens_ci[0], spec_ci[1] - spec_ci[0]] if targeted is None else [targeted[1] - targeted[0]]
    reliable = max(widths) <= MAX_INTERVAL_WIDTH
    note = "" if reliable else (
        f"the 95% interval of the {'targeted measure' if targeted is not None else 'sensitivity or specificity'} "
        f"is {max(widths):.2f} wide (> {MAX_INTERVAL_WIDTH}) on {n_pos} positive and {n_neg} negative images: "
        "validate on more images before relying on this threshold")
    return OperatingPoint(target, goal, threshold, sens, spec, sens_ci, spec_ci, n_pos, n_neg, reliable, note)


def _bootstrap(scores: np.ndarray, positives: np.ndarray, threshold: float) -> tuple[tuple, tuple]:
    """95% intervals of sensitivity and specificity at a fixed threshold: percentile bootstrap resampling
    cases within each class (so every resample has both classes).

    When every case of a class is called the same way (a rate of exactly 0 or 1), every resample gives that
    rate and the bootstrap interval collapses to a point, which would claim certainty from, say, 12
    positives. The Wilson score interval is used for that rate instead.
    """
    rng = np.random.default_rng(_SEED)
    called = scores >= threshold
    intervals = []
    for hits in (called[positives], ~called[~positives]):  # sensitivity, specificity
        if hits.all() or not hits.any():
            intervals.append(_wilson(int(hits.sum()), len(hits)))
            continue
        resamples = hits[rng.integers(0, len(hits), size=(BOOTSTRAP_SAMPLES, len(hits)))].mean(axis=1)
        intervals.append((float(np.percentile(resamples, 2.5)), float(np.percentile(resamples, 97.5))))
    return intervals[0], intervals[1]


def _wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion (Wilson 1927), well defined at 0 and n successes."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))
