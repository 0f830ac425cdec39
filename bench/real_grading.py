"""Grading from real images in the real-data check: a grading stage in the final model and, with ``--cv_grading``,
every held-out case's out-of-fold P(HGG) next to the one-feature baseline.

``train.py --with_grading`` trains the grading stage after segmentation on the training cases with a grade
(:func:`grading_args`). In cross-validation, :func:`add_grading_columns` puts the fold's grading model's P(HGG)
and the baseline (the enhancing fraction of the predicted tumour, threshold fitted on the fold's training cases:
``modeling_emrfuse.evaluation.grading_control``, which ``train.py`` fits and records as ``grading_control``) on each
held-out case's row; :func:`report_grading` writes the per-case table. With three lower-grade cases this is a
sanity check, not a figure of merit.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from modeling_emrfuse.brats_labels import GRADES
from modeling_emrfuse.evaluation.grading_control import FEATURE, ThresholdControl
from modeling_emrfuse.evaluation.metrics import classification_metrics

P_HGG = "p_hgg"  # the fold's grading model's probability of HGG
CONTROL = "control_grade"  # the baseline's call


def add_options(p) -> None:
    p.add_argument(
        "--cv_grading",
        action="store_true",
        help="train the grading stage in every cross-validation run too (it costs time) and report every held-out "
        "case's out-of-fold P(HGG) next to the enhancing-fraction baseline",
    )
    p.add_argument(
        "--grading_steps",
        type=int,
        default=120,
        help="full-batch steps of the grading stage (the final model always has one when both grades are present)",
    )


def check_options(p, args) -> None:
    if args.cv_grading and not args.cv:
        p.error("--cv_grading needs --cv K")
    if args.grading_steps < 1:
        p.error(f"--grading_steps must be >= 1, got {args.grading_steps}")


def grading_args(args, cohort, train_ids: Sequence[str], what: str, enabled: bool = True) -> List[str]:
    """``train.py`` arguments of the grading stage for a run on ``train_ids``; none (said) when not ``enabled`` or
    when the training cases lack a grade (``train.py --with_grading`` would refuse)."""
    if not enabled:
        return []
    ids = set(train_ids)
    counts = Counter(c.grade for c in cohort.attached.cases if c.case_id in ids and c.grade in GRADES)
    if len(counts) < len(GRADES):
        print(f"  {what}: no grading stage (training cases by grade: {dict(counts)}; it needs every grade)", flush=True)
        return []
    return [
        "--with_grading",
        "--grading_max_steps",
        str(args.grading_steps),
        "--grading_learning_rate",
        str(args.learning_rate),
    ]


def add_grading_columns(run_dir: Path, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Put the run's grading results on its held-out rows (in place; returned): ``p_hgg`` from the grading model
    (``grading/eval/per_case.csv``) and ``control_grade``, the baseline's call on the row's enhancing fraction with
    the rule ``train.py`` fitted on the training cases (``eval/run_summary.json``). Nothing without a grading stage."""
    run_dir = Path(run_dir)
    table = run_dir / "grading" / "eval" / "per_case.csv"
    if not table.is_file():
        return rows
    with table.open(newline="") as fh:
        graded = {r["case_id"]: r for r in csv.DictReader(fh)}
    rule = None
    summary = run_dir / "eval" / "run_summary.json"
    if summary.is_file():
        control = json.loads(summary.read_text()).get("grading_control") or {}
        rule = ThresholdControl(**control["rule"]) if "rule" in control else None
    for row in rows:
        g = graded.get(row["case_id"])
        if g is not None and g.get(f"prob_{GRADES[0]}") not in (None, ""):
            row[P_HGG] = float(g[f"prob_{GRADES[0]}"])
        try:
            feature = float(row.get(FEATURE))
        except (TypeError, ValueError):
            feature = float("nan")
        if rule is not None:
            row[CONTROL] = GRADES[int(rule.predict([feature])[0][0])]
    return rows


def grading_rows(
    per_case: Mapping[str, Mapping[str, Mapping[str, Any]]], grade_of: Mapping[str, Any]
) -> List[Dict[str, Any]]:
    """One row per held-out case and recipe that had a grading stage: case, recipe, fold, true grade, P(HGG),
    enhancing fraction of the predicted tumour, the baseline's call."""
    out = []
    for cid in sorted(per_case):
        for recipe, row in per_case[cid].items():
            if P_HGG not in row:
                continue
            try:
                feature = float(row.get(FEATURE))
            except (TypeError, ValueError):
                feature = float("nan")
            out.append(
                {
                    "case_id": cid,
                    "recipe": recipe,
                    "fold": row.get("fold"),
                    "grade": grade_of.get(cid) or "unknown",
                    P_HGG: float(row[P_HGG]),
                    FEATURE: feature,
                    CONTROL: row.get(CONTROL, ""),
                }
            )
    return out


def grading_summary(rows: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Per recipe, over the held-out cases with a known grade: counts, and balanced accuracy / AUC of P(HGG) and
    balanced accuracy of the baseline's call."""
    out: Dict[str, Any] = {}
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        graded = [r for r in rows if r["recipe"] == recipe and r["grade"] in GRADES]
        entry: Dict[str, Any] = {"n": len(graded), "by_grade": dict(Counter(r["grade"] for r in graded))}
        if len({r["grade"] for r in graded}) == len(GRADES):
            y = [r["grade"] for r in graded]
            model = classification_metrics(y, [1.0 - r[P_HGG] for r in graded])  # the score of labels[1] (LGG)
            entry["model"] = {k: model[k] for k in ("accuracy", "balanced_accuracy", "roc_auc")}
            called = [r for r in graded if r[CONTROL] in GRADES]
            if len({r["grade"] for r in called}) == len(GRADES):
                base = classification_metrics([r["grade"] for r in called], y_pred=[r[CONTROL] for r in called])
                entry["baseline"] = {"n": len(called), **{k: base[k] for k in ("accuracy", "balanced_accuracy")}}
        out[recipe] = entry
    return out


def report_grading(per_case, cohort, out: Path, result: Dict[str, Any], lines: List[str]) -> None:
    """``cv_grading.csv``, the per-case table and its sanity-check note into ``lines``, the summary into
    ``result["cv_grading"]``; nothing when no run had a grading stage."""
    rows = grading_rows(per_case, {c.case_id: c.grade for c in cohort.attached.cases})
    if not rows:
        return
    with (out / "cv_grading.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = grading_summary(rows)
    result["cv_grading"] = summary
    n_lgg = sum(1 for c in cohort.attached.cases if c.grade == GRADES[1])
    lines.append("## Grading from the images, out of fold\n")
    lines.append(
        f"Each held-out case's P(HGG) from its fold's grading model (trained on the fold's training cases with a "
        f"grade), next to the one-feature baseline: the enhancing fraction (ET / WT) of the predicted tumour, "
        f"threshold fitted on the fold's training cases. **With {n_lgg} LGG case(s) in the cohort this is a sanity "
        f"check, not a figure of merit.**\n"
    )
    for recipe, entry in summary.items():
        parts = [f"{recipe}: {entry['n']} held-out cases with a grade {entry['by_grade']}"]
        if "model" in entry:
            m = entry["model"]
            parts.append(f"model balanced accuracy {m['balanced_accuracy']:.2f}, AUC of P(HGG) {m['roc_auc']:.2f}")
        if "baseline" in entry:
            parts.append(f"baseline balanced accuracy {entry['baseline']['balanced_accuracy']:.2f}")
        lines.append("- " + "; ".join(parts))
    lines.append("")
    lines.append("| case | recipe | fold | grade | P(HGG) | enhancing fraction | baseline's call |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        ef = r[FEATURE]
        lines.append(
            f"| {r['case_id']} | {r['recipe']} | {r['fold']} | {r['grade']} | {r[P_HGG]:.2f} | "
            f"{'n/a' if ef != ef else f'{ef:.3f}'} | {r[CONTROL] or '-'} |"
        )
    lines.append("")


def final_note(model_dir: Path) -> str:
    """One sentence on the final model's grading stage (from its ``eval/run_summary.json``)."""
    summary = Path(model_dir) / "eval" / "run_summary.json"
    counts = json.loads(summary.read_text()).get("grading_training_cases") if summary.is_file() else None
    if not counts:
        return "It has no grading model (the cases lack one of the grades), so the Space shows no grade."
    used = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "without_grade")
    return (
        f"It carries a grading model (`grading/`, so `emrfuse predict` and the Space show a grade), trained on the "
        f"{sum(v for k, v in counts.items() if k != 'without_grade')} cases with a grade ({used}); "
        f"{counts['without_grade']} without one trained the segmentation only."
    )
