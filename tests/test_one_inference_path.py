"""One inference path: train.py's held-out evaluation and ``emrfuse predict`` give the same label map, voxel for
voxel, and the same grade probabilities, for the same model and cases (one in BraTS's LPS orientation with a
background around the brain, one in another orientation, so that the background mask and the undo both act)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REALDATA, build_tiny_model_folder

from modeling_emrfuse.commands.cli import main
from modeling_emrfuse.training import evaluation

SHAPE = (40, 44, 20)
REAL_CASE = REALDATA / "BraTS2018" / "HGG" / "Brats18_2013_2_1"


def _write_case(root: Path, case_id: str, axcodes=("L", "P", "S"), seed: int = 0) -> Path:
    """A four-sequence case with a label map (an ellipsoid brain on a zero background, a spherical tumour), written
    in the orientation ``axcodes``."""
    rng = np.random.default_rng(seed)
    folder = root / case_id
    folder.mkdir(parents=True)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    brain = (x**2 + y**2 + z**2) < 0.8
    tumour = ((x - 0.2) ** 2 + (y + 0.1) ** 2 + z**2) < 0.12
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [10.0, 20.0, -5.0]
    turn = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("L", "P", "S")), nib.orientations.axcodes2ornt(tuple(axcodes))
    )
    images = {
        f"{name}": np.where(brain, 100 + 20 * i + 30 * tumour + rng.normal(0, 10, SHAPE), 0).astype(np.int16)
        for i, name in enumerate(("t1", "t1ce", "t2", "flair"))
    }
    images["seg"] = np.where(tumour, 4, 0).astype(np.uint8)
    for name, data in images.items():
        img = nib.Nifti1Image(data, lps).as_reoriented(turn)
        img.header.set_xyzt_units("mm")
        nib.save(img, folder / f"{case_id}_{name}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one-path")
    model = build_tiny_model_folder(tmp / "model")
    cases = tmp / "cases"
    _write_case(cases, "Case_LPS", seed=1)
    _write_case(cases, "Case_ARS", axcodes=("A", "R", "S"), seed=2)
    out = tmp / "predicted"
    assert main(["predict", str(cases), "--model", str(model), "-o", str(out), "--precision", "fp32", "-q"]) == 0
    return model, cases, out


def _held_out(model_cls, folder: Path, cases: Path, task: str, monkeypatch, inference=None):
    """train.py's held-out evaluation of every case in ``cases`` (as train.py calls it, the model in memory): the
    rows and the pipeline results it computed them from."""
    from accelerate import Accelerator

    from modeling_emrfuse.brats_io import discover_cases
    from modeling_emrfuse.processing_emrfuse import EmrFuseProcessor

    results = {}

    def recording(pipe, case, report, max_report_tokens=None, **options):
        results[case.case_id] = predict_case(pipe, case, report, max_report_tokens, **options)
        return results[case.case_id]

    predict_case = evaluation.predict_case
    model = model_cls.from_pretrained(folder)
    processor = EmrFuseProcessor.from_pretrained(folder)
    found = discover_cases(cases)
    with monkeypatch.context() as patch:  # undone at the end, so that a second call records only its own results
        patch.setattr(evaluation, "predict_case", recording)
        rows, summary, embeds = evaluation.evaluate(
            Accelerator(cpu=True), model, processor, list(found), {}, task, step=0, inference=inference
        )
    assert summary.get("inference") == (inference or None)
    assert embeds is not None and embeds.shape[0] == len(found)  # the embedding plot's input
    assert model.training is False
    return {r["case_id"]: r for r in rows}, results


def test_held_out_label_map_equals_emrfuse_predict_voxel_for_voxel(setup, monkeypatch):
    from modeling_emrfuse.modeling_emrfuse import EmrFuseForSegmentation

    model, cases, out = setup
    rows, results = _held_out(EmrFuseForSegmentation, model, cases, "segmentation", monkeypatch)
    for case_id in ("Case_LPS", "Case_ARS"):
        written = nib.load(str(out / f"{case_id}.nii.gz"))
        predicted = np.asanyarray(written.dataobj)
        held_out = results[case_id]["label_map"]
        assert held_out.shape == predicted.shape == written.shape
        assert np.array_equal(held_out, predicted)
        assert 0 < np.count_nonzero(predicted) < predicted.size
        assert np.isfinite(rows[case_id]["WT_dice"])
    record = json.loads((out / "Case_ARS.json").read_text())
    assert record["reoriented_from"] == "ARS" and results["Case_ARS"]["reoriented_from"] == "ARS"
    assert json.loads((out / "Case_LPS.json").read_text())["reoriented_from"] is None


def test_background_mask_acts_on_the_held_out_label_map(setup, monkeypatch):
    """The random model paints tumour on the background inside the brain's box: the mask removes it, in
    evaluation as in predict."""
    from modeling_emrfuse.modeling_emrfuse import EmrFuseForSegmentation
    from modeling_emrfuse.pipeline_emrfuse import pipeline_for_model
    from modeling_emrfuse.processing_emrfuse import EmrFuseProcessor

    model, cases, _ = setup
    _, results = _held_out(EmrFuseForSegmentation, model, cases, "segmentation", monkeypatch)
    net = EmrFuseForSegmentation.from_pretrained(model).eval()
    with torch.no_grad(), pipeline_for_model(net, EmrFuseProcessor.from_pretrained(model)) as pipe:
        unmasked = pipe(str(cases / "Case_LPS"), mask_background=False, use_case_report=False)["label_map"]
    background = np.asanyarray(nib.load(str(cases / "Case_LPS" / "Case_LPS_flair.nii.gz")).dataobj) == 0
    assert np.count_nonzero(unmasked[background]) > 0
    assert np.count_nonzero(results["Case_LPS"]["label_map"][background]) == 0


def test_held_out_grade_probabilities_equal_emrfuse_predict(setup, monkeypatch):
    from modeling_emrfuse.modeling_emrfuse import EmrFuseForImageClassification

    model, cases, out = setup
    rows, _ = _held_out(EmrFuseForImageClassification, model / "grading", cases, "classification", monkeypatch)
    for case_id in ("Case_LPS", "Case_ARS"):
        predicted = json.loads((out / f"{case_id}.json").read_text())["grade_probabilities"]
        held_out = {grade: rows[case_id][f"prob_{grade}"] for grade in predicted}
        assert held_out == pytest.approx(predicted, abs=1e-5)  # predict folds BatchNorm: float rounding only
        assert rows[case_id]["pred_grade"] == max(predicted, key=predicted.get)


def test_test_time_flips_on_a_flip_symmetric_case_give_a_flip_symmetric_result(setup, tmp_path):
    """With ``tta`` the region probabilities are averaged over the in-plane flips: on a case that the flips leave
    unchanged, the result is unchanged by them too (the random model alone is not), and the record says so."""
    from modeling_emrfuse.pipeline_emrfuse import load_pipeline

    model, _, out = setup
    x, y, z = np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 32), np.linspace(-1, 1, 8), indexing="ij")
    case = np.stack([100 + 40 * i + 60 * np.exp(-3 * (x**2 + y**2)) + 10 * z for i in range(4)]).astype(np.float32)
    pipe = load_pipeline(str(model), device="cpu", precision="fp32", optimize=False, grading_model=False)
    plain = pipe(case, return_probabilities=True)
    flips = pipe(case, return_probabilities=True, tta=True)
    assert flips["tta"] and not plain["tta"]
    p, q = plain["region_probabilities"].astype(np.float32), flips["region_probabilities"].astype(np.float32)
    assert not np.allclose(p, p[:, ::-1, ::-1], atol=1e-3)  # the model is not flip-equivariant
    for axes in ((1,), (2,), (1, 2)):
        np.testing.assert_allclose(q, np.flip(q, axes), atol=1e-3)
        assert np.array_equal(flips["label_map"], np.flip(flips["label_map"], tuple(a - 1 for a in axes)))
    assert np.count_nonzero(flips["label_map"]) > 0

    assert json.loads((out / "Case_LPS.json").read_text())["tta"] is False
    case_dir = setup[1] / "Case_LPS"
    assert main(["predict", str(case_dir), "--model", str(model), "-o", str(tmp_path), "--tta", "-q"]) == 0
    assert json.loads((tmp_path / "Case_LPS.json").read_text())["tta"] is True


@pytest.mark.skipif(not REAL_CASE.is_dir(), reason=f"real case {REAL_CASE} not present (../shared/realdata)")
def test_held_out_label_map_equals_emrfuse_predict_on_a_real_case(setup, tmp_path, monkeypatch):
    """The same on a real BraTS 2018 case (int16, sform code 2, 240 x 240 x 155), scored against its expert labels."""
    from modeling_emrfuse.modeling_emrfuse import EmrFuseForSegmentation

    model = setup[0]
    assert (
        main(
            [
                "predict",
                str(REAL_CASE),
                "--model",
                str(model),
                "-o",
                str(tmp_path),
                "--precision",
                "fp32",
                "-q",
                "--no-grading",
            ]
        )
        == 0
    )
    rows, results = _held_out(EmrFuseForSegmentation, model, REAL_CASE, "segmentation", monkeypatch)
    predicted = np.asanyarray(nib.load(str(tmp_path / f"{REAL_CASE.name}.nii.gz")).dataobj)
    assert np.array_equal(results[REAL_CASE.name]["label_map"], predicted)
    assert np.isfinite(rows[REAL_CASE.name]["WT_dice"])


def test_held_out_evaluation_with_inference_options_equals_the_pipeline_with_them(setup, monkeypatch):
    """train.py's ``--eval_tta --eval_min_component_mm3 --eval_et_min_mm3`` reach the pipeline: the held-out label
    maps and their metrics are the pipeline's with the same options, and differ from the plain evaluation."""
    from train_script import load_train_script

    from modeling_emrfuse.evaluation.metrics import metrics_to_row, score_label_maps
    from modeling_emrfuse.modeling_emrfuse import EmrFuseForSegmentation
    from modeling_emrfuse.pipeline_emrfuse import load_pipeline
    from modeling_emrfuse.training.settings import TrainingSettings

    model, cases, _ = setup
    argv = ["--demo", "--eval_tta", "--eval_min_component_mm3", "30", "--eval_et_min_mm3", "40"]
    options = TrainingSettings.from_args(load_train_script().parse_args(argv)).evaluation.pipeline_options()
    assert options == {"tta": True, "min_component_mm3": 30.0, "et_min_mm3": 40.0}
    assert TrainingSettings.from_args(load_train_script().parse_args(["--demo"])).evaluation.pipeline_options() == {}
    with pytest.raises(SystemExit):
        load_train_script().parse_args(["--demo", "--eval_et_min_mm3", "-1"])
    rows, results = _held_out(EmrFuseForSegmentation, model, cases, "segmentation", monkeypatch, options)
    _, plain = _held_out(EmrFuseForSegmentation, model, cases, "segmentation", monkeypatch)
    pipe = load_pipeline(str(model), device="cpu", precision="fp32", optimize=False, grading_model=False)
    for case_id in ("Case_LPS", "Case_ARS"):
        folder = cases / case_id
        expected = pipe(str(folder), use_case_report=False, **options)
        held_out = results[case_id]
        assert held_out["tta"] and held_out["postprocessing"] == {"min_component_mm3": 30.0, "et_min_mm3": 40.0}
        assert np.array_equal(held_out["label_map"], expected["label_map"])
        assert not np.array_equal(held_out["label_map"], plain[case_id]["label_map"])
        reference = np.asanyarray(nib.load(str(folder / f"{case_id}_seg.nii.gz")).dataobj)
        scores = metrics_to_row(score_label_maps(expected["label_map"], reference, pred_convention="brats2020"))
        assert rows[case_id]["WT_dice"] == pytest.approx(scores["WT_dice"])
        assert rows[case_id]["ET_pred_voxels"] == scores["ET_pred_voxels"]
