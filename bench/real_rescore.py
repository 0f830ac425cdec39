"""Inference-time levers on the cross-validation models of ``bench_real.py``: test-time flips and post-processing.

    python bench/bench_real.py --output_dir outputs/real --cv 5 --recipes image --rescore   # after the CV
    python bench/real_rescore.py --output_dir outputs/real                                   # on a finished CV

Each fold's saved model (``OUTPUT_DIR/runs/cv-fold{k}-{recipe}``, the model and processor that ``train.py``
saved) re-predicts that fold's held-out cases (``runs/cv-fold{k}-split.json`` "test") through the pipeline,
under the variants of :func:`standard_variants`: plain, test-time flips, small whole-tumour components removed,
a small enhancing tumour relabelled as core, then the best of the two post-processings together and flips with
the best post-processing (:func:`derived_variants`). The model runs twice per case (plain and with flips);
post-processing needs no model call, so every other variant post-processes one of those two label maps
(:func:`apply_variant`, the pipeline's own :func:`~modeling_emrfuse.processing_emrfuse.postprocess_regions`).
Label maps and scores are cached under ``OUTPUT_DIR/rescore_cache`` (a rerun with the same models is cheap).

Output (``rescore.md``, ``rescore.json``, appended to ``results.md``): mean Dice / HD95 per region and variant,
paired per-case differences against "plain" with 95 % bootstrap intervals, and what each variant does to the
cases without enhancing tumour in their reference (how many get ET predicted). The best post-processing is
chosen on the same cases it is scored on, so its difference is optimistic: a setting is worth keeping when
its interval excludes zero, not because it is the best of a few. Figures only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
from modeling_emrfuse.brats_labels import REGIONS, label_map_to_regions, regions_to_label_map  # noqa: E402
from modeling_emrfuse.evaluation.ablation_stats import format_difference, paired_difference  # noqa: E402
from modeling_emrfuse.evaluation.metrics import bootstrap_mean_ci, metrics_to_row, score_label_maps  # noqa: E402
from modeling_emrfuse.processing_emrfuse import postprocess_regions  # noqa: E402

CACHE = "rescore_cache"
SOURCES = ("plain", "tta")  # the two model runs per case; every variant post-processes one of them


# ----------------------------------------------------------------------------------------------
# variants
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One way of predicting a case: with or without test-time flips, and a post-processing (0 = off)."""

    name: str
    tta: bool = False
    min_component_mm3: float = 0.0
    et_min_mm3: float = 0.0

    @property
    def source(self) -> str:
        """The model run whose label map this variant post-processes."""
        return "tta" if self.tta else "plain"

    @property
    def postprocessing(self) -> Dict[str, float]:
        return {"min_component_mm3": float(self.min_component_mm3), "et_min_mm3": float(self.et_min_mm3)}

    @property
    def key(self) -> str:
        """What the variant computes (not its name): the cache key."""
        return f"tta={int(self.tta)},cc={self.min_component_mm3:g},et={self.et_min_mm3:g}"


def standard_variants(
    components: Sequence[float] = (200, 1000), et_thresholds: Sequence[float] = (200, 500)
) -> List[Variant]:
    """plain; tta; ``cc<V>`` (whole-tumour components below V mm^3 removed); ``et<V>`` (ET below V mm^3 -> core)."""
    out = [Variant("plain"), Variant("tta", tta=True)]
    out += [Variant(f"cc{v:g}", min_component_mm3=float(v)) for v in components]
    out += [Variant(f"et{v:g}", et_min_mm3=float(v)) for v in et_thresholds]
    return out


def _mean_dice(rows: Iterable[Mapping[str, Any]]) -> float:
    """Mean over cases of the case's mean Dice over WT / TC / ET (NaN when no case)."""
    values = [np.mean([float(r[f"{region}_dice"]) for region in REGIONS]) for r in rows]
    return float(np.mean(values)) if values else float("nan")


def best_variant(rows: Sequence[Mapping[str, Any]], candidates: Sequence[Variant]) -> Optional[Variant]:
    """The candidate with the highest mean Dice over the cases (ties: the first); ``None`` without a scored one."""
    best, best_score = None, -np.inf
    for variant in candidates:
        score = _mean_dice(r for r in rows if r["variant"] == variant.name)
        if score == score and score > best_score:
            best, best_score = variant, score
    return best


def _postprocessing_variants(variants: Sequence[Variant]) -> List[Variant]:
    return [v for v in variants if not v.tta and (v.min_component_mm3 or v.et_min_mm3)]


def combined_variant(rows: Sequence[Mapping[str, Any]], variants: Sequence[Variant]) -> Optional[Variant]:
    """The best component size with the best ET threshold together (``cc<A>+et<B>``, on the plain run), chosen by
    mean Dice on the scored cases (:func:`best_variant`); ``None`` without both kinds."""
    pp = _postprocessing_variants(variants)
    best_cc = best_variant(rows, [v for v in pp if v.min_component_mm3 and not v.et_min_mm3])
    best_et = best_variant(rows, [v for v in pp if v.et_min_mm3 and not v.min_component_mm3])
    if best_cc is None or best_et is None:
        return None
    return Variant(
        f"{best_cc.name}+{best_et.name}", min_component_mm3=best_cc.min_component_mm3, et_min_mm3=best_et.et_min_mm3
    )


def flips_with_best(rows: Sequence[Mapping[str, Any]], variants: Sequence[Variant]) -> Optional[Variant]:
    """Test-time flips with the best post-processing of the scored ones (``tta+<best>``), by mean Dice."""
    best = best_variant(rows, _postprocessing_variants(variants))
    return None if best is None else replace(best, name=f"tta+{best.name}", tta=True)


def apply_variant(label_map: np.ndarray, convention: str, voxel_mm3: float, variant: Variant) -> np.ndarray:
    """The variant's post-processing of a label map of its source run (unchanged when it has none); the same
    function the pipeline applies to its region masks, so the result is the pipeline's with those options."""
    if not (variant.min_component_mm3 or variant.et_min_mm3):
        return label_map
    regions = label_map_to_regions(label_map, convention)
    return regions_to_label_map(postprocess_regions(regions, voxel_mm3, **variant.postprocessing), convention)


def score_row(label_map: np.ndarray, convention: str, reference: np.ndarray, spacing) -> Dict[str, Any]:
    """Per-region metrics of a label map against the case's reference (as ``train.py``'s ``case_row`` scores it)."""
    return metrics_to_row(score_label_maps(label_map, reference, pred_convention=convention, spacing=spacing))


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
METRICS = (("dice", 3), ("hd95", 1))


def _by_variant(rows: Sequence[Mapping[str, Any]], name: str) -> Dict[str, Mapping[str, Any]]:
    return {r["case_id"]: r for r in rows if r["variant"] == name}


def summarise_variants(rows: Sequence[Mapping[str, Any]], variants: Sequence[Variant]) -> Dict[str, Dict[str, Any]]:
    """Per variant: cases, and mean [95 % bootstrap interval] of Dice and HD95 per region."""
    out: Dict[str, Dict[str, Any]] = {}
    for variant in variants:
        mine = list(_by_variant(rows, variant.name).values())
        stats: Dict[str, Any] = {"n": len(mine)}
        for region in REGIONS:
            for metric, _ in METRICS:
                mean, low, high = bootstrap_mean_ci([float(r[f"{region}_{metric}"]) for r in mine])
                stats[f"{region}_{metric}"] = {"mean": mean, "ci95": [low, high]}
        out[variant.name] = stats
    return out


def paired_vs_plain(
    rows: Sequence[Mapping[str, Any]], variants: Sequence[Variant], reference: str = "plain"
) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Per variant (other than ``reference``) and ``<region>_<metric>``: the mean per-case difference (variant -
    reference) on the cases both scored, its 95 % bootstrap interval and whether it excludes zero
    (:func:`~modeling_emrfuse.evaluation.ablation_stats.paired_difference`)."""
    base = _by_variant(rows, reference)
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for variant in variants:
        if variant.name == reference:
            continue
        mine = _by_variant(rows, variant.name)
        out[variant.name] = {}
        for region in REGIONS:
            for metric, _ in METRICS:
                col = f"{region}_{metric}"
                diff = paired_difference(
                    [{c: float(r[col]) for c, r in mine.items()}], [{c: float(r[col]) for c, r in base.items()}]
                )
                out[variant.name][col] = diff.to_dict()
    return out


def et_outcomes(rows: Sequence[Mapping[str, Any]], variants: Sequence[Variant]) -> Dict[str, Dict[str, Any]]:
    """Per variant: the ET-absent cases (no ET voxel in the reference) and how many of them get ET predicted (each
    such case scores ET Dice 0 instead of 1), and the ET-present cases whose predicted ET vanished entirely."""
    out: Dict[str, Dict[str, Any]] = {}
    for variant in variants:
        mine = list(_by_variant(rows, variant.name).values())
        absent = [r for r in mine if int(r["ET_ref_voxels"]) == 0]
        present = [r for r in mine if int(r["ET_ref_voxels"]) > 0]
        out[variant.name] = {
            "absent_cases": len(absent),
            "absent_with_et_predicted": sum(int(r["ET_pred_voxels"]) > 0 for r in absent),
            "absent_cases_ids": sorted(r["case_id"] for r in absent),
            "present_cases": len(present),
            "present_with_no_et_predicted": sum(int(r["ET_pred_voxels"]) == 0 for r in present),
            "present_et_dice": float(np.mean([float(r["ET_dice"]) for r in present])) if present else float("nan"),
        }
    return out


def _cell(stat: Mapping[str, Any], digits: int) -> str:
    mean, (low, high) = stat["mean"], stat["ci95"]
    return "n/a" if mean != mean else f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _describe(variant: Variant) -> str:
    parts = ["flips" if variant.tta else "no flips"]
    if variant.min_component_mm3:
        parts.append(f"components < {variant.min_component_mm3:g} mm^3 removed")
    if variant.et_min_mm3:
        parts.append(f"ET < {variant.et_min_mm3:g} mm^3 -> core")
    return ", ".join(parts)


def markdown(
    title: str,
    rows: Sequence[Mapping[str, Any]],
    variants: Sequence[Variant],
    summary: Mapping[str, Any],
    paired: Mapping[str, Any],
    et: Mapping[str, Any],
) -> str:
    """The tables of one recipe: means, paired differences against plain, ET-absent outcomes."""
    cases = len({r["case_id"] for r in rows})
    lines = [f"### {title}: {cases} held-out cases\n"]
    lines.append("Mean over cases [95 % bootstrap interval]; Dice on the native grid, HD95 in mm.\n")
    lines.append("| variant | what | n | " + " | ".join(f"Dice {r}" for r in REGIONS) + " | ")
    lines[-1] += " | ".join(f"HD95 {r}" for r in REGIONS) + " |"
    lines.append("|---|---|---|" + "---|" * (2 * len(REGIONS)))
    for v in variants:
        s = summary[v.name]
        cells = [_cell(s[f"{r}_dice"], 3) for r in REGIONS] + [_cell(s[f"{r}_hd95"], 1) for r in REGIONS]
        lines.append(f"| {v.name} | {_describe(v)} | {s['n']} | " + " | ".join(cells) + " |")
    lines.append(
        "\nPaired per-case difference against plain (variant - plain), mean [95 % bootstrap interval]; "
        "`*`: the interval excludes zero.\n"
    )
    lines.append("| variant | " + " | ".join(f"ΔDice {r}" for r in REGIONS) + " | ")
    lines[-1] += " | ".join(f"ΔHD95 {r}" for r in REGIONS) + " |"
    lines.append("|---|" + "---|" * (2 * len(REGIONS)))
    for name, diffs in paired.items():
        cells = []
        for metric, digits in METRICS:
            for region in REGIONS:
                d = diffs[f"{region}_{metric}"]
                cells.append(_difference(d, digits))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        "\nEnhancing tumour per variant: cases without ET in the reference that get ET predicted (ET Dice 0 instead "
        "of 1), and cases with ET whose predicted ET vanished entirely.\n"
    )
    lines.append(
        "| variant | ET-absent cases with ET predicted | ET-present cases with no ET predicted | ET Dice (ET-present) |"
    )
    lines.append("|---|---|---|---|")
    for v in variants:
        e = et[v.name]
        dice = "n/a" if e["present_et_dice"] != e["present_et_dice"] else f"{e['present_et_dice']:.3f}"
        lines.append(
            f"| {v.name} | {e['absent_with_et_predicted']}/{e['absent_cases']} | "
            f"{e['present_with_no_et_predicted']}/{e['present_cases']} | {dice} |"
        )
    return "\n".join(lines) + "\n"


def _difference(d: Mapping[str, Any], digits: int) -> str:
    from modeling_emrfuse.evaluation.ablation_stats import PairedDifference

    return format_difference(
        PairedDifference(d["mean"], d["ci95_low"], d["ci95_high"], d["n_cases"]), scale=1.0, digits=digits
    )


def analyse(rows: Sequence[Mapping[str, Any]], variants: Sequence[Variant], title: str) -> Tuple[Dict[str, Any], str]:
    """``(json part, markdown)`` of one recipe's scored rows."""
    summary = summarise_variants(rows, variants)
    paired = paired_vs_plain(rows, variants)
    et = et_outcomes(rows, variants)
    part = {
        "variants": [asdict(v) for v in variants],
        "means": summary,
        "paired_vs_plain": paired,
        "et": et,
    }
    return part, markdown(title, rows, variants, summary, paired, et)


# ----------------------------------------------------------------------------------------------
# re-scoring saved fold models
# ----------------------------------------------------------------------------------------------
def _fingerprint(run_dir: Path) -> str:
    """Which saved model a cached result belongs to (size and time of its weights file)."""
    weights = run_dir / "model.safetensors"
    stat = weights.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


class RowCache:
    """Scored rows by (recipe, fold, model, variant key, case), one JSON line each under ``rescore_cache/``."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "rows.jsonl"
        self.rows: Dict[str, Dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    item = json.loads(line)
                    self.rows[item["key"]] = item["row"]

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        return self.rows.get(key)

    def put(self, key: str, row: Dict[str, Any]) -> None:
        self.rows[key] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps({"key": key, "row": row}) + "\n")


def _source_label_map(pipe_factory, case, report, source: str, path: Path, fingerprint: str):
    """``(label map, convention, voxel mm^3, seconds or None when cached)`` of one model run on a case: read from
    ``path`` when it holds this model's, else predicted through the pipeline (no post-processing) and saved."""
    if path.is_file():
        with np.load(path) as saved:
            if str(saved["fingerprint"]) == fingerprint:
                return saved["label_map"], str(saved["convention"]), float(saved["voxel_mm3"]), None
    from modeling_emrfuse.pipeline_emrfuse import voxel_volume_mm3
    from modeling_emrfuse.training.evaluation import predict_case

    t0 = time.perf_counter()
    result = predict_case(pipe_factory(), case, report, tta=source == "tta", min_component_mm3=0, et_min_mm3=0)
    seconds = time.perf_counter() - t0
    label_map, convention = result["label_map"], result["label_convention"]
    voxel = voxel_volume_mm3(result["affine"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, label_map=label_map, convention=convention, voxel_mm3=voxel, fingerprint=fingerprint)
    tmp.replace(path)
    return label_map, convention, voxel, seconds


def rescore_fold(
    out: Path,
    recipe: str,
    fold: int,
    cases: Sequence[Any],
    reports: Mapping[str, Optional[str]],
    variants: Sequence[Variant],
    cache: RowCache,
) -> List[Dict[str, Any]]:
    """Every variant's row for each held-out case of one fold: the fold's model runs at most twice per case (plain
    and with flips; label maps cached), every variant post-processes one of the two. A progress line per case."""
    from modeling_emrfuse.brats_io import read_volume
    from modeling_emrfuse.pipeline_emrfuse import load_pipeline

    run_dir = out / "runs" / f"cv-fold{fold}-{recipe}"
    fingerprint = _fingerprint(run_dir)
    pipe_holder: Dict[str, Any] = {}

    def pipe_factory():
        if "pipe" not in pipe_holder:  # loaded only when a case is not cached
            pipe_holder["pipe"] = load_pipeline(
                str(run_dir), device="cpu", precision="fp32", optimize=False, channels_last=False, grading_model=False
            )  # as train.py's evaluation runs the model (fp32, not rewritten): "plain" is the CV figure
        return pipe_holder["pipe"]

    rows: List[Dict[str, Any]] = []
    for i, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        keys = {v.name: f"{recipe}|fold{fold}|{fingerprint}|{v.key}|{case.case_id}" for v in variants}
        missing = [v for v in variants if cache.get(keys[v.name]) is None]
        timing = []
        if missing:
            ref = read_volume(case.label)
            reference, spacing = np.asarray(ref.array), ref.spacing
            maps = {}
            for source in sorted({v.source for v in missing}):
                path = out / CACHE / recipe / f"fold{fold}" / f"{case.case_id}.{source}.npz"
                report = reports.get(case.case_id) if _uses_text(run_dir) else None
                *maps[source], seconds = _source_label_map(pipe_factory, case, report, source, path, fingerprint)
                timing.append(f"{source} {'cached' if seconds is None else f'{seconds:.0f} s'}")
            for v in missing:
                label_map, convention, voxel = maps[v.source]
                row = score_row(apply_variant(label_map, convention, voxel, v), convention, reference, spacing)
                cache.put(keys[v.name], row)
        for v in variants:
            rows.append(
                {"case_id": case.case_id, "fold": fold, "recipe": recipe, "variant": v.name, **cache.get(keys[v.name])}
            )
        what = ", ".join(timing) if timing else "all variants cached"
        print(
            f"  rescore {recipe} fold {fold + 1}: case {i}/{len(cases)} {case.case_id}: {what} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return rows


def _uses_text(run_dir: Path) -> bool:
    """Whether the fold's model reads the report (only then is the case's report given, as in train.py's run)."""
    config = json.loads((run_dir / "config.json").read_text())
    return bool(config.get("use_text", True))


def _fold_runs(out: Path, recipes: Optional[Sequence[str]], folds: Optional[Sequence[int]]):
    """``[(recipe, fold, held-out case ids)]`` of the finished fold runs under ``out/runs``."""
    found = []
    for split_file in sorted((out / "runs").glob("cv-fold*-split.json")):
        fold = int(split_file.name[len("cv-fold") : -len("-split.json")])
        if folds is not None and fold not in folds:
            continue
        test = json.loads(split_file.read_text())["test"]
        for run_dir in sorted((out / "runs").glob(f"cv-fold{fold}-*")):
            recipe = run_dir.name[len(f"cv-fold{fold}-") :]
            if not run_dir.is_dir() or (recipes is not None and recipe not in recipes):
                continue
            if not (run_dir / "model.safetensors").is_file():
                print(f"  rescore: {run_dir.name} has no saved model (not finished?): skipped", flush=True)
                continue
            found.append((recipe, fold, list(test)))
    return found


def _cv_rows(run_dir: Path) -> Dict[str, Dict[str, str]]:
    path = run_dir / "eval" / "per_case.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        return {r["case_id"]: r for r in csv.DictReader(fh)}


def consistency(out: Path, rows: Sequence[Mapping[str, Any]]) -> Optional[float]:
    """Largest |Dice difference| between the "plain" rows and the fold runs' own held-out evaluation (0: the
    re-scoring reproduces the CV figures); ``None`` when no fold run left its per-case table."""
    worst = None
    for r in rows:
        if r["variant"] != "plain":
            continue
        cv = _cv_rows(out / "runs" / f"cv-fold{r['fold']}-{r['recipe']}").get(r["case_id"])
        if cv is None:
            continue
        for region in REGIONS:
            gap = abs(float(cv[f"{region}_dice"]) - float(r[f"{region}_dice"]))
            worst = gap if worst is None else max(worst, gap)
    return worst


def rescore(
    out: Path,
    cases: Sequence[Any],
    reports: Mapping[str, Optional[str]],
    info: Optional[Mapping[str, Mapping[str, Any]]] = None,
    recipes: Optional[Sequence[str]] = None,
    folds: Optional[Sequence[int]] = None,
    variants: Optional[Sequence[Variant]] = None,
    command: str = "",
) -> Dict[str, Any]:
    """Re-score the finished fold runs under ``out/runs`` (see the module docstring); writes ``rescore.md``,
    ``rescore.json`` and appends to ``results.md``. ``cases``: the cohort's :class:`CaseFiles`; ``info``: case id ->
    ``{"label": "expert" | "pseudo", ...}`` (the tables are over expert-labelled cases; pseudo-labelled ones are
    listed apart in the JSON)."""
    out = Path(out)
    variants = list(variants or standard_variants())
    by_id = {c.case_id: c for c in cases}
    cache = RowCache(out / CACHE)
    runs = _fold_runs(out, recipes, folds)
    if not runs:
        raise SystemExit(f"real_rescore: no finished fold run under {out / 'runs'} (cv-fold<k>-<recipe> with a model).")
    t0 = time.perf_counter()
    rows_by_recipe: Dict[str, List[Dict[str, Any]]] = {}
    for recipe, fold, test in runs:
        missing = [c for c in test if c not in by_id]
        if missing:
            raise SystemExit(
                f"real_rescore: held-out case(s) {missing} of fold {fold} not found among the cases given."
            )
        print(f"rescore {recipe} fold {fold + 1}: {len(test)} held-out cases, {len(variants)} variants", flush=True)
        rows_by_recipe.setdefault(recipe, []).extend(
            rescore_fold(out, recipe, fold, [by_id[c] for c in test], reports, variants, cache)
        )
    result: Dict[str, Any] = {"command": command, "recipes": {}, "folds": sorted({f for _, f, _ in runs})}
    lines = [
        "## Inference-time levers on the cross-validation models\n",
        f"Each fold's model re-predicts its held-out cases (command: `{command}`); the best post-processing is "
        "chosen on the same cases it is scored on (optimistic): keep a lever only where its paired interval "
        "excludes zero.\n",
    ]
    for recipe, rows in rows_by_recipe.items():
        every = list(variants)
        for make in (combined_variant, flips_with_best):  # chosen on the expert cases, scored from cached maps
            extra = make(_expert(rows, info), every)
            if extra is None or any(v.key == extra.key for v in every):
                continue
            every.append(extra)
            for recipe_, fold, test in runs:
                if recipe_ == recipe:
                    rows.extend(rescore_fold(out, recipe, fold, [by_id[c] for c in test], reports, [extra], cache))
        expert = _expert(rows, info)
        part, text = analyse(expert, every, f"{recipe} (expert-labelled cases)")
        best = flips_with_best(expert, every)
        part["best_postprocessing"] = (
            None if best is None else {"name": best.name[len("tta+") :], **best.postprocessing}
        )
        part["plain_vs_cv_max_abs_dice_difference"] = consistency(out, rows)
        part["rows"] = rows
        part["pseudo_cases"] = sorted({r["case_id"] for r in rows} - {r["case_id"] for r in expert})
        result["recipes"][recipe] = part
        lines.append(text)
        gap = part["plain_vs_cv_max_abs_dice_difference"]
        if gap is not None:
            lines.append(f"plain reproduces the CV runs' own evaluation: largest |ΔDice| {gap:.2g}.\n")
    result["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    text = "\n".join(lines)
    (out / "rescore.md").write_text(text)
    (out / "rescore.json").write_text(json.dumps(_finite(result), indent=1, allow_nan=False))
    append_section(out / "results.md", text)
    print(text)
    print(f"rescore: {out / 'rescore.md'}, {out / 'rescore.json'}; {result['minutes']} min", flush=True)
    return result


def append_section(path: Path, text: str) -> None:
    """Append ``text`` (a ``## `` section) to ``path``, replacing the section of the same title that an earlier run
    appended (up to the next ``## `` heading), so that a rerun leaves one copy."""
    old = path.read_text() if path.is_file() else ""
    found = re.search(r"(?m)^" + re.escape(text.splitlines()[0]) + r"$", old)
    if found:
        after = re.search(r"(?m)^## ", old[found.end() :])
        old = old[: found.start()] + (old[found.end() + after.start() :] if after else "")
    old = old.rstrip("\n")
    path.write_text((old + "\n\n" if old else "") + text)


def _expert(
    rows: Sequence[Mapping[str, Any]], info: Optional[Mapping[str, Mapping[str, Any]]]
) -> List[Mapping[str, Any]]:
    """The rows of expert-labelled cases (all rows without ``info``)."""
    return [r for r in rows if info is None or info.get(r["case_id"], {}).get("label", "expert") == "expert"]


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if obj != obj or obj in (float("inf"), float("-inf")) else obj
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return _finite(obj.item())
    return obj


# ----------------------------------------------------------------------------------------------
# standalone
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output_dir", type=Path, required=True, help="a bench_real.py OUTPUT_DIR with its runs/ folder")
    p.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "realdata", help="the cases (default ../shared/realdata)"
    )
    p.add_argument("--recipes", nargs="+", default=None, help="recipes to re-score (default: every one found)")
    p.add_argument("--folds", type=int, nargs="+", default=None, help="folds to re-score, from 0 (default: all)")
    p.add_argument("--components", type=float, nargs="+", default=[200, 1000], help="component sizes (mm^3) tried")
    p.add_argument("--et_thresholds", type=float, nargs="+", default=[200, 500], help="ET thresholds (mm^3) tried")
    p.add_argument("--exclude_pseudo", action="store_true", help="as bench_real.py: leave pseudo-labelled cases out")
    p.add_argument("--pseudo_case", action="append", default=None, help="as bench_real.py")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as emrfuse predict)")
    args = p.parse_args(argv)
    args.output_dir = args.output_dir.resolve()
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from bench_real import DEFAULT_PSEUDO, gather_cohort

    from modeling_emrfuse.runtime.cpu_threads import limit_torch_threads

    limit_torch_threads(args.threads)
    args.pseudo_case = args.pseudo_case or list(DEFAULT_PSEUDO)
    cohort = gather_cohort(args, args.output_dir)
    command = "python bench/real_rescore.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return rescore(
        args.output_dir,
        cohort.cases,
        cohort.attached.reports,
        cohort.info,
        recipes=args.recipes,
        folds=args.folds,
        variants=standard_variants(args.components, args.et_thresholds),
        command=command,
    )


if __name__ == "__main__":
    main()
