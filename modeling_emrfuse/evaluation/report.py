"""The evaluation report: one layout, one writer, for ``train.py`` evaluation and ``emrfuse score``.

Both hand their per-case rows (flat dicts: ``case_id``, then columns such as ``WT_dice``, as
:func:`modeling_emrfuse.evaluation.metrics.metrics_to_row` gives them) to this module, which builds the
summary with :func:`summarize_segmentation` and writes it with :func:`write_evaluation_report`.
Report text never appears in any of these files. This module does not travel to the Hub.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..brats_labels import GRADES, REGIONS
from ..runtime.strict_json import write_json
from .lesion_metrics import LESION_COUNTS, LESION_METRICS
from .metrics import METRICS, aggregate

METRIC_NAMES = {"dice": "Dice", "ppv": "PPV", "sensitivity": "Sensitivity", "hd95": "HD95 (mm)"}
"""Display names of :data:`modeling_emrfuse.evaluation.metrics.METRICS` (values as fractions / mm)."""
PERCENT_METRICS = ("dice", "ppv", "sensitivity", "sq_dsc", "pq_dsc")
METRIC_TITLES = {m: f"{name} (%)" if m in PERCENT_METRICS else name for m, name in METRIC_NAMES.items()}
"""Table titles of :data:`modeling_emrfuse.evaluation.metrics.METRICS` (tables show ratios in percent)."""
LESION_TITLES = {"sq_dsc": "sq_dsc (%)", "pq_dsc": "pq_dsc (%)", "sq_hd95": "sq_hd95 (mm)"}
GRADING_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1")
GRADING_CALIBRATION_METRICS = ("log_loss", "brier")  # not percentages
OUTPUT_FILES = {"per_case": "per_case.csv", "summary": "summary.json", "markdown": "summary.md"}


def metric_column(region: str, metric: str) -> str:
    """Column name of one region metric in the per-case table, e.g. ``WT_dice`` or ``ET_pq_dsc``."""
    return f"{region}_{metric}"


def _number(row: Mapping[str, Any], column: str) -> float:
    value = row.get(column)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"case {row.get('case_id')!r}: {column} is missing or not a number ({value!r}).") from None


def _stats(values: Sequence[float]) -> Dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    n = arr.size
    return {
        "mean": float(arr.mean()) if n else math.nan,
        "std": float(arr.std(ddof=1)) if n > 1 else math.nan,
        "median": float(np.median(arr)) if n else math.nan,
        "n": int(n),
    }


def region_presence(per_case: Sequence[Mapping[str, Any]], region: str) -> Dict[str, Any]:
    """Dice over the cases whose reference holds ``region``, and the false-positive cases.

    Uses the per-case columns ``<region>_ref_voxels`` / ``<region>_pred_voxels`` / ``<region>_dice``.
    Returns ``{"dice_present": stats, "present_cases", "absent_cases", "false_positive_cases"}``:
    a false-positive case has no ``region`` voxel in the reference and at least one in the prediction.

    A region that is absent in the reference and not predicted scores Dice 1 (the BraTS rule), so
    the mean over all cases rises with the number of empty cases (ET in lower-grade gliomas); the Dice
    over region-present cases and the count of false-positive cases show what that mean hides.
    """
    ref = [_number(row, metric_column(region, "ref_voxels")) for row in per_case]
    pred = [_number(row, metric_column(region, "pred_voxels")) for row in per_case]
    present = [i for i, v in enumerate(ref) if v > 0]
    return {
        "dice_present": _stats([_number(per_case[i], metric_column(region, "dice")) for i in present]),
        "present_cases": len(present),
        "absent_cases": len(per_case) - len(present),
        "false_positive_cases": sum(1 for r, p in zip(ref, pred) if r == 0 and p > 0),
    }


def lesion_stats(values: Sequence[float], count: bool = False) -> Dict[str, float]:
    """Statistics of one lesion-wise metric over cases: over the finite values, NaN / infinite counted apart.

    Lesion-wise values are NaN when neither side has a lesion and ``sq_hd95`` is infinite when no
    lesion was matched: their statistics are over the finite values, with the NaN (``undefined``) and
    infinite cases counted beside them.
    """
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    out = _stats(finite)
    out["undefined"] = int(np.isnan(arr).sum())
    out["infinite"] = int(np.isinf(arr).sum())
    if count:
        out["total"] = int(finite.sum())
    return out


def has_lesion_metrics(per_case: Sequence[Mapping[str, Any]]) -> bool:
    """True when the rows carry the lesion-wise columns (``WT_pq_dsc``, ...)."""
    return bool(per_case) and all(
        metric_column(r, m) in row for row in per_case for r in REGIONS for m in LESION_METRICS
    )


def summarize_segmentation(per_case: Sequence[Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The ``segmentation`` block of the summary from flat per-case rows::

        {region: {metric: {"mean", "std", "median", "n"},      # metrics.METRICS over all cases
                  "dice_present": {"mean", "std", "median", "n"},   # Dice over cases whose reference has the region
                  "present_cases": int, "absent_cases": int,     # reference has / lacks the region
                  "false_positive_cases": int,                   # region absent in the reference, predicted anyway
                  # with lesion-wise metrics (lesion_metrics.LESION_METRICS), over the cases where defined:
                  "tp": {"mean", "std", "median", "n", "total", "undefined", "infinite"}, ...},
         "mean": {metric: {"mean"}}}                             # region average of each METRICS mean

    Mean / std (sample) / median per region and metric (:func:`metrics.aggregate`, every value must
    be finite), the region-present Dice and false-positive cases (:func:`region_presence`), the
    lesion-wise statistics when the rows carry them, and under ``"mean"`` the per-metric average
    over the three regions (the single number the paper's tables report).
    """
    per_case = list(per_case)
    summary: Dict[str, Dict[str, Any]] = {
        r: dict(v) for r, v in aggregate(per_case, regions=REGIONS, metrics=METRICS).items()
    }
    lesions = has_lesion_metrics(per_case)
    for region in REGIONS:
        summary[region].update(region_presence(per_case, region))
        if lesions:
            for metric in LESION_METRICS:
                values = [_number(row, metric_column(region, metric)) for row in per_case]
                summary[region][metric] = lesion_stats(values, count=metric in LESION_COUNTS)
    summary["mean"] = {m: {"mean": float(np.mean([summary[r][m]["mean"] for r in REGIONS]))} for m in METRICS}
    return summary


def _fmt(s: Mapping[str, Any], scale: float, decimals: int = 1) -> str:
    if not s or s.get("n", 0) == 0:
        return "n/a"
    std = s.get("std")
    spread = f" ± {std * scale:.{decimals}f}" if std is not None and math.isfinite(std) else ""  # one case: mean only
    return f"{s['mean'] * scale:.{decimals}f}{spread} ({s['median'] * scale:.{decimals}f})"


def format_segmentation_table(seg: Mapping[str, Any]) -> str:
    """Markdown table: one row per region, ``mean ± std (median)`` over cases per metric.

    Dice, PPV and sensitivity in percent (as the paper reports them), HD95 in millimetres; then the
    Dice over the cases whose reference holds the region (``n`` = those cases) and the
    false-positive cases (region predicted in a case whose reference has none).
    """
    header = [METRIC_TITLES[m] for m in METRICS] + ["Dice, region-present cases (%)", "False-positive cases"]
    lines = ["| Region | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for region in REGIONS:
        s = seg.get(region, {})
        cells = [_fmt(s.get(m), 100.0 if m in PERCENT_METRICS else 1.0) for m in METRICS]
        if "present_cases" in s:
            present = _fmt(s.get("dice_present"), 100.0)
            cells.append(f"{present}, n={s['present_cases']}" if s["present_cases"] else "n/a (n=0)")
            cells.append(f"{s['false_positive_cases']} of {s['absent_cases']} region-absent")
        else:
            cells += ["n/a", "n/a"]
        lines.append(f"| {region} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_lesion_table(seg: Mapping[str, Any]) -> str:
    """Markdown table of the lesion-wise metrics (BraTS 2023+, panoptica): one row per region.

    Lesion counts are totals over cases; ``sq_dsc`` / ``pq_dsc`` (percent) and ``sq_hd95`` (mm) are
    ``mean ± std (median)`` over the cases where they are defined, with ``n`` when some are not.
    """
    header = ["tp / fp / fn lesions (total)"] + [LESION_TITLES[m] for m in ("sq_dsc", "pq_dsc", "sq_hd95")]
    lines = ["| Region | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for region in REGIONS:
        s = seg.get(region, {})
        cells = [" / ".join(str(s[m]["total"]) for m in LESION_COUNTS)]
        for metric in ("sq_dsc", "pq_dsc", "sq_hd95"):
            st = s[metric]
            cell = _fmt(st, 100.0 if metric in PERCENT_METRICS else 1.0)
            notes = []
            if st["undefined"] or st["infinite"]:
                notes.append(f"n={st['n']}")
            if st["undefined"]:
                notes.append(f"{st['undefined']} without lesions")
            if st["infinite"]:
                notes.append(f"{st['infinite']} without a matched lesion (inf)")
            lines_cell = cell + (f" [{'; '.join(notes)}]" if notes else "")
            cells.append(lines_cell)
        lines.append(f"| {region} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CONTROL_ROW = "Control: enhancing fraction of the predicted tumour"
"""Label of the grading table's control row (:mod:`~modeling_emrfuse.evaluation.grading_control`)."""


def _grading_cells(grading: Mapping[str, Any]) -> List[str]:
    cells = []
    for metric in GRADING_METRICS + GRADING_CALIBRATION_METRICS:
        value = grading.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            cells.append("n/a")
        else:
            cells.append(
                f"{float(value):.3f}" if metric in GRADING_CALIBRATION_METRICS else f"{100 * float(value):.1f}"
            )
    cm = grading.get("confusion_matrix")
    cells.append(str(np.asarray(cm).tolist()) if cm is not None else "n/a")
    return cells


def format_grading_table(grading: Mapping[str, Any], control: Optional[Mapping[str, Any]] = None) -> str:
    """Markdown table of the grading metrics (accuracy, balanced accuracy, ROC AUC, F1 in %; log loss and Brier score,
    lower is better, of the predicted probabilities; confusion matrix), with a second row for the enhancing-fraction
    control when ``control`` (a ``grading_control`` summary entry with ``metrics``) is given."""
    lines = [
        "| Grades from | Accuracy | Balanced accuracy | ROC AUC | F1 | Log loss | Brier | Confusion matrix (rows true, cols pred) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines.append("| EmrFuse | " + " | ".join(_grading_cells(grading)) + " |")
    if control and control.get("metrics"):
        rule = control.get("rule") or {}
        label = f"{CONTROL_ROW} (threshold {rule.get('threshold', float('nan')):.4f}, fitted on the {control.get('fitted_on', 'training cases')})"
        lines.append(f"| {label} | " + " | ".join(_grading_cells(control["metrics"])) + " |")
    return "\n".join(lines)


def format_results_markdown(summary: Mapping[str, Any]) -> str:
    """The results as markdown: the segmentation table, the lesion-wise table when computed, the grading table."""
    parts = []
    n = summary.get("num_cases")
    seg = summary.get("segmentation")
    if seg:
        parts.append(
            f"Segmentation on {n} cases (3D, on the reference grid; mean ± std (median) over cases):\n\n"
            + format_segmentation_table(seg)
        )
        if all(m in seg.get(r, {}) for r in REGIONS for m in LESION_METRICS):
            parts.append(
                "Lesion-wise (BraTS 2023+; panoptica configured as the official BraTS evaluation):\n\n"
                + format_lesion_table(seg)
            )
    if summary.get("grading"):
        labels = summary.get("grade_labels", list(GRADES))
        parts.append(
            f"Grading ({' vs '.join(labels)}) on {summary.get('num_graded_cases', n)} cases (%):\n\n"
            + format_grading_table(summary["grading"], summary.get("grading_control"))
        )
    return "\n\n".join(parts)


def write_per_case_csv(per_case: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write one row per case, in the order given; columns are the union of the rows' keys (case_id first).

    Floats are written in full (shortest round-trip form; ``nan`` / ``inf`` where a metric is not
    defined or infinite), a missing value as an empty cell.
    """
    path = Path(path)
    columns: List[str] = []
    for row in per_case:
        for key in row:
            if key not in columns:
                columns.append(key)
    if "case_id" in columns:
        columns.remove("case_id")
        columns.insert(0, "case_id")
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in per_case:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return path


def _csv_value(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, np.integer):
        return int(value)
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
    embeddings: np.ndarray,
    grades: Sequence[Optional[str]],
    path: str | Path,
    *,
    title: str = "Fused case embeddings (PCA)",
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
        ax.scatter(
            xy[idx, 0], xy[idx, 1], s=36, alpha=0.85, c=colours.get(label, "tab:gray"), label=f"{label} (n={len(idx)})"
        )
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


def plot_dice_boxplot(
    per_case: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "Per-case Dice"
) -> Optional[Path]:
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
    title: str = "Evaluation",
    header_lines: Sequence[str] = (),
    embeddings: Optional[np.ndarray] = None,
    embedding_grades: Optional[Sequence[Optional[str]]] = None,
) -> Dict[str, Path]:
    """Write ``per_case.csv``, ``summary.json``, ``summary.md`` and the figures into ``out_dir``.

    - ``per_case.csv``: one row per case, in the order given (id, per-region metrics, voxel counts, the
      lesion-wise metrics when computed, and whatever else the caller put in the rows);
    - ``summary.json``: ``num_cases``, ``segmentation`` (:func:`summarize_segmentation`), ``grading`` when
      cases were graded, and the caller's run facts (training step, label conventions, missing cases, ...);
    - ``summary.md``: see below (the tables are also printed and put into the model card);
    - ``dice_boxplot.png``: per-case Dice as a box plot per region; ``embeddings_pca.png``: the fused
      case embeddings projected to 2D with PCA, coloured by grade (the paper's Fig. 3; training only).

    ``summary.md`` is ``# <title>``, the caller's ``header_lines`` as a bullet list, then
    :func:`format_results_markdown`. Returns the written paths by kind (``per_case``, ``summary``,
    ``markdown``, ``embeddings``, ``dice_boxplot``); figures that cannot be drawn (too few cases, no
    segmentation, no embeddings) are left out.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: Dict[str, Path] = {}
    paths["per_case"] = write_per_case_csv(per_case, out_dir / OUTPUT_FILES["per_case"])
    paths["summary"] = write_json(out_dir / OUTPUT_FILES["summary"], summary, indent=2, default=_json_default)
    paths["markdown"] = out_dir / OUTPUT_FILES["markdown"]
    head = [f"# {title}", ""] + [f"- {line}" for line in header_lines] + ([""] if header_lines else [])
    paths["markdown"].write_text("\n".join(head) + format_results_markdown(summary) + "\n", encoding="utf-8")
    if embeddings is not None and len(embeddings) >= 2:
        p = plot_embeddings_pca(
            embeddings, embedding_grades or [None] * len(embeddings), out_dir / "embeddings_pca.png"
        )
        if p is not None:
            paths["embeddings"] = p
    if summary.get("segmentation"):
        p = plot_dice_boxplot(per_case, out_dir / "dice_boxplot.png")
        if p is not None:
            paths["dice_boxplot"] = p
    return paths
