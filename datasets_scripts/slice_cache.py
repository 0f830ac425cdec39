"""The training data: a preprocessed on-disk cache of cases, slice sampling with augmentation,
and whole-case access.

- :func:`build_cache` / :func:`load_cache`: each case preprocessed once, with the model's own
  image processor and tokenizer, into a folder of memory-mapped arrays.
- :class:`SliceDataset` and :func:`collate_slices`: augmented axial slices for training.
- :class:`CaseDataset` and :func:`collate_cases`: whole cases for grading and evaluation.

The README describes the training workflow.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from modeling_emrfuse.brats_io import (
    REFERENCE_AXCODES,
    GeometryWarning,
    affine_spacing,
    load_case,
    reoriented_image,
    to_nifti_image,
)
from modeling_emrfuse.brats_labels import GRADES, REGIONS, SEQUENCES, label_map_to_regions
from modeling_emrfuse.pipeline_emrfuse import prepare_case
from modeling_emrfuse.processing_emrfuse import (
    CropInfo,
    EmrFuseImageProcessor,
    EmrFuseProcessor,
    PreparedVolume,
    grading_slice_indices,
)
from modeling_emrfuse.runtime.strict_json import write_json

from .monai_augmentation import AUGMENTATIONS, MonaiSliceAugmentation

__all__ = [
    "CACHE_FORMAT_VERSION",
    "GRADE_IGNORE_INDEX",
    "REGION_BITS",
    "CachedCase",
    "build_cache",
    "load_cache",
    "cache_settings",
    "SliceDataset",
    "collate_slices",
    "CaseDataset",
    "collate_cases",
]

CACHE_FORMAT_VERSION = 1
REGION_BITS: Tuple[int, ...] = tuple(1 << i for i in range(len(REGIONS)))
"""Bit of each region (WT, TC, ET) in ``regions.npy``."""
GRADE_IGNORE_INDEX = -100
"""``grade_labels`` value of a case without a grade (ignored by ``torch.nn.CrossEntropyLoss``)."""

# The cache folder:
#
#   cache_dir/
#     manifest.json        format version, preprocessing settings, ids of the cached cases
#     cases/<case_id>/
#       image.npy          float16 (D, 4, H, W): slice-major, so one slice is one contiguous read
#       regions.npy        uint8 (D, H, W) region bit mask (REGION_BITS: bit 0 = WT, bit 1 = TC,
#                          bit 2 = ET), labels converted with the case's own label convention;
#                          all zero for an unlabeled case
#       meta.json          case id, grade, release, label convention, crop info, spacing, tumour
#                          slices, token ids, has_report / report_truncated, the input fingerprint,
#                          the settings hash, the original label path
_MANIFEST = "manifest.json"
_META = "meta.json"
_IMAGE = "image.npy"
_REGIONS = "regions.npy"


# --------------------------------------------------------------------------------------------
# cached case
# --------------------------------------------------------------------------------------------
@dataclass
class CachedCase:
    """One preprocessed case in the cache (metadata in memory, arrays memory-mapped on demand).

    Attributes:
        case_dir: folder of the case's arrays.
        case_id, grade (``"HGG"``/``"LGG"``/``None``), release, label_convention: as discovered.
        crop: :class:`CropInfo` of the processor's crop (maps the cached grid back to the original).
        num_slices, height, width: cached volume size ``(D, H, W)``.
        input_ids, token_type_ids: the tokenised report (int64, no padding; ``[CLS] [SEP]`` when
            there is no report).
        has_report: the case has a non-empty report; report_truncated: it was cut at max_length.
        has_label: a label map was cached.
        tumour_slices: indices (0..D-1) of slices with any tumour (WT) voxel.
        spacing: voxel size in mm of the original volume.
        label_path: the original label map file (for evaluation on the original grid), or None.
        source_dir: the case's source folder, if known.
        pad_token_id: the tokenizer's padding id (for batching).
        present: which of the four sequences (canonical order) the case has; a missing one was
            zero-filled before caching.
    """

    case_dir: Path
    case_id: str
    grade: Optional[str]
    release: Optional[str]
    label_convention: Optional[str]
    crop: CropInfo
    num_slices: int
    height: int
    width: int
    input_ids: np.ndarray
    token_type_ids: np.ndarray
    has_report: bool
    report_truncated: bool
    has_label: bool
    tumour_slices: np.ndarray
    spacing: Tuple[float, float, float]
    label_path: Optional[str] = None
    source_dir: Optional[str] = None
    pad_token_id: int = 0
    present: Tuple[bool, ...] = (True,) * len(SEQUENCES)
    meta: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def grade_label(self) -> int:
        """Grade as a class id (``GRADES.index``), or :data:`GRADE_IGNORE_INDEX` when unknown."""
        return GRADES.index(self.grade) if self.grade in GRADES else GRADE_IGNORE_INDEX

    def image(self, mmap: bool = True) -> np.ndarray:
        """The normalised volume, ``float16 (D, 4, H, W)`` (memory-mapped by default)."""
        return np.load(self.case_dir / _IMAGE, mmap_mode="r" if mmap else None)

    def region_bits(self, mmap: bool = True) -> np.ndarray:
        """The region bit mask, ``uint8 (D, H, W)`` (see :data:`REGION_BITS`)."""
        return np.load(self.case_dir / _REGIONS, mmap_mode="r" if mmap else None)

    def region_masks(self) -> np.ndarray:
        """Boolean region masks ``(3, H, W, D)`` (WT, TC, ET) on the cached grid."""
        bits = self.region_bits(mmap=False)
        return np.stack([(bits & b) > 0 for b in REGION_BITS]).transpose(0, 2, 3, 1)

    def prepared_volume(self) -> PreparedVolume:
        """The cached volume as the processor's :class:`PreparedVolume` (float32 ``(4, H, W, D)``)."""
        vol = np.ascontiguousarray(self.image(mmap=False).transpose(1, 2, 3, 0), dtype=np.float32)
        return PreparedVolume(volume=vol, crop=self.crop, present=self.present)

    @classmethod
    def from_meta(cls, case_dir: Path, meta: Mapping[str, Any]) -> "CachedCase":
        d, h, w = meta["shape"]
        return cls(
            case_dir=Path(case_dir),
            case_id=meta["case_id"],
            grade=meta.get("grade"),
            release=meta.get("release"),
            label_convention=meta.get("label_convention"),
            crop=CropInfo.from_dict(meta["crop_info"]),
            num_slices=int(d),
            height=int(h),
            width=int(w),
            input_ids=np.asarray(meta["input_ids"], dtype=np.int64),
            token_type_ids=np.asarray(meta["token_type_ids"], dtype=np.int64),
            has_report=bool(meta["has_report"]),
            report_truncated=bool(meta["report_truncated"]),
            has_label=bool(meta["has_label"]),
            tumour_slices=np.asarray(meta["tumour_slices"], dtype=np.int64),
            spacing=tuple(float(s) for s in meta["spacing"]),
            label_path=meta.get("label_path"),
            source_dir=meta.get("source_dir"),
            pad_token_id=int(meta.get("pad_token_id", 0)),
            present=tuple(bool(p) for p in meta.get("present", (True,) * len(SEQUENCES))),
            meta=dict(meta),
        )


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
@dataclass
class _Source:
    """One case to cache, whatever it came from (CaseFiles or a dataset example)."""

    case_id: str
    grade: Optional[str]
    release: Optional[str]
    label_convention: Optional[str]
    sequences: Dict[str, Any]  # canonical name -> path | nibabel-like image | array | {"path","bytes"}
    label: Any
    report: Optional[str]
    source_dir: Optional[str]


def _grade_name(value: Any, case_id: str) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if int(value) < 0:
            return None
        if int(value) >= len(GRADES):
            raise ValueError(f"Case {case_id}: grade id {value} is outside {list(range(len(GRADES)))} ({GRADES}).")
        return GRADES[int(value)]
    text = str(value).strip().upper()
    if text in ("", "NONE", "NA", "UNKNOWN"):
        return None
    if text not in GRADES:
        raise ValueError(f"Case {case_id}: grade {value!r} is not one of {GRADES}.")
    return text


def _to_source(item: Any, reports: Optional[Mapping[str, str]], allow_missing_sequences: bool = False) -> _Source:
    """Normalise a ``CaseFiles`` or a dataset example (mapping) into a :class:`_Source`."""
    if hasattr(item, "sequences") and hasattr(item, "case_id") and not isinstance(item, Mapping):  # CaseFiles
        case_id = str(item.case_id)
        report = None
        if reports is not None and case_id in reports:
            report = reports[case_id]
        elif getattr(item, "report_path", None) is not None:
            path = Path(item.report_path)
            try:
                report = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"Case {case_id}: cannot read report {path} ({type(exc).__name__}).") from exc
        missing = [s for s in SEQUENCES if s not in item.sequences]
        if missing and not allow_missing_sequences:
            raise ValueError(
                f"Case {case_id}: missing sequence(s) {missing} in {getattr(item, 'source_dir', None)} "
                "(allow_missing_sequences=True zero-fills them)."
            )
        if len(missing) == len(SEQUENCES):
            raise ValueError(f"Case {case_id}: no MRI sequence in {getattr(item, 'source_dir', None)}.")
        return _Source(
            case_id=case_id,
            grade=_grade_name(item.grade, case_id),
            release=getattr(item, "release", None),
            label_convention=getattr(item, "label_convention", None),
            sequences={s: item.sequences[s] for s in SEQUENCES if s in item.sequences},
            label=item.label,
            report=report,
            source_dir=None if getattr(item, "source_dir", None) is None else str(item.source_dir),
        )
    if isinstance(item, Mapping):
        if "case_id" not in item:
            raise ValueError(f"A case given as a mapping needs a 'case_id' key; got keys {sorted(item)}.")
        case_id = str(item["case_id"])
        seqs = item.get("sequences") or {s: item.get(s) for s in SEQUENCES}
        missing = [s for s in SEQUENCES if seqs.get(s) is None]
        if missing and (not allow_missing_sequences or len(missing) == len(SEQUENCES)):
            raise ValueError(f"Case {case_id}: missing sequence(s) {missing}.")
        report = item.get("report")
        if reports is not None and case_id in reports:
            report = reports[case_id]
        if item.get("has_report") is False:
            report = None
        label = item.get("seg", item.get("label"))
        return _Source(
            case_id=case_id,
            grade=_grade_name(item.get("grade"), case_id),
            release=item.get("release"),
            label_convention=item.get("label_convention"),
            sequences={s: seqs[s] for s in SEQUENCES if seqs.get(s) is not None},
            label=label,
            report=report,
            source_dir=item.get("source_dir"),
        )
    raise ValueError(
        f"Cannot cache {type(item).__name__}: expected a CaseFiles or a mapping with case_id and sequences."
    )


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _fingerprint_value(value: Any, mode: str, where: str) -> Any:
    """Fingerprint of one input volume: path + size + mtime (``stat``) or a content hash."""
    if isinstance(value, Mapping) and ("path" in value or "bytes" in value):  # datasets.Nifti(decode=False)
        if value.get("bytes") is not None:
            return {"bytes_sha256": hashlib.sha256(value["bytes"]).hexdigest()}
        value = value.get("path")
    filename = None
    if _is_path(value):
        filename = os.fspath(value)
    elif hasattr(value, "get_filename"):
        filename = value.get_filename()
    if filename:
        path = Path(filename)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: file {path} not found.")
        st = path.stat()
        if mode == "content":
            h = hashlib.sha256()
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            return {"path": str(path.resolve()), "sha256": h.hexdigest()}
        return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    arr = np.asarray(value.dataobj) if hasattr(value, "dataobj") else np.asarray(value)
    h = hashlib.sha256(np.ascontiguousarray(arr).view(np.uint8))
    h.update(str((arr.dtype.str, arr.shape)).encode())
    return {"array_sha256": h.hexdigest()}


def _read_image(value: Any, where: str):
    """Any supported volume value -> nibabel-like image (keeps the affine for the processor's spacing check)."""
    import nibabel as nib

    if isinstance(value, Mapping) and ("path" in value or "bytes" in value):
        if value.get("bytes") is not None:
            raw = value["bytes"]
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            return nib.Nifti1Image.from_bytes(raw)
        value = value["path"]
    if _is_path(value):
        return to_nifti_image(value)
    return value  # nibabel image or array


def _oriented(image: Any) -> Any:
    """A nibabel image in :data:`REFERENCE_AXCODES` (arrays without an affine are taken as they are)."""
    return reoriented_image(image) if hasattr(image, "affine") and hasattr(image, "as_reoriented") else image


def _as_array(value: Any) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    if hasattr(value, "dataobj") and hasattr(value, "affine"):
        return np.asarray(value.dataobj), np.asarray(value.affine)
    return np.asarray(value), None


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    return repr(obj)


def _tokenizer_fingerprint(tokenizer) -> Dict[str, Any]:
    vocab = tokenizer.get_vocab()
    vocab_hash = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()
    init = {}
    for key, value in getattr(tokenizer, "init_kwargs", {}).items():
        if any(part in key for part in ("file", "path", "dir")):
            continue  # where the tokenizer was loaded from does not change its output
        if isinstance(value, (str, int, float, bool)) or value is None:
            init[key] = value
    return {"class": type(tokenizer).__name__, "vocab_sha256": vocab_hash, "vocab_size": len(vocab), "init": init}


def cache_settings(
    image_processor: EmrFuseImageProcessor, tokenizer, max_length: Optional[int] = None
) -> Dict[str, Any]:
    """The preprocessing settings a cache depends on (a change triggers a rebuild).

    ``context_slices`` is left out: the cache stores volumes; neighbouring slices are stacked when
    slices are drawn.
    """
    proc = {k: v for k, v in image_processor.to_dict().items() if k not in ("context_slices", "processor_class")}
    if proc.get("clip_percentiles") is None:  # the neutral value of a later setting: caches built before it stay valid
        proc.pop("clip_percentiles", None)
    proc["class"] = type(image_processor).__name__
    processor = EmrFuseProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return _jsonable(
        {
            "format_version": CACHE_FORMAT_VERSION,
            "orientation": "".join(REFERENCE_AXCODES),  # volumes and label maps are cached in BraTS's orientation
            "image_processor": proc,
            "tokenizer": _tokenizer_fingerprint(tokenizer),
            "max_length": processor.text_max_length(max_length),
            "pad_token_id": int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        }
    )


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _safe_name(case_id: str) -> str:
    bad = '<>:"/\\|?*' + os.sep
    name = "".join("_" if c in bad or ord(c) < 32 else c for c in case_id)
    if name in ("", ".", ".."):
        raise ValueError(f"Case id {case_id!r} cannot be used as a folder name.")
    return name


def _atomic_save(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_json(tmp, obj, indent=1)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------
def _prepared_images(src: _Source, image_processor: EmrFuseImageProcessor) -> Tuple[PreparedVolume, List[float]]:
    """A case's sequences prepared exactly as the pipeline prepares them (:func:`pipeline_emrfuse.prepare_case`:
    BraTS's orientation, the model's voxel grid, z-score, crop, pad), and their voxel size in that orientation."""
    images = {s: _read_image(v, f"case {src.case_id} sequence {s}") for s, v in src.sequences.items()}
    missing = len(images) < len(SEQUENCES)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GeometryWarning)  # the header was read and checked already
            case = load_case(images, allow_missing_sequences=missing)
        ready = prepare_case(case, image_processor, allow_missing_sequences=missing)
    except ValueError as exc:
        raise ValueError(f"Case {src.case_id}: {exc}") from exc
    oriented_spacing = affine_spacing(ready.reorientation.affine(case.affine))
    return ready.prepared, [float(v) for v in oriented_spacing]


def _process_volumes(src: _Source, case_dir: Path, image_processor: EmrFuseImageProcessor) -> Dict[str, Any]:
    """Read, preprocess and write one case's arrays; returns the array-related metadata."""
    prepared, spacing = _prepared_images(src, image_processor)
    vol = prepared.volume  # (4, H, W, D) float32
    image = np.ascontiguousarray(vol.transpose(3, 0, 1, 2), dtype=np.float16)  # (D, 4, H, W)
    if not np.isfinite(image).all():
        raise ValueError(f"Case {src.case_id}: normalised intensities overflow float16 (|z| > 65504).")

    d, h, w = vol.shape[3], vol.shape[1], vol.shape[2]
    has_label = src.label is not None
    if has_label:
        label_img = _oriented(_read_image(src.label, f"case {src.case_id} label"))
        label, _ = _as_array(label_img)
        if tuple(label.shape) != tuple(prepared.crop.original_shape):
            raise ValueError(
                f"Case {src.case_id}: label map shape {tuple(label.shape)} differs from the images' "
                f"{tuple(prepared.crop.original_shape)}."
            )
        conv = src.label_convention or "brats2017"
        if np.issubdtype(label.dtype, np.floating):
            if not np.all(np.equal(np.mod(label, 1), 0)):
                raise ValueError(f"Case {src.case_id}: label map holds non-integer values.")
            label = label.astype(np.int16)
        regions = label_map_to_regions(label, conv, where=f"case {src.case_id} label map")
        bits = np.zeros(label.shape, dtype=np.uint8)
        for r, b in zip(regions, REGION_BITS):
            bits |= r.astype(np.uint8) * np.uint8(b)
        bits = image_processor.crop_label_map(bits, prepared.crop)  # (H, W, D)
        bits = np.ascontiguousarray(bits.transpose(2, 0, 1))
    else:
        bits = np.zeros((d, h, w), dtype=np.uint8)
    tumour_slices = np.flatnonzero(bits.reshape(d, -1).any(axis=1)).tolist()

    case_dir.mkdir(parents=True, exist_ok=True)
    _atomic_save(image, case_dir / _IMAGE)
    _atomic_save(bits, case_dir / _REGIONS)
    label_path = None
    if has_label and (_is_path(src.label) or isinstance(src.label, Mapping)):
        lp = src.label.get("path") if isinstance(src.label, Mapping) else src.label
        label_path = None if lp is None else str(Path(lp).resolve()) if Path(lp).exists() else str(lp)
    return {
        "shape": [int(d), int(h), int(w)],
        "crop_info": prepared.crop.to_dict(),
        "has_label": bool(has_label),
        "tumour_slices": tumour_slices,
        "spacing": spacing,
        "label_path": label_path,
        "present": [bool(p) for p in prepared.present],
    }


def _worker(args):
    src, case_dir, image_processor = args
    return _process_volumes(src, case_dir, image_processor)


def _load_meta(case_dir: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((case_dir / _META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _arrays_ok(case_dir: Path, meta: Mapping[str, Any]) -> bool:
    try:
        d, h, w = meta["shape"]
        img = np.load(case_dir / _IMAGE, mmap_mode="r")
        reg = np.load(case_dir / _REGIONS, mmap_mode="r")
        return img.shape == (d, len(SEQUENCES), h, w) and reg.shape == (d, h, w)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_unique_ids(sources: Sequence[_Source]) -> None:
    seen: Dict[str, int] = {}
    for i, s in enumerate(sources):
        if s.case_id in seen:
            raise ValueError(f"Duplicate case id {s.case_id!r} (inputs {seen[s.case_id]} and {i}).")
        seen[s.case_id] = i


def _case_key(src: _Source, settings_hash: str, fingerprint: str) -> str:
    """What a cached case depends on: its input files (size + modification time, or a content hash
    with ``fingerprint="content"``), the report text, grade, release, label convention and the
    preprocessing settings. A change to any of them rebuilds the case."""
    where = f"case {src.case_id}"
    inputs = {s: _fingerprint_value(v, fingerprint, f"{where} sequence {s}") for s, v in src.sequences.items()}
    if src.label is not None:
        inputs["seg"] = _fingerprint_value(src.label, fingerprint, f"{where} label")
    return _hash(
        {
            "settings": settings_hash,
            "inputs": inputs,
            "report_sha256": None if src.report is None else hashlib.sha256(src.report.encode("utf-8")).hexdigest(),
            "grade": src.grade,
            "release": src.release,
            "label_convention": src.label_convention,
        }
    )


def _plan_rebuilds(
    sources: Sequence[_Source], cache_dir: Path, settings_hash: str, fingerprint: str, force: bool
) -> Tuple[List[Optional[Dict[str, Any]]], List[Tuple[int, Dict[str, Any]]]]:
    """The metadata of the cases that are up to date (``None`` elsewhere) and the cases to rebuild."""
    metas: List[Optional[Dict[str, Any]]] = [None] * len(sources)
    todo: List[Tuple[int, Dict[str, Any]]] = []
    for i, src in enumerate(sources):
        key = _case_key(src, settings_hash, fingerprint)
        case_dir = cache_dir / "cases" / _safe_name(src.case_id)
        old = None if force else _load_meta(case_dir)
        if old is not None and old.get("key") == key and _arrays_ok(case_dir, old):
            metas[i] = old
        else:
            todo.append((i, {"key": key, "case_dir": case_dir}))
    return metas, todo


def _run_volume_jobs(jobs: List[Tuple[Any, ...]], num_workers: int, bar) -> List[Dict[str, Any]]:
    """Preprocess the cases' volumes, in worker processes when ``num_workers > 1``."""
    volume_metas = []
    if num_workers and num_workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=int(num_workers), mp_context=get_context("fork")) as pool:
            for r in pool.map(_worker, jobs):
                volume_metas.append(r)
                bar.update(1)
    else:
        for job in jobs:
            volume_metas.append(_worker(job))
            bar.update(1)
    return volume_metas


def _case_meta(
    src: _Source,
    vmeta: Dict[str, Any],
    processor: EmrFuseProcessor,
    settings: Mapping[str, Any],
    settings_hash: str,
    key: str,
) -> Dict[str, Any]:
    """A case's ``meta.json``: its identity, the array metadata and the encoded report."""
    enc = processor.encode_reports([src.report], max_length=settings["max_length"], return_tensors=None)
    n = int(np.asarray(enc["attention_mask"])[0].sum())
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "case_id": src.case_id,
        "grade": src.grade,
        "release": src.release,
        "label_convention": src.label_convention,
        "source_dir": src.source_dir,
        **vmeta,
        "input_ids": np.asarray(enc["input_ids"])[0, :n].tolist(),
        "token_type_ids": np.asarray(enc["token_type_ids"])[0, :n].tolist(),
        "has_report": bool(np.asarray(enc["has_report"])[0]),
        "report_truncated": bool(np.asarray(enc["report_truncated"])[0]),
        "pad_token_id": settings["pad_token_id"],
        "settings_hash": settings_hash,
        "key": key,
        "built_at": time.time(),
    }


def _write_manifest(
    cache_dir: Path, settings: Mapping[str, Any], settings_hash: str, sources: Sequence[_Source]
) -> None:
    """Record the cached case ids; several splits may share one cache folder, so the ids of an
    earlier build with the same settings are kept."""
    manifest_path = cache_dir / _MANIFEST
    old_manifest = _load_json(manifest_path)
    known = set()
    if old_manifest and old_manifest.get("settings_hash") == settings_hash:
        known = set(old_manifest.get("cases", []))
    known |= {s.case_id for s in sources}
    _atomic_json(
        {
            "format_version": CACHE_FORMAT_VERSION,
            "settings": settings,
            "settings_hash": settings_hash,
            "cases": sorted(known),
        },
        manifest_path,
    )


def build_cache(
    cases: Iterable[Any],
    cache_dir: Union[str, Path],
    image_processor: EmrFuseImageProcessor,
    tokenizer,
    max_length: Optional[int] = None,
    reports: Optional[Mapping[str, str]] = None,
    fingerprint: str = "stat",
    num_workers: int = 0,
    progress: bool = True,
    force: bool = False,
    allow_missing_sequences: bool = False,
) -> List[CachedCase]:
    """Preprocess cases once into ``cache_dir``, rebuilding only the cases whose inputs or
    preprocessing settings changed.

    The volumes are prepared as the pipeline prepares them (:func:`_prepared_images`) and the
    reports encoded through :meth:`EmrFuseProcessor.encode_reports`; the folder layout is
    described above ``_MANIFEST``.

    Arrays are written to a temporary file and renamed, and ``meta.json`` is written last, so an
    interrupted build leaves no half-written case behind.

    Args:
        cases: :class:`~modeling_emrfuse.brats_io.CaseFiles` (from ``discover_cases``) or
            dataset examples (mappings with ``case_id``, the four sequences as paths / nibabel
            images / arrays / ``{"path", "bytes"}``, optional ``seg``, ``grade`` (name or class id,
            -1 unknown), ``report``, ``has_report``, ``label_convention``, ``release``).
        cache_dir: cache folder (created).
        image_processor: the model's :class:`EmrFuseImageProcessor`; its normalisation and crop are used.
        tokenizer: any BERT-family tokenizer; reports are encoded through
            :meth:`EmrFuseProcessor.encode_reports` with ``max_length``.
        max_length: maximum report length in tokens (default: the tokenizer's, else 512).
        reports: optional ``case_id -> text`` overriding per-case report files.
        fingerprint: ``"stat"`` (path, size and modification time of each input file) or
            ``"content"`` (SHA-256 of the file bytes) to decide whether a case changed.
        num_workers: processes used to preprocess volumes (0 = in this process).
        progress: show a tqdm progress bar.
        force: rebuild every case even if it is up to date.
        allow_missing_sequences: accept cases that lack some of the four sequences (at least one
            present): the missing ones are zero-filled and recorded in ``CachedCase.present``.

    Returns:
        One :class:`CachedCase` per input case, in input order. Raises ``ValueError`` naming the
        case for bad input (missing sequence, shapes that differ, label values outside the case's
        convention, duplicate case ids, wrong spacing as checked by the processor, ...).
    """
    if fingerprint not in ("stat", "content"):
        raise ValueError(f"fingerprint must be 'stat' or 'content', got {fingerprint!r}.")
    cache_dir = Path(cache_dir)
    (cache_dir / "cases").mkdir(parents=True, exist_ok=True)
    settings = cache_settings(image_processor, tokenizer, max_length)
    settings_hash = _hash(settings)
    processor = EmrFuseProcessor(image_processor=image_processor, tokenizer=tokenizer)

    sources = [_to_source(item, reports, allow_missing_sequences) for item in cases]
    _check_unique_ids(sources)
    metas, todo = _plan_rebuilds(sources, cache_dir, settings_hash, fingerprint, force)

    bar = tqdm(
        total=len(sources), desc="caching cases", unit="case", disable=not progress, initial=len(sources) - len(todo)
    )
    try:
        jobs = [(sources[i], info["case_dir"], image_processor) for i, info in todo]
        volume_metas = _run_volume_jobs(jobs, num_workers, bar)
    finally:
        bar.close()

    for (i, info), vmeta in zip(todo, volume_metas):
        meta = _case_meta(sources[i], vmeta, processor, settings, settings_hash, info["key"])
        _atomic_json(meta, info["case_dir"] / _META)
        metas[i] = meta

    _write_manifest(cache_dir, settings, settings_hash, sources)
    return [CachedCase.from_meta(cache_dir / "cases" / _safe_name(s.case_id), m) for s, m in zip(sources, metas)]


def _load_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_cache(cache_dir: Union[str, Path], case_ids: Optional[Sequence[str]] = None) -> List[CachedCase]:
    """Open an existing cache without checking inputs (e.g. in worker processes).

    ``case_ids``: which cases, in this order (default: every case of the manifest). Raises
    ``ValueError`` when the cache or a case is missing or was built with other settings.
    """
    cache_dir = Path(cache_dir)
    manifest = _load_json(cache_dir / _MANIFEST)
    if manifest is None:
        raise ValueError(f"{cache_dir}: no cache manifest ({_MANIFEST}); run build_cache first.")
    ids = list(manifest["cases"]) if case_ids is None else list(case_ids)
    out = []
    for cid in ids:
        case_dir = cache_dir / "cases" / _safe_name(cid)
        meta = _load_meta(case_dir)
        if meta is None:
            raise ValueError(f"{cache_dir}: case {cid} is not in the cache.")
        if meta.get("settings_hash") != manifest["settings_hash"]:
            raise ValueError(
                f"{cache_dir}: case {cid} was cached with other preprocessing settings; rebuild the cache."
            )
        out.append(CachedCase.from_meta(case_dir, meta))
    return out


# --------------------------------------------------------------------------------------------
# slice sampling
# --------------------------------------------------------------------------------------------
def _pair(size: Union[int, Sequence[int], None]) -> Optional[Tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        return (int(size), int(size))
    h, w = (int(s) for s in size)
    return (h, w)


class _CacheReader:
    """Lazily memory-maps the cached arrays (per process; never pickled)."""

    def __init__(self, cases: Sequence[CachedCase]):
        self.cases = list(cases)
        self._maps: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self):
        return {"cases": self.cases, "_maps": {}}

    def arrays(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        m = self._maps.get(i)
        if m is None:
            m = (self.cases[i].image(mmap=True), self.cases[i].region_bits(mmap=True))
            self._maps[i] = m
        return m

    def read(self, i: int, z: int, context: int) -> Tuple[np.ndarray, np.ndarray]:
        """``float32 (C, H, W)`` slice with context channels (edges replicated) and its ``uint8 (H, W)`` bits."""
        image, bits = self.arrays(i)
        depth = image.shape[0]
        if context:
            idx = np.clip(np.arange(z - context, z + context + 1), 0, depth - 1)
            lo, hi = int(idx.min()), int(idx.max()) + 1
            block = np.asarray(image[lo:hi])[idx - lo]  # one contiguous read
            x = block.reshape(-1, image.shape[2], image.shape[3]).astype(np.float32)
        else:
            x = np.asarray(image[z], dtype=np.float32)
        return x, np.asarray(bits[z])


class _OneThread:
    """Run the data pipeline's tensor ops (one slice's resampling, a batch's stacking) on one thread.

    These ops are small and memory-bound; with several OpenMP threads on a busy machine they spend
    their time in synchronisation (measured: collating 16 slices of 160 x 192 took 260 ms on two
    threads instead of 2 ms on one). DataLoader workers already use one thread; in the main
    process the previous setting is restored afterwards, so the model keeps its threads.
    """

    def __enter__(self):
        self.previous = torch.get_num_threads()
        if self.previous != 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.previous != 1:
            torch.set_num_threads(self.previous)
        return False


def _centre_fit(x: torch.Tensor, size: Tuple[int, int], offset: Tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Crop / zero-pad the last two axes to ``size``; the centre is kept (plus ``offset`` for random crops).

    Padding is split like the processor's (``total // 2`` before)."""
    h, w = x.shape[-2:]
    out = x
    for axis, (n, target, off) in enumerate(zip((h, w), size, offset)):
        dim = x.dim() - 2 + axis
        if n > target:
            start = (n - target) // 2 + off
            start = min(max(start, 0), n - target)
            out = out.narrow(dim, start, target)
        elif n < target:
            total = target - n
            before = total // 2 + off
            before = min(max(before, 0), total)
            pad = [0, 0, 0, 0]
            pad[(1 - axis) * 2] = before
            pad[(1 - axis) * 2 + 1] = total - before
            out = F.pad(out, pad)
    return out


def case_draw_weights(num_slices: Sequence[int], grades: Optional[Sequence[Optional[str]]] = None) -> np.ndarray:
    """Probability of drawing each case: proportional to its slices; with ``grades``, every grade present gets an
    equal share and a case without a grade none (ValueError when no case has a grade)."""
    n = np.asarray(num_slices, dtype=np.float64)
    if grades is None:
        return n / n.sum()
    names = sorted({g for g in grades if g is not None})
    if not names:
        raise ValueError("balance_grades needs cases with a grade; none of these cases has one.")
    weights = np.zeros_like(n)
    for name in names:
        mask = np.array([g == name for g in grades])
        weights[mask] = n[mask] / n[mask].sum() / len(names)
    return weights


class SliceDataset(Dataset):
    """Axial slices drawn from cached cases, with tumour oversampling and augmentation.

    A case is drawn (weighted by its number of slices), then a slice of it that contains tumour
    with probability ``tumour_prob`` (else any slice), with ``context_slices`` neighbours as
    channels exactly like :meth:`EmrFuseImageProcessor.slices` (edges replicated). Training
    samples get the paper's augmentation: random rotation, isotropic scaling, translation and
    mirror flips, composed into ONE affine per sample and applied with
    :func:`torch.nn.functional.grid_sample` to the image (bilinear) and to the region bit mask
    (nearest), so image and label stay aligned; the output is a fixed ``image_size`` (random
    crop/pad in training, centred crop/pad in evaluation).

    Mirror flips and reports: a left-right flip moves the tumour to the other hemisphere, which the
    report names; set ``flip_axes=()`` (or ``(1,)``) when the model should be able to rely on the
    report's side.

    Args:
        cases: :class:`CachedCase` list (from :func:`build_cache` / :func:`load_cache`).
        image_size: output ``(H, W)`` (int or pair); default the largest cached size.
        context_slices: neighbours on each side stacked as channels (``4 * (2k + 1)`` channels);
            ``None`` takes ``image_processor.context_slices`` when a processor is given, else 0.
        image_processor: optional, only to read ``context_slices``.
        train: random sampling + augmentation (``True``) or every slice of every case once, in
            order, centred (``False``).
        samples_per_epoch: items per epoch in training (default: the total number of slices).
        tumour_prob: probability that a drawn slice is drawn among the case's slices containing
            tumour (otherwise among all its slices); cases are drawn proportionally to their slices.
        slices_per_case: consecutive indices ``[g * n, (g + 1) * n)`` share one case, so that a
            batch of ``N`` sequential indices holds about ``N / n`` cases (their reports are then
            encoded once per case). Use with an unshuffled sampler (sampling is already random).
        augment: apply the augmentation in training (``False``: random crop / pad only, like ``augmentation="none"``).
        augmentation: ``"paper"`` (default: the hand-written affine described above), ``"monai"`` (a MONAI
            dictionary pipeline: flips, rotation + scaling + translation, small elastic, noise, gamma, bias field,
            intensity scale / shift; see :mod:`datasets_scripts.monai_augmentation`; needs ``pip install monai``) or
            ``"none"``. ``rotation`` / ``scale`` / ``translation`` / ``flip_axes`` / ``flip_prob`` configure
            ``"paper"``; ``"monai"`` takes ``flip_axes`` / ``flip_prob`` and its own nnU-Net-like ranges and
            probabilities, which ``augmentation_options`` (keyword arguments of
            :class:`~datasets_scripts.monai_augmentation.MonaiSliceAugmentation`) may change.
        rotation: maximum rotation in degrees (uniform in ``[-rotation, rotation]``).
        scale: ``(min, max)`` isotropic scale factor.
        translation: maximum shift as a fraction of the slice size, per axis.
        flip_axes: array axes (0 = H, i.e. left-right for BraTS; 1 = W, anterior-posterior) each
            mirrored with probability ``flip_prob``.
        flip_prob: probability of each flip.
        seed: base seed; items depend only on ``(seed, epoch, index)``, so results do not depend on
            the number of workers.
        require_labels: raise if a case has no label map (training needs labels).
        sequence_dropout: in training, probability that each present sequence of a drawn slice is
            dropped (zero-filled, like a missing sequence at inference); at least one sequence is
            always kept. Teaches one model to serve cases with any subset of the four sequences.
        presence_channels: append the four sequence-presence channels (1 present / 0 missing or
            dropped), as ``EmrFuseImageProcessor(sequence_presence=True)`` does; ``None`` takes the
            processor's ``sequence_presence`` when a processor is given, else ``False``.
        balance_grades: draw cases so that every grade present (HGG, LGG) gets the same share of the drawn
            cases, each case within its grade proportionally to its slices (training the grading head on
            293:76-like cohorts otherwise lets it collapse to the majority grade). Cases without a grade are
            not drawn. ``False``: every case proportionally to its slices.
        grading_bag: draw each slice among the positions the grading bag policy pools at inference
            (:func:`~modeling_emrfuse.processing_emrfuse.grading_slice_indices` with ``grading_slices``), uniformly,
            instead of the tumour-weighted draw: a grading model then trains on the slices it is evaluated on.
        grading_slices: the policy's number of slices (``config.grading_slices``; None: every slice).

    Items: dict with ``pixel_values`` float32 ``(C, H, W)``, ``labels`` float32 ``(3, H, W)``
    (WT, TC, ET), ``case_index``, ``slice_index``, ``case_id``, ``input_ids``, ``token_type_ids``,
    ``has_report``, ``grade_label``, ``pad_token_id``. Batch them with :func:`collate_slices`.
    """

    def __init__(
        self,
        cases: Sequence[CachedCase],
        image_size: Union[int, Sequence[int], None] = None,
        context_slices: Optional[int] = None,
        image_processor: Optional[EmrFuseImageProcessor] = None,
        train: bool = True,
        samples_per_epoch: Optional[int] = None,
        tumour_prob: float = 0.5,
        slices_per_case: int = 1,
        augment: bool = True,
        augmentation: str = "paper",
        augmentation_options: Optional[Mapping[str, Any]] = None,
        rotation: float = 15.0,
        scale: Tuple[float, float] = (0.9, 1.1),
        translation: float = 0.1,
        flip_axes: Sequence[int] = (0,),
        flip_prob: float = 0.5,
        seed: int = 0,
        require_labels: bool = True,
        sequence_dropout: float = 0.0,
        presence_channels: Optional[bool] = None,
        balance_grades: bool = False,
        grading_bag: bool = False,
        grading_slices: Optional[int] = None,
    ):
        if not cases:
            raise ValueError("SliceDataset needs at least one cached case.")
        if not 0.0 <= float(sequence_dropout) < 1.0:
            raise ValueError(f"sequence_dropout must be in [0, 1), got {sequence_dropout}.")
        if presence_channels is None:
            presence_channels = bool(getattr(image_processor, "sequence_presence", False))
        if context_slices is None:
            context_slices = image_processor.context_slices if image_processor is not None else 0
        if int(context_slices) < 0:
            raise ValueError(f"context_slices must be >= 0, got {context_slices}.")
        if not 0.0 <= float(tumour_prob) <= 1.0:
            raise ValueError(f"tumour_prob must be in [0, 1], got {tumour_prob}.")
        if int(slices_per_case) < 1:
            raise ValueError(f"slices_per_case must be >= 1, got {slices_per_case}.")
        if any(a not in (0, 1) for a in flip_axes):
            raise ValueError(f"flip_axes must hold 0 (H) and/or 1 (W), got {tuple(flip_axes)}.")
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}.")
        lo, hi = (float(s) for s in scale)
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale}.")
        if require_labels:
            missing = [c.case_id for c in cases if not c.has_label]
            if missing:
                raise ValueError(f"Cases without a label map cannot be used for training: {missing[:5]}.")
        self.cases = list(cases)
        self.reader = _CacheReader(self.cases)
        self.context_slices = int(context_slices)
        self.image_size = _pair(image_size) or (max(c.height for c in cases), max(c.width for c in cases))
        self.train = bool(train)
        self.tumour_prob = float(tumour_prob)
        self.slices_per_case = int(slices_per_case)
        self.augmentation = augmentation if augment else "none"
        self.augment = self.augmentation != "none"
        self._monai = None
        if self.train and self.augmentation == "monai":
            options = {"flip_axes": flip_axes, "flip_prob": flip_prob, **(augmentation_options or {})}
            self._monai = MonaiSliceAugmentation(self.image_size, context_slices=self.context_slices, **options)
        self.rotation = float(rotation)
        self.scale = (lo, hi)
        self.translation = float(translation)
        self.flip_axes = tuple(int(a) for a in flip_axes)
        self.flip_prob = float(flip_prob)
        self.seed = int(seed)
        self.sequence_dropout = float(sequence_dropout)
        self.presence_channels = bool(presence_channels)
        self.epoch = 0
        self._num_slices = np.array([c.num_slices for c in self.cases], dtype=np.int64)
        self.balance_grades = bool(balance_grades)
        self.grading_bag = bool(grading_bag)
        self.grading_slices = grading_slices
        self._case_weights = case_draw_weights(
            self._num_slices, [c.grade for c in self.cases] if balance_grades else None
        )
        self._offsets = np.concatenate([[0], np.cumsum(self._num_slices)])
        self.samples_per_epoch = int(samples_per_epoch) if samples_per_epoch else int(self._offsets[-1])

    @property
    def in_channels(self) -> int:
        return len(SEQUENCES) * (2 * self.context_slices + 1) + (len(SEQUENCES) if self.presence_channels else 0)

    def present_for(self, ci: int, rng: Optional[np.random.Generator]) -> np.ndarray:
        """The sequences a drawn slice keeps: the case's own, minus random drops in training."""
        present = np.array(self.cases[ci].present, dtype=bool)
        if rng is not None and self.sequence_dropout > 0:
            drop = rng.random(len(present)) < self.sequence_dropout
            if (present & ~drop).any():
                present &= ~drop
        return present

    def set_epoch(self, epoch: int) -> None:
        """Change the random draws (call at the start of each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch if self.train else int(self._offsets[-1])

    def _draw(self, index: int) -> Tuple[int, int, np.random.Generator]:
        group = index // self.slices_per_case
        case_rng = np.random.default_rng([self.seed, self.epoch, group, 0])
        ci = int(case_rng.choice(len(self.cases), p=self._case_weights))
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])
        if self.grading_bag:  # the grading bag policy's positions, as evaluation and inference pool them
            positions = grading_slice_indices(self.cases[ci].num_slices, self.grading_slices)
            return ci, int(positions[rng.integers(positions.size)]), rng
        tumour = self.cases[ci].tumour_slices
        if tumour.size and rng.random() < self.tumour_prob:
            z = int(tumour[rng.integers(tumour.size)])
        else:
            z = int(rng.integers(self.cases[ci].num_slices))
        return ci, z, rng

    def locate(self, index: int) -> Tuple[int, int]:
        """``(case index, slice index)`` of item ``index`` (evaluation order, or this epoch's draw)."""
        if self.train:
            ci, z, _ = self._draw(index)
            return ci, z
        if not 0 <= index < self._offsets[-1]:
            raise IndexError(index)
        ci = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return ci, int(index - self._offsets[ci])

    def _theta(self, rng: np.random.Generator, in_hw: Tuple[int, int]) -> torch.Tensor:
        """One 2x3 ``affine_grid`` matrix: output (augmented) normalised coords -> input normalised coords.

        Composes a random crop offset (when the input is larger than the output), translation,
        rotation, isotropic scaling and flips. Coordinates are ordered (W, H) as ``affine_grid`` expects.
        """
        hi, wi = in_hw
        ho, wo = self.image_size
        s_in = np.array([wi, hi], dtype=np.float64)
        s_out = np.array([wo, ho], dtype=np.float64)
        angle = math.radians(rng.uniform(-self.rotation, self.rotation)) if self.rotation else 0.0
        scale = rng.uniform(*self.scale)
        flips = np.ones(2)
        for axis in self.flip_axes:  # array axis 0 = H = affine_grid y (index 1); axis 1 = W = x (index 0)
            if rng.random() < self.flip_prob:
                flips[1 - axis] = -1.0
        c, s = math.cos(angle), math.sin(angle)
        m = np.array([[c, -s], [s, c]]) @ np.diag(flips) / scale  # output offset -> input offset (pixels)
        shift = rng.uniform(-self.translation, self.translation, size=2) * s_in
        slack = np.maximum(s_in - s_out, 0) / 2.0
        shift += rng.uniform(-slack, slack)  # random crop when the input is larger
        theta = np.zeros((2, 3))
        theta[:, :2] = np.diag(2.0 / s_in) @ m @ np.diag(s_out / 2.0)
        theta[:, 2] = 2.0 * shift / s_in
        return torch.from_numpy(theta).float()

    def _random_fit(
        self, x: torch.Tensor, bits: torch.Tensor, rng: np.random.Generator
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Crop / pad image and label to ``image_size`` at one random offset (a random crop when larger)."""
        hi, wi = x.shape[-2:]
        ho, wo = self.image_size
        offset = tuple(int(rng.integers(-(abs(n - t) // 2), abs(n - t) // 2 + 1)) for n, t in zip((hi, wi), (ho, wo)))
        return _centre_fit(x, self.image_size, offset), _centre_fit(bits, self.image_size, offset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        with _OneThread():
            return self._item(int(index))

    def _item(self, index: int) -> Dict[str, Any]:
        if self.train:
            ci, z, rng = self._draw(int(index))
        else:
            ci, z = self.locate(int(index))
            rng = None
        case = self.cases[ci]
        x_np, bits_np = self.reader.read(ci, z, self.context_slices)
        present = self.present_for(ci, rng if self.train else None)
        if not present.all():  # zero-fill dropped sequences in every context slice
            x_np = x_np.reshape(-1, len(SEQUENCES), *x_np.shape[1:])
            x_np[:, ~present] = 0.0
            x_np = x_np.reshape(-1, *x_np.shape[2:])
        x = torch.from_numpy(x_np)
        bits = torch.from_numpy(bits_np.astype(np.float32))[None]
        if self.train and self._monai is not None:  # random crop / pad, then MONAI's transforms
            x, bits = self._random_fit(x, bits, rng)
            x, bits = self._monai(x, bits, seed=int(rng.integers(2**32)), present=present)
        elif self.train and self.augment:
            theta = self._theta(rng, x.shape[-2:])
            ho, wo = self.image_size
            grid = F.affine_grid(theta[None], [1, 1, ho, wo], align_corners=False)
            x = F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
            bits = F.grid_sample(bits[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
        elif self.train:
            x, bits = self._random_fit(x, bits, rng)
        else:
            x, bits = _centre_fit(x, self.image_size), _centre_fit(bits, self.image_size)
        b = bits[0].to(torch.uint8)
        labels = torch.stack([(b & bit) > 0 for bit in REGION_BITS]).float()
        if self.presence_channels:
            planes = torch.from_numpy(present.astype(np.float32))[:, None, None].expand(-1, *x.shape[-2:])
            x = torch.cat([x, planes])
        return {
            "pixel_values": x.contiguous(),
            "labels": labels,
            "case_index": ci,
            "slice_index": z,
            "case_id": case.case_id,
            "input_ids": case.input_ids,
            "token_type_ids": case.token_type_ids,
            "has_report": case.has_report,
            "grade_label": case.grade_label,
            "pad_token_id": case.pad_token_id,
        }


def _pad_tokens(rows: Sequence[np.ndarray], types: Sequence[np.ndarray], pad_id: int):
    length = max(int(r.size) for r in rows)
    ids = torch.full((len(rows), length), int(pad_id), dtype=torch.long)
    tt = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, types)):
        n = int(r.size)
        ids[i, :n] = torch.as_tensor(r, dtype=torch.long)
        tt[i, :n] = torch.as_tensor(t, dtype=torch.long)
        mask[i, :n] = 1
    return ids, mask, tt


def collate_slices(batch: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Batch :class:`SliceDataset` items; each case's report appears ONCE.

    Returns ``pixel_values (N, C, H, W)``, ``labels (N, 3, H, W)``, ``input_ids`` /
    ``attention_mask`` / ``token_type_ids`` ``(B, L)`` (one row per distinct case, in order of first
    appearance, padded to the longest), ``slice_to_case (N,)`` (row of each slice's report),
    ``has_report (B,)``, ``grade_labels (B,)`` (``-100`` = unknown grade), ``case_ids`` (B strings),
    ``slice_indices (N,)``.
    """
    if not batch:
        raise ValueError("collate_slices got an empty batch.")
    with _OneThread():
        return _collate_slices(batch)


def _collate_slices(batch: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    order: Dict[str, int] = {}
    firsts = []
    slice_to_case = []
    for item in batch:
        cid = item["case_id"]
        if cid not in order:
            order[cid] = len(order)
            firsts.append(item)
        slice_to_case.append(order[cid])
    ids, mask, tt = _pad_tokens(
        [f["input_ids"] for f in firsts], [f["token_type_ids"] for f in firsts], firsts[0]["pad_token_id"]
    )
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "labels": torch.stack([item["labels"] for item in batch]),
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": tt,
        "slice_to_case": torch.tensor(slice_to_case, dtype=torch.long),
        "has_report": torch.tensor([bool(f["has_report"]) for f in firsts]),
        "grade_labels": torch.tensor([int(f["grade_label"]) for f in firsts], dtype=torch.long),
        "case_ids": list(order),
        "slice_indices": torch.tensor([int(item["slice_index"]) for item in batch], dtype=torch.long),
    }


# --------------------------------------------------------------------------------------------
# whole cases
# --------------------------------------------------------------------------------------------
class CaseDataset(Dataset):
    """Whole cached cases, for grading and whole-volume evaluation.

    Args:
        cases: :class:`CachedCase` list.
        context_slices: as in :class:`SliceDataset` (``None``: from ``image_processor`` or 0).
        image_processor: optional, for ``context_slices``.
        image_size: ``None`` keeps each case's cached size; a larger ``(H, W)`` pads every case to
            it (centred, like the processor) and the returned ``crop_info`` records that padding, so
            :meth:`EmrFuseImageProcessor.post_process_segmentation` still maps back exactly.
        with_labels: include ``labels (D, 3, H, W)`` (zeros for an unlabeled case, with
            ``has_label=False``).
        presence_channels: append the four sequence-presence channels (``None``: the processor's
            ``sequence_presence``, else ``False``).

    Items: ``pixel_values (D, C, H, W)`` float32 (the same values as
    ``image_processor.slices(case.prepared_volume())`` up to float16 storage), ``labels``,
    ``input_ids`` / ``attention_mask`` / ``token_type_ids`` ``(1, L)``, ``has_report (1,)``,
    ``grade_labels (1,)``, ``slice_to_case (D,)`` zeros, ``case_id``, ``crop_info`` (dict),
    ``label_path``, ``label_convention``, ``spacing``, ``source_dir``, ``has_label``.
    """

    def __init__(
        self,
        cases: Sequence[CachedCase],
        context_slices: Optional[int] = None,
        image_processor: Optional[EmrFuseImageProcessor] = None,
        image_size: Union[int, Sequence[int], None] = None,
        with_labels: bool = True,
        presence_channels: Optional[bool] = None,
    ):
        if context_slices is None:
            context_slices = image_processor.context_slices if image_processor is not None else 0
        if presence_channels is None:
            presence_channels = bool(getattr(image_processor, "sequence_presence", False))
        self.presence_channels = bool(presence_channels)
        self.cases = list(cases)
        self.context_slices = int(context_slices)
        self.image_size = _pair(image_size)
        self.with_labels = bool(with_labels)
        if self.image_size is not None:
            small = [c.case_id for c in self.cases if c.height > self.image_size[0] or c.width > self.image_size[1]]
            if small:
                raise ValueError(
                    f"image_size {self.image_size} is smaller than the cached size of case(s) {small[:5]}; "
                    "whole-case access never crops the brain."
                )

    def __len__(self) -> int:
        return len(self.cases)

    def _crop_info(self, case: CachedCase) -> CropInfo:
        if self.image_size is None:
            return case.crop
        h, w, _ = case.crop.cropped_shape
        pads = []
        for n, target in zip((h, w), self.image_size):
            total = target - n
            pads.append((total // 2, total - total // 2))
        return CropInfo(original_shape=case.crop.original_shape, bbox=case.crop.bbox, pad=tuple(pads))

    def __getitem__(self, index: int) -> Dict[str, Any]:
        with _OneThread():
            return self._item(int(index))

    def _item(self, index: int) -> Dict[str, Any]:
        case = self.cases[int(index)]
        image = np.asarray(case.image(mmap=True), dtype=np.float32)  # (D, 4, H, W)
        d = image.shape[0]
        k = self.context_slices
        if k:
            idx = np.clip(np.arange(d)[:, None] + np.arange(-k, k + 1)[None, :], 0, d - 1)
            image = image[idx].reshape(d, -1, image.shape[2], image.shape[3])
        x = torch.from_numpy(np.ascontiguousarray(image))
        crop = self._crop_info(case)
        if self.image_size is not None:
            x = self._repad(x, case, crop)
        if self.presence_channels:
            x = torch.from_numpy(EmrFuseImageProcessor.append_presence(x.numpy(), case.present))
        item: Dict[str, Any] = {
            "pixel_values": x,
            "case_id": case.case_id,
            "crop_info": crop.to_dict(),
            "label_path": case.label_path,
            "label_convention": case.label_convention,
            "spacing": case.spacing,
            "source_dir": case.source_dir,
            "has_label": case.has_label,
            "slice_to_case": torch.zeros(d, dtype=torch.long),
            "has_report": torch.tensor([case.has_report]),
            "grade_labels": torch.tensor([case.grade_label], dtype=torch.long),
        }
        ids, mask, tt = _pad_tokens([case.input_ids], [case.token_type_ids], case.pad_token_id)
        item.update(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        item["pad_token_id"] = case.pad_token_id
        if self.with_labels:
            b = torch.from_numpy(np.array(case.region_bits(mmap=True)))  # (D, H, W)
            labels = torch.stack([(b & bit) > 0 for bit in REGION_BITS], dim=1).float()
            if self.image_size is not None:
                labels = self._repad(labels, case, crop)
            item["labels"] = labels
        return item

    @staticmethod
    def _repad(x: torch.Tensor, case: CachedCase, crop: CropInfo) -> torch.Tensor:
        h, w, _ = case.crop.cropped_shape
        (a, _), (c, _) = case.crop.pad
        inner = x[..., a : a + h, c : c + w]
        (pa, pb), (pc, pd) = crop.pad
        return F.pad(inner, [pc, pd, pa, pb])


def collate_cases(batch: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Batch whole cases (:class:`CaseDataset` items) into one model batch.

    Slices of all cases are concatenated (``slice_to_case`` gives each slice's case); the cases
    must share one in-plane size (use ``CaseDataset(image_size=...)``). Per-case fields
    (``case_ids``, ``crop_info``, ``label_path``, ``label_convention``, ``spacing``,
    ``num_slices``) become lists.
    """
    if not batch:
        raise ValueError("collate_cases got an empty batch.")
    with _OneThread():
        return _collate_cases(batch)


def _collate_cases(batch: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    sizes = {tuple(item["pixel_values"].shape[-2:]) for item in batch}
    if len(sizes) != 1:
        raise ValueError(
            f"collate_cases: cases have different in-plane sizes {sorted(sizes)}; set CaseDataset(image_size=...)."
        )
    ids, mask, tt = _pad_tokens(
        [item["input_ids"][0][item["attention_mask"][0] > 0].numpy() for item in batch],
        [item["token_type_ids"][0][item["attention_mask"][0] > 0].numpy() for item in batch],
        batch[0]["pad_token_id"],
    )
    out = {
        "pixel_values": torch.cat([item["pixel_values"] for item in batch]),
        "slice_to_case": torch.cat(
            [torch.full((item["pixel_values"].shape[0],), i, dtype=torch.long) for i, item in enumerate(batch)]
        ),
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": tt,
        "has_report": torch.cat([item["has_report"] for item in batch]),
        "grade_labels": torch.cat([item["grade_labels"] for item in batch]),
        "case_ids": [item["case_id"] for item in batch],
        "crop_info": [item["crop_info"] for item in batch],
        "label_path": [item["label_path"] for item in batch],
        "label_convention": [item["label_convention"] for item in batch],
        "spacing": [item["spacing"] for item in batch],
        "num_slices": [int(item["pixel_values"].shape[0]) for item in batch],
    }
    if all("labels" in item for item in batch):
        out["labels"] = torch.cat([item["labels"] for item in batch])
    return out
