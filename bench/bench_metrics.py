"""Metric timing on full-size (240 x 240 x 155) cases: HD95 (modeling_emrfuse.evaluation.metrics vs MedPy, same run)
and the lesion-wise metrics of BraTS 2023+ (panoptica, per case).

    OMP_NUM_THREADS=1 python bench/bench_metrics.py [--repeats 5] [--medpy-repeats 1] [--lesion-repeats 3]

Cases: the real label maps ``../shared/realdata/TCGA-DU-7294`` and ``BraTS2023/BraTS-GLI-00000-000``
(expert labels with enhancing tumour in two lesions; when present) against perturbed copies, and synthetic full-size cases (a typical glioma, and a very large mask that fills most of
the box: the worst case for the bounding-box crop). Prints per-region HD95 times (median over
repeats), the values of both implementations, the time of the whole per-case
``score_label_maps`` (all regions, all metrics, label checks included), and that of the lesion-wise
metrics (``score_label_maps(..., lesion_wise=True)`` minus the plain call: what ``emrfuse score
--lesion-wise`` adds per case), with the lesion counts. Figures only: nothing is asserted on time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
from scipy import ndimage

from modeling_emrfuse.brats_labels import REGIONS, label_map_to_regions
from modeling_emrfuse.evaluation.metrics import hd95, score_label_maps

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
REAL_SEG = REALDATA / "TCGA-DU-7294" / "TCGA-DU-7294_seg.nii.gz"
REAL_SEG_2023 = REALDATA / "BraTS2023" / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-seg.nii.gz"
SHAPE = (240, 240, 155)


def _timed(fn: Callable[[], float], repeats: int) -> Tuple[float, float]:
    times, value = [], float("nan")
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return value, statistics.median(times)


def _ellipsoid(center, radii) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, s) for s in SHAPE)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def synthetic_case(seed: int, scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """A nested brats2017 tumour (edema 2 > core 1 > enhancing 4) and a perturbed prediction."""
    rng = np.random.default_rng(seed)
    c = (120 + rng.integers(-20, 20), 120 + rng.integers(-20, 20), 77 + rng.integers(-10, 10))
    ref = np.zeros(SHAPE, np.uint8)
    ref[_ellipsoid(c, (40 * scale, 35 * scale, 28 * scale))] = 2
    ref[_ellipsoid(c, (18 * scale, 15 * scale, 12 * scale))] = 4
    ref[_ellipsoid(c, (10 * scale, 8 * scale, 7 * scale))] = 1
    pred = np.roll(ref, (2, -1, 1), axis=(0, 1, 2))
    pred[ndimage.binary_dilation(pred == 2, iterations=2) & (pred == 0) & (rng.random(SHAPE) < 0.5)] = 2
    return pred, ref


def real_case(path: Path = REAL_SEG, convention: str = "brats2017") -> Tuple[np.ndarray, np.ndarray, Tuple[float, ...]]:
    """A real label map as reference and a perturbed copy, both in the brats2017 labels."""
    import nibabel as nib

    from modeling_emrfuse.brats_labels import convert_label_map

    img = nib.load(str(path))
    ref = convert_label_map(np.asarray(img.dataobj).astype(np.uint8), convention, "brats2017")
    pred = ref.copy()
    pred[ndimage.binary_dilation(ref == 1, iterations=2) & (ref == 2)] = 1
    pred[np.roll(ref == 2, 3, axis=0) & (ref == 0)] = 2
    pred[np.roll(ref == 4, 2, axis=1) & (ref > 0)] = 4
    return pred, ref, tuple(float(z) for z in img.header.get_zooms()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--medpy-repeats", type=int, default=1)
    parser.add_argument("--lesion-repeats", type=int, default=3)
    args = parser.parse_args()
    try:
        from modeling_emrfuse.evaluation.lesion_metrics import brats_lesion_evaluator

        brats_lesion_evaluator()  # import panoptica once, outside the timings
        lesion_wise = True
    except ImportError as exc:
        lesion_wise = False
        print(f"lesion-wise timing skipped: {exc}")
    try:
        from medpy.metric.binary import hd95 as medpy_hd95
    except ImportError:  # pragma: no cover - MedPy is a test extra
        medpy_hd95 = None
        print("MedPy not installed: timing modeling_emrfuse.evaluation.metrics only")

    cases: List[Tuple[str, np.ndarray, np.ndarray, Tuple[float, ...]]] = []
    if REAL_SEG.exists():
        cases.append(("TCGA-DU-7294 (real) vs perturbed", *real_case()))
    else:
        print(f"{REAL_SEG} absent: synthetic cases only")
    if REAL_SEG_2023.exists():
        cases.append(("BraTS-GLI-00000-000 (real) vs perturbed", *real_case(REAL_SEG_2023, "brats2023")))
    cases.append(("synthetic glioma, 1 mm", *synthetic_case(0, 1.0), (1.0, 1.0, 1.0)))
    cases.append(("synthetic glioma, spacing (0.94, 1.1, 2.5)", *synthetic_case(1, 1.0), (0.94, 1.1, 2.5)))
    cases.append(("synthetic huge mask (worst case)", *synthetic_case(2, 2.6), (1.0, 1.0, 1.0)))

    print(
        f"{'case':44s} {'region':6s} {'voxels':>9s} {'ours ms':>9s} {'MedPy ms':>9s} {'speed-up':>8s}  HD95 ours / MedPy (mm)"
    )
    for name, pred, ref, spacing in cases:
        p_reg, r_reg = label_map_to_regions(pred, "brats2017"), label_map_to_regions(ref, "brats2017")
        for i, region in enumerate(REGIONS):
            p, r = p_reg[i], r_reg[i]
            ours, t_ours = _timed(lambda: hd95(p, r, spacing), args.repeats)
            line = f"{name:44s} {region:6s} {int(r.sum()):9d} {t_ours * 1e3:9.1f}"
            if medpy_hd95 is not None and p.any() and r.any():
                theirs, t_theirs = _timed(lambda: medpy_hd95(p, r, voxelspacing=spacing), args.medpy_repeats)
                line += f" {t_theirs * 1e3:9.1f} {t_theirs / t_ours:7.0f}x  {ours:.4f} / {theirs:.4f}"
            else:
                line += f" {'-':>9s} {'-':>8s}  {ours:.4f} (an empty mask: rule, not MedPy)"
            print(line)
        _, t_case = _timed(lambda: score_label_maps(pred, ref, "brats2017", spacing=spacing), args.repeats)
        print(f"{name:44s} {'all':6s} {'':9s} {t_case * 1e3:9.1f}   score_label_maps (3 regions x 4 metrics)")
        if lesion_wise:
            res, t_lesion = _timed(
                lambda: score_label_maps(pred, ref, "brats2017", spacing=spacing, lesion_wise=True), args.lesion_repeats
            )
            counts = ", ".join(f"{r} tp/fp/fn {res[r]['tp']}/{res[r]['fp']}/{res[r]['fn']}" for r in REGIONS)
            print(
                f"{name:44s} {'all':6s} {'':9s} {t_lesion * 1e3:9.1f}   with lesion_wise=True: lesion-wise adds "
                f"{(t_lesion - t_case) * 1e3:.0f} ms per case ({counts})"
            )


if __name__ == "__main__":
    main()
