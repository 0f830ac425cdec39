"""The BraTS + radiology report dataset builder (Hugging Face ``datasets``), its splits and its CLI.

:class:`BratsTextBuilder` turns one or more BraTS release folders and their reports into a
``DatasetDict`` with one example per case (:func:`brats_text_features`): the four sequences and the
label map as ``datasets.Nifti``, the report, the grade and the case's release. :func:`load_brats_text`
does it in one call; ``emrfuse prepare`` (:func:`add_parser`) writes the result with ``save_to_disk``
or as Parquet shards for the Hub. Reports are attached by :func:`attach_reports_and_grades`, splits
made by :func:`make_splits` (a patient never appears in two splits) and every case checked by
:func:`check_case`; report text is never printed or logged. The README's "Data" section is the manual.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError

# read_reports (a reports file -> {case id: text}) and its column matching live in brats_io; re-exported here
from modeling_emrfuse.brats_io import (
    _ID_KEYS,
    RELEASES,
    CaseFiles,
    CaseList,
    SkippedCase,
    _norm_key,
    _pick_column,
    discover_folders,
    patient_groups,
    read_header,
    read_reports,
    read_volume,
    volume_suffix,
)
from modeling_emrfuse.brats_labels import (
    GRADES,
    SEQUENCES,
    check_label_values,
    get_label_convention,
)
from modeling_emrfuse.runtime.strict_json import write_json

from .brats_ids import IdMapping, find_id_tables

logger = logging.getLogger(__name__)

__all__ = [
    "BratsTextBuilder",
    "BratsTextConfig",
    "CaseCheck",
    "SPACING_NOTE",
    "ReportAttachment",
    "add_parser",
    "attach_reports_and_grades",
    "brats_text_features",
    "load_id_mapping",
    "check_case",
    "derange_reports",
    "format_summary",
    "input_fingerprint",
    "load_brats_text",
    "make_splits",
    "read_reports",
    "read_split_file",
    "summarize",
]

# ``datasets`` patches the module of every builder it instantiates (``open``, ``pathlib.Path``,
# ``os.walk``... replaced by fsspec-aware versions, for remote streaming). This builder reads local
# folders only; marking the module as already patched keeps its functions the standard ones.
_patched_for_streaming = True

BUILDER_VERSION = "1.0.0"
SUMMARY_FILENAME = "emrfuse_summary.json"
SPACING_NOTE = (
    "the dataset does not resample: it keeps the voxel grid as stored (the model expects 1 mm voxels: training "
    "refuses other spacings, emrfuse predict --resample resamples a case to 1 mm and its label map back), and "
    "the metrics (HD95) use the voxel spacing of the header (its affine)"
)
SPLIT_ALIASES = {
    "train": "train", "training": "train", "tr": "train",
    "val": "validation", "valid": "validation", "validation": "validation", "dev": "validation",
    "test": "test", "testing": "test", "ts": "test",
}  # fmt: skip
_VOLUME_COLUMNS = tuple(SEQUENCES) + ("seg",)


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------
def _read_report_file(path: Path, case_id: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"case {case_id}: cannot read report file {path} ({type(exc).__name__}).") from exc


# --------------------------------------------------------------------------------------------
# reports and grades across releases (id tables)
# --------------------------------------------------------------------------------------------
def load_id_mapping(
    id_mapping: Any = None, data_dirs: Sequence[Path | str] = (), releases: Mapping[str, str] | None = None
) -> Optional[IdMapping]:
    """The id tables of a run: ``id_mapping`` (a path, a list of paths, or an :class:`IdMapping`),
    plus the grade table of a release that has one (``Release.grade_table``: ``name_mapping*.csv`` in a
    BraTS 2020 folder), found in its data folder.

    ``releases`` maps each data folder to its release (as :func:`discover_folders` returns it);
    returns ``None`` when there is no table.
    """
    if isinstance(id_mapping, IdMapping):
        mapping: Optional[IdMapping] = id_mapping
        paths: List[Path] = []
    else:
        mapping = None
        paths = (
            []
            if id_mapping is None
            else [Path(p) for p in ([id_mapping] if isinstance(id_mapping, (str, Path)) else id_mapping)]
        )
    for folder in data_dirs:
        release = RELEASES.get((releases or {}).get(str(folder), ""))
        if release is not None and release.grade_table:  # the release's own grade table is an id table too
            paths.extend(
                p
                for p in find_id_tables(folder)
                if fnmatch(p.name.lower(), release.grade_table.lower()) and p not in paths
            )
    if paths:
        table = IdMapping.from_files(paths)
        mapping = table if mapping is None else mapping.merge(table)
    return mapping


@dataclass
class ReportAttachment:
    """What :func:`attach_reports_and_grades` did (ids and counts only, never report text)."""

    cases: List[CaseFiles]
    reports: Dict[str, str]
    patients: Dict[str, str]
    from_reports_file: int = 0
    from_case_files: int = 0
    reports_via_id_mapping: int = 0
    grades_via_id_mapping: int = 0
    used_report_ids: set = field(default_factory=set)
    skipped: List[SkippedCase] = field(default_factory=list)


def attach_reports_and_grades(
    cases: Sequence[CaseFiles],
    file_reports: Mapping[str, str],
    id_mapping: Optional[IdMapping] = None,
    read_case_files: bool = True,
    on_error: str = "raise",
) -> ReportAttachment:
    """Give each case its report and grade, following the patient across releases.

    A report is the reports file's entry under the case id; failing that (with an id table) the entry
    under the same patient's BraTS 2020 id (TextBraTS reports are keyed by BraTS 2020 ids); failing
    that the case's own report file. A case without grade gets the grade the id table gives its
    patient. ``patients`` maps each case known to the table to its patient key (for patient-level
    splits). Cases are returned as copies (with the grade filled in); report text is never logged.
    An unreadable report file raises ``ValueError`` naming the case (``on_error="skip"``: the case
    is left out and listed in ``skipped``).
    """
    import dataclasses

    out = ReportAttachment(cases=[], reports={}, patients={})
    for case in cases:
        text = None
        if case.case_id in file_reports:
            text = file_reports[case.case_id]
            out.used_report_ids.add(case.case_id)
            source = "file"
        elif id_mapping is not None and id_mapping.brats2020_id(case.case_id) in file_reports:
            key = id_mapping.brats2020_id(case.case_id)
            text = file_reports[key]
            out.used_report_ids.add(key)
            source = "mapping"
        elif read_case_files and case.report_path is not None:
            try:
                text = _read_report_file(Path(case.report_path), case.case_id)
            except ValueError as exc:
                if on_error == "raise":
                    raise
                out.skipped.append(SkippedCase(case.case_id, str(case.report_path), str(exc)))
                continue
            source = "case"
        if text is not None and text.strip():
            out.reports[case.case_id] = text
            if source == "file":
                out.from_reports_file += 1
            elif source == "mapping":
                out.from_reports_file += 1
                out.reports_via_id_mapping += 1
            else:
                out.from_case_files += 1
        grade = case.grade
        if id_mapping is not None:
            patient = id_mapping.patient_of(case.case_id)
            if patient is not None:
                out.patients[case.case_id] = patient
            if grade is None and id_mapping.grade_of(case.case_id) is not None:
                grade = id_mapping.grade_of(case.case_id)
                out.grades_via_id_mapping += 1
        out.cases.append(case if grade == case.grade else dataclasses.replace(case, grade=grade))
    # cases that discovery put with a patient the table knows (the same scan under another name, found by
    # its tumour mask) join that patient
    by_name: Dict[str, List[str]] = {}
    for case in out.cases:
        by_name.setdefault(case.patient_id, []).append(case.case_id)
    for ids in by_name.values():
        known = sorted({out.patients[i] for i in ids if i in out.patients})
        if known:
            for i in ids:
                out.patients.setdefault(i, known[0])
    return out


# --------------------------------------------------------------------------------------------
# per-case checks
# --------------------------------------------------------------------------------------------
@dataclass
class CaseCheck:
    """What :func:`check_case` found for one case.

    Attributes:
        shape: (X, Y, Z) shared by every volume of the case.
        spacing: voxel size (mm) of the first sequence.
        warnings: non-fatal findings (spacing not 1 mm, spacing differing between sequences,
            an empty sequence).
        encoded: for MetaImage volumes (when asked for), name -> gzipped NIfTI bytes.
    """

    shape: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    warnings: List[str] = field(default_factory=list)
    encoded: Dict[str, bytes] = field(default_factory=dict)


def _nifti_gz_bytes(array: np.ndarray, affine: np.ndarray, spacing: Sequence[float]) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_zooms(tuple(float(s) for s in spacing))
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=1)


def check_case(case: CaseFiles, check_voxels: bool = True, encode_metaimage: bool = False) -> CaseCheck:
    """Check one case, reading one volume at a time.

    Always (headers): every file exists and has a readable header, all volumes have the same
    shape, voxel spacing (warning if not 1 mm isotropic or not the same for all volumes).
    With ``check_voxels`` (default): every volume decompresses completely (truncated files
    fail), image voxels are finite (no NaN/inf), the label map only holds values of the case's
    label convention (:func:`~modeling_emrfuse.brats_labels.check_label_values`).

    Raises ``ValueError`` (or ``FileNotFoundError``) naming the case and the file.
    """
    shape: Optional[Tuple[int, ...]] = None
    spacing: Optional[Tuple[float, ...]] = None
    first_name = None
    result_warnings: List[str] = []
    encoded: Dict[str, bytes] = {}
    for name, path in case.files():
        is_meta = volume_suffix(path) in (".mha", ".mhd")
        where = f"case {case.case_id}: {name} file {path}"
        try:
            if check_voxels or (encode_metaimage and is_meta):
                array, affine, this_spacing = read_volume(path)
                this_shape = tuple(array.shape)
            else:
                array = None
                this_shape, this_spacing, _ = read_header(path)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"case {case.case_id}: {name} file is missing: {path}") from exc
        except ValueError as exc:
            raise ValueError(f"case {case.case_id}: {name}: {exc}") from exc
        if shape is None:
            shape, spacing, first_name = this_shape, this_spacing, name
        elif this_shape != shape:
            raise ValueError(
                f"{where}: shape {this_shape} differs from {first_name} shape {shape} (sequences of different shapes)."
            )
        elif not np.allclose(this_spacing, spacing, atol=1e-3):
            result_warnings.append(
                f"{name} spacing {tuple(round(s, 4) for s in this_spacing)} mm differs from {first_name} "
                f"spacing {tuple(round(s, 4) for s in spacing)} mm; {SPACING_NOTE}."
            )
        if array is not None and check_voxels:
            if name == "seg":
                check_label_values(array, case.label_convention, where=where)
            else:
                if np.issubdtype(array.dtype, np.floating):
                    finite = np.isfinite(array)
                    if not finite.all():
                        n_nan = int(np.isnan(array).sum())
                        n_inf = int((~finite).sum()) - n_nan
                        raise ValueError(f"{where}: {n_nan} NaN and {n_inf} inf voxels.")
                if not np.any(array):
                    result_warnings.append(f"{name} volume is all zeros ({path.name}).")
        if array is not None and encode_metaimage and is_meta:
            encoded[name] = _nifti_gz_bytes(array, affine, this_spacing)
        del array
    assert shape is not None and spacing is not None
    if not np.allclose(spacing, 1.0, atol=1e-3):
        result_warnings.insert(
            0, f"voxel spacing {tuple(round(s, 4) for s in spacing)} mm is not 1 mm isotropic; {SPACING_NOTE}."
        )
    return CaseCheck(tuple(int(s) for s in shape), tuple(float(s) for s in spacing), result_warnings, encoded)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------
def _normalise_split_name(name: str) -> str:
    key = str(name).strip().lower()
    return SPLIT_ALIASES.get(key, key)


def _entry_to_id(entry: Any, path: Path) -> str:
    if isinstance(entry, str):
        return entry.strip()
    if isinstance(entry, dict):
        for key, value in entry.items():
            if _norm_key(key) in ("caseid", "id", "case", "name", "subjectid") and isinstance(value, str):
                return value.strip()
        for key in ("label", "image", "text_feature"):
            value = entry.get(key)
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, str) and value:
                parent = Path(value).parent.name
                if parent:
                    return parent
        raise ValueError(f"{path}: cannot find a case id in split entry with keys {sorted(entry)}.")
    raise ValueError(f"{path}: split entries must be case ids or objects, got {type(entry).__name__}.")


def read_split_file(path: Path | str) -> Dict[str, List[str]]:
    """Read a split file into ``{split: [case ids]}``.

    * A file whose name is a split name (``Train.json``, ``test.txt``, ``val.csv``...) holds the
      ids of that split: a JSON list, a JSON object with one list (TextBraTS / MONAI data lists
      ``{"training": [{"image": [...], "label": ...}, ...]}``: the case id is the folder of the
      paths), or a text file with one id per line (first comma/whitespace separated field;
      ``#`` comments and blank lines ignored).
    * Any other JSON file maps split names to lists: ``{"train": [...], "test": [...]}``.

    Split names are normalised: ``training`` -> ``train``, ``val``/``valid`` -> ``validation``,
    ``testing`` -> ``test``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found.")
    stem_split = _normalise_split_name(path.stem)
    named = path.stem.strip().lower() in SPLIT_ALIASES
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}).") from exc
        if named:
            if isinstance(obj, dict):
                lists = [v for v in obj.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise ValueError(f"{path}: expected one list of cases in the {stem_split!r} split file.")
                obj = lists[0]
            if not isinstance(obj, list):
                raise ValueError(f"{path}: expected a list of cases.")
            return {stem_split: [_entry_to_id(e, path) for e in obj]}
        if not isinstance(obj, dict) or not all(isinstance(v, list) for v in obj.values()):
            raise ValueError(f'{path}: expected {{"train": [...], "test": [...]}} (split name -> list of case ids).')
        out: Dict[str, List[str]] = {}
        for key, entries in obj.items():
            out.setdefault(_normalise_split_name(key), []).extend(_entry_to_id(e, path) for e in entries)
        return out
    ids = []
    with open(path, encoding="utf-8-sig") as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            ids.append(line.replace(",", " ").split()[0])
    if ids and _norm_key(ids[0]) in _ID_KEYS:  # a header row
        ids = ids[1:]
    return {stem_split: ids}


def _resolve_split_spec(splits: Any) -> Optional[Dict[str, List[str]]]:
    """Normalise the ``splits`` argument into ``{split: [ids]}`` (``None`` = automatic folds)."""
    if splits is None:
        return None
    if isinstance(splits, (str, Path)):
        if str(splits).lower() == "none":
            return {"train": ["*"]}
        path = Path(splits)
        if path.is_dir():
            files = sorted(
                p for p in path.iterdir()
                if p.is_file() and p.suffix.lower() in (".json", ".txt", ".csv", ".lst") and p.stem.lower() in SPLIT_ALIASES
            )  # fmt: skip
            if not files:
                raise ValueError(f"{path}: no split file (train/test/val .json/.txt) in this folder.")
            splits = files
        else:
            return read_split_file(path)
    if isinstance(splits, Mapping):
        out: Dict[str, List[str]] = {}
        for name, value in splits.items():
            if isinstance(value, (str, Path)):
                value = next(iter(read_split_file(value).values()))
            out.setdefault(_normalise_split_name(name), []).extend(str(v).strip() for v in value)
        return out
    if isinstance(splits, (list, tuple)):
        out = {}
        for item in splits:
            for name, ids in read_split_file(item).items():
                out.setdefault(name, []).extend(ids)
        return out
    raise ValueError(f"splits must be None, 'none', a path, a list of paths or a dict, got {type(splits).__name__}.")


def _read_patient_map(patient_map: Any) -> Dict[str, str]:
    if patient_map is None:
        return {}
    if isinstance(patient_map, Mapping):
        return {str(k): str(v) for k, v in patient_map.items()}
    path = Path(patient_map)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        case_col = _pick_column(columns, ("caseid", "case", "id", "subjectid"), "case id", path)
        patient_col = _pick_column(columns, ("patientid", "patient"), "patient id", path)
        return {row[case_col].strip(): row[patient_col].strip() for row in reader if row.get(case_col)}


def _split_sizes_by_fraction(counts: Dict[str, int], fraction: float) -> Dict[str, int]:
    """Per-stratum sizes summing to round(fraction * total) (largest remainder), at least 1 overall."""
    total = sum(counts.values())
    target = int(round(fraction * total))
    if fraction > 0 and total > 1:
        target = min(max(target, 1), total - 1)
    raw = {k: fraction * v for k, v in counts.items()}
    sizes = {k: int(math.floor(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (-(raw[k] - sizes[k]), k)):
        if sum(sizes.values()) >= target:
            break
        if sizes[k] < counts[k]:
            sizes[k] += 1
    while sum(sizes.values()) > target:
        k = max(sizes, key=lambda k: (sizes[k], k))
        sizes[k] -= 1
    return sizes


@dataclass
class _SplitPlan:
    assignment: Dict[str, List[str]]
    unknown_ids: Dict[str, List[str]]
    unassigned: List[str]
    source: str
    patients: Dict[str, str] = field(default_factory=dict)  # case id -> patient, as the split used it


def _plan_splits(
    cases: Sequence[CaseFiles],
    splits: Any = None,
    n_folds: int = 5,
    fold: int = 0,
    val_fraction: float = 0.0,
    seed: int = 0,
    patient_map: Any = None,
) -> _SplitPlan:
    patient_of = patient_groups(cases, _read_patient_map(patient_map))
    spec = _resolve_split_spec(splits)
    if spec is not None:
        plan = _plan_from_spec(spec, patient_of)
    else:
        plan = _plan_folds(cases, patient_of, n_folds, fold, val_fraction, seed)
    plan.patients = patient_of
    return plan


def _plan_from_spec(spec: Dict[str, List[str]], patient_of: Dict[str, str]) -> _SplitPlan:
    """Splits as a split file gives them; a case or a patient in two splits is an error."""
    known = set(patient_of)
    if spec == {"train": ["*"]}:
        return _SplitPlan({"train": sorted(known)}, {}, [], "none (one split)")
    assignment: Dict[str, List[str]] = {}
    split_of: Dict[str, str] = {}
    unknown: Dict[str, List[str]] = {}
    for name, ids in spec.items():
        for cid in ids:
            if cid not in known:
                unknown.setdefault(name, []).append(cid)
                continue
            if cid in split_of and split_of[cid] != name:
                raise ValueError(f"split file: case {cid} is in two splits ({split_of[cid]!r} and {name!r}).")
            if cid in split_of:
                continue
            split_of[cid] = name
            assignment.setdefault(name, []).append(cid)
    patient_split: Dict[str, Tuple[str, str]] = {}
    for cid, name in sorted(split_of.items()):
        patient = patient_of[cid]
        if patient in patient_split and patient_split[patient][0] != name:
            other_split, other_case = patient_split[patient]
            raise ValueError(
                f"split file: patient {patient} is in two splits ({other_split!r} via {other_case}, "
                f"{name!r} via {cid}); a patient must stay in one split."
            )
        patient_split.setdefault(patient, (name, cid))
    unassigned = sorted(known - set(split_of))
    return _SplitPlan({k: sorted(v) for k, v in assignment.items()}, unknown, unassigned, "split file")


def _check_fold_options(n_folds: int, fold: int, val_fraction: float) -> None:
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2 for automatic folds (got {n_folds}); use splits='none' for one split.")
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in 0..{n_folds - 1}, got {fold}.")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")


def _patients_and_grades(
    cases: Sequence[CaseFiles], patient_of: Dict[str, str]
) -> Tuple[Dict[str, List[str]], Dict[str, str]]:
    """(patient -> its case ids, patient -> grade); a patient with cases of two grades is an error."""
    cases_of: Dict[str, List[str]] = {}
    grade_of: Dict[str, str] = {}
    for c in sorted(cases, key=lambda c: c.case_id):
        patient = patient_of[c.case_id]
        cases_of.setdefault(patient, []).append(c.case_id)
        if c.grade is not None:
            if grade_of.get(patient, c.grade) != c.grade:
                raise ValueError(
                    f"patient {patient} has cases of different grades ({grade_of[patient]} and {c.grade})."
                )
            grade_of[patient] = c.grade
    return cases_of, grade_of


def _fold_of_patients(patients: Iterable[str], grade_of: Dict[str, str], n_folds: int, seed: int) -> Dict[str, int]:
    """Each patient's fold: a seeded shuffle within each grade stratum, dealt round-robin."""
    strata: Dict[str, List[str]] = {}
    for patient in sorted(patients):
        strata.setdefault(grade_of.get(patient, "unknown"), []).append(patient)
    rng = np.random.default_rng(seed)
    fold_of: Dict[str, int] = {}
    offset = 0
    for stratum in sorted(strata):
        members = strata[stratum]
        for j, idx in enumerate(rng.permutation(len(members))):
            fold_of[members[idx]] = (offset + j) % n_folds
        offset += len(members)
    return fold_of


def _validation_patients(
    train_patients: Sequence[str], grade_of: Dict[str, str], val_fraction: float, seed: int, fold: int
) -> List[str]:
    train_strata: Dict[str, List[str]] = {}
    for p in train_patients:
        train_strata.setdefault(grade_of.get(p, "unknown"), []).append(p)
    sizes = _split_sizes_by_fraction({k: len(v) for k, v in train_strata.items()}, float(val_fraction))
    val_rng = np.random.default_rng([seed, fold, 1])
    chosen: List[str] = []
    for stratum in sorted(train_strata):
        members = train_strata[stratum]
        order = val_rng.permutation(len(members))
        chosen.extend(members[i] for i in order[: sizes[stratum]])
    return chosen


def _plan_folds(
    cases: Sequence[CaseFiles], patient_of: Dict[str, str], n_folds: int, fold: int, val_fraction: float, seed: int
) -> _SplitPlan:
    """Automatic splits: patient-level folds stratified by grade, fold ``fold`` as test."""
    n_folds, fold = int(n_folds), int(fold)
    _check_fold_options(n_folds, fold, val_fraction)
    cases_of, grade_of = _patients_and_grades(cases, patient_of)
    if len(cases_of) < n_folds:
        raise ValueError(
            f"{len(cases_of)} patients cannot be split into {n_folds} folds (cases with identical tumour masks "
            "count as one patient); lower n_folds, add cases, or pass splits."
        )
    fold_of = _fold_of_patients(cases_of, grade_of, n_folds, seed)
    test_patients = sorted(p for p, f in fold_of.items() if f == fold)
    train_patients = sorted(p for p, f in fold_of.items() if f != fold)
    val_patients = _validation_patients(train_patients, grade_of, val_fraction, seed, fold) if val_fraction > 0 else []
    train_patients = [p for p in train_patients if p not in set(val_patients)]

    def expand(patients: Iterable[str]) -> List[str]:
        return sorted(cid for p in patients for cid in cases_of[p])

    assignment = {"train": expand(train_patients), "test": expand(test_patients)}
    if val_patients:
        assignment["validation"] = expand(val_patients)
    source = f"patient-level folds stratified by grade (n_folds={n_folds}, fold={fold}, val_fraction={val_fraction}, seed={seed})"
    return _SplitPlan(assignment, {}, [], source)


def make_splits(
    cases: Sequence[CaseFiles],
    splits: Any = None,
    n_folds: int = 5,
    fold: int = 0,
    val_fraction: float = 0.0,
    seed: int = 0,
    patient_map: Any = None,
) -> Dict[str, List[str]]:
    """Assign cases to splits: ``{split name: [case ids]}``; a patient never lands in two splits.

    Args:
        cases: the cases (from :func:`~modeling_emrfuse.brats_io.discover_cases`).
        splits: ``None`` for automatic folds; ``"none"`` for one ``train`` split with every case;
            a split file or a folder of split files (``Train.json``/``Test.json``, ``train.txt``...),
            a list of such files, or a dict ``{split: [ids] | path}`` (see :func:`read_split_file`).
            Ids in the file that match no case are warned about; cases in no split are left out
            (warned about). A case or a patient in two splits is a ``ValueError``.
        n_folds, fold: automatic folds: the patients are split into ``n_folds`` folds stratified
            by grade (unknown grade is its own stratum); fold ``fold`` is ``test``, the rest ``train``.
        val_fraction: automatic folds: fraction of the training patients moved to ``validation``
            (stratified by grade; at least one patient when > 0).
        seed: seed of the (deterministic) shuffles; the same inputs always give the same splits.
        patient_map: ``{case_id: patient_id}`` or a CSV with case and patient columns. Cases that it, the
            cases' ``patient_id`` (naming rules: a BraTS 2023+ id ``BraTS-GLI-XXXXX-YYY`` belongs to patient
            ``BraTS-GLI-XXXXX``) or identical tumour masks (read from the label files) put together are one
            patient (:func:`~modeling_emrfuse.brats_io.patient_groups`); any other case is its own patient.
    """
    plan = _plan_splits(cases, splits, n_folds, fold, val_fraction, seed, patient_map)
    for name, ids in plan.unknown_ids.items():
        warnings.warn(f"split {name!r}: {len(ids)} id(s) match no case: {ids[:10]}", stacklevel=2)
    if plan.unassigned:
        warnings.warn(
            f"{len(plan.unassigned)} case(s) are in no split and left out: {plan.unassigned[:10]}", stacklevel=2
        )
    return plan.assignment


# --------------------------------------------------------------------------------------------
# the builder
# --------------------------------------------------------------------------------------------
def derange_reports(
    reports: Mapping[str, Optional[str]],
    groups: Sequence[Sequence[str]],
    seed: int = 0,
    patients: Optional[Mapping[str, str]] = None,
    max_tries: int = 10_000,
) -> Dict[str, Optional[str]]:
    """The shuffled-report control: every case gets the report of another case of its group.

    Within each group (e.g. the train, validation and test splits, so that every split keeps its own
    reports), the cases with a report get those same reports back in a random order in which no case
    keeps its own: a uniformly drawn derangement (permutations drawn until none is left fixed), in which
    no case receives a report of its own patient (``patients``: case id -> patient id) nor a text
    identical to its own. Each group keeps its multiset of reports, hence its grade mix. Cases without a
    report (``None``) keep ``None``; cases in no group keep their own. Deterministic by ``seed``.

    Raises ``ValueError`` (naming the group by its size, never a report) when a group has a single case with
    a report, a case id that is not in ``reports``, or no valid derangement turns up in ``max_tries`` draws
    (e.g. one patient holds more than half of a group's reports).
    """
    patients = patients or {}
    out: Dict[str, Optional[str]] = dict(reports)
    rng = np.random.default_rng([int(seed), 52711])
    for g, group in enumerate(groups):
        missing = [c for c in group if c not in reports]
        if missing:
            raise ValueError(
                f"derange_reports: group {g} names {len(missing)} case(s) without an entry in reports: {missing[:5]}"
            )
        ids = [c for c in group if reports[c] is not None]
        if not ids:
            continue
        if len(ids) == 1:
            raise ValueError(
                f"derange_reports: group {g} has a single case with a report ({ids[0]}); it cannot be swapped."
            )
        who = [patients.get(c, c) for c in ids]
        for _ in range(max_tries):
            perm = rng.permutation(len(ids))
            if all(who[j] != who[i] and reports[ids[j]] != reports[ids[i]] for i, j in enumerate(perm)):
                break
        else:
            raise ValueError(
                f"derange_reports: no derangement of group {g} ({len(ids)} cases with a report) in {max_tries} "
                "draws in which every case gets another patient's, different report."
            )
        for i, j in enumerate(perm):
            out[ids[i]] = reports[ids[j]]
    return out


def brats_text_features() -> datasets.Features:
    """The features of one example::

    case_id, patient_id, release, label_convention,
    grade            ClassLabel(names=["HGG", "LGG"]); -1 = unknown (BraTS 2021/2023, test sets)
    report           the report text ("" when the case has none)
    has_report       bool
    has_label        bool
    t1, t1ce, t2, flair   datasets.Nifti (decoded to a nibabel image, (X, Y, Z) = (240, 240, 155))
    seg              datasets.Nifti, None for unlabeled cases
    spacing          [x, y, z] voxel size in mm (header of the first sequence)
    shape            [X, Y, Z]
    """
    return datasets.Features(
        {
            "case_id": datasets.Value("string"),
            "patient_id": datasets.Value("string"),
            "release": datasets.Value("string"),
            "label_convention": datasets.Value("string"),
            "grade": datasets.ClassLabel(names=list(GRADES)),
            "report": datasets.Value("string"),
            "has_report": datasets.Value("bool"),
            "has_label": datasets.Value("bool"),
            **{name: datasets.Nifti() for name in SEQUENCES},
            "seg": datasets.Nifti(),
            "spacing": datasets.List(datasets.Value("float32"), length=3),
            "shape": datasets.List(datasets.Value("int32"), length=3),
        }
    )


@dataclass
class BratsTextConfig(datasets.BuilderConfig):
    """Options of :class:`BratsTextBuilder` (pass them as keyword arguments to the builder).

    Attributes:
        release: ``"auto"`` or a BraTS release year (``"2015"`` ... ``"2023"``).
        reports: path of a reports file (CSV/JSONL/JSON), or ``None`` (per-case files only).
        splits, n_folds, fold, val_fraction, seed, patient_map: see :func:`make_splits`.
        require_reports: a case without report is an error (else ``has_report=False``).
        on_error: ``"raise"`` or ``"skip"`` (skipped cases are listed in the summary).
        check_voxels: read every volume to check NaN/inf, label values and truncation
            (``False``: headers only, much faster).
        data_dirs: several data folders in one dataset (``data_dir=[...]`` fills it); each has its
            own release (``releases``: one per folder, or a dict folder -> release; default ``release``
            for all). Case ids must be unique across the folders.
        id_mapping: id table(s) (BraTS 2020 ``name_mapping.csv``, BraTS 2021 ``BraTS21-17_Mapping.csv``)
            so that reports keyed by BraTS 2020 ids and grades reach the same patient's case under
            another release's id, and one patient's cases stay in one split. A ``name_mapping*.csv``
            inside a BraTS 2020 data folder is used automatically.
        allow_missing_sequences: keep cases that lack some sequences (their columns are ``None``).
        fingerprint: digest of the input files (names, sizes, modification times), computed
            automatically; it keys the cache so that changed inputs are rebuilt.
    """

    release: str = "auto"
    reports: Optional[str] = None
    splits: Any = None
    n_folds: int = 5
    fold: int = 0
    val_fraction: float = 0.0
    seed: int = 0
    patient_map: Any = None
    require_reports: bool = False
    on_error: str = "raise"
    check_voxels: bool = True
    data_dirs: Optional[List[str]] = None
    releases: Any = None
    id_mapping: Any = None
    allow_missing_sequences: bool = False
    fingerprint: Optional[str] = None


def _stat_entries(path: Path) -> List[str]:
    entries = []
    if path.is_file():
        st = path.stat()
        return [f"{path.name}|{st.st_size}|{st.st_mtime_ns}"]
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            entries.append(f"{os.path.relpath(full, path)}|{st.st_size}|{st.st_mtime_ns}")
    return entries


def input_fingerprint(data_dir: Any, *others: Any) -> str:
    """Digest of the names, sizes and modification times of every input file (cache key)."""
    digest = hashlib.sha256(BUILDER_VERSION.encode())
    for item in (data_dir,) + others:
        if item is None:
            continue
        paths: List[Any] = []
        if isinstance(item, (str, Path)) and Path(item).exists():
            paths = [Path(item)]
        elif isinstance(item, (list, tuple)):
            paths = [Path(p) for p in item if isinstance(p, (str, Path)) and Path(p).exists()]
        elif isinstance(item, Mapping):
            paths = [Path(v) for v in item.values() if isinstance(v, (str, Path)) and Path(v).exists()]
        digest.update(repr(item).encode())
        for p in paths:
            for entry in _stat_entries(p):
                digest.update(entry.encode())
    return digest.hexdigest()[:16]


def _start_summary(cfg: "BratsTextConfig", folders: List[str], cases: CaseList) -> dict:
    """The build summary's discovery part (releases, conventions, counts, skipped cases, warnings)."""
    conventions = sorted({c.label_convention for c in cases}) or [get_label_convention(cases.release).name]
    return {
        "data_dir": cfg.data_dir if len(folders) == 1 else folders,
        "release": cases.release,
        "releases": cases.releases,
        "label_convention": conventions[0] if len(conventions) == 1 else "mixed",
        "label_conventions": conventions,
        "cases_found": len(cases) + len(cases.skipped),
        "splits": {},
        "skipped": [s.to_dict() for s in cases.skipped],
        "warnings": [{"case_id": cid, "message": msg} for cid, msg in cases.warnings],
        "reports": {},
    }


def _split_generators_of(plan: "_SplitPlan", kept: Sequence[CaseFiles], reports: Mapping[str, str]) -> list:
    """One ``SplitGenerator`` per non-empty split, carrying its cases, reports and patients."""
    by_id = {c.case_id: c for c in kept}
    generators = []
    for name, ids in plan.assignment.items():
        if not ids:
            continue
        gen_kwargs = {
            "cases": [by_id[i] for i in ids],
            "reports": {i: reports[i] for i in ids if i in reports},
            "patients": {i: plan.patients[i] for i in ids if i in plan.patients},
        }
        generators.append(datasets.SplitGenerator(name=name, gen_kwargs=gen_kwargs))
    return generators


class BratsTextBuilder(datasets.GeneratorBasedBuilder):
    """BraTS (any release) + radiology reports as a ``datasets`` builder.

    ``datasets`` 5 does not run loading scripts, so the builder is used by instantiating it::

        builder = BratsTextBuilder(data_dir=..., reports=None, release="auto", splits=None,
                                   n_folds=5, fold=0, val_fraction=0.0, seed=0,
                                   require_reports=False, on_error="raise", cache_dir=None)
        builder.download_and_prepare()
        dsd = builder.as_dataset()
        builder.summary          # counts, skipped cases and why, orphan reports, warnings

    The cache (``cache_dir``, default the ``datasets`` cache) is keyed by the options and by a
    fingerprint of the input files, so a changed folder is rebuilt and an unchanged one reused.

    Streaming: cases are discovered from the directory listing; examples store the volumes' file
    paths (embedded as bytes only when saved), and the per-case checks read one volume at a time, so
    preparing a 1,251-case release never holds more than one case in memory. MetaImage (BraTS 2015)
    volumes are converted to gzipped NIfTI bytes case by case, because ``datasets.Nifti`` decodes NIfTI.

    Reports: a TextBraTS ``<case>_flair_text.txt`` inside the case folder, or a reports file (CSV,
    JSONL or JSON with a case-id and a text column; see :func:`read_reports`) whose entries take
    precedence. A case without report gets ``has_report=False`` (an error only with
    ``require_reports=True``); a report whose case does not exist is listed in the summary and warned
    about.
    """

    BUILDER_CONFIG_CLASS = BratsTextConfig
    VERSION = datasets.Version(BUILDER_VERSION)
    DEFAULT_WRITER_BATCH_SIZE = 8  # MetaImage cases carry their bytes: flush every few cases

    def __init__(self, *args, **kwargs):
        data_dir = kwargs.get("data_dir")
        if data_dir is None:
            raise ValueError("BratsTextBuilder needs data_dir= (the BraTS release folder).")
        if isinstance(data_dir, (list, tuple)):
            if not data_dir:
                raise ValueError("BratsTextBuilder: data_dir is an empty list.")
            kwargs["data_dirs"] = [str(Path(d).expanduser().absolute()) for d in data_dir]
            data_dir = data_dir[0]
        kwargs["data_dir"] = str(Path(data_dir).expanduser().absolute())
        for key in ("reports", "patient_map"):
            if isinstance(kwargs.get(key), Path):
                kwargs[key] = str(kwargs[key])
        if isinstance(kwargs.get("id_mapping"), (str, Path)):
            kwargs["id_mapping"] = [str(kwargs["id_mapping"])]
        elif kwargs.get("id_mapping") is not None:
            kwargs["id_mapping"] = [str(p) for p in kwargs["id_mapping"]]
        if isinstance(kwargs.get("releases"), Mapping):
            kwargs["releases"] = {str(Path(k).expanduser().absolute()): str(v) for k, v in kwargs["releases"].items()}
        elif kwargs.get("releases") is not None and not isinstance(kwargs["releases"], str):
            kwargs["releases"] = [str(r) for r in kwargs["releases"]]
        if isinstance(kwargs.get("splits"), Path):
            kwargs["splits"] = str(kwargs["splits"])
        if isinstance(kwargs.get("release"), int):
            kwargs["release"] = str(kwargs["release"])
        if kwargs.get("fingerprint") is None:
            kwargs["fingerprint"] = input_fingerprint(
                kwargs.get("data_dirs") or kwargs["data_dir"],
                kwargs.get("reports"),
                kwargs.get("splits"),
                kwargs.get("patient_map"),
                kwargs.get("id_mapping"),
            )
        kwargs.setdefault("dataset_name", "brats_text")
        super().__init__(*args, **kwargs)
        self._summary: Optional[dict] = None
        self._built_here = False

    # -- datasets API ------------------------------------------------------------------------
    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description="BraTS MRI (four sequences + label map) paired with radiology reports; one example per case.",
            features=brats_text_features(),
        )

    def _split_generators(self, dl_manager):
        cfg: BratsTextConfig = self.config
        if cfg.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {cfg.on_error!r}.")
        folders = list(cfg.data_dirs or [cfg.data_dir])
        cases: CaseList = discover_folders(
            folders,
            cfg.releases if cfg.releases is not None else cfg.release,
            on_error=cfg.on_error,
            allow_missing_sequences=cfg.allow_missing_sequences,
            check_files=cfg.check_voxels,
        )
        summary = _start_summary(cfg, folders, cases)
        id_mapping = load_id_mapping(cfg.id_mapping, folders, cases.releases)
        attached, kept = self._attach_reports(cfg, folders, cases, id_mapping, summary)
        patient_map = {**attached.patients, **_read_patient_map(cfg.patient_map)}
        plan = _plan_splits(kept, cfg.splits, cfg.n_folds, cfg.fold, cfg.val_fraction, cfg.seed, patient_map)
        for name, ids in plan.unknown_ids.items():
            warnings.warn(f"split {name!r}: {len(ids)} id(s) match no usable case: {ids[:10]}", stacklevel=2)
        if plan.unassigned:
            warnings.warn(
                f"{len(plan.unassigned)} case(s) are in no split and left out: {plan.unassigned[:10]}", stacklevel=2
            )
        summary.update(split_source=plan.source, unknown_split_ids=plan.unknown_ids, unassigned_cases=plan.unassigned)
        self._summary = summary
        self._built_here = True
        generators = _split_generators_of(plan, kept, attached.reports)
        if not generators:
            raise ValueError(f"{cfg.data_dir}: no usable case left to build a dataset from.")
        return generators

    def _skip(self, summary: dict, case_id: str, path: Any, reason: str) -> None:
        summary["skipped"].append(SkippedCase(case_id, str(path), reason).to_dict())
        warnings.warn(f"skipped case {case_id}: {reason} ({path})", stacklevel=4)

    def _attach_reports(
        self,
        cfg: "BratsTextConfig",
        folders: List[str],
        cases: CaseList,
        id_mapping: Optional[IdMapping],
        summary: dict,
    ) -> Tuple[ReportAttachment, List[CaseFiles]]:
        """Reports and grades for every case; the cases kept (a case without report is an error or a skip
        with ``require_reports``). Fills the summary's ``reports`` and ``id_mapping``."""
        file_reports: Dict[str, str] = read_reports(cfg.reports) if cfg.reports else {}
        attached = attach_reports_and_grades(cases, file_reports, id_mapping, on_error=cfg.on_error)
        for s in attached.skipped:
            self._skip(summary, s.case_id, s.path, s.reason)
        skipped = {s.case_id for s in cases.skipped} | {s.case_id for s in attached.skipped}
        orphans = sorted(set(file_reports) - attached.used_report_ids - {c.case_id for c in cases} - skipped)
        if orphans:
            warnings.warn(
                f"{len(orphans)} report(s) in {cfg.reports} match no case in {', '.join(folders)}: {orphans[:10]}"
                + (" ..." if len(orphans) > 10 else ""),
                stacklevel=3,
            )
        kept, without = [], []
        for case in attached.cases:
            if case.case_id in attached.reports:
                kept.append(case)
            elif not cfg.require_reports:
                without.append(case.case_id)
                kept.append(case)
            else:
                self._refuse_without_report(cfg, case, file_reports, summary)
        summary["reports"] = {
            "reports_file": None if cfg.reports is None else str(cfg.reports),
            "from_reports_file": attached.from_reports_file,
            "from_case_files": attached.from_case_files,
            "via_id_mapping": attached.reports_via_id_mapping,
            "cases_without_report": without,
            "orphan_reports": orphans,
        }
        summary["id_mapping"] = {
            "tables": [] if id_mapping is None else list(id_mapping.files),
            "reports_attached": attached.reports_via_id_mapping,
            "grades_attached": attached.grades_via_id_mapping,
            "cases_in_tables": len(attached.patients),
        }
        return attached, kept

    def _refuse_without_report(
        self, cfg: "BratsTextConfig", case: CaseFiles, file_reports: Mapping[str, str], summary: dict
    ) -> None:
        where = f"no {case.case_id}_flair_text.txt in {case.source_dir}" + (
            f" and no entry in {cfg.reports}" if cfg.reports else ""
        )
        if case.case_id in file_reports or (case.report_path is not None and Path(case.report_path).is_file()):
            where = "the report is empty"
        message = f"case {case.case_id}: no report ({where}); require_reports=True"
        if cfg.on_error == "raise":
            raise ValueError(message)
        self._skip(summary, case.case_id, case.report_path or case.source_dir, message)

    def _generate_examples(self, cases: List[CaseFiles], reports: Dict[str, str], patients: Dict[str, str]):
        cfg: BratsTextConfig = self.config
        for case in cases:
            try:
                check = check_case(case, check_voxels=cfg.check_voxels, encode_metaimage=True)
            except (ValueError, FileNotFoundError) as exc:
                if cfg.on_error == "raise":
                    raise ValueError(str(exc)) from exc
                message = str(exc)
                if self._summary is not None:
                    self._summary["skipped"].append(SkippedCase(case.case_id, str(case.source_dir), message).to_dict())
                warnings.warn(f"skipped case {case.case_id}: {message}", stacklevel=2)
                continue
            for message in check.warnings:
                if self._summary is not None:
                    self._summary["warnings"].append({"case_id": case.case_id, "message": message})
                warnings.warn(f"case {case.case_id}: {message}", stacklevel=2)
            example = {
                "case_id": case.case_id,
                "patient_id": patients.get(case.case_id, case.patient_id),
                "release": case.release,
                "label_convention": case.label_convention,
                "grade": -1 if case.grade is None else GRADES.index(case.grade),
                "report": reports.get(case.case_id, ""),
                "has_report": case.case_id in reports,
                "has_label": case.label is not None,
                "spacing": list(check.spacing),
                "shape": list(check.shape),
                "seg": None,
            }
            for name, path in case.files():
                if name in check.encoded:
                    example[name] = {"path": f"{case.case_id}_{name}.nii.gz", "bytes": check.encoded[name]}
                else:
                    example[name] = str(Path(path).absolute())
            yield case.case_id, example

    # -- summary -----------------------------------------------------------------------------
    def download_and_prepare(self, *args, **kwargs):
        """``datasets``' ``download_and_prepare``, then save (or reload) the build summary."""
        super().download_and_prepare(*args, **kwargs)
        output_dir = kwargs.get("output_dir") or self._output_dir
        summary_path = Path(output_dir) / SUMMARY_FILENAME
        if self._built_here and self._summary is not None:
            try:
                write_json(summary_path, self._summary, indent=1, default=str)
            except OSError as exc:  # pragma: no cover - read-only cache
                logger.warning("could not write %s: %s", summary_path, exc)
        elif summary_path.is_file():
            self._summary = json.loads(summary_path.read_text())

    @property
    def summary(self) -> Optional[dict]:
        """The build summary (after :meth:`download_and_prepare`): counts come from :func:`summarize`."""
        return self._summary


# --------------------------------------------------------------------------------------------
# one-call helper
# --------------------------------------------------------------------------------------------
def summarize(dsd: datasets.DatasetDict, build_summary: Optional[dict] = None) -> dict:
    """Counts per split (cases, grades, with report, labeled) merged into the build summary."""
    summary = dict(build_summary or {})
    splits = {}
    for name, ds in dsd.items():
        cols = ds.select_columns(["grade", "has_report", "has_label"])
        grades = cols["grade"]
        splits[name] = {
            "cases": len(ds),
            "grades": {
                "HGG": int(sum(g == 0 for g in grades)),
                "LGG": int(sum(g == 1 for g in grades)),
                "unknown": int(sum(g == -1 for g in grades)),
            },
            "with_report": int(sum(cols["has_report"])),
            "labeled": int(sum(cols["has_label"])),
        }
    summary["splits"] = splits
    return summary


def load_brats_text(
    data_dir: Path | str | Sequence[Path | str],
    reports: Path | str | None = None,
    release: Any = "auto",
    splits: Any = None,
    n_folds: int = 5,
    fold: int = 0,
    val_fraction: float = 0.0,
    seed: int = 0,
    require_reports: bool = False,
    on_error: str = "raise",
    patient_map: Any = None,
    check_voxels: bool = True,
    cache_dir: Path | str | None = None,
    num_proc: Optional[int] = None,
    return_summary: bool = False,
    id_mapping: Any = None,
    allow_missing_sequences: bool = False,
) -> Union[datasets.DatasetDict, Tuple[datasets.DatasetDict, dict]]:
    """Build (or reuse from the cache) the BraTS + report dataset: one call, a ``DatasetDict``.

    Args are those of :class:`BratsTextConfig` (see :func:`make_splits` for the split options);
    ``cache_dir`` is the ``datasets`` cache (default ``~/.cache/huggingface/datasets``);
    ``return_summary=True`` also returns the summary dict (counts per split and grade, skipped
    cases and why, orphan reports, cases without report, reports and grades attached through the
    id tables, warnings; ids only, never report text).

    Several folders: ``data_dir=[A, B]`` with ``release="auto"`` (each detected), one release for
    all, a list with one release per folder, or a dict ``{folder: release}``. ``id_mapping``: id
    table(s) that let reports and grades follow their patients across releases (see
    :class:`BratsTextConfig`).

    Errors: bad input raises ``ValueError`` naming the case and the file (``on_error="raise"``),
    or the case is skipped and listed in the summary (``on_error="skip"``).
    """
    many = not isinstance(data_dir, (str, Path))
    per_folder = not isinstance(release, (str, int))
    builder = BratsTextBuilder(
        data_dir=[str(d) for d in data_dir] if many else str(data_dir),
        reports=None if reports is None else str(reports),
        release="auto" if per_folder else str(release),
        releases=release if per_folder else None,
        id_mapping=id_mapping,
        allow_missing_sequences=allow_missing_sequences,
        splits=splits,
        n_folds=n_folds,
        fold=fold,
        val_fraction=val_fraction,
        seed=seed,
        patient_map=patient_map,
        require_reports=require_reports,
        on_error=on_error,
        check_voxels=check_voxels,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    try:
        builder.download_and_prepare(num_proc=num_proc)
    except DatasetGenerationError as exc:
        cause = exc.__cause__
        if isinstance(cause, (ValueError, FileNotFoundError, ImportError)):
            raise cause from None
        raise
    dsd = builder.as_dataset()
    if not isinstance(dsd, datasets.DatasetDict):  # pragma: no cover - as_dataset() without split returns a dict
        dsd = datasets.DatasetDict(dsd)
    if return_summary:
        return dsd, summarize(dsd, builder.summary)
    return dsd


# --------------------------------------------------------------------------------------------
# CLI: emrfuse prepare
# --------------------------------------------------------------------------------------------
def _write_parquet(dsd: datasets.DatasetDict, output_dir: Path, max_shard_bytes: int = 500 * 2**20) -> List[Path]:
    """Write each split as ``data/<split>-XXXXX-of-YYYYY.parquet`` with the volumes embedded (Hub layout)."""
    from datasets.arrow_writer import ParquetWriter
    from tqdm.auto import tqdm

    written: List[Path] = []
    data_dir = output_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, ds in dsd.items():
        num_shards = max(1, min(len(ds), math.ceil(ds._estimate_nbytes() / max_shard_bytes)))
        with tqdm(total=len(ds), desc=f"Writing {split} (parquet)", unit=" cases") as pbar:
            for index in range(num_shards):
                shard = ds.shard(num_shards=num_shards, index=index, contiguous=True)
                path = data_dir / f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
                writer = ParquetWriter(features=ds.features, path=str(path), embed_local_files=True)
                try:
                    for table in shard.with_format("arrow").iter(batch_size=4):
                        writer.write_table(table)
                        pbar.update(table.num_rows)
                    writer.finalize()
                finally:
                    writer.close()
                written.append(path)
    return written


def format_summary(summary: dict) -> str:
    """Human-readable summary (ids and counts only; never report text)."""
    lines = [
        f"release {summary.get('release')} ({summary.get('label_convention')}), {summary.get('cases_found')} case(s) found"
    ]
    if len(summary.get("releases") or {}) > 1:
        lines.append(
            "folders: " + ", ".join(f"{folder} ({release})" for folder, release in summary["releases"].items())
        )
    idm = summary.get("id_mapping") or {}
    if idm.get("tables"):
        lines.append(
            f"id tables: {len(idm['tables'])}; {idm.get('reports_attached', 0)} report(s) and {idm.get('grades_attached', 0)} grade(s) "
            f"attached through them; {idm.get('cases_in_tables', 0)} case(s) known to them"
        )
    lines.append(f"splits: {summary.get('split_source')}")
    for name, s in summary.get("splits", {}).items():
        g = s["grades"]
        lines.append(
            f"  {name:<11} {s['cases']:>5} cases  HGG {g['HGG']}  LGG {g['LGG']}  unknown grade {g['unknown']}  "
            f"with report {s['with_report']}  labeled {s['labeled']}"
        )
    rep = summary.get("reports", {})
    if rep:
        lines.append(
            f"reports: {rep.get('from_reports_file', 0)} from the reports file, {rep.get('from_case_files', 0)} from case files, "
            f"{len(rep.get('cases_without_report', []))} case(s) without report, {len(rep.get('orphan_reports', []))} orphan report(s)"
        )
        if rep.get("orphan_reports"):
            lines.append("  orphan reports (no such case): " + ", ".join(rep["orphan_reports"][:20]))
    skipped = summary.get("skipped", [])
    lines.append(f"skipped: {len(skipped)} case(s)")
    for s in skipped:
        lines.append(f"  {s['case_id']}: {s['reason']}")
    if summary.get("unassigned_cases"):
        lines.append(f"in no split (left out): {', '.join(summary['unassigned_cases'][:20])}")
    for name, ids in (summary.get("unknown_split_ids") or {}).items():
        lines.append(f"split {name}: {len(ids)} id(s) match no case: {', '.join(ids[:20])}")
    warns = summary.get("warnings", [])
    if warns:
        lines.append(f"warnings: {len(warns)}")
        for w in warns[:50]:
            lines.append(f"  {w['case_id']}: {w['message']}")
    return "\n".join(lines)


def _output_problem(output: Path) -> Optional[str]:
    """Why ``emrfuse prepare -o`` cannot be the output folder (a file, or below a file), or ``None``."""
    existing = output
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == output else f"is below {existing}, which is a file"
        return f"output {output} {where}: give a folder (-o)."
    return None


def _run_prepare(args: argparse.Namespace) -> int:
    output = Path(args.output)
    problem = _output_problem(output)
    if problem is not None:
        print(f"emrfuse prepare: {problem}", file=sys.stderr)
        return 2
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        print(f"emrfuse prepare: {output} exists and is not empty (use --overwrite).", file=sys.stderr)
        return 2
    datasets.enable_progress_bars()
    splits: Any = None
    if args.splits:
        splits = args.splits[0] if len(args.splits) == 1 else list(args.splits)
    try:
        dsd, summary = load_brats_text(
            args.data_dir[0] if len(args.data_dir) == 1 else args.data_dir,
            reports=args.reports,
            release=args.release[0] if len(args.release) == 1 else args.release,
            id_mapping=args.id_mapping,
            allow_missing_sequences=args.allow_missing_sequences,
            splits=splits,
            n_folds=args.n_folds,
            fold=args.fold,
            val_fraction=args.val_fraction,
            seed=args.seed,
            require_reports=args.require_reports,
            on_error=args.on_error,
            patient_map=args.patient_map,
            check_voxels=not args.no_voxel_check,
            cache_dir=args.cache_dir,
            num_proc=args.num_proc,
            return_summary=True,
        )
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"emrfuse prepare: {exc}", file=sys.stderr)
        return 1
    output.mkdir(parents=True, exist_ok=True)
    if args.format == "parquet":
        _write_parquet(dsd, output)
    else:
        dsd.save_to_disk(str(output))
    write_json(output / "prepare_summary.json", summary, indent=1, default=str)
    print(format_summary(summary))
    print(f"written to {output} ({args.format}); summary in {output / 'prepare_summary.json'}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``emrfuse prepare``: build the BraTS + report dataset and write it to a folder."""
    p = subparsers.add_parser(
        "prepare",
        help="build the BraTS + report dataset from a release folder and write it (save_to_disk or Parquet)",
        description=(
            "Discover the cases of a BraTS release folder (2015, 2017-2019, 2020, 2021, 2023+; detected automatically), "
            "pair them with their reports, split them by patient, check them, and write a datasets.DatasetDict "
            "(save_to_disk, loadable with datasets.load_from_disk) or Parquet shards with the volumes embedded "
            "(data/<split>-*.parquet, ready to upload to a Hub dataset repo). Prints a summary: counts per split and "
            "grade, skipped cases and why. Report text is never printed."
        ),
    )
    p.add_argument(
        "data_dir", nargs="+", help="BraTS release folder(s) (holding HGG/LGG or the case folders); several are merged"
    )
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--reports", default=None, help="reports file (CSV/JSONL/JSON with case id + text columns)")
    p.add_argument(
        "--release",
        nargs="+",
        default=["auto"],
        help=f"auto (default) or a release of the release table ({', '.join(RELEASES)}): one for all folders, or one per folder",
    )
    p.add_argument(
        "--id-mapping",
        nargs="+",
        default=None,
        help="id table(s): BraTS 2020 name_mapping.csv and/or BraTS 2021 BraTS21-17_Mapping.csv (reports, grades and patients across releases)",
    )
    p.add_argument(
        "--allow-missing-sequences", action="store_true", help="keep cases that lack some of the four sequences"
    )
    p.add_argument(
        "--splits",
        nargs="+",
        default=None,
        help="split file(s) or a folder of them (Train.json/Test.json, train.txt...), or 'none' for one split; "
        "default: patient-level folds stratified by grade",
    )
    p.add_argument("--n-folds", type=int, default=5)
    p.add_argument("--fold", type=int, default=0, help="fold used as the test split")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of training patients for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patient-map", default=None, help="CSV mapping case id -> patient id")
    p.add_argument("--require-reports", action="store_true", help="a case without report is an error")
    p.add_argument(
        "--on-error", choices=("raise", "skip"), default="raise", help="stop at a bad case, or skip and list it"
    )
    p.add_argument(
        "--no-voxel-check", action="store_true", help="check headers only (no NaN / label-value / truncation check)"
    )
    p.add_argument(
        "--format", choices=("arrow", "parquet"), default="arrow", help="arrow: save_to_disk; parquet: Hub layout"
    )
    p.add_argument("--cache-dir", default=None, help="datasets cache folder")
    p.add_argument("--num-proc", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    p.set_defaults(func=_run_prepare)
    return p
