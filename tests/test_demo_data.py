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
    """High grade: necrosis/enhancing core with oedema; low grade: (almost) no enhancement, no necrosis."""
    for index in range(1, 7):
        hgg = generate_case(index, "HGG", size="small", seed=3)
        lgg = generate_case(index, "LGG", size="small", seed=3)
        for case in (hgg, lgg):
            vals = set(np.unique(case.label).tolist())
            assert vals <= {0, 1, 2, 4} and 2 in vals and vals & {1, 4}
            brain = case.images["t1"] > 0
            assert not (case.label > 0)[~brain].any()  # tumour only inside the brain
        hv, lv = hgg.findings["volumes"], lgg.findings["volumes"]
        assert hv["enhancing"] > 0.15 * hv["core"]
        assert lv["enhancing"] < 0.1 * lv["core"]
        assert lv["necrosis"] == 0
        # enhancement is bright on T1ce relative to the rest of the brain
        et = hgg.label == 4
        t1ce = hgg.images["t1ce"].astype(float)
        assert t1ce[et].mean() > 1.5 * t1ce[(hgg.label == 0) & (t1ce > 0)].mean()


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
    from modeling_emrfuse.cli import main

    assert main(["demo-data", str(tmp_path / "cli"), "--n-cases", "2", "--size", "small", "--seed", "1"]) == 0
    assert (tmp_path / "cli" / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz").exists()
    _, rows = _grades(tmp_path / "cli")
    assert len(rows) == 2
