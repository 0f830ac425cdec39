"""Image processor and processor for EmrFuse: MRI volume <-> model-ready slices, report -> tokens.

:class:`EmrFuseImageProcessor` turns a case's four sequences into normalised, cropped axial slices and
the model's region logits back into a label map; :class:`EmrFuseProcessor` adds the report's tokens.

This file travels to the Hugging Face Hub with the model code, so it imports only numpy, torch,
transformers and its sibling modules (by relative import). Volume *paths* (NIfTI; MetaImage with
SimpleITK) are read with the sibling :mod:`brats_io`, which imports nibabel where a path is given.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from transformers import AutoTokenizer, PretrainedConfig
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs, ProcessorMixin

from .brats_io import affine_spacing, to_nifti_image, volume_suffix
from .brats_labels import REGIONS, SEQUENCES, canonical_sequence_name, get_label_convention, regions_to_label_map

__all__ = [
    "CropInfo",
    "PreparedVolume",
    "EmrFuseImageProcessor",
    "EmrFuseProcessor",
    "grading_slice_indices",
    "POSTPROCESSING_DEFAULTS",
    "check_postprocessing",
    "postprocess_regions",
]

# BERT-family towers have 512 learned positions; used when a tokenizer does not state its maximum length.
_DEFAULT_TEXT_MAX_LENGTH = 512
_UNSET_MODEL_MAX_LENGTH = 10**6  # tokenizers without a limit report int(1e30)


# --------------------------------------------------------------------------------------------------
# Crop bookkeeping
# --------------------------------------------------------------------------------------------------
@dataclass
class CropInfo:
    """Where the model-ready volume sits in the original voxel grid.

    Attributes:
        original_shape: ``(X, Y, Z)`` of the input volume.
        bbox: ``((x0, x1), (y0, y1), (z0, z1))``, half-open, in the original grid: the brain's bounding
            box grown by the crop margin and clipped to the grid.
        pad: ``((before, after) along X, (before, after) along Y)``: in-plane zero padding added to the
            cropped volume. Z is never padded.
    """

    original_shape: Tuple[int, int, int]
    bbox: Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]
    pad: Tuple[Tuple[int, int], Tuple[int, int]]

    def __post_init__(self):
        self.original_shape = tuple(int(s) for s in self.original_shape)
        self.bbox = tuple((int(a), int(b)) for a, b in self.bbox)
        self.pad = tuple((int(a), int(b)) for a, b in self.pad)
        if len(self.original_shape) != 3 or len(self.bbox) != 3 or len(self.pad) != 2:
            raise ValueError(
                f"CropInfo: expected a 3-D original_shape, 3 bbox ranges and 2 pad pairs, got {self.original_shape}, "
                f"{self.bbox}, {self.pad}."
            )
        for axis, ((lo, hi), size) in enumerate(zip(self.bbox, self.original_shape)):
            if not 0 <= lo < hi <= size:
                raise ValueError(f"CropInfo: bbox {self.bbox[axis]} on axis {axis} is outside the grid of size {size}.")
        if any(p < 0 for pair in self.pad for p in pair):
            raise ValueError(f"CropInfo: negative padding {self.pad}.")

    @property
    def cropped_shape(self) -> Tuple[int, int, int]:
        """Shape ``(x1 - x0, y1 - y0, z1 - z0)`` of the crop before padding."""
        return tuple(hi - lo for lo, hi in self.bbox)

    @property
    def padded_shape(self) -> Tuple[int, int, int]:
        """Shape ``(H, W, D)`` of the model-ready volume (after in-plane padding)."""
        h, w, d = self.cropped_shape
        return (h + sum(self.pad[0]), w + sum(self.pad[1]), d)

    @property
    def num_slices(self) -> int:
        """Number of axial slices ``D`` of the model-ready volume."""
        return self.bbox[2][1] - self.bbox[2][0]

    def to_dict(self) -> Dict[str, List]:
        """JSON-able dict (lists of ints)."""
        return {
            "original_shape": list(self.original_shape),
            "bbox": [list(r) for r in self.bbox],
            "pad": [list(p) for p in self.pad],
        }

    @classmethod
    def from_dict(cls, data: Union["CropInfo", Mapping[str, Any]]) -> "CropInfo":
        """Rebuild from :meth:`to_dict` output (a ``CropInfo`` is returned unchanged)."""
        if isinstance(data, CropInfo):
            return data
        try:
            return cls(original_shape=data["original_shape"], bbox=data["bbox"], pad=data["pad"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"crop_info must have original_shape, bbox and pad; got {data!r}.") from err


@dataclass
class PreparedVolume:
    """A normalised, cropped, padded volume ``float32 (4, H, W, D)`` and its :class:`CropInfo`."""

    volume: np.ndarray
    crop: CropInfo
    present: Tuple[bool, ...] = (True,) * len(SEQUENCES)
    """Which sequences (in the processor's ``sequence_order``) the case has; a missing one is all zero."""

    @property
    def num_slices(self) -> int:
        """Number of axial slices ``D``."""
        return int(self.volume.shape[-1])


class EmrFuseImageProcessorKwargs(ImagesKwargs, total=False):
    """Settings of :class:`EmrFuseImageProcessor` that ``from_pretrained(..., **kwargs)`` may override."""

    sequence_order: Tuple[str, ...]
    context_slices: int
    size_divisor: int
    crop_margin: int
    expected_spacing: Optional[Tuple[float, float, float]]
    spacing_tolerance: float
    sequence_presence: bool
    clip_percentiles: Optional[Tuple[float, float]]
    postprocessing: Dict[str, float]


# --------------------------------------------------------------------------------------------------
# Post-processing of the region masks (BraTS winners' style)
# --------------------------------------------------------------------------------------------------
POSTPROCESSING_DEFAULTS: Dict[str, float] = {"min_component_mm3": 0.0, "et_min_mm3": 0.0}
"""Post-processing settings and their defaults (0 = off): see :func:`postprocess_regions`."""


def check_postprocessing(settings: Optional[Mapping[str, Any]] = None, **overrides: Any) -> Dict[str, float]:
    """The complete post-processing settings: :data:`POSTPROCESSING_DEFAULTS`, then ``settings``, then the
    ``overrides`` that are not ``None``. Each value must be a finite number >= 0 (mm^3); an unknown name is an
    error naming it."""
    out = dict(POSTPROCESSING_DEFAULTS)
    merged = dict(settings or {})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    for name, value in merged.items():
        if name not in POSTPROCESSING_DEFAULTS:
            raise ValueError(f"postprocessing: unknown setting {name!r} (known: {sorted(POSTPROCESSING_DEFAULTS)}).")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"postprocessing: {name} must be a number of mm^3 >= 0, got {value!r}.")
        if not (math.isfinite(float(value)) and float(value) >= 0):
            raise ValueError(f"postprocessing: {name} must be a finite number of mm^3 >= 0, got {value!r}.")
        out[name] = float(value)
    return out


def postprocess_regions(
    regions: np.ndarray, voxel_volume_mm3: float, min_component_mm3: float = 0.0, et_min_mm3: float = 0.0
) -> np.ndarray:
    """Post-process predicted region masks as BraTS challenge winners do; returns nested masks ``(3, ...)``.

    ``regions``: boolean ``(3, X, Y, Z)`` masks (WT, TC, ET) on a grid of ``voxel_volume_mm3`` mm^3 per voxel. They
    are first nested (TC |= ET, WT |= TC: the label map that :func:`brats_labels.regions_to_label_map` paints
    is the same), then:

    1. ``min_component_mm3 > 0``: every connected component of the whole tumour (26-connectivity) smaller than
       ``min_component_mm3`` is removed, with the TC and ET voxels inside it (isolated false-positive specks);
    2. ``et_min_mm3 > 0``: when the total ET volume (after step 1) is below ``et_min_mm3``, all ET is relabelled
       as tumour core without enhancement (ET cleared, TC kept): a few enhancing voxels in a case without
       enhancing tumour cost its whole ET Dice (0 instead of 1), so a small ET prediction is not trusted.

    With both 0 (the default) the masks are returned unchanged. Needs scipy (imported here, only when a
    component is looked for).
    """
    settings = check_postprocessing(min_component_mm3=min_component_mm3, et_min_mm3=et_min_mm3)
    regions = np.asarray(regions, dtype=bool)
    if regions.shape[0] != len(REGIONS):
        raise ValueError(f"regions must have {len(REGIONS)} channels (WT, TC, ET) first, got shape {regions.shape}.")
    if not any(settings.values()):
        return regions
    voxel = float(voxel_volume_mm3)
    if not (math.isfinite(voxel) and voxel > 0):
        raise ValueError(f"voxel_volume_mm3 must be a positive number, got {voxel_volume_mm3!r}.")
    et = regions[2].copy()
    tc = regions[1] | et
    wt = regions[0] | tc
    if settings["min_component_mm3"] > 0 and wt.any():
        try:  # optional for a model folder's code: only the component removal needs it
            from scipy import ndimage
        except ImportError as exc:
            raise ImportError("min_component_mm3 > 0 needs scipy (pip install scipy).") from exc

        labels, _ = ndimage.label(wt, structure=np.ones((3,) * wt.ndim, dtype=bool))
        sizes_mm3 = np.bincount(labels.ravel()) * voxel
        keep = sizes_mm3 >= settings["min_component_mm3"]
        keep[0] = False  # background
        wt = keep[labels]
        tc &= wt
        et &= wt
    if settings["et_min_mm3"] > 0 and float(et.sum(dtype=np.int64)) * voxel < settings["et_min_mm3"]:
        et[:] = False
    return np.stack([wt, tc, et])


def grading_slice_indices(num_slices: int, max_slices: Optional[int]) -> np.ndarray:
    """The slices a case is graded from (the one grading bag policy, ``config.grading_slices``): at most
    ``max_slices`` of its ``num_slices`` (brain-cropped) slices, evenly spaced from the first to the last;
    all of them when ``max_slices`` is None or not smaller. Training draws each case's bag from these positions,
    evaluation and inference pool exactly them."""
    n = int(num_slices)
    if max_slices is None or n <= int(max_slices):
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, int(max_slices)).round().astype(np.int64))


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _is_image_like(obj) -> bool:
    """nibabel-style image (duck-typed on ``get_fdata`` and ``affine``)."""
    return hasattr(obj, "get_fdata") and hasattr(obj, "affine")


def _read_path(path) -> Any:
    """A volume path as a nibabel image (:func:`brats_io.to_nifti_image`: NIfTI, or MetaImage with SimpleITK)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"MRI file {path!r} does not exist.")
    if volume_suffix(path) is None:
        raise ValueError(
            f"MRI file {path!r}: only NIfTI paths (.nii, .nii.gz) and MetaImage paths (.mha, .mhd) are read here; "
            "read other formats into arrays first and pass the arrays."
        )
    return to_nifti_image(path)


def _zero_constant_background(volume: np.ndarray, min_fraction: float = 0.05) -> float:
    """Shift a constant non-zero background to exactly 0, in place; returns the shift (0.0 if none).

    Skull-stripped scans have a zero background, which is how the brain mask is found. Scans that
    were already z-scored (or otherwise shifted) have a constant background of another value (e.g.
    ``-mean / std``). When the eight corners of the grid hold one non-zero value that covers at least
    ``min_fraction`` of the voxels, that value is the background: subtracting it restores the zero
    background and leaves the z-score over the brain unchanged (a z-score ignores shifts).
    """
    corners = volume[np.ix_(*[[0, n - 1] for n in volume.shape])].ravel()
    value = corners[0]
    if value == 0 or not np.all(corners == value) or not np.isfinite(value):
        return 0.0
    if np.count_nonzero(volume == value) < min_fraction * volume.size:
        return 0.0
    volume -= value
    return float(value)


# --------------------------------------------------------------------------------------------------
# Image processor
# --------------------------------------------------------------------------------------------------
def _check_sequence_values(volume: np.ndarray, name: str, allow_missing_sequences: bool) -> None:
    """``ValueError`` naming the sequence for NaN / infinity, an all-zero volume (unless missing sequences are
    allowed) and a volume of one constant non-zero intensity (which is not called all zero)."""
    if not np.isfinite(volume).all():
        raise ValueError(f"Sequence {name!r} contains NaN or infinite values.")
    if not volume.any():
        if not allow_missing_sequences:
            raise ValueError(f"Sequence {name!r} is all zero.")
    elif volume.min() == volume.max():
        raise ValueError(
            f"Sequence {name!r} has one intensity ({float(volume.flat[0]):g}) in every voxel: an image of a "
            "constant, not of a brain; check the file."
        )


def _check_clip_percentiles(value) -> Optional[Tuple[float, float]]:
    """``None`` or a pair ``(low, high)`` of percentiles with ``0 <= low < high <= 100`` (as floats)."""
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"clip_percentiles must be None or two percentiles (low, high), got {value!r}.") from None
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {value!r}.")
    return (low, high)


class EmrFuseImageProcessor(BaseImageProcessor):
    r"""Four-sequence brain MRI volume <-> model-ready axial slices.

    For one case:

    1. :meth:`~EmrFuseImageProcessor.load_volume`: four sequences (arrays, nibabel images, paths, a
       ``(4, X, Y, Z)`` array, or a dict keyed by any sequence alias) -> ``float32 (4, X, Y, Z)`` in
       :attr:`~EmrFuseImageProcessor.sequence_order`, validated (3-D, same shape, finite, not all zero;
       images of one case must share one voxel grid, and their spacing is checked against
       ``expected_spacing``).
    2. Brain mask = voxels where *any* sequence is non-zero (BraTS volumes are skull-stripped with an
       exact-zero background; a constant non-zero background, as in already z-scored scans, is first
       shifted to zero). The brain's bounding box (``np.any`` projections), grown by
       ``crop_margin`` voxels on every side and clipped to the grid, is the crop.
    3. :meth:`~EmrFuseImageProcessor.normalize`: z-score of each sequence over the brain voxels
       (mean 0, std 1 over the brain; background stays exactly 0); with ``clip_percentiles``, each
       sequence's brain intensities are first clipped to those percentiles of its brain voxels.
    4. In-plane zero padding (= background after normalisation) of the cropped volume to multiples of
       ``size_divisor``, split evenly before/after (the odd voxel goes after). The slice axis (Z) is
       cropped to the brain but never padded.
    5. :meth:`~EmrFuseImageProcessor.slices`: axial slices with ``context_slices`` neighbours on each
       side as extra channels (edge slices replicated): ``C = 4 * (2k + 1)``, channel order = for each
       offset ``-k..k`` (outer) the four sequences (inner).
    6. Back: :meth:`~EmrFuseImageProcessor.post_process_segmentation` thresholds the region logits,
       removes the padding, puts the crop back into the original grid (outside the crop = 0) and
       paints a label map in the requested convention (:func:`brats_labels.regions_to_label_map`).

    Orientation and spacing: the processor works on the voxel grid exactly as given: nothing is reoriented or resampled.
    BraTS data are 1 mm isotropic and co-registered (SRI24), which is what the model expects. When
    the inputs carry an affine (nibabel images / paths), :meth:`~EmrFuseImageProcessor.check_spacing`
    raises if the voxel size differs from ``expected_spacing`` (set ``expected_spacing=None`` to
    skip; the pipeline's ``resample=True`` / ``emrfuse predict --resample`` resamples a case to it and
    the prediction back), and the four sequences must share one affine. Plain arrays carry no geometry, so nothing
    can be checked for them: resample such data beforehand.

    Args:
        sequence_order: canonical names (or aliases) of the four sequences, in the order of the
            model's input channels and of list / ``(4, X, Y, Z)`` inputs. Default
            :data:`brats_labels.SEQUENCES` (``t1, t1ce, t2, flair``); must be a permutation of it.
        context_slices: ``k`` neighbouring slices on each side stacked as channels
            (``in_channels = 4 * (2k + 1)``).
        size_divisor: in-plane size of the model-ready slices is padded up to a multiple of this
            (32 for a ResNet with five stride-2 stages).
        crop_margin: voxels of background kept around the brain's bounding box on every side
            (clipped to the grid).
        expected_spacing: voxel size in mm that inputs with an affine must have (BraTS: 1 mm
            isotropic); ``None`` disables the check. Nothing is ever resampled.
        spacing_tolerance: absolute tolerance in mm of that check.
        sequence_presence: append four constant channels to every slice, 1 where the case has the
            sequence and 0 where it is missing (zero-filled), so that one model serves cases with any
            non-empty subset of the four sequences (``in_channels`` grows by 4). A model trained with
            sequence dropout uses it; it must match the model's ``config.sequence_presence``.
        clip_percentiles: ``None`` (default: plain z-score) or ``(low, high)`` percentiles in
            ``[0, 100]``: before the z-score, each sequence's brain intensities are clipped to its own
            ``low``-th and ``high``-th percentile over the brain voxels (e.g. ``(0.5, 99.5)``), so that a
            few extreme voxels (vessels, artefacts, a raw scanner scale) do not squash the range of the
            rest. Background voxels stay 0. Saved with the processor, so training and inference
            normalise alike.
        postprocessing: the post-processing the pipeline applies to the label map by default
            (:func:`postprocess_regions`): ``{"min_component_mm3": 0, "et_min_mm3": 0}`` (both off unless set), saved
            with the processor so that a model folder carries the setting its cross-validation supported; the
            pipeline's ``min_component_mm3=`` / ``et_min_mm3=`` override it per call.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = EmrFuseImageProcessorKwargs
    _SETTINGS = (
        "sequence_order",
        "context_slices",
        "size_divisor",
        "crop_margin",
        "expected_spacing",
        "spacing_tolerance",
        "sequence_presence",
        "clip_percentiles",
        "postprocessing",
    )

    def __init__(
        self,
        sequence_order: Sequence[str] = SEQUENCES,
        context_slices: int = 0,
        size_divisor: int = 32,
        crop_margin: int = 0,
        expected_spacing: Optional[Sequence[float]] = (1.0, 1.0, 1.0),
        spacing_tolerance: float = 0.05,
        sequence_presence: bool = False,
        clip_percentiles: Optional[Sequence[float]] = None,
        postprocessing: Optional[Mapping[str, float]] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        order = tuple(canonical_sequence_name(s) for s in sequence_order)
        if sorted(order) != sorted(SEQUENCES):
            raise ValueError(f"sequence_order must be a permutation of {SEQUENCES}, got {tuple(sequence_order)}.")
        integers = (
            ("context_slices", context_slices, 0),
            ("size_divisor", size_divisor, 1),
            ("crop_margin", crop_margin, 0),
        )
        for name, value, minimum in integers:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
        if expected_spacing is not None:
            expected_spacing = tuple(float(s) for s in expected_spacing)
            if len(expected_spacing) != 3 or min(expected_spacing) <= 0:
                raise ValueError(f"expected_spacing must be three positive sizes (mm) or None, got {expected_spacing}.")
        if not float(spacing_tolerance) >= 0:
            raise ValueError(f"spacing_tolerance must be >= 0, got {spacing_tolerance!r}.")
        self.sequence_order = order
        self.context_slices = int(context_slices)
        self.size_divisor = int(size_divisor)
        self.crop_margin = int(crop_margin)
        self.expected_spacing = expected_spacing
        self.spacing_tolerance = float(spacing_tolerance)
        if not isinstance(sequence_presence, (bool, np.bool_)):
            raise ValueError(f"sequence_presence must be a bool, got {sequence_presence!r}.")
        self.sequence_presence = bool(sequence_presence)
        self.clip_percentiles = _check_clip_percentiles(clip_percentiles)
        self.postprocessing = check_postprocessing(postprocessing)

    # ---------------------------------------------------------------------------------- properties
    @property
    def in_channels(self) -> int:
        """Channels of one model input slice: ``4 * (2 * context_slices + 1)``, plus 4 presence
        channels with ``sequence_presence``."""
        return len(SEQUENCES) * (2 * self.context_slices + 1) + (len(SEQUENCES) if self.sequence_presence else 0)

    def to_dict(self) -> Dict[str, Any]:
        """Serialisable settings (tuples kept as tuples; JSON writes them as lists)."""
        out = super().to_dict()
        out.pop("_valid_kwargs_names", None)
        for name in self._SETTINGS:  # keep explicit None values (e.g. expected_spacing=None)
            out[name] = getattr(self, name)
        return out

    # ---------------------------------------------------------------------------------- loading
    def check_spacing(self, images: Union[Mapping[str, Any], Sequence[Any]]) -> Tuple[float, float, float] | None:
        """Check the voxel size (and shared grid) of nibabel-style images of one case.

        ``images``: a dict name -> image or a list of images (anything without an ``affine`` is
        ignored). Returns the spacing in mm, or ``None`` when no input carries an affine. Raises
        ``ValueError`` when the sequences' affines differ (not on one voxel grid) or when the spacing
        differs from ``expected_spacing`` by more than ``spacing_tolerance`` (skipped when
        ``expected_spacing`` is None). The processor never resamples.
        """
        items = images.items() if isinstance(images, Mapping) else zip(self.sequence_order, images)
        ref_name, ref_affine = None, None
        for name, img in items:
            affine = getattr(img, "affine", None)
            if affine is None:
                continue
            affine = np.asarray(affine, dtype=np.float64)
            if ref_affine is None:
                ref_name, ref_affine = name, affine
            elif not np.allclose(affine, ref_affine, atol=1e-3):
                raise ValueError(
                    f"Sequence {name!r} is not on the voxel grid of {ref_name!r} (different affines); "
                    "co-register the sequences first (nothing is resampled here)."
                )
        if ref_affine is None:
            return None
        spacing = affine_spacing(ref_affine)
        expected = self.expected_spacing
        if expected is not None and not np.allclose(spacing, expected, rtol=0, atol=self.spacing_tolerance):
            raise ValueError(
                f"Voxel spacing {tuple(round(s, 4) for s in spacing)} mm differs from the expected "
                f"{self.expected_spacing} mm; the processor does not resample: resample the case first (the "
                "pipeline does it with resample=True, emrfuse predict with --resample), or set "
                "expected_spacing=None to accept it as is."
            )
        return spacing

    def _sequence_array(self, item, name: str) -> np.ndarray:
        if _is_image_like(item):
            try:
                arr = np.asarray(item.get_fdata(dtype=np.float32))
            except TypeError:  # duck-typed images whose get_fdata takes no dtype
                arr = np.asarray(item.get_fdata())
        else:
            arr = _to_numpy(item)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise ValueError(f"Sequence {name!r}: expected a numeric array, got dtype {arr.dtype}.")
        if np.iscomplexobj(arr):
            raise ValueError(f"Sequence {name!r}: complex-valued data are not supported.")
        if arr.ndim != 3:
            raise ValueError(f"Sequence {name!r}: expected a 3-D volume (X, Y, Z), got shape {tuple(arr.shape)}.")
        return arr

    def load_volume(self, volume, allow_missing_sequences: bool = False) -> np.ndarray:
        """Turn one case's four sequences into a validated ``float32 (4, X, Y, Z)`` array.

        With ``allow_missing_sequences=True`` a dict may lack sequences (or map them to ``None``) and
        a sequence may be all zero: each missing sequence is zero-filled (at least one must be
        present). Without it, a missing or all-zero sequence is an error.

        Accepts an array / tensor ``(4, X, Y, Z)`` or a list of four 3-D arrays / nibabel images /
        volume paths (NIfTI, or MetaImage with SimpleITK; both in :attr:`sequence_order`), or a dict
        ``{sequence name (any alias from brats_labels.SEQUENCE_ALIASES) -> array / nibabel image / path}``.

        Raises ``ValueError`` (naming the sequence) for: a wrong number of sequences, an unknown or
        repeated sequence name, non-3-D data, sequences of different shapes, NaN/inf values, an
        all-zero sequence; and for images whose affines differ or whose spacing is not
        ``expected_spacing`` (see :meth:`check_spacing`).
        """
        if isinstance(volume, PreparedVolume):
            raise ValueError("load_volume got an already prepared volume; pass it to slices()/preprocess() instead.")
        if isinstance(volume, (str, os.PathLike)):
            raise ValueError(
                f"load_volume got a single path {os.fspath(volume)!r}: pass the four sequences as a dict "
                "{sequence name: path} or a list of four paths."
            )
        named: Dict[str, Any]
        if isinstance(volume, Mapping):
            named = {}
            for key, item in volume.items():
                name = canonical_sequence_name(key)
                if name in named:
                    keys = [k for k in volume if canonical_sequence_name(k) == name]
                    raise ValueError(f"Sequence {name!r} given twice (keys {keys}).")
                named[name] = item
            missing = [s for s in self.sequence_order if named.get(s) is None]
            if missing and not allow_missing_sequences:
                raise ValueError(
                    f"Missing sequence(s) {missing}: got {sorted(map(str, volume))}, need {list(self.sequence_order)} "
                    "(allow_missing_sequences=True zero-fills missing sequences)."
                )
            if len(missing) == len(SEQUENCES):
                raise ValueError(f"No MRI sequence given: need at least one of {list(self.sequence_order)}.")
        elif isinstance(volume, (list, tuple)):
            if len(volume) != len(SEQUENCES):
                raise ValueError(f"Expected {len(SEQUENCES)} sequences {list(self.sequence_order)}, got {len(volume)}.")
            named = dict(zip(self.sequence_order, volume))
        else:
            arr = _to_numpy(volume)
            if arr.ndim != 4:
                raise ValueError(
                    f"Expected a 4-sequence volume of shape (4, X, Y, Z) in order {list(self.sequence_order)}, "
                    f"got shape {tuple(arr.shape)}."
                )
            if arr.shape[0] != len(SEQUENCES):
                raise ValueError(
                    f"Expected {len(SEQUENCES)} sequences {list(self.sequence_order)} on axis 0, got {arr.shape[0]}."
                )
            named = dict(zip(self.sequence_order, arr))

        named = {
            n: (_read_path(v) if isinstance(v, (str, os.PathLike)) else v) for n, v in named.items() if v is not None
        }
        self.check_spacing(named)
        arrays = {name: self._sequence_array(named[name], name) for name in self.sequence_order if name in named}
        shapes = {name: tuple(a.shape) for name, a in arrays.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"Sequences have different shapes: {shapes}.")
        shape = next(iter(shapes.values()))
        out = np.zeros((len(SEQUENCES),) + shape, dtype=np.float32)
        for i, name in enumerate(self.sequence_order):
            if name not in arrays:
                continue
            out[i] = arrays[name]
            _check_sequence_values(out[i], name, allow_missing_sequences)
        for i in range(len(SEQUENCES)):
            _zero_constant_background(out[i])
        if not out.any():
            raise ValueError("Every sequence is all zero: no brain voxel.")
        return out

    @staticmethod
    def present_sequences(volume: np.ndarray) -> Tuple[bool, ...]:
        """Which sequences of a ``(4, ...)`` volume are present (not all zero)."""
        volume = _to_numpy(volume)
        return tuple(bool(volume[i].any()) for i in range(volume.shape[0]))

    # ---------------------------------------------------------------------------------- core steps
    @staticmethod
    def _check_volume(volume: np.ndarray, where: str) -> np.ndarray:
        volume = _to_numpy(volume)
        if volume.ndim != 4 or volume.shape[0] != len(SEQUENCES):
            raise ValueError(f"{where}: expected a volume of shape (4, X, Y, Z), got {tuple(volume.shape)}.")
        return volume

    def brain_mask(self, volume: np.ndarray) -> np.ndarray:
        """Boolean brain mask ``(X, Y, Z)``: voxels where any sequence is non-zero."""
        volume = self._check_volume(volume, "brain_mask")
        return np.any(volume != 0, axis=0)

    def brain_bbox(self, volume_or_mask: np.ndarray) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
        """Half-open bounding box of the brain (``(4, X, Y, Z)`` volume or ``(X, Y, Z)`` mask), grown
        by ``crop_margin`` and clipped to the grid. Raises ``ValueError`` if there is no brain voxel."""
        arr = _to_numpy(volume_or_mask)
        mask = self.brain_mask(arr) if arr.ndim == 4 else arr.astype(bool, copy=False)
        if mask.ndim != 3:
            raise ValueError(f"brain_bbox: expected (4, X, Y, Z) or (X, Y, Z), got {tuple(arr.shape)}.")
        bbox = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            idx = np.flatnonzero(np.any(mask, axis=other))
            if idx.size == 0:
                raise ValueError("The volume is all zero: no brain voxel to crop to.")
            lo = max(int(idx[0]) - self.crop_margin, 0)
            hi = min(int(idx[-1]) + 1 + self.crop_margin, mask.shape[axis])
            bbox.append((lo, hi))
        return tuple(bbox)

    def normalize(self, volume: np.ndarray) -> np.ndarray:
        """Z-score each sequence over the brain voxels; background stays 0.

        ``volume``: ``(4, X, Y, Z)`` (any crop of a case works: statistics use only brain voxels,
        so normalising before or after cropping to the brain gives the same values). Brain = voxels
        where any sequence is non-zero. Per sequence ``(v - mean) / std`` over those voxels (float64
        statistics, population std); with ``clip_percentiles=(low, high)`` the sequence's brain values
        are first clipped to their ``low``-th and ``high``-th percentiles (``np.percentile``, linear
        interpolation) and the mean and std are those of the clipped values. Returns ``float32`` of
        the same shape. Raises ``ValueError`` for an all-zero volume, NaN/inf values, or a sequence
        that is constant over the brain (std 0).
        """
        volume = self._check_volume(volume, "normalize")
        brain = np.any(volume != 0, axis=0)
        if not brain.any():
            raise ValueError("normalize: the volume is all zero (no brain voxel).")
        out = np.zeros(volume.shape, dtype=np.float32)
        present = self.present_sequences(volume)
        for i, name in enumerate(self.sequence_order):
            if not present[i] and any(present):
                continue  # a missing (zero-filled) sequence stays zero
            values = volume[i][brain].astype(np.float64, copy=False)
            if not np.isfinite(values).all():
                raise ValueError(f"normalize: sequence {name!r} contains NaN or infinite values.")
            if self.clip_percentiles is not None:
                values = np.clip(values, *np.percentile(values, self.clip_percentiles))
            mean = values.mean()
            std = values.std()
            if not np.isfinite(std) or std == 0:
                raise ValueError(
                    f"normalize: sequence {name!r} is constant over the brain (std {std}); cannot z-score."
                )
            out[i][brain] = ((values - mean) / std).astype(np.float32)
        return out

    def _pad_amounts(self, size: int, target: Optional[int] = None) -> Tuple[int, int]:
        if target is None:
            target = int(math.ceil(size / self.size_divisor) * self.size_divisor)
        total = target - size
        return (total // 2, total - total // 2)

    def prepare_volume(self, volume, allow_missing_sequences: bool = False) -> PreparedVolume:
        """One case -> :class:`PreparedVolume`: load/validate, crop to the brain bbox (+ margin),
        z-score over brain voxels, pad in-plane (evenly, zeros) to multiples of ``size_divisor``.

        ``volume``: anything :meth:`load_volume` accepts (``allow_missing_sequences`` is passed on).
        The result is ``float32 (4, H, W, D)`` with ``D`` the number of slices of the bbox (Z is not
        padded); ``present`` records which sequences the case has. Intensities may be integers, raw
        floats or already z-scored values: the z-score over the brain (non-zero voxels) makes them alike.
        """
        if isinstance(volume, PreparedVolume):
            return volume
        vol = self.load_volume(volume, allow_missing_sequences=allow_missing_sequences)
        bbox = self.brain_bbox(vol)
        (x0, x1), (y0, y1), (z0, z1) = bbox
        cropped = self.normalize(vol[:, x0:x1, y0:y1, z0:z1])
        pad = (self._pad_amounts(x1 - x0), self._pad_amounts(y1 - y0))
        crop = CropInfo(original_shape=vol.shape[1:], bbox=bbox, pad=pad)
        return PreparedVolume(volume=self._pad(cropped, pad), crop=crop, present=self.present_sequences(vol))

    @staticmethod
    def _pad(array: np.ndarray, pad) -> np.ndarray:
        """Zero-pad the two in-plane axes (-3, -2) of ``(..., h, w, d)``."""
        (a, b), (c, d) = pad
        if a == b == c == d == 0:
            return np.ascontiguousarray(array)
        h, w, depth = array.shape[-3:]
        out = np.zeros(array.shape[:-3] + (h + a + b, w + c + d, depth), dtype=array.dtype)
        out[..., a : a + h, c : c + w, :] = array
        return out

    def _repad(self, prepared: PreparedVolume, height: int, width: int) -> PreparedVolume:
        """Pad a prepared volume further to ``(height, width)`` (a common size for a batch of cases)."""
        h, w, d = prepared.crop.cropped_shape
        pad = (self._pad_amounts(h, height), self._pad_amounts(w, width))
        if pad == prepared.crop.pad:
            return prepared
        (a, _), (c, _) = prepared.crop.pad
        inner = prepared.volume[:, a : a + h, c : c + w, :]
        crop = CropInfo(original_shape=prepared.crop.original_shape, bbox=prepared.crop.bbox, pad=pad)
        return PreparedVolume(volume=self._pad(inner, pad), crop=crop, present=prepared.present)

    def crop_label_map(self, label_map, crop: Union[CropInfo, Mapping[str, Any]]) -> np.ndarray:
        """Crop and pad a ``(X, Y, Z)`` array (label map, mask, ...) exactly like the image: ``(H, W, D)``,
        same dtype, padding = 0. Also accepts channel-first ``(C, X, Y, Z)`` (e.g. region masks)."""
        crop = CropInfo.from_dict(crop)
        arr = _to_numpy(label_map)
        if arr.shape[-3:] != crop.original_shape or arr.ndim not in (3, 4):
            raise ValueError(
                f"crop_label_map: expected shape {crop.original_shape} (or (C, *shape)), got {tuple(arr.shape)}."
            )
        (x0, x1), (y0, y1), (z0, z1) = crop.bbox
        return self._pad(arr[..., x0:x1, y0:y1, z0:z1], crop.pad)

    def uncrop(self, array, crop: Union[CropInfo, Mapping[str, Any]], fill=0) -> np.ndarray:
        """Inverse of :meth:`crop_label_map`: ``(..., H, W, D)`` -> ``(..., X, Y, Z)`` on the original grid
        (padding removed, ``fill`` outside the crop)."""
        crop = CropInfo.from_dict(crop)
        arr = _to_numpy(array)
        if arr.shape[-3:] != crop.padded_shape:
            raise ValueError(f"uncrop: expected trailing shape {crop.padded_shape} (H, W, D), got {tuple(arr.shape)}.")
        (a, _), (c, _) = crop.pad
        h, w, _ = crop.cropped_shape
        (x0, x1), (y0, y1), (z0, z1) = crop.bbox
        out = np.full(arr.shape[:-3] + crop.original_shape, fill, dtype=arr.dtype)
        out[..., x0:x1, y0:y1, z0:z1] = arr[..., a : a + h, c : c + w, :]
        return out

    def slices(
        self, prepared: Union[PreparedVolume, np.ndarray], indices: Optional[Sequence[int]] = None
    ) -> np.ndarray:
        """Model input slices ``float32 (n, C, H, W)`` from a prepared ``(4, H, W, D)`` volume.

        ``indices``: slice indices in ``0..D-1`` (default: all). With ``context_slices = k`` each slice
        carries its neighbours ``z-k..z+k`` (indices clamped to the volume, i.e. edge slices replicated);
        channel ``c = (offset + k) * 4 + sequence``.
        """
        vol = prepared.volume if isinstance(prepared, PreparedVolume) else _to_numpy(prepared)
        if vol.ndim != 4 or vol.shape[0] != len(SEQUENCES):
            raise ValueError(f"slices: expected a prepared volume (4, H, W, D), got {tuple(vol.shape)}.")
        depth = vol.shape[-1]
        idx = np.arange(depth) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= depth):
            raise ValueError(f"slices: indices must lie in 0..{depth - 1}, got min {idx.min()} max {idx.max()}.")
        k = self.context_slices
        neighbours = np.clip(idx[:, None] + np.arange(-k, k + 1)[None, :], 0, depth - 1)  # (n, 2k+1)
        needed, where = np.unique(neighbours, return_inverse=True)
        # only the slices needed, as (u, 4, H, W), then gathered into (n, 2k+1, 4, H, W)
        by_slice = np.ascontiguousarray(np.moveaxis(vol[..., needed], -1, 0), dtype=np.float32)
        out = by_slice[where.reshape(neighbours.shape)]
        out = out.reshape(idx.size, len(SEQUENCES) * (2 * k + 1), vol.shape[1], vol.shape[2])
        if self.sequence_presence:
            present = prepared.present if isinstance(prepared, PreparedVolume) else self.present_sequences(vol)
            out = self.append_presence(out, present)
        return out

    @staticmethod
    def append_presence(slices: np.ndarray, present: Sequence[bool]) -> np.ndarray:
        """Append the four sequence-presence channels (constant 1 / 0 planes) to ``(n, C, H, W)`` slices."""
        n, _, h, w = slices.shape
        planes = np.broadcast_to(np.asarray(present, dtype=slices.dtype)[None, :, None, None], (n, len(present), h, w))
        return np.concatenate([slices, planes], axis=1)

    # ---------------------------------------------------------------------------------- batch API
    @staticmethod
    def _is_batch(volumes) -> bool:
        if isinstance(volumes, (list, tuple)):
            if not volumes:
                raise ValueError("preprocess got an empty list of volumes.")

            def case_like(v):
                if isinstance(v, (Mapping, PreparedVolume, list, tuple)):
                    return True
                return isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim == 4

            return all(case_like(v) for v in volumes)
        return False

    def preprocess(self, volumes, return_tensors: Optional[str] = "pt", **kwargs) -> BatchFeature:
        """One case or a list of cases -> ``BatchFeature``.

        ``volumes``: one case (anything :meth:`load_volume` accepts, or a :class:`PreparedVolume`) or
        a list of cases. All slices of every case are returned:
        ``pixel_values (N, C, H, W)``, ``slice_to_case (N,)`` (case index of each slice) and
        ``crop_info`` (one :meth:`CropInfo.to_dict` per case, for :meth:`post_process_segmentation`).
        Cases of different crop sizes are padded to a common in-plane size (recorded in their crop info).
        """
        allow_missing = bool(kwargs.pop("allow_missing_sequences", False))
        if kwargs:
            raise TypeError(f"preprocess: unexpected arguments {sorted(kwargs)}.")
        cases = list(volumes) if self._is_batch(volumes) else [volumes]
        prepared = [self.prepare_volume(case, allow_missing_sequences=allow_missing) for case in cases]
        height = max(p.volume.shape[1] for p in prepared)
        width = max(p.volume.shape[2] for p in prepared)
        prepared = [self._repad(p, height, width) for p in prepared]
        pixel_values = np.concatenate([self.slices(p) for p in prepared], axis=0)
        slice_to_case = np.concatenate([np.full(p.num_slices, i, dtype=np.int64) for i, p in enumerate(prepared)])
        data = {
            "pixel_values": pixel_values,
            "slice_to_case": slice_to_case,
            "crop_info": [p.crop.to_dict() for p in prepared],
        }
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["crop_info"])

    def __call__(self, volumes, return_tensors: Optional[str] = "pt", **kwargs) -> BatchFeature:
        """Same as :meth:`preprocess`."""
        return self.preprocess(volumes, return_tensors=return_tensors, **kwargs)

    def post_process_segmentation(
        self,
        logits,
        crop_info: Union[CropInfo, Mapping[str, Any]],
        label_convention: str = "brats2017",
        threshold: float = 0.5,
        logits_are_probabilities: bool = False,
        return_regions: bool = False,
    ):
        """Region logits of all slices of one case -> ``uint8`` label map ``(X, Y, Z)`` on the original grid.

        Args:
            logits: ``(D, 3, H, W)`` (numpy or torch), slices in order, regions in ``REGIONS`` order
                (WT, TC, ET), at the model-ready size of this case's ``crop_info``.
            crop_info: the case's :class:`CropInfo` (or its dict from :meth:`preprocess`).
            label_convention: ``"brats2017"`` (labels 1/2/4), ``"brats2023"`` (1/2/3), ``"brats2015"``,
                or a release year (see ``brats_labels.get_label_convention``).
            threshold: probability above which a voxel belongs to a region (``sigmoid(logit) > threshold``).
            logits_are_probabilities: the input already holds probabilities in ``[0, 1]``.
            return_regions: also return the boolean region masks ``(3, X, Y, Z)``.

        Returns the label map (outside the crop = 0), or ``(label_map, regions)``. Regions are turned
        into labels by ``brats_labels.regions_to_label_map`` (nested painting WT -> TC -> ET).
        """
        crop = CropInfo.from_dict(crop_info)
        conv = get_label_convention(label_convention)
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}.")
        arr = _to_numpy(logits)
        h, w, d = crop.padded_shape
        if arr.shape != (d, len(REGIONS), h, w):
            raise ValueError(
                f"post_process_segmentation: expected logits of shape (D, {len(REGIONS)}, H, W) = "
                f"{(d, len(REGIONS), h, w)} for this crop, got {tuple(arr.shape)}."
            )
        if logits_are_probabilities:
            mask = arr > threshold
        else:
            mask = arr > math.log(threshold / (1.0 - threshold))  # sigmoid(x) > t  <=>  x > logit(t)
        regions = self.uncrop(mask.transpose(1, 2, 3, 0), crop, fill=False)  # (3, X, Y, Z)
        label_map = regions_to_label_map(regions, conv)
        return (label_map, regions) if return_regions else label_map


# --------------------------------------------------------------------------------------------------
# Processor: image processor + tokenizer
# --------------------------------------------------------------------------------------------------
class EmrFuseProcessor(ProcessorMixin):
    r"""Image processor + BERT-family tokenizer for EmrFuse.

    ``__call__(volumes=..., text=...)`` returns the image processor's outputs (``pixel_values``,
    ``slice_to_case``, ``crop_info``) and, for the reports, ``input_ids``, ``attention_mask``,
    ``token_type_ids`` (padded to the longest report), ``report_truncated`` (the report had more
    tokens, special tokens included, than the maximum length and was cut) and ``has_report`` (False
    for ``None`` or blank reports, which are encoded as ``[CLS] [SEP]``).
    """

    def __init__(self, image_processor, tokenizer):
        super().__init__(image_processor, tokenizer)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "EmrFuseProcessor":
        """The processor saved in a folder or Hub repository, built from its two parts
        (:meth:`_get_arguments_from_pretrained`). ``ProcessorMixin.from_pretrained`` is not used: from transformers
        5.25 on it loads the image processor through ``AutoImageProcessor``, which reads the ``auto_map`` of
        ``processor_config.json`` and asks for ``trust_remote_code`` (a prompt, or an error without a terminal)
        although this class is already imported. Keyword arguments (``revision``, ``cache_dir``, ``token``,
        ``local_files_only``, ``subfolder``, ``trust_remote_code``...) reach both parts."""
        return cls(*cls._get_arguments_from_pretrained(pretrained_model_name_or_path, **kwargs))

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Load the image processor with this module's own class (so that ``EmrFuseProcessor.from_pretrained``
        needs no remote-code lookup) and the tokenizer with ``AutoTokenizer`` (any BERT-family tokenizer). The
        tokenizer's class comes from ``tokenizer_config.json``: without ``trust_remote_code`` a neutral config is
        passed, so that the folder's ``config.json`` (whose ``auto_map`` names the folder's code) is not read."""
        image_processor = EmrFuseImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        if not kwargs.get("trust_remote_code"):  # never a prompt, never the folder's tokenizer code
            kwargs = {**kwargs, "trust_remote_code": False}
            kwargs.setdefault("config", PretrainedConfig())
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return [image_processor, tokenizer]

    @property
    def model_input_names(self) -> List[str]:
        return ["pixel_values", "slice_to_case", "input_ids", "attention_mask", "token_type_ids", "has_report"]

    def text_max_length(self, max_length: Optional[int] = None) -> int:
        """Maximum report length in tokens: ``max_length`` if given, else the tokenizer's
        ``model_max_length``, else 512 (BERT's position limit) when the tokenizer states none."""
        if max_length is not None:
            if int(max_length) < 2:
                raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}.")
            return int(max_length)
        limit = getattr(self.tokenizer, "model_max_length", None)
        if limit is None or limit >= _UNSET_MODEL_MAX_LENGTH:
            return _DEFAULT_TEXT_MAX_LENGTH
        return int(limit)

    def encode_reports(
        self, text, max_length: Optional[int] = None, return_tensors: Optional[str] = "pt"
    ) -> BatchFeature:
        """Tokenise reports (``str`` or list of ``str | None``); see the class docstring for the outputs."""
        texts = [text] if isinstance(text, str) or text is None else list(text)
        if not texts:
            raise ValueError("encode_reports got an empty list of reports.")
        for i, t in enumerate(texts):
            if t is not None and not isinstance(t, str):
                raise ValueError(f"Report {i}: expected a string or None, got {type(t).__name__}.")
        has_report = [t is not None and t.strip() != "" for t in texts]
        clean = [t if ok else "" for t, ok in zip(texts, has_report)]
        limit = self.text_max_length(max_length)
        full = self.tokenizer(clean, add_special_tokens=True, truncation=False, padding=False, verbose=False)
        truncated = [len(ids) > limit for ids in full["input_ids"]]
        enc = self.tokenizer(
            clean,
            add_special_tokens=True,
            truncation=True,
            max_length=limit,
            padding="longest",
            return_attention_mask=True,
            return_token_type_ids=True,
        )
        data = {
            "input_ids": np.asarray(enc["input_ids"], dtype=np.int64),
            "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64),
            # BERT tokenizers return segment ids; others get zeros (one segment)
            "token_type_ids": np.asarray(enc.get("token_type_ids", np.zeros_like(enc["input_ids"])), dtype=np.int64),
            "report_truncated": np.asarray(truncated, dtype=bool),
            "has_report": np.asarray(has_report, dtype=bool),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(
        self,
        volumes=None,
        text=None,
        max_length: Optional[int] = None,
        return_tensors: Optional[str] = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Volumes (one case or a list) and/or reports (one per case) -> one ``BatchFeature``."""
        if kwargs:
            raise TypeError(f"EmrFuseProcessor: unexpected arguments {sorted(kwargs)}.")
        if volumes is None and text is None:
            raise ValueError("EmrFuseProcessor needs volumes, text or both.")
        data: Dict[str, Any] = {}
        if volumes is not None:
            data.update(self.image_processor.preprocess(volumes, return_tensors=return_tensors))
        if text is not None:
            reports = self.encode_reports(text, max_length=max_length, return_tensors=return_tensors)
            if volumes is not None and len(data["crop_info"]) != len(reports["has_report"]):
                raise ValueError(
                    f"Got {len(data['crop_info'])} case(s) of volumes but {len(reports['has_report'])} report(s); "
                    "give one report (or None) per case."
                )
            data.update(reports)
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["crop_info"])

    def post_process_segmentation(self, *args, **kwargs):
        """See :meth:`EmrFuseImageProcessor.post_process_segmentation`."""
        return self.image_processor.post_process_segmentation(*args, **kwargs)


EmrFuseImageProcessor.register_for_auto_class("AutoImageProcessor")
EmrFuseProcessor.register_for_auto_class("AutoProcessor")
