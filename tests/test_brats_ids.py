"""BraTS id tables (``datasets_scripts.brats_ids``): joining aliases, 2020 ids, grades, errors.

Hand-made rows mimic ``name_mapping.csv`` (BraTS 2020) and ``BraTS21-17_Mapping.csv`` (BraTS 2021);
the real tables in ``../shared/realdata/meta`` are read in place (skipped when absent, never copied).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from datasets_scripts.brats_ids import IdMapping, find_id_tables, gli_to_brats2021
from datasets_scripts.demo_data import NAME_MAPPING_COLUMNS

META = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "meta"

H2020 = list(NAME_MAPPING_COLUMNS)
H2021 = [
    "BraTS2021",
    "BraTS2020",
    "BraTS2019",
    "BraTS2018",
    "BraTS2017",
    "Cohort Name (if publicly available)",
    "Site No (represents the originating institution)",
    "Local ID ",
]


def rows(header, *lines):
    return [dict(zip(header, line.split(","))) for line in lines]


def table_2020():
    return rows(
        H2020,
        "LGG,Brats17_TCIA_130_1,Brats18_TCIA10_130_1,TCGA-DU-7294,BraTS19_TCIA10_130_1,BraTS20_Training_295",
        "HGG,Brats17_2013_2_1,Brats18_2013_2_1,NA,BraTS19_2013_2_1,BraTS20_Training_136",
        "HGG,NA,NA,NA,NA,BraTS20_Training_353",
    )


def table_2021():
    return rows(
        H2021,
        "BraTS2021_01500,BraTS20_Training_295,BraTS19_TCIA10_130_1,Brats18_TCIA10_130_1,Brats17_TCIA_130_1,"
        "TCGA-LGG,13,LOCAL-1",
        "BraTS2021_00000,N/A,N/A,N/A,N/A,Private Collection,18,N/A",
        "BraTS2021_00005,N/A,N/A,N/A,N/A,Private Collection,18,N/A",
        "N/A,BraTS20_Training_353,N/A,N/A,N/A,IvyGAP,16,W36",
    )


def write_csv(path: Path, header, lines) -> Path:
    path.write_text(",".join(header) + "\n" + "".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# -- hand-made tables ------------------------------------------------------------------------------


def test_aliases_join_across_tables():
    ids = IdMapping.from_rows(table_2020(), source="nm.csv").merge(IdMapping.from_rows(table_2021(), source="m21.csv"))
    assert ids.files == ["nm.csv", "m21.csv"]
    assert ids.aliases("BraTS2021_01500") == {
        "BraTS2021_01500",
        "BraTS20_Training_295",
        "BraTS19_TCIA10_130_1",
        "Brats18_TCIA10_130_1",
        "Brats17_TCIA_130_1",
        "TCGA-DU-7294",
    }
    assert ids.patient_of("TCGA-DU-7294") == ids.patient_of("BraTS2021_01500") == "BraTS20_Training_295"
    # 2018 id, TCGA id, 2021 id
    assert (ids.brats2020_id("Brats18_2013_2_1"), ids.grade_of("Brats18_2013_2_1")) == ("BraTS20_Training_136", "HGG")
    assert (ids.brats2020_id("TCGA-DU-7294"), ids.grade_of("TCGA-DU-7294")) == ("BraTS20_Training_295", "LGG")
    assert (ids.brats2020_id("BraTS2021_01500"), ids.grade_of("BraTS2021_01500")) == ("BraTS20_Training_295", "LGG")
    assert (ids.brats2020_id("BraTS2021_00000"), ids.grade_of("BraTS2021_00000")) == (None, None)
    assert ids.patient_of("BraTS2021_00000") == "BraTS2021_00000"
    assert ids.brats2020_id("  BraTS20_Training_353 ") == "BraTS20_Training_353"  # stripped look-up
    # patients: 295, 136, 353 (joined across tables), 00000, 00005
    assert len(ids) == 5
    # the other table order gives the same answers
    rev = IdMapping.from_rows(table_2021()).merge(IdMapping.from_rows(table_2020()))
    assert rev.patient_of("Brats17_TCIA_130_1") == "BraTS20_Training_295" and len(rev) == 5


def test_unknown_and_missing_values():
    ids = IdMapping.from_rows(table_2020()).merge(IdMapping.from_rows(table_2021()))
    for bad in ("BraTS20_Training_999", "brats20_training_295", "NA", "N/A", "", "LOCAL-1", "TCGA-LGG", "13"):
        assert ids.patient_of(bad) is None
        assert ids.brats2020_id(bad) is None
        assert ids.grade_of(bad) is None
        assert bad not in ids
    assert None not in ids and 295 not in ids
    assert ids.aliases("BraTS20_Training_999") == {"BraTS20_Training_999"}
    assert ids.aliases("NA") == set() and ids.aliases("N/A") == set()
    for patient in ("BraTS20_Training_295", "BraTS2021_00000", "BraTS20_Training_136"):
        assert not {"NA", "N/A", ""} & ids.aliases(patient)
    assert "BraTS20_Training_295" in ids


def test_gli_rule():
    ids = IdMapping.from_rows(table_2021())
    assert gli_to_brats2021("BraTS-GLI-00005-001") == "BraTS2021_00005"
    assert gli_to_brats2021("BraTS-MEN-00005-000") is None
    assert ids.patient_of("BraTS-GLI-00005-001") == ids.patient_of("BraTS2021_00005") == "BraTS2021_00005"
    assert ids.patient_of("BraTS-GLI-01500-000") == "BraTS20_Training_295"
    assert "BraTS-GLI-00005-000" in ids
    assert ids.aliases("BraTS-GLI-00005-001") == {"BraTS-GLI-00005-001", "BraTS2021_00005"}
    assert ids.patient_of("BraTS-GLI-00001-000") is None  # BraTS2021_00001 is in no table
    assert "BraTS-GLI-00001-000" not in ids


def test_grade_conflict():
    other = rows(H2020, "HGG,NA,Brats18_TCIA10_130_1,NA,NA,BraTS20_Training_295")
    a = IdMapping.from_rows(table_2020(), source="a.csv")
    with pytest.raises(ValueError, match=r"two different grades") as err:
        a.merge(IdMapping.from_rows(other, source="b.csv"))
    message = str(err.value)
    assert "a.csv" in message and "b.csv" in message and "Brats18_TCIA10_130_1" in message
    assert "HGG" not in message and "LGG" not in message  # no cell values other than ids
    with pytest.raises(ValueError, match=r"not one of HGG, LGG"):
        IdMapping.from_rows(rows(H2020, "GBM,NA,NA,NA,NA,BraTS20_Training_001"), source="c.csv")


def test_two_2020_ids_joined():
    bridge = rows(H2021, "BraTS2021_00009,BraTS20_Training_136,N/A,Brats18_TCIA10_130_1,N/A,X,1,N/A")
    with pytest.raises(ValueError, match=r"two different BraTS 2020 ids") as err:
        IdMapping.from_rows(table_2020(), source="a.csv").merge(IdMapping.from_rows(bridge, source="b.csv"))
    message = str(err.value)
    assert "BraTS20_Training_136" in message and "BraTS20_Training_295" in message
    assert "a.csv" in message and "b.csv" in message


def test_header_detection():
    with pytest.raises(ValueError, match=r"not a BraTS id table.*'Patient'.*BraTS_2020_subject_ID.*BraTS2021"):
        IdMapping.from_rows([{"Patient": "x", "Age": "1"}], source="odd.csv")
    # validation name mapping: no Grade column, BraTS20_Validation ids
    val = IdMapping.from_rows(
        rows(H2020[1:], "NA,NA,NA,BraTS19_CBICA_AAM_1,BraTS20_Validation_001"),
        source="name_mapping_validation_data.csv",
    )
    assert val.brats2020_id("BraTS19_CBICA_AAM_1") == "BraTS20_Validation_001"
    assert val.grade_of("BraTS20_Validation_001") is None
    assert len(IdMapping.from_rows([])) == 0


def test_from_files_and_errors(tmp_path):
    nm = write_csv(tmp_path / "name_mapping.csv", H2020, [",".join(r[h] for h in H2020) for r in table_2020()])
    m21 = write_csv(tmp_path / "BraTS21-17_Mapping.csv", H2021, [",".join(r[h] for h in H2021) for r in table_2021()])
    ids = IdMapping.from_files([m21, str(nm)])
    assert ids.files == [str(m21), str(nm)]
    assert ids.brats2020_id("BraTS2021_01500") == "BraTS20_Training_295" and ids.grade_of("BraTS2021_01500") == "LGG"
    assert IdMapping.from_files(nm).grade_of("TCGA-DU-7294") == "LGG"  # a single path is accepted
    # BOM + blank line: line numbers still name the right line
    bom = "\ufeff" + ",".join(H2020) + "\n\nGBM,NA,NA,NA,NA,BraTS20_Training_001\n"
    (tmp_path / "bom.csv").write_text(bom, encoding="utf-8")
    with pytest.raises(ValueError, match=r"bom\.csv:3.*BraTS20_Training_001"):
        IdMapping.from_files([tmp_path / "bom.csv"])
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        IdMapping.from_files([tmp_path / "missing.csv"])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv.*empty"):
        IdMapping.from_files([tmp_path / "empty.csv"])
    (tmp_path / "odd.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"odd\.csv.*expected"):
        IdMapping.from_files([tmp_path / "odd.csv"])


def test_find_id_tables(tmp_path):
    for name in (
        "name_mapping.csv",
        "name_mapping_validation_data.csv",
        "BraTS21-17_Mapping.csv",
        "survival_info.csv",
        "mapping.txt",
        "._name_mapping.csv",
    ):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "BraTS20_Training_001").mkdir()
    (tmp_path / "BraTS20_Training_001" / "name_mapping.csv").write_text("x\n")  # not directly inside
    (tmp_path / "Mapping.csv").mkdir()  # a folder, not a file
    assert [p.name for p in find_id_tables(tmp_path)] == [
        "BraTS21-17_Mapping.csv",
        "name_mapping.csv",
        "name_mapping_validation_data.csv",
    ]
    assert find_id_tables(tmp_path / "BraTS20_Training_001") == [tmp_path / "BraTS20_Training_001" / "name_mapping.csv"]
    with pytest.raises(FileNotFoundError):
        find_id_tables(tmp_path / "nope")


# -- the real tables -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    if not META.is_dir():
        pytest.skip(f"real BraTS id tables not available ({META})")
    tables = find_id_tables(META)
    if {p.name for p in tables} != {"name_mapping.csv", "BraTS21-17_Mapping.csv"}:
        pytest.skip(f"real BraTS id tables incomplete in {META}")
    return IdMapping.from_files(tables)


def test_real_tables(real):
    assert real.brats2020_id("Brats18_2013_2_1") == "BraTS20_Training_136"
    assert real.grade_of("Brats18_2013_2_1") == "HGG"
    assert real.brats2020_id("TCGA-DU-7294") == "BraTS20_Training_295"
    assert real.grade_of("TCGA-DU-7294") == "LGG"
    assert real.patient_of("Brats18_TCIA10_130_1") == real.patient_of("TCGA-DU-7294") is not None
    assert "BraTS2021_00002" in real
    assert real.brats2020_id("BraTS2021_00002") is None and real.grade_of("BraTS2021_00002") is None
    assert real.patient_of("BraTS-GLI-00000-000") == real.patient_of("BraTS2021_00000") is not None


def test_real_grade_counts(real):
    with open(META / "name_mapping.csv", newline="", encoding="utf-8-sig") as handle:
        ids_2020 = [row["BraTS_2020_subject_ID"] for row in csv.DictReader(handle)]  # ids only
    assert len(ids_2020) == len(set(ids_2020)) == 369
    counts = Counter(real.grade_of(case) for case in ids_2020)
    assert counts == {"HGG": 293, "LGG": 76}
    assert all(real.brats2020_id(case) == case == real.patient_of(case) for case in ids_2020)
    nm = IdMapping.from_files([META / "name_mapping.csv"])
    assert len(nm) == 369
    assert Counter(nm.grade_of(case) for case in ids_2020) == counts
