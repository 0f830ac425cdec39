"""Held-out evaluation on whole volumes: each case through the pipeline that ``emrfuse predict`` runs (label map on
the files' own grid) -> 3D metrics (segmentation) or grade probabilities (grading); each case evaluated once, by
one process."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from accelerate.utils import gather_object

from ..brats_io import read_volume
from ..brats_labels import REGIONS
from ..evaluation.grading_control import FEATURE, enhancing_fraction
from ..evaluation.metrics import classification_metrics, metrics_to_row, score_label_maps
from ..evaluation.report import summarize_segmentation
from ..pipeline_emrfuse import pipeline_for_model

CASE_FEATURES = "case_enhancing_fraction"
"""Summary key of a segmentation evaluation: case id -> enhancing fraction of the predicted label map."""


def predict_case(
    pipe, case, report: Optional[str], max_report_tokens: Optional[int] = None, **options: Any
) -> Dict[str, Any]:
    """One held-out case (a discovered :class:`~modeling_emrfuse.brats_io.CaseFiles`) through the pipeline, the
    path of ``emrfuse predict``: its result (label map on the files' own grid, background masked; grade
    probabilities from the grading slices; the case embedding). The report is the one given (None: none);
    ``options`` are the pipeline's inference options (``tta``, ``min_component_mm3``, ``et_min_mm3``: train.py's
    ``--eval_tta``, ``--eval_min_component_mm3``, ``--eval_et_min_mm3``)."""
    return pipe(
        case,
        report=report,
        use_case_report=False,
        label_convention=case.label_convention,
        max_length=max_report_tokens,
        allow_missing_sequences=bool(case.missing_sequences),
        **options,
    )


def case_row(case, result: Dict[str, Any], id2label: Dict[int, str]) -> Dict[str, Any]:
    """The per-case row of a pipeline result: metrics against the case's label map (segmentation, scored on the
    files' own grid) or the grade probabilities (grading)."""
    row: Dict[str, Any] = {
        "case_id": case.case_id,
        "grade": case.grade,
        "has_report": bool(result["has_report"]),
        "num_slices": result["num_slices"],
        "missing_sequences": ",".join(case.missing_sequences),
    }
    if result["label_map"] is not None:
        ref = read_volume(case.label)
        scores = score_label_maps(
            result["label_map"], np.asarray(ref.array), pred_convention=result["label_convention"], spacing=ref.spacing
        )
        row.update(metrics_to_row(scores))
        row[FEATURE] = enhancing_fraction(
            result["label_map"], result["label_convention"]
        )  # the grading control's feature
    if result["grade_probabilities"] is not None:
        row["pred_grade"] = result["grade"]
        for i in range(len(id2label)):
            row[f"prob_{id2label[i]}"] = float(result["grade_probabilities"][id2label[i]])
    return row


def evaluate_case(
    pipe,
    case,
    report: Optional[str],
    max_report_tokens: Optional[int] = None,
    inference: Optional[Mapping[str, Any]] = None,
) -> Tuple[Dict[str, Any], Optional[np.ndarray]]:
    """One held-out case through the pipeline (with the ``inference`` options) -> its row (id, grade, metrics /
    grade probabilities, timing) and the fused case embedding (``case_embeds``) for the embedding plot."""
    t0 = time.perf_counter()
    result = predict_case(pipe, case, report, max_report_tokens, **dict(inference or {}))
    row = case_row(case, result, pipe.model.config.id2label)
    row["seconds"] = time.perf_counter() - t0
    return row, result["case_embedding"]


@torch.no_grad()
def evaluate(
    accelerator,
    model,
    processor,
    cases,
    reports,
    task: str,
    step: int,
    max_report_tokens: Optional[int] = None,
    inference: Optional[Mapping[str, Any]] = None,
    segmentation_model=None,
) -> Tuple[List[Dict[str, Any]], Dict[str, Any], Optional[np.ndarray]]:
    """Evaluate every held-out case exactly once (cases dealt round-robin to the processes), gather.

    ``segmentation_model``: a grading model's companion in the pipeline, as in a saved model folder (its output
    is the ``pooling_mask`` of a ``grading_pooling="tumour"`` grading model).

    Segmentation is evaluated with the pipeline's ``inference`` options (``tta``, ``min_component_mm3``,
    ``et_min_mm3``; none: plain, as ``emrfuse predict`` without options); the summary's ``inference`` says which.
    Returns the per-case rows (sorted by case id), the summary (segmentation: mean / std / median
    per region and metric; grading: accuracy, balanced accuracy, ROC AUC, F1, confusion matrix)
    and the case embeddings in row order.
    """
    t0 = time.perf_counter()
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    mine = cases[accelerator.process_index :: accelerator.num_processes]
    local = []
    options = dict(inference or {}) if task == "segmentation" else {}
    with (
        accelerator.autocast(),
        pipeline_for_model(net, processor, accelerator.device, segmentation_model=segmentation_model) as pipe,
    ):
        for case in mine:
            row, emb = evaluate_case(pipe, case, reports.get(case.case_id), max_report_tokens, options)
            local.append((row, None if emb is None else emb.tolist()))
    gathered = gather_object(local) if accelerator.num_processes > 1 else local
    net.train(was_training)
    seen, rows, embeds = set(), [], []
    for row, emb in sorted(gathered, key=lambda item: item[0]["case_id"]):
        if row["case_id"] in seen:  # cannot happen (each case is dealt once); guard against padding anyway
            continue
        seen.add(row["case_id"])
        rows.append(row)
        embeds.append(emb)
    summary: Dict[str, Any] = {
        "task": task,
        "step": step,
        "num_cases": len(rows),
        "eval_seconds": round(time.perf_counter() - t0, 2),
    }
    if options:
        summary["inference"] = options
    if task == "segmentation":
        summary["segmentation"] = summarize_segmentation(rows)
        summary[CASE_FEATURES] = {r["case_id"]: r[FEATURE] for r in rows}  # the grading control's held-out features
    graded = [r for r in rows if r.get("grade") in net.config.label2id and "pred_grade" in r]
    if graded:
        labels = [net.config.id2label[i] for i in range(net.config.num_labels)]
        summary["grade_labels"] = labels
        summary["num_graded_cases"] = len(graded)
        y_prob = np.array([[r[f"prob_{label}"] for label in labels] for r in graded])
        summary["grading"] = classification_metrics([r["grade"] for r in graded], y_prob, labels=labels)
    emb_array = np.asarray(embeds, dtype=np.float32) if embeds and all(e is not None for e in embeds) else None
    return rows, summary, emb_array


def selection_metric(summary: Dict[str, Any], task: str) -> float:
    """Model selection: mean Dice over WT/TC/ET (segmentation) or balanced accuracy (grading)."""
    if task == "segmentation":
        return float(summary["segmentation"]["mean"]["dice"]["mean"])
    return float(summary.get("grading", {}).get("balanced_accuracy", float("nan")))


def eval_log_line(summary: Dict[str, Any], task: str, step: int, max_steps: int, split: str = "") -> str:
    """One clean line per evaluation."""
    parts = [f"eval step {step}/{max_steps}", f"{summary['num_cases']} {split + ' ' if split else ''}cases"]
    if task == "segmentation":
        seg = summary["segmentation"]
        parts.append(
            "Dice "
            + " ".join(f"{r} {seg[r]['dice']['mean']:.3f}" for r in REGIONS)
            + f" (mean {seg['mean']['dice']['mean']:.3f})"
        )
        parts.append("HD95 " + " ".join(f"{r} {seg[r]['hd95']['mean']:.1f}" for r in REGIONS) + " mm")
        et = seg["ET"]  # the ET mean counts ET-absent cases predicted empty as Dice 1: show what it hides
        present = f"{et['dice_present']['mean']:.3f}" if et["present_cases"] else "n/a"
        parts.append(
            f"ET Dice {present} over {et['present_cases']} ET-present, {et['false_positive_cases']}/{et['absent_cases']} ET-absent with ET predicted"
        )
    if summary.get("grading"):
        gr = summary["grading"]
        parts.append(f"grade acc {gr['accuracy']:.3f} bal-acc {gr['balanced_accuracy']:.3f} AUC {gr['roc_auc']:.3f}")
    parts.append(f"{summary['eval_seconds']:.1f} s")
    return " | ".join(parts)


def summary_scalars(summary: Dict[str, Any], task: str) -> Dict[str, float]:
    """The tracker scalars of an evaluation summary (``eval/<region>_<metric>``, ``eval/grade_<metric>``)."""
    out: Dict[str, float] = {}
    for region, metrics in (summary.get("segmentation") or {}).items():
        for metric, stats in metrics.items():  # statistics ({"mean", ...}) or case counts (ints)
            out[f"eval/{region}_{metric}"] = float(stats["mean"] if isinstance(stats, dict) else stats)
    for key in ("accuracy", "balanced_accuracy", "roc_auc", "f1", "log_loss", "brier"):
        if key in (summary.get("grading") or {}):
            out[f"eval/grade_{key}"] = float(summary["grading"][key])
    return out
