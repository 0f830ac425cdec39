"""Synthetic demo data: BraTS-2020-layout glioma cases with TextBraTS-style reports (``emrfuse demo-data``).

No BraTS data reaches a fresh machine without registration, so the project ships this generator. It
writes synthetic cases in the real BraTS 2020 training layout (:func:`write_demo_dataset`), so that the
real dataset-builder path is exercised end to end: simulated anatomy (:func:`_anatomy`,
:func:`_render_images`), tumours whose composition is drawn by grade from real label maps
(:data:`TUMOUR_COMPOSITION`, :func:`_draw_tumour`), and reports written by a noisy reader calibrated to
the real TextBraTS reports (:data:`READER_NOISE`, :func:`_write_report`). All vectorised numpy,
deterministic by seed. README, "Demo reports", says how the reports are calibrated and checked.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np
from scipy import ndimage

from modeling_emrfuse.brats_labels import GRADES, SEQUENCES, check_label_values
from modeling_emrfuse.runtime.strict_json import write_json

__all__ = [
    "DEMO_SIZES",
    "NAME_MAPPING_COLUMNS",
    "DemoCase",
    "brats_affine",
    "demo_case_id",
    "generate_case",
    "write_demo_dataset",
    "demo_case_ids",
    "DEMO_MARKER",
    "DEMO_DATA_VERSION",
    "READER_NOISE",
    "TUMOUR_COMPOSITION",
    "REFERENCE_BRAIN_CM3",
    "add_parser",
]

DEMO_MARKER = "emrfuse_demo_data.json"
"""File that :func:`write_demo_dataset` leaves in its output folder, listing the cases it generated, so that
``train.py --demo`` can tell demo data from data it did not generate."""
DEMO_GENERATOR = "datasets_scripts.demo_data"
DEMO_DATA_VERSION = 3
"""Bumped whenever the same seed would give different cases (2: reports written through the calibrated noisy
reader, tumours departing from the textbook picture; 3: tumour composition and size drawn by grade from
:data:`TUMOUR_COMPOSITION`); ``train.py --demo`` regenerates a folder of another version."""

DEMO_SIZES: Dict[str, Tuple[int, int, int]] = {
    "small": (64, 64, 48),
    "medium": (96, 96, 64),
    "full": (240, 240, 155),
}
"""Named grid sizes (X, Y, Z) of the demo cases (an explicit ``(X, Y, Z)`` tuple works too).

``"full"`` is the BraTS grid (a few seconds per case). ``"small"`` (the default) is a miniature brain on
a 1 mm grid: after the image processor's brain crop it pads to 64 x 64 in-plane with ~40 brain slices, so
a 2D model trains on CPU in minutes; a case writes in well under a second. Small grids are not a
down-sampled BraTS case: the anatomy is drawn at the target size, and thin structures (enhancing rim,
cortex) keep a minimum thickness of about two voxels so that they stay visible and learnable.
"""

NAME_MAPPING_COLUMNS: Tuple[str, ...] = (
    "Grade",
    "BraTS_2017_subject_ID",
    "BraTS_2018_subject_ID",
    "TCGA_TCIA_subject_ID",
    "BraTS_2019_subject_ID",
    "BraTS_2020_subject_ID",
)
"""Columns of the BraTS 2020 training ``name_mapping.csv``."""

# tissue classes of the internal tissue map
_BG, _WM, _GM, _CSF, _OEDEMA, _NECROSIS, _ENHANCING, _MASS = range(8)
_TISSUE_TO_LABEL = np.array([0, 0, 0, 0, 2, 1, 4, 1], dtype=np.uint8)

# mean intensities per sequence and tissue class (bg, WM, GM, CSF, oedema, necrosis, enhancing, mass),
# in the int16 ranges of skull-stripped BraTS images
_INTENSITY = {
    "t1": np.array([0, 520, 380, 140, 330, 170, 430, 260], dtype=np.float32),
    "t1ce": np.array([0, 530, 400, 150, 345, 160, 1050, 275], dtype=np.float32),
    "t2": np.array([0, 420, 600, 1700, 1050, 1450, 820, 1250], dtype=np.float32),
    "flair": np.array([0, 300, 380, 70, 620, 260, 520, 500], dtype=np.float32),
}

_LOBES = ("frontal", "parietal", "temporal", "occipital")

# The tumour composition by grade: median, min, max of each fraction of the whole tumour (WT) and of the WT
# volume in cm^3, the volume as a share of a real brain (REFERENCE_BRAIN_CM3) so that small grids hold miniatures
# of real proportions; each case draws every value with _draw_between. Where each number comes from:
#   [45]  the 45 BraTS 2018 expert label maps counted in issue 21 (41 HGG, 4 LGG): medians of all four
#         measures, and the ET ranges;
#   [14]  `python bench/demo_tumour_calibration.py` on the 14 expert label maps of ../shared/realdata (12 HGG,
#         2 LGG; 14 of the 45): the HGG ranges of NCR/NET, oedema and WT volume;
#   [A]   assumed, because 2 expert LGG cannot give a range: the LGG ranges of NCR/NET, oedema and volume
#         (the 2 expert LGG measure 232 cm^3 each).
TUMOUR_COMPOSITION: Dict[str, Dict[str, Tuple[float, float, float]]] = {
    "HGG": {
        "et_fraction": (0.23, 0.04, 0.49),  # [45]; [14]: 20.8 % (7.2-41.0)
        "ncr_net_fraction": (0.10, 0.044, 0.478),  # median [45]; range [14]: median 9.4 %
        "oedema_fraction": (0.67, 0.375, 0.859),  # median [45] (the rest of 23 % + 10 %); range [14]: median 57.3 %
        "wt_cm3": (91.0, 32.1, 162.4),  # median [45]; range [14]: median 110.8
    },
    "LGG": {
        "et_fraction": (0.01, 0.006, 0.02),  # [45]; [14]: 0.7 % and 2.0 %
        "ncr_net_fraction": (0.46, 0.30, 0.62),  # median [45]; range [A] around [14]: 39.4 % and 43.1 %
        "oedema_fraction": (0.53, 0.35, 0.70),  # median [45] (the rest of 1 % + 46 %); range [A]; [14]: 59.9 %, 54.9 %
        "wt_cm3": (201.0, 70.8, 358.7),  # median [45]; range [A]: the HGG range's ratios to its median (0.35x-1.78x)
    },
}
"""Per grade and measure ``(median, min, max)``; the generator draws each case's composition from these."""
REFERENCE_BRAIN_CM3 = 1440.0
"""Brain volume (cm^3) that a WT volume is a share of: the median of the 14 expert cases here ([14]: 1,245-1,625)."""

# How often the tumour model departs from the textbook picture, as real cohorts do (BraTS "HGG" includes
# grade III tumours without necrosis; many BraTS "LGG" cases carry no enhancing tumour, some a necrosis).
HGG_NO_NECROSIS_FRACTION = 0.15
"""Share of high-grade tumours whose label-1 core is non-enhancing tumour rather than necrosis (no necrosis)."""
LGG_ENHANCING_FRACTION = 0.5
"""Default share of low-grade tumours with an enhancing nodule (label 4) of the table's LGG ET fraction; the
others have no label 4 (the 2 expert LGG here and the 4 of issue 21 all have some, BraTS LGG cohorts also
hold cases without any)."""
LGG_NECROSIS_FRACTION = 0.1
"""Share of low-grade tumours with a small necrotic focus inside the mass."""


def brats_affine(shape: Sequence[int]) -> np.ndarray:
    """The affine of the real BraTS files for a grid of ``shape``: 1 mm, ``diag(-1, -1, 1)`` (LPS).

    The first array axis runs from the patient's right to left, the second from anterior to posterior,
    the third from inferior to superior: a "right hemisphere" tumour lies at low first-axis indices.
    """
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    aff[1, 3] = float(shape[1] - 1)
    return aff


def demo_case_id(index: int) -> str:
    """BraTS 2020 training id of the ``index``-th (1-based) demo case, e.g. ``BraTS20_Training_007``."""
    return f"BraTS20_Training_{int(index):03d}"


def _resolve_size(size: Union[str, Sequence[int]]) -> Tuple[int, int, int]:
    if isinstance(size, str):
        if size not in DEMO_SIZES:
            raise ValueError(f"Unknown demo size {size!r}: use one of {sorted(DEMO_SIZES)} or an (X, Y, Z) tuple.")
        return DEMO_SIZES[size]
    shape = tuple(int(s) for s in size)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"Demo size must be (X, Y, Z) with every side >= 16 voxels, got {size!r}.")
    return shape  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# smooth random fields
# --------------------------------------------------------------------------------------------
def _interp_matrix(n: int, g: int) -> np.ndarray:
    """(n, g) Gaussian-kernel interpolation weights from g control points spread over n voxels."""
    centres = np.linspace(-0.15, 1.15, g) * (n - 1)
    sigma = 0.8 * 1.3 * (n - 1) / (g - 1)
    pos = np.arange(n, dtype=np.float32)[:, None]
    w = np.exp(-0.5 * ((pos - centres[None, :]) / sigma) ** 2).astype(np.float32)
    return w / w.sum(axis=1, keepdims=True)


def _smooth_field(shape: Sequence[int], rng: np.random.Generator, grid: Sequence[int]) -> np.ndarray:
    """Smooth random field of ``shape`` whose values are approximately standard normal.

    Random values on a coarse ``grid`` of control points are interpolated with separable Gaussian
    kernels (three small matrix products, no per-voxel Python) and divided by the interpolation's
    expected standard deviation (not the sample's, which would blow up nearly constant fields).
    """
    coarse = rng.standard_normal(tuple(grid)).astype(np.float32)
    wx, wy, wz = (_interp_matrix(n, g) for n, g in zip(shape, grid))
    f = np.tensordot(wx, coarse, axes=(1, 0))  # (X, gy, gz)
    f = np.tensordot(f, wy, axes=(1, 1))  # (X, gz, Y)
    f = np.tensordot(f, wz, axes=(1, 1))  # (X, Y, Z)
    expected_std = np.sqrt(np.prod([float(np.mean(np.sum(w * w, axis=1))) for w in (wx, wy, wz)]))
    return f / np.float32(expected_std)


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------
@dataclass
class DemoCase:
    """One generated case.

    Attributes:
        case_id: BraTS 2020 training id.
        grade: ``"HGG"`` or ``"LGG"``.
        images: sequence name (``t1``, ``t1ce``, ``t2``, ``flair``) -> int16 array (X, Y, Z).
        label: uint8 label map (X, Y, Z) with values in {0, 1, 2, 4}.
        report: report text (TextBraTS style).
        affine: 4 x 4 affine of every file of the case.
        findings: the tumour parameters the report was written from (hemisphere, lobes, oedema
            extent, necrosis, ventricular compression, volumes in voxels, ...).
    """

    case_id: str
    grade: str
    images: Dict[str, np.ndarray]
    label: np.ndarray
    report: str
    affine: np.ndarray
    findings: Dict[str, object] = field(default_factory=dict)


def _brain_geometry(shape: Tuple[int, int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Brain centre and semi-axes (voxels) for a grid: BraTS proportions at full size, fuller on small grids."""
    X, Y, Z = shape
    if min(X, Y) >= 160:
        frac = np.array([0.27, 0.335, 0.42])
        centre = np.array([0.49 * X, 0.545 * Y, 0.48 * Z])
    else:
        frac = np.array([0.40, 0.44, 0.42])
        centre = np.array([0.5 * (X - 1), 0.5 * (Y - 1), 0.48 * Z])
    return centre, frac * np.array(shape)


def _draw_between(rng: np.random.Generator, stat: Tuple[float, float, float]) -> float:
    """A draw whose median is ``stat[0]`` and which stays in ``[stat[1], stat[2]]``.

    A two-piece log-normal: below the median its spread is a quarter of ``log(median / min)``, above it a
    quarter of ``log(max / median)``, so the range spans about +-2 standard deviations on each side (the
    few draws beyond are clipped).
    """
    median, lo, hi = stat
    z = float(rng.standard_normal())
    spread = np.log(hi / median) if z > 0 else np.log(median / lo)
    return float(np.clip(median * np.exp(0.5 * z * spread), lo, hi))


def _draw_composition(rng: np.random.Generator, grade: str, lgg_enhancing_fraction: float) -> Dict[str, float]:
    """Enhancing, NCR/NET and oedema fractions of the whole tumour and its share of the brain, from
    :data:`TUMOUR_COMPOSITION` (oedema is the rest; draws whose oedema leaves the table's range are redrawn)."""
    table = TUMOUR_COMPOSITION[grade]
    has_et = grade == "HGG" or bool(rng.random() < lgg_enhancing_fraction)
    for _ in range(50):
        et = _draw_between(rng, table["et_fraction"]) if has_et else 0.0
        ncr = _draw_between(rng, table["ncr_net_fraction"])
        if table["oedema_fraction"][1] <= 1.0 - et - ncr <= table["oedema_fraction"][2]:
            break
    wt_share = _draw_between(rng, table["wt_cm3"]) / REFERENCE_BRAIN_CM3
    return dict(et=et, ncr=ncr, oedema=1.0 - et - ncr, wt_share=wt_share)


def _pick_tumour(
    rng: np.random.Generator, grade: str, semi: np.ndarray, mm: float, comp: Dict[str, float], brain_voxels: int
) -> Dict[str, object]:
    """The tumour's parameters: target voxel counts from the drawn composition, position (normalised brain
    coordinates), the equivalent-sphere radii of the core and the whole tumour (normalised) and the look."""
    side = 1.0 if rng.random() < 0.5 else -1.0  # sign of the first-axis offset from the midline
    n_wt = max(int(round(comp["wt_share"] * brain_voxels)), 8)
    n_et = int(round(comp["et"] * n_wt))
    n_et = max(n_et, 2) if comp["et"] > 0 else 0
    n_core = max(n_et + int(round(comp["ncr"] * n_wt)), n_et + 1)
    mean_semi = float(np.mean(semi))
    r_core = (3.0 * n_core / (4.0 * np.pi)) ** (1.0 / 3.0) / mean_semi
    r_wt = (3.0 * n_wt / (4.0 * np.pi)) ** (1.0 / 3.0) / mean_semi
    # the position is drawn alike for both grades (a core radius of 13-27 mm keeps the centre off the edge);
    # a larger tumour fills the brain around it, within its hemisphere
    r_place = rng.uniform(13.0, 27.0) * mm / mean_semi
    for _ in range(200):
        c = np.array([side * rng.uniform(0.22, 0.62), rng.uniform(-0.65, 0.72), rng.uniform(-0.45, 0.55)])
        if np.linalg.norm(c) + r_place < 0.92 and abs(c[0]) - r_place > 0.02:
            break
    else:  # not reached in practice: place it centrally in its hemisphere
        c = np.array([side * 0.45, 0.0, 0.1])
    hgg = grade == "HGG"
    return dict(
        side=side,
        centre_norm=c,
        n_wt=n_wt,
        n_core=n_core,
        n_et=n_et,
        r_core=float(r_core),
        r_wt=float(r_wt),
        # HGG: label 1 is non-enhancing tumour rather than necrosis in a share of cases (e.g. grade III)
        core_tissue=_MASS if (not hgg or rng.random() < HGG_NO_NECROSIS_FRACTION) else _NECROSIS,
        necrotic_focus=bool(not hgg and rng.random() < LGG_NECROSIS_FRACTION),
        heterogeneity=float(rng.uniform(0.08, 0.20) if hgg else rng.uniform(0.05, 0.16)),
        # the mass effect (strength, reach) is drawn alike for both grades: the ventricles, which the report
        # reads, say no more of the grade than in real reports
        mass_effect=float(rng.uniform(0.25, 0.6) * min(1.0, rng.uniform(13.0, 27.0) / 22.0)),
        mass_effect_reach=float(1.2 * rng.uniform(13.0, 27.0) * mm * rng.uniform(1.35, 2.5) / mean_semi),
    )


def _lobe_of(ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> np.ndarray:
    """Lobe index (into ``_LOBES``) from normalised brain coordinates (uy < 0 is anterior, uz > 0 superior)."""
    lobe = np.full(ux.shape, 1, dtype=np.int8)  # parietal
    lobe[uy < -0.15] = 0  # frontal
    lobe[uy > 0.55] = 3  # occipital
    temporal = (uz < -0.15) & (np.abs(ux) > 0.35) & (uy > -0.45) & (uy < 0.5)
    lobe[temporal] = 2
    return lobe


@dataclass
class _Grid:
    """Normalised voxel coordinates of one case (broadcast views), the brain outline and its geometry."""

    shape: Tuple[int, int, int]
    centre: np.ndarray
    semi: np.ndarray
    gx: np.ndarray
    gy: np.ndarray
    gz: np.ndarray
    f_brain: np.ndarray
    brain: np.ndarray


def _make_grid(shape: Tuple[int, int, int], rng: np.random.Generator) -> _Grid:
    centre, semi = _brain_geometry(shape)
    X, Y, Z = shape
    gx = ((np.arange(X, dtype=np.float32) - centre[0]) / semi[0])[:, None, None]
    gy = ((np.arange(Y, dtype=np.float32) - centre[1]) / semi[1])[None, :, None]
    gz = ((np.arange(Z, dtype=np.float32) - centre[2]) / semi[2])[None, None, :]
    f_brain = _smooth_field(shape, rng, (5, 5, 4))
    # the outline is fixed (the skull); the inner anatomy is displaced by the tumour
    rb = np.sqrt(gx * gx + (gy * (1.0 - 0.06 * gy)) ** 2 + gz * gz) / (1.0 + 0.04 * f_brain)
    return _Grid(shape, centre, semi, gx, gy, gz, f_brain, rb < 1.0)


def _anatomy(g: _Grid, t: Dict[str, object], rng: np.random.Generator):
    """Tissue map of the healthy brain displaced by the tumour's mass effect.

    A skull-stripped brain: an ellipsoid (wider posteriorly) with a smooth random deformation of its
    surface; a cortical grey-matter ribbon of varying thickness, sulci (thin CSF sheets from the zero set
    of a smooth random field), the interhemispheric fissure, deep grey matter, white matter, two lateral
    ventricles and a third ventricle. The tumour pushes the anatomy away (a smooth radial displacement
    field: ventricle compression and midline shift). Returns ``(tissue, ventricles, fissure_half, warped)``; ``warped`` holds the displaced coordinates.
    """
    shape, semi, brain = g.shape, g.semi, g.brain
    tc = np.asarray(t["centre_norm"], dtype=np.float32)
    # mass effect: anatomy is sampled at x - d(x), d pushing radially away from the tumour centre
    dx, dy, dz = g.gx - tc[0], g.gy - tc[1], g.gz - tc[2]
    d2 = dx * dx + dy * dy + dz * dz
    k = np.float32(t["mass_effect"]) * np.exp(-d2 / np.float32(2.0 * float(t["mass_effect_reach"]) ** 2))
    wx, wy, wz = g.gx - k * dx, g.gy - k * dy, g.gz - k * dz
    rb = np.sqrt(g.gx * g.gx + (g.gy * (1.0 - 0.06 * g.gy)) ** 2 + g.gz * g.gz) / (1.0 + 0.04 * g.f_brain)
    rw = np.sqrt(wx * wx + (wy * (1.0 - 0.06 * wy)) ** 2 + wz * wz) / (1.0 + 0.04 * g.f_brain)
    tissue = np.where(brain, np.uint8(_WM), np.uint8(_BG))

    # cortex: an outer ribbon of varying thickness, folded inwards along the sulci
    f_gyri = _smooth_field(shape, rng, (9, 9, 7))
    gm_thick = np.float32(max(0.09, 2.2 / float(np.min(semi)))) * (1.0 + 0.35 * f_gyri)
    n_sulci = (24, 26, 18) if min(shape) >= 100 else (13, 14, 10)
    f_sulci = np.abs(_smooth_field(shape, rng, n_sulci))
    tissue[brain & ((rb > 1.0 - gm_thick) | ((f_sulci < 0.5) & (rw > 0.7)))] = _GM
    for s in (-1.0, 1.0):  # deep grey matter (basal ganglia / thalamus)
        deep = ((wx - 0.24 * s) / 0.13) ** 2 + ((wy - 0.02) / 0.24) ** 2 + ((wz + 0.05) / 0.15) ** 2 < 1.0
        tissue[deep] = _GM

    csf = (f_sulci < 0.14) & (rw > 0.76)
    csf |= rb > 0.975
    fissure_half = np.float32(max(0.018, 0.7 / float(semi[0])))
    csf |= (np.abs(wx) < fissure_half) & (wz > -0.15) & (rw > 0.42)
    vent_scale = rng.uniform(0.85, 1.3)
    ventricles = np.zeros(shape, dtype=bool)
    for s in (-1.0, 1.0):  # lateral ventricles, curving down posteriorly
        ventricles |= (
            ((wx - 0.14 * s + 0.05 * s * wy) / (0.1 * vent_scale)) ** 2
            + ((wy + 0.04) / 0.45) ** 2
            + ((wz - 0.1 + 0.45 * wy * wy) / (0.13 * vent_scale)) ** 2
        ) < 1.0
    ventricles |= (np.abs(wx) < max(0.022, 0.6 / float(semi[0]))) & (np.abs(wy) < 0.14) & (np.abs(wz + 0.05) < 0.12)
    csf |= ventricles
    tissue[csf & brain] = _CSF
    return tissue, ventricles, fissure_half, wx


def _nearest(candidates: np.ndarray, rank: np.ndarray, n: int) -> np.ndarray:
    """Mask of the ``n`` candidate voxels of lowest ``rank`` (all of them when there are fewer)."""
    idx = np.flatnonzero(candidates)
    out = np.zeros(candidates.shape, dtype=bool)
    if n >= idx.size:
        out.flat[idx] = True
    elif n > 0:
        out.flat[idx[np.argpartition(rank.flat[idx], n - 1)[:n]]] = True
    return out


def _enhancing_rim(core: np.ndarray, f_rim: np.ndarray, n_et: int, min_thickness: float = 2.0) -> np.ndarray:
    """``n_et`` voxels of the core's outer rim. A rim of at least ``min_thickness`` voxels keeps thin enhancement
    visible after partial-volume blur: when ``n_et`` voxels cannot cover the whole surface that thick, they form
    patches of the rim where the smooth field ``f_rim`` is highest (an incomplete ring, as often seen)."""
    depth = ndimage.distance_transform_edt(core)  # 1 on the core's outer layer
    shell = core & (depth <= min_thickness)
    if n_et < int(shell.sum()):
        return _nearest(shell, -f_rim, n_et)
    return _nearest(core, depth, n_et)


def _tumour_box(g: _Grid, t: Dict[str, object]):
    """The tumour's bounding box (slices) and the voxel offsets from the tumour centre inside it."""
    tc = np.asarray(t["centre_norm"], dtype=np.float32)
    ext = 1.9 * float(t["r_wt"]) + 0.05
    lo = np.maximum(np.floor(g.centre + (tc - ext) * g.semi).astype(int), 0)
    hi = np.minimum(np.ceil(g.centre + (tc + ext) * g.semi).astype(int) + 1, g.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return box, (g.gx[box[0]] - tc[0], g.gy[:, box[1]] - tc[1], g.gz[:, :, box[2]] - tc[2])


def _draw_tumour(g: _Grid, t: Dict[str, object], tissue: np.ndarray, wx: np.ndarray, fissure_half, rng) -> Tuple:
    """Write the tumour into ``tissue`` (in its box) with the target voxel counts of ``t``.

    Each compartment takes the candidate voxels nearest the centre in a deformed distance, so the drawn
    fractions hold up to rounding: the core (``n_core``: enhancing + NCR/NET), then the oedema around it
    (the rest of ``n_wt``, preferring white matter, sparing CSF), then inside the core the enhancing part:
    the outer rim (HGG) or a nodule at the edge of the mass (LGG). Returns ``(box, box tissue)``.

    High grade: an enhancing rim around a necrotic centre (label 1; dark on T1/T1ce, bright on T2), whole,
    or in patches where a whole rim of that volume would be thinner than two voxels; in
    :data:`HGG_NO_NECROSIS_FRACTION` of cases the label-1 core is non-enhancing tumour instead. Low grade:
    a mostly non-enhancing mass (label 1; T1 dark, T2/FLAIR bright, a little darker on FLAIR than the
    oedema), with an enhancing nodule in ``lgg_enhancing_fraction`` of cases and a small necrotic focus in
    :data:`LGG_NECROSIS_FRACTION`. Position (lobe, depth, hemisphere), shape and mass effect are drawn
    alike for both grades; the tumour stays in its hemisphere.
    """
    box, (bx, by, bz) = _tumour_box(g, t)
    bshape = tuple(s.stop - s.start for s in box)
    dist = np.sqrt(bx * bx + by * by + bz * bz)  # unwarped distance to the tumour centre
    f_core, f_oed, f_rim = (_smooth_field(bshape, rng, grid) for grid in ((5, 5, 5), (7, 7, 7), (4, 4, 4)))
    rho_core = dist / np.clip(1.0 + 0.22 * (f_core - f_core.mean()), 0.5, None)
    rho_oed = dist / np.clip(1.0 + 0.3 * (f_oed - f_oed.mean()), 0.45, None)
    b_tissue = tissue[box]
    inside = g.brain[box] & (float(t["side"]) * wx[box] > fissure_half * 1.5)  # the tumour stays in its hemisphere
    core = _nearest(inside, rho_core, int(t["n_core"]))
    # oedema prefers white matter: grey matter counts at 1.25 times its distance, so it joins only nearer the core
    oed_rank = rho_oed * np.where(b_tissue == _WM, np.float32(1.0), np.float32(1.25))
    oedema = _nearest(inside & ~core & (b_tissue != _CSF), oed_rank, int(t["n_wt"]) - int(t["n_core"]))
    new = b_tissue.copy()
    new[oedema] = _OEDEMA
    new[core] = t["core_tissue"]
    n_et = int(t["n_et"])
    r_core = float(t["r_core"])
    if n_et and t["grade"] == "HGG":  # the outer rim of the core: whole, or in patches when it would be thin
        new[_enhancing_rim(core, f_rim, n_et)] = _ENHANCING
    elif n_et:  # a small nodule near the edge of the mass
        direction = rng.standard_normal(3)
        nc = direction / np.linalg.norm(direction) * 0.6 * r_core
        nd = (bx - nc[0]) ** 2 + (by - nc[1]) ** 2 + (bz - nc[2]) ** 2
        new[_nearest(core, nd, n_et)] = _ENHANCING
    if t["necrotic_focus"]:  # a small necrotic focus inside the mass (label 1 like the mass; dark on T1ce)
        new[core & (dist < max(2.0 / float(np.mean(g.semi)), 0.3 * r_core)) & (new == _MASS)] = _NECROSIS
    tissue[box] = new
    return box, new


def _render_images(
    g: _Grid, tissue: np.ndarray, box, new: np.ndarray, heterogeneity: float, rng
) -> Dict[str, np.ndarray]:
    """The four int16 sequences: tissue intensities with jitter and gain, tumour texture, partial-volume blur,
    a smooth bias field and Rician noise; background exactly 0, like skull-stripped BraTS images.

    The intensities resemble T1 (WM > GM > CSF), T1ce (T1 plus enhancement), T2 (CSF > GM > WM) and FLAIR
    (CSF suppressed, oedema bright).
    """
    shape = g.shape
    blur = 0.55 if min(shape) < 100 else 0.7
    tumour_box = np.isin(new, (_NECROSIS, _ENHANCING, _MASS, _OEDEMA))
    f_tex = _smooth_field(new.shape, rng, (7, 7, 7))
    images: Dict[str, np.ndarray] = {}
    for seq in SEQUENCES:
        lut = _INTENSITY[seq] * rng.normal(1.0, 0.04, size=8).astype(np.float32)
        lut *= np.float32(rng.uniform(0.8, 1.25))  # scanner gain
        img = lut[tissue]
        texture = 1.0 + np.float32(heterogeneity) * f_tex
        sub = img[box]
        sub[tumour_box] *= texture[tumour_box]
        img = ndimage.gaussian_filter(img, sigma=blur, mode="nearest")
        img *= np.exp(np.float32(0.12) * _smooth_field(shape, rng, (3, 3, 3)))
        sd = np.float32(0.03 * lut[_WM])
        n1 = rng.standard_normal(shape, dtype=np.float32)
        n2 = rng.standard_normal(shape, dtype=np.float32)
        img = np.sqrt((img + sd * n1) ** 2 + (sd * n2) ** 2)
        images[seq] = np.where(g.brain, np.clip(np.rint(img), 1, 32767), 0).astype(np.int16)
    return images


def generate_case(
    index: int,
    grade: str,
    size: Union[str, Sequence[int]] = "small",
    seed: int = 0,
    with_history: bool = False,
    lgg_enhancing_fraction: float = LGG_ENHANCING_FRACTION,
) -> DemoCase:
    """Generate one synthetic case in memory (anatomy, tumour and report as the module docstring lists).

    Args:
        index: 1-based case number; the case id is ``BraTS20_Training_{index:03d}``.
        grade: ``"HGG"`` or ``"LGG"``.
        size: ``"small"``, ``"medium"``, ``"full"`` or an ``(X, Y, Z)`` tuple.
        seed: dataset seed; the case depends only on ``(seed, index, grade, size)``.
        with_history: prepend a clinical-history line to the report.
        lgg_enhancing_fraction: probability that a low-grade tumour carries a small enhancing nodule.

    Returns:
        A :class:`DemoCase`.
    """
    if grade not in GRADES:
        raise ValueError(f"Demo case {index}: grade must be one of {GRADES}, got {grade!r}.")
    shape = _resolve_size(size)
    rng = np.random.default_rng([int(seed), int(index), 0 if grade == "HGG" else 1])
    g = _make_grid(shape, rng)
    mm = float(np.mean(g.semi)) / 70.0  # voxels per "millimetre of a real brain"
    comp = _draw_composition(rng, grade, lgg_enhancing_fraction)
    t = _pick_tumour(rng, grade, g.semi, mm, comp, int(g.brain.sum()))
    t["grade"] = grade
    tissue, ventricles, fissure_half, wx = _anatomy(g, t, rng)
    box, new = _draw_tumour(g, t, tissue, wx, fissure_half, rng)
    images = _render_images(g, tissue, box, new, float(t["heterogeneity"]), rng)

    label = _TISSUE_TO_LABEL[tissue]
    label[~g.brain] = 0
    check_label_values(label, "brats2017", where=f"demo case {demo_case_id(index)}")

    # findings read back from the generated volumes
    affine = brats_affine(shape)
    findings = _findings(
        label=label,
        tissue=tissue,
        ventricles=ventricles & g.brain,
        brain_voxels=int(g.brain.sum()),
        gx=g.gx,
        gy=g.gy,
        gz=g.gz,
        centre=g.centre,
        affine=affine,
        mass_effect=t["mass_effect"],
        heterogeneity=t["heterogeneity"],
    )
    # the report's noise has its own stream, drawn from the seed and the case number only
    report_rng = np.random.default_rng([int(seed), int(index), 2])
    report = _write_report(findings, report_rng)
    if with_history:
        report = _history_line(grade, findings, report_rng) + " " + report
    return DemoCase(
        case_id=demo_case_id(index),
        grade=grade,
        images=images,
        label=label,
        report=report,
        affine=affine,
        findings=findings,
    )


# --------------------------------------------------------------------------------------------
# findings and the report
# --------------------------------------------------------------------------------------------
_LOBE_READING_SHARE = (0.02, 0.04)
"""Volumes (shares of the brain) of the central parts of the core and of the oedema whose lobes a report names:
about the median HGG core and oedema. A reader names where the lesion lies; counting every lobe that a large
lesion reaches would tell its size, and with it the grade, more than real reports do."""


def _central_part(mask: np.ndarray, n_max: float) -> np.ndarray:
    """The (at most) ``n_max`` voxels of ``mask`` nearest its centroid."""
    idx = np.argwhere(mask)
    n = max(int(round(n_max)), 1)
    if idx.shape[0] <= n:
        return mask
    d2 = ((idx - idx.mean(axis=0)) ** 2).sum(axis=1)
    keep = idx[np.argpartition(d2, n - 1)[:n]]
    out = np.zeros(mask.shape, dtype=bool)
    out[tuple(keep.T)] = True
    return out


def _lobes_of_mask(mask: np.ndarray, gx, gy, gz, min_share: float = 0.15) -> List[str]:
    """Lobes holding at least ``min_share`` of the mask's voxels, largest share first."""
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return []
    ux = gx[idx[0], 0, 0]
    uy = gy[0, idx[1], 0]
    uz = gz[0, 0, idx[2]]
    counts = np.bincount(_lobe_of(ux, uy, uz), minlength=len(_LOBES)).astype(float)
    share = counts / counts.sum()
    order = np.argsort(-share, kind="stable")
    lobes = [_LOBES[i] for i in order if share[i] >= min_share]
    return lobes or [_LOBES[int(order[0])]]


def _findings(
    *, label, tissue, ventricles, brain_voxels, gx, gy, gz, centre, affine, mass_effect, heterogeneity
) -> Dict[str, object]:
    """What can be read back from the generated label map (no grade: the report writer never sees it).

    The tissue map is used only for the necrosis volume that is stored for tests; the report itself reads
    the label map, as a reader of the FLAIR image would: the whole abnormality (labels 1, 2, 4), the
    NCR/NET core (label 1, necrosis and non-enhancing tumour alike) and the ventricles.
    """
    wt = label > 0
    core = (label == 1) | (label == 4)
    ncr = label == 1
    enh = label == 4
    oed = label == 2
    idx = np.argwhere(wt)
    centroid = idx.mean(axis=0)
    # hemisphere from the affine: world +x is the patient's right (RAS)
    world_dx = float(affine[0, 0] * (centroid[0] - centre[0]))
    hemisphere = "right" if world_dx > 0 else "left"
    # ventricles on each side of the brain's midline (first axis), displaced by the mass effect (their outline as a
    # reader judges it, not what the tumour itself covers: a larger tumour is not a more compressive one)
    vidx = np.nonzero(ventricles)[0]
    tumour_side_low = centroid[0] < centre[0]
    ipsi = int(np.sum(vidx < centre[0])) if tumour_side_low else int(np.sum(vidx > centre[0]))
    contra = int(vidx.size - ipsi)
    ratio = ipsi / max(contra, 1)
    n_core, n_oed, n_ncr, n_enh = int(core.sum()), int(oed.sum()), int(ncr.sum()), int(enh.sum())
    n_ncr_parts = int(ndimage.label(ncr)[1]) if n_ncr else 0
    lesion_lobes = _lobes_of_mask(
        _central_part(core if n_core else wt, _LOBE_READING_SHARE[0] * brain_voxels), gx, gy, gz
    )
    oedema_lobes = (
        _lobes_of_mask(_central_part(oed, _LOBE_READING_SHARE[1] * brain_voxels), gx, gy, gz) if n_oed else []
    )
    return dict(
        hemisphere=hemisphere,
        lesion_lobes=lesion_lobes,
        oedema_lobes=oedema_lobes,
        tumour_share=round(float(wt.sum()) / max(int(brain_voxels), 1), 4),
        oedema_reach=round(_oedema_reach(int(wt.sum()), n_core, int(brain_voxels)), 4),
        ncr_share=round(n_ncr / max(int(wt.sum()), 1), 4),
        ncr_parts=n_ncr_parts,
        ventricle_ratio=round(float(ratio), 3),
        heterogeneity=round(float(heterogeneity), 3),
        volumes=dict(
            wt=int(wt.sum()),
            core=n_core,
            oedema=n_oed,
            ncr=n_ncr,
            necrosis=int((tissue == _NECROSIS).sum()),
            enhancing=n_enh,
        ),
        centroid_index=[round(float(c), 1) for c in centroid],
        mass_effect=round(float(mass_effect), 3),
    )


def _oedema_reach(n_wt: int, n_core: int, brain_voxels: int) -> float:
    """How far the FLAIR abnormality reaches beyond the lesion core: the difference of the equivalent-sphere
    radii of the whole tumour and the core, as a fraction of the brain's equivalent radius."""
    return (n_wt ** (1.0 / 3.0) - n_core ** (1.0 / 3.0)) / max(brain_voxels, 1) ** (1.0 / 3.0)


def _join(words: Sequence[str]) -> str:
    words = list(words)
    if len(words) == 1:
        return words[0]
    if len(words) == 2:
        return f"{words[0]} and {words[1]}"
    return ", ".join(words[:-1]) + f", and {words[-1]}"


def _location(rng, side: str, lobes: Sequence[str]) -> str:
    """A location phrase such as 'right frontal and parietal lobes' in one of several styles."""
    plural = len(lobes) > 1
    lobe_word = "lobes" if plural else "lobe"
    region_word = "regions" if plural else "region"
    options = [
        f"the {side} {_join(lobes)} {lobe_word}",
        f"the {_join(lobes)} {lobe_word} of the {side} hemisphere",
        f"the {_join(lobes)} {region_word} of the {side} cerebral hemisphere",
        f"the {side} {_join(lobes)} {lobe_word} area" if not plural else f"the {side} {_join(lobes)} {lobe_word}",
    ]
    return options[int(rng.integers(len(options)))]


def _pick(rng, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


# How the report writer reads a tumour: the TextBraTS reports describe the FLAIR image (no contrast
# sentence, no grade), and their descriptions are noisy. Rates are those of the 369 real TextBraTS
# reports (counts of report phrases over the whole set; no report text is stored here):
#   necrosis described as present in 96 %, hedged ("may", "possibly", ...) in 35 %;
#   oedema "significant" in ~70 %, "extensive"/"large" in ~25 %, "mild"/"slight" in ~3 %;
#   ventricular compression said to be absent in 16 %, the compressed side named in ~45 %;
#   the lesion pattern heterogeneous / mixed in almost every report.
# The writer sees the label map only through these noisy readings; `bench/bench_text_grading.py
# --demo_reports` checks that the result tells the grade no better than the real reports do.
READER_NOISE: Dict[str, float] = {
    "necrosis_seen": 0.96,  # P(necrosis described as present | NCR/NET voxels exist)
    "necrosis_overcalled": 0.75,  # P(described as present | none): low-signal areas read as necrosis
    "necrosis_hedged": 0.35,  # P(a described necrosis is hedged)
    "extent_log_sd": 0.6,  # sd of log(perceived / true) share of the brain taken by the FLAIR abnormality
    "ratio_log_sd": 0.25,  # sd of log(perceived / true) ratio of ipsilateral to contralateral ventricle
    "lobe_dropped": 0.3,  # P(a secondary lobe goes unmentioned)
    "lobe_added": 0.15,  # P(a neighbouring lobe is named although the lesion barely reaches it)
    "side_named": 0.5,  # P(the compression sentence names the ventricle's side)
}
_EXTENT_REFERENCE = 0.105  # oedema reach (:func:`_oedema_reach`) read as neither large nor small; the median is 0.118
_NEIGHBOUR_LOBES = {
    "frontal": ("parietal", "temporal"),
    "parietal": ("frontal", "occipital", "temporal"),
    "temporal": ("parietal", "occipital", "frontal"),
    "occipital": ("parietal", "temporal"),
}


def _read_lobes(rng, lobes: Sequence[str]) -> List[str]:
    """The lobes a reader names: the main one always, secondary ones sometimes dropped, a neighbour sometimes added."""
    read = [lobes[0]] + [lobe for lobe in lobes[1:] if rng.random() >= READER_NOISE["lobe_dropped"]]
    if rng.random() < READER_NOISE["lobe_added"]:
        extra = [lobe for lobe in _NEIGHBOUR_LOBES[lobes[0]] if lobe not in read]
        if extra:
            read.append(_pick(rng, extra))
    return read


def _write_report(f: Dict[str, object], rng: np.random.Generator) -> str:
    """Four sentences in the TextBraTS order (lesion, oedema, necrosis, ventricles) from noisy readings of ``f``.

    ``f`` holds what :func:`_findings` reads from the label map; it has no grade, and no sentence depends on
    the enhancing label: every reading goes through the noise of :data:`READER_NOISE` (its own random
    stream: seed and case number). Readings that would follow the tumour's size, which differs by grade,
    are size-free as a reader's are: the oedema's reach beyond the lesion (not its volume), the lobes
    around the lesion's centre (not every lobe a large lesion touches) and the displaced ventricles'
    outline (not what the tumour covers).
    """
    side = str(f["hemisphere"])
    lobes = _read_lobes(rng, f["lesion_lobes"])  # type: ignore[arg-type]
    pattern = _pick(
        rng,
        [
            "a mixed pattern of high and low signals with speckled high signal regions",
            "heterogeneous mixed signals and spotted areas of high signal",
            "uneven high and low signal intensities with patchy high signal areas",
            "a mixture of heterogeneous high and low signal areas",
            "heterogeneous signal, mainly high signal with patchy low signal areas",
            "mixed signal intensity with irregular margins",
        ],
    )
    multiple = " involving multiple regions" if len(lobes) > 1 and rng.random() < 0.5 else ""
    sentences = [f"The lesion area is in {_location(rng, side, lobes)}{multiple} with {pattern}."]
    sentences.append(_oedema_sentence(f, rng))
    sentences.append(_necrosis_sentence(f, rng))
    sentences.append(_ventricle_sentence(f, rng))
    return " ".join(sentences)


def _oedema_sentence(f: Dict[str, object], rng: np.random.Generator) -> str:
    """The oedema sentence: its extent and lobes as a reader perceives them."""
    noise = READER_NOISE
    side = str(f["hemisphere"])
    # oedema: how far the FLAIR abnormality reaches beyond the lesion, misjudged by a log-normal factor. The
    # reach, unlike the whole-tumour volume, is about the same in both grades (larger LGG have larger cores);
    # cubed, it spreads like a volume
    oed_lobes = _read_lobes(rng, f["oedema_lobes"] or f["lesion_lobes"])  # type: ignore[arg-type]
    oed_loc = _location(rng, side, oed_lobes)
    perceived = 3.0 * np.log(float(f["oedema_reach"]) / _EXTENT_REFERENCE) + rng.normal(0.0, noise["extent_log_sd"])
    if perceived > 0.7:
        s = _pick(
            rng,
            [
                f"Edema is extensive, mainly located in {oed_loc}, with high signal indicating marked swelling of the surrounding tissue.",
                f"Edema is significant with high signals spreading widely through {oed_loc}, covering a large area.",
                f"Edema is a large area of high signal in {oed_loc}, extending well beyond the lesion margins.",
            ],
        )
    elif perceived > -1.8:
        s = _pick(
            rng,
            [
                f"Edema is significant, seen as high signal around the lesion in {oed_loc}.",
                f"Edema is significant with high signal in the vicinity of the lesion in {oed_loc}, indicating a certain degree of swelling.",
                f"Edema is observed as a significant high signal area surrounding the lesion, mainly in {oed_loc}.",
                f"Edema is significant, with high signal extending into {oed_loc}.",
            ],
        )
    else:
        s = _pick(
            rng,
            [
                f"Edema is mild, limited to a thin high signal rim around the lesion in {oed_loc}.",
                "Edema is slight, confined to the tissue immediately surrounding the lesion.",
            ],
        )
    return s


def _necrosis_sentence(f: Dict[str, object], rng: np.random.Generator) -> str:
    """The necrosis sentence: the NCR/NET core seen or missed, over-called when absent, often hedged."""
    noise = READER_NOISE
    # necrosis: the NCR/NET core (label 1) on FLAIR; seen or missed, over-called when absent, often hedged
    has_ncr = float(f["ncr_share"]) > 0
    described = rng.random() < (noise["necrosis_seen"] if has_ncr else noise["necrosis_overcalled"])
    if described:
        scattered = int(f["ncr_parts"]) > 1
        where = _pick(
            rng,
            [
                "in the central region of the lesion",
                "within the lesion",
                "in the centre of the lesion",
                "scattered within the lesion" if scattered else "in the inner part of the lesion",
            ],
        )
        if rng.random() < noise["necrosis_hedged"]:
            s = _pick(
                rng,
                [
                    f"Necrosis may be present {where}, where areas of low signal suggest necrotic change.",
                    f"Necrosis is possibly present {where}, with uneven low signal areas.",
                    f"Necrosis is suspected {where}, where the signal is uneven.",
                ],
            )
        else:
            s = _pick(
                rng,
                [
                    f"Necrosis is observed {where} as areas of low signal.",
                    f"Necrosis is seen {where}, with low signal and uneven intensity.",
                    f"Necrosis is present {where}, showing mixed high and low signal.",
                    f"Necrosis is indicated by patchy low signal areas {where}.",
                ],
            )
    else:
        s = _pick(rng, ["Necrosis is not observed.", "Necrosis is not clearly observed within the lesion."])
    return s


def _ventricle_sentence(f: Dict[str, object], rng: np.random.Generator) -> str:
    """The ventricular-compression sentence from a misjudged ventricle ratio."""
    noise = READER_NOISE
    side = str(f["hemisphere"])
    # ventricles: the ipsilateral / contralateral ventricle ratio, misjudged by a log-normal factor
    ratio = float(f["ventricle_ratio"]) * float(np.exp(rng.normal(0.0, noise["ratio_log_sd"])))
    ventricle = f"the {side} lateral ventricle" if rng.random() < noise["side_named"] else "the adjacent ventricle"
    if ratio > 1.0:
        s = _pick(
            rng,
            [
                "Ventricular compression is not observed.",
                "Ventricular compression is not evident.",
                "Ventricular compression is not obvious.",
            ],
        )
    elif ratio > 0.7:
        s = _pick(
            rng,
            [
                f"Ventricular compression is slight, with mild deformation of {ventricle}.",
                f"Ventricular compression is mild, {ventricle} appearing somewhat narrowed.",
                f"Ventricular compression is present, with slight deformation of {ventricle}.",
            ],
        )
    else:
        s = _pick(
            rng,
            [
                f"Ventricular compression is significant, with {ventricle} compressed and deformed.",
                f"Ventricular compression is observed with noticeable deformation of {ventricle}.",
                f"Ventricular compression is evident, {ventricle} being narrowed and displaced by the lesion.",
            ],
        )
    return s


def _history_line(grade: str, f: Dict[str, object], rng: np.random.Generator) -> str:
    """A clinical-history line consistent with the lesion (age, sex, a presenting symptom).

    The age follows the grade as in real cohorts (high grade older on average), so a history line tells
    something about the grade that TextBraTS reports do not: it is off by default.
    """
    if grade == "HGG":
        age = int(np.clip(rng.normal(60, 11), 22, 86))
    else:
        age = int(np.clip(rng.normal(41, 12), 18, 78))
    sex = _pick(rng, ["man", "woman", "male patient", "female patient"])
    side = str(f["hemisphere"])
    contra = "left" if side == "right" else "right"
    lobe = f["lesion_lobes"][0]  # type: ignore[index]
    symptoms = ["headaches", "a first generalised seizure", "progressive headaches and nausea"]
    if lobe == "frontal":
        symptoms += ["personality change", f"{contra}-sided weakness"]
        if side == "left":
            symptoms.append("word-finding difficulty")
    elif lobe == "parietal":
        symptoms += [f"numbness of the {contra} arm", f"{contra}-sided weakness"]
    elif lobe == "temporal":
        symptoms += ["focal seizures", "memory complaints"]
        if side == "left":
            symptoms.append("speech disturbance")
    else:
        symptoms += [f"{contra} visual field disturbance"]
    symptom = _pick(rng, symptoms)
    lead = _pick(rng, ["Clinical history:", "History:", "Clinical information:"])
    return f"{lead} {age}-year-old {sex} presenting with {symptom}."


# --------------------------------------------------------------------------------------------
# writing a data set
# --------------------------------------------------------------------------------------------
def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def write_demo_dataset(
    out_dir: Union[str, Path],
    n_cases: int = 20,
    size: Union[str, Sequence[int]] = "small",
    seed: int = 0,
    hgg_fraction: float = 0.5,
    with_history: Union[bool, float] = 0.0,
    lgg_enhancing_fraction: float = LGG_ENHANCING_FRACTION,
    start_index: int = 1,
) -> Path:
    """Write ``n_cases`` synthetic cases in the BraTS 2020 training layout under ``out_dir``.

    Args:
        out_dir: target folder (created; existing demo files of the same names are overwritten).
        n_cases: number of cases (ids ``BraTS20_Training_{start_index:03d}`` onwards).
        size: ``"small"`` (64 x 64 x 48, default), ``"medium"`` (96 x 96 x 64), ``"full"``
            (240 x 240 x 155) or an ``(X, Y, Z)`` tuple.
        seed: the data set's seed; the same arguments give identical images, labels and reports
            (a case's content depends only on the seed, its index, its grade and the size).
        hgg_fraction: share of high-grade cases (``round(hgg_fraction * n_cases)`` of them, in an
            order shuffled by ``seed``).
        with_history: ``True``/``False``, or the probability that a report starts with a
            clinical-history line (default 0: the TextBraTS reports have none, and the age in it
            follows the grade).
        lgg_enhancing_fraction: probability that a low-grade tumour carries a small enhancing nodule.
        start_index: number of the first case.

    Returns:
        ``Path(out_dir)``, which holds ``name_mapping.csv``, one folder per case and the marker
        :data:`DEMO_MARKER` that lists the generated cases (see :func:`demo_case_ids`)::

            OUT/
              emrfuse_demo_data.json                 marker: written by this generator (seed, size, case ids)
              name_mapping.csv                       Grade,BraTS_2017_subject_ID,...,BraTS_2020_subject_ID
              BraTS20_Training_001/
                BraTS20_Training_001_flair.nii.gz    int16, 1 mm, BraTS affine (LPS, as the real files)
                BraTS20_Training_001_t1.nii.gz
                BraTS20_Training_001_t1ce.nii.gz
                BraTS20_Training_001_t2.nii.gz
                BraTS20_Training_001_seg.nii.gz      uint8, labels {0, 1, 2, 4} (BraTS 2017-2021 convention)
                BraTS20_Training_001_flair_text.txt  report in the TextBraTS style
              ...
    """
    p_history = _check_dataset_args(n_cases, hgg_fraction, with_history)
    shape = _resolve_size(size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    grades = _shuffled_grades(int(n_cases), hgg_fraction, seed)
    rows = _write_cases(out, grades, shape, seed, p_history, lgg_enhancing_fraction, start_index)

    _update_name_mapping(out / "name_mapping.csv", rows)
    _write_demo_marker(out, rows, seed, shape)
    return out


def _check_dataset_args(n_cases, hgg_fraction, with_history) -> float:
    """Reject out-of-range arguments of :func:`write_demo_dataset`; returns the history probability."""
    if int(n_cases) < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases!r}.")
    if not 0.0 <= float(hgg_fraction) <= 1.0:
        raise ValueError(f"hgg_fraction must be in [0, 1], got {hgg_fraction!r}.")
    p_history = float(with_history)
    if not 0.0 <= p_history <= 1.0:
        raise ValueError(f"with_history must be a bool or a probability in [0, 1], got {with_history!r}.")
    return p_history


def _shuffled_grades(n_cases: int, hgg_fraction: float, seed: int) -> np.ndarray:
    """``round(hgg_fraction * n_cases)`` "HGG" and the rest "LGG", in an order shuffled by ``seed``."""
    n_hgg = int(round(float(hgg_fraction) * n_cases))
    grades = np.array(["HGG"] * n_hgg + ["LGG"] * (n_cases - n_hgg))
    np.random.default_rng([int(seed), 7919]).shuffle(grades)
    return grades


def _write_cases(out, grades, shape, seed, p_history, lgg_enhancing_fraction, start_index) -> list:
    """Generate and write one case per grade, numbered from ``start_index``; returns their name_mapping.csv rows."""
    rows = []
    for i, grade in enumerate(grades):
        index = int(start_index) + i
        history = bool(np.random.default_rng([int(seed), index, 104729]).random() < p_history)
        case = generate_case(
            index,
            str(grade),
            size=shape,
            seed=seed,
            with_history=history,
            lgg_enhancing_fraction=lgg_enhancing_fraction,
        )
        _write_case_files(case, out)
        rows.append([case.grade, "NA", "NA", "NA", "NA", case.case_id])
    return rows


def _write_demo_marker(out: Path, rows: list, seed: int, shape) -> None:
    """Write :data:`DEMO_MARKER`, listing the cases generated now and by earlier runs into ``out``."""
    generated = (demo_case_ids(out) or set()) | {row[-1] for row in rows}
    write_json(
        out / DEMO_MARKER,
        {
            "generator": DEMO_GENERATOR,
            "version": DEMO_DATA_VERSION,
            "seed": int(seed),
            "size": list(shape),
            "case_ids": sorted(generated),
        },
        indent=1,
    )


def _write_case_files(case: DemoCase, out: Path) -> None:
    """The case's folder: its four sequences, its label map and its report, named as in BraTS 2020."""
    case_dir = out / case.case_id
    case_dir.mkdir(exist_ok=True)
    for seq in SEQUENCES:
        _save_nifti(case.images[seq], case.affine, case_dir / f"{case.case_id}_{seq}.nii.gz")
    _save_nifti(case.label, case.affine, case_dir / f"{case.case_id}_seg.nii.gz")
    (case_dir / f"{case.case_id}_flair_text.txt").write_text(case.report + "\n", encoding="utf-8")


def _update_name_mapping(mapping: Path, rows: List[List[str]]) -> None:
    """Write ``name_mapping.csv`` with ``rows`` (one per case, id last), keeping the rows of other cases
    already in the file (e.g. written with another ``start_index``); sorted by case id."""
    existing: Dict[str, List[str]] = {}
    if mapping.exists():
        with mapping.open(newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is not None and tuple(header) == NAME_MAPPING_COLUMNS:
                for row in reader:
                    if row:
                        existing[row[-1]] = row
    for row in rows:
        existing[row[-1]] = row
    with mapping.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(NAME_MAPPING_COLUMNS)
        for key in sorted(existing):
            writer.writerow(existing[key])


def demo_case_ids(folder: Union[str, Path]) -> "set[str] | None":
    """The ids of the cases that :func:`write_demo_dataset` generated in ``folder`` (its :data:`DEMO_MARKER`),
    or ``None`` when the folder holds no such marker (data this generator did not write)."""
    import json

    marker = Path(folder) / DEMO_MARKER
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("generator") != DEMO_GENERATOR:
        return None
    return {str(c) for c in info.get("case_ids") or []}


# --------------------------------------------------------------------------------------------
# CLI: emrfuse demo-data OUT --n-cases N --size small --seed 0
# --------------------------------------------------------------------------------------------
def _size_arg(value: str):
    if value in DEMO_SIZES:
        return value
    parts = value.lower().replace(",", "x").split("x")
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be one of {sorted(DEMO_SIZES)} or XxYxZ, got {value!r}") from None


def _argument_problem(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with ``emrfuse demo-data``'s arguments (one line), or ``None``."""
    if args.n_cases < 1:
        return f"--n-cases must be >= 1, got {args.n_cases}."
    if not 0.0 <= args.hgg_fraction <= 1.0:
        return f"--hgg-fraction must be in [0, 1], got {args.hgg_fraction}."
    existing = Path(args.out)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == Path(args.out) else f"is below {existing}, which is a file"
        return f"output {args.out} {where}: give a folder."
    return None


def _run(args: argparse.Namespace) -> int:
    problem = _argument_problem(args)
    if problem is not None:
        print(f"emrfuse demo-data: error: {problem}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        out = write_demo_dataset(
            args.out,
            n_cases=args.n_cases,
            size=args.size,
            seed=args.seed,
            hgg_fraction=args.hgg_fraction,
            with_history=args.history,
            lgg_enhancing_fraction=args.lgg_enhancing_fraction,
            start_index=args.start_index,
        )
    except (ValueError, OSError) as exc:  # e.g. a size too small for a tumour, a folder that cannot be written
        print(f"emrfuse demo-data: error: {exc}", file=sys.stderr)
        return 2
    shape = _resolve_size(args.size)
    print(
        f"wrote {args.n_cases} demo cases ({shape[0]}x{shape[1]}x{shape[2]}, seed {args.seed}) "
        f"to {out} in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``emrfuse demo-data OUT --n-cases N --size small --seed 0``."""
    p = subparsers.add_parser(
        "demo-data",
        help="write synthetic BraTS-2020-layout cases with reports (demo data)",
        description="Write synthetic glioma cases (four MRI sequences, label map, TextBraTS-style report) "
        "in the BraTS 2020 training layout, with name_mapping.csv grades.",
    )
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--n-cases", type=int, default=20, help="number of cases (default 20)")
    p.add_argument(
        "--size",
        type=_size_arg,
        default="small",
        help="small (64x64x48), medium (96x96x64), full (240x240x155) or XxYxZ",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hgg-fraction", type=float, default=0.5, help="share of high-grade cases (default 0.5)")
    p.add_argument(
        "--history",
        type=float,
        default=0.0,
        help="probability of a clinical-history line (default 0: real TextBraTS reports have none; its age follows the grade)",
    )
    p.add_argument(
        "--lgg-enhancing-fraction",
        type=float,
        default=LGG_ENHANCING_FRACTION,
        help=f"share of low-grade tumours with a small enhancing nodule (default {LGG_ENHANCING_FRACTION})",
    )
    p.add_argument("--start-index", type=int, default=1, help="number of the first case id")
    p.set_defaults(func=_run)
    return p
