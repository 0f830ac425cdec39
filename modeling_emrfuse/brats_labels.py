"""BraTS conventions: sequence names, tumour sub-regions and label conventions.

This is the one place where these are defined; every other module (image processor, dataset builder,
metrics, CLI, Space) imports them from here. The model always sees the four MRI sequences in the order
:data:`SEQUENCES` (:data:`SEQUENCE_ALIASES` maps every release's spelling onto it) and predicts the three
overlapping BraTS evaluation regions :data:`REGIONS` (whole tumour, tumour core, enhancing tumour) as
three sigmoid channels; :data:`LABEL_CONVENTIONS` says which label values make up each region in each
release (README, "Conventions"). The file travels to the Hub with the model code, so it imports only numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

import numpy as np

SEQUENCES: Tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
"""Canonical sequence order of the model's input channels."""

SEQUENCE_ALIASES: Dict[str, str] = {
    # canonical names (BraTS 2017-2021 file suffixes)
    "t1": "t1",
    "t1ce": "t1ce",
    "t2": "t2",
    "flair": "flair",
    # BraTS 2023+ (t1n = native T1, t1c = contrast T1, t2w = T2, t2f = FLAIR)
    "t1n": "t1",
    "t1c": "t1ce",
    "t2w": "t2",
    "t2f": "flair",
    # BraTS 2015 MetaImage folder names (MR_T1, MR_T1c, MR_T2, MR_Flair), lower-cased
    "mr_t1": "t1",
    "mr_t1c": "t1ce",
    "mr_t2": "t2",
    "mr_flair": "flair",
    # other common spellings
    "t1gd": "t1ce",
    "t1c+": "t1ce",
    "t1-ce": "t1ce",
    "fla": "flair",
}

REGIONS: Tuple[str, ...] = ("WT", "TC", "ET")
"""Evaluation / prediction regions, in channel order."""

REGION_NAMES: Dict[str, str] = {"WT": "whole tumour", "TC": "tumour core", "ET": "enhancing tumour"}

GRADES: Tuple[str, ...] = ("HGG", "LGG")
"""Default grading labels (id 0 = HGG, id 1 = LGG)."""

HD95_EMPTY_SENTINEL_MM: float = float(np.sqrt(240.0**2 + 240.0**2 + 155.0**2))
"""HD95 when exactly one of prediction / reference is empty: the diagonal of the BraTS box (373.13 mm)."""


@dataclass(frozen=True)
class LabelConvention:
    """A label convention: which integer labels exist and which labels form each region."""

    name: str
    labels: Mapping[int, str]
    regions: Mapping[str, Tuple[int, ...]]
    # label written back for each "layer" of the nested regions when turning regions into a map
    edema_label: int
    core_label: int
    enhancing_label: int
    releases: Tuple[str, ...]

    @property
    def valid_labels(self) -> Tuple[int, ...]:
        return (0,) + tuple(sorted(self.labels))


LABEL_CONVENTIONS: Dict[str, LabelConvention] = {
    "brats2015": LabelConvention(
        name="brats2015",
        labels={1: "necrosis", 2: "edema", 3: "non-enhancing tumour", 4: "enhancing tumour"},
        regions={"WT": (1, 2, 3, 4), "TC": (1, 3, 4), "ET": (4,)},
        edema_label=2,
        core_label=1,
        enhancing_label=4,
        releases=("2013", "2015"),
    ),
    "brats2017": LabelConvention(
        name="brats2017",
        labels={1: "necrotic / non-enhancing tumour core", 2: "peritumoral edema", 4: "enhancing tumour"},
        regions={"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
        edema_label=2,
        core_label=1,
        enhancing_label=4,
        releases=("2017", "2018", "2019", "2020", "2021"),
    ),
    "brats2023": LabelConvention(
        name="brats2023",
        labels={
            1: "non-enhancing tumour core",
            2: "surrounding non-enhancing FLAIR hyperintensity",
            3: "enhancing tumour",
        },
        regions={"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
        edema_label=2,
        core_label=1,
        enhancing_label=3,
        releases=("2023", "2024", "2025"),
    ),
}

RELEASE_CONVENTION: Dict[str, str] = {
    release: conv.name for conv in LABEL_CONVENTIONS.values() for release in conv.releases
}
"""BraTS release year (as a string) -> label convention name."""


def get_label_convention(name_or_release: str | LabelConvention) -> LabelConvention:
    """Return the :class:`LabelConvention` for a convention name (``"brats2017"``) or a release (``"2018"``).

    Raises ``ValueError`` listing the known names for anything else; a convention is never guessed.
    """
    if isinstance(name_or_release, LabelConvention):
        return name_or_release
    key = str(name_or_release).strip().lower()
    if key in LABEL_CONVENTIONS:
        return LABEL_CONVENTIONS[key]
    key = key.removeprefix("brats")
    if key in RELEASE_CONVENTION:
        return LABEL_CONVENTIONS[RELEASE_CONVENTION[key]]
    raise ValueError(
        f"Unknown label convention {name_or_release!r}: use one of {sorted(LABEL_CONVENTIONS)} "
        f"or a BraTS release year {sorted(RELEASE_CONVENTION)}."
    )


def canonical_sequence_name(name: str) -> str:
    """Map a release-specific sequence name (``t2f``, ``MR_Flair``, ``T1c``) onto :data:`SEQUENCES`."""
    key = str(name).strip().lower()
    if key not in SEQUENCE_ALIASES:
        raise ValueError(f"Unknown MRI sequence name {name!r}: expected one of {sorted(SEQUENCE_ALIASES)}.")
    return SEQUENCE_ALIASES[key]


def check_label_values(label_map: np.ndarray, convention: str | LabelConvention, *, where: str = "label map") -> None:
    """Raise ``ValueError`` if ``label_map`` holds values outside the convention's labels."""
    conv = get_label_convention(convention)
    values = _present_values(np.asarray(label_map))
    bad = sorted(set(values) - set(conv.valid_labels))
    if bad:
        raise ValueError(
            f"{where}: label values {bad} are outside the {conv.name} convention (allowed {list(conv.valid_labels)})."
        )


def _present_values(label_map: np.ndarray) -> list:
    """The distinct values of a label map (a bincount for small non-negative integers: ~10x faster than unique)."""
    if label_map.dtype.kind in "ui" and label_map.size:
        lo, hi = int(label_map.min()), int(label_map.max())
        if lo >= 0 and hi < 256:
            return np.flatnonzero(np.bincount(label_map.ravel(), minlength=hi + 1)).tolist()
    return np.unique(label_map).tolist()


def label_map_to_regions(
    label_map: np.ndarray, convention: str | LabelConvention, *, validate: bool = True, where: str = "label map"
) -> np.ndarray:
    """Turn an integer label map into boolean region masks of shape ``(3, *label_map.shape)`` (WT, TC, ET)."""
    conv = get_label_convention(convention)
    label_map = np.asarray(label_map)
    if validate:
        check_label_values(label_map, conv, where=where)
    out = np.empty((len(REGIONS),) + label_map.shape, dtype=bool)
    if label_map.dtype.kind in "ui" and label_map.size and label_map.min() >= 0 and label_map.max() < 256:
        # look-up table per region: one gather instead of a set-membership test per voxel
        index = label_map.astype(np.intp, copy=False)
        for i, region in enumerate(REGIONS):
            lut = np.zeros(256, dtype=bool)
            lut[list(conv.regions[region])] = True
            out[i] = lut[index]
        return out
    for i, region in enumerate(REGIONS):
        out[i] = np.isin(label_map, conv.regions[region])
    return out


def regions_to_label_map(regions: np.ndarray, convention: str | LabelConvention) -> np.ndarray:
    """Turn region masks ``(3, ...)`` (WT, TC, ET; bool or 0/1) into a ``uint8`` label map.

    The regions are nested (ET inside TC inside WT); predictions need not be, so the label map is
    built by painting WT, then TC, then ET: voxels in WT only get the edema label, voxels in TC but
    not ET get the core label (``1``; in ``brats2015`` necrosis and non-enhancing tumour are both
    core and cannot be told apart from regions, so ``1`` is written), voxels in ET get the
    enhancing label. A voxel predicted ET or TC but not WT is still written (the inner region
    wins), so that nothing predicted is silently dropped.
    """
    conv = get_label_convention(convention)
    regions = np.asarray(regions)
    if regions.shape[0] != len(REGIONS):
        raise ValueError(f"regions must have {len(REGIONS)} channels (WT, TC, ET) first, got shape {regions.shape}.")
    regions = regions.astype(bool)
    out = np.zeros(regions.shape[1:], dtype=np.uint8)
    out[regions[0]] = conv.edema_label
    out[regions[1]] = conv.core_label
    out[regions[2]] = conv.enhancing_label
    return out


def convert_label_map(
    label_map: np.ndarray, source: str | LabelConvention, target: str | LabelConvention
) -> np.ndarray:
    """Convert a label map between conventions through its regions (exact for 2017 <-> 2023)."""
    src, dst = get_label_convention(source), get_label_convention(target)
    if src.name == dst.name:
        check_label_values(label_map, src)
        return np.asarray(label_map).astype(np.uint8, copy=True)
    return regions_to_label_map(label_map_to_regions(label_map, src), dst)
