"""The data of a run: the cases of the data folders (or generated demo cases), their reports and grades, the
patient-level splits, and the demo text tower built from the training reports."""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from datasets_scripts.brats_text import (
    attach_reports_and_grades,
    derange_reports,
    load_id_mapping,
    make_splits,
    read_reports,
)
from datasets_scripts.demo_data import DEMO_DATA_VERSION, demo_case_ids, write_demo_dataset

from ..brats_io import discover_folders
from ..runtime import strict_json
from .text_tower import MIN_REPORTS_PER_WORD, build_demo_text_tower

logger = logging.getLogger("emrfuse.train")


DEFAULT_TEXT_MODEL = "dmis-lab/biobert-base-cased-v1.2"
NO_CASES = (
    "no BraTS cases found (a case is a folder of NIfTI sequences such as <case>_flair.nii.gz); give the "
    "folder that holds the case folders as --data_dir."
)


class RunDataError(ValueError):
    """Data that cannot make a run (no cases, no split possible, ...): the message names the folder and the fix."""


@dataclass(frozen=True)
class SplitSettings:
    """How cases are split into train / validation / test (see :func:`split_run_cases`)."""

    split_file: Optional[str] = None
    eval_fraction: float = 0.2
    fold: int = 0
    val_fraction: float = 0.0


@dataclass(frozen=True)
class DemoDataSettings:
    """The generated demo cases: how many, the grid, and the folder (default ``data/emrfuse-demo-<size>-<n>``)."""

    demo_cases: int = 96
    demo_size: str = "small"
    demo_data_dir: Optional[str] = None


@dataclass(frozen=True)
class DataSettings:
    """Where a run's cases, reports and grades come from, and which cases it uses."""

    data_dir: Optional[List[str]]  # None: the generated demo cases
    release: List[str]
    task: str
    demo: bool = False
    allow_demo_on_other_data: bool = False
    sequence_presence: bool = False
    id_mapping: Optional[List[str]] = None
    reports: Optional[str] = None
    no_text: bool = False
    shuffle_reports: bool = False  # the control: every case gets another case's report of its own split
    no_reports: bool = False  # the text tower and fusion head without any report (every case as if it had none)
    text_model: Optional[str] = None
    max_train_cases: Optional[int] = None
    max_eval_cases: Optional[int] = None
    cache_dir: str = "cache/emrfuse"
    vocab_min_reports: int = MIN_REPORTS_PER_WORD
    split: SplitSettings = field(default_factory=SplitSettings)
    demo_data: DemoDataSettings = field(default_factory=DemoDataSettings)


@dataclass
class RunData:
    """Cases and reports of a run (shared by every row of an ablation)."""

    data_dir: Path  # the first data folder (the demo folder with --demo)
    train_cases: list
    eval_cases: list  # held out: the final evaluation (test split)
    val_cases: list  # model selection during training (empty: select on eval_cases, see --val_fraction)
    reports: Dict[str, Optional[str]]
    synthetic: bool
    release: str
    text_model: Optional[str]
    description: Dict[str, Any] = field(default_factory=dict)
    data_dirs: List[Path] = field(default_factory=list)
    patients: Dict[str, str] = field(default_factory=dict)  # case id -> patient (id tables), for splits
    demo_text_tower: bool = False  # the text tower was built here (--demo): a small BERT + WordPiece from the reports


def is_demo_data_folder(folder: str | Path) -> bool:
    """``folder`` was written by the demo generator (its marker) or by :func:`ensure_demo_data` (``.complete.json``)."""
    return demo_case_ids(folder) is not None or (Path(folder) / ".complete.json").is_file()


def _cases_not_generated(cases, data_dirs: Sequence[Path]) -> int:
    """How many of ``cases`` the demo generator did not write (not in a demo folder's list of generated cases)."""
    generated: set = set()
    for folder in data_dirs:
        ids = demo_case_ids(folder)
        if ids is None and is_demo_data_folder(folder):
            return 0  # a demo folder with only .complete.json: no case list to compare with
        generated |= ids or set()
    return sum(1 for c in cases if c.case_id not in generated)


def demo_data_dir(demo: DemoDataSettings) -> Path:
    """Where the demo cases go (the data seed is fixed, so every run and every ablation row sees the same cases)."""
    return Path(demo.demo_data_dir or f"data/emrfuse-demo-{demo.demo_size}-{demo.demo_cases}")


def demo_grid(size: str):
    """``small`` / ``medium`` / ``full`` or ``XxYxZ`` (e.g. ``32x32x24`` for tests)."""
    if "x" in size:
        try:
            dims = tuple(int(v) for v in size.lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != 3 or min(dims) < 8:
            raise ValueError(f"--demo_size {size!r}: expected small, medium, full or XxYxZ with sizes >= 8.")
        return dims
    return size


def ensure_demo_data(demo: DemoDataSettings, accelerator) -> Path:
    """Generate the demo cases once (main process; the others wait); reuse them when complete."""
    out = demo_data_dir(demo)
    marker = out / ".complete.json"
    # the generator's version too: a folder written by another generator version is regenerated, not reused
    spec = {"n_cases": demo.demo_cases, "size": demo.demo_size, "seed": 0, "version": DEMO_DATA_VERSION}
    if accelerator.is_main_process:
        if not (marker.exists() and json.loads(marker.read_text()) == spec):
            if marker.exists():  # our own demo folder, written with other settings: start afresh
                shutil.rmtree(out)
            t0 = time.time()
            write_demo_dataset(out, n_cases=demo.demo_cases, size=demo_grid(demo.demo_size), seed=0)
            strict_json.write_json(marker, spec, indent=None)
            logger.info(
                f"wrote {demo.demo_cases} synthetic demo cases ({demo.demo_size}) to {out} in {time.time() - t0:.1f} s"
            )
    accelerator.wait_for_everyone()
    return out


def read_case_reports(cases, reports_file: Optional[str], id_mapping=None):
    """Reports and grades of the run's cases: ``(reports, attachment)``.

    ``reports`` maps case id -> report text (``None`` when the case has none; never logged): the
    reports file's entry (under the case id, or under the patient's BraTS 2020 id through the id
    tables), else the case's own report file. ``attachment`` (:class:`ReportAttachment`) holds the
    cases with the grades the id tables give, the patients and the counts.
    """
    by_id = read_reports(reports_file) if reports_file else {}
    attached = attach_reports_and_grades(cases, by_id, id_mapping, read_case_files=not reports_file)
    unknown = sorted(set(by_id) - attached.used_report_ids)
    if unknown and reports_file:
        logger.info(f"{len(unknown)} report(s) in {reports_file} name no case of the data folders.")
    return {c.case_id: attached.reports.get(c.case_id) for c in attached.cases}, attached


def split_run_cases(cases, split: SplitSettings, patients: Optional[Dict[str, str]] = None) -> Tuple[list, list, list]:
    """Patient-level splits (``datasets_scripts.brats_text.make_splits``): train / validation / test.

    A split file (``--split_file``) wins; otherwise ``n_folds = round(1 / eval_fraction)``
    grade-stratified folds, fold ``--fold`` held out as test, and ``--val_fraction`` of the
    training patients as validation (model selection). Deterministic (seed 0), so every run and
    every ablation row sees the same cases.
    """
    if split.split_file is None and split.eval_fraction == 0:
        if split.val_fraction:
            raise RunDataError(
                "--eval_fraction 0 (train on every case) leaves no case for --val_fraction; set it to 0."
            )
        return sorted(cases, key=lambda c: c.case_id), [], []
    if split.split_file is None and len({(patients or {}).get(c.case_id, c.case_id) for c in cases}) < 2:
        raise RunDataError(
            f"{len(cases)} case(s) of one patient cannot be split into training and held-out cases: give more cases, "
            "or --eval_fraction 0 to train on every case without evaluation."
        )
    n_folds = (
        max(2, int(round(1.0 / split.eval_fraction))) if split.eval_fraction else 2
    )  # folds unused with a split file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if split.split_file is None else "default")
        assignment = make_splits(
            cases,
            splits=split.split_file,
            n_folds=n_folds,
            fold=split.fold,
            val_fraction=split.val_fraction,
            seed=0,
            patient_map=patients or None,
        )
    by_id = {c.case_id: c for c in cases}
    pick = lambda *names: [by_id[i] for name in names for i in assignment.get(name, []) if i in by_id]  # noqa: E731
    train, val, test = pick("train"), pick("validation"), pick("test")
    if not test and val:
        test, val = val, []
    if not train or (not test and split.eval_fraction != 0):
        raise RunDataError(
            f"The splits {sorted(assignment)} leave no training or no held-out case ({len(cases)} cases); "
            "with --eval_fraction 0 a split file without test cases trains on its training cases only."
        )
    return (
        sorted(train, key=lambda c: c.case_id),
        sorted(val, key=lambda c: c.case_id),
        sorted(test, key=lambda c: c.case_id),
    )


def find_run_cases(settings: DataSettings, accelerator):
    """The data folders (the generated demo folder without ``--data_dir``), what :func:`discover_folders` found in
    them, and whether every case is synthetic (written by the demo generator)."""
    data_dirs = (
        [Path(d) for d in settings.data_dir]
        if settings.data_dir
        else [ensure_demo_data(settings.demo_data, accelerator)]
    )
    for folder in data_dirs:
        if not folder.is_dir():
            raise RunDataError(f"--data_dir {folder}: no such folder; give a folder of BraTS cases (or --demo).")
        if not any(folder.iterdir()):
            raise RunDataError(f"{folder}: {NO_CASES}")
    try:
        found = discover_folders(data_dirs, settings.release, allow_missing_sequences=settings.sequence_presence)
    except ValueError as exc:  # discovery names the folder or case and what is wrong
        raise RunDataError(str(exc)) from exc
    cases = list(found)
    if not cases:
        raise RunDataError(f"{', '.join(map(str, data_dirs))}: {NO_CASES}")
    # synthetic: every case was generated by the demo generator (--demo without --data_dir, or a demo folder)
    synthetic = (
        settings.demo and all(is_demo_data_folder(d) for d in data_dirs) and not _cases_not_generated(cases, data_dirs)
    )
    if settings.demo and not synthetic and not settings.allow_demo_on_other_data:
        raise RunDataError(
            f"--demo: {_cases_not_generated(cases, data_dirs)} case(s) of {', '.join(map(str, data_dirs))} were not written by "
            "the demo generator; drop --demo for real data, or pass --allow_demo_on_other_data."
        )
    unlabeled = [c.case_id for c in cases if c.label is None]
    if unlabeled and settings.task == "segmentation":
        raise RunDataError(
            f"{data_dirs[0]}: {len(unlabeled)} case(s) have no label map (e.g. {unlabeled[:3]}); segmentation needs labels."
        )
    return data_dirs, found, synthetic


def run_text_model(settings: DataSettings, train_cases, reports, data_dir: Path, accelerator) -> Optional[str]:
    """The text tower of the run: none (image only), the one asked for, or the demo's, built from the training reports."""
    if settings.no_text:
        return None  # no text tower and no tokenizer to load
    if settings.text_model is not None:
        return settings.text_model
    if not settings.demo:
        return DEFAULT_TEXT_MODEL
    if settings.no_reports:
        raise RunDataError(
            "--no_reports with --demo needs --text_model: the demo text tower is built from the training reports."
        )
    return build_demo_text_tower(
        [reports[c.case_id] for c in train_cases if reports.get(c.case_id)],
        Path(settings.cache_dir) / f"demo-text-tower-{data_dir.name}",
        accelerator,
        min_reports_per_word=settings.vocab_min_reports,
    )


def shuffled_reports(
    reports: Dict[str, Optional[str]], splits: Sequence[Sequence[Any]], patients: Dict[str, str], seed: int = 0
) -> Dict[str, Optional[str]]:
    """The shuffled-reports control of a run (``--shuffle_reports``): within each split, every case with a report
    gets the report of another patient's case of that split (a seeded derangement, :func:`derange_reports`), so the
    training and held-out cases keep their own reports' mix but lose the case-report correspondence. Cases without a
    report keep none. ``RunDataError`` when a split holds a single case with a report (it cannot be swapped)."""
    groups = [[c.case_id for c in cases] for cases in splits]
    try:
        return derange_reports(reports, groups, seed=seed, patients=patients)
    except ValueError as exc:
        raise RunDataError(f"--shuffle_reports: {exc} Use a split with at least two reported cases per part.") from exc


def prepare_run_data(settings: DataSettings, accelerator) -> RunData:
    """Find the cases (generating demo data if asked), read reports, split, build the demo text tower."""
    data_dirs, found, synthetic = find_run_cases(settings, accelerator)
    data_dir = data_dirs[0]
    id_mapping = load_id_mapping(settings.id_mapping, [str(d) for d in data_dirs], found.releases)
    reports, attached = read_case_reports(list(found), settings.reports, id_mapping)
    cases = attached.cases  # with the grades the id tables give
    if settings.no_text or settings.no_reports:
        reports = {cid: None for cid in reports}  # no report reaches the model or the cache
    train_cases, val_cases, eval_cases = split_run_cases(cases, settings.split, attached.patients)
    if settings.max_train_cases:
        train_cases = train_cases[: settings.max_train_cases]
    if settings.max_eval_cases:
        eval_cases = eval_cases[: settings.max_eval_cases]
    if settings.shuffle_reports and not settings.no_text:
        reports = shuffled_reports(reports, (train_cases, val_cases, eval_cases), attached.patients)
    text_model = run_text_model(settings, train_cases, reports, data_dir, accelerator)
    with_tables = " ({} through the id tables)" if id_mapping is not None else ""
    logger.info(
        f"data: {len(cases)} cases ({found.release}), {len(attached.reports)} with a report"
        f"{with_tables.format(attached.reports_via_id_mapping)}, "
        f"{sum(1 for c in cases if c.grade)} with a grade{with_tables.format(attached.grades_via_id_mapping)}, "
        f"{sum(1 for c in cases if c.missing_sequences)} with missing sequences; "
        f"{len(train_cases)} training / {len(val_cases)} validation / {len(eval_cases)} held-out test"
    )
    release_name = found.release if found.release != "mixed" else "+".join(sorted(set(found.releases.values())))
    return RunData(
        data_dir=data_dir,
        data_dirs=data_dirs,
        patients=attached.patients,
        train_cases=train_cases,
        eval_cases=eval_cases,
        val_cases=val_cases,
        reports=reports,
        synthetic=synthetic,
        release=release_name,
        text_model=None if text_model is None else str(text_model),
        demo_text_tower=bool(settings.demo and text_model is not None and settings.text_model is None),
        description={
            "name": "EmrFuse synthetic demo data" if synthetic else f"BraTS {release_name}",
            "synthetic": synthetic,
            "release": release_name,
            "num_train_cases": len(train_cases),
            "num_val_cases": len(val_cases),
            "num_eval_cases": len(eval_cases),
            "reports": "synthetic template reports"
            if synthetic
            else ("reports file" if settings.reports else "per-case report files"),
        },
    )
