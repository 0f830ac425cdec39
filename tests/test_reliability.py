"""Issue 11: bad input as a hostile or careless user gives it: report text never shown, no silent wrong
result, no traceback. One test (or more) per numbered item of the issue, items 1-10, and the ``--revision``
warning; the Space's items live in ``test_space.py``.
"""

from __future__ import annotations

import ast
import json
import math
import shutil
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import build_tiny_model_folder, write_small_case

from modeling_emrfuse.brats_io import GeometryWarning, read_reports, read_volume, write_label_map
from modeling_emrfuse.commands.cli import main
from modeling_emrfuse.training.data import prepare_run_data
from modeling_emrfuse.training.text_tower import MIN_REPORTS_PER_WORD, build_demo_text_tower

ROOT = Path(__file__).resolve().parents[1]
SECRET = "Zanzibarian patient Quaxley"  # stands for report text: it must never reach stderr, stdout or an error


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_folder(tmp_path_factory.mktemp("reliability") / "model")


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    return write_small_case(tmp_path_factory.mktemp("reliability-data"), shape=(24, 24, 12))


def _strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: bare {constant}")

    return json.loads(text, parse_constant=refuse)


def _grades(n: int) -> dict:
    return {f"BraTS20_Training_{i:03d}": ("LGG" if i % 3 == 0 else "HGG") for i in range(1, n + 1)}


def _one_line_error(err: str, prefix: str = "emrfuse predict: error:") -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# 1. report text and privacy: a reports CSV without a header row
# ---------------------------------------------------------------------------------------------------------
def test_item1_headerless_reports_csv_names_no_cell_value(tmp_path, model_dir, case_dir, capsys):
    headerless = tmp_path / "reports.csv"
    headerless.write_text(f"Case_001,{SECRET} one\nCase_002,{SECRET} two\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_reports(headerless)
    message = str(info.value)
    assert SECRET not in message and "Case_001" not in message
    assert "reports.csv" in message and "2 columns" in message and "case_id" in message and "header" in message

    one_row = tmp_path / "one.csv"  # one headerless row: read as a header, so no report at all
    one_row.write_text(f"Case_001,{SECRET}\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_reports(one_row)
    assert SECRET not in str(info.value) and "one.csv" in str(info.value)
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("case_id,text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no report"):
        read_reports(header_only)

    # emrfuse predict --reports: exit 2, one line, no report text
    rc = main(
        [
            "predict",
            str(case_dir.parent),
            "--reports",
            str(headerless),
            "--model",
            str(model_dir),
            "-o",
            str(tmp_path / "out"),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 2 and SECRET not in captured.err + captured.out
    _one_line_error(captured.err)
    # emrfuse prepare --reports: the same message, no report text
    from brats_fixtures import write_2020_release

    data = write_2020_release(tmp_path / "b20", _grades(2))
    rc = main(["prepare", str(data), "-o", str(tmp_path / "prepared"), "--reports", str(headerless)])
    captured = capsys.readouterr()
    assert rc != 0 and SECRET not in captured.err + captured.out and "2 columns" in captured.err


# ---------------------------------------------------------------------------------------------------------
# 2. train.py --demo on data it did not generate; the demo vocabulary keeps no rare word
# ---------------------------------------------------------------------------------------------------------
class _MainProcess:
    is_main_process = True

    def wait_for_everyone(self):
        pass


def test_item2_demo_refuses_data_it_did_not_generate(tmp_path):
    from train_script import load_train_script

    train = load_train_script()
    from brats_fixtures import write_2020_release

    from datasets_scripts.demo_data import write_demo_dataset

    real = write_2020_release(tmp_path / "real", _grades(3))
    with pytest.raises(SystemExit) as info:
        train.parse_args(["--demo", "--data_dir", str(real)])
    assert "--allow_demo_on_other_data" in str(info.value) and str(real) in str(info.value)
    args = train.parse_args(["--demo", "--data_dir", str(real), "--allow_demo_on_other_data"])
    assert args.demo and args.allow_demo_on_other_data
    # a folder the demo-data writer made is demo data
    demo = write_demo_dataset(tmp_path / "demo", n_cases=2, size=(16, 16, 16))
    assert train.parse_args(["--demo", "--data_dir", str(demo)]).demo
    # allowed on real data: the run is not described as synthetic (model card, tags, evaluation labels)
    args = train.parse_args(
        [
            "--demo",
            "--data_dir",
            str(real),
            "--allow_demo_on_other_data",
            "--cache_dir",
            str(tmp_path / "cache"),
            "--eval_fraction",
            "0.34",
            "--no_text",
        ]
    )
    run = prepare_run_data(train.data_settings(args), _MainProcess())
    assert run.synthetic is False and "synthetic" not in run.description["name"].lower()
    assert run.description["synthetic"] is False


def test_item2_demo_vocabulary_keeps_no_word_of_fewer_than_k_reports(tmp_path):
    k = MIN_REPORTS_PER_WORD
    assert k >= 5 and f"{k}" in build_demo_text_tower.__doc__
    common = "irregular enhancing mass in the left frontal lobe with surrounding oedema"
    reports = [f"{common} case {i}." for i in range(2 * k)]
    for i in range(k - 1):  # a rare word, repeated many times, in k - 1 distinct reports
        reports[i] += (" quaxleyoma" * 20) + " zanzibarian"
    folder = Path(build_demo_text_tower(reports, tmp_path / "tower", _MainProcess()))
    from transformers import AutoTokenizer

    vocab = set(AutoTokenizer.from_pretrained(str(folder)).get_vocab())
    words_seen = {w for w in vocab if not w.startswith("##")}
    assert "irregular" in words_seen and "frontal" in words_seen  # words of >= k reports are learned
    assert "quaxleyoma" not in words_seen and "zanzibarian" not in words_seen
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        if (folder / name).exists():
            text = (folder / name).read_text(encoding="utf-8")
            assert "quaxleyoma" not in text and "zanzibarian" not in text, name
    with pytest.raises(ValueError, match=">= 5"):
        build_demo_text_tower(reports, tmp_path / "tower2", _MainProcess(), min_reports_per_word=2)
    # the same rule is in --help
    import subprocess

    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    ).stdout
    assert "--vocab_min_reports" in out and "--allow_demo_on_other_data" in out


# ---------------------------------------------------------------------------------------------------------
# 3. corrupted weights: an error, not an empty label map; every JSON strict
# ---------------------------------------------------------------------------------------------------------
def _corrupt_weights(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    start, end = header + (len(data) - header) // 4, header + 3 * (len(data) - header) // 4
    data[start:end] = b"\xff" * (end - start)  # 0xffffffff is a float32 NaN
    path.write_bytes(bytes(data))


def test_item3_non_finite_weights_are_an_error(tmp_path, model_dir, case_dir, capsys):
    bad = tmp_path / "bad-model"
    shutil.copytree(model_dir, bad)
    _corrupt_weights(bad)
    out = tmp_path / "out"
    rc = main(["predict", str(case_dir), "--model", str(bad), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    line = _one_line_error(err)
    assert "non-finite" in line and "bad-model" in line
    assert not out.exists() or not list(out.glob("*.json"))


def test_item3_non_finite_logits_are_an_error(model_dir, case_dir):
    import torch

    from modeling_emrfuse.pipeline_emrfuse import load_pipeline

    pipe = load_pipeline(str(model_dir), device="cpu", optimize=False, precision="fp32", grading_model=False)
    with torch.no_grad():
        pipe.segmentation_model.decoder.head.weight.fill_(3e38)  # finite weights whose outputs overflow
    with pytest.raises(ValueError, match="non-finite"):
        pipe(str(case_dir))


def test_item3_json_is_strict_and_undefined_is_null(tmp_path):
    from modeling_emrfuse.evaluation.ablation_report import write_ablation_report
    from modeling_emrfuse.evaluation.report import write_evaluation_report
    from modeling_emrfuse.runtime.strict_json import dumps

    assert (
        dumps({"a": float("nan"), "b": [np.float32("inf"), np.int64(3)], "c": np.array([1.0, np.nan])})
        == '{"a": null, "b": [null, 3], "c": [1.0, null]}'
    )
    summary = {
        "num_cases": 2,
        "grading": {
            "accuracy": 0.5,
            "balanced_accuracy": 0.5,
            "roc_auc": float("nan"),
            "f1": 0.5,
            "confusion_matrix": np.array([[1, 0], [1, 0]]),
        },
    }
    paths = write_evaluation_report(tmp_path / "eval", [{"case_id": "a"}, {"case_id": "b"}], summary)
    assert _strict_loads(paths["summary"].read_text())["grading"]["roc_auc"] is None
    rows = [("full", "Full", [{"dice_WT": float("nan"), "accuracy": 0.5}])]
    paths = write_ablation_report(tmp_path / "abl", "table1", rows)
    _strict_loads(paths["json"].read_text())


def test_item3_every_json_written_goes_through_strict_json():
    """No module writes JSON with a bare ``json.dump(s)``: only ``strict_json`` does (hashes of JSON are fine)."""
    files = sorted((ROOT / "modeling_emrfuse").rglob("*.py")) + sorted((ROOT / "datasets_scripts").glob("*.py"))
    files.append(ROOT / "train.py")
    offenders = []
    for path in files:
        if path.name == "strict_json.py":
            continue
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("dump", "dumps")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "json"
            ):
                line = lines[node.lineno - 1]
                if "hashlib" in line or ".encode()" in line:  # a hash key, not a file
                    continue
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


# ---------------------------------------------------------------------------------------------------------
# 4. a model folder without config.json
# ---------------------------------------------------------------------------------------------------------
def test_item4_folder_without_config_and_without_segmentation_model_is_an_error(tmp_path, model_dir, case_dir, capsys):
    folder = tmp_path / "no-config"
    folder.mkdir()
    shutil.copytree(model_dir / "grading", folder / "grading")
    rc = main(["predict", str(case_dir), "--model", str(folder), "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    line = _one_line_error(err)
    assert "config.json" in line and "no-config" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# 5. the companion (grading) model is never looked up outside the model folder
# ---------------------------------------------------------------------------------------------------------
def test_item5_companion_is_not_taken_from_the_working_directory(tmp_path, model_dir, monkeypatch):
    from modeling_emrfuse.pipeline_emrfuse import load_pipeline

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    shutil.rmtree(model / "grading")  # config.json still names grading_model = "grading"
    elsewhere = tmp_path / "cwd"
    shutil.copytree(model_dir / "grading", elsewhere / "grading")  # a ./grading in the working directory
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ValueError) as info:
        load_pipeline(str(model), device="cpu")
    assert str(model / "grading") in str(info.value) and "--no-grading" in str(info.value)
    # a sibling <folder>-grading is outside the model folder too
    shutil.copytree(model_dir / "grading", tmp_path / "model2-grading")
    shutil.copytree(model, tmp_path / "model2")
    config = json.loads((tmp_path / "model2" / "config.json").read_text())
    config.pop("grading_model")
    (tmp_path / "model2" / "config.json").write_text(json.dumps(config))
    assert load_pipeline(str(tmp_path / "model2"), device="cpu").grading_model is None
    # explicitly given, it is used
    pipe = load_pipeline(str(model), device="cpu", grading_model=str(elsewhere / "grading"))
    assert pipe.grading_model is not None


# ---------------------------------------------------------------------------------------------------------
# 6. qform and sform disagree: one source of spacing (the affine written with the output)
# ---------------------------------------------------------------------------------------------------------
def test_item6_spacing_comes_from_the_affine_used_for_the_output(tmp_path, model_dir, capsys):
    case = write_small_case(tmp_path / "data", shape=(24, 24, 12))
    for path in case.glob("*.nii.gz"):
        img = nib.load(str(path))
        sform = img.affine
        qform = sform.copy()
        qform[:3, :3] *= 2.0  # the qform says 2 mm voxels, the sform (what nibabel uses) 1 mm
        fixed = nib.Nifti1Image(np.asanyarray(img.dataobj), sform)
        fixed.set_qform(qform, code=1)
        fixed.set_sform(sform, code=1)
        nib.save(fixed, str(path))
    with pytest.warns(UserWarning, match=r"Case_001_t1.nii.gz: the qform .*2.0.* and the sform .*1.0.* disagree"):
        volume = read_volume(next(case.glob("*_t1.nii.gz")))
    assert volume.spacing == (1.0, 1.0, 1.0)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeometryWarning)  # the pipeline records it in the result instead
        assert main(["predict", str(case), "--model", str(model_dir), "-o", str(out), "-q"]) == 0
    record = json.loads((out / "Case_001.json").read_text())
    assert record["spacing_mm"] == [1.0, 1.0, 1.0]
    assert any("qform" in w and "disagree" in w for w in record["warnings"])
    written = nib.load(str(out / "Case_001.nii.gz"))
    labels = np.asanyarray(written.dataobj)
    wt = float(np.count_nonzero(labels)) / 1000.0  # 1 mm^3 voxels
    assert record["region_volumes_cm3"]["WT"] == pytest.approx(wt)
    # the label map's qform, sform and zooms all say what the affine says
    assert np.allclose(written.header.get_zooms()[:3], (1.0, 1.0, 1.0))
    assert np.allclose(written.header.get_qform(), written.affine) and np.allclose(written.get_sform(), written.affine)


def test_item6_write_label_map_makes_qform_agree(tmp_path):
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    header = nib.Nifti1Header()
    header.set_qform(np.diag([-2.0, -2.0, 2.0, 1.0]), code=1)
    header.set_sform(affine, code=1)
    path = write_label_map(tmp_path / "lab.nii.gz", np.zeros((4, 4, 4), np.uint8), affine, header)
    img = nib.load(str(path))
    assert np.allclose(img.header.get_qform(), affine) and np.allclose(img.header.get_zooms()[:3], 1.0)


# ---------------------------------------------------------------------------------------------------------
# 7. emrfuse score compares the whole affine, origin included
# ---------------------------------------------------------------------------------------------------------
def test_item7_score_warns_about_a_shifted_prediction(tmp_path, capsys):
    labels = np.zeros((16, 16, 8), np.uint8)
    labels[4:10, 5:11, 2:6] = 2
    labels[6:8, 7:9, 3:5] = 4
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    shifted = affine.copy()
    shifted[:3, 3] = [47.0, -20.0, 5.0]
    for folder, aff in (("ref", affine), ("pred", shifted)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(labels, aff), str(tmp_path / folder / "Case_1_seg.nii.gz"))
    rc = main(
        [
            "score",
            "--pred",
            str(tmp_path / "pred"),
            "--ref",
            str(tmp_path / "ref"),
            "--out",
            str(tmp_path / "scores"),
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert any("Case_1" in w and "origin" in w and "51.3 mm" in w for w in summary["warnings"]), summary["warnings"]
    assert "origin" in captured.err


# ---------------------------------------------------------------------------------------------------------
# 8. voxel spacing other than the model's: an error that names --resample, and --resample
# ---------------------------------------------------------------------------------------------------------
def _anisotropic_case(folder: Path, shape=(24, 24, 8), spacing=(1.0, 1.0, 2.5)) -> Path:
    rng = np.random.default_rng(0)
    case = folder / "Aniso_001"
    case.mkdir(parents=True)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    brain = (x**2 + y**2 + z**2) < 0.8
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [12.0, 18.0, -7.0]
    for i, name in enumerate(("t1", "t1ce", "t2", "flair")):
        data = np.where(brain, 100 + 20 * i + rng.normal(0, 10, shape), 0).astype(np.int16)
        img = nib.Nifti1Image(data, affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(case / f"Aniso_001_{name}.nii.gz"))
    return case


def test_item8_other_spacing_is_resampled_with_the_flag(tmp_path, model_dir, capsys):
    case = _anisotropic_case(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["predict", str(case), "--model", str(model_dir), "-o", str(out), "-q"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "2.5" in line and "--resample" in line

    assert main(["predict", str(case), "--model", str(model_dir), "-o", str(out), "-q", "--resample"]) == 0
    written = nib.load(str(out / "Aniso_001.nii.gz"))
    reference = nib.load(str(case / "Aniso_001_t1.nii.gz"))
    assert written.shape == reference.shape and np.allclose(written.affine, reference.affine)
    record = json.loads((out / "Aniso_001.json").read_text())
    assert record["spacing_mm"] == [1.0, 1.0, 2.5]
    assert record["resampling"]["model_grid"] == [24, 24, 20]
    assert record["resampling"]["model_spacing_mm"] == [1.0, 1.0, 1.0]
    labels = np.asanyarray(written.dataobj)
    assert record["region_volumes_cm3"]["WT"] == pytest.approx(np.count_nonzero(labels) * 2.5 / 1000.0)


def test_item8_resampling_round_trip_keeps_a_smooth_volume():
    from modeling_emrfuse.pipeline_emrfuse import resample_to_shape

    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in (20, 18, 8)], indexing="ij")
    volume = ((x**2 + y**2 + z**2) < 0.6).astype(np.float32)
    up = resample_to_shape(volume, (20, 18, 20))
    assert up.shape == (20, 18, 20)
    back = resample_to_shape(up, volume.shape)
    assert back.shape == volume.shape and np.mean((back > 0.5) == (volume > 0.5)) > 0.97


# ---------------------------------------------------------------------------------------------------------
# 9. the output location is checked before the model is loaded
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["existing_file", "below_a_file", "unwritable"])
def test_item9_bad_output_location_is_one_line_before_loading(tmp_path, case_dir, capsys, where):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    output = {
        "existing_file": existing,
        "below_a_file": existing / "sub",
        "unwritable": Path("/proc/emrfuse-no-such-folder"),
    }[where]
    if where == "unwritable" and not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    missing_model = tmp_path / "no-such-model"  # the output is checked first: the model is never reached
    for inputs in ([str(case_dir)], [str(case_dir.parent)]):  # one case, and a folder of cases (batch mode)
        rc = main(["predict", *inputs, "--model", str(missing_model), "-o", str(output)])
        line = _one_line_error(capsys.readouterr().err)
        assert rc == 2 and "output" in line and str(output) in line and "No model folder" not in line
    assert existing.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------------
# 10. a truncated model.safetensors
# ---------------------------------------------------------------------------------------------------------
def test_item10_truncated_weights_are_one_line(tmp_path, model_dir, case_dir, capsys):
    bad = tmp_path / "truncated"
    shutil.copytree(model_dir, bad)
    path = bad / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rc = main(["predict", str(case_dir), "--model", str(bad), "-o", str(tmp_path / "out"), "-q"])
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 2 and "model.safetensors" in line and "truncated" in line


# ---------------------------------------------------------------------------------------------------------
# also: --revision on a local folder is ignored, and says so
# ---------------------------------------------------------------------------------------------------------
def test_revision_on_a_local_folder_warns(model_dir, case_dir, tmp_path, capsys):
    from modeling_emrfuse.pipeline_emrfuse import load_pipeline

    with pytest.warns(UserWarning, match="revision.*ignored"):
        load_pipeline(str(model_dir), device="cpu", revision="v1.0", grading_model=False)
    rc = main(
        [
            "predict",
            str(case_dir),
            "--model",
            str(model_dir),
            "--revision",
            "v1.0",
            "-o",
            str(tmp_path),
            "-q",
            "--no-grading",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0 and "warning: --revision v1.0 is ignored" in err and "Traceback" not in err
    assert math.isfinite(json.loads((tmp_path / "Case_001.json").read_text())["region_volumes_cm3"]["WT"])
