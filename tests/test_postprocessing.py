"""Post-processing of the predicted regions as BraTS winners do it (small connected components removed, a small
enhancing tumour relabelled as core): known answers on small synthetic masks, the image processor's setting saved
and loaded, and the option in the one inference path (pipeline, ``emrfuse predict``), off by default."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import build_tiny_model_folder, write_small_case

from modeling_emrfuse.brats_labels import label_map_to_regions, regions_to_label_map
from modeling_emrfuse.processing_emrfuse import (
    POSTPROCESSING_DEFAULTS,
    EmrFuseImageProcessor,
    EmrFuseProcessor,
    check_postprocessing,
    postprocess_regions,
)

SHAPE = (20, 20, 12)


def _two_blobs():
    """Regions of a big blob (6 x 6 x 5 = 180 voxels: WT with a 4 x 4 x 3 core holding a 2 x 2 x 2 ET) and a small
    one (2 x 2 x 2 = 8 voxels: WT, TC and ET) far from it."""
    regions = np.zeros((3,) + SHAPE, dtype=bool)
    regions[0, 2:8, 2:8, 2:7] = True
    regions[1, 3:7, 3:7, 3:6] = True
    regions[2, 4:6, 4:6, 4:6] = True
    regions[:, 14:16, 14:16, 8:10] = True
    return regions


def test_small_component_goes_big_one_stays_with_its_core_and_et():
    regions = _two_blobs()
    out = postprocess_regions(regions, voxel_volume_mm3=1.0, min_component_mm3=50)
    assert out[:, 14:16, 14:16, 8:10].sum() == 0  # the 8 mm^3 blob and its TC / ET voxels are gone
    expected = regions.copy()
    expected[:, 14:16, 14:16, 8:10] = False
    assert np.array_equal(out, expected)  # the 180 mm^3 blob is untouched
    assert [int(m.sum()) for m in out] == [180, 48, 8]


def test_component_size_is_a_volume_in_mm3_and_the_bound_is_kept():
    regions = _two_blobs()
    # 2 mm isotropic voxels: the small blob is 8 voxels x 8 mm^3 = 64 mm^3 >= 50, so it stays
    assert np.array_equal(postprocess_regions(regions, 8.0, min_component_mm3=50), regions)
    # exactly at the bound stays (only components smaller than it go), one voxel more goes
    assert np.array_equal(postprocess_regions(regions, 1.0, min_component_mm3=8), regions)
    assert postprocess_regions(regions, 1.0, min_component_mm3=9)[0].sum() == 180


def test_components_touching_at_a_corner_are_one_component():
    """26-connectivity: two 2 x 2 x 2 cubes that share one corner voxel diagonally form one 16-voxel component."""
    regions = np.zeros((3,) + SHAPE, dtype=bool)
    regions[0, 2:4, 2:4, 2:4] = True
    regions[0, 4:6, 4:6, 4:6] = True  # touches the first only at the corner (3, 3, 3) -> (4, 4, 4)
    assert postprocess_regions(regions, 1.0, min_component_mm3=16)[0].sum() == 16
    assert postprocess_regions(regions, 1.0, min_component_mm3=17)[0].sum() == 0


def test_et_below_the_threshold_becomes_core_and_above_it_stays():
    regions = _two_blobs()
    regions[:, 14:16, 14:16, 8:10] = False  # one blob, 8 mm^3 of ET
    below = postprocess_regions(regions, 1.0, et_min_mm3=9)
    assert below[2].sum() == 0  # all ET relabelled ...
    assert np.array_equal(below[1], regions[1]) and np.array_equal(below[0], regions[0])  # ... as core: TC kept
    label_map = regions_to_label_map(below, "brats2017")
    assert set(np.unique(label_map)) == {0, 1, 2} and np.count_nonzero(label_map == 1) == 48
    assert np.array_equal(postprocess_regions(regions, 1.0, et_min_mm3=8), regions)  # 8 mm^3 is not below 8
    assert np.array_equal(postprocess_regions(regions, 0.5, et_min_mm3=8)[2], np.zeros(SHAPE, bool))  # 4 mm^3 is


def test_et_threshold_counts_the_et_left_after_removing_small_components():
    """The two steps in order: the small blob's 8 voxels of ET go with it, leaving 8 voxels of ET (< 10)."""
    out = postprocess_regions(_two_blobs(), 1.0, min_component_mm3=50, et_min_mm3=10)
    assert [int(m.sum()) for m in out] == [180, 48, 0]
    assert postprocess_regions(_two_blobs(), 1.0, et_min_mm3=10)[2].sum() == 16  # 16 voxels of ET without step 1


def test_nesting_is_restored_and_the_painted_label_map_is_unchanged_when_nothing_is_removed():
    rng = np.random.default_rng(0)
    regions = rng.random((3,) + SHAPE) > 0.6  # not nested: ET and TC voxels outside WT
    out = postprocess_regions(regions, 1.0, min_component_mm3=1, et_min_mm3=1)
    assert not (out[2] & ~out[1]).any() and not (out[1] & ~out[0]).any()
    assert np.array_equal(regions_to_label_map(out, "brats2017"), regions_to_label_map(regions, "brats2017"))
    out = postprocess_regions(regions, 1.0, min_component_mm3=20)
    assert not (out[2] & ~out[1]).any() and not (out[1] & ~out[0]).any()


def test_off_by_default_and_bad_settings_refused():
    regions = _two_blobs()
    assert np.array_equal(postprocess_regions(regions, 1.0), regions)
    assert check_postprocessing(None) == POSTPROCESSING_DEFAULTS == {"min_component_mm3": 0.0, "et_min_mm3": 0.0}
    assert check_postprocessing({"et_min_mm3": 5}, min_component_mm3=7, et_min_mm3=None) == {
        "min_component_mm3": 7.0,
        "et_min_mm3": 5.0,
    }
    for bad in ({"min_component_mm3": -1}, {"et_min_mm3": float("nan")}, {"et_min_mm3": "10"}, {"et_min": 3}):
        with pytest.raises(ValueError, match="postprocessing"):
            check_postprocessing(bad)
    with pytest.raises(ValueError, match="voxel_volume_mm3"):
        postprocess_regions(regions, 0.0, min_component_mm3=5)
    with pytest.raises(ValueError, match="channels"):
        postprocess_regions(regions[:2], 1.0, min_component_mm3=5)


def test_image_processor_saves_and_loads_the_setting(tmp_path):
    proc = EmrFuseImageProcessor(postprocessing={"min_component_mm3": 200, "et_min_mm3": 500})
    proc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["postprocessing"] == {"min_component_mm3": 200.0, "et_min_mm3": 500.0}
    loaded = EmrFuseImageProcessor.from_pretrained(tmp_path)
    assert loaded.postprocessing == {"min_component_mm3": 200.0, "et_min_mm3": 500.0}
    saved.pop("postprocessing")  # a folder saved before the setting existed: off
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    assert EmrFuseImageProcessor.from_pretrained(tmp_path).postprocessing == POSTPROCESSING_DEFAULTS
    with pytest.raises(ValueError, match="unknown setting"):
        EmrFuseImageProcessor(postprocessing={"holes_mm3": 3})


# ------------------------------------------------------------------------------------------ the inference path
@pytest.fixture(scope="module")
def folder_and_case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("postproc")
    model = build_tiny_model_folder(tmp / "model", with_grading=False)
    case = write_small_case(tmp / "cases", shape=(40, 40, 20), seed=3)
    return model, case


def _pipe(model):
    from modeling_emrfuse.pipeline_emrfuse import load_pipeline

    return load_pipeline(str(model), device="cpu", precision="fp32", optimize=False, grading_model=False)


def test_pipeline_options_post_process_the_label_map_and_its_volumes(folder_and_case):
    model, case = folder_and_case
    pipe = _pipe(model)
    plain = pipe(str(case), use_case_report=False)
    assert plain["postprocessing"] == POSTPROCESSING_DEFAULTS
    off = pipe(str(case), use_case_report=False, min_component_mm3=0, et_min_mm3=0)
    assert off["label_map"].tobytes() == plain["label_map"].tobytes()  # 0 = off: byte-identical
    regions = label_map_to_regions(plain["label_map"], "brats2020")
    assert regions[2].any() and regions[0].sum() > 200  # the random model predicts ET and a sizeable tumour
    for options in ({"min_component_mm3": 200}, {"et_min_mm3": 1e9}, {"min_component_mm3": 30, "et_min_mm3": 50}):
        out = pipe(str(case), use_case_report=False, **options)
        expected = regions_to_label_map(postprocess_regions(regions, 1.0, **options), "brats2017")
        assert np.array_equal(out["label_map"], expected), options
        assert out["postprocessing"] == check_postprocessing(options)
        volumes = {r: float(m.sum()) / 1000.0 for r, m in zip(("WT", "TC", "ET"), label_map_to_regions(expected, 2020))}
        assert out["region_volumes_cm3"] == pytest.approx(volumes)
    no_et = pipe(str(case), use_case_report=False, et_min_mm3=1e9)
    assert no_et["region_volumes_cm3"]["ET"] == 0.0
    assert no_et["region_volumes_cm3"]["TC"] == pytest.approx(plain["region_volumes_cm3"]["TC"])
    with pytest.raises(ValueError, match="min_component_mm3"):
        pipe(str(case), min_component_mm3=-5)


def test_model_folder_setting_is_the_default_and_a_call_overrides_it(folder_and_case, tmp_path):
    import shutil

    model, case = folder_and_case
    plain = _pipe(model)(str(case), use_case_report=False)["label_map"]
    carrying = tmp_path / "model"
    shutil.copytree(model, carrying)
    processor = EmrFuseProcessor.from_pretrained(carrying)  # how a folder is given the setting CV supported
    processor.image_processor.postprocessing = check_postprocessing({"et_min_mm3": 1e9})
    processor.save_pretrained(carrying)
    pipe = _pipe(carrying)
    out = pipe(str(case), use_case_report=False)
    assert out["postprocessing"]["et_min_mm3"] == 1e9 and not np.any(out["label_map"] == 4)
    assert np.array_equal(out["label_map"], np.where(plain == 4, 1, plain))
    assert pipe(str(case), use_case_report=False, et_min_mm3=0)["label_map"].tobytes() == plain.tobytes()


def test_emrfuse_predict_takes_the_options(folder_and_case, tmp_path, capsys):
    from modeling_emrfuse.commands.cli import main

    model, case = folder_and_case
    common = [str(case), "--model", str(model), "--precision", "fp32", "-q", "--no-grading"]
    assert main(["predict", *common, "-o", str(tmp_path / "plain")]) == 0
    argv = ["predict", *common, "-o", str(tmp_path / "pp"), "--min-component-mm3", "30", "--et-min-mm3", "1e9"]
    assert main(argv) == 0
    plain = np.asanyarray(nib.load(str(tmp_path / "plain" / "Case_001.nii.gz")).dataobj)
    done = np.asanyarray(nib.load(str(tmp_path / "pp" / "Case_001.nii.gz")).dataobj)
    expected = postprocess_regions(label_map_to_regions(plain, "brats2020"), 1.0, min_component_mm3=30, et_min_mm3=1e9)
    assert np.array_equal(done, regions_to_label_map(expected, "brats2017")) and not np.any(done == 4)
    record = json.loads((tmp_path / "pp" / "Case_001.json").read_text())
    assert record["postprocessing"] == {"min_component_mm3": 30.0, "et_min_mm3": 1e9}
    assert json.loads((tmp_path / "plain" / "Case_001.json").read_text())["postprocessing"] == POSTPROCESSING_DEFAULTS
    assert main(["predict", *common, "-o", str(tmp_path / "bad"), "--et-min-mm3", "-1"]) == 2
    assert "--et-min-mm3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    help_text = capsys.readouterr().out
    assert "--min-component-mm3" in help_text and "--et-min-mm3" in help_text
