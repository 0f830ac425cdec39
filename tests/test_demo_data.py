"""Tests of the demo-data writer (datasets_scripts/demo_data.py): layout, labels, reports, determinism."""

from __future__ import annotations

import csv
import re

import nibabel as nib
import numpy as np
import pytest

from datasets_scripts.demo_data import (
    DEMO_SIZES,
    NAME_MAPPING_COLUMNS,
    generate_case,
    write_demo_dataset,
)
from modeling_emrfuse.brats_labels import SEQUENCES

N_CASES = 6
FORBIDDEN = re.compile(
    r"\b(grade|graded|hgg|lgg|high-grade|low-grade|glioblastoma|glioma|astrocytoma|oligodendroglioma|"
    r"malignant|benign|who)\b",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_cases=N_CASES, size="small", seed=0, with_history=0.5)


def _grades(root):
    with (root / "name_mapping.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {r["BraTS_2020_subject_ID"]: r["Grade"] for r in rows}, rows


def test_layout_files_and_headers(demo_dir):
    grades, rows = _grades(demo_dir)
    with (demo_dir / "name_mapping.csv").open(newline="") as fh:
        assert tuple(next(csv.reader(fh))) == NAME_MAPPING_COLUMNS
    assert len(rows) == N_CASES
    assert sorted(grades.values()) == ["HGG"] * 3 + ["LGG"] * 3  # hgg_fraction=0.5
    case_dirs = sorted(p for p in demo_dir.iterdir() if p.is_dir())
    assert [p.name for p in case_dirs] == [f"BraTS20_Training_{i:03d}" for i in range(1, N_CASES + 1)]
    for case_dir in case_dirs:
        cid = case_dir.name
        names = sorted(p.name for p in case_dir.iterdir())
        expected = sorted([f"{cid}_{s}.nii.gz" for s in (*SEQUENCES, "seg")] + [f"{cid}_flair_text.txt"])
        assert names == expected
        for s in SEQUENCES:
            img = nib.load(case_dir / f"{cid}_{s}.nii.gz")
            assert img.shape == DEMO_SIZES["small"]
            assert img.get_data_dtype() == np.int16
            assert np.allclose(img.header.get_zooms(), 1.0)
            assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # as the real BraTS files
        seg = nib.load(case_dir / f"{cid}_seg.nii.gz")
        assert seg.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 4}


def test_discover_cases_reads_release_2020(demo_dir):
    from datasets_scripts.brats_layouts import discover_cases

    cases = discover_cases(demo_dir)
    grades, _ = _grades(demo_dir)
    assert len(cases) == N_CASES
    for case in cases:
        assert case.release == "2020"
        assert case.label_convention == "brats2017"
        assert case.grade == grades[case.case_id]
        assert set(case.sequences) == set(SEQUENCES)
        assert case.label is not None and case.label.exists()
        assert case.report_path is not None and case.report_path.name == f"{case.case_id}_flair_text.txt"


def test_tumour_model_by_grade():
    """High grade: necrosis/enhancing core with oedema; low grade: a mostly non-enhancing mass (label 1)."""
    for index in range(1, 5):
        hgg = generate_case(index, "HGG", size="small", seed=3)
        lgg = generate_case(index, "LGG", size="small", seed=3)
        for case in (hgg, lgg):
            vals = set(np.unique(case.label).tolist())
            assert vals <= {0, 1, 2, 4} and 2 in vals and vals & {1, 4}
            brain = case.images["t1"] > 0
            assert not (case.label > 0)[~brain].any()  # tumour only inside the brain
        hv, lv = hgg.findings["volumes"], lgg.findings["volumes"]
        assert hv["enhancing"] > 0.05 * hv["core"]
        assert lv["enhancing"] < 0.1 * lv["core"] and lv["ncr"] > 0.9 * (lv["core"] - lv["enhancing"])
        # the enhancing rim surrounds the NCR/NET centre: ET voxels lie farther from the core's centroid
        core = np.argwhere((hgg.label == 1) | (hgg.label == 4))
        mid = core.mean(axis=0)
        r_et = np.linalg.norm(np.argwhere(hgg.label == 4) - mid, axis=1).mean()
        r_ncr = np.linalg.norm(np.argwhere(hgg.label == 1) - mid, axis=1).mean()
        assert r_et > r_ncr
        # enhancement is bright on T1ce relative to the rest of the brain
        et = hgg.label == 4
        t1ce = hgg.images["t1ce"].astype(float)
        assert t1ce[et].mean() > 1.5 * t1ce[(hgg.label == 0) & (t1ce > 0)].mean()


def _cohort(n_per_grade, size=(32, 32, 24), seed=0):
    return [generate_case(i + 1, grade, size=size, seed=seed) for grade in ("HGG", "LGG") for i in range(n_per_grade)]


@pytest.fixture(scope="module")
def cohort():
    """120 cases of each grade on a tiny grid (reports and findings; about 25 ms a case)."""
    return _cohort(120)


def test_grades_depart_from_the_textbook_as_real_cohorts_do(cohort):
    """HGG without necrosis and LGG with enhancement or necrosis occur (the rates of the generator's constants)."""
    from datasets_scripts.demo_data import HGG_NO_NECROSIS_FRACTION, LGG_ENHANCING_FRACTION, LGG_NECROSIS_FRACTION

    hgg = [c for c in cohort if c.grade == "HGG"]
    lgg = [c for c in cohort if c.grade == "LGG"]
    assert all(c.findings["volumes"]["enhancing"] > 0 for c in hgg)
    no_necrosis = np.mean([c.findings["volumes"]["necrosis"] == 0 for c in hgg])
    lgg_et = np.mean([c.findings["volumes"]["enhancing"] > 0 for c in lgg])
    lgg_necrosis = np.mean([c.findings["volumes"]["necrosis"] > 0 for c in lgg])
    # binomial bounds (n = 120, about +-3.5 standard deviations); tiny small necroses may vanish on the grid
    assert HGG_NO_NECROSIS_FRACTION - 0.1 < no_necrosis < HGG_NO_NECROSIS_FRACTION + 0.2
    assert abs(lgg_et - LGG_ENHANCING_FRACTION) < 0.16
    assert abs(lgg_necrosis - LGG_NECROSIS_FRACTION) < 0.1
    # the enhancing label does not decide the grade: some LGG have it, so "no ET" is not "LGG"
    assert 0 < lgg_et < 1


def _fractions(case):
    """ET, NCR/NET and oedema fractions of the whole tumour, and its share of the brain, counted on the label map."""
    label = case.label
    wt = np.count_nonzero(label)
    brain = np.count_nonzero(case.images["t1"])
    return np.array([np.sum(label == 4) / wt, np.sum(label == 1) / wt, np.sum(label == 2) / wt, wt / brain])


def test_tumour_composition_follows_the_calibration_table(cohort):
    """Per grade, the medians of the generated fractions and volumes lie in the table's ranges, near its medians,
    and the enhancing fraction separates the grades as on the real label maps."""
    from datasets_scripts.demo_data import LGG_ENHANCING_FRACTION, REFERENCE_BRAIN_CM3, TUMOUR_COMPOSITION

    by_grade = {g: np.array([_fractions(c) for c in cohort if c.grade == g]) for g in ("HGG", "LGG")}
    for grade, values in by_grade.items():
        table = TUMOUR_COMPOSITION[grade]
        with_et = values[values[:, 0] > 0]
        assert len(with_et) >= 0.3 * len(values)
        medians = {
            "et_fraction": np.median(with_et[:, 0]),
            "ncr_net_fraction": np.median(values[:, 1]),
            "oedema_fraction": np.median(values[:, 2]),
            "wt_cm3": np.median(values[:, 3]) * REFERENCE_BRAIN_CM3,
        }
        for key, median in medians.items():
            mid, lo, hi = table[key]
            assert lo <= median <= hi, (grade, key, median)
            assert abs(np.log(median / mid)) < 0.25, (
                grade,
                key,
                median,
                mid,
            )  # within about 25 % of the table's median
        # every case within the ranges (two voxels of rounding on the 32 x 32 x 24 grid)
        slack = 2.0 / np.array([np.count_nonzero(c.label) for c in cohort if c.grade == grade])
        assert np.all(with_et[:, 0] <= table["et_fraction"][2] + slack[values[:, 0] > 0])
        assert np.all(values[:, 1] >= table["ncr_net_fraction"][1] - slack)
        assert np.all(values[:, 1] <= table["ncr_net_fraction"][2] + slack)
    hgg, lgg = by_grade["HGG"], by_grade["LGG"]
    assert np.all(hgg[:, 0] > 0)
    assert abs(np.mean(lgg[:, 0] > 0) - LGG_ENHANCING_FRACTION) < 0.16
    assert hgg[:, 0].min() > lgg[:, 0].max()  # ET fraction alone separates the grades
    assert np.median(lgg[:, 1]) > 2 * np.median(hgg[:, 1])  # NCR/NET: 46 % vs 10 %
    assert np.median(lgg[:, 3]) > 1.5 * np.median(hgg[:, 3])  # WT volume: 201 vs 91 cm^3


def test_report_readings_do_not_follow_the_size(cohort):
    """The size differs by grade; what the report reads of the tumour (oedema reach, ventricles) does not."""
    for key in ("oedema_reach", "ventricle_ratio"):
        h = np.median([c.findings[key] for c in cohort if c.grade == "HGG"])
        lo = np.median([c.findings[key] for c in cohort if c.grade == "LGG"])
        assert abs(np.log(h / lo)) < 0.15, (key, h, lo)
    n_lobes = {g: np.mean([len(c.findings["lesion_lobes"]) for c in cohort if c.grade == g]) for g in ("HGG", "LGG")}
    assert abs(n_lobes["HGG"] - n_lobes["LGG"]) < 0.3, n_lobes


def test_report_writer_never_sees_the_grade_or_the_enhancement(cohort):
    """The writer reads findings without a grade; reports describe FLAIR (no contrast sentence) like TextBraTS."""
    for case in cohort:
        assert "grade" not in case.findings
        assert FORBIDDEN.search(case.report) is None
        assert re.search(r"enhanc|contrast", case.report, re.IGNORECASE) is None
        assert [s.split()[0] for s in case.report.split(". ")] == ["The", "Edema", "Necrosis", "Ventricular"]
    # the same tumour findings always read the same way from the same stream, and differently from another
    from datasets_scripts.demo_data import _write_report

    f = cohort[0].findings
    assert _write_report(f, np.random.default_rng(5)) == _write_report(dict(f), np.random.default_rng(5))
    assert len({_write_report(f, np.random.default_rng(k)) for k in range(20)}) > 10


def _bench():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_text_grading.py"
    spec = importlib.util.spec_from_file_location("bench_text_grading", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_text_grading", module)
    spec.loader.exec_module(module)
    return module


def test_no_single_phrase_separates_the_grades(cohort):
    """The phrase rule of bench_text_grading (Fisher exact test per word 1-3-gram, Bonferroni, alpha 0.01)."""
    bench = _bench()
    texts = [c.report for c in cohort]
    labels = [int(c.grade == "LGG") for c in cohort]
    result = bench._phrase_rule(
        texts, labels, bench.PHRASE_NGRAMS, bench.PHRASE_MIN_REPORTS, bench.PHRASE_ALPHA, return_phrases=True
    )
    assert result["n_phrases"] > 200
    assert result["n_flagged"] == 0, result["flagged"][:5]
    # the rule has power: one sentence tied to the grade in a third of the reports is caught
    rng = np.random.default_rng(0)
    leaky = [
        t + (" A ring of enhancement is seen." if lab == 0 and rng.random() < 0.33 else "")
        for t, lab in zip(texts, labels)
    ]
    flagged = bench._phrase_rule(
        leaky, labels, bench.PHRASE_NGRAMS, bench.PHRASE_MIN_REPORTS, bench.PHRASE_ALPHA, return_phrases=True
    )["flagged"]
    assert "ring of enhancement" in {f[0] for f in flagged}


def _hemisphere_from_files(seg_img):
    """Independent check: which side of the brain's centre the tumour lies on, in world (RAS) x."""
    seg = np.asarray(seg_img.dataobj)
    tumour = np.argwhere(seg > 0).mean(axis=0)
    # world x of the tumour centroid vs world x of the grid centre line
    centre = (np.array(seg.shape) - 1) / 2.0
    wx_t = (seg_img.affine @ np.r_[tumour, 1.0])[0]
    wx_c = (seg_img.affine @ np.r_[centre, 1.0])[0]
    return "right" if wx_t > wx_c else "left"  # RAS: +x is the patient's right


def test_reports_mention_the_right_hemisphere_and_never_the_grade(demo_dir):
    for case_dir in sorted(p for p in demo_dir.iterdir() if p.is_dir()):
        cid = case_dir.name
        text = (case_dir / f"{cid}_flair_text.txt").read_text()
        assert FORBIDDEN.search(text) is None, f"{cid}: report states a grade/diagnosis"
        side = _hemisphere_from_files(nib.load(case_dir / f"{cid}_seg.nii.gz"))
        other = "left" if side == "right" else "right"
        lesion_sentence = next(s for s in text.split(". ") if s.startswith("The lesion area"))
        assert side in lesion_sentence and other not in lesion_sentence, f"{cid}: wrong hemisphere"
        for word in ("Edema", "Necrosis", "Ventricular compression"):
            assert word in text


def test_history_line_optional():
    with_h = generate_case(1, "LGG", size="small", seed=0, with_history=True).report
    without = generate_case(1, "LGG", size="small", seed=0, with_history=False).report
    assert re.match(r"^(Clinical history|History|Clinical information): \d+-year-old", with_h)
    assert without.startswith("The lesion area")
    assert with_h.endswith(without)


def test_deterministic_by_seed(tmp_path):
    a = write_demo_dataset(tmp_path / "a", n_cases=2, seed=5)
    b = write_demo_dataset(tmp_path / "b", n_cases=2, seed=5)
    c = write_demo_dataset(tmp_path / "c", n_cases=2, seed=6)
    for cid in ("BraTS20_Training_001", "BraTS20_Training_002"):
        for suffix in (*SEQUENCES, "seg"):
            va = np.asarray(nib.load(a / cid / f"{cid}_{suffix}.nii.gz").dataobj)
            vb = np.asarray(nib.load(b / cid / f"{cid}_{suffix}.nii.gz").dataobj)
            vc = np.asarray(nib.load(c / cid / f"{cid}_{suffix}.nii.gz").dataobj)
            assert np.array_equal(va, vb)
            assert not np.array_equal(va, vc)
        assert (a / cid / f"{cid}_flair_text.txt").read_text() == (b / cid / f"{cid}_flair_text.txt").read_text()
    assert (a / "name_mapping.csv").read_text() == (b / "name_mapping.csv").read_text()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="demo size"):
        write_demo_dataset(tmp_path, n_cases=1, size="huge")
    with pytest.raises(ValueError, match="n_cases"):
        write_demo_dataset(tmp_path, n_cases=0)
    with pytest.raises(ValueError, match="grade"):
        generate_case(1, "GBM")


def test_cli_writes_cases(tmp_path):
    from modeling_emrfuse.commands.cli import main

    assert main(["demo-data", str(tmp_path / "cli"), "--n-cases", "2", "--size", "small", "--seed", "1"]) == 0
    assert (tmp_path / "cli" / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz").exists()
    _, rows = _grades(tmp_path / "cli")
    assert len(rows) == 2
