"""Metrics (modeling_emrfuse.evaluation.metrics), the evaluate metric folder and ``emrfuse score``.

Segmentation metrics are checked against MedPy (an independent implementation) on random masks
with anisotropic spacing and on the real label map in ``../shared/realdata`` (skipped when absent);
grading metrics against scikit-learn. Volumes are tiny except for the one real case.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from modeling_emrfuse.brats_labels import (
    GRADES,
    HD95_EMPTY_SENTINEL_MM,
    LABEL_CONVENTIONS,
    REGIONS,
    convert_label_map,
    label_map_to_regions,
)
from modeling_emrfuse.evaluation import metrics as M

medpy_binary = pytest.importorskip("medpy.metric.binary", reason="MedPy (test extra) is the reference implementation")

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
TCGA_SEG = REALDATA / "TCGA-DU-7294" / "TCGA-DU-7294_seg.nii.gz"


def _blob(shape, center, radii):
    grid = np.indices(shape, dtype=float)
    d = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii))
    return d <= 1.0


def _random_pair(rng, shape):
    """Two overlapping irregular masks: a perturbed ellipsoid and a shifted, noisy copy."""
    center = [rng.uniform(0.3, 0.7) * s for s in shape]
    radii = [rng.uniform(0.15, 0.35) * s for s in shape]
    ref = _blob(shape, center, radii) ^ (rng.random(shape) < 0.03)
    pred = np.roll(ref, tuple(int(v) for v in rng.integers(-2, 3, size=len(shape))), axis=tuple(range(len(shape))))
    pred = pred ^ (rng.random(shape) < 0.05)
    return pred, ref


# --------------------------------------------------------------------------------------------
# overlap metrics and HD95 vs MedPy
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_random_masks_match_medpy(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(8, 24, size=3))
    pred, ref = _random_pair(rng, shape)
    spacing = tuple(float(s) for s in rng.uniform(0.4, 3.0, size=3))
    assert M.dice(pred, ref) == pytest.approx(medpy_binary.dc(pred, ref), abs=1e-12)
    assert M.ppv(pred, ref) == pytest.approx(medpy_binary.precision(pred, ref), abs=1e-12)
    assert M.sensitivity(pred, ref) == pytest.approx(medpy_binary.recall(pred, ref), abs=1e-12)
    assert M.hd95(pred, ref, spacing) == pytest.approx(medpy_binary.hd95(pred, ref, voxelspacing=spacing), abs=1e-9)
    # the metric is symmetric (pooled distances in both directions)
    assert M.hd95(ref, pred, spacing) == pytest.approx(M.hd95(pred, ref, spacing), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_hd95_small_blobs_and_border_contact_match_medpy(seed):
    """Cropping to the union box must not change anything: far-apart blobs, blobs on the array border."""
    rng = np.random.default_rng(100 + seed)
    shape = (30, 26, 14)
    spacing = (0.9, 1.3, 2.7)
    pred = np.zeros(shape, bool)
    ref = np.zeros(shape, bool)
    ref[3:8, 4:9, 2:5] = True
    pred[20:26, 15:22, 8:12] = True  # far away: the box spans both
    pred[0:3, 0:4, 0:2] = True  # touches three faces of the array
    ref[-4:, -3:, -2:] = True
    ref ^= rng.random(shape) < 0.01
    for p, r in ((pred, ref), (ref, pred), (pred[:, :, 0], ref[:, :, 0])):
        sp = spacing[: p.ndim]
        assert M.hd95(p, r, sp) == pytest.approx(medpy_binary.hd95(p, r, voxelspacing=sp), abs=1e-9)


def test_hd95_hand_computed_and_spacing():
    a = np.zeros((5, 5, 9), bool)
    b = np.zeros_like(a)
    a[2, 2, 1] = True
    b[2, 2, 4] = True
    assert M.hd95(a, b, (1.0, 1.0, 2.0)) == pytest.approx(6.0)
    assert M.hd95(a, b, 2.0) == pytest.approx(6.0)  # one number = isotropic
    assert M.hd95(a, a, (1, 1, 1)) == 0.0
    # non-boolean masks: non-zero is foreground, as in MedPy
    assert M.hd95(a.astype(np.uint8) * 4, b.astype(float), (1, 1, 2)) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(a, b, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(a, b, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        M.hd95(a, b[:4])
    with pytest.raises(ValueError, match="shape"):
        M.dice(a, b[:, :4])


def test_empty_mask_rules():
    empty = np.zeros((6, 6, 6), bool)
    full = empty.copy()
    full[2:4, 2:4, 2:4] = True
    assert HD95_EMPTY_SENTINEL_MM == pytest.approx(373.13, abs=0.005)
    # both empty
    assert (M.dice(empty, empty), M.ppv(empty, empty), M.sensitivity(empty, empty), M.hd95(empty, empty)) == (
        1.0,
        1.0,
        1.0,
        0.0,
    )
    # prediction empty, reference not: PPV's denominator is 0 but the tumour was missed -> 0
    assert (M.dice(empty, full), M.ppv(empty, full), M.sensitivity(empty, full)) == (0.0, 0.0, 0.0)
    assert M.hd95(empty, full, (1, 1, 3)) == HD95_EMPTY_SENTINEL_MM  # not rescaled by the spacing
    # reference empty, prediction not: sensitivity's denominator is 0 and nothing was missed -> 1
    assert (M.dice(full, empty), M.ppv(full, empty), M.sensitivity(full, empty)) == (0.0, 0.0, 1.0)
    assert M.hd95(full, empty) == HD95_EMPTY_SENTINEL_MM
    res = M.region_metrics(np.stack([full, empty, empty]), np.stack([full, full, empty]))
    n = int(full.sum())
    assert res["WT"] == {"dice": 1.0, "ppv": 1.0, "sensitivity": 1.0, "hd95": 0.0, "ref_voxels": n, "pred_voxels": n}
    assert res["TC"] == {
        "dice": 0.0,
        "ppv": 0.0,
        "sensitivity": 0.0,
        "hd95": HD95_EMPTY_SENTINEL_MM,
        "ref_voxels": n,
        "pred_voxels": 0,
    }
    assert res["ET"] == {"dice": 1.0, "ppv": 1.0, "sensitivity": 1.0, "hd95": 0.0, "ref_voxels": 0, "pred_voxels": 0}


def test_region_metrics_shapes():
    good = np.zeros((3, 4, 4, 4), bool)
    with pytest.raises(ValueError, match="WT, TC, ET|expected shape"):
        M.region_metrics(good[:2], good[:2])
    with pytest.raises(ValueError, match="differs"):
        M.region_metrics(good, good[:, :3])
    out = M.region_metrics(good, good, spacing=(1, 1, 2))
    assert list(out) == list(REGIONS) and all(list(v) == list(M.METRICS + M.VOXEL_COUNTS) for v in out.values())
    row = M.metrics_to_row(out)
    assert list(row)[:6] == ["WT_dice", "WT_ppv", "WT_sensitivity", "WT_hd95", "WT_ref_voxels", "WT_pred_voxels"]
    assert len(row) == 18 and isinstance(row["ET_ref_voxels"], int)


# --------------------------------------------------------------------------------------------
# label conventions
# --------------------------------------------------------------------------------------------
def _labelled(values, shape=(10, 10, 6)):
    lab = np.zeros(shape, np.uint8)
    for i, v in enumerate(values):
        lab[1 + 2 * i : 3 + 2 * i, 2:6, 1:4] = v
    return lab


@pytest.mark.parametrize(
    "convention, wt, tc, et",
    [
        ("brats2015", (1, 2, 3, 4), (1, 3, 4), (4,)),
        ("brats2017", (1, 2, 4), (1, 4), (4,)),
        ("brats2023", (1, 2, 3), (1, 3), (3,)),
    ],
)
def test_region_definitions_per_convention(convention, wt, tc, et):
    labels = sorted(LABEL_CONVENTIONS[convention].labels)
    lab = _labelled(labels)
    for region, members in zip(REGIONS, (wt, tc, et)):
        # a prediction holding exactly the region's labels scores a perfect Dice on that region
        pred = np.where(np.isin(lab, members), lab, 0).astype(np.uint8)
        res = M.score_label_maps(pred, lab, convention)
        assert res[region]["dice"] == 1.0, (convention, region)
        for other in REGIONS:
            expected = np.isin(lab, LABEL_CONVENTIONS[convention].regions[other])
            got = np.isin(pred, LABEL_CONVENTIONS[convention].regions[other])
            assert res[other]["dice"] == pytest.approx(M.dice(got, expected))


def test_score_label_maps_across_conventions_and_bad_labels():
    ref17 = _labelled((1, 2, 4))
    pred23 = convert_label_map(ref17, "brats2017", "brats2023")
    res = M.score_label_maps(pred23, ref17, "brats2023", "brats2017", spacing=(1, 1, 2))
    assert all(res[r]["dice"] == 1.0 and res[r]["hd95"] == 0.0 for r in REGIONS)
    # read with the wrong convention, label 3 of brats2023 would be outside brats2017
    with pytest.raises(ValueError, match="prediction"):
        M.score_label_maps(pred23, ref17, "brats2017")
    with pytest.raises(ValueError, match="reference"):
        M.score_label_maps(ref17, pred23, "brats2017")
    with pytest.raises(ValueError, match="shape"):
        M.score_label_maps(ref17[:5], ref17, "brats2017")
    with pytest.raises(ValueError, match="convention"):
        M.score_label_maps(ref17, ref17, "brats1999")
    # a release year works as a convention
    assert M.score_label_maps(ref17, ref17, "2018")["ET"]["dice"] == 1.0


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
def test_aggregate_values():
    rng = np.random.default_rng(0)
    nested = []
    for _ in range(5):
        nested.append({r: {m: float(rng.uniform(0, 1 if m != "hd95" else 50)) for m in M.METRICS} for r in REGIONS})
    agg = M.aggregate(nested)
    for r in REGIONS:
        for m in M.METRICS:
            vals = np.array([c[r][m] for c in nested])
            assert agg[r][m]["mean"] == pytest.approx(vals.mean())
            assert agg[r][m]["std"] == pytest.approx(vals.std(ddof=1))
            assert agg[r][m]["median"] == pytest.approx(np.median(vals))
            assert agg[r][m]["n"] == 5
    flat = [dict(case_id=f"c{i}", **M.metrics_to_row(c)) for i, c in enumerate(nested)]
    assert M.aggregate(flat) == agg
    assert M.aggregate({f"c{i}": c for i, c in enumerate(nested)}) == agg
    assert M.aggregate(nested, ddof=0)["WT"]["dice"]["std"] == pytest.approx(np.std([c["WT"]["dice"] for c in nested]))
    # hand values, sentinel included as in the BraTS ranking
    two = [{"WT_dice": 1.0, "WT_hd95": 0.0}, {"WT_dice": 0.0, "WT_hd95": HD95_EMPTY_SENTINEL_MM}]
    a2 = M.aggregate(two, regions=("WT",), metrics=("dice", "hd95"))
    assert a2["WT"]["dice"] == {"mean": 0.5, "std": pytest.approx(math.sqrt(0.5)), "median": 0.5, "n": 2}
    assert a2["WT"]["hd95"]["mean"] == pytest.approx(HD95_EMPTY_SENTINEL_MM / 2)
    one = M.aggregate(nested[:1])
    assert math.isnan(one["WT"]["dice"]["std"]) and one["WT"]["dice"]["median"] == nested[0]["WT"]["dice"]
    assert M.aggregate([])["ET"]["hd95"]["n"] == 0
    with pytest.raises(ValueError, match="c1.*TC dice"):
        M.aggregate({"c0": nested[0], "c1": {"WT": nested[1]["WT"]}})
    with pytest.raises(ValueError, match="not finite"):
        M.aggregate([{"WT_dice": float("nan")}], regions=("WT",), metrics=("dice",))


# --------------------------------------------------------------------------------------------
# grading vs scikit-learn
# --------------------------------------------------------------------------------------------
def test_classification_metrics_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=40)
    p1 = np.clip(0.35 * y + rng.uniform(0, 0.65, size=40), 0, 1)
    p1[:5] = 0.5  # ties and the threshold itself
    out = M.classification_metrics(y, p1)
    pred = (p1 > 0.5).astype(int)
    assert out["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert out["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred))
    assert out["roc_auc"] == pytest.approx(sk.roc_auc_score(y, p1))
    assert out["f1"] == pytest.approx(sk.f1_score(y, pred, average="macro"))
    assert out["f1_per_class"]["LGG"] == pytest.approx(sk.f1_score(y, pred))
    assert out["confusion_matrix"] == sk.confusion_matrix(y, pred, labels=[0, 1]).tolist()
    assert out["labels"] == list(GRADES) and out["n"] == 40
    # (N, 2) probabilities and class names give the same numbers
    names = np.array(GRADES)[y]
    out2 = M.classification_metrics(list(names), np.stack([1 - p1, p1], axis=1))
    assert out2["roc_auc"] == pytest.approx(out["roc_auc"])
    assert out2["confusion_matrix"] == sk.confusion_matrix(y, np.argmax(np.stack([1 - p1, p1], 1), 1)).tolist()
    # calibration: log loss and Brier score
    assert out["log_loss"] == pytest.approx(sk.log_loss(y, p1))
    assert out["brier"] == pytest.approx(sk.brier_score_loss(y, p1))
    assert out2["log_loss"] == pytest.approx(out["log_loss"]) and out2["brier"] == pytest.approx(out["brier"])
    # hard predictions: no AUC, no calibration
    hard = M.classification_metrics(y, y_pred=pred)
    assert math.isnan(hard["roc_auc"]) and hard["accuracy"] == out["accuracy"]
    assert math.isnan(hard["log_loss"]) and math.isnan(hard["brier"])
    # scores that are not probabilities rank cases (AUC) but have no calibration
    logits = M.classification_metrics(y, np.stack([-3 * p1, 3 * p1], axis=1))
    assert logits["roc_auc"] == pytest.approx(out["roc_auc"]) and math.isnan(logits["log_loss"])
    assert math.isnan(M.classification_metrics(y, np.stack([p1, p1], axis=1))["brier"])  # rows do not sum to 1
    assert M.classification_metrics(y, pred)["confusion_matrix"] == out["confusion_matrix"]  # int array = hard


def test_classification_metrics_edge_cases():
    sk = pytest.importorskip("sklearn.metrics")
    # one class only: AUC undefined -> NaN, the rest defined
    out = M.classification_metrics([0, 0, 0], [0.2, 0.7, 0.4])
    assert math.isnan(out["roc_auc"])
    assert out["accuracy"] == pytest.approx(2 / 3) and out["balanced_accuracy"] == pytest.approx(2 / 3)
    assert out["confusion_matrix"] == [[2, 1], [0, 0]]
    assert out["f1"] == pytest.approx(
        sk.f1_score([0, 0, 0], [0, 1, 0], average="macro", labels=[0, 1], zero_division=0)
    )
    # three classes, one-vs-rest macro AUC
    rng = np.random.default_rng(5)
    y = np.arange(30) % 3
    prob = rng.dirichlet(np.ones(3), size=30)
    prob[np.arange(30), y] += 0.3
    prob /= prob.sum(1, keepdims=True)
    out3 = M.classification_metrics(y, prob, labels=("a", "b", "c"))
    assert out3["roc_auc"] == pytest.approx(sk.roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    assert out3["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, prob.argmax(1)))
    assert out3["f1"] == pytest.approx(sk.f1_score(y, prob.argmax(1), average="macro"))
    assert out3["log_loss"] == pytest.approx(sk.log_loss(y, prob))
    assert out3["brier"] == pytest.approx(0.5 * np.mean(((prob - np.eye(3)[y]) ** 2).sum(1)))
    with pytest.raises(ValueError, match="unknown class names"):
        M.classification_metrics(["HGG", "GBM"], [0.1, 0.2])
    with pytest.raises(ValueError, match="outside"):
        M.classification_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="exactly one"):
        M.classification_metrics([0, 1])
    with pytest.raises(ValueError, match="rows"):
        M.classification_metrics([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        M.classification_metrics([0, 1], [0.1, float("nan")])


# --------------------------------------------------------------------------------------------
# the real label map
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_seg():
    if not TCGA_SEG.exists():
        pytest.skip(f"real case not available: {TCGA_SEG} is absent (only in the development checkout)")
    import nibabel as nib

    img = nib.load(str(TCGA_SEG))
    return np.asarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms()[:3])


def test_real_label_map_vs_perturbed_copy_matches_medpy(real_seg):
    ref, spacing = real_seg
    assert ref.shape == (240, 240, 155)
    pred = ref.copy()
    core = ndimage.binary_dilation(ref == 1, iterations=2)
    pred[core & (ref == 2)] = 1  # grow the core into the edema
    pred[np.roll(ref == 2, 3, axis=0) & (ref == 0)] = 2  # shift part of the edema
    pred[100:104, 100:104, 60:63] = 4  # a small false enhancing focus (reference has none)
    res = M.score_label_maps(pred, ref, "brats2017", spacing=spacing)
    p_reg, r_reg = label_map_to_regions(pred, "brats2017"), label_map_to_regions(ref, "brats2017")
    for i, region in enumerate(REGIONS):
        p, r = p_reg[i], r_reg[i]
        if r.any():
            assert res[region]["dice"] == pytest.approx(medpy_binary.dc(p, r), abs=1e-12)
            assert res[region]["ppv"] == pytest.approx(medpy_binary.precision(p, r), abs=1e-12)
            assert res[region]["sensitivity"] == pytest.approx(medpy_binary.recall(p, r), abs=1e-12)
            assert res[region]["hd95"] == pytest.approx(medpy_binary.hd95(p, r, voxelspacing=spacing), abs=1e-9)
    # the reference has no enhancing tumour: a predicted ET focus is a false positive case
    assert res["ET"] == {
        "dice": 0.0,
        "ppv": 0.0,
        "sensitivity": 1.0,
        "hd95": HD95_EMPTY_SENTINEL_MM,
        "ref_voxels": 0,
        "pred_voxels": 4 * 4 * 3,
    }
    assert 0.8 < res["WT"]["dice"] < 1.0
    # anisotropic spacing on the same masks (as if resampled)
    aniso = (0.94, 1.1, 2.5)
    wt_p, wt_r = p_reg[0], r_reg[0]
    t0 = time.perf_counter()
    ours = M.hd95(wt_p, wt_r, aniso)
    t_ours = time.perf_counter() - t0
    assert ours == pytest.approx(medpy_binary.hd95(wt_p, wt_r, voxelspacing=aniso), abs=1e-9)
    print(f"\nHD95 on the full-size real case (240x240x155, WT): {t_ours * 1000:.1f} ms")


# --------------------------------------------------------------------------------------------
# evaluate.load round trip
# --------------------------------------------------------------------------------------------
def test_evaluate_metric_round_trip(tmp_path):
    evaluate = pytest.importorskip("evaluate")
    assert (M.BRATS_METRIC_DIR / "brats_metric.py").is_file()
    metric = evaluate.load(str(M.BRATS_METRIC_DIR), keep_in_memory=True)
    rng = np.random.default_rng(7)
    refs, preds = [], []
    for _ in range(3):
        ref = _labelled((1, 2, 4), shape=(12, 10, 6))
        pred = ref.copy()
        flip = rng.random(ref.shape) < 0.1
        pred[flip] = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=int(flip.sum()))
        refs.append(ref)
        preds.append(pred)
    spacing = (1.0, 1.2, 2.0)
    out = metric.compute(predictions=preds, references=refs, pred_convention="brats2017", spacing=spacing)
    expected = [M.score_label_maps(p, r, "brats2017", spacing=spacing) for p, r in zip(preds, refs)]
    assert out["n_cases"] == 3
    for got, want in zip(out["per_case"], expected):
        assert {r: pytest.approx(want[r]) for r in REGIONS} == got
    agg = M.aggregate(expected)
    for r in REGIONS:
        for m in M.METRICS:
            assert out[f"{r}_{m}"] == pytest.approx(agg[r][m]["mean"])
    # per-case conventions and spacings, add_batch, references in another convention
    refs23 = [convert_label_map(r, "brats2017", "brats2023") for r in refs]
    metric.add_batch(predictions=preds[:2], references=refs23[:2])
    out2 = metric.compute(pred_convention="brats2017", ref_convention=["brats2023", "2023"], spacing=[spacing, spacing])
    assert out2["WT_dice"] == pytest.approx(np.mean([expected[i]["WT"]["dice"] for i in range(2)]))
    # region-mask configuration
    regions = evaluate.load(str(M.BRATS_METRIC_DIR), "regions", keep_in_memory=True)
    p_reg = [label_map_to_regions(p, "brats2017") for p in preds]
    r_reg = [label_map_to_regions(r, "brats2017") for r in refs]
    out3 = regions.compute(predictions=p_reg, references=r_reg, spacing=spacing, return_per_case=False)
    assert "per_case" not in out3 and out3["ET_hd95"] == pytest.approx(out["ET_hd95"])
    with pytest.raises(ValueError, match="case 0"):
        metric.compute(predictions=[refs23[0]], references=[refs[0]], pred_convention="brats2017")


# --------------------------------------------------------------------------------------------
# emrfuse score
# --------------------------------------------------------------------------------------------
def _write(path: Path, array, spacing=(1.0, 1.0, 1.0), affine=None):
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    if affine is None:
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    img = nib.Nifti1Image(np.asarray(array), affine)
    img.header.set_zooms(tuple(spacing))
    nib.save(img, str(path))
    return path


def _score(args, capsys):
    from modeling_emrfuse.commands.cli import main

    rc = main(["score", "--no-progress", *[str(a) for a in args]])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return rc, captured.out, captured.err


@pytest.mark.parametrize(
    "name, expected",
    [
        ("BraTS20_Training_001_seg.nii.gz", "BraTS20_Training_001"),
        ("BraTS20_Training_001.nii.gz", "BraTS20_Training_001"),
        ("BraTS-GLI-00001-000-seg.nii.gz", "BraTS-GLI-00001-000"),
        ("TCGA-DU-7294_pred.nii.gz", "TCGA-DU-7294"),
        ("case7_prediction_seg.nii", "case7"),
        ("case7.SEG.NII.GZ", "case7"),
        ("case7_mask.nii.gz", "case7"),
        ("BraTS20_Training_001_flair.nii.gz", None),
        ("BraTS-GLI-00001-000-t2f.nii.gz", None),
        ("case7_seg.mha", None),
        ("notes.txt", None),
    ],
)
def test_case_id_from_path(name, expected):
    from modeling_emrfuse.commands.score import case_id_from_path

    assert case_id_from_path(Path("/data") / name) == expected
    if expected is None:
        return
    assert case_id_from_path(Path("/data") / "caseX" / "seg.nii.gz") == "caseX"


def test_score_cli_end_to_end(tmp_path, capsys):
    ref_dir, pred_dir, out = tmp_path / "ref", tmp_path / "pred", tmp_path / "out"
    spacing = (1.0, 1.0, 2.0)
    rng = np.random.default_rng(11)
    refs, preds = {}, {}
    for case in ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003", "Case-4"]:
        ref = _labelled((1, 2, 4), shape=(12, 10, 6))
        if case == "Case-4":
            ref[ref == 4] = 1  # no enhancing tumour in this reference
        pred = ref.copy()
        flip = rng.random(ref.shape) < 0.08
        pred[flip] = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=int(flip.sum()))
        refs[case], preds[case] = ref, pred
    # references: BraTS case folders (with image files beside them) and a flat file
    for case in list(refs)[:3]:
        _write(ref_dir / "HGG" / case / f"{case}_seg.nii.gz", refs[case], spacing)
        _write(ref_dir / "HGG" / case / f"{case}_flair.nii.gz", np.ones((12, 10, 6), np.int16), spacing)
    _write(ref_dir / "Case-4-seg.nii.gz", refs["Case-4"], spacing)
    # predictions named by other tools; 002 missing; one without a reference; 003 in brats2023 labels
    _write(pred_dir / "BraTS20_Training_001.nii.gz", preds["BraTS20_Training_001"], spacing)
    _write(
        pred_dir / "braTS20_training_003_pred.nii.gz",
        convert_label_map(preds["BraTS20_Training_003"], "2017", "2023"),
        spacing,
    )
    _write(pred_dir / "sub" / "case-4_seg.nii.gz", preds["Case-4"].astype(np.float32), spacing)
    _write(pred_dir / "Unknown_seg.nii.gz", preds["Case-4"], spacing)
    # label 4 in some predictions, label 3 in others: brats2015 fits all of them but no single file
    # shows it; a folder mixing brats2017 and brats2023 is as likely, so the command asks
    rc, stdout, err = _score(["--pred", pred_dir, "--ref", ref_dir, "--out", out], capsys)
    assert rc == 2 and "ambiguous" in err and "--pred-convention" in err
    rc, stdout, err = _score(
        ["--pred", pred_dir, "--ref", ref_dir, "--out", out, "--pred-convention", "brats2017"], capsys
    )
    assert rc == 2 and "BraTS20_Training_003" in err and "outside the brats2017" in err

    _write(pred_dir / "braTS20_training_003_pred.nii.gz", preds["BraTS20_Training_003"], spacing)
    rc, stdout, err = _score(["--pred", pred_dir, "--ref", ref_dir, "--out", out], capsys)
    assert rc == 0, err
    assert "| WT |" in stdout and "3 case(s) scored" in stdout
    assert "BraTS20_Training_002" in err and "--missing-as-empty" in err and "Unknown" in err
    expected = {
        c: M.score_label_maps(preds[c], refs[c], "brats2017", spacing=spacing)
        for c in preds
        if c != "BraTS20_Training_002"
    }
    with open(out / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == ["Case-4", "BraTS20_Training_001", "BraTS20_Training_003"]
    for row in rows:
        for r in REGIONS:
            for m in M.METRICS:
                assert float(row[f"{r}_{m}"]) == pytest.approx(expected[row["case_id"]][r][m])
        assert (row["spacing_z"], row["pred_convention"], row["ref_convention"]) == ("2.0", "brats2017", "brats2017")
    assert rows[0]["reference"].endswith("Case-4-seg.nii.gz") and rows[0]["prediction"].endswith("case-4_seg.nii.gz")
    summary = json.loads((out / "summary.json").read_text())
    agg = M.aggregate(list(expected.values()))
    assert summary["num_cases"] == 3
    assert summary["segmentation"]["TC"]["hd95"]["mean"] == pytest.approx(agg["TC"]["hd95"]["mean"])
    assert summary["segmentation"]["ET"]["dice"]["median"] == pytest.approx(agg["ET"]["dice"]["median"])
    assert summary["missing_predictions"] == ["BraTS20_Training_002"] and not summary["missing_counted_as_empty"]
    assert summary["unmatched_predictions"] == ["Unknown"]
    assert summary["ref_convention"]["used"] == "brats2017" and "{0, 1, 2, 4}" in summary["ref_convention"]["note"]
    md = (out / "summary.md").read_text()
    assert "| Region | Dice (%) | PPV (%) | Sensitivity (%) | HD95 (mm) |" in md and "BraTS20_Training_002" in md
    wt = agg["WT"]["dice"]
    assert f"| WT | {wt['mean'] * 100:.1f} ± {wt['std'] * 100:.1f} ({wt['median'] * 100:.1f})" in md

    # missing predictions counted as empty
    rc, _, err = _score(["--pred", pred_dir, "--ref", ref_dir, "--out", out, "--missing-as-empty"], capsys)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == 4 and summary["missing_counted_as_empty"]
    with open(out / "per_case.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["case_id"] == "BraTS20_Training_002")
    assert row["prediction_missing"] == "True" and float(row["WT_dice"]) == 0.0
    assert float(row["WT_hd95"]) == pytest.approx(HD95_EMPTY_SENTINEL_MM)


def test_score_cli_conventions(tmp_path, capsys):
    ref23 = _labelled((1, 2, 3), shape=(12, 10, 6))
    _write(tmp_path / "ref" / "c1_seg.nii.gz", ref23)
    _write(tmp_path / "pred" / "c1.nii.gz", ref23)
    args = ["--pred", tmp_path / "pred", "--ref", tmp_path / "ref", "--out", tmp_path / "out"]
    # {1, 2, 3}: brats2023 or brats2015, which differ: never guessed for the reference
    rc, _, err = _score(args, capsys)
    assert rc == 2 and "ambiguous" in err and "--ref-convention" in err
    rc, _, err = _score(args + ["--pred-convention", "brats2023"], capsys)
    assert rc == 2 and "--ref-convention" in err
    # given for the reference: the prediction takes it, and says so
    rc, _, err = _score(args + ["--ref-convention", "brats2023"], capsys)
    assert rc == 0 and "using the reference convention brats2023" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["pred_convention"]["used"] == "brats2023" and summary["segmentation"]["ET"]["dice"]["mean"] == 1.0
    # read as 2015, label 3 is not enhancing: ET is empty in both
    rc, _, _ = _score(args + ["--ref-convention", "2015", "--pred-convention", "brats2015"], capsys)
    assert rc == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["segmentation"]["ET"]["hd95"]["mean"] == 0.0
    # a prediction in brats2017 labels against brats2023 references: inferred, converted through regions
    _write(tmp_path / "pred" / "c1.nii.gz", convert_label_map(ref23, "brats2023", "brats2017"))
    rc, _, err = _score(args + ["--ref-convention", "brats2023"], capsys)
    assert rc == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["pred_convention"]["used"] in ("brats2017", "brats2015")
    assert all(summary["segmentation"][r]["dice"]["mean"] == 1.0 for r in REGIONS)
    # unknown convention name: argparse error, exit 2
    with pytest.raises(SystemExit) as exc:
        _score(args + ["--ref-convention", "brats1999"], capsys)
    assert exc.value.code == 2


def test_score_cli_bad_inputs(tmp_path, capsys):
    ref = _labelled((1, 2, 4), shape=(12, 10, 6))
    ref_dir, pred_dir, out = tmp_path / "ref", tmp_path / "pred", tmp_path / "out"
    _write(ref_dir / "c1_seg.nii.gz", ref, (1.0, 1.0, 2.0))
    _write(ref_dir / "c2_seg.nii.gz", ref, (1.0, 1.0, 2.0))
    args = ["--pred", pred_dir, "--ref", ref_dir, "--out", out, "--ref-convention", "brats2017"]

    rc, _, err = _score(args, capsys)
    assert rc == 2 and "prediction folder" in err and "does not exist" in err
    pred_dir.mkdir()
    (pred_dir / "readme.txt").write_text("x")
    rc, _, err = _score(args, capsys)
    assert rc == 2 and "no NIfTI label map" in err
    _write(pred_dir / "other.nii.gz", ref)
    rc, _, err = _score(args, capsys)
    assert rc == 2 and "matches a reference" in err

    (pred_dir / "other.nii.gz").unlink()
    _write(pred_dir / "c1.nii.gz", ref[:, :, :5], (1.0, 1.0, 2.0))
    _write(pred_dir / "c2.nii.gz", ref, (1.0, 1.0, 2.0))
    rc, _, err = _score(args, capsys)
    assert rc == 2 and "c1" in err and "shape" in err
    # --skip-invalid records the bad case and scores the rest
    rc, _, err = _score(args + ["--skip-invalid"], capsys)
    assert rc == 0 and "skipped case c1" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == 1 and summary["skipped"][0]["case_id"] == "c1"

    _write(pred_dir / "c1.nii.gz", ref, (1.0, 1.0, 1.0))
    rc, _, err = _score(args, capsys)
    assert rc == 2 and "c1" in err and "spacing" in err

    _write(pred_dir / "c1.nii.gz", np.where(ref == 4, 7, ref).astype(np.uint8), (1.0, 1.0, 2.0))
    rc, _, err = _score(args + ["--pred-convention", "brats2017"], capsys)
    assert rc == 2 and "[7]" in err and "c1" in err

    _write(pred_dir / "c1.nii.gz", ref.astype(np.float32) * 0.5, (1.0, 1.0, 2.0))
    rc, _, err = _score(args, capsys)
    assert rc == 2 and "non-integer" in err

    (pred_dir / "c1.nii.gz").write_bytes(b"not a nifti")
    rc, _, err = _score(args, capsys)
    assert rc == 2 and "cannot read" in err and "c1.nii.gz" in err

    (pred_dir / "c1.nii.gz").unlink()
    _write(pred_dir / "c2_seg.nii.gz", ref, (1.0, 1.0, 2.0))
    rc, _, err = _score(args, capsys)
    assert rc == 2 and "two files for case 'c2'" in err

    # a flipped orientation is scored but reported
    (pred_dir / "c2_seg.nii.gz").unlink()
    _write(pred_dir / "c2.nii.gz", ref, (1.0, 1.0, 2.0), affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    rc, _, err = _score(args, capsys)
    assert rc == 0 and "orientation" in err


def test_score_cli_infers_brats2015_and_nested_prediction_folder(tmp_path, capsys):
    ref15 = _labelled((1, 2, 3, 4), shape=(12, 10, 6))  # 3 and 4 in one file: only brats2015 fits
    lgg15 = _labelled((1, 2, 3), shape=(12, 10, 6))  # alone this one would be ambiguous
    _write(tmp_path / "data" / "c1" / "c1_seg.nii.gz", ref15)
    _write(tmp_path / "data" / "c2" / "c2_seg.nii.gz", lgg15)
    # predictions inside the reference folder: not taken for references
    _write(tmp_path / "data" / "preds" / "c1.nii.gz", ref15)
    _write(tmp_path / "data" / "preds" / "c2.nii.gz", lgg15)
    out = tmp_path / "out"
    rc, _, err = _score(["--pred", tmp_path / "data" / "preds", "--ref", tmp_path / "data", "--out", out], capsys)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ref_convention"]["used"] == "brats2015" and summary["num_cases"] == 2
    assert summary["ref_convention"]["note"].startswith("inferred")
    assert summary["pred_convention"]["used"] == "brats2015" and not summary["unmatched_predictions"]
    # label 3 is non-enhancing in brats2015: case 2 has no ET in either map
    with open(out / "per_case.csv", newline="") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert float(rows["c2"]["ET_hd95"]) == 0.0 and float(rows["c1"]["ET_dice"]) == 1.0
