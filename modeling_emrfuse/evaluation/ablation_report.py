"""The paper's ablation tables (Table 1: adding each part; Table 3: removing each part) from measured runs.

``train.py --ablation table1|table3`` trains and evaluates every row on the same data, seeds and budget
and hands each run's summary (the ``summary.json`` structure of :mod:`modeling_emrfuse.evaluation.report`)
to this module, which writes the markdown table in the paper's format (:func:`format_ablation_table`) and
a bar chart.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..brats_labels import REGIONS
from ..configuration_emrfuse import ABLATION_PRESETS, CROSS_ATTENTION_SWITCH, MODALITY_SWITCH
from ..runtime.strict_json import write_json
from .ablation_stats import format_difference, paired_difference, seed_mean_ci
from .metrics import METRICS

PRESET_PARTS: dict[str, str] = {
    CROSS_ATTENTION_SWITCH: "decoder cross-attention to the report tokens",
    "use_text": "report (text tower, FiLM conditioning of the decoder)",
    "use_alignment": "modality alignment",
    "use_self_attention": "self-attention",
    "use_residual": "residual connections",
    "use_dynamic_weighting": "dynamic feature weighting",
}
"""How a table caption names each switch that is on."""


def preset_parts(name: str) -> str:
    """The parts a preset switches on, in words (for table captions): e.g. ``"image; report (...); alignment"``."""
    switches = ABLATION_PRESETS[name]
    parts = ["image"] if switches.get(MODALITY_SWITCH, True) else []
    order = (
        "use_text",
        "use_alignment",
        "use_self_attention",
        "use_residual",
        "use_dynamic_weighting",
        CROSS_ATTENTION_SWITCH,
    )
    parts += [PRESET_PARTS[k] for k in order if switches.get(k)]
    return "; ".join(parts)


TABLE1_ROWS: list[tuple[str, str]] = [
    ("image_only", "Single-modality Image (ResNet-50)"),
    ("concat", "Image + Text (no alignment, no attention)"),
    ("plus_alignment", "+ Modality alignment"),
    ("plus_self_attention", "+ Self-attention"),
    ("plus_residual", "+ Residual connection"),
    ("full", "+ Dynamic feature weighting"),
    ("full_cross_attention", "Full + decoder cross-attention to the report (extension, not in the paper)"),
]
"""(preset, row label) in the order of the paper's Table 1, then this implementation's extension."""

TABLE3_ROWS: list[tuple[str, str]] = [
    ("full", "Complete model"),
    ("no_alignment", "Without modality alignment"),
    ("no_self_attention", "Without self-attention"),
    ("no_residual", "Without residual connection"),
    ("no_dynamic_weighting", "Without dynamic feature weighting"),
]
"""(preset, row label) in the order of the paper's Table 3."""

TABLE_TITLES = {
    "table1": "Table 1 (adding each part)",
    "table3": "Table 3 (removing each part from the complete model)",
}

# (key in a row's numbers, column title, scale) per table, in the paper's column order
TABLE_COLUMNS: Dict[str, List[Tuple[str, str, float]]] = {
    "table1": [
        ("dice", "Dice (%)", 100.0),
        ("ppv", "PPV (%)", 100.0),
        ("sensitivity", "Sensitivity (%)", 100.0),
        ("hd95", "Hausdorff distance HD95 (mm)", 1.0),
    ],
    "table3": [
        ("dice", "Dice (%)", 100.0),
        ("ppv", "PPV (%)", 100.0),
        ("sensitivity", "Sensitivity (%)", 100.0),
    ],
}
SHUFFLED_REPORTS_ROW: Tuple[str, str] = ("shuffled_reports", "Complete model, reports shuffled across cases (control)")
"""(row key, label) of the control row that closes both tables (the paper has none): the complete model trained and evaluated with every
case's report swapped with another case's of its split (``datasets_scripts.brats_text.derange_reports``). When it
matches the complete model, the model is not using what the report says about its own case."""
SHUFFLED_REPORTS_PRESET = "full"
"""The switches of the control row."""
REGION_COLUMNS = [(f"dice_{r}", f"Dice {r} (%)", 100.0) for r in REGIONS]
ET_COLUMNS = [
    ("dice_ET_present", "Dice ET, ET-present cases (%)", 100.0),
    ("ET_false_positive_cases", "ET-absent cases with ET predicted", 1.0),
]
GRADING_COLUMN = ("accuracy", "Grading accuracy (%)", 100.0)
CONTROL_COLUMN = ("control_accuracy", "Control: enhancing fraction, accuracy (%)", 100.0)
"""The enhancing-fraction control of the same run (threshold fitted on the training cases' reference maps, applied
to the held-out cases' predicted maps): what the segmentation alone grades."""
REFERENCE_PRESET = "full"
"""The complete model: every row's paired per-case differences are taken against it."""
DIFFERENCE_COLUMNS = [(f"dice_{r}", f"Δ Dice {r} vs complete (pts)", 100.0) for r in REGIONS] + [
    ("grading", "Δ Grading vs complete (pts)", 100.0)
]
"""Per-case values compared between a row and the complete model (``case_values`` keys, title, scale)."""


def case_values(run_dir: str | Path) -> Dict[str, Dict[str, float]]:
    """One run's per-case values from its evaluation reports: ``{"dice_WT": {case id: Dice}, ..., "grading":
    {case id: 1.0 if graded correctly else 0.0}}`` (``eval/per_case.csv``; grading from ``grading/eval`` when the
    demo's grading run follows segmentation). Missing files give empty mappings."""
    import csv

    run_dir = Path(run_dir)
    out: Dict[str, Dict[str, float]] = {key: {} for key, _, _ in DIFFERENCE_COLUMNS}
    for folder in (run_dir / "eval", run_dir / "grading" / "eval"):
        path = folder / "per_case.csv"
        if not path.is_file():
            continue
        with path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                case = row.get("case_id")
                for region in REGIONS:
                    value = row.get(f"{region}_dice")
                    if value not in (None, ""):
                        out[f"dice_{region}"][case] = float(value)
                if row.get("pred_grade") and row.get("grade"):
                    out["grading"][case] = 1.0 if row["pred_grade"] == row["grade"] else 0.0
    return out


def row_differences(rows: Sequence[Tuple], reference: str = REFERENCE_PRESET) -> Dict[str, Dict[str, Any]]:
    """``{preset: {key: PairedDifference}}``: each row's paired per-case difference to the ``reference`` row, for
    the rows that carry per-case values (a 4th tuple item: one :func:`case_values` per seed)."""
    ref = next((r for r in rows if r[0] == reference and len(r) > 3), None)
    if ref is None:
        return {}
    out: Dict[str, Dict[str, Any]] = {}
    for row in rows:
        if len(row) < 4 or row[0] == reference:
            continue
        out[row[0]] = {
            key: paired_difference([c[key] for c in row[3]], [c[key] for c in ref[3]])
            for key, _, _ in DIFFERENCE_COLUMNS
        }
    return out


def differences_sentence(rows: Sequence[Tuple], differences: Mapping[str, Mapping[str, Any]]) -> str:
    """One sentence saying what the paired differences show (including "no measurable difference")."""
    if not differences:
        return ""
    labels = {r[0]: r[1] for r in rows}
    titles = {key: title.split(" vs ")[0].replace("Δ ", "") for key, title, _ in DIFFERENCE_COLUMNS}
    found = [
        f"{labels[p]} ({titles[k]} {d.mean * 100:+.1f} pts)"
        for p, ds in differences.items()
        for k, d in ds.items()
        if d.excludes_zero
    ]
    if not found:
        return (
            "No row differs measurably from the complete model: every paired 95 % interval over cases (Δ columns) "
            "includes zero."
        )
    return (
        "Differences to the complete model whose paired 95 % interval over cases excludes zero (*): "
        + "; ".join(found)
        + ". Every other difference is within what the choice of cases explains "
        "(no correction for the number of comparisons)."
    )


def row_numbers(summary: Mapping[str, Any]) -> Dict[str, float]:
    """The numbers one ablation row needs from one run's summary (region-averaged metrics, per-region Dice).

    The paper's "Dice" of Tables 1 and 3 is one number per configuration; here it is the mean over the
    three regions (WT, TC, ET) of the per-region mean over cases, and the per-region Dice is kept so that
    nothing is hidden behind the average. Hausdorff distance is HD95 (mm). The ET mean counts every
    ET-absent case predicted empty as Dice 1, so the ET Dice over the ET-present cases and the number of
    ET-absent cases where ET was predicted (false-positive cases) are taken from the summary too.
    """
    out: Dict[str, float] = {}
    seg = summary.get("segmentation") or {}
    for metric in METRICS:
        values = [seg[r][metric]["mean"] for r in REGIONS if r in seg and metric in seg[r]]
        if values:
            out[metric] = float(np.mean(values))
    for region in REGIONS:
        if region in seg and "dice" in seg[region]:
            out[f"dice_{region}"] = float(seg[region]["dice"]["mean"])
    et = seg.get("ET") or {}
    if "present_cases" in et:
        out["dice_ET_present"] = float(et["dice_present"]["mean"])  # NaN when no case has ET
        out["ET_false_positive_cases"] = float(et["false_positive_cases"])
    grading = summary.get("grading") or {}
    if "accuracy" in grading:
        out["accuracy"] = float(grading["accuracy"])
    control = (summary.get("grading_control") or {}).get("metrics") or {}
    if "accuracy" in control:
        out["control_accuracy"] = float(control["accuracy"])
    return out


def _cell(values: Sequence[float], scale: float) -> str:
    """``mean ± half-width of the 95 % confidence interval over seeds`` (Student t); the value alone for one seed."""
    vals = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "n/a"
    interval = seed_mean_ci(vals)
    if interval.n == 1:
        return f"{interval.mean:.1f}"
    return f"{interval.mean:.1f} ± {interval.half_width:.1f}"


def format_ablation_table(
    table: str,
    rows: Sequence[Tuple[str, str, Sequence[Mapping[str, float]]]],
    *,
    caption: Optional[str] = None,
) -> str:
    """Markdown table in the paper's format.

    ``rows``: ``(preset, paper row label, [numbers of each seed's run][, [case_values of each seed's run]])`` in
    table order, the numbers as :func:`row_numbers` returns them. Cells are ``mean ± half-width of the 95 %
    confidence interval over seeds`` (Student t) when there are several seeds. Columns: the paper's columns of
    that table, then Dice per region, the ET Dice over ET-present cases and the ET false-positive cases, the
    grading accuracy when the runs measured it (and the enhancing-fraction control's accuracy next to it), and, when the rows carry per-case values, each row's paired
    per-case difference to the complete model (mean [95 % bootstrap interval over cases], ``*`` when it excludes
    zero; :mod:`modeling_emrfuse.evaluation.ablation_stats`), followed by one sentence saying what the
    differences show.
    """
    if table not in TABLE_COLUMNS:
        raise ValueError(f"Unknown ablation table {table!r}: use one of {sorted(TABLE_COLUMNS)}.")
    columns = list(TABLE_COLUMNS[table]) + REGION_COLUMNS + ET_COLUMNS
    if any("accuracy" in n for _, _, runs, *_ in rows for n in runs):
        columns.append(GRADING_COLUMN)
    if any("control_accuracy" in n for _, _, runs, *_ in rows for n in runs):
        columns.append(CONTROL_COLUMN)
    lines = []
    if caption:
        lines += [caption, ""]
    differences = row_differences(rows)
    diff_columns = DIFFERENCE_COLUMNS if differences else []
    if diff_columns and not any("accuracy" in n for _, _, runs, *_ in rows for n in runs):
        diff_columns = [c for c in diff_columns if c[0] != "grading"]
    titles = [title for _, title, _ in columns] + [title for _, title, _ in diff_columns]
    lines.append("| Model configuration | " + " | ".join(titles) + " |")
    lines.append("|---|" + "---|" * len(titles))
    for preset, label, runs, *_ in rows:
        cells = [_cell([n.get(key, float("nan")) for n in runs], scale) for key, _, scale in columns]
        for key, _, scale in diff_columns:
            cells.append(
                "(reference)"
                if preset == REFERENCE_PRESET
                else format_difference(differences.get(preset, {}).get(key), scale=scale)
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    sentence = differences_sentence(rows, differences)
    if sentence:
        lines += ["", sentence]
    return "\n".join(lines)


def plot_ablation_bars(
    table: str,
    rows: Sequence[Tuple[str, str, Sequence[Mapping[str, float]]]],
    path: str | Path,
    *,
    title: Optional[str] = None,
) -> Path:
    """Grouped bar chart: per configuration, Dice for WT / TC / ET and the region mean (error bars: 95 % CI over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [f"dice_{r}" for r in REGIONS] + ["dice"]
    names = [f"Dice {r}" for r in REGIONS] + ["Dice mean"]
    n_rows = len(rows)
    width = 0.8 / len(keys)
    x = np.arange(n_rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * n_rows), 4.5), dpi=120)
    for j, (key, name) in enumerate(zip(keys, names)):
        means, stds = [], []
        for _, _, runs, *_ in rows:
            interval = seed_mean_ci([100 * n[key] for n in runs if key in n])
            means.append(interval.mean if interval.n else 0.0)
            stds.append(interval.half_width if interval.n > 1 else 0.0)
        ax.bar(x + (j - (len(keys) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=name)
    ax.set_xticks(x, [_wrap(label) for _, label, *_ in rows], fontsize=8)
    ax.set_ylabel("Dice (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or TABLE_TITLES.get(table, table))
    ax.legend(fontsize=8, ncol=len(keys), loc="lower center", bbox_to_anchor=(0.5, -0.38), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _wrap(label: str, width: int = 18) -> str:
    words, lines, line = label.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "\n".join(lines)


def write_ablation_report(
    out_dir: str | Path,
    table: str,
    rows: Sequence[Tuple[str, str, Sequence[Mapping[str, float]]]],
    *,
    caption: Optional[str] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Path]:
    """Write ``<table>.md``, ``<table>.png`` and ``<table>.json`` (all numbers per seed) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{table}.md"
    md.write_text(format_ablation_table(table, rows, caption=caption) + "\n")
    png = plot_ablation_bars(table, rows, out_dir / f"{table}.png")
    js = out_dir / f"{table}.json"
    differences = row_differences(rows)
    json_rows = []
    for preset, label, runs, *_ in rows:
        entry: Dict[str, Any] = {"preset": preset, "label": label, "runs": list(runs)}
        keys = sorted({k for n in runs for k in n})
        entry["ci95"] = {k: seed_mean_ci([n.get(k, float("nan")) for n in runs]).to_dict() for k in keys}
        if "accuracy" in keys:
            entry["grading_accuracy_per_seed"] = [n.get("accuracy") for n in runs]
        if "control_accuracy" in keys:
            entry["control_accuracy_per_seed"] = [n.get("control_accuracy") for n in runs]
        if preset in differences:
            entry["paired_difference_to_complete"] = {k: d.to_dict() for k, d in differences[preset].items()}
        json_rows.append(entry)
    write_json(js, {"table": table, **(dict(extra) if extra else {}), "rows": json_rows}, indent=2)
    return {"markdown": md, "chart": png, "json": js}
