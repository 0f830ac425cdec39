"""Lesion-wise metrics of BraTS 2023+ (connected components matched between prediction and reference).

Since 2023 the BraTS challenges rank by lesion-wise metrics: each region (WT, TC, ET) is split
into lesions (26-connected components), reference and predicted lesions are matched one to one,
and unmatched lesions count as misses (false negatives) or false alarms (false positives). This
module runs `panoptica <https://github.com/BrainLesion/panoptica>`_ (Apache-2.0), on which the
official evaluation (the ``BraTS_evaluation`` package) runs, configured as the official adult-glioma
evaluation configures it (:func:`brats_lesion_evaluator`); :func:`lesion_wise_metrics` reports its
numbers. ``panoptica`` is an optional dependency (``pip install "emrfuse[lesion]"``); without it these
functions raise :class:`LesionMetricsUnavailable`. This module does not travel to the Hub.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..brats_labels import REGIONS

__all__ = [
    "LESION_METRICS",
    "LESION_COUNTS",
    "LesionMetricsUnavailable",
    "brats_lesion_evaluator",
    "lesion_wise_metrics",
]

LESION_METRICS: Tuple[str, ...] = ("tp", "fp", "fn", "sq_dsc", "pq_dsc", "sq_hd95")
"""Lesion-wise metrics per region, in reporting order (panoptica's result names)."""

LESION_COUNTS: Tuple[str, ...] = ("tp", "fp", "fn")
"""The lesion-wise metrics that are counts of lesions."""

PANOPTICA_HINT = 'pip install "emrfuse[lesion]" (or: pip install panoptica)'


class LesionMetricsUnavailable(ImportError):
    """Lesion-wise metrics were asked for but ``panoptica`` is not installed."""


def _import_panoptica():
    try:
        import panoptica
        from panoptica.utils.edge_case_handling import EdgeCaseHandler, EdgeCaseResult, MetricZeroTPEdgeCaseHandling
        from panoptica.utils.label_group import LabelGroup
        from panoptica.utils.segmentation_class import SegmentationClassGroups
    except ImportError as exc:
        raise LesionMetricsUnavailable(
            f"lesion-wise metrics need the panoptica package, which is not installed ({exc}); {PANOPTICA_HINT}."
        ) from None
    return panoptica, EdgeCaseHandler, EdgeCaseResult, MetricZeroTPEdgeCaseHandling, LabelGroup, SegmentationClassGroups


GROUP = "lesion"
"""Name of the one label group of the evaluator (a binary region mask, label 1)."""


@lru_cache(maxsize=1)
def brats_lesion_evaluator():
    """The panoptica evaluator of one binary region mask, configured as the official BraTS glioma evaluation.

    Matching, instance approximation and zero-TP edge cases are the official ``gli``
    configuration's; the official one also computes the normalised surface Dice, which is not
    reported here and does not affect the other numbers, so it is left out:

    - input: semantic masks; instances: connected components (``cc3d``, 26-connectivity in 3D);
    - matching: maximum bipartite matching on Dice, any overlap matches (threshold 1e-6);
    - lesion metrics: Dice and HD95 of each matched pair, in mm at the image's voxel spacing;
    - zero true positives: Dice 0 and HD95 infinity when either side has lesions; NaN when neither does.
    """
    panoptica, EdgeCaseHandler, EdgeCaseResult, ZeroTP, LabelGroup, SegmentationClassGroups = _import_panoptica()
    panoptica.disable_citation_reminder()  # a console banner on every call; panoptica is credited in the README
    panoptica.set_log_level("WARNING")
    metric = panoptica.Metric

    def zero_tp(result):
        return ZeroTP(
            empty_prediction_result=result,
            empty_reference_result=result,
            no_instances_result=EdgeCaseResult.NAN,
            normal=result,
        )

    return panoptica.Panoptica_Evaluator(
        expected_input=panoptica.InputType.SEMANTIC,
        instance_approximator=panoptica.ConnectedComponentsInstanceApproximator(cca_backend=None),
        instance_matcher=panoptica.MaxBipartiteMatching(matching_metric=metric.DSC, matching_threshold=1e-6),
        edge_case_handler=EdgeCaseHandler(
            listmetric_zeroTP_handling={
                metric.DSC: zero_tp(EdgeCaseResult.ZERO),
                metric.HD95: zero_tp(EdgeCaseResult.INF),
            },
            empty_list_std=EdgeCaseResult.NAN,
        ),
        segmentation_class_groups=SegmentationClassGroups({GROUP: LabelGroup([1], single_instance=False)}),
        instance_metrics=[metric.DSC, metric.HD95],
        global_metrics=[metric.DSC],
        decision_metric=None,
        decision_threshold=None,
        log_times=False,
        verbose=False,
    )


def _value(result: Dict[str, Any], name: str) -> float:
    v = result.get(name)
    if name in LESION_COUNTS:
        return int(v)
    return math.nan if v is None else float(v)


def lesion_wise_metrics(
    pred_regions: Any,
    ref_regions: Any,
    spacing: Optional[Sequence[float]] = (1.0, 1.0, 1.0),
    regions: Sequence[str] = REGIONS,
) -> Dict[str, Dict[str, float]]:
    """Lesion-wise metrics per region: ``{region: {"tp", "fp", "fn", "sq_dsc", "pq_dsc", "sq_hd95"}}``.

    ``pred_regions`` / ``ref_regions`` are channel-first region masks ``(len(regions), X, Y, Z)``
    (WT, TC, ET); ``spacing`` is the voxel size in mm (required: HD95 depends on it). Counts are
    ints; ``sq_dsc`` / ``pq_dsc`` / ``sq_hd95`` floats that may be NaN (no lesion on either side)
    or, for ``sq_hd95``, infinity (no matched lesion). Raises :class:`LesionMetricsUnavailable`
    without panoptica.

    The numbers are panoptica's own, under panoptica's names (so that they compare directly with the
    challenge's output):

    =========  =============================================================================
    ``tp``     matched lesions
    ``fp``     predicted lesions without a reference lesion
    ``fn``     reference lesions without a predicted lesion
    ``sq_dsc`` segmentation quality: mean Dice of the matched lesions (0 when there is none;
               NaN when neither side has a lesion)
    ``pq_dsc`` panoptic quality: ``sq_dsc * tp / (tp + fp/2 + fn/2)``, i.e. unmatched lesions score 0
    ``sq_hd95`` mean HD95 (mm) of the matched lesions (infinity when there is none; NaN when
               neither side has a lesion). Panoptica computes its own surfaces; this is not the
               whole-volume ``hd95`` of :mod:`modeling_emrfuse.evaluation.metrics`.
    =========  =============================================================================

    Regions come from :func:`modeling_emrfuse.brats_labels.label_map_to_regions`, so all label
    conventions give the same numbers for the same tumour. The official evaluation reads BraTS 2023
    label maps and builds WT = {1, 2, 3}, TC = {1, 3}, ET = {3}: the same masks.
    """
    p, r = np.asarray(pred_regions).astype(bool), np.asarray(ref_regions).astype(bool)
    n = len(regions)
    for name, arr in (("prediction regions", p), ("reference regions", r)):
        if arr.ndim != 4 or arr.shape[0] != n:
            raise ValueError(f"{name}: expected shape ({n}, X, Y, Z) with channels {tuple(regions)}, got {arr.shape}.")
    if p.shape != r.shape:
        raise ValueError(f"prediction regions shape {p.shape} differs from reference regions shape {r.shape}.")
    if spacing is None:
        raise ValueError("lesion-wise metrics need the voxel spacing (mm): HD95 depends on it.")
    sp = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)))
    evaluator = brats_lesion_evaluator()
    out: Dict[str, Dict[str, float]] = {}
    for i, region in enumerate(regions):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # panoptica's notes on its defaults (not about the data)
            result = evaluator.evaluate(p[i].astype(np.uint8), r[i].astype(np.uint8), voxelspacing=sp)[GROUP]
        values = result.to_dict(True)
        out[region] = {name: _value(values, name) for name in LESION_METRICS}
    return out
