"""Lesion-wise metrics of BraTS 2023+ (modeling_emrfuse.evaluation.lesion_metrics), in ``emrfuse score`` and the evaluate metric.

Checked two ways:

- against an independent hand computation on synthetic label maps (scipy connected components with
  26-connectivity, one-to-one overlaps by construction, MedPy's hd95 per matched pair), in all three
  label conventions;
- against the official BraTS evaluation package (``brats_evaluation``, AGPL: a test oracle only, never
  imported by EmrFuse) on real label maps of ``../shared/realdata`` and perturbed predictions
  (eroded, dilated, shifted, a spurious lesion added, a lesion removed). The oracle reads BraTS 2023
  labels, so references of other conventions are converted for it here with the challenge's own
  label tables; EmrFuse scores the original files. Skipped when the data or the package is absent.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from modeling_emrfuse.brats_labels import REGIONS
from modeling_emrfuse.evaluation import lesion_metrics as L
from modeling_emrfuse.evaluation import metrics as M

needs_panoptica = pytest.mark.skipif(
    importlib.util.find_spec("panoptica") is None,
    reason="lesion-wise metrics need the optional panoptica package (emrfuse[lesion])",
)

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"

# label values of each region per convention, written out here (not taken from brats_labels)
REGION_LABELS = {
    "brats2015": {"WT": (1, 2, 3, 4), "TC": (1, 3, 4), "ET": (4,)},
    "brats2017": {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
    "brats2023": {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
}
# to the BraTS 2023 labels the official evaluation reads (1 NETC, 2 SNFH, 3 ET)
TO_2023 = {"brats2015": {1: 1, 2: 2, 3: 1, 4: 3}, "brats2017": {1: 1, 2: 2, 4: 3}, "brats2023": {1: 1, 2: 2, 3: 3}}


def _tumour(lab, box, core, et, edema=2, core_label=1, et_label=4):
    """Write a nested tumour (edema box > core box > enhancing box) into ``lab`` (slices as tuples)."""
    lab[box] = edema
    if core is not None:
        lab[core] = core_label
    if et is not None:
        lab[et] = et_label


def _s(*bounds):
    return tuple(slice(a, b) for a, b in bounds)


def synthetic_pair(convention: str):
    """Reference and prediction with matched, missed and spurious lesions in every region."""
    shape = (48, 48, 32)
    ref, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    et_label = 3 if convention == "brats2023" else 4
    kw = dict(et_label=et_label)
    # A: found, shifted by one voxel
    a = (_s((4, 16), (4, 16), (4, 14)), _s((6, 14), (6, 14), (6, 12)), _s((8, 12), (8, 12), (7, 11)))
    _tumour(ref, *a, **kw)
    _tumour(pred, *[tuple(slice(s.start + 1, s.stop + 1) if i == 0 else s for i, s in enumerate(b)) for b in a], **kw)
    # B: found, but its core shrunk and its enhancing part missed
    _tumour(
        ref, _s((26, 40), (26, 40), (14, 28)), _s((29, 37), (29, 37), (17, 25)), _s((31, 35), (31, 35), (19, 23)), **kw
    )
    _tumour(pred, _s((26, 40), (27, 40), (14, 27)), _s((30, 36), (30, 36), (18, 24)), None, **kw)
    # C: a small edema-only lesion, missed
    _tumour(ref, _s((4, 8), (36, 42), (20, 26)), None, None, **kw)
    # D: spurious tumour with core and enhancing parts
    _tumour(pred, _s((36, 44), (4, 10), (4, 10)), _s((38, 42), (5, 9), (5, 9)), _s((39, 41), (6, 8), (6, 8)), **kw)
    if convention == "brats2015":  # part of the cores as non-enhancing tumour (label 3): same regions
        for lab in (ref, pred):
            lab[(lab == 1) & (np.indices(shape)[2] % 2 == 0)] = 3
    return pred, ref


def hand_lesion_metrics(pred_mask, ref_mask, spacing):
    """Independent lesion-wise computation for geometries where overlaps are one-to-one."""
    from medpy.metric.binary import hd95 as medpy_hd95

    full = np.ones((3, 3, 3), bool)  # 26-connectivity
    rl, nr = ndimage.label(ref_mask, structure=full)
    pl, npd = ndimage.label(pred_mask, structure=full)
    pairs = sorted({(int(r), int(p)) for r, p in zip(rl[ref_mask & pred_mask], pl[ref_mask & pred_mask])})
    assert len({r for r, _ in pairs}) == len(pairs) == len({p for _, p in pairs}), "test geometry must be one-to-one"
    tp = len(pairs)
    dices, hds = [], []
    for r, p in pairs:
        a, b = rl == r, pl == p
        dices.append(2.0 * np.count_nonzero(a & b) / (a.sum() + b.sum()))
        hds.append(medpy_hd95(b, a, voxelspacing=spacing))
    none = nr == 0 and npd == 0
    sq = math.nan if none else (float(np.mean(dices)) if tp else 0.0)
    fp, fn = npd - tp, nr - tp
    pq = math.nan if none else sq * tp / (tp + 0.5 * fp + 0.5 * fn)
    hd = math.nan if none else (float(np.mean(hds)) if tp else math.inf)
    return {"tp": tp, "fp": fp, "fn": fn, "sq_dsc": sq, "pq_dsc": pq, "sq_hd95": hd}


def _same(a, b, tol=1e-9):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, float) and math.isinf(a):
        return a == b
    return abs(float(a) - float(b)) <= tol


@needs_panoptica
@pytest.mark.parametrize("convention", ["brats2015", "brats2017", "brats2023"])
def test_lesion_wise_matches_hand_computation(convention):
    pred, ref = synthetic_pair(convention)
    spacing = (1.0, 1.0, 2.0)
    got = M.score_label_maps(pred, ref, convention, spacing=spacing, lesion_wise=True)
    for region in REGIONS:
        labels = REGION_LABELS[convention][region]
        expected = hand_lesion_metrics(np.isin(pred, labels), np.isin(ref, labels), spacing)
        for metric in L.LESION_METRICS:
            assert _same(got[region][metric], expected[metric]), (region, metric, got[region][metric], expected[metric])
    # the geometry covers matched, missed and spurious lesions
    assert (got["WT"]["tp"], got["WT"]["fp"], got["WT"]["fn"]) == (2, 1, 1)
    assert (got["ET"]["tp"], got["ET"]["fp"], got["ET"]["fn"]) == (1, 1, 1)
    assert 0 < got["ET"]["pq_dsc"] < got["ET"]["sq_dsc"] < 1
    row = M.metrics_to_row(got)
    assert isinstance(row["WT_tp"], int) and "ET_pq_dsc" in row and "TC_sq_hd95" in row


@needs_panoptica
def test_lesion_wise_edge_cases():
    empty = np.zeros((3, 12, 12, 12), bool)
    one = empty.copy()
    one[:, 3:7, 3:7, 3:7] = True
    both_empty = L.lesion_wise_metrics(empty, empty)
    assert all(math.isnan(both_empty[r][m]) for r in REGIONS for m in ("sq_dsc", "pq_dsc", "sq_hd95"))
    assert all(both_empty[r]["tp"] == both_empty[r]["fp"] == both_empty[r]["fn"] == 0 for r in REGIONS)
    missed = L.lesion_wise_metrics(empty, one)["ET"]
    assert (missed["tp"], missed["fn"], missed["sq_dsc"], missed["pq_dsc"], missed["sq_hd95"]) == (
        0,
        1,
        0.0,
        0.0,
        math.inf,
    )
    spurious = L.lesion_wise_metrics(one, empty)["WT"]
    assert (spurious["fp"], spurious["sq_dsc"], spurious["sq_hd95"]) == (1, 0.0, math.inf)
    with pytest.raises(ValueError, match="spacing"):
        L.lesion_wise_metrics(one, one, spacing=None)
    with pytest.raises(ValueError, match="expected shape"):
        L.lesion_wise_metrics(one[:2], one[:2])


def test_lesion_wise_without_panoptica_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "panoptica", None)  # import fails as if not installed
    L.brats_lesion_evaluator.cache_clear()
    try:
        with pytest.raises(L.LesionMetricsUnavailable, match="pip install"):
            M.score_label_maps(
                np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), "brats2017", lesion_wise=True
            )
        # without the flag nothing needs panoptica
        assert (
            M.score_label_maps(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), "brats2017")["WT"]["dice"]
            == 1.0
        )
        from modeling_emrfuse.commands.cli import main

        for folder in ("ref", "pred"):
            _write(tmp_path / folder / "c1_seg.nii.gz", synthetic_pair("brats2017")[1])
        rc = main(
            [
                "score",
                "--no-progress",
                "--lesion-wise",
                "--pred",
                str(tmp_path / "pred"),
                "--ref",
                str(tmp_path / "ref"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        err = capsys.readouterr().err
        assert rc == 2 and "panoptica" in err and "emrfuse[lesion]" in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()
    finally:
        L.brats_lesion_evaluator.cache_clear()


def _write(path: Path, array, spacing=(1.0, 1.0, 1.0)):
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array), np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]))
    img.header.set_zooms(tuple(spacing))
    nib.save(img, str(path))
    return path


@needs_panoptica
def test_score_cli_lesion_wise_columns_and_summary(tmp_path, capsys):
    from modeling_emrfuse.commands.cli import main

    spacing = (1.0, 1.0, 2.0)
    pred, ref = synthetic_pair("brats2017")
    _write(tmp_path / "ref" / "c1" / "c1_seg.nii.gz", ref, spacing)
    _write(tmp_path / "pred" / "c1.nii.gz", pred, spacing)
    _write(tmp_path / "ref" / "c2" / "c2_seg.nii.gz", ref, spacing)
    _write(tmp_path / "pred" / "c2.nii.gz", ref, spacing)  # perfect
    args = [
        "score",
        "--no-progress",
        "--pred",
        str(tmp_path / "pred"),
        "--ref",
        str(tmp_path / "ref"),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    with open(tmp_path / "out" / "per_case.csv", newline="") as f:
        header = next(csv.reader(f))
    assert "WT_pq_dsc" not in header  # opt-in
    assert main(args + ["--lesion-wise"]) == 0
    out = capsys.readouterr().out
    assert "Lesion-wise" in out and "sq_hd95 (mm)" in out
    with open(tmp_path / "out" / "per_case.csv", newline="") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    expected = M.score_label_maps(pred, ref, "brats2017", spacing=spacing, lesion_wise=True)
    for region in REGIONS:
        for metric in L.LESION_METRICS:
            assert _same(float(rows["c1"][f"{region}_{metric}"]), float(expected[region][metric]))
        assert rows["c2"][f"{region}_tp"] != "0" and float(rows["c2"][f"{region}_pq_dsc"]) == 1.0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["lesion_wise"] is True
    et = summary["segmentation"]["ET"]
    n_ref_et = int(ndimage.label(ref == 4, structure=np.ones((3, 3, 3), bool))[1])  # the perfect case matches all
    assert et["fp"]["total"] == expected["ET"]["fp"] and et["tp"]["total"] == expected["ET"]["tp"] + n_ref_et == 3
    assert et["pq_dsc"]["mean"] == pytest.approx((expected["ET"]["pq_dsc"] + 1.0) / 2)
    assert "Lesion-wise" in (tmp_path / "out" / "summary.md").read_text()


@needs_panoptica
def test_evaluate_metric_lesion_wise():
    import evaluate

    pred, ref = synthetic_pair("brats2017")
    metric = evaluate.load(str(M.BRATS_METRIC_DIR))
    out = metric.compute(predictions=[pred, ref], references=[ref, ref], pred_convention="brats2017", lesion_wise=True)
    direct = M.score_label_maps(pred, ref, "brats2017", lesion_wise=True)
    assert out["ET_pq_dsc"] == pytest.approx((direct["ET"]["pq_dsc"] + 1.0) / 2)
    assert out["WT_fn"] == pytest.approx(direct["WT"]["fn"] / 2)
    assert out["per_case"][0]["TC"]["sq_dsc"] == pytest.approx(direct["TC"]["sq_dsc"])
    assert "WT_pq_dsc" not in metric.compute(predictions=[ref], references=[ref], pred_convention="brats2017")


# --------------------------------------------------------------------------------------------
# the official BraTS evaluation as the oracle, on real label maps
# --------------------------------------------------------------------------------------------
REAL_MAPS = [
    (
        "BraTS2023/BraTS-GLI-00000-000/BraTS-GLI-00000-000-seg.nii.gz",
        "brats2023",
        ("eroded", "dilated", "shifted", "spurious", "removed"),
    ),
    ("BraTS2021/BraTS2021_00002/BraTS2021_00002_seg.nii.gz", "brats2017", ("shifted", "removed")),
    ("other/brats_tcia_pat222_2/segmentation.nii.gz", "brats2015", ("dilated", "spurious")),
]


def perturb(ref: np.ndarray, how: str, conv: str) -> np.ndarray:
    """A prediction made from the reference: eroded / dilated / shifted, a spurious lesion, a lesion removed."""
    et_label = REGION_LABELS[conv]["ET"][0]
    pred = ref.copy()
    tumour = ref > 0
    if how == "eroded":
        pred[tumour & ~ndimage.binary_erosion(tumour, iterations=2)] = 0
    elif how == "dilated":
        grown = ndimage.binary_dilation(tumour, iterations=2) & ~tumour
        pred[grown] = 2  # edema around the tumour
    elif how == "shifted":
        pred = np.roll(ref, (3, -2, 1), axis=(0, 1, 2))
    elif how == "spurious":
        box = np.argwhere(tumour)
        x = int(box[:, 0].max()) + 8 if box[:, 0].max() + 16 < ref.shape[0] else int(box[:, 0].min()) - 16
        pred[x : x + 8, 100:108, 60:66] = 2
        pred[x + 2 : x + 6, 102:106, 61:65] = et_label
    elif how == "removed":  # the smallest tumour-core lesion (all its labels) disappears
        core = np.isin(ref, REGION_LABELS[conv]["TC"])
        lab, n = ndimage.label(core, structure=np.ones((3, 3, 3), bool))
        if n < 2:  # a single core: remove the smallest enhancing lesion instead (or the core)
            lab, n = (
                ndimage.label(ref == et_label, structure=np.ones((3, 3, 3), bool))
                if (ref == et_label).any()
                else (lab, n)
            )
        sizes = np.bincount(lab.ravel())[1:]
        pred[lab == 1 + int(np.argmin(sizes))] = 0
    return pred


@pytest.fixture(scope="module")
def official_evaluation():
    pytest.importorskip("nibabel")
    try:
        from importlib.resources import files

        from brats_evaluation.evaluation import evaluate_single_exam
        from panoptica import Panoptica_Evaluator
    except ImportError:
        pytest.skip("the official BraTS evaluation package (brats_evaluation, AGPL; test oracle only) is not installed")
    config = Path(str(files("brats_evaluation").joinpath("configs", "config_gli.yaml")))
    return evaluate_single_exam, Panoptica_Evaluator.load_from_config(str(config))


@needs_panoptica
@pytest.mark.parametrize("rel_path, conv, perturbations", REAL_MAPS, ids=[m[1] for m in REAL_MAPS])
def test_lesion_wise_matches_official_brats_evaluation(
    rel_path, conv, perturbations, official_evaluation, tmp_path, capsys
):
    import nibabel as nib

    from modeling_emrfuse.commands.cli import main

    path = REALDATA / rel_path
    if not path.exists():
        pytest.skip(f"real label map not available: {path} is absent (only in the development checkout)")
    evaluate_single_exam, evaluator = official_evaluation
    img = nib.load(str(path))
    ref = np.asarray(img.dataobj).astype(np.uint8)
    assert ref.shape == (240, 240, 155)
    to23 = np.zeros(256, np.uint8)
    for src, dst in TO_2023[conv].items():
        to23[src] = dst
    header = img.header.copy()
    header.set_data_dtype(np.uint8)  # some label maps are stored as float32
    for folder in ("ours_ref", "ours_pred", "oracle_ref", "oracle_pred"):
        (tmp_path / folder).mkdir()
    for how in perturbations:
        pred = perturb(ref, how, conv)
        name = f"{how}-00000.nii.gz"
        for folder, array in (
            ("ours_ref", ref),
            ("ours_pred", pred),
            ("oracle_ref", to23[ref]),
            ("oracle_pred", to23[pred]),
        ):
            nib.save(nib.Nifti1Image(array, img.affine, header), str(tmp_path / folder / name))
    rc = main(
        [
            "score",
            "--no-progress",
            "--lesion-wise",
            "--pred",
            str(tmp_path / "ours_pred"),
            "--ref",
            str(tmp_path / "ours_ref"),
            "--out",
            str(tmp_path / "out"),
            "--ref-convention",
            conv,
            "--pred-convention",
            conv,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    with open(tmp_path / "out" / "per_case.csv", newline="") as f:
        ours = {r["case_id"]: r for r in csv.DictReader(f)}
    for how in perturbations:
        name = f"{how}-00000.nii.gz"
        official = evaluate_single_exam(
            str(tmp_path / "oracle_pred" / name), str(tmp_path / "oracle_ref" / name), name, evaluator
        )
        assert "error" not in official, official.get("error")
        row = ours[f"{how}-00000"]
        for region in REGIONS:
            for metric in L.LESION_METRICS:
                theirs = official[region.lower()][metric]
                assert _same(float(row[f"{region}_{metric}"]), float(theirs)), (
                    conv,
                    how,
                    region,
                    metric,
                    row[f"{region}_{metric}"],
                    theirs,
                )
    # the perturbations did change the lesions
    assert any(
        ours[f"{how}-00000"]["WT_fp"] != "0"
        or ours[f"{how}-00000"]["WT_fn"] != "0"
        or ours[f"{how}-00000"]["ET_fn"] != "0"
        or float(ours[f"{how}-00000"]["WT_sq_dsc"]) < 1
        for how in perturbations
    )
