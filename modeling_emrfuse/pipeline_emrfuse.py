"""A transformers custom pipeline that runs EmrFuse on one whole brain MRI case (+ its report).

:class:`EmrFusePipeline` is what ``transformers.pipeline(model=<folder or Hub id>, trust_remote_code=True)``
builds for an EmrFuse model folder, and the one inference path: ``emrfuse predict``, the Gradio Space and
``train.py``'s held-out evaluation (:func:`pipeline_for_model`) call it, and training's slice cache
prepares its cases with the same :func:`prepare_case`::

    from transformers import pipeline
    pipe = pipeline(model="outputs/emrfuse-demo", trust_remote_code=True)
    out = pipe("path/to/BraTS20_Training_001", report="Irregular mass in the left frontal lobe ...")
    out["label_map"]            # uint8 (X, Y, Z) on the input's voxel grid, in out["label_convention"]
    out["grade_probabilities"]  # {"HGG": 0.91, "LGG": 0.09} (when the folder has a grading model)

This file travels to the Hub with the model code: at module level it imports only numpy, torch,
transformers and its sibling files. The README describes inputs, options and outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoProcessor, Pipeline, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging

from .brats_io import (
    GeometryWarning,
    LoadedCase,
    Reorientation,
    affine_voxel_volume,
    load_case,
    to_reference_orientation,
)
from .brats_labels import GRADES, REGIONS, SEQUENCES, get_label_convention, label_map_to_regions, regions_to_label_map
from .configuration_emrfuse import EmrFuseConfig
from .inference_optim import inference_autocast, is_inference_optimized, optimize_for_inference, resolve_precision
from .modeling_emrfuse import EmrFuseForImageClassification, EmrFuseForSegmentation
from .processing_emrfuse import (
    CropInfo,
    EmrFuseProcessor,
    PreparedVolume,
    check_postprocessing,
    grading_slice_indices,
    postprocess_regions,
)

logger = logging.get_logger(__name__)

__all__ = [
    "PIPELINE_TASK",
    "DEFAULT_MODEL",
    "DEFAULT_GRADING_SLICES",
    "DEFAULT_MAX_REPORT_CHARS",
    "GRADING_SUBFOLDER",
    "EmrFusePipeline",
    "LoadedCase",
    "PreparedCase",
    "prepare_case",
    "on_model_grid",
    "load_case",
    "load_case_with_warnings",
    "load_pipeline",
    "pipeline_for_model",
    "optimize_for_inference",
    "resolve_companion",
    "custom_pipelines_entry",
    "region_volumes_cm3",
    "voxel_volume_mm3",
    "resample_to_shape",
]

PIPELINE_TASK = "glioma-analysis"
"""Task name under which :class:`EmrFusePipeline` is registered (``config.custom_pipelines``)."""

DEFAULT_MODEL = os.path.join("outputs", "emrfuse-demo")
"""Model folder that the README's main job (``train.py`` on demo data) leaves."""

GRADING_SUBFOLDER = "grading"
"""Sub-folder of a model folder (or Hub repository) that holds the grading companion; the root config
names it in ``grading_model``."""
DEFAULT_MAX_REPORT_CHARS = 65536
"""Characters of a report read by default (``max_report_chars``): far above a radiology report (the real
TextBraTS reports have 53-156 words), low enough that a huge text cannot stall a run or the Space's worker."""
DEFAULT_GRADING_SLICES = "config"
# the region logit of a slice that the tumour-slab path (probe_stride > 1) does not compute: background
PROBE_BACKGROUND_LOGIT = -30.0
# the model inputs with one row per slice (the others, the report's, have one row per case)
SLICE_INPUTS = ("pixel_values", "slice_to_case")


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """The tumour-slab path of :meth:`EmrFusePipeline._segment_slab`: ``stride`` (every slice when 1, the exact
    path), ``margin`` (slices added on each side of a slab) and ``box_margin`` (pixels around the probe's tumour
    in-plane, the slab slices cropped to that box; ``None``: whole slices)."""

    stride: int = 1
    margin: int = 2
    box_margin: Optional[int] = None


def check_probe(value: Any, name: str, minimum: int) -> int:
    """``probe_stride`` (>= 1; 1 = every slice, the exact path), ``probe_margin`` or ``probe_box_margin`` (>= 0),
    as an int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def probe_runs(hits: Sequence[int], n: int, stride: int, margin: int) -> List[Tuple[int, int, List[int]]]:
    """``(first, last, run)`` of each slab around the probe slices ``hits`` (multiples of ``stride`` that hold
    tumour, of ``n`` slices): each run of consecutive hits (``stride`` apart) spans from its first hit ``- stride
    + 1 - margin`` to its last ``+ stride - 1 + margin``, clipped to the case. A tumour that reaches a probe slice
    ends before the probe slices on either side without tumour, so it lies inside its run's slab."""
    runs: List[List[int]] = []
    for h in sorted(hits):
        if runs and h - runs[-1][-1] == stride:
            runs[-1].append(h)
        else:
            runs.append([h])
    return [(max(0, r[0] - stride + 1 - margin), min(n - 1, r[-1] + stride - 1 + margin), r) for r in runs]


def probe_slabs(hits: Sequence[int], n: int, stride: int, margin: int) -> List[int]:
    """The slices (sorted) of the slabs of :func:`probe_runs`."""
    return sorted({i for lo, hi, _ in probe_runs(hits, n, stride, margin) for i in range(lo, hi + 1)})


def tumour_box(mask: torch.Tensor, margin: int, multiple: int = 32) -> Tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``: the in-plane box of ``mask`` (H, W; not empty) widened by ``margin`` pixels, then
    grown to a multiple of ``multiple`` (the model's input stride) and kept inside the slice."""
    ys = torch.nonzero(mask.any(dim=1)).flatten()
    xs = torch.nonzero(mask.any(dim=0)).flatten()

    def span(lo: int, hi: int, size: int) -> Tuple[int, int]:
        lo, hi = max(0, lo - margin), min(size, hi + 1 + margin)
        length = min(size, -(-(hi - lo) // multiple) * multiple)
        lo = min(lo, size - length)
        return lo, lo + length

    y0, y1 = span(int(ys[0]), int(ys[-1]), mask.shape[0])
    x0, x1 = span(int(xs[0]), int(xs[-1]), mask.shape[1])
    return y0, y1, x0, x1


def _take_slices(inputs: Dict[str, torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The model inputs of the slices ``index`` (the report's rows unchanged)."""
    out = dict(inputs)
    for key in SLICE_INPUTS:
        if out.get(key) is not None:
            out[key] = out[key][index.to(out[key].device)]
    return out


"""``grading_max_slices`` default: the grading model's ``config.grading_slices`` (the policy it was trained and
evaluated with)."""


# --------------------------------------------------------------------------------------------------
# geometry of a case
# --------------------------------------------------------------------------------------------------
def grading_pooling_mask(seg_logits: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` bool: the predicted whole tumour of every slice from the segmentation model's region logits
    ``(N, R, H, W)`` (any region's probability above 0.5), the mask a ``grading_pooling="tumour"`` grading model
    pools its features over."""
    return (seg_logits.float() > 0).any(dim=1)


def voxel_volume_mm3(geometry: Union[Sequence[float], np.ndarray]) -> float:
    """Volume of one voxel in mm^3: ``|det|`` of a 4 x 4 affine's 3 x 3 part (right also for a sheared affine), or
    the product of a voxel size ``(sx, sy, sz)`` in mm."""
    array = np.asarray(geometry, dtype=np.float64)
    if array.shape in ((4, 4), (3, 3)):
        return affine_voxel_volume(array[:3, :3])
    return float(np.prod(array.reshape(-1)[:3]))


def region_volumes_cm3(
    label_map: np.ndarray, label_convention: str, spacing: Union[Sequence[float], np.ndarray]
) -> Dict[str, float]:
    """Volume in cm^3 of each region (WT, TC, ET) of a label map, at the voxel volume of ``spacing``: the case's
    4 x 4 affine (``|det|``, right for a sheared affine too) or its voxel size (:func:`voxel_volume_mm3`)."""
    regions = label_map_to_regions(label_map, label_convention)
    voxel = voxel_volume_mm3(spacing)
    return {region: float(regions[i].sum(dtype=np.int64)) * voxel / 1000.0 for i, region in enumerate(REGIONS)}


def resample_to_shape(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear resampling of a ``(X, Y, Z)`` volume (or ``(C, X, Y, Z)`` channels) onto a grid of ``shape``.

    The grids share their field of view (voxel corners at the same world positions, ``align_corners=False``),
    so resampling to a shape and back to the original shape returns to the original voxels. Returns float32.
    """
    array = np.asarray(volume, dtype=np.float32)
    channels = array.ndim == 4
    tensor = torch.from_numpy(np.ascontiguousarray(array if channels else array[None]))[None]
    out = torch.nn.functional.interpolate(
        tensor, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False
    )
    out = out[0].numpy()
    return out if channels else out[0]


def model_grid_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> Tuple[int, int, int]:
    """Grid that covers the same field of view as ``shape`` voxels of ``spacing`` mm at ``target`` mm voxels."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


# --------------------------------------------------------------------------------------------------
# a case brought to the model: orientation, voxel grid, normalisation (shared with training's slice cache)
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PreparedCase:
    """A loaded case as the model sees it, and what maps a prediction back onto the input's grid."""

    case: LoadedCase  # as read: the input's grid and orientation
    prepared: PreparedVolume  # normalised, cropped, padded; in BraTS's orientation, on the model's grid
    reorientation: Reorientation  # input orientation -> BraTS's (``undo`` maps back)
    resampling: Optional[Dict[str, Any]]  # the two grids when resampled, else None
    oriented_shape: Tuple[int, int, int]  # the input's grid in BraTS's orientation (before resampling)


def on_model_grid(case: LoadedCase, image_processor, resample: bool) -> Tuple[LoadedCase, Optional[Dict[str, Any]]]:
    """The case on the voxel grid the model expects (``image_processor.expected_spacing``, 1 mm for BraTS).

    A case with that spacing (within ``spacing_tolerance``), or without geometry (plain arrays), is used as
    it is. Another spacing is an error, unless ``resample``: then every sequence is resampled
    (trilinear, nnU-Net / MONAI ``Spacing`` style) onto a grid of the model's spacing that covers the same
    field of view. Returns ``(case, resampling)`` where ``resampling`` records the two grids (``None`` when not
    resampled).
    """
    expected = getattr(image_processor, "expected_spacing", None)
    has_geometry = case.header is not None or not np.allclose(case.affine, np.eye(4))
    if expected is None or not has_geometry:
        return case, None
    spacing = tuple(float(v) for v in case.spacing)
    tolerance = float(getattr(image_processor, "spacing_tolerance", 0.05))
    if np.allclose(spacing, expected, rtol=0, atol=tolerance):
        return case, None
    if not resample:
        where = f"case {case.case_id}: " if case.case_id else ""
        raise ValueError(
            f"{where}voxel spacing {tuple(round(v, 4) for v in spacing)} mm differs from the model's "
            f"{tuple(expected)} mm; pass resample=True (emrfuse predict --resample) to resample the case to the "
            "model's spacing and the prediction back onto the input grid."
        )
    grid = model_grid_shape(case.shape, spacing, expected)
    volumes = {name: resample_to_shape(v, grid) for name, v in case.volumes.items()}
    resampling = {
        "input_spacing_mm": list(spacing),
        "model_spacing_mm": [float(v) for v in expected],
        "input_grid": [int(v) for v in case.shape],
        "model_grid": [int(v) for v in grid],
        "method": "trilinear (images), trilinear on the region probabilities back to the input grid",
    }
    return dataclasses.replace(case, volumes=volumes), resampling


def _prepare_volume(image_processor, case: LoadedCase, allow_missing_sequences: bool) -> PreparedVolume:
    """The image processor's ``prepare_volume`` of a loaded case (``allow_missing_sequences`` passed on)."""
    if not allow_missing_sequences:
        return image_processor.prepare_volume(dict(case.volumes))
    import inspect

    if "allow_missing_sequences" not in inspect.signature(image_processor.prepare_volume).parameters:
        raise ValueError(
            "This model folder's image processor (processing_emrfuse.py) has no missing-sequence support: "
            "give all four sequences, or save the model again with the current emrfuse package."
        )
    return image_processor.prepare_volume(dict(case.volumes), allow_missing_sequences=True)


def prepare_case(
    case: LoadedCase, image_processor, resample: bool = False, allow_missing_sequences: bool = False
) -> PreparedCase:
    """A loaded case brought to the model: turned to BraTS's orientation (LPS, which models are trained on),
    put on the model's voxel grid (:func:`on_model_grid`) and prepared by the image processor (z-score, crop,
    pad). The pipeline's preprocess and training's slice cache both call it."""
    oriented, turn = to_reference_orientation(case)
    model_case, resampling = on_model_grid(oriented, image_processor, resample)
    prepared = _prepare_volume(image_processor, model_case, allow_missing_sequences)
    return PreparedCase(case, prepared, turn, resampling, tuple(oriented.shape))


# --------------------------------------------------------------------------------------------------
# models of a folder
# --------------------------------------------------------------------------------------------------
def _head_kind(model: torch.nn.Module) -> Optional[str]:
    """``"segmentation"``, ``"grading"`` or ``None`` from a model's class name."""
    name = type(model).__name__
    if "Segmentation" in name:
        return "segmentation"
    if "Classification" in name:
        return "grading"
    return None


def _hub_commit(repo_id: str, revision: Optional[str], subfolder: str = "") -> Optional[str]:
    """The commit that ``revision`` (default: main) of a Hub repository points to, from its cached config.json."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    try:
        return extract_commit_hash(cached_file(repo_id, "config.json", revision=revision, subfolder=subfolder), None)
    except (OSError, ValueError):  # resolved again, with its own error, by from_pretrained
        return None


def _loaded_commit(model: torch.nn.Module) -> Optional[str]:
    """The Hub commit a model was loaded at: recorded by :func:`_load_head` (``config._commit_hash``, which is
    not saved), or for a model that ``transformers.pipeline`` loaded, the commit in the name of its remote-code
    module (``transformers_modules.<repo>.<commit>.modeling_emrfuse``). ``None`` for a local model."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return commit
    parts = type(model).__module__.split(".")
    if parts[0] != "transformers_modules":
        return None
    return next((part for part in parts if re.fullmatch(r"[0-9a-f]{40}", part)), None)


def _where(name_or_path: str, subfolder: str = "") -> str:
    return f"{name_or_path}{'/' + subfolder if subfolder else ''}"


_HEAD_CLASSES = {cls.__name__: cls for cls in (EmrFuseForSegmentation, EmrFuseForImageClassification)}
"""The task models an EmrFuse folder may hold (``architectures`` in its ``config.json``), by class name."""
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_JSON_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def _check_weight_files(folder: Path) -> None:
    """Refuse a local model folder whose weights are only pickles (never unpickled: unpickling can run code), or
    that holds no weights; the error names the file."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder / pickles[0]}: pickled weights are never loaded (unpickling a file can run code); convert the "
            "model to model.safetensors (save_pretrained writes safetensors) or get a safetensors copy."
        )
    raise FileNotFoundError(f"{folder}: no model.safetensors, so no weights to load; save the model again.")


def _check_json_files(folder: Path) -> None:
    """Refuse a local folder whose JSON files (config, tokenizer, processor) are not valid JSON, naming the file."""
    for name in _JSON_FILES:
        path = folder / name
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path}: not valid JSON ({exc}); download or save the model again.") from None


def _emrfuse_head_class(name_or_path: str, revision: Optional[str], subfolder: str) -> type:
    """The installed task-model class that a folder's ``config.json`` names (``model_type`` must be EmrFuse's); its
    ``auto_map`` is not followed, so nothing from the folder is imported."""
    where = _where(name_or_path, subfolder)
    config_dict, _ = EmrFuseConfig.get_config_dict(name_or_path, revision=revision, subfolder=subfolder)
    model_type = config_dict.get("model_type")
    if model_type != EmrFuseConfig.model_type:
        raise ValueError(
            f"{where}/config.json: model_type {model_type!r} is not an EmrFuse model ({EmrFuseConfig.model_type!r}); "
            "give an EmrFuse model folder (or pass trust_remote_code to run the folder's own code)."
        )
    architectures = list(config_dict.get("architectures") or [])
    for name in architectures:
        if name in _HEAD_CLASSES:
            return _HEAD_CLASSES[name]
    raise ValueError(
        f"{where}/config.json: architectures {architectures} name no EmrFuse task model "
        f"({', '.join(_HEAD_CLASSES)}); save the task model with save_pretrained."
    )


def _remote_head_class(config: Any, where: str) -> type:
    """The Auto class that a folder's ``auto_map`` names for its architecture (the folder's own code)."""
    auto_map = getattr(config, "auto_map", None) or {}
    architectures = list(getattr(config, "architectures", None) or [])
    for key, value in auto_map.items():
        target = value[-1] if isinstance(value, (list, tuple)) else value
        if key.startswith("AutoModel") and any(str(target).endswith("." + a) for a in architectures):
            return getattr(transformers, key)
    raise ValueError(
        f"{where}: the config's auto_map names no Auto class for {architectures}; save the model with "
        "save_pretrained after register_for_auto_class."
    )


def _load_head(
    name_or_path: str, revision: Optional[str] = None, subfolder: str = "", trust_remote_code: bool = False, **kwargs
) -> PreTrainedModel:
    """Load an EmrFuse task model: with the installed package's classes (``model_type`` checked, nothing from the
    folder imported), or with ``trust_remote_code`` through the Auto class that the folder's ``auto_map`` names.
    Weights are read from safetensors only (a pickled ``pytorch_model.bin`` is refused, never unpickled).

    From a Hub repository, ``revision`` is first resolved to a commit, with which everything is loaded and which
    is recorded in ``config._commit_hash`` (:func:`_loaded_commit`), so that a companion in the same repository
    is loaded at the same commit."""
    where = _where(name_or_path, subfolder)
    on_hub = not Path(name_or_path).is_dir()
    if on_hub:
        revision = _hub_commit(name_or_path, revision, subfolder) or revision
    else:
        _check_json_files(Path(name_or_path) / subfolder)
        _check_weight_files(Path(name_or_path) / subfolder)
    hub: Dict[str, Any] = {"revision": revision}
    if subfolder:
        hub["subfolder"] = subfolder
    if trust_remote_code:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=True, **hub)
        model_cls = _remote_head_class(config, where)
        hub["trust_remote_code"] = True
    else:
        model_cls = _emrfuse_head_class(name_or_path, revision, subfolder)
        config = EmrFuseConfig.from_pretrained(name_or_path, **hub)
    try:
        model = model_cls.from_pretrained(name_or_path, config=config, use_safetensors=True, **hub, **kwargs)
    except Exception as exc:  # safetensors raises its own SafetensorError (no OSError / ValueError) for a bad file
        if type(exc).__name__ != "SafetensorError" and "safetensors" not in type(exc).__module__:
            raise
        raise ValueError(
            f"{where}: the weights file (model.safetensors) is truncated or corrupted and cannot be read "
            f"({type(exc).__name__}: {exc}); download or save the model again."
        ) from None
    if on_hub and revision and re.fullmatch(r"[0-9a-f]{40}", str(revision)):
        model.config._commit_hash = str(revision)
    return model


def load_processor(source: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    """The processor of a model folder or Hub id: the installed :class:`EmrFuseProcessor` (tokenizer through
    ``AutoTokenizer``), or with ``trust_remote_code`` the class that the folder's ``auto_map`` names. A file that
    cannot be read is a ``ValueError`` naming it."""
    if not source:
        raise ValueError(
            "EmrFusePipeline needs the model's EmrFuseProcessor (processor=...): the model was not "
            "loaded from a folder or Hub repository to read it from."
        )
    if Path(source).is_dir():
        _check_json_files(Path(source))
    try:
        if trust_remote_code:
            return AutoProcessor.from_pretrained(source, revision=revision, trust_remote_code=True)
        return EmrFuseProcessor.from_pretrained(source, revision=revision)
    except (OSError, ImportError):
        raise
    except Exception as exc:  # the tokenizers library raises a bare Exception for a corrupt tokenizer.json
        raise ValueError(
            f"{source}: the processor files (tokenizer.json, tokenizer_config.json, preprocessor_config.json) cannot "
            f"be loaded ({type(exc).__name__}: {exc}); download or save the model again."
        ) from None


def _is_local_subfolder(root: Path, spec: str) -> bool:
    """``spec`` names a folder inside ``root`` (relative, no ``..`` out of it)."""
    if os.path.isabs(spec):
        return False
    try:
        (root / spec).resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def resolve_companion(
    root_model: PreTrainedModel, role: str, explicit: Any = None, trust_remote_code: bool = False
) -> Optional[PreTrainedModel]:
    """The other head of ``root_model`` (``role``: ``"grading"`` or ``"segmentation"``), found in one way.

    * ``explicit`` given (the pipeline's ``grading_model=`` / ``segmentation_model=``, ``emrfuse predict
      --grading-model``): a model, or a folder / Hub id loaded as given; ``False``: no companion.
    * otherwise the root config's ``grading_model`` / ``segmentation_model`` field names a sub-folder of
      the root model's own folder, or of its Hub repository (loaded at the root's revision). A named
      sub-folder that is missing, or a name that leads outside the folder or repository, is an error.
      Nothing is looked for in the working directory, a sibling folder or another repository (whose code
      would run).
    * neither: no companion.

    A folder or Hub id is loaded with the installed package's classes unless ``trust_remote_code``
    (:func:`_load_head`).
    """
    if explicit is False:
        return None
    if explicit is not None:
        if isinstance(explicit, torch.nn.Module):
            return explicit
        return _load_head(os.fspath(explicit), trust_remote_code=trust_remote_code)
    config = root_model.config
    spec = getattr(config, f"{role}_model", None)
    if not spec:
        return None
    spec = str(spec)
    root = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if not root:
        raise ValueError(
            f"the model's config names the {role} model {spec!r}, but the model was not loaded from a folder or Hub "
            f"repository to look in; pass {role}_model=... or {role}_model=False."
        )
    local_root = Path(root)
    if local_root.is_dir():
        if _is_local_subfolder(local_root, spec) and (local_root / spec / "config.json").is_file():
            return _load_head(str(local_root / spec), trust_remote_code=trust_remote_code)
        cli = " (emrfuse predict --grading-model / --no-grading)" if role == "grading" else ""
        raise ValueError(
            f"{local_root}: config.json names the {role} model {spec!r}, but {local_root / spec} holds no "
            f"config.json (a {role} model is only looked for inside the model folder); restore that "
            f"sub-folder, or pass the {role} model explicitly ({role}_model=...) or run without it "
            f"({role}_model=False){cli}."
        )
    if os.path.isabs(spec) or ".." in Path(spec).parts:
        raise ValueError(
            f"{root}: config.json names the {role} model {spec!r}, which is not a sub-folder of the repository."
        )
    # a sub-folder of the same Hub repository, at the same commit as the root model
    return _load_head(root, revision=_loaded_commit(root_model), subfolder=spec, trust_remote_code=trust_remote_code)


def _weights_fingerprint(folder: Path) -> Optional[str]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def _model_identity(model: PreTrainedModel) -> Tuple[Optional[str], Optional[str]]:
    """(model id or folder, revision): the Hub commit, or a sha256 of a local folder's weights."""
    config = model.config
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None
    revision = _loaded_commit(model)
    if name and Path(name).is_dir():
        name = str(Path(name).resolve())
        if revision is None:
            revision = _weights_fingerprint(Path(name))
    return name, revision


# --------------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------------
class _TextTowerProbe:
    """Counts and times the calls of the text tower(s) of a model (forward hooks; no model change)."""

    def __init__(self, models: Sequence[torch.nn.Module]):
        self.calls = 0
        self.seconds = 0.0
        self._start: Dict[int, float] = {}
        self._handles = []
        for model in models:
            for module in _text_towers(model):
                self._handles.append(module.register_forward_pre_hook(self._pre))
                self._handles.append(module.register_forward_hook(self._post))

    def _pre(self, module, args):
        self._start[id(module)] = time.perf_counter()

    def _post(self, module, args, output):
        start = self._start.pop(id(module), None)
        if start is not None:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0

    def remove(self) -> None:
        """Take the hooks off the models."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _text_towers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """Outermost BERT-family sub-models of ``model`` (the text tower)."""
    towers: List[torch.nn.Module] = []
    for name, module in model.named_modules():
        if module is model or not isinstance(module, PreTrainedModel):
            continue
        if (
            getattr(getattr(module, "config", None), "model_type", None) not in ("bert",)
            and "Bert" not in type(module).__name__
        ):
            continue
        if any(name.startswith(prefix + ".") for prefix, _ in towers):
            continue
        towers.append((name, module))
    return [m for _, m in towers]


def check_finite_weights(model: torch.nn.Module, name: Optional[str] = None) -> None:
    """Raise ``ValueError`` when a parameter or floating-point buffer of ``model`` holds NaN or infinity.

    Weights that are not finite (e.g. bytes overwritten inside ``model.safetensors``) would give NaN logits,
    i.e. an empty label map and NaN probabilities, without any error.
    """
    bad = [
        n
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        where = name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        raise ValueError(
            f"{where}: non-finite weights (NaN or infinity) in {len(bad)} tensor(s), e.g. {bad[0]}: the weights "
            "file is corrupted; download or save the model again."
        )


def _check_finite_logits(logits: torch.Tensor, what: str, model: torch.nn.Module) -> None:
    if not bool(torch.isfinite(logits).all()):
        where = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        raise ValueError(
            f"the model {where} gave non-finite (NaN or infinity) {what} for this case: its weights or the input "
            "are broken (nothing is written from such logits)."
        )


def _scalar(x) -> Optional[float]:
    if x is None:
        return None
    t = x.detach().float().reshape(-1) if isinstance(x, torch.Tensor) else torch.as_tensor(x).float().reshape(-1)
    return float(t[0]) if t.numel() else None


def _nested_region_volumes(regions: np.ndarray, affine: np.ndarray) -> Dict[str, float]:
    """cm^3 of each region of a painted label map (nested: WT > TC > ET), from its ``(3, X, Y, Z)`` region masks,
    at ``|det|`` of the affine per voxel (right for a sheared affine too)."""
    voxel = voxel_volume_mm3(affine) / 1000.0
    et = regions[2]
    tc = regions[1] | et
    wt = regions[0] | tc
    return {r: float(m.sum(dtype=np.int64)) * voxel for r, m in zip(REGIONS, (wt, tc, et))}


def load_case_with_warnings(
    inputs, affine=None, release: str = "auto", allow_missing_sequences: bool = False
) -> Tuple[LoadedCase, List[str]]:
    """:func:`load_case`, with the header's geometry warnings (no orientation, shear, qform/sform disagreement)
    returned for the result's ``warnings`` (and left out of the process's warning output)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GeometryWarning)
        case = load_case(inputs, affine=affine, release=release, allow_missing_sequences=allow_missing_sequences)
    geometry_warnings = []
    for w in caught:
        if issubclass(w.category, GeometryWarning):
            geometry_warnings.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return case, list(dict.fromkeys(geometry_warnings))


def _case_report(
    case: LoadedCase, report: Optional[str], use_case_report: bool, max_chars: int
) -> Tuple[Optional[str], Optional[str], bool]:
    """``(report, source, capped)``: the given report, else the case folder's own report file, cut to
    ``max_chars`` characters (a report file is read no further than that)."""
    source = "argument" if report is not None else None
    if report is None and use_case_report and case.report_path:
        try:
            with open(case.report_path, encoding="utf-8") as fh:
                report = fh.read(max_chars + 1)
            source = "case folder"
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"Case {case.case_id}: cannot read its report file {case.report_path} ({type(exc).__name__})."
            ) from None
    if report is not None and not isinstance(report, str):
        raise ValueError(f"report must be a string or None, got {type(report).__name__}.")
    capped = report is not None and len(report) > max_chars
    return (report[:max_chars] if capped else report), source, capped


class EmrFusePipeline(Pipeline):
    """Whole-case EmrFuse inference: four MRI sequences (+ report) -> label map, grade, explanations.

    Build it with ``transformers.pipeline(model=<folder or Hub id>, trust_remote_code=True)`` or
    :func:`load_pipeline`; call it on one case:

    * a case folder in any BraTS layout (found and read with the sibling :mod:`brats_io`: NIfTI, and
      BraTS 2015 MetaImage with SimpleITK), or a case that ``brats_io.discover_cases`` found already (a
      ``CaseFiles``, read as it is);
    * a dict ``{sequence name (any alias: t1, t1ce, t2, flair, t1n, t1c, t2w, t2f, ...) -> path /
      array / nibabel image}``;
    * a ``(4, X, Y, Z)`` array in :data:`brats_labels.SEQUENCES` order (with ``affine=`` for
      volumes in cm^3; identity, i.e. 1 mm voxels, otherwise).

    A *list* is a batch of cases (the transformers pipeline convention), not the four sequences.

    Call arguments: ``report`` (text, optional; a case folder's own ``<case>_flair_text.txt`` is used
    when no report is given and ``use_case_report=True``), ``label_convention`` (default: that of the
    case's release, ``brats2017`` when unknown), ``release``, ``affine``, ``threshold`` (0.5),
    ``max_length`` (report tokens), ``return_probabilities``, ``mask_background`` (default True: no
    tumour label where all four sequences are 0, i.e. outside the skull-stripped brain),
    ``allow_missing_sequences`` (default False), ``resample`` (default False), ``tta`` (default False:
    test-time flips, the region probabilities averaged over the slices and their flips along each
    in-plane axis and both), ``min_component_mm3`` / ``et_min_mm3`` (post-processing, default: the image
    processor's ``postprocessing``, 0 = off unless the model folder sets it: whole-tumour components smaller than
    ``min_component_mm3`` removed, and all enhancing tumour relabelled as tumour core when its total volume is
    below ``et_min_mm3``; see :func:`~processing_emrfuse.postprocess_regions`), ``max_report_chars`` (default :data:`DEFAULT_MAX_REPORT_CHARS`: a longer
    report is cut, a case folder's report file read no further, and the result's ``report_capped`` and
    ``warnings`` say so).

    Missing sequences (``allow_missing_sequences=True``): a case folder or a dict may hold any
    non-empty subset of the four sequences (a dict may also map a sequence to ``None``), and a
    sequence that is all zero counts as missing too. The missing sequences are zero-filled on the grid
    of the present ones and listed in the result's ``missing_sequences``. A model trained with sequence
    dropout has sequence-presence channels (``config.sequence_presence``) that tell it which sequences
    are missing; a model without them still runs, and the result's ``warnings`` says that it was not
    trained to know which sequences are missing. With ``allow_missing_sequences=False`` (the default) a
    missing sequence is an error.

    Voxel spacing (``resample=True``): the case is resampled onto the model's grid (:func:`on_model_grid`),
    the model runs there, and the region probabilities are resampled (trilinear) back onto the input grid
    and thresholded: the label map is on the input's grid with its affine, and the result's
    ``resampling`` records both grids.

    What runs: (1) load: the volumes are read in parallel threads and checked (same shape, same affine,
    not empty, a readable NIfTI, the model's voxel spacing); (2) preprocess (:func:`prepare_case`); (3)
    model: one forward per head over all slices of the case under ``torch.inference_mode``, the models
    rewritten once for inference (the sibling :mod:`inference_optim`); the image tower and decoder run
    in chunks of ``config.slice_chunk_size`` slices and the report is encoded once per case
    (``slice_to_case``); the grading model pools the slices its ``config.grading_slices`` names unless
    ``grading_max_slices`` overrides it; (4) postprocess: region logits -> label map on the original
    grid (voxels outside the skull-stripped brain set to 0, then the post-processing; non-finite logits or weights
    are an error), region volumes in cm^3 at ``|det|`` of the affine per voxel, grade probabilities, alpha_text /
    alpha_image and token attention. Assumptions about the header (no orientation set, a sheared
    affine, qform and sform that disagree) are listed in the result's ``warnings``.

    Extra constructor arguments:

    Args:
        grading_model / segmentation_model: the other head (model, folder or Hub id); found next to
            the model when not given (:func:`resolve_companion`); ``False``: do not use one.
        precision: ``"auto"`` (bf16 on a CPU with native bf16 instructions and on CUDA with bf16,
            fp32 elsewhere), ``"bf16"`` or ``"fp32"``.
        trust_remote_code: load a companion given as a folder or Hub id (and a missing processor) with the code
            its folder names (``auto_map``) instead of this package's classes (default False).
        optimize: rewrite the models in place for inference (default True; see
            :func:`optimize_for_inference`: BatchNorm folded into the convolutions, bf16 weights when
            ``precision`` is bf16, channels-last). Pass ``optimize=False`` to leave a model you hold
            untouched (bf16 then runs under autocast).
        chunk_size: slices per image-tower call (sets ``config.slice_chunk_size``).
        channels_last: run the convolutions in channels-last memory format (default True).
        grading_max_slices: the grading model pools at most this many of the case's brain slices, evenly
            spaced (:func:`~processing_emrfuse.grading_slice_indices`; ``None``: all slices). Default ``"config"``:
            the grading model's ``config.grading_slices``, the policy its reported accuracy was measured with.
        identify_models: record each model's folder and weights hash (``model_id`` / ``revision``; default
            True); ``False`` for models held in memory (:func:`pipeline_for_model`).

    Returns (per case) a dict with ``label_map`` (``uint8 (X, Y, Z)`` on the input's grid or None
    without a segmentation head), ``affine``, ``header``, ``spacing``, ``label_convention``,
    ``region_volumes_cm3``, ``grade`` and ``grade_probabilities`` (None without a grading head),
    ``alpha_text`` / ``alpha_image``, ``case_embedding`` (the fused case representation, ``case_embeds``, of the
    grading model, else of the segmentation model; numpy), ``tokens`` / ``token_attention`` / ``token_offsets`` /
    ``words`` (report highlighting), ``has_report``, ``report_truncated``, ``report_source``, ``report_capped``
    (the report was cut to ``max_report_chars``), ``reoriented_from`` (the input's orientation when it was not
    BraTS's LPS, else ``None``),
    ``case_id``, ``num_slices`` (the brain slices the model saw), ``model_id`` / ``revision`` (and ``grading_model_id`` / ``grading_revision``),
    ``missing_sequences`` (zero-filled sequences, only with ``allow_missing_sequences=True``; ``[]``
    for a complete case), ``tta`` (test-time flips were averaged), ``postprocessing`` (the post-processing settings applied, mm^3), ``resampling`` (``None``, or the input and model grids and spacings when
    ``resample=True`` resampled the case), ``warnings`` (list of strings, e.g. a missing sequence given to a model
    without sequence-presence channels), ``timings`` (seconds: ``load``, ``preprocess``, ``model``, ``postprocess``, plus ``text_encoder``
    and ``text_encoder_calls``).
    """

    _load_processor = True
    _load_image_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False

    def __init__(
        self,
        model,
        *args,
        grading_model=None,
        segmentation_model=None,
        precision: str = "auto",
        chunk_size: Optional[int] = None,
        channels_last: bool = True,
        grading_max_slices: Union[int, str, None] = DEFAULT_GRADING_SLICES,
        optimize: bool = True,
        trust_remote_code: bool = False,
        identify_models: bool = True,
        **kwargs,
    ):
        super().__init__(model, *args, **kwargs)
        self.trust_remote_code = bool(trust_remote_code)
        if grading_max_slices == DEFAULT_GRADING_SLICES:
            self.grading_max_slices = grading_max_slices  # resolved from the grading model's config when it grades
        elif grading_max_slices is not None and (isinstance(grading_max_slices, str) or int(grading_max_slices) < 1):
            raise ValueError(
                f"grading_max_slices must be >= 1, None (all slices) or 'config', got {grading_max_slices!r}."
            )
        else:
            self.grading_max_slices = None if grading_max_slices is None else int(grading_max_slices)
        if self.processor is None:
            name = getattr(self.model.config, "_name_or_path", None)
            if not name:
                raise ValueError("EmrFusePipeline needs the model's EmrFuseProcessor (processor=...).")
            self.processor = load_processor(name, trust_remote_code=self.trust_remote_code)
            self.tokenizer = getattr(self.processor, "tokenizer", None)
            self.image_processor = getattr(self.processor, "image_processor", None)
        self._set_task_models(grading_model, segmentation_model)
        for m in self.models:
            check_finite_weights(m)
        self.precision = resolve_precision(precision, self.device)
        self.optimizations: List[Dict[str, Any]] = []
        for m in self.models:
            m.eval()
            if chunk_size is not None:
                if int(chunk_size) < 1:
                    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
                m.config.slice_chunk_size = int(chunk_size)
            if optimize and not is_inference_optimized(m):
                self.optimizations.append(optimize_for_inference(m, self.precision, channels_last))
            elif channels_last:
                m.to(memory_format=torch.channels_last)
        self.optimized = bool(optimize)
        self.channels_last = bool(channels_last)
        self._text_probe = _TextTowerProbe(self.models)
        identity = _model_identity if identify_models else (lambda m: (None, None))
        self.model_id, self.revision = identity(self.model)
        self._companion_ids: Dict[str, Tuple[Optional[str], Optional[str]]] = {}
        for role, m in (("grading", self.grading_model), ("segmentation", self.segmentation_model)):
            if m is not None and m is not self.model:
                self._companion_ids[role] = identity(m)  # hashed once, not per case
        self.load_seconds: Optional[float] = None  # set by load_pipeline

    def _set_task_models(self, grading_model, segmentation_model) -> None:
        """The root model's head, and the other head from :func:`resolve_companion` (on this device)."""
        kind = _head_kind(self.model)
        if kind is None:
            raise ValueError(
                f"{type(self.model).__name__} has no task head: the pipeline needs EmrFuseForSegmentation "
                "and/or EmrFuseForImageClassification."
            )
        if kind == "segmentation":
            self.segmentation_model = self.model
            self.grading_model = resolve_companion(self.model, "grading", grading_model, self.trust_remote_code)
        else:
            self.grading_model = self.model
            self.segmentation_model = resolve_companion(
                self.model, "segmentation", segmentation_model, self.trust_remote_code
            )
        for extra in (self.segmentation_model, self.grading_model):
            if extra is not None and extra is not self.model:
                extra.to(self.device)

    # ------------------------------------------------------------------------------ helpers
    @property
    def models(self) -> List[PreTrainedModel]:
        """The task models the pipeline runs (segmentation first)."""
        return [m for m in (self.segmentation_model, self.grading_model) if m is not None]

    def _sanitize_parameters(
        self,
        report=None,
        label_convention=None,
        release=None,
        affine=None,
        use_case_report=None,
        max_length=None,
        threshold=None,
        return_probabilities=None,
        mask_background=None,
        allow_missing_sequences=None,
        resample=None,
        max_report_chars=None,
        tta=None,
        min_component_mm3=None,
        et_min_mm3=None,
        probe_stride=None,
        probe_margin=None,
        probe_box_margin=None,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(f"EmrFusePipeline: unexpected arguments {sorted(kwargs)}.")
        pre: Dict[str, Any] = {}
        post: Dict[str, Any] = {}
        for key, value in (
            ("report", report),
            ("label_convention", label_convention),
            ("release", release),
            ("affine", affine),
            ("use_case_report", use_case_report),
            ("max_length", max_length),
        ):
            if value is not None:
                pre[key] = value
        if allow_missing_sequences is not None:
            pre["allow_missing_sequences"] = bool(allow_missing_sequences)
        if resample is not None:
            pre["resample"] = bool(resample)
        if max_report_chars is not None:
            if int(max_report_chars) < 1:
                raise ValueError(f"max_report_chars must be >= 1, got {max_report_chars}.")
            pre["max_report_chars"] = int(max_report_chars)
        if threshold is not None:
            if not 0.0 < float(threshold) < 1.0:
                raise ValueError(f"threshold must be in (0, 1), got {threshold}.")
            post["threshold"] = float(threshold)
        if return_probabilities is not None:
            post["return_probabilities"] = bool(return_probabilities)
        if mask_background is not None:
            post["mask_background"] = bool(mask_background)
        for key, value in (("min_component_mm3", min_component_mm3), ("et_min_mm3", et_min_mm3)):
            if value is not None:
                post[key] = check_postprocessing(**{key: value})[key]
        if label_convention is not None:
            get_label_convention(label_convention)  # fail early on an unknown name
        forward: Dict[str, Any] = {} if tta is None else {"tta": bool(tta)}
        if (probe_stride, probe_margin, probe_box_margin) != (None, None, None):
            forward["probe"] = ProbeSettings(
                stride=1 if probe_stride is None else check_probe(probe_stride, "probe_stride", 1),
                margin=2 if probe_margin is None else check_probe(probe_margin, "probe_margin", 0),
                box_margin=None if probe_box_margin is None else check_probe(probe_box_margin, "probe_box_margin", 0),
            )
        return pre, forward, post

    def _autocast(self):
        return inference_autocast(self.precision, next(self.models[0].parameters()).dtype, self.device)

    def get_inference_context(self):
        return torch.inference_mode

    # ------------------------------------------------------------------------------ stages
    def preprocess(
        self,
        inputs,
        report: Optional[str] = None,
        label_convention: Optional[str] = None,
        release: str = "auto",
        affine=None,
        use_case_report: bool = True,
        max_length: Optional[int] = None,
        allow_missing_sequences: bool = False,
        resample: bool = False,
        max_report_chars: int = DEFAULT_MAX_REPORT_CHARS,
    ):
        t0 = time.perf_counter()
        if isinstance(inputs, Mapping) and "report" in inputs and report is None:
            report = inputs["report"]
        case, geometry_warnings = load_case_with_warnings(inputs, affine, release, allow_missing_sequences)
        report, report_source, capped = _case_report(case, report, use_case_report, max_report_chars)
        if capped:
            geometry_warnings.append(
                f"The report is longer than {max_report_chars} characters: only its first {max_report_chars} were "
                "read (max_report_chars; emrfuse predict --max-report-chars)."
            )
        t1 = time.perf_counter()
        ready = prepare_case(case, self.image_processor, resample, allow_missing_sequences)
        prepared = ready.prepared
        enc = self.processor(volumes=[prepared], text=[report], max_length=max_length, return_tensors="pt")
        convention = label_convention or case.label_convention or "brats2017"
        absent = {n for n, p in zip(self.image_processor.sequence_order, getattr(prepared, "present", ())) if not p}
        missing = [s for s in SEQUENCES if s in absent or s in case.missing_sequences]
        t2 = time.perf_counter()
        return {
            "model_inputs": {
                k: enc[k]
                for k in (
                    "pixel_values",
                    "input_ids",
                    "attention_mask",
                    "token_type_ids",
                    "slice_to_case",
                    "has_report",
                )
                if k in enc
            },
            "crop_info": enc["crop_info"][0],
            "report_truncated": bool(enc["report_truncated"][0]) or capped,
            "report_capped": capped,
            "has_report": bool(enc["has_report"][0]),
            "report": report,
            "report_source": report_source if bool(enc["has_report"][0]) else None,
            "case": case,
            "label_convention": get_label_convention(convention).name,
            "missing_sequences": missing,
            "warnings": geometry_warnings + self._missing_sequence_warnings(missing),
            "resampling": ready.resampling,
            "reorientation": ready.reorientation,
            "oriented_shape": ready.oriented_shape,
            "timings": {"load": t1 - t0, "preprocess": t2 - t1},
        }

    def _missing_sequence_warnings(self, missing: Sequence[str]) -> List[str]:
        """Warnings for a case with zero-filled sequences run by a model without sequence-presence channels."""
        if not missing:
            return []
        blind = [
            role
            for role, m in (("segmentation", self.segmentation_model), ("grading", self.grading_model))
            if m is not None and not getattr(m.config, "sequence_presence", False)
        ]
        if not blind:
            return []
        which = "model" if len(blind) == len(self.models) else f"{blind[0]} model"
        return [
            f"Sequence(s) {list(missing)} are missing and were zero-filled, but the {which} has no sequence-presence "
            "channels (config.sequence_presence=False): it was not trained to know which sequences are missing, so "
            "its output may be unreliable. A model trained with train.py --sequence_dropout serves such cases."
        ]

    def grading_inputs(
        self, inputs: Dict[str, torch.Tensor], seg_logits: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        """The model inputs of a case with only the slices the grading model pools (``grading_max_slices``).

        A grading model with ``config.grading_pooling="tumour"`` also gets ``pooling_mask``, the predicted whole
        tumour (any region's probability above 0.5 in ``seg_logits``, the segmentation model's region logits of
        the same slices), and is given the slices that contain it (at most ``grading_max_slices``, evenly spaced
        among them). Without ``seg_logits`` or without predicted tumour, the slices and pooling are today's
        (evenly spaced over the case, no mask)."""
        n = inputs["pixel_values"].shape[0]
        limit = self.grading_max_slices
        if limit == DEFAULT_GRADING_SLICES:  # the policy the grading model was trained and evaluated with
            limit = getattr(self.grading_model.config, "grading_slices", 32)
        tumour = getattr(self.grading_model.config, "grading_pooling", "slices") == "tumour"
        mask = grading_pooling_mask(seg_logits) if tumour and seg_logits is not None else None
        with_tumour = None if mask is None else torch.nonzero(mask.flatten(1).any(dim=1)).flatten().cpu()
        if with_tumour is not None and len(with_tumour):
            keep = with_tumour
            if limit is not None and len(with_tumour) > limit:
                keep = with_tumour[torch.from_numpy(grading_slice_indices(len(with_tumour), limit))]
            out = dict(inputs)
            out["pixel_values"] = inputs["pixel_values"][keep]
            out["slice_to_case"] = inputs["slice_to_case"][keep]
            out["pooling_mask"] = mask[keep.to(mask.device)]
            return out
        if limit is None or n <= limit:
            return inputs
        keep = torch.from_numpy(grading_slice_indices(n, limit))
        out = dict(inputs)
        out["pixel_values"] = inputs["pixel_values"][keep]
        out["slice_to_case"] = inputs["slice_to_case"][keep]
        return out

    def segmentation_logits(self, inputs: Dict[str, torch.Tensor], tta: bool = False) -> torch.Tensor:
        """The segmentation model's region logits (N, R, H, W) of a case's model inputs, as :meth:`_forward`
        computes them (for the grading-head fit, whose training cases see the masks inference sees)."""
        return self._segment(inputs, tta)[1]

    def _segment(self, inputs: Dict[str, torch.Tensor], tta: bool, probe: Optional[ProbeSettings] = None):
        """The segmentation model's output and region logits of every slice (:meth:`_segment_slices`), or with
        ``probe.stride`` k > 1 of the tumour's slabs only (:meth:`_segment_slab`)."""
        if probe is not None and probe.stride > 1 and inputs["pixel_values"].shape[0] > probe.stride:
            return self._segment_slab(inputs, tta, probe)
        return self._segment_slices(inputs, tta)

    def _segment_slab(self, inputs: Dict[str, torch.Tensor], tta: bool, probe: ProbeSettings):
        """Every ``probe.stride``-th slice first (the probe), then only the slabs around the probe slices with
        tumour (any region above 0.5): each run of consecutive probe slices with tumour, widened by ``stride - 1 +
        margin`` slices on each side (:func:`probe_runs`); every other slice is background (logit
        :data:`PROBE_BACKGROUND_LOGIT`). The model segments each slice on its own (the report enters every slice
        alike), so a computed slice's logits are those of the exact path; the two differ only where tumour lies
        wholly between two probe slices without tumour (a lesion thinner than ``stride`` slices, apart from the
        rest). With ``probe.box_margin`` the slab slices are also cropped in-plane to the box of their run's
        probe tumour plus that margin (:func:`tumour_box`), background outside it: not exact (the model sees
        less context at the box's edges, and tumour beyond the box is lost), so its agreement with the exact
        path is measured (``bench/bench_probe.py``). The returned output (embeddings, weights) is the probe's,
        evenly spaced over the case."""
        n, stride = inputs["pixel_values"].shape[0], probe.stride
        index = torch.arange(0, n, stride)
        out, probe_logits = self._segment_slices(_take_slices(inputs, index), tta)
        logits = probe_logits.new_full((n, *probe_logits.shape[1:]), PROBE_BACKGROUND_LOGIT)
        logits[index.to(logits.device)] = probe_logits
        tumour = (probe_logits > 0).any(dim=1).cpu()  # (probe slices, H, W)
        hits = [int(i) for i in index[tumour.flatten(1).any(dim=1)]]
        done = set(index.tolist())
        for lo, hi, run in probe_runs(hits, n, stride, probe.margin):
            todo = [i for i in range(lo, hi + 1) if i not in done]
            if not todo:
                continue
            done.update(todo)
            part = _take_slices(inputs, torch.tensor(todo, dtype=torch.long))
            rows = torch.tensor(todo, dtype=torch.long, device=logits.device)
            if probe.box_margin is None:
                logits[rows] = self._segment_slices(part, tta)[1]
                continue
            y0, y1, x0, x1 = tumour_box(tumour[[h // stride for h in run]].any(dim=0), probe.box_margin)
            pixels = part["pixel_values"][..., y0:y1, x0:x1]
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            part["pixel_values"] = pixels.contiguous(memory_format=fmt)
            logits[rows, :, y0:y1, x0:x1] = self._segment_slices(part, tta)[1]
        return out, logits

    def _segment_slices(self, inputs: Dict[str, torch.Tensor], tta: bool):
        """The segmentation model's output and region logits of every slice. With ``tta`` the sigmoid
        probabilities are averaged over the slices as given, flipped along each in-plane axis and along both
        (each prediction flipped back), and returned as logits."""
        out = self.segmentation_model(**inputs, return_dict=True)
        if not tta:
            return out, out.logits.float()
        probs = torch.sigmoid(out.logits.float())
        for dims in ((-1,), (-2,), (-2, -1)):
            flipped = dict(inputs, pixel_values=inputs["pixel_values"].flip(dims))
            probs += torch.sigmoid(self.segmentation_model(**flipped, return_dict=True).logits.float()).flip(dims)
        return out, torch.logit(probs / 4, eps=1e-6)

    def _forward(self, model_inputs, tta: bool = False, probe: Optional[ProbeSettings] = None):
        inputs = dict(model_inputs["model_inputs"])
        dtype = next(self.models[0].parameters()).dtype
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        if self.channels_last:
            inputs["pixel_values"] = inputs["pixel_values"].contiguous(memory_format=torch.channels_last)
        self._text_probe.reset()
        t0 = time.perf_counter()
        seg_out = cls_out = None
        t_seg = t_cls = 0.0
        with self._autocast():
            if self.segmentation_model is not None:
                seg_out, seg_logits = self._segment(inputs, tta, probe)
                t_seg = time.perf_counter() - t0
            if self.grading_model is not None:
                t_start = time.perf_counter()
                graded = self.grading_inputs(inputs, seg_logits if seg_out is not None else None)
                cls_out = self.grading_model(**graded, return_dict=True)
                t_cls = time.perf_counter() - t_start
        t1 = time.perf_counter()
        if seg_out is not None:
            _check_finite_logits(seg_logits, "region logits", self.segmentation_model)
        if cls_out is not None:
            _check_finite_logits(cls_out.logits, "grade logits", self.grading_model)
        out = {k: v for k, v in model_inputs.items() if k != "model_inputs"}
        out["input_ids"] = inputs.get("input_ids")
        out["attention_mask"] = inputs.get("attention_mask")
        explain = seg_out if seg_out is not None else cls_out
        out["seg_logits"] = None if seg_out is None else seg_logits
        out["tta"] = bool(tta and seg_out is not None)
        sliced = seg_out is not None and probe is not None and probe.stride > 1
        out["probe_stride"] = probe.stride if sliced else 1
        out["probe_box_margin"] = probe.box_margin if sliced else None
        out["grade_logits"] = None if cls_out is None else cls_out.logits.float()
        out["alpha_text"] = _scalar(getattr(explain, "alpha_text", None))
        out["alpha_image"] = _scalar(getattr(explain, "alpha_image", None))
        embeds = getattr(cls_out if cls_out is not None else seg_out, "case_embeds", None)
        out["case_embedding"] = None if embeds is None else embeds[0].float()
        attn = getattr(explain, "token_attention", None)
        out["token_attention"] = None if attn is None else attn.float()
        out["timings"] = dict(model_inputs["timings"])
        out["timings"]["model"] = t1 - t0
        out["timings"]["model_segmentation"] = t_seg
        out["timings"]["model_grading"] = t_cls
        out["timings"]["text_encoder"] = self._text_probe.seconds
        out["timings"]["text_encoder_calls"] = self._text_probe.calls
        return out

    def postprocess(
        self,
        model_outputs,
        threshold: float = 0.5,
        return_probabilities: bool = False,
        mask_background: bool = True,
        min_component_mm3: Optional[float] = None,
        et_min_mm3: Optional[float] = None,
    ):
        t0 = time.perf_counter()
        case: LoadedCase = model_outputs["case"]
        convention = model_outputs["label_convention"]
        result: Dict[str, Any] = {
            "case_id": case.case_id,
            "label_map": None,
            "affine": case.affine,
            "header": case.header,
            "spacing": tuple(case.spacing),
            "shape": case.shape,
            "num_slices": CropInfo.from_dict(model_outputs["crop_info"]).num_slices,
            "label_convention": convention,
            "region_volumes_cm3": None,
            "postprocessing": None,
        }
        logits = model_outputs["seg_logits"]
        resampling = model_outputs.get("resampling")
        result["resampling"] = resampling
        result["tta"] = bool(model_outputs.get("tta"))
        result["probe_stride"] = int(model_outputs.get("probe_stride", 1))
        result["probe_box_margin"] = model_outputs.get("probe_box_margin")
        turn = model_outputs.get("reorientation")  # the model ran on the case in BraTS's orientation
        result["reoriented_from"] = None if turn is None or turn.is_identity else "".join(turn.input_axcodes)
        if logits is not None:
            result.update(
                self._segmentation_result(
                    model_outputs, threshold, return_probabilities, mask_background, min_component_mm3, et_min_mm3
                )
            )
        grade_logits = model_outputs["grade_logits"]
        result["grade"] = None
        result["grade_probabilities"] = None
        if grade_logits is not None:
            probs = torch.softmax(grade_logits[0], dim=-1).tolist()
            id2label = getattr(self.grading_model.config, "id2label", None) or dict(enumerate(GRADES))
            names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(len(probs))]
            result["grade_probabilities"] = dict(zip(names, (float(p) for p in probs)))
            result["grade"] = names[int(np.argmax(probs))]
        result["missing_sequences"] = list(model_outputs.get("missing_sequences") or [])
        result["warnings"] = list(model_outputs.get("warnings") or [])
        result["alpha_text"] = model_outputs["alpha_text"]
        result["alpha_image"] = model_outputs["alpha_image"]
        embedding = model_outputs.get("case_embedding")
        result["case_embedding"] = None if embedding is None else embedding.numpy()
        result["has_report"] = model_outputs["has_report"]
        result["report_truncated"] = model_outputs["report_truncated"]
        result["report_capped"] = bool(model_outputs.get("report_capped"))
        result["report_source"] = model_outputs["report_source"]
        result.update(self._token_explanation(model_outputs))
        result["model_id"] = self.model_id
        result["revision"] = self.revision
        for role, (model_id, revision) in self._companion_ids.items():
            result[f"{role}_model_id"], result[f"{role}_revision"] = model_id, revision
        timings = dict(model_outputs["timings"])
        timings["postprocess"] = time.perf_counter() - t0
        result["timings"] = timings
        return result

    def _segmentation_result(
        self, model_outputs, threshold, return_probabilities, mask_background, min_component_mm3, et_min_mm3
    ) -> Dict[str, Any]:
        """The segmentation fields of :meth:`postprocess`: the label map on the input's grid (background masked,
        post-processed), the post-processing settings, the region volumes and, when asked, the probabilities."""
        case: LoadedCase = model_outputs["case"]
        convention = model_outputs["label_convention"]
        turn = model_outputs.get("reorientation")
        result: Dict[str, Any] = {}
        label_map, regions, probs = self._label_map_on_input_grid(model_outputs, convention, threshold)
        if mask_background:  # skull-stripped input: no tumour where all four (given) sequences are 0
            background = np.ones(case.shape, dtype=bool)
            for volume in case.volumes.values():
                background &= volume == 0
            label_map[background] = 0
            regions &= ~background
        settings = check_postprocessing(
            getattr(self.image_processor, "postprocessing", None),
            min_component_mm3=min_component_mm3,
            et_min_mm3=et_min_mm3,
        )
        if any(settings.values()):  # on the input's grid, after the background mask
            regions = postprocess_regions(regions, voxel_volume_mm3(case.affine), **settings)
            label_map = regions_to_label_map(regions, get_label_convention(convention))
        result["postprocessing"] = settings
        result["label_map"] = label_map.astype(np.uint8, copy=False)
        result["region_volumes_cm3"] = _nested_region_volumes(regions, case.affine)
        if return_probabilities and probs is not None:
            result["region_probabilities"] = probs.astype(np.float16)
        elif return_probabilities:
            probs = torch.sigmoid(model_outputs["seg_logits"]).permute(1, 2, 3, 0).numpy().astype(np.float16)
            probs = self.image_processor.uncrop(probs, model_outputs["crop_info"], fill=0)
            if turn is not None and not turn.is_identity:
                probs = np.stack([turn.undo(p) for p in probs])
            result["region_probabilities"] = probs
        return result

    def _label_map_on_input_grid(self, model_outputs, convention: str, threshold: float):
        """``(label map, region masks (3, X, Y, Z), probabilities or None)`` on the input's grid and orientation:
        uncropped, and reoriented back (and with ``resample=True`` the probabilities resampled back onto the input
        grid, then thresholded, nnU-Net style)."""
        logits, crop_info = model_outputs["seg_logits"], model_outputs["crop_info"]
        turn = model_outputs.get("reorientation")
        turned = turn is not None and not turn.is_identity
        if model_outputs.get("resampling") is not None:
            on_model_grid = self.image_processor.uncrop(
                torch.sigmoid(logits).permute(1, 2, 3, 0).numpy(), crop_info, fill=0
            )
            probs = resample_to_shape(on_model_grid, model_outputs.get("oriented_shape", model_outputs["case"].shape))
            if turned:  # (R, X, Y, Z): back to the input's orientation
                probs = np.stack([turn.undo(p) for p in probs])
            regions = probs > threshold
            return regions_to_label_map(regions, get_label_convention(convention)), regions, probs
        label_map, regions = self.image_processor.post_process_segmentation(
            logits, crop_info, label_convention=convention, threshold=threshold, return_regions=True
        )
        if turned:  # back to the input's grid and orientation
            label_map = turn.undo(label_map)
            regions = np.stack([turn.undo(r) for r in regions])
        return label_map, regions, None

    # ------------------------------------------------------------------------------ explanation
    def _token_explanation(self, model_outputs) -> Dict[str, Any]:
        out: Dict[str, Any] = {"tokens": None, "token_attention": None, "token_offsets": None, "words": None}
        attn = model_outputs.get("token_attention")
        ids = model_outputs.get("input_ids")
        if attn is None or ids is None or not model_outputs["has_report"]:
            return out
        mask = model_outputs["attention_mask"][0].bool()
        ids_list = ids[0][mask].tolist()
        weights = attn[0][: mask.shape[0]][mask].tolist()
        out["tokens"] = self.tokenizer.convert_ids_to_tokens(ids_list)
        out["token_attention"] = [float(w) for w in weights]
        report = model_outputs.get("report")
        if not report or not getattr(self.tokenizer, "is_fast", False):
            return out
        enc = self.tokenizer(
            report,
            truncation=True,
            max_length=len(ids_list),
            return_offsets_mapping=True,
            add_special_tokens=True,
        )
        if list(enc["input_ids"]) != ids_list:
            return out
        offsets = [tuple(int(v) for v in o) for o in enc["offset_mapping"]]
        out["token_offsets"] = offsets
        words: List[Dict[str, Any]] = []
        current = None
        for idx, word_id in enumerate(enc.word_ids()):
            if word_id is None:
                current = None
                continue
            start, end = offsets[idx]
            if current is not None and current["word_id"] == word_id:
                current["end"] = end
                current["weight"] += weights[idx]
            else:
                current = {"word_id": word_id, "start": start, "end": end, "weight": weights[idx]}
                words.append(current)
        for w in words:
            w.pop("word_id")
            w["word"] = report[w["start"] : w["end"]]
            w["weight"] = float(w["weight"])
        out["words"] = words
        return out

    # ------------------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs):
        """Save a folder that ``transformers.pipeline(model=folder, trust_remote_code=True)`` runs:
        the root model (segmentation when there is one) with ``config.custom_pipelines``, this file and
        its relative imports, the processor, and the other head in ``grading/`` (or ``segmentation/``),
        named by the root config (``config.grading_model = "grading"``). A model folder holds ONE task
        model at its root; ``model_packaging.add_pipeline_to_folder`` adds the pipeline (and the grading
        model) to a folder that a model's ``save_pretrained`` wrote."""
        if any(is_inference_optimized(m) for m in self.models):
            raise ValueError(
                "This pipeline's models were rewritten for inference (BatchNorm folded, maybe bf16) and cannot be "
                "saved as EmrFuse checkpoints; build the pipeline with optimize=False to save it."
            )
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        root = self.segmentation_model if self.segmentation_model is not None else self.grading_model
        other = self.grading_model if root is self.segmentation_model else None
        if other is not None:
            other.save_pretrained(save_directory / GRADING_SUBFOLDER, **kwargs)
            root.config.grading_model = GRADING_SUBFOLDER
        root.config.custom_pipelines = custom_pipelines_entry()
        root.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory, **kwargs)
        custom_object_save(self, save_directory)  # this file and the files it imports relatively


def custom_pipelines_entry() -> Dict[str, Dict[str, Any]]:
    """The ``custom_pipelines`` entry of a model folder's ``config.json`` that names this pipeline."""
    return {
        PIPELINE_TASK: {
            "impl": f"{Path(__file__).stem}.{EmrFusePipeline.__name__}",
            "pt": list(_PT_AUTO_CLASSES),
            "type": "multimodal",
        }
    }


def _check_model_source(model: str, revision: Optional[str]) -> Optional[str]:
    """Refuse a model folder that is not there or holds no ``config.json`` (``FileNotFoundError`` saying how to
    make the demo one); returns the revision to use (``None`` for a local folder, with a warning if one was given)."""
    path = Path(model).expanduser()
    is_default = os.path.normpath(model) == os.path.normpath(DEFAULT_MODEL)
    looks_like_hub_id = re.fullmatch(r"[\w.\-]+/[\w.\-]+", model) is not None and not model.startswith(".")
    if not path.exists() and (is_default or not looks_like_hub_id):
        hint = (
            " Make the demo model with the README's main job (python train.py --demo, which leaves "
            f"{DEFAULT_MODEL}), or pass a model folder / Hub id."
        )
        raise FileNotFoundError(f"No model folder at {path}.{hint}")
    if not path.is_dir():
        return revision
    if revision is not None:
        warnings.warn(
            f"revision={revision!r} is ignored: {path} is a local folder (a revision selects a Hub commit).",
            UserWarning,
            stacklevel=3,
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: no config.json, so not a saved EmrFuse model folder (its root holds the segmentation or the "
            f"grading model, saved with save_pretrained; a grading model in {GRADING_SUBFOLDER}/ is named by the "
            "root's config)."
        )
    return None


def load_pipeline(
    model: Union[str, os.PathLike, PreTrainedModel] = DEFAULT_MODEL,
    *,
    grading_model=None,
    segmentation_model=None,
    revision: Optional[str] = None,
    device=None,
    precision: str = "auto",
    chunk_size: Optional[int] = None,
    channels_last: bool = True,
    grading_max_slices: Union[int, str, None] = DEFAULT_GRADING_SLICES,
    optimize: bool = True,
    trust_remote_code: bool = False,
) -> EmrFusePipeline:
    """Build an :class:`EmrFusePipeline` from a model folder or Hub id.

    The folder's models and processor are loaded with the installed package's classes (its ``config.json`` must
    say ``model_type: emrfuse``) and nothing from the folder is imported; ``trust_remote_code=True`` runs the
    folder's own code instead (its ``auto_map``; ``emrfuse predict --trust-remote-code``,
    ``EMRFUSE_TRUST_REMOTE_CODE=1`` in the Space), which only a folder you trust should get. Weights are read from
    safetensors only: a folder holding only a pickled ``pytorch_model.bin`` is a ``ValueError`` naming the file.

    Works on any EmrFuse model folder, whether or not ``custom_pipelines`` was saved in it; the other head
    comes from :func:`resolve_companion` (``grading_model`` / ``segmentation_model``, or the root config).
    Raises ``FileNotFoundError`` for a local folder without ``config.json`` and (with how to make one) when
    the default demo model folder does not exist, ``ValueError`` for a truncated or corrupted weights file
    and for weights that are not finite. ``revision`` applies to Hub ids; for a local folder it is ignored
    with a warning.
    """
    t0 = time.perf_counter()
    if isinstance(model, (str, os.PathLike)):
        model = os.fspath(model)
        revision = _check_model_source(model, revision)
        processor_source = model
        root_model = _load_head(model, revision=revision, trust_remote_code=trust_remote_code)
    else:
        root_model = model
        processor_source = getattr(model.config, "_name_or_path", None)
    processor = load_processor(processor_source, revision=revision, trust_remote_code=trust_remote_code)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = EmrFusePipeline(
        model=root_model,
        processor=processor,
        task=PIPELINE_TASK,
        device=device,
        grading_model=grading_model,
        segmentation_model=segmentation_model,
        precision=precision,
        chunk_size=chunk_size,
        channels_last=channels_last,
        grading_max_slices=grading_max_slices,
        optimize=optimize,
        trust_remote_code=trust_remote_code,
    )
    pipe.load_seconds = time.perf_counter() - t0
    return pipe


@contextlib.contextmanager
def pipeline_for_model(
    model: PreTrainedModel,
    processor,
    device=None,
    precision: str = "fp32",
    segmentation_model: Optional[PreTrainedModel] = None,
):
    """An :class:`EmrFusePipeline` around one task model held in memory (training's held-out evaluation), for a
    ``with`` block: no folder read, no companion looked for, the model neither rewritten nor moved to another
    memory format, and the pipeline's hooks taken off the model at the end. The same stages run as for
    ``emrfuse predict``. ``segmentation_model``: the companion of a grading model (also in memory), whose output
    gives a ``grading_pooling="tumour"`` grading model its ``pooling_mask``."""
    kind = _head_kind(model)
    pipe = EmrFusePipeline(
        model=model,
        processor=processor,
        task=PIPELINE_TASK,
        device=device if device is not None else model.device,
        grading_model=False if kind == "segmentation" else None,
        segmentation_model=(False if segmentation_model is None else segmentation_model) if kind == "grading" else None,
        precision=precision,
        channels_last=False,
        optimize=False,
        identify_models=False,
    )
    try:
        yield pipe
    finally:
        pipe._text_probe.remove()


# Auto classes the ``pipeline()`` factory tries, in order, to load a folder's root model; an EmrFuse
# folder's auto_map names one of them for its head (the others fail and are skipped).
_PT_AUTO_CLASSES: Tuple[str, ...] = tuple(
    name
    for name in (
        "AutoModelForSemanticSegmentation",
        "AutoModelForImageSegmentation",
        "AutoModelForImageClassification",
        "AutoModel",
    )
    if hasattr(transformers, name)
)

if PIPELINE_REGISTRY.supported_tasks.get(PIPELINE_TASK, {}).get("impl") is not EmrFusePipeline:
    PIPELINE_REGISTRY.register_pipeline(
        PIPELINE_TASK,
        pipeline_class=EmrFusePipeline,
        pt_model=tuple(getattr(transformers, name) for name in _PT_AUTO_CLASSES),
        type="multimodal",
    )
