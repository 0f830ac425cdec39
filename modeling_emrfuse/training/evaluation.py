"""Held-out evaluation on whole volumes: a case's files -> slices -> model -> label map on the original grid ->
3D metrics (segmentation) or grade probabilities (grading); each case evaluated once, by one process."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from accelerate.utils import gather_object

from ..brats_io import read_volume, reorientation, reoriented_image, to_nifti_image
from ..brats_labels import REGIONS
from ..evaluation.grading_control import FEATURE, enhancing_fraction
from ..evaluation.metrics import classification_metrics, metrics_to_row, score_label_maps
from ..evaluation.report import summarize_segmentation
from ..processing_emrfuse import grading_slice_indices


MODEL_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "has_report")
CASE_FEATURES = "case_enhancing_fraction"
"""Summary key of a segmentation evaluation: case id -> enhancing fraction of the predicted label map."""


@dataclass
class CaseInputs:
    """One whole case as the model sees it in evaluation (see :func:`case_model_inputs`)."""

    prepared: Any  # the processor's prepared volume (crop, number of slices)
    turn: Any  # the reorientation to BraTS's orientation (``turn.undo`` maps a label map back)
    pixel_values: torch.Tensor  # (N, C, H, W): every slice, or for grading the grading bag policy's slices
    text_inputs: Dict[str, torch.Tensor]  # the model's text keyword arguments (one report)


def case_model_inputs(model, processor, case, report: Optional[str], device, task: str,
                      max_report_tokens: Optional[int] = None) -> CaseInputs:
    """A case's volumes brought to BraTS's orientation (as in training), prepared and sliced, and its report
    tokenised; for grading only the slices of the grading bag policy (``config.grading_slices``), exactly as the
    pipeline pools them. ``max_report_tokens`` truncates the report (None: the tower's limit)."""
    ip = processor.image_processor
    images = {name: to_nifti_image(path) for name, path in case.sequences.items()}
    first = next(iter(images.values()))
    turn = reorientation(first.affine, first.shape)  # the model sees BraTS's orientation, as in training
    images = {name: reoriented_image(img) for name, img in images.items()}
    prepared = ip.prepare_volume(images, allow_missing_sequences=bool(case.missing_sequences))
    text = processor.encode_reports([report], max_length=max_report_tokens)
    text_inputs = {k: text[k].to(device) for k in MODEL_TEXT_KEYS if k in text}
    pixel_values = torch.from_numpy(ip.slices(prepared)).to(device)
    if task == "classification":
        keep = grading_slice_indices(prepared.num_slices, getattr(model.config, "grading_slices", None))
        pixel_values = pixel_values[torch.from_numpy(keep).to(device)]
    return CaseInputs(prepared, turn, pixel_values, text_inputs)


def evaluate_case(model, processor, case, report: Optional[str], device, task: str,
                  max_report_tokens: Optional[int] = None) -> Tuple[Dict[str, Any], Optional[np.ndarray]]:
    """One held-out case: slices -> model -> label map on the original grid -> 3D metrics.

    Returns the per-case row (id, grade, metrics / grade probabilities, timing) and the fused case
    embedding (``case_embeds``) for the embedding plot.
    """
    t0 = time.perf_counter()
    ip = processor.image_processor
    inputs = case_model_inputs(model, processor, case, report, device, task, max_report_tokens)
    prepared, turn, text_inputs = inputs.prepared, inputs.turn, inputs.text_inputs
    row: Dict[str, Any] = {
        "case_id": case.case_id, "grade": case.grade, "has_report": bool(text_inputs["has_report"][0]),
        "num_slices": prepared.num_slices, "missing_sequences": ",".join(case.missing_sequences),
    }
    # one forward for the whole case: the model runs the image tower in chunks of config.slice_chunk_size
    # without gradients and encodes the report once; case_embeds pools the case's slices (grading: the
    # slices of the grading bag policy, config.grading_slices, exactly as the pipeline pools them)
    pixel_values = inputs.pixel_values
    out = model(pixel_values=pixel_values, slice_to_case=torch.zeros(pixel_values.shape[0], dtype=torch.long, device=device),
                **text_inputs)
    logits = out.logits.float().cpu()
    embedding = out.case_embeds[0].float().cpu().numpy() if getattr(out, "case_embeds", None) is not None else None
    if task == "segmentation":
        label_map = turn.undo(ip.post_process_segmentation(logits.numpy(), prepared.crop, label_convention=case.label_convention))
        ref = read_volume(case.label)  # scored on the files' own grid
        result = score_label_maps(label_map, np.asarray(ref.array), pred_convention=case.label_convention, spacing=ref.spacing)
        row.update(metrics_to_row(result))
        row[FEATURE] = enhancing_fraction(label_map, case.label_convention)  # the grading control's feature
    else:
        probs = torch.softmax(logits[0], dim=-1).numpy()
        labels = [model.config.id2label[i] for i in range(len(probs))]
        row["pred_grade"] = labels[int(np.argmax(probs))]
        for label, p in zip(labels, probs):
            row[f"prob_{label}"] = float(p)
    row["seconds"] = time.perf_counter() - t0
    return row, embedding


@torch.no_grad()
def evaluate(accelerator, model, processor, cases, reports, task: str, step: int,
             max_report_tokens: Optional[int] = None) -> Tuple[List[Dict[str, Any]], Dict[str, Any], Optional[np.ndarray]]:
    """Evaluate every held-out case exactly once (cases dealt round-robin to the processes), gather.

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
    with accelerator.autocast():
        for case in mine:
            row, emb = evaluate_case(net, processor, case, reports.get(case.case_id), accelerator.device, task, max_report_tokens)
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
    summary: Dict[str, Any] = {"task": task, "step": step, "num_cases": len(rows), "eval_seconds": round(time.perf_counter() - t0, 2)}
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
        parts.append("Dice " + " ".join(f"{r} {seg[r]['dice']['mean']:.3f}" for r in REGIONS) + f" (mean {seg['mean']['dice']['mean']:.3f})")
        parts.append("HD95 " + " ".join(f"{r} {seg[r]['hd95']['mean']:.1f}" for r in REGIONS) + " mm")
        et = seg["ET"]  # the ET mean counts ET-absent cases predicted empty as Dice 1: show what it hides
        present = f"{et['dice_present']['mean']:.3f}" if et["present_cases"] else "n/a"
        parts.append(f"ET Dice {present} over {et['present_cases']} ET-present, {et['false_positive_cases']}/{et['absent_cases']} ET-absent with ET predicted")
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
