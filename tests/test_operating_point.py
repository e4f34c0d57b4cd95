"""Operating points for imbalanced binary tasks (issue 10.2): threshold choice, intervals, report metrics,
and the runtime's label using the threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medge.convert.operating_point import (MAX_INTERVAL_WIDTH, choose_operating_point, parse_operating_point)
from medge.errors import ConversionError
from medge.tasks import ClassificationTask
from medge.tasks.classification import average_precision


@pytest.mark.parametrize("text,expected", [("sensitivity=0.95", ("sensitivity", 0.95)),
                                           ("Specificity=0.9", ("specificity", 0.9)), ("youden", ("youden", None))])
def test_parse(text, expected):
    assert parse_operating_point(text) == expected


@pytest.mark.parametrize("text", ["recall=0.9", "sensitivity=1.5", "sensitivity=x", "youden=1", "sensitivity"])
def test_parse_refuses(text):
    with pytest.raises(ConversionError, match="operating-point"):
        parse_operating_point(text)


def _imbalanced(n_pos=60, n_neg=600, seed=0):
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.beta(5, 2, n_pos), rng.beta(2, 5, n_neg)]
    positives = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    return scores, positives


def _rates(scores, positives, threshold):
    called = scores >= threshold
    return (called & positives).sum() / positives.sum(), (~called & ~positives).sum() / (~positives).sum()


def test_sensitivity_target_is_met_with_the_best_specificity_that_keeps_it():
    scores, positives = _imbalanced()
    point = choose_operating_point(scores, positives, "sensitivity", 0.9)
    sens, spec = _rates(scores, positives, point.threshold)
    assert sens >= 0.9 and (point.sensitivity, point.specificity) == (sens, spec)
    # Brute force over every threshold: none keeps sensitivity >= 0.9 with a better specificity.
    best = max(_rates(scores, positives, t)[1] for t in np.r_[scores, 1.0] if _rates(scores, positives, t)[0] >= 0.9)
    assert spec == best
    # The threshold sits in a gap between validation scores, never on one.
    assert not np.isclose(scores, point.threshold, rtol=0, atol=1e-12).any()
    low, high = point.sensitivity_ci
    assert low <= sens <= high and point.positives == 60 and point.negatives == 600


def test_specificity_target_and_youden():
    scores, positives = _imbalanced(seed=1)
    point = choose_operating_point(scores, positives, "specificity", 0.95)
    assert _rates(scores, positives, point.threshold)[1] >= 0.95
    youden = choose_operating_point(scores, positives, "youden", None)
    j = sum(_rates(scores, positives, youden.threshold)) - 1
    assert j >= max(sum(_rates(scores, positives, t)) - 1 for t in scores) - 1e-12


def test_a_target_met_on_a_few_positives_is_reported_as_not_reliable():
    scores, positives = _imbalanced(n_pos=8, n_neg=200, seed=2)
    point = choose_operating_point(scores, positives, "sensitivity", 0.8)
    assert not point.reliable and "validate on more images" in point.note
    assert point.sensitivity_ci[1] - point.sensitivity_ci[0] > MAX_INTERVAL_WIDTH
    assert "NOT RELIABLE" in point.describe()


def test_a_perfect_rate_gets_a_wilson_interval_not_a_point():
    """All 64 positives found: the bootstrap would say [1, 1]; the Wilson interval says [0.943, 1]."""
    scores = np.r_[np.full(64, 0.9), np.full(64, 0.1)]
    positives = np.r_[np.ones(64, bool), np.zeros(64, bool)]
    point = choose_operating_point(scores, positives, "sensitivity", 0.95)
    assert point.sensitivity == 1.0 and point.sensitivity_ci[0] == pytest.approx(0.9434, abs=1e-3)
    assert 0.1 < point.threshold < 0.9  # the middle of the gap


def test_one_class_only_is_refused():
    with pytest.raises(ConversionError, match="both classes"):
        choose_operating_point(np.array([0.2, 0.8]), np.array([True, True]), "youden", None)


def test_average_precision_equals_its_definition():
    rng = np.random.default_rng(3)
    scores = rng.random(50).round(1)  # ties on purpose
    positives = rng.random(50) < 0.3
    # Definition: sum over distinct thresholds (descending) of precision x recall increment.
    expected, previous_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        called = scores >= t
        recall = (called & positives).sum() / positives.sum()
        precision = (called & positives).sum() / called.sum()
        expected += precision * (recall - previous_recall)
        previous_recall = recall
    assert average_precision(scores, positives) == pytest.approx(expected)
    assert average_precision(scores, np.zeros(50, bool)) is None


def test_the_label_uses_the_threshold_and_the_scores_are_unchanged():
    logits = np.array([[2.0, 0.0], [0.0, 0.1], [0.0, 3.0]])
    plain = ClassificationTask(classes=2, labels=("no", "yes"))
    strict = ClassificationTask(classes=2, labels=("no", "yes"), positive_class="yes", threshold=0.9)
    lenient = ClassificationTask(classes=2, labels=("no", "yes"), positive_class="yes", threshold=0.1)
    assert [label for _, _, label in plain.interpret(logits)] == ["no", "yes", "yes"]
    assert [label for _, _, label in strict.interpret(logits)] == ["no", "no", "yes"]
    assert [label for _, _, label in lenient.interpret(logits)] == ["yes", "yes", "yes"]
    np.testing.assert_array_equal(plain.scores(logits), strict.scores(logits))
    single = ClassificationTask(classes=1, labels=("no", "yes"), activation="sigmoid", threshold=0.8)
    assert single.predicted_indices(np.array([[1.0], [2.0]])).tolist() == [0, 1]  # sigmoid(1)=0.73, sigmoid(2)=0.88
    with pytest.raises(ConversionError, match="binary task"):
        ClassificationTask.for_outputs(["batch", 3], threshold=0.5)


def test_report_metrics_include_confusion_matrix_balanced_accuracy_and_pr_auc():
    task = ClassificationTask(classes=2, labels=("no", "yes"), positive_class="yes")
    logits = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 0, 1, 1, 1])
    metrics = task.metrics(logits, labels)
    assert metrics["confusion_matrix"] == [[2, 0], [1, 2]]
    assert metrics["per_class_recall"] == [1.0, pytest.approx(2 / 3)]
    assert metrics["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert metrics["sensitivity"] == pytest.approx(2 / 3) and metrics["specificity"] == 1.0
    assert metrics["pr_auc"] is not None


def test_demo_with_an_operating_point_end_to_end(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install "medge[convert]"')
    import medge
    from medge.cli.convert import main
    from medge.demo import write_demo_dicoms

    bundle = tmp_path / "op.medge"
    assert main(["--demo", "--engine", "none", "--precision", "fp32", "--operating-point", "sensitivity=0.95",
                 "-o", str(bundle)]) == 0
    assert "operating point sensitivity=0.95: threshold" in capsys.readouterr().out
    manifest = json.loads((bundle / "manifest.json").read_text())
    threshold = manifest["task"]["threshold"]
    assert manifest["operating_point"]["threshold"] == threshold and manifest["operating_point"]["sensitivity"] >= 0.95
    result = next(r for r in manifest["accuracy"]["results"] if r["precision"] == "fp32" and r["batch_size"] == 1)
    assert result["confusion_matrix"] and result["balanced_accuracy"] is not None and result["pr_auc"] is not None
    files, _ = write_demo_dicoms(tmp_path / "val", "validation", 16)
    with medge.load(bundle) as model:
        for prediction in model.predict_batch(files):
            assert prediction.label == ("lesion" if prediction.scores[1] >= threshold else "no_lesion")
    assert main(["--demo", "--engine", "none", "--operating-point", "recall=1", "-o", str(tmp_path / "x")]) == 2
