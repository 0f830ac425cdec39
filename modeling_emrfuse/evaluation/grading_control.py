"""The one-feature grading control: HGG vs LGG from the enhancing fraction of the (predicted) tumour.

Real gliomas show their grade in the enhancing tumour: ET is a median 23 % of the whole tumour in
high-grade and 1 % in low-grade BraTS 2018 cases. A grading figure is worth reading next to what this
single number, taken from the segmentation, achieves on the same cases: if the fusion model grades no
better, it has learned nothing beyond the segmentation.

:func:`grading_control` fits and scores the control on label maps; :func:`control_from_features` does
the same from enhancing fractions computed case by case.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..brats_labels import GRADES, get_label_convention

__all__ = [
    "enhancing_fraction",
    "ThresholdControl",
    "fit_threshold",
    "grading_control",
    "control_from_features",
    "FEATURE",
]

FEATURE = "enhancing_fraction"
"""Name of the control's feature in reports: ET voxels / whole-tumour voxels."""


def enhancing_fraction(label_map: Any, convention: str = "brats2017") -> float:
    """ET voxels / whole-tumour voxels of a label map (an array or a label-map file); NaN when it has no tumour."""
    if isinstance(label_map, (str, Path)):
        from ..brats_io import read_label_map

        label_map = read_label_map(label_map)[0]
    label = np.asarray(label_map)
    conv = get_label_convention(convention)
    n_wt = int(np.count_nonzero(np.isin(label, conv.regions["WT"])))
    if n_wt == 0:
        return float("nan")
    return float(np.count_nonzero(np.isin(label, conv.regions["ET"]))) / n_wt


def _grade_ids(grades: Sequence[Any], labels: Sequence[str] = GRADES) -> np.ndarray:
    """Grades as ids (0 = ``labels[0]``, 1 = ``labels[1]``), from ids or names."""
    ids = []
    for g in grades:
        if isinstance(g, str):
            if g not in labels:
                raise ValueError(f"unknown grade {g!r}: expected one of {tuple(labels)}")
            ids.append(list(labels).index(g))
        elif int(g) in (0, 1):
            ids.append(int(g))
        else:
            raise ValueError(f"grade id must be 0 or 1, got {g!r}")
    return np.asarray(ids, dtype=int)


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return 0.5 * (float(np.mean(pred[y == 0] == 0)) + float(np.mean(pred[y == 1] == 1)))


@dataclass(frozen=True)
class ThresholdControl:
    """A fitted one-feature rule: class 1 (LGG) when the feature is below ``threshold`` (``lgg_below``) or above it.

    Attributes:
        threshold: the decision threshold on the feature.
        lgg_below: direction learned on the training cases (``True``: LGG when feature < threshold).
        scale: spread of the training features (their standard deviation, at least 1e-6), the unit of the scores.
        train_balanced_accuracy: balanced accuracy of the rule on its training cases.
        fallback: the class given to a case without a feature value (no tumour): the training majority.
        n_train: number of training cases with a feature value.
    """

    threshold: float
    lgg_below: bool
    scale: float
    train_balanced_accuracy: float
    fallback: int
    n_train: int

    def predict(self, features: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
        """``(labels, scores)`` for ``features``: class ids, and P-like LGG scores in (0, 1).

        A score is ``sigmoid(+-(threshold - x) / scale)``: monotone in the feature, above 0.5 exactly when the
        case is predicted LGG; it ranks cases (ROC AUC) but is not a calibrated probability. A NaN feature gets
        the fallback class and the score 0.5 nudged to that side.
        """
        x = np.asarray(features, dtype=float)
        sign = 1.0 if self.lgg_below else -1.0
        z = sign * (self.threshold - x) / self.scale
        with np.errstate(over="ignore"):
            scores = 1.0 / (1.0 + np.exp(-z))
        labels = (z > 0).astype(int)
        missing = ~np.isfinite(x)
        labels[missing] = self.fallback
        scores[missing] = 0.5 + (0.01 if self.fallback == 1 else -0.01)
        return labels, scores


def _candidates(x: np.ndarray) -> np.ndarray:
    """Midpoints between consecutive distinct values, plus one threshold below and one above them all."""
    u = np.unique(x)
    return np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2.0, [u[-1] + 1.0]])


def fit_threshold(features: Sequence[float], grades: Sequence[Any], labels: Sequence[str] = GRADES) -> ThresholdControl:
    """Fit the threshold and direction that maximise the balanced accuracy on training cases.

    Candidates are the midpoints between consecutive distinct feature values; ties go to the first
    candidate in increasing threshold order, "LGG below" before "LGG above". Cases without a feature value
    (NaN) are left out of the fit. Raises ``ValueError`` unless both grades have a case with a feature value.
    """
    x = np.asarray(features, dtype=float)
    y = _grade_ids(grades, labels)
    if x.shape != y.shape:
        raise ValueError(f"{x.size} features but {y.size} grades")
    ok = np.isfinite(x)
    x, y_fit = x[ok], y[ok]
    if not (np.any(y_fit == 0) and np.any(y_fit == 1)):
        raise ValueError(f"the control needs training cases of both grades {tuple(labels)} with a tumour")
    best: Optional[Tuple[float, float, bool]] = None
    for t in _candidates(x):
        for lgg_below in (True, False):
            pred = (x < t) if lgg_below else (x > t)
            bacc = _balanced_accuracy(y_fit, pred.astype(int))
            if best is None or bacc > best[0]:
                best = (bacc, float(t), lgg_below)
    bacc, t, lgg_below = best  # type: ignore[misc]
    fallback = int(np.mean(y == 1) > 0.5)
    return ThresholdControl(
        threshold=t,
        lgg_below=lgg_below,
        scale=max(float(np.std(x)), 1e-6),
        train_balanced_accuracy=bacc,
        fallback=fallback,
        n_train=int(x.size),
    )


def grading_control(
    train_label_maps: Sequence[Any],
    train_grades: Sequence[Any],
    test_label_maps: Sequence[Any],
    test_grades: Optional[Sequence[Any]] = None,
    *,
    convention: str = "brats2017",
    labels: Sequence[str] = GRADES,
) -> Dict[str, Any]:
    """The control on lists of label maps (arrays or files): fit on the training cases, predict the held-out ones.

    Three steps: :func:`enhancing_fraction` (ET voxels / whole-tumour voxels of a label map, NaN without
    tumour); :func:`fit_threshold` (on the training cases, the threshold and its direction, LGG below or
    above, that maximise the balanced accuracy over the midpoints between consecutive distinct values);
    :meth:`ThresholdControl.predict` (labels and P-like LGG scores for held-out cases). The held-out
    predictions are scored with :func:`~modeling_emrfuse.evaluation.metrics.classification_metrics`.

    Pass the label maps the grading model is compared on: on held-out cases the predicted label maps (the
    segmentation alone), on training cases the reference or predicted ones as the model itself was fitted.

    Returns:
        ``{"feature", "rule", "train_features", "test_features", "predictions", "scores", "metrics"}``:
        ``rule`` is the fitted :class:`ThresholdControl` as a dict; ``predictions`` grade names; ``scores`` the
        P-like LGG scores; ``metrics`` :func:`classification_metrics` of the held-out predictions (hard labels,
        so log loss and Brier are NaN: the scores are not probabilities) with ``roc_auc`` of the scores
        (``None`` without ``test_grades``).
    """
    train_x = [enhancing_fraction(m, convention) for m in train_label_maps]
    test_x = [enhancing_fraction(m, convention) for m in test_label_maps]
    return control_from_features(train_x, train_grades, test_x, test_grades, labels=labels)


def control_from_features(
    train_features: Sequence[float],
    train_grades: Sequence[Any],
    test_features: Sequence[float],
    test_grades: Optional[Sequence[Any]] = None,
    *,
    labels: Sequence[str] = GRADES,
) -> Dict[str, Any]:
    """:func:`grading_control` on enhancing fractions already computed (e.g. per case during an evaluation)."""
    from .metrics import classification_metrics

    train_x = [float(v) for v in train_features]
    test_x = [float(v) for v in test_features]
    rule = fit_threshold(train_x, train_grades, labels)
    pred, scores = rule.predict(test_x)
    metrics = None
    if test_grades is not None:
        y = _grade_ids(test_grades, labels)
        metrics = classification_metrics(y, y_pred=pred, labels=labels)
        metrics["roc_auc"] = classification_metrics(y, scores, labels=labels)["roc_auc"]  # AUC of the scores
    return {
        "feature": FEATURE,
        "rule": asdict(rule),
        "train_features": train_x,
        "test_features": test_x,
        "predictions": [labels[int(p)] for p in pred],
        "scores": [float(s) for s in scores],
        "metrics": metrics,
    }
