"""The BraTS + report dataset builder: layouts, reports, splits, bad input, real cases, CLI.

Fixtures are tiny (8 x 8 x 6) cases written by ``brats_fixtures``; the real cases in
``../shared/realdata`` are arranged by symlinks into each release's naming (skipped when absent).
Report text is never printed: assertions compare lengths/hashes or fake texts only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from brats_fixtures import (
    SHAPE,
    fake_report,
    label_map,
    volume,
    write_2020_release,
    write_case_2015,
    write_case_2017,
    write_case_2020,
    write_case_2021,
    write_case_2023,
    write_name_mapping,
    write_nifti,
    write_reports_csv,
    write_reports_jsonl,
)

from datasets_scripts.brats_layouts import (
    CaseFiles,
    discover_cases,
    patient_id_for,
    read_header,
    read_volume,
    to_nifti_image,
)
from datasets_scripts.brats_text import (
    SPACING_NOTE,
    BratsTextBuilder,
    check_case,
    format_summary,
    load_brats_text,
    make_splits,
    read_reports,
    read_split_file,
)

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"

try:
    import SimpleITK  # noqa: F401

    HAVE_SITK = True
except ImportError:  # pragma: no cover
    HAVE_SITK = False
needs_sitk = pytest.mark.skipif(not HAVE_SITK, reason="SimpleITK (the emrfuse[mha] extra) is not installed")


def load(data_dir, tmp_path, **kwargs):
    kwargs.setdefault("cache_dir", tmp_path / "hf_cache")
    return load_brats_text(data_dir, **kwargs)


def grades_2020(n=10, lgg_every=3, prefix="BraTS20_Training_"):
    return {f"{prefix}{i:03d}": ("LGG" if i % lgg_every == 0 else "HGG") for i in range(1, n + 1)}


def array_of(img) -> np.ndarray:
    return np.asarray(img.dataobj)


# =============================================================================================
# layouts
# =============================================================================================
@needs_sitk
def test_layout_2015_metaimage(tmp_path):
    root = tmp_path / "BRATS2015_Training"
    write_case_2015(root, "brats_2013_pat0001_1", "HGG", seed=1)
    write_case_2015(root, "brats_tcia_pat101_0001", "LGG", seed=2, first_id=2000)
    cases = discover_cases(root)
    assert cases.release == "2015"
    assert [(c.case_id, c.grade, c.label_convention) for c in cases] == [
        ("brats_2013_pat0001_1", "HGG", "brats2015"),
        ("brats_tcia_pat101_0001", "LGG", "brats2015"),
    ]
    case = cases[0]
    assert set(case.sequences) == {"t1", "t1ce", "t2", "flair"}
    assert case.sequences["t1ce"].parent.name.startswith("VSD.Brain.XX.O.MR_T1c.")
    assert case.label.parent.name.startswith("VSD.Brain_3more.XX.O.OT.")

    # same (X, Y, Z) array, spacing and affine as nibabel gives for the same data in NIfTI
    arr, affine, spacing = read_volume(case.sequences["t1"])
    assert arr.shape == SHAPE and np.array_equal(arr, volume(10))
    nii = write_nifti(tmp_path / "same.nii.gz", volume(10))
    arr2, affine2, spacing2 = read_volume(nii)
    assert np.array_equal(arr, arr2) and spacing == spacing2 == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(affine, affine2)
    assert read_header(case.sequences["t1"])[0] == SHAPE
    assert np.array_equal(np.asarray(to_nifti_image(case.sequences["t1"]).dataobj), volume(10))

    dsd = load(root, tmp_path, splits="none")
    ds = dsd["train"]
    assert ds[0]["release"] == "2015" and ds[0]["label_convention"] == "brats2015"
    # converted to NIfTI on the fly (datasets.Nifti decodes NIfTI only)
    assert np.array_equal(array_of(ds[0]["t1"]), volume(10))
    assert set(np.unique(array_of(ds[0]["seg"]))) == {0, 1, 2, 3, 4}
    assert ds.features["grade"].int2str(ds[1]["grade"]) == "LGG"


def test_metaimage_without_simpleitk_says_how_to_install(tmp_path, monkeypatch):
    fake = tmp_path / "x.mha"
    fake.write_text("ObjectType = Image\n")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    with pytest.raises(ImportError, match=r'pip install "emrfuse\[mha\]"'):
        read_volume(fake)


@pytest.mark.parametrize(
    "prefix,release", [("Brats17_", "2017"), ("Brats18_", "2018"), ("BraTS19_", "2019"), ("", "2018")]
)
def test_layout_2017_2019(tmp_path, prefix, release):
    root = tmp_path / "MICCAI_BraTS_Training"
    write_case_2017(root, f"{prefix}CBICA_AAA_1", "HGG", seed=1)
    write_case_2017(root, f"{prefix}TCIA10_BBB_1", "LGG", seed=2, labeled=False)
    cases = discover_cases(root)
    assert cases.release == release
    by_id = {c.case_id: c for c in cases}
    hgg, lgg = by_id[f"{prefix}CBICA_AAA_1"], by_id[f"{prefix}TCIA10_BBB_1"]
    assert (hgg.grade, lgg.grade) == ("HGG", "LGG")
    assert hgg.label.name.endswith("_seg.nii.gz") and lgg.label is None
    assert hgg.label_convention == "brats2017"
    assert list(hgg.sequences) == ["t1", "t1ce", "t2", "flair"]
    assert hgg.sequences["t1ce"].name == f"{prefix}CBICA_AAA_1_t1ce.nii.gz"


def test_layout_2020_mapping_nii_and_odd_label_name(tmp_path):
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    write_case_2020(root, "BraTS20_Training_001", seed=1)  # .nii.gz
    write_case_2020(root, "BraTS20_Training_002", seed=2, ext=".nii")  # uncompressed
    # the known odd case: its label map is called W39_1998.09.19_Segm.nii
    write_case_2020(root, "BraTS20_Training_355", seed=3, ext=".nii", label_name="W39_1998.09.19_Segm.nii")
    write_case_2020(root, "BraTS20_Training_356", seed=4)  # not in name_mapping.csv
    write_name_mapping(
        root, {"BraTS20_Training_001": "HGG", "BraTS20_Training_002": "LGG", "BraTS20_Training_355": "HGG"}
    )
    cases = discover_cases(root)
    assert cases.release == "2020"
    by_id = {c.case_id: c for c in cases}
    assert [by_id[i].grade for i in sorted(by_id)] == ["HGG", "LGG", "HGG", None]
    assert by_id["BraTS20_Training_002"].sequences["flair"].name.endswith("_flair.nii")
    assert by_id["BraTS20_Training_355"].label.name == "W39_1998.09.19_Segm.nii"
    notes = dict(cases.warnings)
    assert "non-standard name" in notes["BraTS20_Training_355"]
    assert "grade unknown" in notes["BraTS20_Training_356"]
    dsd = load(root, tmp_path, splits="none")
    rows = {r["case_id"]: r for r in dsd["train"]}
    assert rows["BraTS20_Training_355"]["has_label"]
    assert np.array_equal(array_of(rows["BraTS20_Training_355"]["seg"]), label_map("brats2017"))
    assert rows["BraTS20_Training_356"]["grade"] == -1  # unknown grade


def test_unknown_grade_folder_stray_files_and_non_case_folders(tmp_path):
    root = tmp_path / "Testing"
    write_case_2017(root, "brats_2013_pat0103_1", "HGG_LGG", labeled=False)  # BraTS 2015 test-set folder name
    write_case_2017(root, "Brats18_CBICA_AAA_1", "HGG")
    case_dir = root / "HGG" / "Brats18_CBICA_AAA_1"
    write_nifti(case_dir / "Brats18_CBICA_AAA_1_brainmask.nii.gz", volume(5))  # unrecognised: ignored, noted
    (root / "HGG" / "docs").mkdir()  # a folder without volumes: not a case
    cases = discover_cases(root)
    assert [(c.case_id, c.grade) for c in cases] == [("Brats18_CBICA_AAA_1", "HGG"), ("brats_2013_pat0103_1", None)]
    notes = [m for _, m in cases.warnings]
    assert any("brainmask" in m for m in notes) and any("not a case folder" in m for m in notes)
    # a stray volume next to flat case folders does not turn the folder into one case
    flat = tmp_path / "flat"
    write_case_2021(flat, "BraTS2021_00001")
    write_nifti(flat / "atlas_t1.nii.gz", volume(6))
    assert [c.case_id for c in discover_cases(flat)] == ["BraTS2021_00001"]


def test_layout_2021_has_no_grade(tmp_path):
    root = tmp_path / "RSNA_ASNR_MICCAI_BraTS2021_TrainingData"
    for i in range(3):
        write_case_2021(root, f"BraTS2021_{i:05d}", seed=i)
    cases = discover_cases(root)
    assert cases.release == "2021"
    assert all(c.grade is None and c.label_convention == "brats2017" for c in cases)


def test_layout_2023_labels_and_patients(tmp_path):
    root = tmp_path / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
    write_case_2023(root, "BraTS-GLI-00001-000", seed=1)
    write_case_2023(root, "BraTS-GLI-00001-001", seed=2)
    write_case_2023(root, "BraTS-GLI-00002-000", seed=3, labeled=False)
    cases = discover_cases(root)
    assert cases.release == "2023"
    assert {c.label_convention for c in cases} == {"brats2023"}
    assert cases[0].sequences["t1"].name == "BraTS-GLI-00001-000-t1n.nii.gz"
    assert cases[0].sequences["flair"].name == "BraTS-GLI-00001-000-t2f.nii.gz"
    assert [c.patient_id for c in cases] == ["BraTS-GLI-00001", "BraTS-GLI-00001", "BraTS-GLI-00002"]
    assert patient_id_for("BraTS20_Training_001") == "BraTS20_Training_001"
    ds = load(root, tmp_path, splits="none")["train"]
    assert set(np.unique(array_of(ds[0]["seg"]))) == {0, 1, 2, 3}
    assert ds[2]["seg"] is None and not ds[2]["has_label"]


def test_forced_release_and_unknown_release(tmp_path):
    root = tmp_path / "data"
    write_case_2017(root, "Case_A", "HGG")
    assert discover_cases(root, release="2019").release == "2019"
    assert discover_cases(root, release="BraTS2017").release == "2017"
    with pytest.raises(ValueError, match="Unknown BraTS release '2016'"):
        discover_cases(root, release="2016")
    # forcing the 2023 convention on 2017 labels (value 4) is caught by the label check
    with pytest.raises(ValueError, match=r"Case_A.*\[4\].*brats2023"):
        load(root, tmp_path, release="2023", splits="none")


def test_mixed_layouts_are_an_error(tmp_path):
    root = tmp_path / "mixed"
    write_case_2020(root, "BraTS20_Training_001")
    write_case_2023(root, "BraTS-GLI-00001-000")
    with pytest.raises(ValueError, match="mixed"):
        discover_cases(root)


def test_single_case_folder_and_missing_folder(tmp_path):
    case_dir = write_case_2023(tmp_path / "x", "BraTS-GLI-00005-000")
    cases = discover_cases(case_dir)
    assert len(cases) == 1 and cases[0].case_id == "BraTS-GLI-00005-000"
    with pytest.raises(ValueError, match="not found"):
        discover_cases(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no BraTS case"):
        discover_cases(tmp_path / "empty")


def test_builder_instantiated_directly_streams_paths_and_caches(tmp_path):
    root = tmp_path / "b20"
    write_2020_release(root, grades_2020(6))
    builder = BratsTextBuilder(data_dir=str(root), splits="none", cache_dir=str(tmp_path / "cache"))
    builder.download_and_prepare()
    ds = builder.as_dataset()["train"]
    assert len(ds) == 6
    assert set(ds.features) >= {"case_id", "release", "label_convention", "grade", "report", "has_report",
                                "t1", "t1ce", "t2", "flair", "seg", "spacing"}  # fmt: skip
    assert isinstance(ds.features["t1"], datasets.Nifti)
    assert ds.features["grade"].names == ["HGG", "LGG"]
    assert builder.DEFAULT_WRITER_BATCH_SIZE <= 8
    # NIfTI volumes are stored as paths (the examples stay small), decoded lazily
    raw = ds.cast_column("flair", datasets.Nifti(decode=False))[0]["flair"]
    assert raw["bytes"] is None and Path(raw["path"]).is_file()
    assert ds[0]["t1"].shape == SHAPE and ds[0]["spacing"] == [1.0, 1.0, 1.0] and ds[0]["shape"] == list(SHAPE)
    assert builder.summary["release"] == "2020"

    # unchanged input: reused; a new case: rebuilt (the cache key includes an input fingerprint)
    again = load(root, tmp_path, splits="none", cache_dir=tmp_path / "cache")
    assert len(again["train"]) == 6
    write_case_2020(root, "BraTS20_Training_099", seed=99)
    assert len(load(root, tmp_path, splits="none", cache_dir=tmp_path / "cache")["train"]) == 7


# =============================================================================================
# reports
# =============================================================================================
def test_reports_from_case_files(tmp_path):
    root = tmp_path / "b20"
    grades = grades_2020(4)
    write_2020_release(root, grades)
    (root / "BraTS20_Training_004" / "BraTS20_Training_004_flair_text.txt").unlink()
    dsd, summary = load(root, tmp_path, splits="none", return_summary=True)
    rows = {r["case_id"]: r for r in dsd["train"]}
    assert rows["BraTS20_Training_001"]["report"] == fake_report("BraTS20_Training_001")
    assert rows["BraTS20_Training_001"]["has_report"]
    assert rows["BraTS20_Training_004"]["report"] == "" and not rows["BraTS20_Training_004"]["has_report"]
    assert summary["reports"]["from_case_files"] == 3
    assert summary["reports"]["cases_without_report"] == ["BraTS20_Training_004"]
    assert summary["splits"]["train"]["with_report"] == 3


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_reports_file_overrides_and_orphans(tmp_path, fmt):
    root = tmp_path / "b18"
    for i, grade in enumerate(["HGG", "HGG", "LGG"]):
        write_case_2017(root, f"Brats18_X_{i}", grade, seed=i, report=fake_report(f"old {i}"))
    texts = {
        "Brats18_X_0": "alpha report text",
        "Brats18_X_1": "beta, with a comma\nand a new line",
        "Brats18_GHOST": "orphan",
    }
    if fmt == "jsonl":
        path = write_reports_jsonl(tmp_path / "reports.jsonl", texts)
    else:
        path = write_reports_csv(tmp_path / "reports.csv", texts, id_key="ID", text_key="Report Text")
    assert read_reports(path) == texts
    with pytest.warns(UserWarning, match=r"1 report\(s\).*match no case.*Brats18_GHOST"):
        dsd, summary = load(root, tmp_path, reports=path, splits="none", return_summary=True)
    rows = {r["case_id"]: r for r in dsd["train"]}
    assert rows["Brats18_X_0"]["report"] == texts["Brats18_X_0"]  # the file wins over the case file
    assert rows["Brats18_X_1"]["report"] == texts["Brats18_X_1"]
    assert rows["Brats18_X_2"]["report"] == fake_report("old 2")  # falls back to the case file
    assert summary["reports"]["orphan_reports"] == ["Brats18_GHOST"]
    assert summary["reports"]["from_reports_file"] == 2 and summary["reports"]["from_case_files"] == 1
    assert "orphan" in format_summary(summary) and "Brats18_GHOST" in format_summary(summary)


def test_read_reports_tolerant_columns_and_errors(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps([{"Case ID": "a", "report": "x"}, {"Case ID": "b", "report": "y"}]))
    assert read_reports(p) == {"a": "x", "b": "y"}
    p.write_text(json.dumps({"a": "x"}))
    assert read_reports(p) == {"a": "x"}
    bad = write_reports_csv(tmp_path / "bad.csv", {"a": "x"}, id_key="who", text_key="report")
    with pytest.raises(ValueError, match="no case id column"):
        read_reports(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"case_id": "a", "text": "x"}\n{"case_id": "a", "text": "y"}\n')
    with pytest.raises(ValueError, match=r"dup.jsonl, line 2: duplicate case id 'a'"):
        read_reports(dup)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"case_id": "", "text": "x"}\n')
    with pytest.raises(ValueError, match="empty case id"):
        read_reports(empty)
    with pytest.raises(ValueError, match="unsupported"):
        read_reports(_touch(tmp_path / "r.xml"))


def _touch(path: Path) -> Path:
    path.write_text("")
    return path


def test_require_reports(tmp_path):
    root = tmp_path / "b20"
    write_2020_release(root, grades_2020(3))
    (root / "BraTS20_Training_002" / "BraTS20_Training_002_flair_text.txt").write_text("   \n")  # empty report
    with pytest.raises(ValueError, match=r"BraTS20_Training_002: no report"):
        load(root, tmp_path, splits="none", require_reports=True)
    with pytest.warns(UserWarning, match="skipped case BraTS20_Training_002"):
        dsd, summary = load(root, tmp_path, splits="none", require_reports=True, on_error="skip", return_summary=True)
    assert sorted(dsd["train"]["case_id"]) == ["BraTS20_Training_001", "BraTS20_Training_003"]
    assert [s["case_id"] for s in summary["skipped"]] == ["BraTS20_Training_002"]


# =============================================================================================
# splits
# =============================================================================================
def _cases(n_patients=40, timepoints=(1, 2, 3), lgg_every=3):
    """2023-style ids with several time points per patient, and grades (as in a graded release)."""
    cases = []
    for p in range(n_patients):
        for t in range(timepoints[p % len(timepoints)]):
            cid = f"BraTS-GLI-{p:05d}-{t:03d}"
            cases.append(CaseFiles(cid, "2023", "brats2023", "LGG" if p % lgg_every == 0 else "HGG", {}))
    return cases


def test_folds_patient_level_stratified_deterministic():
    cases = _cases()
    patient = {c.case_id: c.patient_id for c in cases}
    grade = {c.patient_id: c.grade for c in cases}
    n_folds = 5
    test_sets = []
    for fold in range(n_folds):
        splits = make_splits(cases, n_folds=n_folds, fold=fold, seed=7)
        assert set(splits) == {"train", "test"}
        train_p = {patient[c] for c in splits["train"]}
        test_p = {patient[c] for c in splits["test"]}
        assert not train_p & test_p, "a patient is in two splits"
        assert sorted(splits["train"] + splits["test"]) == sorted(c.case_id for c in cases)
        # stratified: each fold holds its share of each grade (+-1 patient)
        for g in ("HGG", "LGG"):
            total = sum(1 for v in grade.values() if v == g)
            assert abs(sum(1 for p in test_p if grade[p] == g) - total / n_folds) <= 1
        test_sets.append(frozenset(splits["test"]))
        assert make_splits(cases, n_folds=n_folds, fold=fold, seed=7) == splits  # deterministic
    # the test folds partition the data
    assert sum(len(s) for s in test_sets) == len(cases) and len(frozenset().union(*test_sets)) == len(cases)
    assert make_splits(cases, seed=8) != make_splits(cases, seed=7)


def test_validation_fraction():
    cases = _cases(n_patients=50, timepoints=(1,))
    splits = make_splits(cases, n_folds=5, fold=2, val_fraction=0.25, seed=0)
    assert set(splits) == {"train", "validation", "test"}
    sets = [set(v) for v in splits.values()]
    assert sum(len(s) for s in sets) == 50 and len(set().union(*sets)) == 50
    assert len(splits["validation"]) == 10  # 25 % of the 40 training patients
    grades = Counter(c.grade for c in cases if c.case_id in set(splits["validation"]))
    assert abs(grades["LGG"] - 10 * 17 / 50) <= 1.5


def test_split_argument_errors():
    cases = _cases(n_patients=3, timepoints=(1,))
    with pytest.raises(ValueError, match="3 patients cannot be split into 5 folds"):
        make_splits(cases)
    with pytest.raises(ValueError, match="fold must be in"):
        make_splits(cases, n_folds=2, fold=2)
    assert make_splits(cases, splits="none") == {"train": sorted(c.case_id for c in cases)}


def _textbrats_json(path: Path, ids):
    entries = [
        {
            "fold": 0,
            "image": [f"{i}/{i}_{s}.nii.gz" for s in ("flair", "t1", "t1ce", "t2")],
            "label": f"{i}/{i}_seg.nii.gz",
            "text_feature": f"{i}/{i}_flair_text.npy",
        }
        for i in ids
    ]
    path.write_text(json.dumps({"training": entries}))
    return path


def test_split_files_textbrats_json_dict_and_text(tmp_path):
    cases = [CaseFiles(f"BraTS20_Training_{i:03d}", "2020", "brats2017", "HGG", {}) for i in range(1, 7)]
    ids = [c.case_id for c in cases]
    folder = tmp_path / "splits"
    folder.mkdir()
    _textbrats_json(folder / "Train.json", ids[:4])
    _textbrats_json(folder / "Test.json", ids[4:])
    assert read_split_file(folder / "Test.json") == {"test": ids[4:]}
    expected = {"train": ids[:4], "test": ids[4:]}
    assert make_splits(cases, splits=folder) == expected
    assert make_splits(cases, splits=[folder / "Train.json", folder / "Test.json"]) == expected

    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"training": ids[:3], "val": ids[3:4], "testing": ids[4:]}))
    assert make_splits(cases, splits=plain) == {"train": ids[:3], "validation": ids[3:4], "test": ids[4:]}

    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "train.txt").write_text("# training ids\n" + "\n".join(ids[:5]) + "\n\n")
    (tmp_path / "txt" / "test.txt").write_text(ids[5] + "\nBraTS20_Training_999\n")
    with pytest.warns(UserWarning, match=r"split 'test': 1 id\(s\) match no case"):
        splits = make_splits(cases, splits=tmp_path / "txt")
    assert splits == {"train": ids[:5], "test": ids[5:]}
    assert make_splits(cases, splits={"train": ids[:2], "test": ids[2:]}) == {"train": ids[:2], "test": ids[2:]}
    with pytest.warns(UserWarning, match=r"4 case\(s\) are in no split"):
        make_splits(cases, splits={"train": ids[:1], "test": ids[1:2]})


def test_split_file_leaks_are_errors():
    cases = _cases(n_patients=4, timepoints=(2,))
    ids = [c.case_id for c in cases]
    with pytest.raises(ValueError, match="is in two splits"):
        make_splits(cases, splits={"train": ids[:3], "test": ids[2:]})
    # the two time points of patient 00000 in different splits
    with pytest.raises(ValueError, match=r"patient BraTS-GLI-00000 is in two splits"):
        make_splits(cases, splits={"train": [ids[0]] + ids[2:], "test": [ids[1]]})
    # a patient map overrides the default (one case = one patient)
    flat = [CaseFiles(f"C{i}", "2021", "brats2017", None, {}) for i in range(4)]
    with pytest.raises(ValueError, match="patient P0 is in two splits"):
        make_splits(flat, splits={"train": ["C0", "C2"], "test": ["C1", "C3"]}, patient_map={"C0": "P0", "C1": "P0"})


def test_builder_uses_split_folder_and_reports_unknown_ids(tmp_path):
    root = tmp_path / "b20"
    grades = grades_2020(6)
    write_2020_release(root, grades)
    ids = sorted(grades)
    splits = tmp_path / "splits"
    splits.mkdir()
    _textbrats_json(splits / "Train.json", ids[:4])
    _textbrats_json(splits / "Test.json", ids[4:] + ["BraTS20_Training_777"])
    with pytest.warns(UserWarning, match="match no usable case"):
        dsd, summary = load(root, tmp_path, splits=splits, return_summary=True)
    assert sorted(dsd) == ["test", "train"]
    assert sorted(dsd["train"]["case_id"]) == ids[:4] and sorted(dsd["test"]["case_id"]) == ids[4:]
    assert summary["unknown_split_ids"] == {"test": ["BraTS20_Training_777"]}
    assert summary["split_source"] == "split file"


def test_builder_default_folds_keep_timepoints_together(tmp_path):
    root = tmp_path / "b23"
    for p in range(5):
        for t in range(2):
            write_case_2023(root, f"BraTS-GLI-{p:05d}-{t:03d}", seed=p * 2 + t)
    dsd = load(root, tmp_path, n_folds=5, fold=1)
    train_p = set(dsd["train"]["patient_id"])
    test_p = set(dsd["test"]["patient_id"])
    assert len(test_p) == 1 and not train_p & test_p and len(dsd["test"]) == 2


# =============================================================================================
# bad input: raise naming case + file, or skip and list
# =============================================================================================
def _bad_release(tmp_path, break_it):
    root = tmp_path / "bad"
    write_2020_release(root, grades_2020(3), reports=False)
    bad_dir = root / "BraTS20_Training_002"
    break_it(bad_dir, "BraTS20_Training_002")
    return root


def _truncate(case_dir, case_id):
    path = case_dir / f"{case_id}_t1ce.nii.gz"
    path.write_bytes(path.read_bytes()[:-40])


def _garbage(case_dir, case_id):
    (case_dir / f"{case_id}_t2.nii.gz").write_bytes(b"this is not a nifti file")


def _missing(case_dir, case_id):
    (case_dir / f"{case_id}_t2.nii.gz").unlink()


def _shape(case_dir, case_id):
    write_nifti(case_dir / f"{case_id}_flair.nii.gz", volume(0, shape=(8, 8, 5)))


def _nan(case_dir, case_id):
    arr = volume(0).astype(np.float32)
    arr[3, 3, 3] = np.nan
    arr[4, 4, 4] = np.inf
    write_nifti(case_dir / f"{case_id}_t1.nii.gz", arr)


def _labels(case_dir, case_id):
    lab = label_map("brats2017")
    lab[1, 1, 1] = 3  # 3 does not exist in the 2017-2021 convention
    write_nifti(case_dir / f"{case_id}_seg.nii.gz", lab)


def _two_files(case_dir, case_id):
    write_nifti(case_dir / f"{case_id}_t1.nii", volume(0))


BAD_INPUTS = {
    "missing sequence": (_missing, r"BraTS20_Training_002.*missing sequence.*\['t2'\]"),
    "truncated file": (
        _truncate,
        r"BraTS20_Training_002.*t1ce.*BraTS20_Training_002_t1ce\.nii\.gz.*unreadable or truncated",
    ),
    "unreadable file": (_garbage, r"BraTS20_Training_002.*t2.*BraTS20_Training_002_t2\.nii\.gz.*unreadable"),
    "different shapes": (_shape, r"BraTS20_Training_002.*flair.*shape \(8, 8, 5\) differs"),
    "nan/inf voxels": (
        _nan,
        r"BraTS20_Training_002.*t1 file .*BraTS20_Training_002_t1\.nii\.gz: 1 NaN and 1 inf voxels",
    ),
    "label values": (
        _labels,
        r"BraTS20_Training_002.*seg file .*_seg\.nii\.gz: label values \[3\] are outside the brats2017",
    ),
    "two files for a sequence": (_two_files, r"BraTS20_Training_002.*two files for sequence 't1'"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_or_skips(tmp_path, name):
    break_it, pattern = BAD_INPUTS[name]
    root = _bad_release(tmp_path, break_it)
    with pytest.raises(ValueError, match=pattern):
        load(root, tmp_path, splits="none")
    with pytest.warns(UserWarning, match="skipped case BraTS20_Training_002"):
        dsd, summary = load(root, tmp_path, splits="none", on_error="skip", return_summary=True)
    assert sorted(dsd["train"]["case_id"]) == ["BraTS20_Training_001", "BraTS20_Training_003"]
    assert [s["case_id"] for s in summary["skipped"]] == ["BraTS20_Training_002"]
    assert "BraTS20_Training_002" in format_summary(summary)


def test_duplicate_case_ids(tmp_path):
    root = tmp_path / "dup"
    write_case_2017(root, "Brats18_SAME_1", "HGG")
    write_case_2017(root, "Brats18_SAME_1", "LGG", seed=3)
    write_case_2017(root, "Brats18_OTHER_1", "LGG", seed=4)
    with pytest.raises(ValueError, match=r"Brats18_SAME_1: duplicate case id in 2 folders.*HGG.*LGG"):
        discover_cases(root)
    with pytest.warns(UserWarning, match="duplicate case id"):
        cases = discover_cases(root, on_error="skip")
    assert [c.case_id for c in cases] == ["Brats18_OTHER_1"]
    assert cases.skipped[0].case_id == "Brats18_SAME_1"


def test_on_error_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        discover_cases(tmp_path, on_error="ignore")


def test_non_1mm_spacing_warns_and_says_what_happens(tmp_path):
    root = tmp_path / "aniso"
    case_dir = write_case_2023(root, "BraTS-GLI-00009-000")
    for path in case_dir.iterdir():
        arr = read_volume(path).array
        write_nifti(path, arr, spacing=(1.0, 1.0, 3.0))
    case = discover_cases(root)[0]
    check = check_case(case)
    assert check.spacing == (1.0, 1.0, 3.0)
    assert "not 1 mm isotropic" in check.warnings[0] and "does not resample" in SPACING_NOTE
    with pytest.warns(UserWarning, match="not 1 mm isotropic.*does not resample.*header"):
        dsd, summary = load(root, tmp_path, splits="none", return_summary=True)
    assert dsd["train"][0]["spacing"] == [1.0, 1.0, 3.0]
    assert any("not 1 mm" in w["message"] for w in summary["warnings"])


def test_header_only_mode_skips_voxel_checks(tmp_path):
    root = _bad_release(tmp_path, _labels)
    dsd = load(root, tmp_path, splits="none", check_voxels=False)
    assert len(dsd["train"]) == 3


# =============================================================================================
# CLI
# =============================================================================================
def test_prepare_cli_save_to_disk_is_self_contained(tmp_path, capsys):
    from modeling_emrfuse.commands.cli import main

    root = tmp_path / "b20"
    write_2020_release(root, grades_2020(5))
    out = tmp_path / "prepared"
    rc = main(["prepare", str(root), "-o", str(out), "--n-folds", "2", "--cache-dir", str(tmp_path / "c")])
    assert rc == 0
    printed = capsys.readouterr()
    assert "train" in printed.out and "test" in printed.out and "skipped: 0" in printed.out
    assert "finding finding" not in printed.out + printed.err  # report text is never printed
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["splits"]["train"]["cases"] + summary["splits"]["test"]["cases"] == 5
    shutil.rmtree(root)  # the saved dataset must not need the source files
    dsd = datasets.load_from_disk(str(out))
    row = dsd["train"][0]
    assert row["t1"].shape == SHAPE and row["has_report"]


def test_prepare_cli_parquet_and_errors(tmp_path, capsys):
    from modeling_emrfuse.commands.cli import main

    root = tmp_path / "b20"
    write_2020_release(root, grades_2020(3))
    out = tmp_path / "pq"
    assert main(["prepare", str(root), "-o", str(out), "--splits", "none", "--format", "parquet",
                 "--cache-dir", str(tmp_path / "c")]) == 0  # fmt: skip
    files = sorted((out / "data").glob("*.parquet"))
    assert [f.name for f in files] == ["train-00000-of-00001.parquet"]
    shutil.rmtree(root)
    ds = datasets.Dataset.from_parquet(str(files[0]), cache_dir=str(tmp_path / "c2"))
    assert len(ds) == 3 and ds[0]["seg"].shape == SHAPE
    # non-empty output folder, and a bad input folder
    assert main(["prepare", str(tmp_path), "-o", str(out), "--cache-dir", str(tmp_path / "c")]) == 2
    bad = _bad_release(tmp_path / "b", _labels)
    assert (
        main(["prepare", str(bad), "-o", str(tmp_path / "o2"), "--splits", "none", "--cache-dir", str(tmp_path / "c")])
        == 1
    )
    assert "label values [3]" in capsys.readouterr().err


# =============================================================================================
# the real cases (../shared/realdata)
# =============================================================================================
needs_real = pytest.mark.skipif(not REALDATA.is_dir(), reason=f"real data folder {REALDATA} is absent")


def _link_case(src: Path, dst_dir: Path, rename=None):
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        name = rename(f.name) if rename else f.name
        os.symlink(f, dst_dir / name)


@needs_real
def test_real_tcga_in_2018_naming(tmp_path):
    src = REALDATA / "TCGA-DU-7294"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    root = tmp_path / "MICCAI_BraTS_2018_Data_Training"
    _link_case(src, root / "LGG" / "TCGA-DU-7294")
    cases = discover_cases(root)
    assert cases.release == "2018" and cases[0].grade == "LGG" and cases[0].label is not None
    ds = load(root, tmp_path, splits="none")["train"]
    row = ds[0]
    assert row["t1"].shape == (240, 240, 155) and row["spacing"] == [1.0, 1.0, 1.0]
    assert set(np.unique(array_of(row["seg"]))) <= {0, 1, 2}
    assert ds.features["grade"].int2str(row["grade"]) == "LGG" and not row["has_report"]


@needs_real
def test_real_tcga_in_2020_naming(tmp_path):
    src = REALDATA / "TCGA-DU-7294"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    _link_case(src, root / "TCGA-DU-7294")
    write_name_mapping(root, {"TCGA-DU-7294": "LGG"})
    cases = discover_cases(root)
    assert cases.release == "2020" and cases[0].grade == "LGG"
    check = check_case(cases[0])
    assert check.shape == (240, 240, 155) and check.warnings == []
    reports = write_reports_jsonl(tmp_path / "reports.jsonl", {"TCGA-DU-7294": fake_report("TCGA-DU-7294")})
    dsd, summary = load(root, tmp_path, reports=reports, splits="none", require_reports=True, return_summary=True)
    row = dsd["train"][0]
    assert (
        row["has_report"] and row["release"] == "2020" and dsd["train"].features["grade"].int2str(row["grade"]) == "LGG"
    )
    assert summary["splits"]["train"] == {
        "cases": 1,
        "grades": {"HGG": 0, "LGG": 1, "unknown": 0},
        "with_report": 1,
        "labeled": 1,
    }


@needs_real
def test_real_brats2023_case(tmp_path):
    src = REALDATA / "BraTS-GLI-00001-000"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    root = tmp_path / "BraTS2023-GLI-ValidationData"
    _link_case(src, root / "BraTS-GLI-00001-000")
    cases = discover_cases(root)
    assert cases.release == "2023" and cases[0].label is None and cases[0].grade is None
    assert cases[0].sequences["t1ce"].name == "BraTS-GLI-00001-000-t1c.nii.gz"
    ds = load(root, tmp_path, splits="none")["train"]
    row = ds[0]
    assert row["seg"] is None and row["grade"] == -1 and row["label_convention"] == "brats2023"
    assert row["flair"].shape == (240, 240, 155)


@needs_real
def test_real_textbrats_reports(tmp_path):
    path = REALDATA / "textbrats_reports.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    reports = read_reports(path)
    assert len(reports) == 369
    assert all(k.startswith("BraTS20_Training_") for k in reports)
    words = [len(t.split()) for t in reports.values()]
    assert 40 <= min(words) and max(words) <= 200
    # three synthetic image cases named like TextBraTS cases pick up their real reports;
    # the other 366 reports are orphans and reported as such
    root = tmp_path / "b20"
    grades = {f"BraTS20_Training_{i:03d}": "HGG" for i in (1, 2, 3)}
    write_2020_release(root, grades, reports=False)
    with pytest.warns(UserWarning, match="366 report"):
        dsd, summary = load(root, tmp_path, reports=path, splits="none", return_summary=True)
    rows = {r["case_id"]: r for r in dsd["train"]}
    for cid in grades:
        digest = hashlib.sha256(rows[cid]["report"].encode()).hexdigest()
        assert rows[cid]["has_report"] and digest == hashlib.sha256(reports[cid].encode()).hexdigest()
    assert len(summary["reports"]["orphan_reports"]) == 366


# ------------------------------------------------------------------------------------------- shuffled-report control
def test_derange_reports_permutes_within_groups_and_no_case_keeps_its_own():
    from datasets_scripts.brats_text import derange_reports

    ids = [f"BraTS20_Training_{i:03d}" for i in range(1, 31)]
    reports = {c: f"synthetic report number {i}" for i, c in enumerate(ids)}
    reports[ids[5]] = None  # a case without report keeps none
    groups = [ids[:20], ids[20:27], ids[27:]]
    for seed in range(20):
        out = derange_reports(reports, groups, seed=seed)
        assert set(out) == set(reports)
        assert out[ids[5]] is None
        for group in groups:
            with_report = [c for c in group if reports[c] is not None]
            # the same reports within the group (same grade mix), each moved to another case
            assert Counter(out[c] for c in with_report) == Counter(reports[c] for c in with_report)
            assert all(out[c] != reports[c] for c in with_report)
    assert derange_reports(reports, groups, seed=3) == derange_reports(reports, groups, seed=3)
    assert derange_reports(reports, groups, seed=3) != derange_reports(reports, groups, seed=4)
    # over seeds, a case receives reports from many different cases (not a fixed rotation)
    received = {derange_reports(reports, groups, seed=s)[ids[0]] for s in range(40)}
    assert len(received) > 8


def test_derange_reports_respects_patients_and_identical_texts():
    from datasets_scripts.brats_text import derange_reports

    ids = ["a1", "a2", "b1", "c1", "d1", "e1"]
    reports = {"a1": "x", "a2": "x", "b1": "y", "c1": "z", "d1": "w", "e1": "v"}
    patients = {"a1": "A", "a2": "A"}
    for seed in range(20):
        out = derange_reports(reports, [ids], seed=seed, patients=patients)
        assert out["a1"] != "x" and out["a2"] != "x"  # not its own text, not its own patient's
        assert Counter(out.values()) == Counter(reports.values())
    with pytest.raises(ValueError, match="single case"):
        derange_reports({"a": "x", "b": None}, [["a", "b"]])
    with pytest.raises(ValueError, match="no derangement"):
        derange_reports({"a": "x", "b": "x", "c": "y"}, [["a", "b", "c"]], max_tries=50)
    with pytest.raises(ValueError, match="without an entry"):
        derange_reports({"a": "x"}, [["a", "zz"]])
