"""The release table (one entry per BraTS release), patients found by their tumour masks, and the clear errors
of discovery on bad data folders."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from brats_fixtures import volume, write_case_2017, write_case_2021, write_nifti
from conftest import REALDATA

from datasets_scripts.brats_text import make_splits
from modeling_emrfuse import brats_io
from modeling_emrfuse.brats_io import Release, discover_cases, discover_folders, load_case, tumour_fingerprint
from modeling_emrfuse.brats_labels import RELEASE_CONVENTION
from modeling_emrfuse.commands.score import case_id_from_path, find_label_maps

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (12, 12, 8)


# ------------------------------------------------------------------------------------------------ the table
def _made_up_release() -> Release:
    return Release(
        "2030",
        "flat",
        re.compile(r"^(?P<patient>BraTS30-\d+)-\d+$"),
        ("t1", "t1gd", "t2", "flair"),
        label_names=("tumourmap",),
        label_convention="brats2023",
        detect=("sequence_names",),
        layout_doc="flat ``BraTS30-NNNN-TT/BraTS30-NNNN-TT-{t1,t1gd,t2,flair,tumourmap}.nii.gz``",
    )


def _write_2030_case(root: Path, case_id: str) -> Path:
    for i, name in enumerate(("t1", "t1gd", "t2", "flair")):
        write_nifti(root / case_id / f"{case_id}-{name}.nii.gz", volume(i))
    lab = np.zeros(volume(0).shape, np.uint8)
    lab[2:4, 2:4, 1:3] = 3
    write_nifti(root / case_id / f"{case_id}-tumourmap.nii.gz", lab)
    return root / case_id


def test_a_new_release_is_one_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(brats_io.RELEASES, "2030", _made_up_release())
    _write_2030_case(tmp_path / "b30", "BraTS30-0007-01")
    found = discover_cases(tmp_path / "b30")
    assert found.release == "2030"
    case = found[0]
    assert (case.label_convention, case.patient_id, case.grade) == ("brats2023", "BraTS30-0007", None)
    assert case.label.name == "BraTS30-0007-01-tumourmap.nii.gz" and sorted(case.sequences) == [
        "flair",
        "t1",
        "t1ce",
        "t2",
    ]
    assert not found.warnings, "the release's own label name is no 'non-standard name'"
    assert discover_cases(tmp_path / "b30", release="2030").release == "2030"
    assert load_case(str(tmp_path / "b30" / "BraTS30-0007-01")).label_convention == "brats2023"
    # emrfuse score reads label files by the table's names too
    assert case_id_from_path(case.label) == "BraTS30-0007-01"
    assert "| 2030 |" in brats_io.release_table_markdown()


def test_a_release_detected_by_its_case_ids(tmp_path, monkeypatch):
    entry = Release("2031", "flat", re.compile(r"^UCSF30_\d+$"), detect=("case_id",), label_convention="brats2017")
    monkeypatch.setitem(brats_io.RELEASES, "2031", entry)
    write_case_2021(tmp_path / "u", "UCSF30_001")
    write_case_2021(tmp_path / "u", "UCSF30_002", seed=1)
    assert discover_cases(tmp_path / "u").release == "2031"
    write_case_2021(tmp_path / "u", "Other_003", seed=2)
    assert discover_cases(tmp_path / "u").release == "2021", "a folder not all named like it falls back"


def test_score_finds_label_maps_of_exports_by_the_table_names(tmp_path):
    """A BraTS 2015 export (``Flair_subtrMeanDivStd``, ``T1c``, ``brainmask``, ``OTMultiClass``) as a reference folder:
    sequences and masks are no label maps, ``OTMultiClass`` is the case's."""
    for case in ("brats_2013_pat0002_1", "brats_2013_pat0003_1"):
        for name in ("Flair_subtrMeanDivStd", "T1c", "brainmask", "OTMultiClass"):
            write_nifti(tmp_path / "ref" / case / f"{name}.nii.gz", np.zeros((2, 2, 2), np.uint8))
    found = find_label_maps(tmp_path / "ref")
    assert {k: v.name for k, v in found.items()} == {
        "brats_2013_pat0002_1": "OTMultiClass.nii.gz",
        "brats_2013_pat0003_1": "OTMultiClass.nii.gz",
    }
    for name in ("A.nii.gz", "B_pred.nii.gz"):  # a flat folder of predictions named by case id
        write_nifti(tmp_path / "pred" / name, np.zeros((2, 2, 2), np.uint8))
    assert sorted(find_label_maps(tmp_path / "pred")) == ["A", "B"]


def test_entries_are_checked_when_made():
    with pytest.raises(ValueError, match="SEQUENCE_ALIASES"):
        Release("2032", "flat", sequence_names=("t1", "t1x", "t2", "flair"), label_convention="brats2017")
    with pytest.raises(ValueError, match="layout"):
        Release("2032", "nested", label_convention="brats2017")
    with pytest.raises(ValueError, match="Unknown label convention"):
        Release("2032", "flat", label_convention="brats2032")
    with pytest.raises(ValueError, match="already in the release table"):
        brats_io.register_release(Release("2018", "graded"))


def test_the_table_agrees_with_brats_labels_and_the_readme():
    for name, release in brats_io.RELEASES.items():
        assert release.label_convention == RELEASE_CONVENTION[name]
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- release-table:start -->\n")[1].split("\n<!-- release-table:end -->")[0]
    assert table == brats_io.release_table_markdown(), "README's release table is stale: paste release_table_markdown()"


def test_release_years_live_in_the_table():
    """Discovery code reads the table: no release year outside the table's entries in brats_io's discovery."""
    source = (ROOT / "modeling_emrfuse" / "brats_io.py").read_text()
    discovery = source.split("def _is_hidden(")[1].split("def _release_for(")[0]
    assert not re.search(r"20(1[3-9]|2[0-9])", discovery)


# ------------------------------------------------------------------------------------------------ patients by content
def _tumour(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros(SHAPE, np.uint8)
    lab[3:9, 3:9, 2:6] = 2
    lab[4:8, 4:8, 3:5] = 1
    lab[rng.random(SHAPE) < 0.2] = 0  # a ragged mask, distinct per seed
    return lab


def _case(root: Path, case_id: str, lab: np.ndarray, affine=None, seed: int = 0) -> Path:
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) if affine is None else affine
    for i, s in enumerate(("t1", "t1ce", "t2", "flair")):
        nib.save(
            nib.Nifti1Image(volume(seed * 10 + i, SHAPE), affine), str(_mk(root / case_id) / f"{case_id}_{s}.nii.gz")
        )
    nib.save(nib.Nifti1Image(lab, affine), str(root / case_id / f"{case_id}_seg.nii.gz"))
    return root / case_id


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_identical_tumour_masks_are_one_patient_whatever_convention_dtype_and_orientation(tmp_path):
    lab = _tumour(0)
    _case(tmp_path / "b21", "BraTS2021_00001", lab)
    as_2023 = np.where(lab == 4, 3, lab).astype(np.float32)  # same voxels, other convention and data type
    _case(tmp_path / "b23", "ScanB", as_2023)
    flipped = np.diag([1.0, -1.0, 1.0, 1.0])  # RPS: the first axis stored the other way round
    flipped[0, 3] = -(SHAPE[0] - 1)
    _case(tmp_path / "flip", "ScanC", lab[::-1].copy(), affine=flipped)
    _case(tmp_path / "b21", "BraTS2021_00002", _tumour(1), seed=1)
    found = discover_folders([tmp_path / "b21", tmp_path / "b23", tmp_path / "flip"])
    patient = {c.case_id: c.patient_id for c in found}
    assert patient["BraTS2021_00001"] == patient["ScanB"] == patient["ScanC"] == "BraTS2021_00001"
    assert patient["BraTS2021_00002"] == "BraTS2021_00002"
    assert tumour_fingerprint(tmp_path / "b21" / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz") is not None


def test_tiny_or_empty_masks_join_nobody(tmp_path):
    tiny = np.zeros(SHAPE, np.uint8)
    tiny[2, 2, 2] = 1
    _case(tmp_path / "a", "A", tiny)
    _case(tmp_path / "b", "B", tiny)
    _case(tmp_path / "c", "C", np.zeros(SHAPE, np.uint8))
    _case(tmp_path / "d", "D", np.zeros(SHAPE, np.uint8))
    found = discover_folders([tmp_path / x for x in "abcd"])
    assert [c.patient_id for c in found] == ["A", "B", "C", "D"]


def test_an_unreadable_label_file_joins_nobody_and_breaks_no_split(tmp_path):
    for i in range(3):
        _case(tmp_path / "b21", f"BraTS2021_0000{i}", _tumour(20 + i), seed=i)
    (tmp_path / "b21" / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz").write_bytes(b"not a label map")
    cases = discover_cases(tmp_path / "b21")  # listing only: the file is not read here
    assert sorted(len(ids) for ids in make_splits(cases, n_folds=3).values()) == [1, 2]


def test_splits_keep_one_scan_under_two_names_together(tmp_path):
    """make_splits groups by content even for cases discovered folder by folder (as bench_real does)."""
    for i in range(5):
        _case(tmp_path / "b21", f"BraTS2021_0000{i}", _tumour(10 + i), seed=i)
    _case(tmp_path / "copy", "OldName_1", _tumour(10))  # BraTS2021_00000 under another name
    cases = list(discover_cases(tmp_path / "b21")) + list(discover_cases(tmp_path / "copy"))
    for fold in range(3):
        split = make_splits(cases, n_folds=3, fold=fold)
        side = {cid: name for name, ids in split.items() for cid in ids}
        assert side["OldName_1"] == side["BraTS2021_00000"]
    with pytest.raises(ValueError, match="5 patients cannot be split into 6 folds"):
        make_splits(cases, n_folds=6)


def test_label_facts_are_kept_between_runs(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "label_facts.tsv"
    monkeypatch.setenv(brats_io.LABEL_CACHE_ENV, str(cache))
    _case(tmp_path / "a", "A", _tumour(0))
    _case(tmp_path / "b", "B", _tumour(0).astype(np.float32))
    first = discover_folders([tmp_path / "a", tmp_path / "b"])
    assert cache.is_file() and first[0].patient_id == first[1].patient_id == "A"
    monkeypatch.setattr(brats_io, "_LABEL_FACTS", {})  # a new run

    def no_reading(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(brats_io, "read_volume", no_reading)
    again = discover_folders([tmp_path / "a", tmp_path / "b"])
    assert [c.patient_id for c in again] == ["A", "A"]


needs_realdata = pytest.mark.skipif(
    not (REALDATA / "two-sequences").is_dir(), reason=f"real data not present ({REALDATA})"
)


@needs_realdata
def test_real_pairs_one_scan_under_two_names_and_two_patients_under_one_number():
    found = discover_folders([REALDATA / "BraTS2018", REALDATA / "two-sequences"], allow_missing_sequences=True)
    patient = {c.case_id: c.patient_id for c in found}
    assert patient["brats_2013_pat0004_1"] == patient["Brats18_2013_21_1"]  # identical tumour masks
    assert patient["brats_2013_pat0002_1"] != patient["Brats18_2013_2_1"]  # tumour-mask Dice 0.05
    assert len(set(patient.values())) == len(patient) - 1  # no other pair
    split = make_splits(found, n_folds=5, fold=0)
    side = {cid: name for name, ids in split.items() for cid in ids}
    assert side["brats_2013_pat0004_1"] == side["Brats18_2013_21_1"]
    # emrfuse score reads the same exports as references: one label map per case, no sequence or mask file
    refs = find_label_maps(REALDATA / "two-sequences")
    assert {k: v.name for k, v in refs.items()} == {f"brats_2013_pat000{i}_1": "OTMultiClass.nii.gz" for i in (2, 3, 4)}


# ------------------------------------------------------------------------------------------------ clear errors
def test_empty_data_folder_names_the_folder_and_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no BraTS case found.*emrfuse demo-data"):
        discover_folders([tmp_path / "empty"])
    with pytest.raises(ValueError, match=r"nowhere: data folder not found.*BraTS release folder"):
        discover_folders([tmp_path / "nowhere"])


def test_sequences_of_different_shapes_name_the_case_the_file_and_the_fix(tmp_path):
    case = write_case_2017(tmp_path / "b18", "Brats18_A_1")
    write_case_2017(tmp_path / "b18", "Brats18_B_1", seed=1)
    write_nifti(case / "Brats18_A_1_flair.nii.gz", volume(0, shape=(8, 8, 5)))
    with pytest.raises(
        ValueError,
        match=r"case Brats18_A_1: flair file .*Brats18_A_1_flair\.nii\.gz: shape \(8, 8, 5\) "
        r"differs .*resample or co-register",
    ):
        discover_folders([tmp_path / "b18"])
    with pytest.warns(UserWarning, match="skipped case Brats18_A_1"):
        found = discover_folders([tmp_path / "b18"], on_error="skip")
    assert [c.case_id for c in found] == ["Brats18_B_1"] and found.skipped[0].case_id == "Brats18_A_1"
    with pytest.raises(
        ValueError,
        match=r"different shapes: 't1' .*'flair' \(8, 8, 5\) \(.*Brats18_A_1_flair\.nii\.gz\)"
        r".*resample or co-register",
    ):
        load_case(str(case))


def test_label_values_outside_the_convention_name_the_case_the_file_and_the_release_to_pass(tmp_path):
    case = write_case_2021(tmp_path / "b21", "BraTS2021_00001")
    lab = np.asarray(nib.load(str(case / "BraTS2021_00001_seg.nii.gz")).dataobj).copy()
    lab[lab == 4] = 3  # enhancing tumour as 3: the 2015 or 2023 convention, not 2017-2021
    write_nifti(case / "BraTS2021_00001_seg.nii.gz", lab)
    with pytest.raises(
        ValueError,
        match=r"case BraTS2021_00001: seg file .*_seg\.nii\.gz: label values \[3\] are outside "
        r"the brats2017 convention of release 2021 .*--release: 2015, 2023",
    ):
        discover_folders([tmp_path / "b21"])
    assert discover_folders([tmp_path / "b21"], releases="2023")[0].label_convention == "brats2023"
