"""A run's enhancing-fraction grading control: what the segmentation alone grades, next to the grading model.

The threshold is fitted on the training cases' reference label maps and applied to the enhancing fractions of
the held-out cases' predicted label maps (``evaluation.CASE_FEATURES`` of the segmentation summary), so the
control sees on held-out cases exactly what the grading model sees: the images, through the segmentation.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

from ..brats_labels import GRADES
from ..evaluation.grading_control import control_from_features, enhancing_fraction

FITTED_ON = "reference label maps of the training cases"
APPLIED_TO = "predicted label maps of the held-out cases"


def run_grading_control(
    run, held_out_features: Mapping[str, float], labels: Sequence[str] = GRADES
) -> Optional[Dict[str, Any]]:
    """The control of ``run``: fitted on ``run.train_cases`` (reference maps), scored on the held-out cases in
    ``held_out_features`` (case id -> enhancing fraction of the predicted map) that have a grade.

    Returns ``{"feature", "fitted_on", "applied_to", "rule", "metrics", "num_train_cases", "num_cases", "cases"}``
    (``cases``: case id -> ``{"enhancing_fraction", "pred_grade"}``), ``{"skipped": reason}`` when the training
    cases cannot fit it (one grade only), or ``None`` without graded held-out cases.
    """
    test = [c for c in run.eval_cases if c.case_id in held_out_features and c.grade in labels]
    if not test:
        return None
    train = [c for c in run.train_cases if c.label is not None and c.grade in labels]
    train_x = [enhancing_fraction(c.label, c.label_convention) for c in train]
    test_x = [held_out_features[c.case_id] for c in test]
    try:
        result = control_from_features(
            train_x, [c.grade for c in train], test_x, [c.grade for c in test], labels=labels
        )
    except ValueError as exc:
        return {"skipped": str(exc)}
    return {
        "feature": result["feature"],
        "fitted_on": FITTED_ON,
        "applied_to": APPLIED_TO,
        "rule": result["rule"],
        "metrics": result["metrics"],
        "num_train_cases": len(train),
        "num_cases": len(test),
        "cases": {
            c.case_id: {"enhancing_fraction": x, "pred_grade": p}
            for c, x, p in zip(test, test_x, result["predictions"])
        },
    }
