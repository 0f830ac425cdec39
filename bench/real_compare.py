"""Paired comparison of two ``bench_real.py`` cross-validations (a training lever against the recipe without it).

    python bench/real_compare.py --base outputs/real --other outputs/real-monai [--recipe image] [--expert_only]
    python bench/real_compare.py --base outputs/real --recipe image --other_recipe image+report --report_cases_only

Two runs of one recipe (``--other DIR``), or two recipes of one run (``--other_recipe``; ``--other`` defaults to
``--base``), e.g. the report against image only on the cases with a report, or the report against its
shuffled-reports control.

Both runs must use the same folds (same cases, ``--cv`` and ``--seed``: the split files are compared). Reads every
fold that has finished in both (``runs/cv-fold<k>-<recipe>/eval/per_case.csv``), so a cross-validation still running
can be compared on its finished folds (the output says how many). Prints, and writes to ``OTHER/compare.md``, the
mean Dice / HD95 per region of both on the common cases and the paired per-case difference (other - base) with a
95 % bootstrap interval (``*``: it excludes zero).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from modeling_emrfuse.brats_labels import REGIONS
from modeling_emrfuse.evaluation.ablation_stats import format_difference, paired_difference
from modeling_emrfuse.evaluation.metrics import bootstrap_mean_ci

METRICS = ("dice", "hd95")


def finished_rows(out: Path, recipe: str) -> Dict[int, Dict[str, Dict[str, str]]]:
    """Fold index -> case id -> per-case row, for every fold whose run of ``recipe`` has finished."""
    folds: Dict[int, Dict[str, Dict[str, str]]] = {}
    for run in sorted((out / "runs").glob(f"cv-fold*-{recipe}")):
        per_case = run / "eval" / "per_case.csv"
        if not (run / ".bench_real_done.json").is_file() or not per_case.is_file():
            continue
        fold = int(run.name[len("cv-fold") :].split("-", 1)[0])
        with per_case.open(newline="") as fh:
            folds[fold] = {row["case_id"]: row for row in csv.DictReader(fh)}
    return folds


def _split(out: Path, fold: int) -> Optional[List[str]]:
    path = out / "runs" / f"cv-fold{fold}-split.json"
    return sorted(json.loads(path.read_text())["test"]) if path.is_file() else None


def compare(
    base: Path,
    other: Path,
    recipe: str = "image",
    keep: Optional[Sequence[str]] = None,
    other_recipe: Optional[str] = None,
    report_cases_only: bool = False,
    no_report_cases_only: bool = False,
) -> Dict[str, object]:
    """The comparison on the folds finished in both runs; ``keep``: only these case ids (e.g. expert-labelled);
    ``other_recipe``: the other run's recipe (default ``recipe``); ``report_cases_only``: only the cases whose
    other-run row says the report reached the model (``has_report``); ``no_report_cases_only``: only the others (what
    a model with a text tower does without a report: its architecture, not the report)."""
    a, b = finished_rows(base, recipe), finished_rows(other, other_recipe or recipe)
    folds = sorted(set(a) & set(b))
    for fold in folds:
        if _split(base, fold) != _split(other, fold):
            raise SystemExit(f"real_compare: fold {fold} holds out different cases in the two runs (--cv / --seed).")
    cases = [
        c
        for f in folds
        for c in sorted(a[f])
        if c in b[f]
        and (keep is None or c in keep)
        and (not report_cases_only or str(b[f][c].get("has_report")).lower() == "true")
        and (not no_report_cases_only or str(b[f][c].get("has_report")).lower() != "true")
    ]
    rows_a = {c: a[f][c] for f in folds for c in a[f]}
    rows_b = {c: b[f][c] for f in folds for c in b[f]}
    result: Dict[str, object] = {"folds": [f + 1 for f in folds], "n_cases": len(cases), "metrics": {}}
    for region in REGIONS:
        for metric in METRICS:
            key = f"{region}_{metric}"
            va = {c: float(rows_a[c][key]) for c in cases}
            vb = {c: float(rows_b[c][key]) for c in cases}
            result["metrics"][key] = {
                "base": bootstrap_mean_ci(list(va.values()))[0] if cases else float("nan"),
                "other": bootstrap_mean_ci(list(vb.values()))[0] if cases else float("nan"),
                "difference": paired_difference([vb], [va]),
            }
    return result


def to_markdown(
    result: Dict[str, object], base: Path, other: Path, recipe: str, other_recipe: Optional[str] = None
) -> str:
    head = "| | " + " | ".join(
        f"{m} {r}" if m == "Dice" else f"HD95 {r} (mm)" for m in ("Dice", "HD95") for r in REGIONS
    )
    lines = [
        (
            f"Paired comparison, recipe `{recipe}`: `{other}` against `{base}`"
            if other_recipe in (None, recipe)
            else f"Paired comparison: recipe `{other_recipe}` of `{other}` against `{recipe}` of `{base}`"
        )
        + f" on folds {result['folds']} "
        f"({result['n_cases']} held-out cases in both).\n",
        head + " |",
        "|---|" + "---|" * (2 * len(REGIONS)),
    ]
    metrics = result["metrics"]
    order = [f"{r}_{m}" for m in METRICS for r in REGIONS]
    for label, name in (("base", "base"), ("other", "other")):
        cells = [f"{metrics[k][name]:.3f}" if k.endswith("dice") else f"{metrics[k][name]:.1f}" for k in order]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = [format_difference(metrics[k]["difference"], digits=3 if k.endswith("dice") else 1) for k in order]
    lines.append("| other - base | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="bench_real.py OUTPUT_DIR of the recipe without the lever")
    p.add_argument(
        "--other", type=Path, default=None, help="bench_real.py OUTPUT_DIR of the recipe with it (default BASE)"
    )
    p.add_argument("--recipe", default="image", help="the recipe compared (BASE's, and OTHER's unless --other_recipe)")
    p.add_argument("--other_recipe", default=None, help="OTHER's recipe, when two recipes are compared")
    p.add_argument(
        "--report_cases_only",
        action="store_true",
        help="only the cases whose report reached OTHER's model (its per-case has_report)",
    )
    p.add_argument(
        "--no_report_cases_only", action="store_true", help="only the cases without a report in OTHER's model"
    )
    p.add_argument("--expert_only", action="store_true", help="only the cases labelled expert in BASE/cv_per_case.csv")
    args = p.parse_args(argv)
    args.other = args.other or args.base
    if args.other == args.base and args.other_recipe in (None, args.recipe):
        raise SystemExit(
            "real_compare: give --other DIR or --other_recipe RECIPE (a run against itself is no comparison)."
        )
    keep = None
    if args.expert_only:
        table = args.base / "cv_per_case.csv"
        if not table.is_file():
            raise SystemExit(f"real_compare: --expert_only needs {table} (a finished bench_real.py run).")
        with table.open(newline="") as fh:
            keep = [r["case_id"] for r in csv.DictReader(fh) if r["label"] == "expert"]
    if args.report_cases_only and args.no_report_cases_only:
        raise SystemExit("real_compare: --report_cases_only and --no_report_cases_only exclude each other.")
    result = compare(
        args.base, args.other, args.recipe, keep, args.other_recipe, args.report_cases_only, args.no_report_cases_only
    )
    if not result["n_cases"]:
        raise SystemExit("real_compare: no fold has finished in both runs.")
    text = to_markdown(result, args.base, args.other, args.recipe, args.other_recipe)
    name = (
        "compare.md" if args.other_recipe in (None, args.recipe) else f"compare-{args.other_recipe}-vs-{args.recipe}.md"
    )
    (args.other / name).write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
