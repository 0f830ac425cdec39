"""BraTS case input/output: find the cases of any release, read their volumes, write label maps.

The one home of everything that touches BraTS files on disk; the pipeline, ``emrfuse predict``,
``emrfuse score``, the image processor, the Space and the dataset builder all use it: discovery
(:func:`discover_cases`, :func:`discover_folders` -> :class:`CaseFiles`; a folder named ``HGG_LGG``
holds cases of unknown grade), reading (:func:`read_volume`, :func:`read_reports`, :func:`load_case`
-> :class:`LoadedCase`, the pipeline's input), writing (:func:`write_label_map`) and the naming rules.
Releases are data: :data:`RELEASES` holds one :class:`Release` entry per BraTS release, read by
discovery, the naming rules, patient ids and ``emrfuse score``'s label-file matching; adding a release is
one :func:`register_release` call, and :func:`release_table_markdown` renders the README's table.

This file travels to the Hub with the model code (the pipeline and the processor import it): at module
level it imports only the standard library, numpy and its sibling ``brats_labels``; nibabel and
SimpleITK are imported where a file is read or written.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import secrets
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .brats_labels import (
    GRADES,
    SEQUENCE_ALIASES,
    SEQUENCES,
    canonical_sequence_name,
    get_label_convention,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CaseFiles",
    "CaseList",
    "SkippedCase",
    "Volume",
    "KNOWN_RELEASES",
    "RELEASES",
    "Release",
    "register_release",
    "release_table_markdown",
    "label_names",
    "named_like",
    "release_from_file_names",
    "group_patients",
    "patient_groups",
    "earlier_release_id",
    "tumour_fingerprint",
    "discover_cases",
    "discover_folders",
    "detect_release",
    "patient_id_for",
    "read_volume",
    "read_volume_and_header",
    "read_header",
    "read_label_map",
    "to_nifti_image",
    "volume_suffix",
    "write_label_map",
    "is_brats2023_naming",
    "label_convention_from_file_names",
    "case_id_from_file_names",
    "SEQUENCE_SUFFIX_RE",
    "read_reports",
    "affine_spacing",
    "GeometryWarning",
    "LoadedCase",
    "load_case",
]

VOLUME_SUFFIXES: Tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd")
GRADE_FOLDERS = {"HGG": "HGG", "LGG": "LGG", "HGG_LGG": None}
REPORT_SUFFIX = "_text.txt"
ON_ERROR_CHOICES = ("raise", "skip")

SEQUENCE_SUFFIX_RE = re.compile(
    r"[_\-.](" + "|".join(re.escape(k) for k in sorted(SEQUENCE_ALIASES, key=len, reverse=True)) + r")$", re.IGNORECASE
)
"""A file stem's trailing sequence name (``_t1ce``, ``-t2f``, ``.flair``; any alias, any case)."""


# --------------------------------------------------------------------------------------------
# data classes
# --------------------------------------------------------------------------------------------
@dataclass
class CaseFiles:
    """The files of one BraTS case (paths only; nothing is read).

    Attributes:
        case_id: the case identifier (the case folder name, e.g. ``BraTS20_Training_001``).
        release: BraTS release as a year string (``"2015"``, ``"2018"``, ``"2020"``, ``"2023"``...).
        label_convention: label convention name (``"brats2015"``, ``"brats2017"``, ``"brats2023"``).
        grade: ``"HGG"``, ``"LGG"`` or ``None`` when the release/layout gives no grade.
        sequences: canonical sequence name (:data:`~modeling_emrfuse.brats_labels.SEQUENCES`) -> path.
        label: path of the label map, ``None`` for unlabeled cases.
        report_path: path of a per-case report (TextBraTS ``<case>_flair_text.txt``) or ``None``.
        source_dir: the case folder.
        patient_id: the patient, for patient-level splits: by default what the case id names
            (:func:`patient_id_for`); discovery with ``check_files`` (:func:`discover_folders`) gives the
            cases with identical tumour masks one patient id (:func:`group_patients`).
    """

    case_id: str
    release: str
    label_convention: str
    grade: Optional[str]
    sequences: Dict[str, Path]
    label: Optional[Path] = None
    report_path: Optional[Path] = None
    source_dir: Optional[Path] = None
    patient_id: Optional[str] = None

    def __post_init__(self) -> None:
        if self.patient_id is None:
            self.patient_id = patient_id_for(self.case_id, self.release)

    @property
    def has_label(self) -> bool:
        return self.label is not None

    @property
    def missing_sequences(self) -> List[str]:
        """Canonical names of the sequences this case lacks (empty for a complete case)."""
        return [name for name in SEQUENCES if name not in self.sequences]

    def files(self) -> List[Tuple[str, Path]]:
        """``(name, path)`` for every volume of the case: the sequences in canonical order, then ``seg``."""
        out = [(name, self.sequences[name]) for name in SEQUENCES if name in self.sequences]
        if self.label is not None:
            out.append(("seg", self.label))
        return out

    def to_dict(self) -> dict:
        """JSON-able dict (paths as strings)."""
        return {
            "case_id": self.case_id,
            "release": self.release,
            "label_convention": self.label_convention,
            "grade": self.grade,
            "sequences": {k: str(v) for k, v in self.sequences.items()},
            "label": None if self.label is None else str(self.label),
            "report_path": None if self.report_path is None else str(self.report_path),
            "source_dir": None if self.source_dir is None else str(self.source_dir),
            "patient_id": self.patient_id,
        }


@dataclass(frozen=True)
class SkippedCase:
    """A case left out with ``on_error="skip"``: which case, which file, and why."""

    case_id: str
    path: str
    reason: str

    def to_dict(self) -> dict:
        return {"case_id": self.case_id, "path": self.path, "reason": self.reason}


class CaseList(list):
    """The list of :class:`CaseFiles` that :func:`discover_cases` returns.

    A plain ``list`` with three extra attributes: ``release`` (the detected or forced release),
    ``skipped`` (:class:`SkippedCase` entries, filled with ``on_error="skip"``) and ``warnings``
    (``(case_id, message)`` pairs: odd label names, cases missing from ``name_mapping.csv``,
    folders that hold no volume).
    """

    def __init__(self, items: Iterable[CaseFiles] = (), *, release: Optional[str] = None):
        super().__init__(items)
        self.release = release
        self.skipped: List[SkippedCase] = []
        self.warnings: List[Tuple[str, str]] = []
        self.releases: Dict[str, str] = {}


class Volume(NamedTuple):
    """A volume read by :func:`read_volume`: unpack as ``array, affine, spacing = read_volume(path)``."""

    array: np.ndarray
    """Voxel array in the file's own dtype, shape (X, Y, Z) as nibabel gives BraTS NIfTI."""
    affine: np.ndarray
    """4 x 4 voxel -> world (RAS+, nibabel convention) affine."""
    spacing: Tuple[float, float, float]
    """Voxel size in mm along X, Y, Z: the column lengths of ``affine`` (:func:`affine_spacing`; for NIfTI the
    sform when it is set, never ``pixdim`` alone, so that spacing and output geometry cannot disagree)."""


# --------------------------------------------------------------------------------------------
# reading volumes
# --------------------------------------------------------------------------------------------
def volume_suffix(path: Path | str) -> Optional[str]:
    """The volume suffix of ``path`` (``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``) or ``None``."""
    name = Path(path).name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def _stem(path: Path) -> str:
    suffix = volume_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def _import_nibabel(path: Path | str):
    try:  # inside try: transformers does not make nibabel a requirement of the Hub code
        import nibabel as nib
    except ImportError as exc:  # pragma: no cover - exercised by monkeypatching in the tests
        raise ImportError(f"Reading or writing {path} needs nibabel: pip install nibabel") from exc
    return nib


def _import_simpleitk():
    try:
        import SimpleITK as sitk  # noqa: N813
    except ImportError as exc:  # pragma: no cover - exercised by monkeypatching in the tests
        raise ImportError(
            "Reading MetaImage (.mha/.mhd) files, e.g. BraTS 2015, needs SimpleITK, an optional extra: "
            'pip install "emrfuse[mha]"'
        ) from exc
    return sitk


# LPS (ITK) <-> RAS (nibabel) world coordinates
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _sitk_affine(direction: Sequence[float], spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """nibabel-style (RAS+) affine of a SimpleITK image (or image header) indexed as (X, Y, Z)."""
    affine = np.eye(4)
    affine[:3, :3] = (
        _LPS_TO_RAS @ np.asarray(direction, dtype=float).reshape(3, 3) @ np.diag(np.asarray(spacing, dtype=float))
    )
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(origin, dtype=float)
    return affine


def _squeeze_to_3d(array: np.ndarray, path: Path) -> np.ndarray:
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got an array of shape {array.shape}.")
    return array


def _volume_file(path: Path | str) -> Tuple[Path, Optional[str]]:
    """``(path, volume suffix or None)``; ``FileNotFoundError`` naming the file if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: volume file not found.")
    return path, volume_suffix(path)


class GeometryWarning(UserWarning):
    """A volume's header is ambiguous about its geometry (e.g. qform and sform disagree); the message names the
    file and what is used. The pipeline puts these into its result's ``warnings``."""


def affine_spacing(affine: np.ndarray) -> Tuple[float, float, float]:
    """Voxel size in mm along the three voxel axes of a 4 x 4 affine (the lengths of its columns)."""
    affine = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


SHEAR_TOLERANCE_DEGREES = 0.5
"""Largest angle (degrees) by which two voxel axes of an affine may depart from perpendicular before a case is
reported as sheared (:func:`affine_shear_degrees`); float32 headers of BraTS scans stay below 1e-4 degrees."""


def affine_voxel_volume(affine: np.ndarray) -> float:
    """Volume of one voxel in mm^3: ``|det|`` of the affine's 3 x 3 part (exact also for a sheared affine, where the
    product of the column lengths, :func:`affine_spacing`, overstates it)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def affine_shear_degrees(affine: np.ndarray) -> float:
    """How far (degrees) the most skewed pair of voxel axes of a 4 x 4 affine is from perpendicular (0 for any
    rotation, flip or scaling)."""
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(columns, axis=0)
    if np.any(norms == 0):
        return 90.0
    unit = columns / norms
    cosines = [abs(float(unit[:, i] @ unit[:, j])) for i, j in ((0, 1), (0, 2), (1, 2))]
    return float(np.degrees(np.arcsin(min(1.0, max(cosines)))))


def check_shear(affine: np.ndarray, where: str, tolerance: float = SHEAR_TOLERANCE_DEGREES) -> None:
    """A :class:`GeometryWarning` naming ``where`` when the affine's voxel axes are sheared beyond ``tolerance``
    degrees: volumes use ``|det|`` (:func:`affine_voxel_volume`), and the model sees the voxels unsheared."""
    degrees = affine_shear_degrees(affine)
    if degrees > tolerance:
        product = float(np.prod(affine_spacing(affine)))
        warnings.warn(
            f"{where}: the affine is sheared (voxel axes {degrees:.2f} degrees from perpendicular, more than "
            f"{tolerance} degrees): region volumes use its determinant ({affine_voxel_volume(affine):.4g} mm^3 per "
            f"voxel, not the {product:.4g} of the voxel sizes), and the model sees the voxels as if unsheared; "
            "resample the scan to an unsheared grid for a reliable segmentation.",
            GeometryWarning,
            stacklevel=3,
        )


def _nifti_spacing(img: Any, affine: np.ndarray, path: Path) -> Tuple[float, float, float]:
    """The voxel size of a NIfTI image: from ``affine`` (``img.affine``, the one outputs are written with).

    A NIfTI file can carry two geometries: the qform (with the ``pixdim`` voxel sizes that
    ``header.get_zooms()`` returns) and the sform. nibabel (like MONAI) uses the sform when its code
    is set, so the voxel size is taken from that same affine, never from ``pixdim``: spacing, volumes
    in cm^3 and the output's geometry then come from one place. When both forms are set and
    disagree, a warning names the file (tools that prefer the qform would place it elsewhere).
    """
    spacing = affine_spacing(affine)
    header = getattr(img, "header", None)
    try:
        qcode, scode = int(header["qform_code"]), int(header["sform_code"])
        qform = header.get_qform()
    except (TypeError, KeyError, ValueError, AttributeError):  # not a NIfTI-1/2 header
        return spacing
    if qcode == 0 and scode == 0:
        warnings.warn(
            f"{path}: the header sets no orientation (qform_code = sform_code = 0); assumed nibabel's default, "
            f"{''.join(_orientations().aff2axcodes(affine))} axes with the pixdim voxel sizes, and reoriented from "
            "that. If the scan is in another orientation the label map is mirrored: fix the header (set its qform or "
            "sform, e.g. copied from the original scan).",
            GeometryWarning,
            stacklevel=3,
        )
    if qcode > 0 and scode > 0 and not np.allclose(qform, affine, rtol=0, atol=1e-3):
        warnings.warn(
            f"{path}: the qform (voxel size {tuple(round(z, 4) for z in affine_spacing(qform))} mm) and the sform "
            f"(voxel size {tuple(round(z, 4) for z in spacing)} mm) disagree; using the sform, as nibabel does, for "
            "the voxel size and for the output's geometry.",
            GeometryWarning,
            stacklevel=3,
        )
    return spacing


def read_header(path: Path | str) -> Tuple[Tuple[int, int, int], Tuple[float, float, float], np.ndarray]:
    """Read only the header of a volume: ``(shape (X, Y, Z), spacing (mm), affine)``.

    Raises ``ValueError`` naming the file if it cannot be read, ``FileNotFoundError`` if it is missing.
    """
    path, suffix = _volume_file(path)
    if suffix in (".mha", ".mhd"):
        sitk = _import_simpleitk()
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            shape = tuple(int(s) for s in reader.GetSize())
            spacing = tuple(float(s) for s in reader.GetSpacing())
            affine = _sitk_affine(reader.GetDirection(), spacing, reader.GetOrigin())
        except Exception as exc:  # SimpleITK raises RuntimeError for anything it cannot parse
            raise ValueError(f"{path}: unreadable MetaImage header ({type(exc).__name__}: {exc}).") from exc
    elif suffix in (".nii", ".nii.gz"):
        nib = _import_nibabel(path)
        try:
            img = nib.load(str(path))
            shape = tuple(int(s) for s in img.shape)
            affine = np.asarray(img.affine, dtype=float)
        except Exception as exc:
            raise ValueError(f"{path}: unreadable NIfTI header ({type(exc).__name__}: {exc}).") from exc
        spacing = _nifti_spacing(img, affine, path)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
    else:
        raise ValueError(f"{path}: not a volume file (expected one of {', '.join(VOLUME_SUFFIXES)}).")
    if len(shape) != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {shape}.")
    return shape, spacing, affine  # type: ignore[return-value]


def read_volume_and_header(path: Path | str) -> Tuple[Volume, Any]:
    """:func:`read_volume` plus the file's NIfTI header (``None`` for MetaImage), e.g. to write
    outputs "with the input's header" (:func:`write_label_map`)."""
    path, suffix = _volume_file(path)
    if suffix in (".mha", ".mhd"):
        sitk = _import_simpleitk()
        try:
            image = sitk.ReadImage(str(path))
            array = sitk.GetArrayFromImage(image)
        except Exception as exc:
            raise ValueError(f"{path}: unreadable or truncated MetaImage ({type(exc).__name__}: {exc}).") from exc
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"{path}: expected a scalar volume, got {image.GetNumberOfComponentsPerPixel()} components per voxel."
            )
        if array.ndim != 3:
            raise ValueError(f"{path}: expected a 3D volume, got an array of shape {array.shape}.")
        array = np.ascontiguousarray(array.transpose(2, 1, 0))
        spacing = tuple(float(s) for s in image.GetSpacing())
        return Volume(array, _sitk_affine(image.GetDirection(), spacing, image.GetOrigin()), spacing), None
    if suffix in (".nii", ".nii.gz"):
        nib = _import_nibabel(path)
        try:
            img = nib.load(str(path))
            array = np.asanyarray(img.dataobj)
            if isinstance(array, np.memmap):  # do not keep the file mapped (and fail late if truncated)
                array = np.array(array)
        except Exception as exc:  # nibabel raises many types for a bad file
            raise ValueError(
                f"{path}: not a readable NIfTI file: unreadable or truncated ({type(exc).__name__}: {exc})."
            ) from exc
        array = _squeeze_to_3d(array, path)
        affine = np.asarray(img.affine, dtype=float)
        return Volume(array, affine, _nifti_spacing(img, affine, path)), img.header
    raise ValueError(f"{path}: not a volume file (expected one of {', '.join(VOLUME_SUFFIXES)}).")


def read_volume(path: Path | str) -> Volume:
    """Read one volume into ``Volume(array, affine, spacing)``.

    * NIfTI (``.nii``, ``.nii.gz``) through nibabel: the array is ``np.asanyarray(img.dataobj)``
      (on-disk dtype; scaled to float only when the header has a slope/intercept), shape
      (X, Y, Z) = (240, 240, 155) for BraTS, axial slices along the last axis.
    * MetaImage (``.mha``/``.mhd``, BraTS 2015) through SimpleITK, an optional extra
      (``pip install "emrfuse[mha]"``; an ``ImportError`` says so when it is missing).
      ``GetArrayFromImage`` returns (Z, Y, X); it is transposed to (X, Y, Z) so that a 2015
      volume has the same layout as the NIfTI of later releases, and the affine is converted
      from ITK's LPS to nibabel's RAS world coordinates.

    Nothing is resampled or reoriented. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` naming the file for an unreadable, truncated or non-3D one.
    """
    return read_volume_and_header(path)[0]


def to_nifti_image(path: Path | str):
    """Read any supported volume and return it as a ``nibabel.Nifti1Image`` (same array and affine).

    The image processor, the slice cache and the evaluation read volume paths (MetaImage included)
    with it.
    """
    array, affine, spacing = read_volume(path)
    img = _import_nibabel(path).Nifti1Image(array, affine)
    img.header.set_zooms(spacing)
    img.header.set_xyzt_units("mm")
    return img


def read_label_map(path: Path | str) -> Volume:
    """Read a label map as a ``Volume`` whose array is ``uint8`` (X, Y, Z).

    Raises ``ValueError`` naming the file when it is not a readable 3-D volume or not a label map:
    non-integer values (e.g. probabilities), a non-numeric data type, values outside 0..255.
    """
    array, affine, spacing = read_volume(path)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ValueError(f"{path}: non-integer values; expected an integer label map (not probabilities).")
    elif array.dtype.kind not in "iub":
        raise ValueError(f"{path}: unsupported data type {array.dtype} for a label map.")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"{path}: label values outside 0..255 (min {array.min()}, max {array.max()}).")
    return Volume(array.astype(np.uint8), affine, spacing)


# --------------------------------------------------------------------------------------------
# writing label maps
# --------------------------------------------------------------------------------------------
def write_label_map(path: Path | str, label_map: np.ndarray, affine: np.ndarray, header: Any = None) -> Path:
    """Write a uint8 label map as NIfTI with the input's affine and (a copy of) its NIfTI header.

    ``header``: the input's ``nibabel`` NIfTI-1 header (:func:`read_volume_and_header`), or ``None``
    (MetaImage input, arrays): a fresh header in mm. The copied header's qform / sform (and so its
    ``pixdim`` voxel sizes) are set to ``affine`` where they disagree with it, so that the written file
    has one geometry. Creates the parent folder; written under a temporary name and renamed, so that the final
    name never holds a half-written file. Returns the path.
    """
    path = Path(path)
    nib = _import_nibabel(path)
    label_map = np.asarray(label_map, dtype=np.uint8)
    if header is not None and isinstance(header, nib.Nifti1Header):
        img = nib.Nifti1Image(label_map, affine, header=header.copy())
        # one geometry: the copied header's qform (and its pixdim voxel sizes) must say what ``affine`` says
        qcode, scode = int(img.header["qform_code"]), int(img.header["sform_code"])
        if not np.allclose(img.header.get_qform(), affine, rtol=0, atol=1e-4):
            img.set_qform(affine, code=qcode)  # also sets pixdim (the zooms) from the affine
        if scode > 0 and not np.allclose(img.header.get_sform(), affine, rtol=0, atol=1e-4):
            img.set_sform(affine, code=scode)
    else:
        img = nib.Nifti1Image(label_map, affine)
        img.header.set_xyzt_units("mm")
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"] = 0
    img.header["cal_max"] = int(label_map.max()) if label_map.size else 0
    img.header["descrip"] = b"EmrFuse predicted label map"
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_atomically(nib, img, path)
    return path


def _save_atomically(nib: Any, img: Any, path: Path) -> None:
    """``nib.save`` to a temporary name in the same folder (same suffix, so the same compression), then renamed
    onto ``path``: a run killed while writing leaves no half-written file under the final name."""
    suffix = volume_suffix(path) or path.suffix
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}"))
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------------------------
# the release table
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Release:
    """One BraTS release: how its cases are laid out, named and labelled, and how it is recognised.

    Attributes:
        name: the release as a year string (``"2018"``), the value ``release=`` takes.
        layout: ``"graded"`` (``HGG/``/``LGG/`` folders of cases; the grade is the folder) or ``"flat"`` (a
            folder of case folders). Case-id, grade-table and fallback detection apply to folders of this layout.
        case_id: the release's case-folder names; a ``patient`` group names the patient when an id also
            carries a time point or scan number (``BraTS-GLI-00001-000`` is patient ``BraTS-GLI-00001``).
        sequence_names: the release's file-name tokens of the four sequences, in ``SEQUENCES`` order; each is
            an alias in ``brats_labels.SEQUENCE_ALIASES`` (the one home of sequence names).
        label_names: file-name tokens of its label maps (besides :data:`GENERIC_LABEL_NAMES`).
        label_convention: a ``brats_labels`` convention name (default: the one ``brats_labels`` gives the year).
        grade_table: glob of a table in the release folder with each case's ``Grade`` (``name_mapping*.csv``).
        sequence_folder: one sub-folder per volume (``VSD.Brain.XX.O.MR_Flair.<id>``); groups ``kind``
            (``MR_<sequence>`` or ``OT`` for the label) and ``id``.
        detect: evidence that tells the release under ``release="auto"``: ``"sequence_folder"`` (a case has
            its sub-folders), ``"sequence_names"`` (a case's files use a sequence name no other naming uses, or a
            shared one in a case named like the release), ``"case_id"`` (every case of a folder of its layout
            matches ``case_id``), ``"grade_table"`` (the table sits in a folder of its layout). Empty: only
            ``release=`` selects it.
        fallback: the release of a folder of its layout that no entry claims.
        earlier_id: ``(pattern, format)``: a case id matching ``pattern`` names the same patient as
            ``format.format(**groups)`` in an earlier release (BraTS 2023+ glioma ids continue BraTS 2021's).
        layout_doc: the layout as the documentation shows it.
    """

    name: str
    layout: str
    case_id: Optional["re.Pattern[str]"] = None
    sequence_names: Tuple[str, ...] = SEQUENCES
    label_names: Tuple[str, ...] = ("seg",)
    label_convention: str = ""
    grade_table: Optional[str] = None
    sequence_folder: Optional["re.Pattern[str]"] = None
    detect: Tuple[str, ...] = ()
    fallback: bool = False
    earlier_id: Optional[Tuple["re.Pattern[str]", str]] = None
    layout_doc: str = ""

    def __post_init__(self) -> None:
        if not self.label_convention:
            object.__setattr__(self, "label_convention", get_label_convention(self.name).name)
        get_label_convention(self.label_convention)  # an unknown convention is an error here, not at use
        if self.layout not in ("graded", "flat"):
            raise ValueError(f"release {self.name}: layout must be 'graded' or 'flat', got {self.layout!r}.")
        unknown = sorted(set(self.detect) - set(DETECT_EVIDENCE))
        if unknown:
            raise ValueError(f"release {self.name}: unknown detect evidence {unknown}; use {list(DETECT_EVIDENCE)}.")
        known = all(str(n).lower() in SEQUENCE_ALIASES for n in self.sequence_names)
        if not known or tuple(canonical_sequence_name(n) for n in self.sequence_names) != SEQUENCES:
            raise ValueError(
                f"release {self.name}: sequence_names {self.sequence_names} must name {list(SEQUENCES)} in that order "
                "(add a new spelling to brats_labels.SEQUENCE_ALIASES first)."
            )

    @property
    def grade_from(self) -> Optional[str]:
        """Where a case's grade comes from: ``"folder"``, ``"table"`` or ``None``."""
        return "folder" if self.layout == "graded" else "table" if self.grade_table else None


DETECT_EVIDENCE: Tuple[str, ...] = ("sequence_folder", "sequence_names", "case_id", "grade_table")
GENERIC_LABEL_NAMES: Tuple[str, ...] = ("seg", "segm", "segmentation", "label", "labels", "gt", "mask")
"""File-name tokens read as a label map in any release (besides each release's ``label_names``)."""

RELEASES: Dict[str, Release] = {}
"""The release table: release name -> :class:`Release`, in detection order (:func:`register_release` adds one)."""


def register_release(release: Release) -> Release:
    """Add a release to :data:`RELEASES` (discovery, naming rules, ``emrfuse score`` and the docs read it)."""
    if release.name in RELEASES:
        raise ValueError(f"release {release.name} is already in the release table.")
    RELEASES[release.name] = release
    return release


def _pattern(text: str) -> "re.Pattern[str]":
    return re.compile(text, re.IGNORECASE)


_VSD_FOLDER = re.compile(r"^VSD\.Brain(?:_\d+more)?\.XX\.O\.(?P<kind>MR_[A-Za-z0-9]+|OT)\.(?P<id>\d+)$")
_NAMES_2015 = ("t1", "t1c", "t2", "flair")
_NAMES_2023 = ("t1n", "t1c", "t2w", "t2f")
_LABELS_2015 = ("ot", "otmulticlass", "segmentation")
_DOC_2017 = "``{HGG,LGG}/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz``"
_DOC_2023 = "flat ``BraTS-GLI-XXXXX-XXX/BraTS-GLI-XXXXX-XXX-{t1n,t1c,t2w,t2f,seg}.nii.gz``"
_GLI_CONTINUES_2021 = (re.compile(r"^BraTS-GLI-(?P<number>\d{5})-\d{3}$"), "BraTS2021_{number}")
for _release in (
    Release(
        "2013",
        "graded",
        None,
        _NAMES_2015,
        _LABELS_2015,
        sequence_folder=_VSD_FOLDER,
        layout_doc="as 2015 (selected with ``release='2013'`` only)",
    ),
    Release(
        "2015",
        "flat",
        _pattern(r"^(?P<patient>brats_(?:2013|tcia)_pat\d+)_\d+$"),
        _NAMES_2015,
        _LABELS_2015,
        sequence_folder=_VSD_FOLDER,
        detect=("sequence_folder", "case_id"),
        layout_doc="``{HGG,LGG}/<case>/VSD.Brain.XX.O.MR_{Flair,T1,T1c,T2}.<id>/*.mha`` + "
        "``VSD.Brain_3more.XX.O.OT.<id>/*.mha``; or ``brats_2013_patNNNN_M/{Flair,T1c,...,OTMultiClass}"
        ".nii.gz`` exports",
    ),
    Release("2017", "graded", _pattern(r"^brats17_"), detect=("case_id",), layout_doc=_DOC_2017),
    Release("2018", "graded", _pattern(r"^brats18_"), detect=("case_id",), fallback=True, layout_doc=_DOC_2017),
    Release("2019", "graded", _pattern(r"^brats19_"), detect=("case_id",), layout_doc=_DOC_2017),
    Release(
        "2020",
        "flat",
        _pattern(r"^brats20_"),
        grade_table="name_mapping*.csv",
        detect=("grade_table", "case_id"),
        layout_doc="flat ``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii[.gz]`` + ``name_mapping.csv``",
    ),
    Release(
        "2021",
        "flat",
        _pattern(r"^brats2021_\d+$"),
        detect=("case_id",),
        fallback=True,
        layout_doc="flat ``BraTS2021_XXXXX/BraTS2021_XXXXX_{flair,t1,t1ce,t2,seg}.nii.gz``",
    ),
    Release(
        "2023",
        "flat",
        re.compile(r"^(?P<patient>BraTS-[A-Za-z]+-\d+)-\d+$"),
        _NAMES_2023,
        detect=("sequence_names",),
        earlier_id=_GLI_CONTINUES_2021,
        layout_doc=_DOC_2023,
    ),
    Release(
        "2024",
        "flat",
        re.compile(r"^(?P<patient>BraTS-[A-Za-z]+-\d+)-\d+$"),
        _NAMES_2023,
        earlier_id=_GLI_CONTINUES_2021,
        layout_doc=_DOC_2023,
    ),
    Release(
        "2025",
        "flat",
        re.compile(r"^(?P<patient>BraTS-[A-Za-z]+-\d+)-\d+$"),
        _NAMES_2023,
        earlier_id=_GLI_CONTINUES_2021,
        layout_doc=_DOC_2023,
    ),
):
    register_release(_release)
del _release

KNOWN_RELEASES: Tuple[str, ...] = tuple(RELEASES)
"""The releases of the shipped table (``release=`` also takes any release registered later)."""


def release_table_markdown() -> str:
    """The release table as a Markdown table (release, layout, sequence names, label convention, grade,
    detection): the README's data section shows it."""
    lines = [
        "| release | layout | sequences (t1, t1ce, t2, flair) | labels | grade | detected by |",
        "|---|---|---|---|---|---|",
    ]
    for r in RELEASES.values():
        grade = {"folder": "HGG/LGG folder", "table": f"``{r.grade_table}``", None: "none"}[r.grade_from]
        detect = (
            ", ".join(r.detect) + (", fallback" if r.fallback else "") if r.detect or r.fallback else "release= only"
        )
        lines.append(
            f"| {r.name} | {r.layout_doc} | {', '.join(r.sequence_names)} | {r.label_convention} | {grade} | {detect} |"
        )
    return "\n".join(lines)


def label_names() -> frozenset:
    """Every file-name token read as a label map: :data:`GENERIC_LABEL_NAMES` and each release's ``label_names``."""
    return frozenset(GENERIC_LABEL_NAMES).union(*(r.label_names for r in RELEASES.values()))


def _release_label_names() -> frozenset:
    """The label-file tokens some release ships (others get a 'non-standard name' note)."""
    return frozenset().union(*(r.label_names for r in RELEASES.values()))


def _sequence_folder_match(name: str) -> Optional["re.Match[str]"]:
    for release in RELEASES.values():
        if release.sequence_folder is not None:
            match = release.sequence_folder.match(name)
            if match:
                return match
    return None


# --------------------------------------------------------------------------------------------
# naming rules
# --------------------------------------------------------------------------------------------
def _name_token(stem: str) -> str:
    """The sequence / label token of a file stem: its last ``_``/``-`` token, or its first when the
    last one is no sequence or label name (``Flair_subtrMeanDivStd``, ``T1c``, ``OTMultiClass``)."""
    tokens = [t.lower() for t in re.split(r"[_\-]", stem) if t]
    token = tokens[-1] if tokens else ""
    known = label_names()
    if (
        token not in SEQUENCE_ALIASES
        and token not in known
        and tokens
        and (tokens[0] in SEQUENCE_ALIASES or tokens[0] in known)
    ):
        token = tokens[0]
    return token


def named_like(release: Release | str, sequence_tokens: Iterable[str], case_id: Optional[str] = None) -> bool:
    """Whether a case's sequence file names are those of ``release``: a name no other naming uses, or a name
    it shares with another naming in a case whose id matches the release's ``case_id``."""
    release = RELEASES[release] if isinstance(release, str) else release
    tokens = {str(t).lower() for t in sequence_tokens}
    own = {n.lower() for n in release.sequence_names}
    others = {
        n.lower() for r in RELEASES.values() if r.sequence_names != release.sequence_names for n in r.sequence_names
    }
    if tokens & (own - others):
        return True
    in_release = bool(case_id) and release.case_id is not None and bool(release.case_id.match(str(case_id)))
    return bool(tokens & own & others) and in_release


def release_from_file_names(sequence_tokens: Iterable[str], case_id: Optional[str] = None) -> Optional[str]:
    """The release whose sequence names a case's files use (entries detected by ``"sequence_names"``), or ``None``."""
    tokens = set(sequence_tokens)
    for release in RELEASES.values():
        if "sequence_names" in release.detect and named_like(release, tokens, case_id):
            return release.name
    return None


def is_brats2023_naming(sequence_tokens: Iterable[str], case_id: Optional[str] = None) -> bool:
    """BraTS 2023+ file naming: ``t1n``/``t2w``/``t2f`` files, or ``t1c`` in a ``BraTS-XXX-NNNNN-NNN`` case.

    ``t1c`` alone is not enough: BraTS 2013/2015 exports name the contrast T1 ``T1c`` too.
    """
    return named_like("2023", sequence_tokens, case_id)


def case_id_from_file_names(paths: Iterable[Path | str]) -> str:
    """Case id from sequence file names: the common prefix once each sequence suffix is removed
    (``TCGA-DU-7294_t1.nii.gz`` ... -> ``TCGA-DU-7294``; ``BraTS-GLI-00001-000-t1n.nii.gz`` ... ->
    ``BraTS-GLI-00001-000``); ``"case"`` when the names share nothing."""
    stems = [SEQUENCE_SUFFIX_RE.sub("", _stem(Path(os.fspath(p)))) for p in paths]
    prefix = os.path.commonprefix(stems).rstrip("_-. ")
    return prefix or "case"


def label_convention_from_file_names(paths: Iterable[Path | str], case_id: Optional[str] = None) -> Optional[str]:
    """The label convention of the release whose sequence names the files (or bare names such as ``"t2f"``)
    use (:func:`release_from_file_names`), else ``None`` (the names do not tell the release).

    ``case_id``: the case's id; by default the files' common name (:func:`case_id_from_file_names`)
    and their folder's name are tried.
    """
    paths = [Path(os.fspath(p)) for p in paths]
    tokens = {_name_token(_stem(p)) for p in paths}
    ids = [case_id] if case_id else [case_id_from_file_names(paths)] + sorted({p.parent.name for p in paths})
    for cid in ids:
        release = release_from_file_names(tokens, cid)
        if release is not None:
            return RELEASES[release].label_convention
    return None


# --------------------------------------------------------------------------------------------
# identifiers
# --------------------------------------------------------------------------------------------
def patient_id_for(case_id: str, release: Optional[str] = None) -> str:
    """The patient a case id names, by the release table's naming rules.

    An id whose release's ``case_id`` pattern has a ``patient`` group names that patient (BraTS 2023+
    ``BraTS-GLI-XXXXX-YYY`` is patient ``BraTS-GLI-XXXXX`` at time point ``YYY``; BraTS 2013/2015
    ``brats_tcia_patNNN_M`` is scan ``M`` of patient ``brats_tcia_patNNN``); any other id is its own
    patient. Names do not link releases (a BraTS 2013 number is not kept in later releases): discovery
    joins the cases whose tumour masks are identical (:func:`group_patients`), and id tables join the
    rest (``datasets_scripts.brats_ids``).
    """
    first = [RELEASES[release]] if release in RELEASES else []
    for entry in first + list(RELEASES.values()):
        if entry.case_id is not None and "patient" in entry.case_id.groupindex:
            match = entry.case_id.match(case_id)
            if match:
                return match.group("patient")
    return case_id


def earlier_release_id(case_id: str) -> Optional[str]:
    """The same patient's id in an earlier release by a release's ``earlier_id`` rule (``BraTS-GLI-00005-001``
    -> ``BraTS2021_00005``), else ``None``; whether that case exists is not checked."""
    text = str(case_id).strip()
    for release in RELEASES.values():
        if release.earlier_id is not None:
            match = release.earlier_id[0].match(text)
            if match:
                return release.earlier_id[1].format(**match.groupdict())
    return None


# --------------------------------------------------------------------------------------------
# patients by content: identical tumour masks are one scan
# --------------------------------------------------------------------------------------------
MIN_FINGERPRINT_VOXELS = 100
"""Tumour masks smaller than this are not fingerprinted: a few voxels do not tell one scan from another."""


@dataclass(frozen=True)
class _LabelFacts:
    values: Tuple[int, ...]
    fingerprint: Optional[str]


_LABEL_FACTS: Dict[str, _LabelFacts] = {}
LABEL_CACHE_ENV = "EMRFUSE_LABEL_CACHE"
"""Environment variable: the file that keeps label facts between runs (default
``~/.cache/emrfuse/label_facts.tsv``; ``0`` or empty: memory only)."""


def _label_cache_file() -> Optional[Path]:
    value = os.environ.get(LABEL_CACHE_ENV, str(Path("~/.cache/emrfuse/label_facts.tsv").expanduser()))
    return Path(value).expanduser() if value not in ("", "0") else None


def _parse_value(text: str) -> Any:
    number = float(text)
    return int(number) if number.is_integer() else number


def _load_label_cache() -> None:
    """Lines ``<path>|<size>|<mtime ns>  TAB  <values, comma-separated>  TAB  <fingerprint or ->``."""
    path = _label_cache_file()
    if path is None or not path.is_file():
        return
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            key, values, fingerprint = line.split("\t")
            if key not in _LABEL_FACTS:
                parsed = tuple(_parse_value(v) for v in values.split(",") if v)
                _LABEL_FACTS[key] = _LabelFacts(parsed, None if fingerprint == "-" else fingerprint)
    except (OSError, ValueError, UnicodeDecodeError):
        logger.info("label cache %s is unreadable; label files are read again", path)


def _save_label_cache() -> None:
    """Write the facts of the label files that still exist (to a temporary name, then renamed)."""
    path = _label_cache_file()
    if path is None:
        return
    lines = [
        f"{key}\t{','.join(map(str, facts.values))}\t{facts.fingerprint or '-'}"
        for key, facts in sorted(_LABEL_FACTS.items())
        if "\t" not in key and "\n" not in key and Path(key.rsplit("|", 2)[0]).exists()
    ]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path)  # a killed run never leaves a half-written cache
    except OSError:
        logger.info("label cache %s could not be written", path)


def _read_label_facts(paths: Sequence[Path]) -> None:
    """Read the label files not yet cached (memory, then the cache file), in threads (decompression releases
    the GIL); errors are left for the per-case check, which names the case."""

    def read(path: Path) -> None:
        try:
            _label_facts(path)
        except (ValueError, OSError, ImportError):
            pass

    if not paths:
        return
    _load_label_cache()
    known = len(_LABEL_FACTS)
    with ThreadPoolExecutor(max_workers=min(4, len(paths))) as pool:
        list(pool.map(read, paths))
    if len(_LABEL_FACTS) > known:
        _save_label_cache()


def _label_facts(path: Path) -> _LabelFacts:
    """The label values and tumour fingerprint of a label file, cached by path, size and modification time."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if key not in _LABEL_FACTS:
        array, affine, _spacing = read_volume(path)
        _LABEL_FACTS[key] = _LabelFacts(_distinct_values(array), _mask_fingerprint(np.asarray(array) > 0, affine))
    return _LABEL_FACTS[key]


def _distinct_values(array: np.ndarray) -> Tuple[int, ...]:
    if array.dtype.kind in "ui" and array.size and array.min() >= 0 and array.max() < 256:
        return tuple(int(v) for v in np.flatnonzero(np.bincount(array.ravel())))
    values = np.unique(array[np.isfinite(array)] if array.dtype.kind == "f" else array)
    return tuple(float(v) if float(v) != int(v) else int(v) for v in values)


def _mask_fingerprint(mask: np.ndarray, affine: np.ndarray) -> Optional[str]:
    """A digest of a tumour mask in the reference orientation (``None`` below :data:`MIN_FINGERPRINT_VOXELS`):
    equal for two files that mark the same voxels, whatever their label convention and data type."""
    if int(mask.sum()) < MIN_FINGERPRINT_VOXELS:
        return None
    mask = reorientation(affine, mask.shape).apply(mask)
    digest = hashlib.sha256(repr(tuple(mask.shape)).encode())
    digest.update(np.packbits(mask).tobytes())
    return digest.hexdigest()[:20]


def tumour_fingerprint(path: Path | str) -> Optional[str]:
    """The content fingerprint of a label map: two files with the same tumour mask (label > 0) share it,
    whatever their label convention and data type; ``None`` for a mask under :data:`MIN_FINGERPRINT_VOXELS`."""
    return _label_facts(Path(path)).fingerprint


def patient_groups(cases: Sequence["CaseFiles"], patient_map: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Case id -> patient, joining into one patient the cases whose tumour masks are identical (the same
    scan under two names) and the cases that ``patient_map`` (case id -> patient, e.g. from an id table)
    or the naming rules give one patient. A group's patient is the smallest patient ``patient_map`` gives its
    members, else their smallest ``patient_id``.

    Only label files are read, once per file (cached by path, size and modification time).
    """
    parent = {c.case_id: c.case_id for c in cases}

    def root(cid: str) -> str:
        while parent[cid] != cid:
            parent[cid] = parent[parent[cid]]
            cid = parent[cid]
        return cid

    first_of: Dict[str, str] = {}
    for case, key in _group_keys(cases, patient_map or {}):
        parent[root(case.case_id)] = root(first_of.setdefault(key, case.case_id))
    members: Dict[str, List[CaseFiles]] = {}
    for case in cases:
        members.setdefault(root(case.case_id), []).append(case)
    out: Dict[str, str] = {}
    for group in members.values():
        given = [patient_map[c.case_id] for c in group if patient_map and c.case_id in patient_map]
        name = min(given) if given else min(c.patient_id for c in group)
        out.update((c.case_id, name) for c in group)
    return out


def group_patients(cases: Sequence["CaseFiles"], patient_map: Optional[Mapping[str, str]] = None) -> List[List[str]]:
    """:func:`patient_groups` applied in place (each case's ``patient_id`` becomes its group's); returns the
    groups of several cases."""
    patients = patient_groups(cases, patient_map)
    members: Dict[str, List[str]] = {}
    for case in cases:
        case.patient_id = patients[case.case_id]
        members.setdefault(case.patient_id, []).append(case.case_id)
    return sorted(sorted(ids) for ids in members.values() if len(ids) > 1)


def _fingerprint_or_none(path: Path) -> Optional[str]:
    """The fingerprint, or ``None`` for an unreadable label file (whoever reads its voxels reports it)."""
    try:
        return _label_facts(path).fingerprint
    except (ValueError, OSError, ImportError):
        return None


def _group_keys(cases: Sequence["CaseFiles"], patient_map: Mapping[str, str]) -> List[Tuple["CaseFiles", str]]:
    """``(case, key)`` pairs: cases sharing a key are one patient (naming rule, table, tumour fingerprint)."""
    labelled = [c for c in cases if c.label is not None]
    _read_label_facts([Path(c.label) for c in labelled])
    prints = {c.case_id: _fingerprint_or_none(Path(c.label)) for c in labelled}
    keys = [(c, "name:" + c.patient_id) for c in cases]
    keys += [(c, "table:" + patient_map[c.case_id]) for c in cases if c.case_id in patient_map]
    keys += [(c, "mask:" + prints[c.case_id]) for c in labelled if prints[c.case_id] is not None]
    return keys


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------
class _CaseProblem(ValueError):
    """A problem that makes one case unusable (raised, or recorded as a skip)."""

    def __init__(self, case_id: str, path: Path | str, reason: str):
        self.case_id, self.path, self.reason = case_id, str(path), reason
        super().__init__(f"case {case_id}: {reason} ({path})")


@dataclass
class _RawCase:
    case_id: str
    case_dir: Path
    grade_folder: Optional[str]  # "HGG"/"LGG"/None when under a grade folder, else None
    graded_layout: bool
    sequence_folders: bool = False  # volumes in per-sequence sub-folders (Release.sequence_folder)
    sequences: Dict[str, Path] = field(default_factory=dict)
    label: Optional[Path] = None
    report_path: Optional[Path] = None
    seq_tokens: set = field(default_factory=set)
    notes: List[str] = field(default_factory=list)
    odd_labels: List[Path] = field(default_factory=list)

    def put_sequence(self, name: str, path: Path) -> None:
        if name in self.sequences:
            raise _CaseProblem(
                self.case_id,
                self.case_dir,
                f"two files for sequence {name!r}: {self.sequences[name].name} and {path.name}",
            )
        self.sequences[name] = path

    def put_label(self, path: Path) -> None:
        if self.label is not None:
            raise _CaseProblem(self.case_id, self.case_dir, f"two label files: {self.label.name} and {path.name}")
        self.label = path

    def put_volume(self, kind: str, path: Path, where: str) -> None:
        """A volume of a per-sequence sub-folder: ``kind`` is ``OT`` (label) or ``MR_<sequence>``."""
        self.sequence_folders = True
        if kind.upper() == "OT":
            self.put_label(path)
        elif kind.lower() in SEQUENCE_ALIASES:
            self.seq_tokens.add(kind.lower())
            self.put_sequence(SEQUENCE_ALIASES[kind.lower()], path)
        else:
            self.notes.append(f"ignored unknown sequence {where} {path.name if where == 'file' else path.parent.name}")


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name.startswith("__")


def _subdirs(path: Path) -> List[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not _is_hidden(p)), key=lambda p: p.name)


def _volume_files(path: Path) -> List[Path]:
    return sorted(
        (p for p in path.iterdir() if p.is_file() and not _is_hidden(p) and volume_suffix(p)), key=lambda p: p.name
    )


def _scan_sequence_folders(raw: _RawCase) -> None:
    """Volumes in one sub-folder per sequence / label (``Release.sequence_folder``, e.g. ``VSD.Brain.*``: one ``.mha`` inside)."""
    for sub in _subdirs(raw.case_dir):
        match = _sequence_folder_match(sub.name)
        if not match:
            continue
        files = _volume_files(sub)
        if len(files) != 1:
            what = "no volume file" if not files else f"{len(files)} volume files"
            raise _CaseProblem(raw.case_id, sub, f"expected exactly one volume file in {sub.name}, found {what}")
        raw.put_volume(match.group("kind"), files[0], "folder")


def _scan_file(raw: _RawCase, path: Path) -> None:
    """Sort one volume file of a case folder into sequence / label / ignored by its name."""
    stem = _stem(path)
    token = _name_token(stem)
    folder_style = _sequence_folder_match(stem)
    if folder_style:  # a file taken out of its per-sequence sub-folder
        raw.put_volume(folder_style.group("kind"), path, "file")
    elif token in SEQUENCE_ALIASES:
        raw.seq_tokens.add(token)
        raw.put_sequence(SEQUENCE_ALIASES[token], path)
    elif token in label_names():
        raw.put_label(path)
        if token not in _release_label_names() or (token == "seg" and not stem.startswith(raw.case_id)):
            raw.notes.append(f"label file has a non-standard name: {path.name} (used as the label map)")
    elif "seg" in stem.lower():
        raw.odd_labels.append(path)
    else:
        raw.notes.append(f"ignored file with an unrecognised name: {path.name}")


def _settle_odd_labels(raw: _RawCase) -> None:
    """A label-like file (``*seg*``) is the label map when the case has no regular one and only one such file."""
    if not raw.odd_labels:
        return
    names = ", ".join(p.name for p in raw.odd_labels)
    if raw.label is not None:
        raw.notes.append(f"ignored extra label-like file(s) {names} (using {raw.label.name})")
    elif len(raw.odd_labels) > 1:
        raise _CaseProblem(raw.case_id, raw.case_dir, f"several label-like files and no regular label file: {names}")
    else:
        raw.label = raw.odd_labels[0]
        raw.notes.append(f"label file has a non-standard name: {raw.label.name} (used as the label map)")


def _find_report(raw: _RawCase) -> None:
    reports = sorted(
        p for p in raw.case_dir.iterdir() if p.is_file() and (p.name.endswith(REPORT_SUFFIX) or p.name == "report.txt")
    )
    if reports:
        preferred = [p for p in reports if p.name == f"{raw.case_id}_flair{REPORT_SUFFIX}"]
        raw.report_path = (preferred or reports)[0]
        if len(reports) > 1:
            raw.notes.append(f"several report files, using {raw.report_path.name}")


def _scan_case(raw: _RawCase) -> None:
    """Fill sequences / label / report of one case folder; raise :class:`_CaseProblem` on conflicts."""
    _scan_sequence_folders(raw)
    for path in _volume_files(raw.case_dir):
        _scan_file(raw, path)
    _settle_odd_labels(raw)
    _find_report(raw)


def _table_files(data_dir: Path, pattern: Optional[str]) -> List[Path]:
    return sorted(p for p in data_dir.glob(pattern) if p.is_file()) if pattern else []


def _read_grade_table(data_dir: Path, release: Release) -> Tuple[Dict[str, str], List[Path]]:
    """A release's grade table (``Release.grade_table``, e.g. ``name_mapping*.csv``): (case id -> grade, files with a
    ``Grade`` column)."""
    grades: Dict[str, str] = {}
    grade_files: List[Path] = []
    for path in _table_files(data_dir, release.grade_table):
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = {name.strip().lower(): name for name in (reader.fieldnames or [])}
            if "grade" not in fields:
                continue
            grade_files.append(path)
            id_columns = [name for key, name in fields.items() if "subject_id" in key or key in ("case_id", "id")]
            # the release's own column first
            id_columns.sort(key=lambda n: (0 if release.name in n else 1 if n.lower() in ("case_id", "id") else 2, n))
            for line_no, row in enumerate(reader, start=2):
                _add_grade(grades, row, fields["grade"], id_columns, f"{path}, line {line_no}")
    return grades, grade_files


def _add_grade(
    grades: Dict[str, str], row: Mapping[str, Any], grade_column: str, id_columns: Sequence[str], where: str
) -> None:
    grade = (row.get(grade_column) or "").strip().upper()
    if not grade:
        return
    if grade not in GRADES:
        raise ValueError(f"{where}: grade {grade!r} is not one of {list(GRADES)}.")
    for column in id_columns:
        case = (row.get(column) or "").strip()
        if case and case.upper() != "NA":
            if grades.get(case, grade) != grade:
                raise ValueError(f"{where}: case {case} has two different grades.")
            grades[case] = grade


def detect_release(data_dir: Path | str) -> str:
    """Detect the BraTS release of a data folder (the release table's ``detect`` evidence)."""
    return discover_cases(data_dir, release="auto", on_error="skip").release


def _holds_volumes(folder: Path) -> bool:
    return bool(_volume_files(folder)) or any(_sequence_folder_match(s.name) for s in _subdirs(folder))


def _collect_raw_cases(root: Path) -> Tuple[List[_RawCase], bool]:
    grade_dirs = [d for d in _subdirs(root) if d.name.upper() in GRADE_FOLDERS]
    raws: List[_RawCase] = []
    if grade_dirs:
        for grade_dir in grade_dirs:
            grade = GRADE_FOLDERS[grade_dir.name.upper()]
            for case_dir in _subdirs(grade_dir):
                raws.append(_RawCase(case_dir.name, case_dir, grade, graded_layout=True))
        return raws, True
    subdirs = _subdirs(root)
    case_dirs = [d for d in subdirs if not _sequence_folder_match(d.name)]
    if _holds_volumes(root) and not any(_holds_volumes(d) for d in case_dirs):
        return [_RawCase(root.name, root, None, graded_layout=False)], False  # the folder is itself one case
    return [_RawCase(case_dir.name, case_dir, None, graded_layout=False) for case_dir in subdirs], False


def _case_kind(raw: _RawCase) -> str:
    """The release a case's own files tell (per-sequence sub-folders, sequence names), else its layout."""
    for release in RELEASES.values():
        if "sequence_folder" in release.detect and raw.sequence_folders and release.sequence_folder is not None:
            return release.name
        if "sequence_names" in release.detect and named_like(release, raw.seq_tokens, raw.case_id):
            return release.name
    return "graded" if raw.graded_layout else "flat"


def _detect_release(root: Path, scanned: Sequence[_RawCase]) -> str:
    """``release="auto"``: the evidence of the release table (see :class:`Release`), in table order."""
    kinds = {_case_kind(raw) for raw in scanned}
    if len(kinds) > 1:
        raise ValueError(
            f"{root}: cases in different BraTS layouts are mixed ({', '.join(sorted(kinds))}); "
            "put each release in its own folder or pass release= explicitly."
        )
    kind = kinds.pop() if kinds else "flat"
    if kind in RELEASES:
        return kind
    candidates = [r for r in RELEASES.values() if r.layout == kind]
    for release in candidates:
        if "grade_table" in release.detect and _table_files(root, release.grade_table):
            return release.name
    ids = [raw.case_id for raw in scanned]
    by_id = [r for r in candidates if "case_id" in r.detect and ids and all(r.case_id.match(i) for i in ids)]
    if len(by_id) == 1:
        return by_id[0].name
    fallback = [r.name for r in candidates if r.fallback]
    if not fallback:
        raise ValueError(f"{root}: no release of the release table fits this {kind} folder; pass release= explicitly.")
    return fallback[0]


def _check_release(release: Optional[str]) -> str:
    release = str(release).strip().lower().removeprefix("brats") if release is not None else "auto"
    if release != "auto" and release not in RELEASES:
        raise ValueError(f"Unknown BraTS release {release!r}: use 'auto' or one of {list(RELEASES)}.")
    return release


class _Problems:
    """Where :func:`discover_cases` puts a bad case: raised (``on_error="raise"``) or kept as a skip."""

    def __init__(self, on_error: str):
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}.")
        self.on_error = on_error
        self.found: List[_CaseProblem] = []

    def __call__(self, problem: _CaseProblem) -> None:
        if self.on_error == "raise":
            raise problem
        self.found.append(problem)


def _scan_all(raws: Sequence[_RawCase], result: CaseList, problem: _Problems) -> List[_RawCase]:
    """Scan every case folder; folders without any volume are noted and left out."""
    scanned: List[_RawCase] = []
    for raw in raws:
        try:
            _scan_case(raw)
        except _CaseProblem as p:
            problem(p)
            continue
        if not raw.sequences and raw.label is None:
            result.warnings.append((raw.case_id, f"{raw.case_dir}: no volume file, not a case folder (ignored)"))
            continue
        scanned.append(raw)
    return scanned


def _duplicate_ids(scanned: Sequence[_RawCase], problem: _Problems) -> set:
    by_id: Dict[str, List[_RawCase]] = {}
    for raw in scanned:
        by_id.setdefault(raw.case_id, []).append(raw)
    duplicates = {cid: rs for cid, rs in by_id.items() if len(rs) > 1}
    for cid, rs in sorted(duplicates.items()):
        problem(_CaseProblem(cid, ", ".join(str(r.case_dir) for r in rs), f"duplicate case id in {len(rs)} folders"))
    return set(duplicates)


def _build_cases(
    root: Path,
    graded: bool,
    scanned: Sequence[_RawCase],
    release: Release,
    result: CaseList,
    problem: _Problems,
    allow_missing_sequences: bool,
) -> None:
    """One :class:`CaseFiles` per usable scanned case, with its grade (folder or the release's grade table)."""
    grades, grade_files = ({}, []) if graded else _read_grade_table(root, release)
    duplicates = _duplicate_ids(scanned, problem)
    for raw in scanned:
        if raw.case_id in duplicates:
            continue
        missing = [name for name in SEQUENCES if name not in raw.sequences]
        if missing and (not allow_missing_sequences or len(missing) == len(SEQUENCES)):
            found = ", ".join(f"{k}={v.name}" for k, v in sorted(raw.sequences.items())) or "none"
            problem(_CaseProblem(raw.case_id, raw.case_dir, f"missing sequence(s) {missing} (found: {found})"))
            continue
        grade = raw.grade_folder if raw.graded_layout else grades.get(raw.case_id)
        if grade is None and grade_files and not raw.graded_layout:
            result.warnings.append((raw.case_id, f"not in {', '.join(p.name for p in grade_files)}: grade unknown"))
        result.warnings.extend((raw.case_id, note) for note in raw.notes)
        result.append(
            CaseFiles(
                case_id=raw.case_id,
                release=release.name,
                label_convention=release.label_convention,
                grade=grade,
                sequences={name: raw.sequences[name] for name in SEQUENCES if name in raw.sequences},
                label=raw.label,
                report_path=raw.report_path,
                source_dir=raw.case_dir,
            )
        )


_NO_CASE_FIX = (
    "point it at a BraTS release folder (one holding HGG/ and LGG/ or case folders with the sequence files) "
    "or at one case folder; `emrfuse demo-data DIR` writes example cases"
)


def discover_cases(
    data_dir: Path | str,
    release: str = "auto",
    on_error: str = "raise",
    allow_missing_sequences: bool = False,
    check_files: bool = False,
) -> CaseList:
    """Find every case of a BraTS data folder (any release of :data:`RELEASES`).

    Args:
        data_dir: the release folder (the one holding ``HGG``/``LGG`` or the case folders), or a
            single case folder.
        release: ``"auto"`` (detect) or a release of :data:`RELEASES` (a year string);
            forcing it fixes the label convention.
        on_error: ``"raise"`` (default): a bad case raises ``ValueError`` naming the case and the
            file; ``"skip"``: the case is left out and listed in the result's ``skipped``.
        allow_missing_sequences: accept cases that have only some of the four sequences (at least
            one); ``CaseFiles.sequences`` then holds the present ones and ``missing_sequences`` the
            others. Without it a missing sequence is a problem of the case (raised or skipped).
        check_files: also read each case's file headers (sequences of different shapes are a problem of
            the case) and label map (values outside the release's label convention are a problem of the
            case; cases with identical tumour masks become one patient, :func:`group_patients`).

    Without ``check_files`` only the directory listing is read: a missing sequence, two files for one
    sequence, two label files, duplicate case ids. Voxel-level checks of images (NaN/inf, truncation)
    happen per case in the dataset builder (``datasets_scripts.brats_text.check_case``).

    Returns:
        a :class:`CaseList` (a list of :class:`CaseFiles` sorted by case id, with ``release``,
        ``skipped`` and ``warnings`` attributes).
    """
    problem = _Problems(on_error)
    release = _check_release(release)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ValueError(f"{root}: data folder not found; {_NO_CASE_FIX}.")
    raws, graded = _collect_raw_cases(root)
    result = CaseList()
    scanned = _scan_all(raws, result, problem)
    result.release = _detect_release(root, scanned) if release == "auto" else release
    _build_cases(root, graded, scanned, RELEASES[result.release], result, problem, allow_missing_sequences)
    if check_files:
        _check_case_files(result, problem)
    result.sort(key=lambda c: c.case_id)
    result.skipped = [SkippedCase(p.case_id, p.path, p.reason) for p in problem.found]
    for case_id, message in result.warnings:
        logger.info("case %s: %s", case_id, message)
    for skipped in result.skipped:
        warnings.warn(f"skipped case {skipped.case_id}: {skipped.reason} ({skipped.path})", stacklevel=2)
    if not result and not result.skipped:
        raise ValueError(f"{root}: no BraTS case found (no case folder with volume files); {_NO_CASE_FIX}.")
    return result


def _check_case_files(cases: CaseList, problem: _Problems) -> None:
    """Drop (raise or skip) the cases whose sequences differ in shape or whose labels leave the convention."""
    _read_label_facts([Path(c.label) for c in cases if c.label is not None])
    bad = []
    for case in cases:
        try:
            _check_shapes(case)
            _check_labels(case)
        except _CaseProblem as p:
            problem(p)
            bad.append(case)
    for case in bad:
        cases.remove(case)
    group_patients(cases)


def _check_shapes(case: "CaseFiles") -> None:
    shapes = {}
    for name, path in case.files():
        try:
            shapes[name] = (read_header(path)[0], path)
        except (ValueError, OSError) as exc:
            raise _CaseProblem(case.case_id, path, f"{name} file {path} is unreadable or truncated: {exc}") from None
    (first, (shape, _path)), *rest = shapes.items()
    for name, (other, path) in rest:
        if other != shape:
            raise _CaseProblem(
                case.case_id,
                path,
                f"{name} file {path}: shape {other} differs from {first} shape {shape} (sequences of different shapes); "
                "resample or co-register the case's volumes onto one voxel grid, or remove the case",
            )


def _check_labels(case: "CaseFiles") -> None:
    if case.label is None:
        return
    try:
        values = _label_facts(Path(case.label)).values
    except (ValueError, OSError) as exc:
        raise _CaseProblem(
            case.case_id, case.label, f"seg file {case.label} is unreadable or truncated: {exc}"
        ) from None
    allowed = get_label_convention(case.label_convention).valid_labels
    outside = [v for v in values if v not in allowed]
    if outside:
        fits = [
            r.name
            for r in RELEASES.values()
            if r.detect and set(values) <= set(get_label_convention(r.label_convention).valid_labels)
        ]
        hint = (
            f"pass the release whose labels these are (release= / --release: {', '.join(fits)})"
            if fits
            else "fix the label map"
        )
        raise _CaseProblem(
            case.case_id,
            case.label,
            f"seg file {case.label}: label values {outside} are outside the {case.label_convention} convention of release "
            f"{case.release} (allowed {list(allowed)}); {hint}",
        )


def _release_for(folder: Path | str, index: int, releases: Any, n: int) -> str:
    if releases is None or isinstance(releases, str):
        return releases or "auto"
    if isinstance(releases, Mapping):
        for key, value in releases.items():
            if Path(key).expanduser().resolve() == Path(folder).expanduser().resolve():
                return str(value)
        return "auto"
    releases = [str(r) for r in releases]
    if len(releases) == 1:
        return releases[0]
    if len(releases) != n:
        raise ValueError(f"{len(releases)} releases given for {n} data folders: give one release, or one per folder.")
    return releases[index]


def discover_folders(
    data_dirs: Path | str | Sequence[Path | str],
    releases: Any = None,
    on_error: str = "raise",
    allow_missing_sequences: bool = False,
    check_files: bool = True,
) -> CaseList:
    """Find the cases of several BraTS folders (each its own release) as one :class:`CaseList`.

    Args:
        data_dirs: one folder or a list of folders (release folders or single case folders).
        releases: ``None``/``"auto"`` (detect each), one release for all, a list with one release per
            folder, or a dict ``{folder: release}`` (folders not in it are detected).
        on_error, allow_missing_sequences, check_files: as in :func:`discover_cases` (``check_files`` is on
            here: shapes and label values are checked, and cases of any folder with identical tumour masks
            share one ``patient_id``).

    Each case keeps its folder's release and label convention (harmonised into the WT/TC/ET regions
    when targets are built). A case id found in two folders is a ``ValueError`` naming both folders.
    The result's ``release`` is the common release, or ``"mixed"``; ``releases`` maps each folder
    to its release.
    """
    folders = [data_dirs] if isinstance(data_dirs, (str, Path)) else list(data_dirs)
    if not folders:
        raise ValueError("No data folder given.")
    merged = CaseList()
    merged.releases = {}
    origin: Dict[str, Path] = {}
    for i, folder in enumerate(folders):
        release = _release_for(folder, i, releases, len(folders))
        found = discover_cases(
            folder,
            release=release,
            on_error=on_error,
            allow_missing_sequences=allow_missing_sequences,
            check_files=check_files,
        )
        merged.releases[str(folder)] = found.release
        for case in found:
            if case.case_id in origin:
                raise ValueError(
                    f"case id {case.case_id} is found in two data folders ({origin[case.case_id]} and {folder}); "
                    "case ids must be unique across the folders of one run."
                )
            origin[case.case_id] = Path(folder)
            merged.append(case)
        merged.skipped.extend(found.skipped)
        merged.warnings.extend(found.warnings)
    distinct = sorted(set(merged.releases.values()))
    merged.release = distinct[0] if len(distinct) == 1 else "mixed"
    merged.sort(key=lambda c: c.case_id)
    if check_files:
        group_patients(merged)  # identical tumour masks across folders: one patient
    return merged


# --------------------------------------------------------------------------------------------
# reports files
# --------------------------------------------------------------------------------------------
_ID_NAMES = (
    "case_id",
    "case",
    "id",
    "subject_id",
    "subject",
    "patient_id",
    "brats_id",
    "BraTS_2020_subject_ID",
    "name",
)
_TEXT_NAMES = ("text", "report", "report_text", "reports", "findings", "description", "content")


def _norm_key(key: str) -> str:
    return "".join(ch for ch in str(key).lower() if ch.isalnum())


_ID_KEYS = tuple(_norm_key(n) for n in _ID_NAMES)
_TEXT_KEYS = tuple(_norm_key(n) for n in _TEXT_NAMES)


def _pick_column(
    columns: Sequence[str], candidates: Sequence[str], names: Sequence[str], what: str, path: Path, first_row: str
) -> str:
    """The column of ``columns`` whose normalised name is one of ``candidates``.

    The error names the file, how many columns the first row has and the names expected, never the
    names found: in a file without a header row they are the first row's cells (a case id and a report).
    """
    by_norm = {}
    for col in columns:
        by_norm.setdefault(_norm_key(col), col)
    for cand in candidates:
        if cand in by_norm:
            return by_norm[cand]
    raise ValueError(
        f"{path}: no {what} column: the {first_row} has {len(columns)} column{'' if len(columns) == 1 else 's'}, "
        f"none named like one of "
        f"{list(names)} (case and punctuation ignored). If the file has no header row, add one "
        f"(e.g. case_id,text)."
    )


def read_reports(path: Path | str) -> Dict[str, str]:
    """Read a reports file into ``{case_id: text}``.

    Formats (by extension): ``.csv`` / ``.tsv`` (header row), ``.jsonl`` (one object per line),
    ``.json`` (a list of objects, or one object mapping case id -> text). Column names are
    matched loosely (case and punctuation ignored): the id column is one of ``case_id``, ``case``,
    ``id``, ``subject_id``, ``patient_id``, ``brats_id``, ``name``; the text column one of
    ``text``, ``report``, ``report_text``, ``findings``, ``description``, ``content``.

    Raises ``ValueError`` naming the file (and line) for a missing column (e.g. a CSV without a
    header row), a file that holds no report, an empty id or a duplicate case id. Error messages name
    the file, line numbers, column counts, expected column names and case ids, never a report's text
    or another cell value. Text is returned unchanged (never logged).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reports file not found.")
    suffix = path.suffix.lower()
    rows: List[Tuple[int, Mapping[str, Any]]] = []
    try:
        if suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
                rows = [(reader.line_num, row) for row in reader]
                columns = list(reader.fieldnames or [])
        elif suffix in (".jsonl", ".ndjson"):
            with open(path, encoding="utf-8-sig") as fh:
                for line_no, line in enumerate(fh, start=1):
                    if line.strip():
                        obj = json.loads(line)
                        if not isinstance(obj, dict):
                            raise ValueError(f"{path}, line {line_no}: expected a JSON object per line.")
                        rows.append((line_no, obj))
            columns = list(rows[0][1]) if rows else []
        elif suffix == ".json":
            with open(path, encoding="utf-8-sig") as fh:
                obj = json.load(fh)
            if isinstance(obj, dict) and obj and all(isinstance(v, str) for v in obj.values()):
                return {str(k).strip(): v for k, v in obj.items()}
            if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
                obj = next(iter(obj.values()))
            if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
                raise ValueError(f"{path}: expected a list of objects or an object mapping case id -> text.")
            rows = [(i + 1, o) for i, o in enumerate(obj)]
            columns = list(obj[0]) if obj else []
        else:
            raise ValueError(f"{path}: unsupported reports file type {suffix!r} (use .csv, .tsv, .jsonl or .json).")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot parse the reports file ({type(exc).__name__}: {exc}).") from exc
    first_row = "first row (read as the header)" if suffix in (".csv", ".tsv") else "first object"
    if columns or rows:
        id_col = _pick_column(columns, _ID_KEYS, _ID_NAMES, "case id", path, first_row)
        text_col = _pick_column(columns, _TEXT_KEYS, _TEXT_NAMES, "report text", path, first_row)
    if not rows:
        raise ValueError(
            f"{path}: the reports file holds no report (no row below the header)."
            if columns
            else f"{path}: the reports file holds no report."
        )
    out: Dict[str, str] = {}
    where = "row" if suffix == ".json" else "line"
    for line_no, row in rows:
        case_id = str(row.get(id_col) or "").strip()
        if not case_id:
            raise ValueError(f"{path}, {where} {line_no}: empty case id.")
        if case_id in out:
            raise ValueError(f"{path}, {where} {line_no}: duplicate case id {case_id!r}.")
        text = row.get(text_col)
        out[case_id] = "" if text is None else str(text)
    return out


# --------------------------------------------------------------------------------------------
# one case read into memory (the pipeline's input)
# --------------------------------------------------------------------------------------------
@dataclass
class LoadedCase:
    """One case read into memory by :func:`load_case`.

    Attributes:
        volumes: canonical sequence name -> array ``(X, Y, Z)`` (on-disk dtype).
        affine: ``4 x 4`` voxel -> world affine of the case (shared by the four sequences).
        spacing: voxel size in mm along X, Y, Z, from ``affine`` (the sform of a NIfTI file when set,
            as nibabel reads it; see :func:`affine_spacing`).
        header: nibabel header of the first sequence when read from NIfTI (``None`` otherwise); used
            to write outputs "with the input's header".
        case_id, release, label_convention: from the folder layout when known.
        sources: sequence -> file path when read from files.
        report_path: the case's own report file (TextBraTS layout), if any.
        missing_sequences: canonical names (in :data:`SEQUENCES` order) of the sequences the case
            lacks (or that are all zero), zero-filled in ``volumes``; only with
            ``allow_missing_sequences=True``, empty otherwise.
    """

    volumes: Dict[str, np.ndarray]
    affine: np.ndarray
    spacing: Tuple[float, float, float]
    header: Any = None
    case_id: Optional[str] = None
    release: Optional[str] = None
    label_convention: Optional[str] = None
    sources: Dict[str, str] = field(default_factory=dict)
    report_path: Optional[str] = None
    missing_sequences: List[str] = field(default_factory=list)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Voxel grid ``(X, Y, Z)``."""
        return tuple(next(iter(self.volumes.values())).shape)


_MISSING_HINT = "or pass allow_missing_sequences=True (emrfuse predict --allow-missing-sequences) to zero-fill them"


def _missing_error(where: str, missing: Sequence[str], found: Sequence[str]) -> ValueError:
    return ValueError(
        f"{where}missing sequence(s) {list(missing)} (found: {', '.join(found) or 'none'}): give all four of "
        f"{list(SEQUENCES)}, {_MISSING_HINT}."
    )


def _is_tensor(obj: Any) -> bool:
    """A torch tensor (told by its methods: this module does not import torch)."""
    return all(hasattr(obj, name) for name in ("detach", "cpu", "numpy"))


def _read_sequence_file(path: Path | str, name: str) -> Tuple[np.ndarray, np.ndarray, Any]:
    """Read one sequence file with :func:`read_volume_and_header`: ``(array, affine, NIfTI header or None)``;
    ``ValueError`` naming the sequence for a missing, empty or unreadable file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"Sequence {name!r}: file {path} does not exist.")
    if not path.is_file():
        raise ValueError(f"Sequence {name!r}: {path} is not a file.")
    if path.stat().st_size == 0:
        raise ValueError(f"Sequence {name!r}: file {path} is empty (0 bytes).")
    if volume_suffix(path) is None:
        raise ValueError(f"Sequence {name!r}: {path} is not a NIfTI file (expected a .nii or .nii.gz file, or .mha).")
    try:
        (array, affine, _spacing), header = read_volume_and_header(path)
    except ImportError as err:  # nibabel, or SimpleITK for MetaImage
        raise ValueError(f"Sequence {name!r}: {err}") from err
    return array, affine, header


def _item_to_volume(item: Any, name: str) -> Tuple[np.ndarray, Optional[np.ndarray], Any, Optional[str]]:
    """One sequence (path / nibabel image / array / tensor) -> (array, affine or None, header, source)."""
    if isinstance(item, (str, os.PathLike)):
        array, affine, header = _read_sequence_file(item, name)
        return array, affine, header, str(item)
    if hasattr(item, "dataobj") and hasattr(item, "affine"):  # nibabel image
        array = np.asanyarray(item.dataobj)
        return array, np.asarray(item.affine, dtype=np.float64), getattr(item, "header", None), None
    if _is_tensor(item):
        item = item.detach().cpu().numpy()
    array = np.asarray(item)
    if array.dtype == object:
        raise ValueError(f"Sequence {name!r}: expected a path, a nibabel image or an array, got {type(item).__name__}.")
    return array, None, None, None


def _case_folder(folder: Path, release: str = "auto", allow_missing_sequences: bool = False) -> Dict[str, Any]:
    """The files of the one case in ``folder`` (:func:`discover_cases`).

    A folder lacking sequences is an error naming them (and the option) unless
    ``allow_missing_sequences``; one with no sequence at all is always an error.
    """
    # cases lacking sequences are found, then refused below with the option named in the error
    cases = discover_cases(folder, release=release or "auto", on_error="raise", allow_missing_sequences=True)
    if len(cases) != 1:
        raise ValueError(
            f"{folder} holds {len(cases)} cases; pass a single case folder (emrfuse predict accepts a folder of cases)."
        )
    return _case_files_meta(cases[0], allow_missing_sequences)


def _case_files_meta(c: CaseFiles, allow_missing_sequences: bool = False) -> Dict[str, Any]:
    """What :func:`load_case` needs of a discovered case; a case lacking sequences is an error naming them (and
    the option) unless ``allow_missing_sequences``."""
    missing = c.missing_sequences
    if missing and not allow_missing_sequences:
        found = [f"{k}={Path(v).name}" for k, v in c.sequences.items()]
        raise _missing_error(f"case {c.case_id}: ", missing, found)
    if not c.sequences:
        raise ValueError(f"case {c.case_id}: no MRI sequence in {c.source_dir}.")
    return {
        "case_id": c.case_id,
        "release": c.release,
        "label_convention": c.label_convention,
        "sequences": {k: str(v) for k, v in c.sequences.items()},
        "report_path": None if c.report_path is None else str(c.report_path),
    }


def _case_items(
    case: Any, affine: Any, release: str, allow_missing_sequences: bool
) -> Tuple[Dict[str, Any], Dict[str, Any], Any]:
    """What :func:`load_case` was given, as ``(sequence -> item to read, layout facts, affine)``."""
    meta: Dict[str, Any] = {}
    if isinstance(case, CaseFiles) or all(hasattr(case, a) for a in ("case_id", "sequences", "source_dir")):
        # discovered already (also a CaseFiles of another copy of this module): its files are read as they are
        meta = _case_files_meta(case, allow_missing_sequences)
        return dict(meta["sequences"]), meta, affine
    if isinstance(case, (str, os.PathLike)):
        folder = Path(case).expanduser()
        if not folder.exists():
            raise ValueError(f"{folder} does not exist.")
        if not folder.is_dir():
            raise ValueError(
                f"{folder} is a file: pass a case folder, or the four sequences as a dict {{sequence: path}}."
            )
        meta = _case_folder(folder, release, allow_missing_sequences=allow_missing_sequences)
        return dict(meta["sequences"]), meta, affine
    if isinstance(case, Mapping):
        items: Dict[str, Any] = {}
        for key, value in case.items():
            if key in ("report", "case_id", "affine"):
                continue
            name = canonical_sequence_name(key)
            if name in items:
                raise ValueError(f"Sequence {name!r} given twice.")
            items[name] = value
        items = {name: value for name, value in items.items() if value is not None}
        missing = [s for s in SEQUENCES if s not in items]
        if not items:
            raise ValueError(
                f"No MRI sequence given: got {sorted(map(str, case))}; need at least one of {list(SEQUENCES)}."
            )
        if missing and not allow_missing_sequences:
            raise ValueError(
                f"Missing sequence(s) {missing}: got {sorted(map(str, case))}; need {list(SEQUENCES)} (or aliases), "
                f"{_MISSING_HINT}."
            )
        meta["case_id"] = case.get("case_id")
        if affine is None and case.get("affine") is not None:
            affine = case["affine"]
        paths = [v for v in items.values() if isinstance(v, (str, os.PathLike))]
        meta["label_convention"] = label_convention_from_file_names(paths) or label_convention_from_file_names(
            map(str, case)
        )
        return items, meta, affine
    if isinstance(case, np.ndarray) or _is_tensor(case):
        array = case.detach().cpu().numpy() if _is_tensor(case) else case
        if array.ndim != 4 or array.shape[0] != len(SEQUENCES):
            raise ValueError(
                f"Expected a case array of shape (4, X, Y, Z) in order {list(SEQUENCES)}, got {array.shape}."
            )
        return dict(zip(SEQUENCES, array)), meta, affine
    raise ValueError(
        f"Cannot read a case from {type(case).__name__}: pass a case folder, a dict {{sequence: path/array/image}} "
        "or a (4, X, Y, Z) array."
    )


def _one_grid(
    names: Sequence[str], loaded: Sequence[Tuple[np.ndarray, Optional[np.ndarray], Any, Optional[str]]], affine: Any
) -> Tuple[Dict[str, np.ndarray], np.ndarray, Any, Dict[str, str]]:
    """Check that the read sequences share one voxel grid: ``(volumes, affine, header, sources)``."""
    volumes: Dict[str, np.ndarray] = {}
    ref_name, ref_affine, header = None, None, None
    sources: Dict[str, str] = {}
    for name, (array, aff, hdr, source) in zip(names, loaded):
        if array.ndim != 3:
            raise ValueError(f"Sequence {name!r}: expected a 3-D volume (X, Y, Z), got shape {array.shape}.")
        if array.size == 0:
            raise ValueError(f"Sequence {name!r}: the volume is empty (shape {array.shape}).")
        volumes[name] = array
        if source is not None:
            sources[name] = source
        if aff is not None:
            if ref_affine is None:
                ref_name, ref_affine, header = name, aff, hdr
            elif not np.allclose(aff, ref_affine, rtol=0, atol=1e-3):
                raise ValueError(
                    f"Sequences {ref_name!r} and {name!r} have different affines (not on one voxel grid): "
                    "co-register the sequences first."
                )
    shapes = {n: tuple(v.shape) for n, v in volumes.items()}
    if len(set(shapes.values())) != 1:
        shown = ", ".join(
            f"{n!r} {shape}" + (f" ({sources[n]})" if n in sources else "") for n, shape in shapes.items()
        )
        raise ValueError(
            f"Sequences have different shapes: {shown}; resample or co-register the sequences onto one voxel grid "
            "before reading the case."
        )
    if ref_affine is None:
        ref_affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        if ref_affine.shape != (4, 4):
            raise ValueError(f"affine must be a 4 x 4 matrix, got shape {ref_affine.shape}.")
    return volumes, ref_affine, header, sources


def _zero_fill_missing(volumes: Dict[str, np.ndarray]) -> List[str]:
    """Add a zero volume for each absent sequence (on the grid of the present ones), in place; returns the
    missing sequences, counting an all-zero one as missing."""
    missing_sequences: List[str] = []
    shape, dtype = next(iter(volumes.values())).shape, next(iter(volumes.values())).dtype
    for name in SEQUENCES:
        if name not in volumes:
            volumes[name] = np.zeros(shape, dtype=dtype)  # zero-filled on the grid of the present ones
            missing_sequences.append(name)
        elif not np.any(volumes[name]):
            missing_sequences.append(name)  # all zero: as good as missing
    if len(missing_sequences) == len(SEQUENCES):
        raise ValueError(f"Every sequence is missing or all zero: need at least one of {list(SEQUENCES)}.")
    return missing_sequences


def load_case(
    case: Any,
    affine: Optional[np.ndarray] = None,
    release: str = "auto",
    max_workers: Optional[int] = None,
    allow_missing_sequences: bool = False,
) -> LoadedCase:
    """Read one case into a :class:`LoadedCase`: a case folder in any BraTS layout, a discovered
    :class:`CaseFiles` (read as it is, not discovered again), a dict
    ``{sequence name (any alias) -> path / array / nibabel image / tensor}``, or a ``(4, X, Y, Z)`` array
    (tensor) in :data:`SEQUENCES` order (``affine=`` gives its geometry; identity, 1 mm voxels, otherwise).
    A :class:`LoadedCase` is returned as it is. The files are read in parallel threads.

    ``allow_missing_sequences``: a case folder or a dict may lack sequences (a dict may map them to
    ``None``), at least one must be present; the present sequences define the grid (shape, affine,
    header) and each missing one is a zero array of that shape. With the flag, a given sequence that
    is all zero (also in a ``(4, X, Y, Z)`` array, which must still hold four sequences) counts as
    missing. The case's ``missing_sequences`` lists them.

    Raises ``ValueError`` naming the sequence / file for: a missing (without
    ``allow_missing_sequences``) or unknown sequence, a file that does not exist, is empty or is not
    a readable NIfTI, sequences of different shapes or affines, non-3-D data.
    """
    if isinstance(case, LoadedCase):
        if case.missing_sequences and not allow_missing_sequences:
            raise _missing_error(
                f"case {case.case_id}: " if case.case_id else "",
                case.missing_sequences,
                [s for s in SEQUENCES if s not in case.missing_sequences],
            )
        return case
    items, meta, affine = _case_items(case, affine, release, allow_missing_sequences)
    names = list(items)
    workers = max_workers or min(len(names), max(1, os.cpu_count() or 1))
    if workers > 1 and any(isinstance(items[n], (str, os.PathLike)) for n in names):
        with ThreadPoolExecutor(max_workers=workers) as pool:  # zlib and file reads release the GIL
            loaded = list(pool.map(lambda n: _item_to_volume(items[n], n), names))
    else:
        loaded = [_item_to_volume(items[n], n) for n in names]
    volumes, ref_affine, header, sources = _one_grid(names, loaded, affine)
    check_shear(
        ref_affine, f"case {meta['case_id']}" if meta.get("case_id") else next(iter(sources.values()), "the case")
    )
    missing_sequences = _zero_fill_missing(volumes) if allow_missing_sequences else []
    return LoadedCase(
        volumes={s: volumes[s] for s in SEQUENCES},
        affine=ref_affine,
        spacing=affine_spacing(ref_affine),  # the affine the output is written with, never pixdim alone
        header=header,
        case_id=meta.get("case_id"),
        release=meta.get("release"),
        label_convention=meta.get("label_convention"),
        sources=sources,
        report_path=meta.get("report_path"),
        missing_sequences=missing_sequences,
    )


# --------------------------------------------------------------------------------------------
# orientation
# --------------------------------------------------------------------------------------------
REFERENCE_AXCODES: Tuple[str, str, str] = ("L", "P", "S")
"""The orientation of every BraTS release (nibabel axis codes: array axes 0, 1, 2 run towards the patient's Left,
Posterior and Superior; the affine ``diag(-1, -1, 1)``). Models are trained on it; any other orientation is brought
to it before slicing and back after prediction."""


def _orientations():
    try:  # inside try: transformers does not make nibabel a requirement of the Hub code
        import nibabel.orientations as orientations
    except ImportError as exc:  # pragma: no cover
        raise ImportError("Reorienting a volume needs nibabel: pip install nibabel") from exc
    return orientations


@dataclass(frozen=True)
class Reorientation:
    """The axis permutation / flips that bring an array from its own orientation to :data:`REFERENCE_AXCODES`.

    ``apply`` (input -> reference) and ``undo`` (reference -> input) act on the first three axes of an array
    (extra trailing axes, e.g. region probabilities ``(X, Y, Z, R)``, are carried along); ``affine`` gives the
    reoriented array's affine. Only 90-degree axis permutations and flips: no voxel is interpolated, so
    ``undo(apply(a))`` is ``a`` exactly.
    """

    transform: Any  # nibabel ornt (3, 2): input -> reference
    inverse: Any  # reference -> input
    input_shape: Tuple[int, int, int]
    input_axcodes: Tuple[str, str, str]

    @property
    def is_identity(self) -> bool:
        t = np.asarray(self.transform)
        return bool(np.array_equal(t[:, 0], [0, 1, 2]) and np.all(t[:, 1] == 1))

    def apply(self, array: np.ndarray) -> np.ndarray:
        if self.is_identity:
            return array
        return np.ascontiguousarray(_orientations().apply_orientation(array, self.transform))

    def undo(self, array: np.ndarray) -> np.ndarray:
        if self.is_identity:
            return array
        return np.ascontiguousarray(_orientations().apply_orientation(array, self.inverse))

    def affine(self, affine: np.ndarray) -> np.ndarray:
        """The affine of the reoriented array (same world positions for the same voxels)."""
        if self.is_identity:
            return np.asarray(affine)
        return np.asarray(affine) @ _orientations().inv_ornt_aff(self.transform, self.input_shape)


def reorientation(affine: np.ndarray, shape: Sequence[int], target: Sequence[str] = REFERENCE_AXCODES) -> Reorientation:
    """How to bring an array of ``shape`` with ``affine`` to the ``target`` orientation (closest axes of the affine,
    as ``nibabel.io_orientation`` finds them; an oblique affine is taken to its nearest axis-aligned orientation)."""
    ornt = _orientations()
    own = ornt.io_orientation(np.asarray(affine))
    goal = ornt.axcodes2ornt(tuple(target))
    return Reorientation(
        transform=ornt.ornt_transform(own, goal),
        inverse=ornt.ornt_transform(goal, own),
        input_shape=tuple(int(v) for v in shape[:3]),
        input_axcodes=tuple(ornt.ornt2axcodes(own)),
    )


def to_reference_orientation(case: "LoadedCase") -> Tuple["LoadedCase", Reorientation]:
    """A loaded case in :data:`REFERENCE_AXCODES` (volumes, affine and spacing reordered), and the
    :class:`Reorientation` that maps a prediction on it back to the input's grid (:meth:`Reorientation.undo`).
    A case already in the reference orientation is returned as it is."""
    import dataclasses

    turn = reorientation(case.affine, case.shape)
    if turn.is_identity:
        return case, turn
    affine = turn.affine(case.affine)
    oriented = dataclasses.replace(
        case,
        volumes={name: turn.apply(np.asarray(v)) for name, v in case.volumes.items()},
        affine=affine,
        spacing=affine_spacing(affine),
    )
    return oriented, turn


def reoriented_image(img: Any, target: Sequence[str] = REFERENCE_AXCODES) -> Any:
    """A nibabel image in the ``target`` orientation (the image itself when it already is)."""
    turn = reorientation(img.affine, img.shape)
    return img if turn.is_identity else img.as_reoriented(turn.transform)
