"""``emrfuse score``: score a folder of predicted NIfTI label maps against a folder of references.

Works on predictions made by any tool. Cases are matched by the case id in their file names
(:func:`find_label_maps`); each folder's label convention is given or inferred from its label values,
never guessed silently (:func:`_choose_conventions`); predictions must lie on the reference grid
(:func:`_prediction_on_grid`). The metrics are :mod:`modeling_emrfuse.evaluation.metrics` (``--lesion-wise``
adds the BraTS 2023+ lesion-wise metrics of :mod:`modeling_emrfuse.evaluation.lesion_metrics`), and the
outputs in ``--out`` are the evaluation report of :mod:`modeling_emrfuse.evaluation.report`, the layout
``train.py`` writes too. The README's "Score predictions from any tool" section is the manual.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from .. import brats_io
from ..brats_io import SEQUENCE_SUFFIX_RE, _name_token
from ..brats_labels import HD95_EMPTY_SENTINEL_MM, LABEL_CONVENTIONS, REGIONS, SEQUENCE_ALIASES, get_label_convention
from ..evaluation.lesion_metrics import LesionMetricsUnavailable, brats_lesion_evaluator
from ..evaluation.metrics import metrics_to_row, score_label_maps
from ..evaluation.report import (
    OUTPUT_FILES,
    format_lesion_table,
    format_segmentation_table,
    has_lesion_metrics,
    summarize_segmentation,
    write_evaluation_report,
)

AUTO = "auto"
CONVENTION_PREFERENCE: Tuple[str, ...] = ("brats2017", "brats2023", "brats2015")
"""Order in which equivalent conventions are chosen when the label values cannot tell them apart."""

NIFTI_SUFFIXES: Tuple[str, ...] = (".nii.gz", ".nii")
PREDICTION_FILE_NAMES: Tuple[str, ...] = (
    "pred",
    "prediction",
    "predicted",
    "labelmap",
    "groundtruth",
    "ground_truth",
    "ref",
    "reference",
    "output",
)
"""Label-map file names of prediction tools, besides the label names of the release table (``brats_io.label_names``)."""


def label_file_suffixes() -> Tuple[str, ...]:
    """Every name a label-map file may end with: the release table's label names and :data:`PREDICTION_FILE_NAMES`."""
    return tuple(sorted(brats_io.label_names() | set(PREDICTION_FILE_NAMES)))


def _suffix_re() -> "re.Pattern[str]":
    names = sorted(label_file_suffixes(), key=len, reverse=True)
    return re.compile(r"[_\-.](" + "|".join(re.escape(n) for n in names) + r")$", re.IGNORECASE)


class ScoreError(ValueError):
    """Bad input for scoring (the message names the file or case and what is wrong)."""


# --------------------------------------------------------------------------------------------
# finding and matching files
# --------------------------------------------------------------------------------------------
def _strip_nifti(name: str) -> Optional[str]:
    low = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _is_sequence_file(stem: str) -> bool:
    """An MRI sequence file by its name (``_flair``, ``-t1n``; ``Flair_subtrMeanDivStd``, ``T1c`` of BraTS 2015 exports)."""
    return bool(SEQUENCE_SUFFIX_RE.search(stem)) or _name_token(stem) in SEQUENCE_ALIASES


def _named_as_label(stem: str) -> bool:
    """The file's name says label map (``_seg``, ``OTMultiClass``, ``segmentation``, ``_pred`` ...)."""
    names = label_file_suffixes()
    return stem.lower() in names or bool(_suffix_re().search(stem)) or _name_token(stem) in names


def case_id_from_path(path: Path | str) -> Optional[str]:
    """Case id of a label-map file, or ``None`` if the file is not a NIfTI label map.

    Strips ``.nii``/``.nii.gz`` and label-file suffixes (:func:`label_file_suffixes`: the label names of the
    release table, ``seg``, ``segmentation``, ``OTMultiClass`` ..., and ``pred``, ``prediction``, ``gt`` ...
    after ``_``, ``-`` or ``.``, any case; repeatedly), so ``<case>.nii.gz``, ``<case>_seg.nii.gz``,
    ``<case>-seg.nii.gz``, ``<case>_pred.nii.gz``, ``<case>_label.nii.gz`` ... all give ``<case>``. Returns
    ``None`` for MRI sequence files (``<case>_flair.nii.gz``, ``<case>-t2f.nii.gz``,
    ``Flair_subtrMeanDivStd.nii.gz`` ...). A file named only by a label name (``seg.nii.gz``,
    ``OTMultiClass.nii.gz``) takes the name of its folder.
    """
    path = Path(path)
    stem = _strip_nifti(path.name)
    if stem is None or _is_sequence_file(stem):
        return None
    if stem.lower() in label_file_suffixes():
        return path.parent.name or None
    suffix_re = _suffix_re()
    while True:
        stripped = suffix_re.sub("", stem)
        if stripped == stem or not stripped:
            break
        stem = stripped
    return stem


def _candidate_files(folder: Path, excluded: Optional[Path]) -> List[Tuple[Path, str]]:
    """``(path, case id)`` of the NIfTI files that may be label maps. In a case folder (one holding a file named
    as a label map of the folder's case: ``<case>/<case>_seg``, ``<case>/OTMultiClass``, ``<case>/segmentation``),
    the other files (brain masks, extra masks) are not label maps."""
    by_dir: Dict[Path, List[Tuple[Path, str, bool]]] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if excluded is not None and excluded in path.resolve().parents:
            continue
        case_id = case_id_from_path(path)
        if case_id is not None:
            by_dir.setdefault(path.parent, []).append((path, case_id, _named_as_label(_strip_nifti(path.name) or "")))
    out: List[Tuple[Path, str]] = []
    for folder_path, files in by_dir.items():
        case_folder = any(named and case_id.lower() == folder_path.name.lower() for _, case_id, named in files)
        out.extend((path, case_id) for path, case_id, named in files if named or not case_folder)
    return sorted(out)


def find_label_maps(
    folder: Path | str, role: str = "label map", exclude: Optional[Path | str] = None
) -> Dict[str, Path]:
    """Map case id -> label-map file for every NIfTI label map under ``folder`` (recursively).

    Case ids come from :func:`case_id_from_path`. The search is recursive, so a reference folder may be
    a BraTS release (``<case>/<case>_seg.nii.gz``, with or without ``HGG/``/``LGG/`` sub-folders) or a
    flat folder of label maps; the other files of a case folder that holds a label map (brain masks)
    are not label maps (:func:`_candidate_files`). Hidden files and folders, and anything under
    ``exclude`` (e.g. a prediction folder inside the reference folder), are left out. Raises
    :class:`ScoreError` when the folder does not exist, holds no label map, or two files give the same
    case id (ids compared without regard to case; predictions and references are matched the same way).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ScoreError(f"{role} folder {folder} does not exist or is not a folder.")
    excluded = Path(exclude).resolve() if exclude is not None else None
    if excluded is not None and (excluded == folder.resolve() or excluded in folder.resolve().parents):
        excluded = None  # the folder itself is inside the excluded one: nothing to leave out
    found: Dict[str, Path] = {}
    seen_lower: Dict[str, str] = {}
    for path, case_id in _candidate_files(folder, excluded):
        key = case_id.lower()
        if key in seen_lower:
            other = found[seen_lower[key]]
            raise ScoreError(
                f"{role} folder {folder}: two files for case {case_id!r}: {other.relative_to(folder)} and "
                f"{path.relative_to(folder)}; keep one label map per case."
            )
        seen_lower[key] = case_id
        found[case_id] = path
    if not found:
        raise ScoreError(
            f"{role} folder {folder} holds no NIfTI label map (.nii / .nii.gz; MRI sequence files are ignored)."
        )
    return found


# --------------------------------------------------------------------------------------------
# reading label maps
# --------------------------------------------------------------------------------------------
@dataclass
class LabelMapFile:
    """A label map read from disk: integer array (X, Y, Z), voxel spacing (mm) and affine."""

    path: Path
    array: np.ndarray
    spacing: Tuple[float, float, float]
    affine: np.ndarray


def read_label_map(path: Path | str) -> LabelMapFile:
    """Read a label map (:func:`brats_io.read_label_map`); raise :class:`ScoreError` naming the file if it is not one."""
    try:
        array, affine, spacing = brats_io.read_label_map(path)
    except (ValueError, OSError) as exc:  # "<path>: unreadable / not 3-D / not integer labels 0..255"
        raise ScoreError(f"cannot read label map {exc}") from None
    except ImportError as exc:  # nibabel, or SimpleITK for MetaImage
        raise ScoreError(str(exc)) from None
    return LabelMapFile(path=Path(path), array=array, spacing=spacing, affine=affine)


def label_values(array: np.ndarray) -> Set[int]:
    """Set of label values present in an integer label map."""
    counts = np.bincount(np.asarray(array, dtype=np.uint8).ravel(), minlength=1)
    return {int(v) for v in np.flatnonzero(counts)}


# --------------------------------------------------------------------------------------------
# label conventions
# --------------------------------------------------------------------------------------------
def fitting_conventions(values: Iterable[int]) -> List[str]:
    """Conventions (in :data:`CONVENTION_PREFERENCE` order) whose label set contains ``values``."""
    values = set(int(v) for v in values)
    return [name for name in CONVENTION_PREFERENCE if values <= set(LABEL_CONVENTIONS[name].valid_labels)]


def _regions_of(value: int, convention: str) -> Tuple[bool, ...]:
    conv = LABEL_CONVENTIONS[convention]
    return tuple(value in conv.regions[r] for r in REGIONS)


def conventions_agree(values: Iterable[int], conventions: Sequence[str]) -> bool:
    """True when every convention reads each of ``values`` into the same regions."""
    return all(len({_regions_of(v, c) for c in conventions}) == 1 for v in values if v != 0)


@dataclass
class ConventionChoice:
    """The label convention used for one folder and how it was chosen."""

    requested: str
    used: str
    note: str

    def to_dict(self) -> Dict[str, str]:
        return {"requested": self.requested, "used": self.used, "note": self.note}


def _fmt_values(values: Iterable[int]) -> str:
    return "{" + ", ".join(str(v) for v in sorted(values)) + "}"


def resolve_convention(
    value_sets: Sequence[Iterable[int]],
    role: str,
    flag: str,
    fallback: Optional[str] = None,
    fallback_role: str = "reference",
    fallback_if_ambiguous: bool = True,
) -> ConventionChoice:
    """Choose the label convention of a folder from the label values of each of its files.

    The folder's candidates are the conventions that fit every file. One candidate is used when a
    file pins it down on its own (e.g. labels 3 and 4 together: brats2015); a single candidate
    reached only by combining files (label 4 in some files, label 3 in others, never together)
    more likely means a folder mixing brats2017 and brats2023 maps and counts as ambiguous.
    Several candidates that read every value present into the same regions are equivalent.
    ``fallback`` (the other folder's convention) is used for an ambiguous folder when it is a
    candidate (with ``fallback_if_ambiguous=False`` only if the candidates are equivalent).
    Raises :class:`ScoreError` when no convention fits, or when the choice would be a guess.
    """
    sets = [set(int(v) for v in vs) for vs in value_sets]
    values = set().union(*sets) if sets else {0}
    shown = _fmt_values(values)
    per_file = [set(fitting_conventions(vs)) for vs in sets] or [set(CONVENTION_PREFERENCE)]
    candidates = [c for c in CONVENTION_PREFERENCE if all(c in fits for fits in per_file)]
    if not candidates:
        raise ScoreError(
            f"{role} label values {shown} fit no single label convention ({', '.join(CONVENTION_PREFERENCE)}). "
            f"Pass {flag}; files that do not fit it are then reported."
        )
    pinned = any(len(fits) == 1 for fits in per_file)
    if len(candidates) == 1 and pinned:
        return ConventionChoice(AUTO, candidates[0], f"inferred from the {role} label values {shown}")
    if len(candidates) == 1:
        alternatives = [c for c in CONVENTION_PREFERENCE if any(c in fits for fits in per_file)]
        same = False
        others = f"{candidates[0]} only as a folder; no single file tells, and its files also fit " + ", ".join(
            c for c in alternatives if c != candidates[0]
        )
    else:
        same = conventions_agree(values, candidates)
        others = ", ".join(candidates)
    if fallback is not None and fallback in candidates and (same or fallback_if_ambiguous):
        why = "all of them read these labels into the same regions" if same else "they read these labels differently"
        return ConventionChoice(
            AUTO,
            fallback,
            f"{role} label values {shown} fit {others} ({why}); using the {fallback_role} convention {fallback}",
        )
    if same:
        return ConventionChoice(
            AUTO,
            candidates[0],
            f"{role} label values {shown} fit {others}, which all read these labels into the same regions; "
            f"using {candidates[0]}",
        )
    raise ScoreError(
        f"{role} label values {shown} are ambiguous: they fit {others}, which read them into different regions "
        f"(label 3 is enhancing tumour in brats2023 but non-enhancing tumour core in brats2015; label 4 is "
        f"enhancing tumour in brats2017 and brats2015). Pass {flag}."
    )


def _convention_arg(value: str) -> str:
    if value.strip().lower() == AUTO:
        return AUTO
    try:
        return get_label_convention(value).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------
@dataclass
class ScoreReport:
    """Everything ``emrfuse score`` writes: per-case rows and the summary."""

    rows: List[Dict[str, Any]]
    summary: Dict[str, Any]
    warnings: List[str] = field(default_factory=list)


def affine_difference(pred_affine: np.ndarray, ref_affine: np.ndarray, spacing: Sequence[float]) -> str:
    """How two label maps' affines differ: ``""`` when they are the same grid, else e.g. ``"origin shifted by
    51.3 mm"`` and/or ``"orientation differs"``.

    The whole affine is compared: the orientation (direction cosines) and the origin, which may differ by at
    most a hundredth of the smallest voxel (rounding in the headers). Spacing is compared separately.
    """
    pred_affine, ref_affine = np.asarray(pred_affine, dtype=np.float64), np.asarray(ref_affine, dtype=np.float64)
    parts = []
    rot_p = pred_affine[:3, :3] / np.asarray(brats_io.affine_spacing(pred_affine))
    rot_r = ref_affine[:3, :3] / np.asarray(brats_io.affine_spacing(ref_affine))
    if not np.allclose(rot_p, rot_r, atol=1e-3):
        parts.append("orientation differs")
    shift = float(np.linalg.norm(pred_affine[:3, 3] - ref_affine[:3, 3]))
    if shift > 0.01 * min(float(s) for s in spacing):
        parts.append(f"origin shifted by {shift:.1f} mm")
    return ", ".join(parts)


def _progress(iterable: Iterable[Any], desc: str, total: int, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="case", file=sys.stderr)


def _match_cases(pred_dir: Path, ref_dir: Path, missing_as_empty: bool):
    """``(matched (case, prediction or None, reference), missing case ids, unmatched predictions)``.

    A reference without a prediction is listed as missing and left out of ``matched``, unless
    ``missing_as_empty`` keeps it (prediction ``None``: scored as an empty prediction).
    """
    refs = find_label_maps(ref_dir, "reference", exclude=pred_dir)
    preds = find_label_maps(pred_dir, "prediction", exclude=ref_dir)
    pred_by_key = {k.lower(): k for k in preds}
    ref_keys = {k.lower() for k in refs}
    matched: List[Tuple[str, Optional[Path], Path]] = []
    missing: List[str] = []
    for case_id, ref_path in refs.items():
        pkey = pred_by_key.get(case_id.lower())
        if pkey is None:
            missing.append(case_id)
            if missing_as_empty:
                matched.append((case_id, None, ref_path))
        else:
            matched.append((case_id, preds[pkey], ref_path))
    unmatched = sorted(k for k in preds if k.lower() not in ref_keys)
    if not matched:
        raise ScoreError(
            f"no prediction in {pred_dir} matches a reference case in {ref_dir} "
            f"(e.g. predictions {sorted(preds)[:3]}, references {sorted(refs)[:3]})."
        )
    return matched, missing, unmatched


@dataclass
class _Failures:
    """Cases that cannot be scored: raised, or recorded with ``skip_invalid``."""

    skip_invalid: bool
    skipped: List[Dict[str, str]] = field(default_factory=list)

    def __call__(self, case_id: str, message: str) -> None:
        if not self.skip_invalid:
            raise ScoreError(f"case {case_id}: {message}")
        self.skipped.append({"case_id": case_id, "reason": message})


def _fitting_values(path: Path) -> Set[int]:
    vals = label_values(read_label_map(path).array)
    if not fitting_conventions(vals):
        raise ScoreError(f"{path}: label values {_fmt_values(vals)} fit no label convention.")
    return vals


def _choose_conventions(matched, pred_convention: str, ref_convention: str, fail: _Failures, progress: bool):
    """The label convention of each folder (inferred from all its files when ``auto``) and the cases whose files
    could not be read: ``(pred choice, ref choice, bad case ids)``.

    Conventions (``brats2015``, ``brats2017``, ``brats2023``, see :mod:`modeling_emrfuse.brats_labels`) are
    given per folder or inferred from the label values of all files of that folder
    (:func:`resolve_convention`):

    - a single convention fits all values: it is used;
    - several fit but read every value present into the same regions (e.g. only labels {1, 2}, or
      {1, 2, 4} under brats2017 and brats2015): the reference's convention is used for the
      predictions (else :data:`CONVENTION_PREFERENCE` order); the choice and why it does not matter
      go into the note printed and written to the summary;
    - several fit and they disagree (labels {1, 2, 3} without 4: brats2023 enhancing tumour or
      brats2015 non-enhancing tumour): the predictions take the reference's convention if it is one
      of them (said so in the note); otherwise, and always for the references, :class:`ScoreError`
      asks for ``--pred-convention`` / ``--ref-convention``.
    """
    bad: Set[str] = set()
    ref_values: List[Set[int]] = []
    pred_values: List[Set[int]] = []
    if AUTO in (pred_convention, ref_convention):
        for case_id, pred_path, ref_path in _progress(matched, "reading labels", len(matched), progress):
            try:
                if ref_convention == AUTO:
                    ref_values.append(_fitting_values(ref_path))
                if pred_convention == AUTO and pred_path is not None:
                    pred_values.append(_fitting_values(pred_path))
            except ScoreError as exc:
                fail(case_id, str(exc))
                bad.add(case_id)
    if ref_convention == AUTO:
        explicit_pred = None if pred_convention == AUTO else pred_convention
        ref_choice = resolve_convention(
            ref_values, "reference", "--ref-convention", explicit_pred, "prediction", fallback_if_ambiguous=False
        )
    else:
        ref_choice = ConventionChoice(ref_convention, ref_convention, "given")
    if pred_convention != AUTO:
        pred_choice = ConventionChoice(pred_convention, pred_convention, "given")
    elif pred_values:
        pred_choice = resolve_convention(pred_values, "prediction", "--pred-convention", ref_choice.used)
    else:
        pred_choice = ConventionChoice(AUTO, ref_choice.used, "no prediction file; using the reference convention")
    return pred_choice, ref_choice, bad


def _prediction_on_grid(case_id: str, pred_path: Optional[Path], ref: LabelMapFile, warnings: List[str]) -> np.ndarray:
    """The prediction's array (zeros when missing); a different shape or spacing is an error, another
    orientation or origin a warning.

    The voxel spacing comes from the reference header (its affine). A prediction whose orientation
    differs or whose origin is shifted gets a warning naming the case and the shift in mm
    (:func:`affine_difference`); voxels are compared index by index.
    """
    if pred_path is None:
        return np.zeros_like(ref.array)
    pred = read_label_map(pred_path)
    if pred.array.shape != ref.array.shape:
        raise ScoreError(
            f"prediction {pred_path} has shape {pred.array.shape}, reference {ref.path} has "
            f"{ref.array.shape}; predictions must be on the reference grid."
        )
    if not np.allclose(pred.spacing, ref.spacing, rtol=1e-3, atol=1e-4):
        raise ScoreError(
            f"prediction {pred_path} has voxel spacing {pred.spacing} mm, reference {ref.path} has "
            f"{ref.spacing} mm; predictions must be on the reference grid."
        )
    difference = affine_difference(pred.affine, ref.affine, ref.spacing)
    if difference:
        warnings.append(
            f"case {case_id}: the prediction's affine differs from the reference's ({difference}); "
            f"voxels are compared index by index, so the scores assume the prediction is on the "
            f"reference grid"
        )
    return pred.array


def _score_case(
    case_id: str,
    pred_path: Optional[Path],
    ref_path: Path,
    pred_choice: ConventionChoice,
    ref_choice: ConventionChoice,
    lesion_wise: bool,
    warnings: List[str],
) -> Dict[str, Any]:
    """One row of ``per_case.csv``; raises :class:`ScoreError` / ``ValueError`` for a case that cannot be scored."""
    ref = read_label_map(ref_path)
    pred_array = _prediction_on_grid(case_id, pred_path, ref, warnings)
    result = score_label_maps(
        pred_array, ref.array, pred_choice.used, ref_choice.used, ref.spacing, lesion_wise=lesion_wise
    )
    row: Dict[str, Any] = {
        "case_id": case_id,
        "prediction": "" if pred_path is None else str(pred_path),
        "reference": str(ref_path),
        "prediction_missing": pred_path is None,
        "pred_convention": pred_choice.used,
        "ref_convention": ref_choice.used,
        "spacing_x": ref.spacing[0],
        "spacing_y": ref.spacing[1],
        "spacing_z": ref.spacing[2],
    }
    row.update(metrics_to_row(result))
    return row


def score_folders(
    pred_dir: Path | str,
    ref_dir: Path | str,
    pred_convention: str = AUTO,
    ref_convention: str = AUTO,
    missing_as_empty: bool = False,
    skip_invalid: bool = False,
    progress: bool = True,
    lesion_wise: bool = False,
) -> ScoreReport:
    """Score every reference case against its prediction (matching: :func:`_match_cases`; conventions:
    :func:`_choose_conventions`; grid: :func:`_prediction_on_grid`).

    Raises :class:`ScoreError` for bad input (missing folders, no matching case, ambiguous label
    conventions, shape / spacing mismatches, invalid label values; the last ones are recorded
    and skipped instead with ``skip_invalid=True``). ``lesion_wise=True`` adds the lesion-wise
    metrics (raises :class:`~modeling_emrfuse.evaluation.lesion_metrics.LesionMetricsUnavailable` at once
    without panoptica).
    """
    if lesion_wise:
        brats_lesion_evaluator()  # fail before reading anything when panoptica is missing
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    if pred_convention != AUTO:
        pred_convention = get_label_convention(pred_convention).name
    if ref_convention != AUTO:
        ref_convention = get_label_convention(ref_convention).name
    matched, missing, unmatched = _match_cases(pred_dir, ref_dir, missing_as_empty)
    fail = _Failures(skip_invalid)
    warnings: List[str] = []
    pred_choice, ref_choice, bad = _choose_conventions(matched, pred_convention, ref_convention, fail, progress)
    rows: List[Dict[str, Any]] = []
    for case_id, pred_path, ref_path in _progress(matched, "scoring", len(matched), progress):
        if case_id in bad:
            continue
        try:
            rows.append(_score_case(case_id, pred_path, ref_path, pred_choice, ref_choice, lesion_wise, warnings))
        except ScoreError as exc:
            fail(case_id, str(exc))
        except ValueError as exc:  # label values outside the convention
            fail(case_id, f"{exc} (prediction {pred_path}, reference {ref_path})")
    if not rows:
        raise ScoreError(
            "no case could be scored: " + "; ".join(f"{s['case_id']}: {s['reason']}" for s in fail.skipped)
        )
    summary: Dict[str, Any] = {
        "num_cases": len(rows),
        "segmentation": summarize_segmentation(rows),
        "lesion_wise": bool(lesion_wise),
        "prediction_dir": str(pred_dir),
        "reference_dir": str(ref_dir),
        "pred_convention": pred_choice.to_dict(),
        "ref_convention": ref_choice.to_dict(),
        "missing_predictions": missing,
        "missing_counted_as_empty": bool(missing_as_empty),
        "unmatched_predictions": unmatched,
        "skipped": fail.skipped,
        "warnings": warnings,
        "hd95_empty_sentinel_mm": float(HD95_EMPTY_SENTINEL_MM),
        "std": "sample standard deviation (ddof=1) over cases; null for a single case",
    }
    return ScoreReport(rows=rows, summary=summary, warnings=warnings)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def header_lines(summary: Mapping[str, Any]) -> List[str]:
    """The lines above the tables in ``summary.md``: cases, conventions, missing / unmatched / skipped cases."""
    pc, rc = summary["pred_convention"], summary["ref_convention"]
    out = [
        f"cases scored: {summary['num_cases']}",
        f"prediction labels: {pc['used']} ({pc['note']})",
        f"reference labels: {rc['used']} ({rc['note']})",
        "values: mean ± std (median) over cases; Dice, PPV and sensitivity in percent; HD95 in mm "
        f"({summary['hd95_empty_sentinel_mm']:.2f} mm when exactly one of prediction / reference is empty)",
    ]
    missing = summary["missing_predictions"]
    if missing:
        how = "scored as empty predictions" if summary["missing_counted_as_empty"] else "not scored"
        out.append(f"references without a prediction ({how}): {len(missing)}: {', '.join(missing)}")
    if summary["unmatched_predictions"]:
        out.append(f"predictions without a reference (not scored): {', '.join(summary['unmatched_predictions'])}")
    if summary["skipped"]:
        out.append(f"skipped (invalid): {', '.join(s['case_id'] for s in summary['skipped'])}")
    return out


def write_report(report: ScoreReport, out_dir: Path | str) -> Dict[str, Path]:
    """Write the evaluation report (:func:`~modeling_emrfuse.evaluation.report.write_evaluation_report`) into
    ``out_dir``: ``per_case.csv``, ``summary.json``, ``summary.md`` and ``dice_boxplot.png``."""
    return write_evaluation_report(
        out_dir, report.rows, report.summary, title="Segmentation scores", header_lines=header_lines(report.summary)
    )


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``emrfuse score`` on the ``emrfuse`` command's sub-parsers."""
    conventions = ", ".join([AUTO] + list(CONVENTION_PREFERENCE))
    parser = subparsers.add_parser(
        "score",
        help="score predicted NIfTI label maps against references (Dice, PPV, sensitivity, HD95 per region)",
        description=(
            "Score a folder of predicted NIfTI label maps against a folder of reference label maps, matched by "
            "case id, per region (WT, TC, ET). Writes " + ", ".join(OUTPUT_FILES.values()) + " and dice_boxplot.png."
        ),
    )
    parser.add_argument("--pred", required=True, type=Path, metavar="DIR", help="folder of predicted label maps")
    parser.add_argument(
        "--ref",
        required=True,
        type=Path,
        metavar="DIR",
        help="folder of reference label maps (BraTS case folders or flat)",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument(
        "--pred-convention",
        default=AUTO,
        type=_convention_arg,
        metavar="CONV",
        help=f"label convention of the predictions: {conventions} or a BraTS release year (default: auto)",
    )
    parser.add_argument(
        "--ref-convention",
        default=AUTO,
        type=_convention_arg,
        metavar="CONV",
        help=f"label convention of the references: {conventions} or a BraTS release year (default: auto)",
    )
    parser.add_argument(
        "--missing-as-empty",
        action="store_true",
        help="score references without a prediction as empty predictions (default: list them, leave them out)",
    )
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip cases with invalid files (recorded in summary.json) instead of stopping",
    )
    parser.add_argument(
        "--lesion-wise",
        action="store_true",
        help="also compute the BraTS 2023+ lesion-wise metrics per region (tp, fp, fn, sq_dsc, pq_dsc, sq_hd95; "
        'panoptica configured as the official BraTS evaluation; needs pip install "emrfuse[lesion]"; '
        "about a second per full-size case)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``emrfuse score``; returns the exit status (2 on bad input, with a message on stderr)."""
    try:
        report = score_folders(
            args.pred,
            args.ref,
            pred_convention=args.pred_convention,
            ref_convention=args.ref_convention,
            missing_as_empty=args.missing_as_empty,
            skip_invalid=args.skip_invalid,
            progress=not args.no_progress,
            lesion_wise=args.lesion_wise,
        )
        paths = write_report(report, args.out)
    except (ScoreError, ValueError, OSError, LesionMetricsUnavailable) as exc:
        print(f"emrfuse score: error: {exc}", file=sys.stderr)
        return 2
    s = report.summary
    for side in ("ref_convention", "pred_convention"):
        if s[side]["requested"] == AUTO:
            print(f"{side.replace('_', ' ')}: {s[side]['used']} ({s[side]['note']})", file=sys.stderr)
    if s["missing_predictions"]:
        how = (
            "scored as empty predictions"
            if s["missing_counted_as_empty"]
            else "NOT scored (use --missing-as-empty to count them)"
        )
        print(
            f"warning: {len(s['missing_predictions'])} reference case(s) without a prediction, {how}: "
            f"{', '.join(s['missing_predictions'])}",
            file=sys.stderr,
        )
    if s["unmatched_predictions"]:
        print(
            f"warning: {len(s['unmatched_predictions'])} prediction(s) without a reference, not scored: "
            f"{', '.join(s['unmatched_predictions'])}",
            file=sys.stderr,
        )
    for skipped in s["skipped"]:
        print(f"warning: skipped case {skipped['case_id']}: {skipped['reason']}", file=sys.stderr)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(format_segmentation_table(s["segmentation"]))
    if has_lesion_metrics(report.rows):
        print("\nLesion-wise (BraTS 2023+):\n" + format_lesion_table(s["segmentation"]))
    print(f"{s['num_cases']} case(s) scored; wrote {', '.join(str(p) for p in paths.values())}")
    return 0
