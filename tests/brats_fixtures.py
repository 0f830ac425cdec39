"""Tiny BraTS cases in every on-disk layout, written by the tests themselves (8 x 8 x 6 volumes).

Each ``write_*`` function writes one case folder in the naming of one release and returns the
case folder. Volumes are int16 "brains" (non-zero everywhere except a one-voxel border) and label
maps use the release's label convention, so that every check of the builder passes on them;
tests then break one thing at a time.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

SHAPE: Tuple[int, int, int] = (8, 8, 6)
SEQ_2017 = ("flair", "t1", "t1ce", "t2")
SEQ_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
SEQ_2015 = {"t1": "MR_T1", "t1ce": "MR_T1c", "t2": "MR_T2", "flair": "MR_Flair"}
LABELS = {"brats2015": (1, 2, 3, 4), "brats2017": (1, 2, 4), "brats2023": (1, 2, 3)}


def volume(seed: int = 0, shape: Sequence[int] = SHAPE, dtype=np.int16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = np.zeros(shape, dtype=dtype)
    arr[1:-1, 1:-1, 1:-1] = rng.integers(50, 1000, size=tuple(s - 2 for s in shape))
    return arr


def label_map(convention: str = "brats2017", shape: Sequence[int] = SHAPE) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint8)
    values = LABELS[convention]
    for i, v in enumerate(values):
        lab[2 + i % 4, 2:5, 2 + i % 3] = v
    return lab


def write_nifti(path: Path, array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    img = nib.Nifti1Image(array, affine)
    img.header.set_zooms(tuple(spacing))
    nib.save(img, str(path))
    return path


def write_mha(path: Path, array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Path:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))  # (X,Y,Z) -> (Z,Y,X)
    image.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(image, str(path))
    return path


def _write_report(case_dir: Path, case_id: str, report: Optional[str]) -> None:
    if report is not None:
        (case_dir / f"{case_id}_flair_text.txt").write_text(report, encoding="utf-8")


def write_case_2017(
    root: Path, case_id: str, grade: str = "HGG", seed: int = 0, labeled: bool = True, report: Optional[str] = None
) -> Path:
    """``{HGG,LGG}/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` (BraTS 2017/2018/2019)."""
    case_dir = Path(root) / grade / case_id
    for i, seq in enumerate(SEQ_2017):
        write_nifti(case_dir / f"{case_id}_{seq}.nii.gz", volume(seed * 10 + i))
    if labeled:
        write_nifti(case_dir / f"{case_id}_seg.nii.gz", label_map("brats2017"))
    _write_report(case_dir, case_id, report)
    return case_dir


def write_case_2020(
    root: Path,
    case_id: str,
    seed: int = 0,
    ext: str = ".nii.gz",
    labeled: bool = True,
    label_name: Optional[str] = None,
    report: Optional[str] = None,
) -> Path:
    """Flat ``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii[.gz]`` (BraTS 2020; grade in name_mapping.csv)."""
    case_dir = Path(root) / case_id
    for i, seq in enumerate(SEQ_2017):
        write_nifti(case_dir / f"{case_id}_{seq}{ext}", volume(seed * 10 + i))
    if labeled:
        write_nifti(case_dir / (label_name or f"{case_id}_seg{ext}"), label_map("brats2017"))
    _write_report(case_dir, case_id, report)
    return case_dir


def write_name_mapping(root: Path, grades: Dict[str, str], name: str = "name_mapping.csv") -> Path:
    """A BraTS 2020 ``name_mapping.csv`` (columns as in the release)."""
    path = Path(root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "Grade",
                "BraTS_2017_subject_ID",
                "BraTS_2018_subject_ID",
                "TCGA_TCIA_subject_ID",
                "BraTS_2019_subject_ID",
                "BraTS_2020_subject_ID",
            ]
        )
        for i, (case_id, grade) in enumerate(sorted(grades.items())):
            writer.writerow([grade, "NA", f"Brats18_X_{i}", "NA", f"BraTS19_X_{i}", case_id])
    return path


def write_case_2021(root: Path, case_id: str, seed: int = 0, labeled: bool = True) -> Path:
    """Flat ``BraTS2021_XXXXX/BraTS2021_XXXXX_{flair,t1,t1ce,t2,seg}.nii.gz``."""
    return write_case_2020(root, case_id, seed=seed, labeled=labeled)


def write_case_2023(
    root: Path, case_id: str, seed: int = 0, labeled: bool = True, report: Optional[str] = None
) -> Path:
    """Flat ``BraTS-GLI-XXXXX-XXX/BraTS-GLI-XXXXX-XXX-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (labels 1/2/3)."""
    case_dir = Path(root) / case_id
    for i, seq in enumerate(SEQ_2023.values()):
        write_nifti(case_dir / f"{case_id}-{seq}.nii.gz", volume(seed * 10 + i))
    if labeled:
        write_nifti(case_dir / f"{case_id}-seg.nii.gz", label_map("brats2023"))
    _write_report(case_dir, case_id, report)
    return case_dir


def write_case_2015(
    root: Path, case_id: str, grade: str = "HGG", seed: int = 0, labeled: bool = True, first_id: int = 1000
) -> Path:
    """``{HGG,LGG}/<case>/VSD.Brain.XX.O.MR_*.<id>/VSD.Brain.XX.O.MR_*.<id>.mha`` + ``VSD.Brain_3more.XX.O.OT.<id>``."""
    case_dir = Path(root) / grade / case_id
    vsd_id = first_id
    for i, kind in enumerate(SEQ_2015.values()):
        name = f"VSD.Brain.XX.O.{kind}.{vsd_id}"
        write_mha(case_dir / name / f"{name}.mha", volume(seed * 10 + i))
        vsd_id += 1
    if labeled:
        name = f"VSD.Brain_3more.XX.O.OT.{vsd_id}"
        write_mha(case_dir / name / f"{name}.mha", label_map("brats2015"))
    return case_dir


def write_reports_jsonl(path: Path, reports: Dict[str, str], id_key: str = "case_id", text_key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for case_id, text in reports.items():
            fh.write(json.dumps({id_key: case_id, text_key: text}) + "\n")
    return path


def write_reports_csv(path: Path, reports: Dict[str, str], id_key: str = "id", text_key: str = "report") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([id_key, text_key])
        for case_id, text in reports.items():
            writer.writerow([case_id, text])
    return path


def fake_report(case_id: str, words: int = 12) -> str:
    """A neutral fake report (never printed by the code under test)."""
    return f"Report for {case_id}: " + " ".join(["finding"] * words) + "."


def write_2020_release(root: Path, grades: Dict[str, str], reports: bool = True, seed: int = 0) -> Path:
    """Several BraTS 2020 cases + name_mapping.csv (+ TextBraTS per-case reports)."""
    for i, case_id in enumerate(sorted(grades)):
        write_case_2020(root, case_id, seed=seed + i, report=fake_report(case_id) if reports else None)
    write_name_mapping(root, grades)
    return Path(root)


def ids(prefix: str, n: int, start: int = 1) -> Iterable[str]:
    return [f"{prefix}{i:03d}" for i in range(start, start + n)]
