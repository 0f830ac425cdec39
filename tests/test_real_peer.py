"""bench/real_peer.py (MONAI SegResNet beside EmrFuse in bench_real's cross-validation): the peer's region
targets, a tiny end-to-end fold on synthetic cases (rows with EmrFuse's columns, label maps on the case's grid),
the wall-clock budget, reuse of a finished fold, and the real-data cache (skipped without ../shared/realdata)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REALDATA, write_small_case

pytest.importorskip("monai")

ROOT = Path(__file__).resolve().parents[1]
import real_peer  # noqa: E402

from modeling_emrfuse.brats_io import discover_cases  # noqa: E402
from modeling_emrfuse.brats_labels import REGIONS  # noqa: E402

SHAPE = (48, 48, 24)
TINY = real_peer.PeerSettings(init_filters=4, patch=(16, 16, 16), threads=1, overlap=0.25)


def test_region_targets_known_answer():
    # 2017 convention: 1 necrosis (TC), 2 edema (WT only), 4 enhancing (TC and ET)
    label = np.array([[[0, 1, 2, 4]]], dtype=np.uint8)
    regions = real_peer.region_targets(label, "brats2017")
    assert regions.dtype == np.uint8 and regions.shape == (3, 1, 1, 4)
    assert regions[:, 0, 0].tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]
    # 2023 convention: 3 is enhancing; the same regions from the same anatomy
    regions23 = real_peer.region_targets(np.array([[[0, 1, 2, 3]]]), "brats2023")
    assert np.array_equal(regions23, regions)
    # 2015: 3 is non-enhancing core (TC, not ET), 4 enhancing
    regions15 = real_peer.region_targets(np.array([[[0, 3, 2, 4]]]), "brats2015")
    assert np.array_equal(regions15, regions)
    with pytest.raises(ValueError, match="case X"):  # 3 is no 2017 label: never guessed
        real_peer.region_targets(np.array([[[0, 3]]]), "brats2017", where="case X")


def _tumour_label(shape, centre, radius) -> np.ndarray:
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    d = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    label = np.zeros(shape, dtype=np.uint8)
    label[d < radius] = 2
    label[d < radius * 0.6] = 1
    label[d < radius * 0.3] = 4
    return label


@pytest.fixture
def tiny_cases(tmp_path):
    import nibabel as nib

    root = tmp_path / "data"
    for i, centre in enumerate([(20, 24, 12), (28, 22, 11)]):
        case_id = f"BraTS20_Training_{i + 1:03d}"
        folder = write_small_case(root, shape=SHAPE, seed=i, case_id=case_id)
        affine = nib.load(folder / f"{case_id}_t1.nii.gz").affine
        img = nib.Nifti1Image(_tumour_label(SHAPE, centre, 7), affine)
        nib.save(img, folder / f"{case_id}_seg.nii.gz")
    cases = sorted(discover_cases(root, release="auto"), key=lambda c: c.case_id)
    assert len(cases) == 2 and all(c.label is not None for c in cases)
    return cases


def test_training_cache_matches_the_label_regions(tiny_cases, tmp_path):
    case = tiny_cases[0]
    image, regions = real_peer.prepared_training_case(case, tmp_path / "cache")
    assert image.dtype == np.float16 and image.shape[0] == 4 and regions.shape == (3,) + image.shape[1:]
    # the brain's box, no in-plane padding: every slice of the crop holds brain voxels
    assert np.all(np.any(image != 0, axis=(0, 1, 2)))
    # z-scored over the brain: each sequence has mean ~0, std ~1 over brain voxels
    brain = np.any(image != 0, axis=0)
    for channel in image.astype(np.float32):
        assert abs(channel[brain].mean()) < 1e-2 and abs(channel[brain].std() - 1) < 1e-2
    # the regions hold the whole tumour (nothing lost to the crop), nested ET in TC in WT
    label = _tumour_label(SHAPE, (20, 24, 12), 7)
    assert [int(r.sum()) for r in regions] == [
        int((label > 0).sum()),
        int(np.isin(label, (1, 4)).sum()),
        int((label == 4).sum()),
    ]
    assert np.all(regions[2] <= regions[1]) and np.all(regions[1] <= regions[0])
    # second call reads the cache
    again_image, again_regions = real_peer.prepared_training_case(case, tmp_path / "cache")
    assert np.array_equal(again_image, image) and np.array_equal(again_regions, regions)


def test_tiny_fold_end_to_end_and_budget(tiny_cases, tmp_path):
    budget = 2.5
    rows, stats = real_peer.run_fold(
        tiny_cases, tiny_cases, budget, tmp_path / "run", tmp_path / "cache", TINY, log=lambda _: None
    )
    # the budget: steps start only within it, so training ends within budget + one step
    assert stats["steps"] >= 1
    assert stats["seconds"] <= budget + stats["max_step_seconds"] + 0.05
    assert stats["seconds"] >= budget
    assert stats["threads"] == 1
    assert [r["case_id"] for r in rows] == [c.case_id for c in tiny_cases]
    for row in rows:
        for region in REGIONS:
            assert np.isfinite(row[f"{region}_dice"]) and 0.0 <= row[f"{region}_dice"] <= 1.0
            assert np.isfinite(row[f"{region}_hd95"])
        assert row["missing_sequences"] == ""
    assert (tmp_path / "run" / real_peer.WEIGHTS).is_file()
    # a finished fold with the same cases, budget and settings is reused, not trained again
    messages = []
    rows_again, _ = real_peer.run_fold(
        tiny_cases, tiny_cases, budget, tmp_path / "run", tmp_path / "cache", TINY, log=messages.append
    )
    assert rows_again == rows and any("reused" in m for m in messages)


def test_label_map_on_the_case_grid(tiny_cases, tmp_path):
    import torch

    torch.manual_seed(0)
    model = real_peer.build_segresnet(TINY)
    with torch.no_grad():  # a bias that makes every voxel every region: the mask and the convention decide
        model.conv_final[-1].conv.bias.fill_(20.0)
    case = tiny_cases[0]
    label_map, convention, slices = real_peer.predict_label_map(model, case, TINY)
    assert label_map.shape == SHAPE and label_map.dtype == np.uint8 and convention == "brats2017"
    import nibabel as nib

    brain = nib.load(case.sequences["t1"]).get_fdata() != 0
    assert np.all(label_map[brain] == 4) and np.all(label_map[~brain] == 0)  # background masked as the pipeline
    row = real_peer.score_case(case, label_map, convention)
    assert set(f"{r}_{m}" for r in REGIONS for m in ("dice", "ppv", "sensitivity", "hd95")) <= set(row)
    wt = _tumour_label(SHAPE, (20, 24, 12), 7) > 0
    assert row["WT_dice"] == pytest.approx(2 * wt.sum() / (wt.sum() + brain.sum()), abs=1e-6)
    assert row["WT_sensitivity"] == pytest.approx(1.0)


def test_budget_must_be_positive(tiny_cases, tmp_path):
    with pytest.raises(ValueError, match="budget"):
        real_peer.train_segresnet(tiny_cases, 0, tmp_path / "cache", TINY)


@pytest.mark.skipif(not REALDATA.is_dir(), reason="real cases ../shared/realdata absent")
def test_real_case_cache_regions_match_the_label_map(tmp_path):
    folder = REALDATA / "BraTS2018" / "HGG"
    if not folder.is_dir():
        pytest.skip("BraTS2018/HGG not in ../shared/realdata")
    case = sorted(discover_cases(folder, release="auto"), key=lambda c: c.case_id)[0]
    import nibabel as nib

    label = np.asarray(nib.load(case.label).dataobj)
    image, regions = real_peer.prepared_training_case(case, tmp_path / "cache")
    assert int(regions[0].sum()) == int((label > 0).sum())  # the whole tumour inside the brain's box
    assert int(regions[2].sum()) == int((label == 4).sum())
    assert np.isfinite(image.astype(np.float32)).all()


def test_fold_budget_matches_the_emrfuse_run_or_the_fixed_minutes():
    timings = {"cv-fold1-image": 250.0, "cv-fold1-image+demo": 300.0, "cv-fold10-image": 999.0}
    assert real_peer.fold_budget_seconds(None, timings, 1, ["image", "image+demo"]) == 250.0
    assert real_peer.fold_budget_seconds(None, timings, 1, ["image+demo", "image"]) == 300.0
    assert real_peer.fold_budget_seconds(2.5, timings, 1, ["image"]) == 150.0
    with pytest.raises(SystemExit, match="--peer_minutes"):
        real_peer.fold_budget_seconds(None, timings, 2, ["image"])


def test_bench_real_peer_options():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_real_for_peer", ROOT / "bench" / "bench_real.py")
    bench_real = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench_real  # its dataclasses look their module up
    spec.loader.exec_module(bench_real)
    args = bench_real.parse_args(["--output_dir", "x", "--cv", "5"])
    assert args.peer == "none" and args.peer_minutes is None
    args = bench_real.parse_args(["--output_dir", "x", "--cv", "5", "--peer", "segresnet", "--peer_minutes", "20"])
    assert args.peer == real_peer.PEER and args.peer_minutes == 20.0
