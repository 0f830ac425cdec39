"""``bench/real_rescore.py``: the variants' statistics on fake rows (known paired differences, ET-absent outcomes, the
best post-processing), and the re-scoring of a saved fold model end to end on two tiny synthetic cases: every
variant's row is the score of the pipeline's own output with those options, and a rerun calls no model."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import build_tiny_model_folder, write_small_case

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """A bench script as a module (bench/ on the path, as when bench_real.py runs as a script)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    return importlib.import_module(name)


rescore_mod = _load("real_rescore")
Variant = rescore_mod.Variant


# ------------------------------------------------------------------------------------------ fake rows
def _row(case_id, variant, dice, hd95, et_ref, et_pred):
    row = {"case_id": case_id, "variant": variant, "fold": 0, "recipe": "image"}
    for region, d in zip(("WT", "TC", "ET"), dice):
        row[f"{region}_dice"] = d
        row[f"{region}_hd95"] = hd95
    row["ET_ref_voxels"], row["ET_pred_voxels"] = et_ref, et_pred
    return row


def _fake_rows():
    """Four cases (c3, c4 without ET in the reference). tta adds 0.02 Dice to every case and region and takes 1 mm
    off HD95; cc200 adds 0.05 to WT only; et200 clears the ET predicted in c3 and c4 (their ET Dice 0 -> 1)."""
    plain = {"c1": (0.8, 0.7, 0.6), "c2": (0.6, 0.5, 0.4), "c3": (0.7, 0.6, 0.0), "c4": (0.9, 0.8, 0.0)}
    et_ref = {"c1": 100, "c2": 50, "c3": 0, "c4": 0}
    et_pred = {"c1": 120, "c2": 40, "c3": 10, "c4": 5}
    rows = []
    for c, d in plain.items():
        rows.append(_row(c, "plain", d, 10.0, et_ref[c], et_pred[c]))
        rows.append(_row(c, "tta", tuple(v + 0.02 for v in d), 9.0, et_ref[c], et_pred[c]))
        rows.append(_row(c, "cc200", (d[0] + 0.05, d[1], d[2]), 10.0, et_ref[c], et_pred[c]))
        cleared = et_ref[c] == 0
        rows.append(
            _row(c, "et200", (d[0], d[1], 1.0 if cleared else d[2]), 10.0, et_ref[c], 0 if cleared else et_pred[c])
        )
    return rows


VARIANTS = [
    Variant("plain"),
    Variant("tta", tta=True),
    Variant("cc200", min_component_mm3=200),
    Variant("et200", et_min_mm3=200),
]


def test_paired_differences_against_plain_have_the_known_means():
    paired = rescore_mod.paired_vs_plain(_fake_rows(), VARIANTS)
    assert set(paired) == {"tta", "cc200", "et200"}
    tta = paired["tta"]
    for region in ("WT", "TC", "ET"):
        assert tta[f"{region}_dice"]["mean"] == pytest.approx(0.02)
        assert tta[f"{region}_dice"]["ci95_low"] == pytest.approx(0.02) and tta[f"{region}_dice"]["excludes_zero"]
        assert tta[f"{region}_hd95"]["mean"] == pytest.approx(-1.0) and tta[f"{region}_hd95"]["n_cases"] == 4
    assert paired["cc200"]["WT_dice"]["mean"] == pytest.approx(0.05)
    assert paired["cc200"]["TC_dice"]["mean"] == pytest.approx(0.0) and not paired["cc200"]["TC_dice"]["excludes_zero"]
    et = paired["et200"]["ET_dice"]  # two of four cases gain 1.0
    assert et["mean"] == pytest.approx(0.5) and et["ci95_low"] >= 0.0 and et["ci95_high"] == pytest.approx(1.0)


def test_means_et_outcomes_and_the_best_postprocessing():
    rows = _fake_rows()
    means = rescore_mod.summarise_variants(rows, VARIANTS)
    assert means["plain"]["n"] == 4 and means["plain"]["WT_dice"]["mean"] == pytest.approx(0.75)
    assert means["tta"]["ET_dice"]["mean"] == pytest.approx(0.27)
    et = rescore_mod.et_outcomes(rows, VARIANTS)
    assert et["plain"]["absent_cases"] == 2 and et["plain"]["absent_with_et_predicted"] == 2
    assert et["et200"]["absent_with_et_predicted"] == 0 and et["et200"]["present_with_no_et_predicted"] == 0
    assert et["plain"]["present_et_dice"] == pytest.approx(0.5)
    # et200 gains 0.5 / 3 of mean Dice, cc200 0.05 / 3: et200 is the best post-processing
    assert rescore_mod.best_variant(rows, VARIANTS[2:]).name == "et200"
    combined = rescore_mod.combined_variant(rows, VARIANTS)
    assert combined == Variant("cc200+et200", min_component_mm3=200.0, et_min_mm3=200.0)
    flips = rescore_mod.flips_with_best(rows, VARIANTS)
    assert flips == Variant("tta+et200", tta=True, et_min_mm3=200.0) and flips.source == "tta"
    part, text = rescore_mod.analyse(rows, VARIANTS, "image")
    assert "| tta | flips | 4 |" in text and "+0.020 [+0.020, +0.020]*" in text
    assert "| et200 | 0/2 | 0/2 | 0.500 |" in text and "| plain | 2/2 | 0/2 | 0.500 |" in text
    json.dumps(rescore_mod._finite(part), allow_nan=False)


def test_apply_variant_is_the_pipelines_post_processing():
    label_map = np.zeros((12, 12, 8), np.uint8)
    label_map[1:6, 1:6, 1:6] = 2
    label_map[2:4, 2:4, 2:4] = 4
    label_map[9:11, 9:11, 6:8] = 1  # an 8-voxel speck
    cc = rescore_mod.apply_variant(label_map, "brats2017", 1.0, Variant("cc10", min_component_mm3=10))
    assert np.count_nonzero(cc[9:, 9:, 6:]) == 0 and np.array_equal(cc[:8], label_map[:8])
    et = rescore_mod.apply_variant(label_map, "brats2017", 1.0, Variant("et9", et_min_mm3=9))
    assert not np.any(et == 4) and np.count_nonzero(et == 1) == 16
    assert rescore_mod.apply_variant(label_map, "brats2017", 1.0, Variant("tta", tta=True)) is label_map


# ------------------------------------------------------------------------------------------ end to end
def _write_labelled_case(root: Path, case_id: str, with_et: bool, seed: int) -> Path:
    folder = write_small_case(root, shape=(40, 40, 20), seed=seed, case_id=case_id)
    ref = nib.load(str(folder / f"{case_id}_flair.nii.gz"))
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in ref.shape], indexing="ij")
    seg = np.where((x - 0.2) ** 2 + y**2 + z**2 < 0.2, 2, 0)
    seg[(x - 0.2) ** 2 + y**2 + z**2 < 0.06] = 4 if with_et else 1
    nib.save(nib.Nifti1Image(seg.astype(np.uint8), ref.affine), folder / f"{case_id}_seg.nii.gz")
    return folder


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rescore")
    data = tmp / "data"
    _write_labelled_case(data / "cohort", "Case_A", with_et=False, seed=1)  # the random model predicts ET here
    _write_labelled_case(data / "cohort", "Case_B", with_et=True, seed=2)
    out = tmp / "out"
    build_tiny_model_folder(out / "runs" / "cv-fold0-image", with_grading=False, with_pipeline=False)
    (out / "runs" / "cv-fold0-split.json").write_text(json.dumps({"train": [], "test": ["Case_A", "Case_B"]}))
    argv = ["--output_dir", str(out), "--data", str(data), "--components", "30", "--et_thresholds", "1e9"]
    result = rescore_mod.main(argv + ["--threads", "1"])
    return data, out, argv, result


def test_rescore_rows_are_the_pipelines_scores_with_each_variants_options(bench_dir):
    from modeling_emrfuse.brats_io import discover_cases
    from modeling_emrfuse.pipeline_emrfuse import load_pipeline

    data, out, _, result = bench_dir
    part = result["recipes"]["image"]
    names = [v["name"] for v in part["variants"]]
    assert names[:4] == ["plain", "tta", "cc30", "et1e+09"]
    assert names[4] == "cc30+et1e+09" and names[5].startswith("tta+")
    rows = {(r["case_id"], r["variant"]): r for r in part["rows"]}
    assert len(rows) == 2 * len(names)
    pipe = load_pipeline(
        str(out / "runs" / "cv-fold0-image"), precision="fp32", optimize=False, channels_last=False, grading_model=False
    )
    checks = {"plain": {}, "tta": {"tta": True}, "cc30": {"min_component_mm3": 30}, "et1e+09": {"et_min_mm3": 1e9}}
    checks[names[5]] = {"tta": True, **{k: v for k, v in part["variants"][5].items() if k.endswith("mm3")}}
    for case in discover_cases(data / "cohort"):
        ref = nib.load(str(case.label))
        for name, options in checks.items():
            result_ = pipe(case, use_case_report=False, label_convention=case.label_convention, **options)
            expected = rescore_mod.score_row(
                result_["label_map"], result_["label_convention"], np.asanyarray(ref.dataobj), (1.0, 1.0, 1.0)
            )
            got = rows[(case.case_id, name)]
            for key in ("WT_dice", "TC_dice", "ET_dice", "WT_hd95", "ET_pred_voxels"):
                assert got[key] == pytest.approx(expected[key]), (case.case_id, name, key)
    assert part["et"]["plain"]["absent_cases_ids"] == ["Case_A"]
    assert part["et"]["plain"]["absent_with_et_predicted"] == 1 and rows[("Case_A", "plain")]["ET_dice"] == 0.0
    assert part["et"]["et1e+09"]["absent_with_et_predicted"] == 0 and rows[("Case_A", "et1e+09")]["ET_dice"] == 1.0
    assert part["et"]["et1e+09"]["present_with_no_et_predicted"] == 1
    text = (out / "rescore.md").read_text()
    assert "| plain | 1/1 |" in text and "| et1e+09 | 0/1 | 1/1 |" in text and text in (out / "results.md").read_text()
    assert json.loads((out / "rescore.json").read_text())["recipes"]["image"]["variants"] == part["variants"]


def test_a_rerun_reads_every_result_from_the_cache(bench_dir, monkeypatch, capsys):
    import modeling_emrfuse.pipeline_emrfuse as pipeline_module

    _, out, argv, result = bench_dir

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded again")

    monkeypatch.setattr(pipeline_module, "load_pipeline", no_model)
    again = rescore_mod.main(argv)
    assert again["recipes"]["image"]["rows"] == result["recipes"]["image"]["rows"]
    assert "case 2/2 Case_B: all variants cached" in capsys.readouterr().out


def test_results_md_keeps_one_copy_of_the_section(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("# EmrFuse on real BraTS cases\n\nintro\n")
    rescore_mod.append_section(path, "## Inference-time levers\n\nfirst\n")
    rescore_mod.append_section(path, "## Inference-time levers\n\nsecond\n")
    assert path.read_text() == "# EmrFuse on real BraTS cases\n\nintro\n\n## Inference-time levers\n\nsecond\n"
    path.write_text(path.read_text() + "\n## Final model\n\nkept\n")
    rescore_mod.append_section(path, "## Inference-time levers\n\nthird\n")
    assert path.read_text() == (
        "# EmrFuse on real BraTS cases\n\nintro\n\n## Final model\n\nkept\n\n## Inference-time levers\n\nthird\n"
    )
