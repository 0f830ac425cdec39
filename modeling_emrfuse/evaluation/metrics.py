"""Segmentation and grading metrics, defined once for the whole project.

Segmentation: Dice, PPV, sensitivity and HD95 per case and region (WT / TC / ET), in 3D at the
header's voxel spacing, exactly as MedPy computes them, with the BraTS conventions for empty masks
(:func:`region_metrics`), optional lesion-wise metrics (:mod:`.lesion_metrics`) and cohort summaries
(:func:`aggregate`). Grading: :func:`classification_metrics`. How to score folders from the shell:
README, "Score predictions from any tool".

numpy and scipy only (panoptica for the lesion-wise metrics, imported when asked for); a local tool
that does not travel to the Hub with the model code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

from ..brats_labels import GRADES, HD95_EMPTY_SENTINEL_MM, REGIONS, get_label_convention, label_map_to_regions
from .lesion_metrics import LESION_COUNTS, LESION_METRICS, lesion_wise_metrics

__all__ = [
    "METRICS",
    "VOXEL_COUNTS",
    "LESION_METRICS",
    "BRATS_METRIC_DIR",
    "dice",
    "ppv",
    "sensitivity",
    "hd95",
    "surface_distances",
    "region_metrics",
    "score_label_maps",
    "metrics_to_row",
    "aggregate",
    "bootstrap_mean_ci",
    "classification_metrics",
]

METRICS: Tuple[str, ...] = ("dice", "ppv", "sensitivity", "hd95")
"""Per-region segmentation metrics, in reporting order."""

VOXEL_COUNTS: Tuple[str, ...] = ("ref_voxels", "pred_voxels")
"""Per-region voxel counts of the reference and the prediction (region presence, volume)."""

BRATS_METRIC_DIR: Path = Path(__file__).resolve().parent / "brats_metric"
"""Folder of the ``evaluate`` metric: ``evaluate.load(str(BRATS_METRIC_DIR))``."""

SpacingLike = Union[float, Sequence[float]]


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def _as_mask(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise ValueError(f"{name}: expected a mask array, got a scalar.")
    return arr if arr.dtype == bool else arr.astype(bool)


def _mask_pair(pred: Any, ref: Any) -> Tuple[np.ndarray, np.ndarray]:
    p, r = _as_mask(pred, "prediction"), _as_mask(ref, "reference")
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {r.shape}.")
    return p, r


def _spacing(spacing: Optional[SpacingLike], ndim: int) -> Tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    sp = np.atleast_1d(np.asarray(spacing, dtype=np.float64)).ravel()
    if sp.size == 1:
        sp = np.repeat(sp, ndim)
    if sp.size != ndim:
        raise ValueError(f"spacing {tuple(sp.tolist())} has {sp.size} values for a {ndim}-D mask.")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing {tuple(sp.tolist())} must be finite and positive (mm per voxel).")
    return tuple(float(s) for s in sp)


def _counts(p: np.ndarray, r: np.ndarray) -> Tuple[int, int, int]:
    tp = int(np.count_nonzero(p & r))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(r)) - tp


def _dice(tp: int, fp: int, fn: int) -> float:
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2.0 * tp / denom


def _ppv(tp: int, fp: int, fn: int) -> float:
    if tp + fp == 0:  # empty prediction: 1 only if nothing was missed (empty reference)
        return 1.0 if fn == 0 else 0.0
    return tp / (tp + fp)


def _sensitivity(tp: int, fp: int, fn: int) -> float:
    if tp + fn == 0:  # empty reference: nothing to miss
        return 1.0
    return tp / (tp + fn)


# --------------------------------------------------------------------------------------------
# overlap metrics
# --------------------------------------------------------------------------------------------
def dice(pred: Any, ref: Any) -> float:
    """Dice = 2TP / (2TP + FP + FN); 1.0 when both masks are empty, 0.0 when exactly one is."""
    return _dice(*_counts(*_mask_pair(pred, ref)))


def ppv(pred: Any, ref: Any) -> float:
    """Positive predictive value (precision) TP / (TP + FP).

    With an empty prediction the ratio is undefined: 1.0 if the reference is empty too (nothing
    was missed), else 0.0.
    """
    return _ppv(*_counts(*_mask_pair(pred, ref)))


def sensitivity(pred: Any, ref: Any) -> float:
    """Sensitivity (recall) TP / (TP + FN); 1.0 with an empty reference (nothing to miss)."""
    return _sensitivity(*_counts(*_mask_pair(pred, ref)))


# --------------------------------------------------------------------------------------------
# HD95
# --------------------------------------------------------------------------------------------
def _union_box(p: np.ndarray, r: np.ndarray) -> Tuple[slice, ...]:
    """Bounding box of ``p | r`` grown by one voxel on each side, clipped to the array."""
    union = p | r
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other) if other else union)
        box.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, union.shape[axis])))
    return tuple(box)


def _surface(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    # MedPy: result ^ binary_erosion(result, structure=footprint, iterations=1) (border_value=0)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1, border_value=0)


def _cropped_surface_distances(p: np.ndarray, r: np.ndarray, sp: Tuple[float, ...]) -> Tuple[np.ndarray, np.ndarray]:
    """Surface distances of two non-empty masks already cropped to their union box (+1 voxel)."""
    structure = ndimage.generate_binary_structure(p.ndim, 1)
    p_surf, r_surf = _surface(p, structure), _surface(r, structure)
    to_ref = ndimage.distance_transform_edt(~r_surf, sampling=sp)[p_surf]
    to_pred = ndimage.distance_transform_edt(~p_surf, sampling=sp)[r_surf]
    return to_ref, to_pred


def _crop(p: np.ndarray, r: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    box = _union_box(p, r)
    return np.ascontiguousarray(p[box]), np.ascontiguousarray(r[box])


def surface_distances(pred: Any, ref: Any, spacing: Optional[SpacingLike] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``pred`` to the surface of ``ref`` and back.

    Returns ``(pred_to_ref, ref_to_pred)`` (each in C order of the surface voxels); both masks
    must be non-empty (``ValueError`` otherwise). Surfaces and distances as in MedPy.
    """
    p, r = _mask_pair(pred, ref)
    if not p.any() or not r.any():
        raise ValueError("surface distances need two non-empty masks.")
    sp = _spacing(spacing, p.ndim)
    return _cropped_surface_distances(*_crop(p, r), sp)


def _hd95_cropped(p: np.ndarray, r: np.ndarray, sp: Tuple[float, ...]) -> float:
    to_ref, to_pred = _cropped_surface_distances(p, r, sp)
    return float(np.percentile(np.concatenate((to_ref, to_pred)), 95))


def hd95(pred: Any, ref: Any, spacing: Optional[SpacingLike] = (1.0, 1.0, 1.0)) -> float:
    """95th percentile Hausdorff distance in mm (MedPy's ``hd95`` with ``connectivity=1``).

    The 95th percentile of the pooled surface-to-surface distances in both directions, where the
    surface of a mask is the mask minus its erosion with the 6-connected (face) structuring element,
    voxels outside the array counting as background (``border_value=0``), and distances are
    Euclidean in millimetres with the (possibly anisotropic) voxel spacing. It is computed on the
    bounding box of both masks plus one voxel, which gives MedPy's numbers exactly (every surface
    voxel lies in that box, and the box's outer layer is background or the array border) at a
    fraction of the cost.

    ``spacing`` is the voxel size per axis (a single number means isotropic). Both masks empty:
    0.0; exactly one empty: :data:`~.brats_labels.HD95_EMPTY_SENTINEL_MM` (373.13 mm, the diagonal of
    the 240 x 240 x 155 BraTS box; not rescaled by the voxel spacing).
    """
    p, r = _mask_pair(pred, ref)
    sp = _spacing(spacing, p.ndim)
    p_any, r_any = bool(p.any()), bool(r.any())
    if not p_any and not r_any:
        return 0.0
    if not p_any or not r_any:
        return float(HD95_EMPTY_SENTINEL_MM)
    return _hd95_cropped(*_crop(p, r), sp)


def _all_metrics(p: np.ndarray, r: np.ndarray, sp: Tuple[float, ...]) -> Dict[str, float]:
    """The four metrics of one region, counting once on the union box (nothing outside it)."""
    p_any, r_any = bool(p.any()), bool(r.any())
    if not p_any and not r_any:
        return {"dice": 1.0, "ppv": 1.0, "sensitivity": 1.0, "hd95": 0.0, "ref_voxels": 0, "pred_voxels": 0}
    pc, rc = _crop(p, r)
    tp, fp, fn = counts = _counts(pc, rc)
    return {
        "dice": _dice(*counts),
        "ppv": _ppv(*counts),
        "sensitivity": _sensitivity(*counts),
        "hd95": _hd95_cropped(pc, rc, sp) if (p_any and r_any) else float(HD95_EMPTY_SENTINEL_MM),
        "ref_voxels": tp + fn,
        "pred_voxels": tp + fp,
    }


# --------------------------------------------------------------------------------------------
# per case
# --------------------------------------------------------------------------------------------
def region_metrics(
    pred_regions: Any,
    ref_regions: Any,
    spacing: Optional[SpacingLike] = (1.0, 1.0, 1.0),
    regions: Sequence[str] = REGIONS,
    lesion_wise: bool = False,
) -> Dict[str, Dict[str, float]]:
    """All metrics for each region: ``{region: {"dice", "ppv", "sensitivity", "hd95", "ref_voxels", "pred_voxels"}}``.

    ``pred_regions`` / ``ref_regions`` are channel-first region masks ``(len(regions), X, Y, Z)``
    in :data:`~.brats_labels.REGIONS` order (WT, TC, ET), any numeric / boolean arrays (non-zero is
    foreground, as in MedPy); ``spacing`` is the voxel size in mm. Dice = 2TP / (2TP + FP + FN);
    PPV = TP / (TP + FP); sensitivity = TP / (TP + FN); HD95 as :func:`hd95`. Empty masks follow
    the BraTS conventions:

    ============================  =====  ===  ===========  ==============
    prediction / reference        Dice   PPV  sensitivity  HD95 (mm)
    ============================  =====  ===  ===========  ==============
    both empty                    1      1    1            0
    prediction empty, ref. not    0      0    0            373.13
    reference empty, pred. not    0      0    1            373.13
    ============================  =====  ===  ===========  ==============

    (a ratio whose denominator is 0 is 1 when nothing was missed, i.e. no false negative, else 0).
    The voxel counts ``ref_voxels`` / ``pred_voxels`` let a summary tell cases where the region
    exists in the reference from cases where it does not (:mod:`modeling_emrfuse.evaluation.report`:
    Dice over region-present cases and false-positive cases). ``lesion_wise=True`` adds
    :data:`LESION_METRICS` (panoptica configured as the official BraTS 2023+ evaluation, an optional
    dependency; see :mod:`~.lesion_metrics`).
    """
    p = _as_mask(pred_regions, "prediction regions")
    r = _as_mask(ref_regions, "reference regions")
    n = len(regions)
    for name, arr in (("prediction regions", p), ("reference regions", r)):
        if arr.ndim < 2 or arr.shape[0] != n:
            raise ValueError(f"{name}: expected shape ({n}, X, Y, Z) with channels {tuple(regions)}, got {arr.shape}.")
    if p.shape != r.shape:
        raise ValueError(f"prediction regions shape {p.shape} differs from reference regions shape {r.shape}.")
    sp = _spacing(spacing, p.ndim - 1)
    out: Dict[str, Dict[str, float]] = {}
    for i, region in enumerate(regions):
        out[region] = _all_metrics(p[i], r[i], sp)
    if lesion_wise:
        for region, values in lesion_wise_metrics(p, r, sp, regions).items():
            out[region].update(values)
    return out


def score_label_maps(
    pred: Any,
    ref: Any,
    pred_convention: str,
    ref_convention: Optional[str] = None,
    spacing: Optional[SpacingLike] = (1.0, 1.0, 1.0),
    lesion_wise: bool = False,
) -> Dict[str, Dict[str, float]]:
    """Score a predicted label map against a reference label map, region by region.

    Each map is turned into WT / TC / ET masks with its own label convention (``"brats2015"``,
    ``"brats2017"``, ``"brats2023"`` or a release year; ``ref_convention=None`` means the same as
    the prediction's), so maps in different conventions compare correctly. Label values outside
    a convention raise ``ValueError``. Returns :func:`region_metrics`'s dict (with the lesion-wise
    metrics when ``lesion_wise=True``).
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction label map shape {pred.shape} differs from reference shape {ref.shape}.")
    pconv = get_label_convention(pred_convention)
    rconv = pconv if ref_convention is None else get_label_convention(ref_convention)
    p = label_map_to_regions(pred, pconv, where=f"prediction label map ({pconv.name})")
    r = label_map_to_regions(ref, rconv, where=f"reference label map ({rconv.name})")
    return region_metrics(p, r, spacing, lesion_wise=lesion_wise)


def metrics_to_row(result: Mapping[str, Mapping[str, float]]) -> Dict[str, float]:
    """Flatten ``{region: {metric: v}}`` into ``{"<region>_<metric>": v}`` (CSV / logging order).

    Columns: :data:`METRICS`, then :data:`VOXEL_COUNTS` (ints), then :data:`LESION_METRICS` when
    present (counts as ints), region by region.
    """
    row: Dict[str, float] = {}
    for region, values in result.items():
        for metric in METRICS + VOXEL_COUNTS + LESION_METRICS:
            if metric in values:
                v = values[metric]
                row[f"{region}_{metric}"] = int(v) if metric in VOXEL_COUNTS + LESION_COUNTS else float(v)
    return row


# --------------------------------------------------------------------------------------------
# cohort
# --------------------------------------------------------------------------------------------
def _row_value(row: Mapping[str, Any], region: str, metric: str) -> Any:
    if region in row and isinstance(row[region], Mapping):
        return row[region].get(metric)
    return row.get(f"{region}_{metric}")


def aggregate(
    per_case: Union[Sequence[Mapping[str, Any]], Mapping[str, Mapping[str, Any]]],
    regions: Sequence[str] = REGIONS,
    metrics: Sequence[str] = METRICS,
    ddof: int = 1,
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Mean, standard deviation and median of each metric per region over cases.

    ``per_case`` is a list of per-case results, each either nested (``{region: {metric: v}}``, as
    :func:`region_metrics` returns) or flat (``{"WT_dice": v, ...}``, extra keys such as
    ``case_id`` ignored), or a dict ``case_id -> result``. Returns
    ``{region: {metric: {"mean", "std", "median", "n"}}}``; ``std`` uses ``ddof`` (default 1, the
    sample standard deviation; NaN for fewer than ``ddof + 1`` cases). A missing or non-finite
    value raises ``ValueError`` (nothing is dropped silently); zero cases gives NaN statistics
    with ``n = 0``. Sentinel HD95 values are included, as in the BraTS ranking.
    """
    rows = list(per_case.values()) if isinstance(per_case, Mapping) else list(per_case)
    names = list(per_case.keys()) if isinstance(per_case, Mapping) else list(range(len(rows)))
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for region in regions:
        out[region] = {}
        for metric in metrics:
            vals = []
            for name, row in zip(names, rows):
                v = _row_value(row, region, metric)
                try:
                    value = float(v)
                except (TypeError, ValueError):
                    value = math.nan
                if not math.isfinite(value):
                    raise ValueError(f"case {name!r}: {region} {metric} is missing or not finite ({v!r}).")
                vals.append(value)
            arr = np.asarray(vals, dtype=np.float64)
            n = arr.size
            out[region][metric] = {
                "mean": float(arr.mean()) if n else math.nan,
                "std": float(arr.std(ddof=ddof)) if n > ddof else math.nan,
                "median": float(np.median(arr)) if n else math.nan,
                "n": int(n),
            }
    return out


# --------------------------------------------------------------------------------------------
# grading
# --------------------------------------------------------------------------------------------
def bootstrap_mean_ci(
    values: Sequence[float], confidence: float = 0.95, n_resamples: int = 10000, seed: int = 0
) -> Tuple[float, float, float]:
    """Mean of ``values`` and its percentile bootstrap confidence interval: ``(mean, low, high)``.

    Cases are resampled with replacement ``n_resamples`` times (fixed ``seed``: the same values give
    the same interval); NaN values are left out. One value gives ``(v, v, v)``; none gives NaNs.
    With few cases the interval is wide and only approximate: it says how much the mean could
    move with other cases, not more.
    """
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(int(n_resamples), x.size))].mean(axis=1)
    alpha = (1.0 - float(confidence)) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(low), float(high)


def _class_ids(y: Any, labels: Sequence[str], name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of class ids or names, got shape {arr.shape}.")
    k = len(labels)
    if arr.dtype.kind == "O" and all(isinstance(v, (int, np.integer)) for v in arr.tolist()):
        arr = arr.astype(np.int64)
    if arr.dtype.kind in ("U", "S", "O") and arr.size:
        lookup = {str(lab): i for i, lab in enumerate(labels)}
        bad = sorted({str(v) for v in arr.tolist() if str(v) not in lookup})
        if bad:
            raise ValueError(
                f"{name}: unknown class names {bad}; expected names from {list(labels)} or ids 0..{k - 1}."
            )
        return np.asarray([lookup[str(v)] for v in arr.tolist()], dtype=np.int64)
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.int64)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name}: class ids must be whole numbers.")
    ids = arr.astype(np.int64)
    bad = sorted(set(ids.tolist()) - set(range(k)))
    if bad:
        raise ValueError(f"{name}: class ids {bad} outside 0..{k - 1} (labels {list(labels)}).")
    return ids


def _binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney ROC AUC (ties count one half); NaN when one class is absent."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(
    y_true: Any,
    y_prob: Any = None,
    *,
    y_pred: Any = None,
    labels: Sequence[str] = GRADES,
    threshold: float = 0.5,
) -> Dict[str, Any]:
    """Case-level grading metrics.

    Args:
        y_true: true classes, ids ``0..K-1`` or names from ``labels``.
        y_prob: probabilities (or any scores): ``(N,)`` for two classes, the score of class id 1
            (``labels[1]``, LGG by default), predicted class 1 when ``> threshold``; or ``(N, K)``,
            predicted class = argmax. Integer / string / boolean arrays passed here are read as hard
            predictions (same as ``y_pred``).
        y_pred: hard predicted classes (ids or names); ROC AUC is then NaN.
        labels: class names in id order (default :data:`~.brats_labels.GRADES`).
        threshold: decision threshold for ``(N,)`` probabilities.

    Returns:
        ``{"n", "labels", "accuracy", "balanced_accuracy", "roc_auc", "f1", "f1_per_class",
        "confusion_matrix", "log_loss", "brier"}``. ``balanced_accuracy`` is the mean recall over the
        classes present in ``y_true``. ``roc_auc`` is binary AUC of the class-1 score (symmetric in the
        choice of positive class), or with ``(N, K)`` scores and ``K > 2`` the macro one-vs-rest
        AUC over the classes present in ``y_true``; it is NaN (not an error) when ``y_true`` holds
        a single class, because AUC is undefined there. ``f1`` is the macro F1 (a class with no true
        and no predicted case scoring 0, as in scikit-learn).
        ``confusion_matrix[i][j]`` counts cases of true class ``i`` predicted as ``j``.
        ``log_loss`` (mean negative log-probability of the true class, probabilities clipped to
        ``[1e-15, 1]``) and ``brier`` (mean over cases of ``0.5 * sum_k (p_k - [k = y])^2``, for two
        classes the usual ``(p - y)^2``) say how well calibrated the probabilities are; they are NaN for
        hard predictions and for scores that are not probabilities (values outside ``[0, 1]``, or
        ``(N, K)`` rows that do not sum to 1).
    """
    labels = tuple(str(lab) for lab in labels)
    k = len(labels)
    if k < 2:
        raise ValueError(f"labels: need at least two classes, got {list(labels)}.")
    true = _class_ids(y_true, labels, "y_true")
    n = true.size
    if n == 0:
        raise ValueError("y_true is empty.")
    if (y_prob is None) == (y_pred is None):
        raise ValueError("pass exactly one of y_prob (probabilities / scores) or y_pred (hard predictions).")
    scores, pred = _scores_and_predictions(y_prob, y_pred, labels, n, threshold)

    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (true, pred), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros(k), where=present)
    f1_den = support + predicted
    f1 = np.divide(2 * tp, f1_den, out=np.zeros(k), where=f1_den > 0)

    roc_auc = _roc_auc(true, scores, k, present)
    log_loss, brier = _calibration_scores(true, scores, k)
    return {
        "n": int(n),
        "labels": list(labels),
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(recall[present].mean()),
        "roc_auc": roc_auc,
        "f1": float(f1.mean()),
        "f1_per_class": {lab: float(v) for lab, v in zip(labels, f1)},
        "confusion_matrix": cm.tolist(),
        "log_loss": log_loss,
        "brier": brier,
    }


def _calibration_scores(true: np.ndarray, scores: Optional[np.ndarray], k: int) -> Tuple[float, float]:
    """(log loss, Brier score) of probabilities; NaN for both when ``scores`` are not probabilities."""
    if scores is None or scores.min() < 0 or scores.max() > 1:
        return math.nan, math.nan
    prob = np.stack([1 - scores, scores], axis=1) if scores.ndim == 1 else scores
    if not np.allclose(prob.sum(axis=1), 1.0, atol=1e-4):
        return math.nan, math.nan
    onehot = np.eye(k)[true]
    log_loss = float(-np.mean(np.log(np.clip(prob[np.arange(true.size), true], 1e-15, 1.0))))
    brier = float(np.mean(0.5 * ((prob - onehot) ** 2).sum(axis=1)))
    return log_loss, brier


def _scores_and_predictions(
    y_prob: Any, y_pred: Any, labels: Tuple[str, ...], n: int, threshold: float
) -> Tuple[Optional[np.ndarray], np.ndarray]:
    """``(scores, predicted class ids)`` from exactly one of ``y_prob`` / ``y_pred``; ``scores`` is None
    for hard predictions (integer, string or boolean arrays passed as ``y_prob`` are hard predictions)."""
    k = len(labels)
    scores: Optional[np.ndarray] = None
    if y_prob is not None:
        prob = np.asarray(y_prob)
        if prob.dtype.kind in "biuUSO":
            y_pred = prob
        else:
            scores = prob.astype(np.float64)
            if scores.shape[0] != n:
                raise ValueError(f"y_prob has {scores.shape[0]} rows for {n} cases.")
            if not np.all(np.isfinite(scores)):
                raise ValueError("y_prob holds NaN or infinite values.")
            if scores.ndim == 1:
                if k != 2:
                    raise ValueError(f"1-D y_prob is only defined for two classes, got labels {list(labels)}.")
                pred = (scores > threshold).astype(np.int64)
            elif scores.ndim == 2 and scores.shape[1] == k:
                pred = np.argmax(scores, axis=1).astype(np.int64)
            else:
                raise ValueError(f"y_prob must be (N,) or (N, {k}), got shape {scores.shape}.")
    if y_pred is not None:
        pred = _class_ids(y_pred, labels, "y_pred")
        if pred.size != n:
            raise ValueError(f"y_pred has {pred.size} entries for {n} cases.")
    return scores, pred


def _roc_auc(true: np.ndarray, scores: Optional[np.ndarray], k: int, present: np.ndarray) -> float:
    """Binary AUC of the class-1 score, or the macro one-vs-rest AUC over the present classes for
    ``(N, K > 2)`` scores; NaN for hard predictions and where AUC is undefined."""
    roc_auc = math.nan
    if scores is not None:
        if scores.ndim == 1:
            roc_auc = _binary_auc(true == 1, scores)
        elif k == 2:
            roc_auc = _binary_auc(true == 1, scores[:, 1] - scores[:, 0])
        elif present.sum() >= 2:
            aucs = [_binary_auc(true == c, scores[:, c]) for c in range(k) if present[c]]
            roc_auc = float(np.mean(aucs))
    return roc_auc
