"""What more data would buy: a learning curve of the real-data cross-validation.

    python bench/bench_real.py --output_dir outputs/real --cv 5 --learning_curve 6 12 18

For every cross-validation fold, each ``--curve_recipes`` recipe is trained again on nested, seeded,
patient-level subsamples of that fold's training cases (:func:`nested_subsamples`: the 6 inside the 12
inside the 18) and evaluated on the same held-out cases as the fold's full run, whose results are the
curve's last point ("all"). :func:`summarise_curve` gives the mean Dice per region with a 95 % bootstrap
interval over the expert-labelled held-out cases for each size; :func:`write_curve` writes the table and
``learning_curve.png``. Every run has the cross-validation's steps (``--cv_steps``), so the curve shows
what more cases buy at a fixed training budget.
"""

from __future__ import annotations

import csv
import json
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from modeling_emrfuse.brats_io import patient_groups
from modeling_emrfuse.brats_labels import REGIONS
from modeling_emrfuse.evaluation.metrics import bootstrap_mean_ci

ALL = "all"
"""The size of a fold's whole training split (the cross-validation run itself)."""

Size = Union[int, str]


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------
def add_options(p) -> None:
    """``--learning_curve SIZE ...`` and ``--curve_recipes`` on bench_real's parser."""
    p.add_argument(
        "--learning_curve",
        nargs="+",
        default=None,
        metavar="SIZE",
        help="after the cross-validation, retrain each fold on nested patient-level subsamples of its training "
        "cases of these sizes (e.g. 6 12 18; 'all', the fold's whole training split, is always included) and "
        "evaluate on the same held-out cases: table in results.md, plot in OUTPUT_DIR/learning_curve.png",
    )
    p.add_argument(
        "--curve_recipes",
        nargs="+",
        default=["image"],
        help="recipes of the learning curve (default image; each must be in --recipes)",
    )


def check_options(p, args) -> None:
    """Parse the sizes (``args.learning_curve`` becomes a list of ints then ``"all"``); the curve needs ``--cv``."""
    if args.learning_curve is None:
        return
    try:
        args.learning_curve = parse_sizes(args.learning_curve)
    except ValueError as exc:
        p.error(f"--learning_curve: {exc}")
    if not args.cv:
        p.error("--learning_curve needs --cv K (its points are the folds' held-out cases)")
    unknown = [r for r in args.curve_recipes if r not in args.recipes]
    if unknown:
        p.error(f"--curve_recipes {unknown} must be among --recipes {args.recipes}")


def parse_sizes(values: Sequence[Any]) -> List[Size]:
    """Sizes as given (ints >= 1, ``"all"``): the distinct ints in increasing order, then ``"all"``."""
    sizes = set()
    for v in values:
        if str(v).strip().lower() == ALL:
            continue
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise ValueError(f"{v!r} is not a number of training cases (or 'all')") from None
        if n < 1:
            raise ValueError(f"a size must be >= 1, got {n}")
        sizes.add(n)
    return [*sorted(sizes), ALL]


# ----------------------------------------------------------------------------------------------
# the subsamples
# ----------------------------------------------------------------------------------------------
def patient_order(
    train_ids: Sequence[str],
    patient_of: Mapping[str, str],
    grade_of: Mapping[str, Optional[str]],
    expert_of: Mapping[str, bool],
    seed: int,
) -> List[List[str]]:
    """The fold's training patients (each a sorted list of its case ids) in the order subsamples take them.

    Patients are grouped by grade (HGG, LGG, unknown); within a grade, the patients whose cases are all
    expert-labelled come first, each group in a seeded random order. The grades are then interleaved so that
    every prefix keeps each grade's share of the cases about as in the whole split: the next patient comes
    from the grade furthest below its share (ties: the smaller grade, then by name)."""
    cases_of: Dict[str, List[str]] = {}
    for cid in sorted(train_ids):
        cases_of.setdefault(patient_of.get(cid, cid), []).append(cid)
    rng = np.random.default_rng(int(seed))
    strata: Dict[str, List[str]] = {}
    for patient in sorted(cases_of):
        grades = sorted({g for g in (grade_of.get(c) for c in cases_of[patient]) if g})
        strata.setdefault(grades[0] if grades else "unknown", []).append(patient)
    queues: Dict[str, List[str]] = {}
    for name in sorted(strata):
        shuffled = [strata[name][i] for i in rng.permutation(len(strata[name]))]
        expert_first = sorted(shuffled, key=lambda p: not all(expert_of.get(c, True) for c in cases_of[p]))
        queues[name] = expert_first  # sorted() is stable: the shuffled order within each label group stays
    total = sum(len(v) for v in cases_of.values())
    share = {name: Fraction(sum(len(cases_of[p]) for p in q), total) for name, q in queues.items()}
    taken = {name: 0 for name in queues}
    order: List[List[str]] = []
    while any(queues.values()):
        n = sum(taken.values())
        open_ = [name for name in queues if queues[name]]
        pick = min(open_, key=lambda s: (taken[s] - share[s] * (n + 1), share[s], s))
        patient = queues[pick].pop(0)
        taken[pick] += len(cases_of[patient])
        order.append(cases_of[patient])
    return order


def nested_subsamples(
    train_ids: Sequence[str],
    patient_of: Mapping[str, str],
    grade_of: Mapping[str, Optional[str]],
    expert_of: Mapping[str, bool],
    sizes: Sequence[Size],
    seed: int,
) -> Dict[Size, List[str]]:
    """Size -> sorted case ids: nested, seeded, patient-level subsamples of one fold's training cases.

    Each subsample is the longest prefix of :func:`patient_order` with at most ``size`` cases (at least one
    patient), so a patient's cases stay together, a smaller subsample lies inside every larger one, and the same
    inputs and ``seed`` always give the same subsamples. A size of at least the split's case count, and ``"all"``,
    is the whole split. A subsample can fall short of its size by a patient's extra cases; the runs record the
    actual count.
    """
    order = patient_order(train_ids, patient_of, grade_of, expert_of, seed)
    out: Dict[Size, List[str]] = {}
    for size in sizes:
        if size == ALL or int(size) >= len(train_ids):
            out[size] = sorted(train_ids)
            continue
        chosen: List[str] = []
        for patient in order:
            if chosen and len(chosen) + len(patient) > int(size):
                break
            chosen += patient
        out[size] = sorted(chosen)
    return out


# ----------------------------------------------------------------------------------------------
# the runs
# ----------------------------------------------------------------------------------------------
def fold_split(out: Path, cohort, args, fold: int) -> Dict[str, List[str]]:
    """The fold's split as the cross-validation used it (its split file), else recomputed the same way."""
    split_file = out / "runs" / f"cv-fold{fold}-split.json"
    if split_file.is_file():
        return json.loads(split_file.read_text())
    from datasets_scripts.brats_text import make_splits

    patients = cohort.attached.patients
    return make_splits(cohort.attached.cases, n_folds=args.cv, fold=fold, seed=args.seed, patient_map=patients or None)


def learning_curve(
    bench, args, out: Path, cohort, per_case, recipes: Sequence[str], text_model, demo_model, timings, result, lines
) -> List[Dict[str, Any]]:
    """bench_real's ``--learning_curve``: the runs (:func:`run_learning_curve`, trained through ``bench``, the
    bench_real module: its ``train_args``, ``run_train`` and ``read_rows``) and their table and plot
    (:func:`write_curve`). Returns the points."""
    curve_recipes = [r for r in args.curve_recipes if r in recipes]
    print(f"learning curve: {', '.join(map(str, args.learning_curve))} training cases, {curve_recipes}", flush=True)

    def train_fold(recipe: str, split_file: Path, run_dir: Path, what: str) -> List[Dict[str, Any]]:
        argv = bench.train_args(
            args, cohort.folders, cohort.id_tables, cohort.reports_file, recipe, text_model, demo_model
        )
        argv += ["--split_file", str(split_file), "--output_dir", str(run_dir), "--max_steps", str(args.cv_steps)]
        timings[run_dir.name] = bench.run_train(argv, run_dir.parent / f"{run_dir.name}.log", what, run_dir)
        return bench.read_rows(run_dir)

    rows = run_learning_curve(args, out, cohort, per_case, train_fold, curve_recipes)
    return write_curve(rows, out, args.cv_steps, result, lines)


def run_learning_curve(
    args,
    out: Path,
    cohort,
    per_case: Mapping[str, Mapping[str, Dict[str, Any]]],
    train_fold: Callable[[str, Path, Path, str], List[Dict[str, Any]]],
    recipes: Sequence[str],
) -> List[Dict[str, Any]]:
    """Train and evaluate the curve's runs; returns one row per held-out case, recipe and size.

    ``train_fold(recipe, split_file, run_dir, what)`` trains one run (bench_real's ``train.py`` arguments,
    ``--cv_steps`` steps) and returns its per-case rows; the ``"all"`` point is the cross-validation's own
    result (``per_case``: case id -> recipe -> row with its ``fold``), not trained again."""
    sizes = list(args.learning_curve)
    patient_of = patient_groups(cohort.cases, cohort.attached.patients or None)
    grade_of = {c.case_id: c.grade for c in cohort.attached.cases}
    expert_of = {cid: meta["label"] == "expert" for cid, meta in cohort.info.items()}
    rows: List[Dict[str, Any]] = []
    subsamples: Dict[str, Dict[str, List[str]]] = {}
    for fold in range(args.cv):
        split = fold_split(out, cohort, args, fold)
        train, test = split["train"], split["test"]
        picked = nested_subsamples(train, patient_of, grade_of, expert_of, sizes, args.seed)
        subsamples[str(fold + 1)] = {str(k): v for k, v in picked.items()}
        for recipe in recipes:
            # image+report and image+shuffled-report: compared on the cases with a report only
            if "report" in recipe and not any(cohort.has_report.get(c) for c in test):
                continue  # as in the cross-validation: nothing to compare on
            for size in sizes:
                n_train = len(picked[size])
                if n_train == len(train):  # the fold's whole split: the cross-validation run
                    fold_rows = [
                        dict(r)
                        for cid, by_recipe in per_case.items()
                        for rec, r in by_recipe.items()
                        if rec == recipe and int(r.get("fold", 0)) == fold + 1 and cid in test
                    ]
                else:
                    name = f"curve-fold{fold}-{recipe}-n{n_train}"
                    split_file = out / "runs" / f"curve-fold{fold}-n{n_train}-split.json"
                    split_file.parent.mkdir(parents=True, exist_ok=True)
                    split_file.write_text(json.dumps({"train": picked[size], "test": test}, indent=1))
                    what = f"fold {fold + 1} {recipe} on {n_train} of {len(train)} training cases"
                    fold_rows = train_fold(recipe, split_file, out / "runs" / name, what)
                for r in fold_rows:
                    r.update(recipe=recipe, size=str(size), n_train=n_train, fold=fold + 1)
                    r["label"] = cohort.info.get(r["case_id"], {}).get("label", "expert")
                    rows.append(r)
    (out / "learning_curve_subsamples.json").write_text(json.dumps(subsamples, indent=1))
    return rows


# ----------------------------------------------------------------------------------------------
# the table and the plot
# ----------------------------------------------------------------------------------------------
def _value(row: Mapping[str, Any], key: str) -> float:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return float("nan")


def summarise_curve(rows: Sequence[Mapping[str, Any]], regions: Sequence[str] = REGIONS) -> List[Dict[str, Any]]:
    """One point per recipe and size (in the order they first appear; sizes as :func:`parse_sizes` orders them):
    ``{"recipe", "size", "n_train_per_fold", "n_train_mean", "n_cases", "<region>": {"mean", "ci95"}}``, the mean
    Dice over the rows' held-out cases with its 95 % bootstrap interval over cases."""
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    keys = sorted(
        {(r["recipe"], str(r["size"])) for r in rows},
        key=lambda k: (recipes.index(k[0]), (1, 0) if k[1] == ALL else (0, int(k[1]))),
    )
    points = []
    for recipe, size in keys:
        mine = [r for r in rows if r["recipe"] == recipe and str(r["size"]) == size]
        per_fold = {int(r["fold"]): int(r["n_train"]) for r in mine}
        point: Dict[str, Any] = {
            "recipe": recipe,
            "size": size,
            "n_train_per_fold": dict(sorted(per_fold.items())),
            "n_train_mean": round(float(np.mean(list(per_fold.values()))), 2),
            "n_cases": len(mine),
        }
        for region in regions:
            mean, low, high = bootstrap_mean_ci([_value(r, f"{region}_dice") for r in mine])
            point[region] = {"mean": round(mean, 4), "ci95": [round(low, 4), round(high, 4)]}
        points.append(point)
    return points


def curve_table(points: Sequence[Mapping[str, Any]], regions: Sequence[str] = REGIONS) -> str:
    """The curve as a markdown table: mean Dice [95 % interval] per region for each recipe and size."""
    lines = [
        "| recipe | training cases asked | training cases per fold | held-out cases | "
        + " | ".join(f"Dice {r}" for r in regions)
        + " |",
        "|---|---|---|---|" + "---|" * len(regions),
    ]
    for p in points:
        cells = []
        for region in regions:
            mean, (low, high) = p[region]["mean"], p[region]["ci95"]
            cells.append("n/a" if mean != mean else f"{mean:.3f} [{low:.3f}, {high:.3f}]")
        folds = ", ".join(str(v) for v in p["n_train_per_fold"].values())
        lines.append(f"| {p['recipe']} | {p['size']} | {folds} | {p['n_cases']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curve(points: Sequence[Mapping[str, Any]], path: Path, regions: Sequence[str] = REGIONS) -> Path:
    """Dice per region against the mean number of training cases, error bars the 95 % intervals (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    recipes = list(dict.fromkeys(p["recipe"] for p in points))
    styles = ["-", "--", ":", "-."]
    colours = {"WT": "tab:green", "TC": "tab:orange", "ET": "tab:red"}
    for k, recipe in enumerate(recipes):
        mine = [p for p in points if p["recipe"] == recipe]
        x = np.array([p["n_train_mean"] for p in mine], dtype=float)
        for region in regions:
            y = np.array([p[region]["mean"] for p in mine], dtype=float)
            ci = np.array([p[region]["ci95"] for p in mine], dtype=float)
            err = np.abs(np.stack([y - ci[:, 0], ci[:, 1] - y]))
            label = region if len(recipes) == 1 else f"{region}, {recipe}"
            ax.errorbar(
                x + 0.15 * (regions.index(region) - 1),  # side by side, so the bars do not hide each other
                y,
                yerr=err,
                fmt="o" + styles[k % len(styles)],
                color=colours.get(region),
                capsize=3,
                label=label,
            )
    ax.set_xlabel("training cases (mean over folds)")
    ax.set_ylabel("Dice on held-out expert-labelled cases")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Learning curve (error bars: 95 % bootstrap interval over cases)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_curve(
    rows: Sequence[Dict[str, Any]], out: Path, steps: int, result: Dict[str, Any], lines: List[str]
) -> List[Dict[str, Any]]:
    """The curve over the expert-labelled held-out cases: ``learning_curve.png``, ``learning_curve_per_case.csv``,
    the table in ``lines`` (results.md) and ``result["learning_curve"]`` (results.json). Returns the points."""
    expert = [r for r in rows if r.get("label", "expert") == "expert"]
    points = summarise_curve(expert)
    plot = plot_curve(points, out / "learning_curve.png")
    with (out / "learning_curve_per_case.csv").open("w", newline="") as fh:
        keys = ["case_id", "recipe", "size", "n_train", "fold", "label"] + [f"{r}_dice" for r in REGIONS]
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    result["learning_curve"] = {"steps": steps, "points": points, "plot": str(plot)}
    lines.append(f"## Learning curve ({steps} steps per run)\n")
    lines.append(
        "Each fold's recipe trained again on nested, seeded, patient-level subsamples of its training cases "
        "(expert-labelled cases first, each grade's share kept) and evaluated on the same held-out cases; "
        "'all' is the cross-validation run. Mean Dice over the held-out expert-labelled cases "
        "[95 % bootstrap interval over cases]; every run has the same number of steps.\n"
    )
    lines.append(curve_table(points) + "\n")
    lines.append(f"![learning curve]({plot.name})\n")
    return points
