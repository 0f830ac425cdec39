"""The evaluation report of a training run: tables, summary and figures.

``train.py`` evaluates whole volumes (image processor slices -> model -> post-processing back to the
original grid -> 3D metrics from :mod:`modeling_emrfuse.metrics`) and hands the per-case results to
this module, which writes

- ``per_case.csv``: one row per case (id, grade, predicted grade, per-region Dice / PPV /
  sensitivity / HD95),
- ``summary.json``: mean / std / median per region and metric, grading metrics, run facts,
- ``results.md``: the markdown table that is also printed and put into the model card,
- ``embeddings_pca.png``: the fused case embeddings projected to 2D with PCA, coloured by grade
  (the paper's Fig. 3),
- ``dice_boxplot.png``: per-case Dice as a box plot per region.

Per-case rows are plain dicts, so the same writer serves any evaluation loop. Report text never
appears in any of these files. This module is not part of the code that travels to the Hub.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .brats_labels import GRADES, REGIONS
from .metrics import aggregate
from .strict_json import write_json

SEGMENTATION_METRICS = ("dice", "ppv", "sensitivity", "hd95")
"""Per-region metrics, in table order (names as :func:`modeling_emrfuse.metrics.region_metrics` returns them)."""

METRIC_TITLES = {"dice": "Dice", "ppv": "PPV", "sensitivity": "Sensitivity", "hd95": "HD95 (mm)"}
GRADING_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1")


def metric_column(region: str, metric: str) -> str:
    """Column name of one region metric in the per-case table, e.g. ``WT_dice``."""
    return f"{region}_{metric}"


def summarize_segmentation(per_case: Sequence[Mapping[str, Any]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Mean / std (sample) / median over cases, per region and metric (:func:`metrics.aggregate`).

    ``per_case`` rows are flat (``{"case_id": ..., "WT_dice": ...}``, as
    :func:`metrics.metrics_to_row` gives them). Returns ``{region: {metric: {"mean", "std",
    "median", "n"}}}`` plus, under ``"mean"``, the per-metric average over the three regions (the
    single number the paper's tables report).
    """
    summary: Dict[str, Dict[str, Dict[str, float]]] = dict(aggregate(per_case, regions=REGIONS, metrics=SEGMENTATION_METRICS))
    summary["mean"] = {m: {"mean": float(np.mean([summary[r][m]["mean"] for r in REGIONS]))} for m in SEGMENTATION_METRICS}
    return summary


def format_segmentation_table(summary: Mapping[str, Any], *, percent: bool = True) -> str:
    """Markdown table: one row per region, ``mean ± std (median)`` per metric.

    Dice, PPV and sensitivity in percent (as the paper reports them), HD95 in millimetres.
    """
    seg = summary
    header = "| Region | " + " | ".join(
        (f"{METRIC_TITLES[m]} (%)" if (percent and m != "hd95") else METRIC_TITLES[m]) for m in SEGMENTATION_METRICS
    ) + " |"
    lines = [header, "|" + "---|" * (len(SEGMENTATION_METRICS) + 1)]
    for region in REGIONS:
        cells = []
        for metric in SEGMENTATION_METRICS:
            s = seg.get(region, {}).get(metric)
            if not s or s.get("n", 0) == 0:
                cells.append("n/a")
                continue
            scale = 100.0 if (percent and metric != "hd95") else 1.0
            spread = f" ± {s['std'] * scale:.1f}" if s["std"] == s["std"] else ""  # NaN std (one case): mean only
            cells.append(f"{s['mean'] * scale:.1f}{spread} ({s['median'] * scale:.1f})")
        lines.append(f"| {region} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_grading_table(grading: Mapping[str, Any]) -> str:
    """Markdown table of the grading metrics (accuracy, balanced accuracy, ROC AUC, F1, confusion matrix)."""
    lines = ["| Accuracy | Balanced accuracy | ROC AUC | F1 | Confusion matrix (rows true, cols pred) |", "|---|---|---|---|---|"]
    cells = []
    for metric in GRADING_METRICS:
        value = grading.get(metric)
        cells.append("n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * float(value):.1f}")
    cm = grading.get("confusion_matrix")
    cells.append(str(np.asarray(cm).tolist()) if cm is not None else "n/a")
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_results_markdown(summary: Mapping[str, Any]) -> str:
    """The run's results as markdown (segmentation table and/or grading table, with the case count)."""
    parts = []
    n = summary.get("num_cases")
    if summary.get("segmentation"):
        parts.append(
            f"Segmentation on {n} held-out cases (whole volumes, original grid; mean ± std (median)):\n\n"
            + format_segmentation_table(summary["segmentation"])
        )
    if summary.get("grading"):
        labels = summary.get("grade_labels", list(GRADES))
        parts.append(
            f"Grading ({' vs '.join(labels)}) on {summary.get('num_graded_cases', n)} held-out cases (%):\n\n"
            + format_grading_table(summary["grading"])
        )
    return "\n\n".join(parts)


def write_per_case_csv(per_case: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write one row per case; columns are the union of the rows' keys (case_id first)."""
    path = Path(path)
    columns: List[str] = []
    for row in per_case:
        for key in row:
            if key not in columns:
                columns.append(key)
    if "case_id" in columns:
        columns.remove("case_id")
        columns.insert(0, "case_id")
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in sorted(per_case, key=lambda r: str(r.get("case_id", ""))):
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return path


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def plot_embeddings_pca(
    embeddings: np.ndarray, grades: Sequence[Optional[str]], path: str | Path, *, title: str = "Fused case embeddings (PCA)"
) -> Optional[Path]:
    """Project the fused case embeddings ``(n_cases, d)`` to 2D with PCA and scatter them coloured by grade.

    This is the paper's Fig. 3 (which shows the fused representation separating the classes).
    Cases without a known grade are drawn in grey. Returns ``None`` when fewer than two cases.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        return None
    n_comp = min(2, embeddings.shape[0], embeddings.shape[1])
    pca = PCA(n_components=n_comp)
    xy = pca.fit_transform(embeddings)
    if xy.shape[1] == 1:
        xy = np.concatenate([xy, np.zeros_like(xy)], axis=1)
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    colours = {"HGG": "tab:red", "LGG": "tab:blue"}
    labels = [g if g else "unknown" for g in grades]
    for label in sorted(set(labels)):
        idx = [i for i, g in enumerate(labels) if g == label]
        ax.scatter(xy[idx, 0], xy[idx, 1], s=36, alpha=0.85, c=colours.get(label, "tab:gray"), label=f"{label} (n={len(idx)})")
    ratio = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.0f} % variance)")
    ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.0f} % variance)" if len(ratio) > 1 else "PC 2")
    ax.set_title(title)
    ax.legend(loc="best", frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_dice_boxplot(per_case: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "Per-case Dice") -> Optional[Path]:
    """Box plot of per-case Dice, one box per region (WT, TC, ET), individual cases overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [[row[metric_column(r, "dice")] for row in per_case if metric_column(r, "dice") in row] for r in REGIONS]
    if not any(data):
        return None
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.boxplot(data, showmeans=True, showfliers=False)  # every case is drawn as a dot below
    ax.set_xticks(range(1, len(REGIONS) + 1), REGIONS)
    rng = np.random.default_rng(0)
    for i, values in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.08, 0.08, len(values)), values, s=10, alpha=0.6, c="k")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    ax.set_title(f"{title} (n={max(len(d) for d in data)} cases)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_evaluation_report(
    out_dir: str | Path,
    per_case: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    *,
    embeddings: Optional[np.ndarray] = None,
    embedding_grades: Optional[Sequence[Optional[str]]] = None,
) -> Dict[str, Path]:
    """Write the per-case CSV, summary JSON, markdown table and the two figures into ``out_dir``.

    Returns the written paths by kind (``per_case``, ``summary``, ``markdown``, ``embeddings``,
    ``dice_boxplot``); figures that cannot be drawn (too few cases, no segmentation) are left out.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: Dict[str, Path] = {}
    paths["per_case"] = write_per_case_csv(per_case, out_dir / "per_case.csv")
    paths["summary"] = write_json(out_dir / "summary.json", summary, indent=2, default=_json_default)
    paths["markdown"] = out_dir / "results.md"
    paths["markdown"].write_text(format_results_markdown(summary) + "\n")
    if embeddings is not None and len(embeddings) >= 2:
        p = plot_embeddings_pca(embeddings, embedding_grades or [None] * len(embeddings), out_dir / "embeddings_pca.png")
        if p is not None:
            paths["embeddings"] = p
    if summary.get("segmentation"):
        p = plot_dice_boxplot(per_case, out_dir / "dice_boxplot.png")
        if p is not None:
            paths["dice_boxplot"] = p
    return paths
