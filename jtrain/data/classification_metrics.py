"""The metrics HF's `run_classification.py` loads from `evaluate`, computed here (jtrain never downloads).

The script reports `accuracy` for classes, `mse` for a regression and micro-averaged `f1` for multi-label
data, or the metric `--metric_name` names, with `evaluate`'s definitions: single-label predictions are the
argmax, multi-label ones the logits above 0 (sigmoid above 0.5), regression ones the one output. As there,
f1/precision/recall on single-label data are binary (class 1 positive), which needs two classes.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jtrain.errors import ConfigError

REGRESSION_METRICS = ("mse", "mae", "pearsonr", "spearmanr")
CLASS_METRICS = ("accuracy", "f1", "precision", "recall", "matthews_correlation")
METRIC_NAMES = CLASS_METRICS + REGRESSION_METRICS


def check_metric_name(name: str) -> None:
    if name not in METRIC_NAMES:
        raise ConfigError(f"metric_name {name!r}: jtrain computes {', '.join(METRIC_NAMES)} (HF evaluate's names) "
                          "itself and loads no others; pass a compute_metrics of your own to the Trainer for more")


def metrics_function(problem_type: str, metric_name: str | None, num_labels: int) -> Callable | None:
    """compute_metrics(EvalPrediction) -> {metric: value} for the data's problem type; None where the Trainer's
    own evaluation already reports it (single-label accuracy, counted on the device)."""
    regression = problem_type == "regression"
    name = metric_name or ("mse" if regression else "f1" if problem_type == "multi_label_classification" else None)
    if name is None or (name == "accuracy" and problem_type == "single_label_classification"):
        return None
    check_metric_name(name)
    if regression != (name in REGRESSION_METRICS):
        kind = "a regression" if regression else "classes"
        raise ConfigError(f"metric_name {name!r} does not score {kind}; use one of "
                          f"{', '.join(REGRESSION_METRICS if regression else CLASS_METRICS)}")
    if problem_type == "single_label_classification" and name in ("f1", "precision", "recall") and num_labels != 2:
        raise ConfigError(f"metric_name {name!r} is binary (as evaluate's default) and the data has {num_labels} "
                          "classes; use accuracy or matthews_correlation")

    def compute(pred) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        logits, labels = np.asarray(logits, np.float64), np.asarray(pred.label_ids)
        if regression:
            return {name: _regression(name, logits.reshape(-1), labels.reshape(-1).astype(np.float64))}
        if problem_type == "multi_label_classification":
            return {name: _classes(name, (logits > 0).astype(int), labels.astype(int), multi_label=True)}
        return {name: _classes(name, logits.argmax(-1), labels.astype(int), multi_label=False)}

    return compute


def _regression(name: str, predictions: np.ndarray, targets: np.ndarray) -> float:
    if name == "mse":
        return float(np.mean((predictions - targets) ** 2))
    if name == "mae":
        return float(np.mean(np.abs(predictions - targets)))
    if name == "spearmanr":
        from scipy.stats import rankdata

        predictions, targets = rankdata(predictions), rankdata(targets)
    return float(np.corrcoef(predictions, targets)[0, 1])


def _classes(name: str, predictions: np.ndarray, labels: np.ndarray, multi_label: bool) -> float:
    """evaluate's definitions: subset accuracy for multi-label, micro averages of its 0/1 entries."""
    if name == "accuracy":
        same = predictions == labels
        return float(np.mean(same.all(axis=-1) if multi_label else same))
    if name == "matthews_correlation":
        return _matthews(predictions.reshape(-1), labels.reshape(-1))
    positive = (predictions == 1, labels == 1)
    tp = float(np.sum(positive[0] & positive[1]))
    fp, fn = float(np.sum(positive[0])) - tp, float(np.sum(positive[1])) - tp
    if name == "precision":
        return tp / (tp + fp) if tp + fp else 0.0
    if name == "recall":
        return tp / (tp + fn) if tp + fn else 0.0
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """sklearn's multiclass Matthews correlation from the confusion matrix (0 where it is undefined)."""
    classes = np.union1d(predictions, labels)
    confusion = np.zeros((len(classes), len(classes)))
    np.add.at(confusion, (np.searchsorted(classes, labels), np.searchsorted(classes, predictions)), 1)
    t, p, c, s = confusion.sum(axis=1), confusion.sum(axis=0), np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator else 0.0
