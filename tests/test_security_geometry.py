"""Issue 20: no code runs from a model folder unasked, pickles are never loaded, case ids stay inside ``-o``,
reports are capped, geometry is never guessed silently, the JSON record carries what the README names, and
bad arguments of ``demo-data`` / ``prepare`` are one line. The Space's items (11, 12) live in ``test_space.py``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import build_tiny_model_folder, write_small_case

from modeling_emrfuse.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]
SECRET = "Zanzibarian patient Quaxley"  # stands for report text: it must never reach stderr, stdout or the JSON


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_folder(tmp_path_factory.mktemp("security") / "model")


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    return write_small_case(tmp_path_factory.mktemp("security-data"), shape=(24, 24, 12))


def _one_line_error(err: str, prefix: str = "emrfuse predict: error:") -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


def _predict(args, capsys):
    rc = main(["predict", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---------------------------------------------------------------------------------------------------------
# 1. code named by a folder's auto_map runs only with --trust-remote-code
# ---------------------------------------------------------------------------------------------------------
def _evil_copy(model_dir: Path, folder: Path, marker: Path) -> Path:
    """A copy of the model folder whose config (and processor) auto_map name ``evil_cfg.py``, which writes
    ``marker`` when imported and then offers the real classes."""
    shutil.copytree(model_dir, folder)
    (folder / "evil_cfg.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertTokenizer\n"
        "from .configuration_emrfuse import EmrFuseConfig\n"
        "from .processing_emrfuse import EmrFuseProcessor\n"
        "class EvilTokenizer(BertTokenizer):\n"
        "    pass\n",
        encoding="utf-8",
    )
    for name, key, target in (
        ("config.json", "AutoConfig", "evil_cfg.EmrFuseConfig"),
        ("processor_config.json", "AutoProcessor", "evil_cfg.EmrFuseProcessor"),
        ("tokenizer_config.json", "AutoTokenizer", ["evil_cfg.EvilTokenizer", None]),
    ):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            data.setdefault("auto_map", {})[key] = target
            path.write_text(json.dumps(data), encoding="utf-8")
    return folder


def test_item1_folder_code_does_not_run_without_the_flag(tmp_path, model_dir, case_dir, capsys):
    marker = tmp_path / "marker.txt"
    evil = _evil_copy(model_dir, tmp_path / "evil-model", marker)
    rc, out, err = _predict([case_dir, "--model", evil, "-o", tmp_path / "out", "-q"], capsys)
    assert rc == 0, err
    assert not marker.exists(), "code from the model folder ran without --trust-remote-code"
    assert json.loads((tmp_path / "out" / "Case_001.json").read_text())["grade"] in ("HGG", "LGG")

    from modeling_emrfuse.pipeline_emrfuse import load_pipeline

    pipe = load_pipeline(str(evil), device="cpu")
    assert not marker.exists()
    assert type(pipe.model).__module__ == "modeling_emrfuse.modeling_emrfuse"  # the installed classes
    assert type(pipe.grading_model).__module__ == "modeling_emrfuse.modeling_emrfuse"
    assert type(pipe.processor).__module__ == "modeling_emrfuse.processing_emrfuse"


def test_item1_folder_code_runs_only_with_the_flag(tmp_path, model_dir, case_dir, capsys):
    marker = tmp_path / "marker.txt"
    evil = _evil_copy(model_dir, tmp_path / "evil-model-flag", marker)
    rc, out, err = _predict(
        [case_dir, "--model", evil, "-o", tmp_path / "out", "-q", "--no-grading", "--trust-remote-code"], capsys
    )
    assert marker.exists() and rc == 0, err


def test_item1_a_folder_of_another_model_type_is_refused(tmp_path, model_dir, case_dir, capsys):
    other = tmp_path / "bert-model"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "bert"
    (other / "config.json").write_text(json.dumps(config))
    rc, out, err = _predict([case_dir, "--model", other, "-o", tmp_path / "out", "-q"], capsys)
    line = _one_line_error(err)
    assert rc == 2 and "config.json" in line and "'bert'" in line and "emrfuse" in line


# ---------------------------------------------------------------------------------------------------------
# 2. a pickled pytorch_model.bin is refused, never unpickled
# ---------------------------------------------------------------------------------------------------------
def test_item2_pickled_weights_are_refused_unread(tmp_path, model_dir, case_dir, capsys, monkeypatch):
    import pickle

    import torch

    pickled = tmp_path / "pickled-model"
    shutil.copytree(model_dir, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    rc, out, err = _predict([case_dir, "--model", pickled, "-o", tmp_path / "out", "-q"], capsys)
    line = _one_line_error(err)
    assert rc == 2 and "pytorch_model.bin" in line and "pickle" in line and "safetensors" in line


# ---------------------------------------------------------------------------------------------------------
# 3. a case id is a file name inside -o, never a path
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", ["../escaped", "/tmp/emrfuse-escaped", "..", "a\\b"])
def test_item3_case_id_cannot_write_outside_the_output(tmp_path, model_dir, case_dir, capsys, case_id):
    out = tmp_path / "deep" / "out"
    rc, _, err = _predict([case_dir, "--model", model_dir, "-o", out, "--case-id", case_id, "-q"], capsys)
    line = _one_line_error(err)
    assert rc == 2 and "--case-id" in line and "file name" in line
    assert not list(tmp_path.rglob("*.json")) and not Path("/tmp/emrfuse-escaped.json").exists()


# ---------------------------------------------------------------------------------------------------------
# 4. reports are capped (and the text never echoed)
# ---------------------------------------------------------------------------------------------------------
def test_item4_a_huge_report_is_capped_and_said_so(tmp_path, model_dir, case_dir, capsys):
    report = tmp_path / "report.txt"
    report.write_text((SECRET + " mass. ") * 40000, encoding="utf-8")  # about 1.1 MB
    out = tmp_path / "out"
    rc, stdout, err = _predict(
        [
            case_dir,
            "--model",
            model_dir,
            "-o",
            out,
            "--report-file",
            report,
            "--max-report-chars",
            2000,
            "--no-grading",
        ],
        capsys,
    )
    assert rc == 0, err
    text = (out / "Case_001.json").read_text()
    record = json.loads(text)
    assert record["report_capped"] and record["report_truncated"] and record["has_report"]
    assert any("2000 characters" in w for w in record["warnings"])
    assert "2000 characters" in err  # the warning on stderr as well
    assert SECRET not in text and SECRET not in stdout and SECRET not in err


def test_item4_case_folder_report_is_read_only_up_to_the_cap(tmp_path, model_dir):
    from modeling_emrfuse.pipeline_emrfuse import load_pipeline

    case = write_small_case(tmp_path, shape=(24, 24, 12))
    (case / "Case_001_flair_text.txt").write_text("mass " * 50000, encoding="utf-8")
    pipe = load_pipeline(str(model_dir), device="cpu", grading_model=False)
    result = pipe(str(case), max_report_chars=100)
    assert result["report_capped"] and result["report_source"] == "case folder"
    uncapped = pipe(str(case), report="mass " * 10)
    assert not uncapped["report_capped"]
    with pytest.raises(ValueError, match="max_report_chars"):
        pipe(str(case), max_report_chars=0)


def test_item4_report_file_that_is_a_folder(tmp_path, model_dir, case_dir, capsys):
    rc, _, err = _predict([case_dir, "--model", model_dir, "-o", tmp_path / "out", "--report-file", tmp_path], capsys)
    line = _one_line_error(err)
    assert rc == 2 and "is a folder" in line and "does not exist" not in line


# ---------------------------------------------------------------------------------------------------------
# 5. a header without orientation: a named assumption, in the JSON and on stderr
# ---------------------------------------------------------------------------------------------------------
def _rewrite_case(case: Path, edit) -> None:
    for path in sorted(case.glob("*.nii.gz")):
        img = nib.load(str(path))
        nib.save(edit(np.asarray(img.dataobj), img), str(path))


def test_item5_no_orientation_is_a_warning_naming_the_assumption(tmp_path, model_dir, capsys):
    case = write_small_case(tmp_path, shape=(24, 24, 12))

    def no_orientation(data, img):
        out = nib.Nifti1Image(data, None)
        out.header.set_zooms((1.0, 1.0, 1.0))
        out.set_qform(None, code=0)
        out.set_sform(None, code=0)
        return out

    _rewrite_case(case, no_orientation)
    assert int(nib.load(str(next(case.glob("*.nii.gz")))).header["qform_code"]) == 0
    rc, _, err = _predict([case, "--model", model_dir, "-o", tmp_path / "out", "--no-grading"], capsys)
    assert rc == 0, err
    record = json.loads((tmp_path / "out" / "Case_001.json").read_text())
    warning = next(w for w in record["warnings"] if "no orientation" in w)
    assert "qform_code = sform_code = 0" in warning and "LAS" in warning and "Case_001" in warning
    assert record["reoriented_from"] == "LAS"
    assert "no orientation" in err


# ---------------------------------------------------------------------------------------------------------
# 6. a sheared affine: volumes from |det|, and a warning
# ---------------------------------------------------------------------------------------------------------
def test_item6_sheared_affine_volumes_use_the_determinant(tmp_path, model_dir, capsys):
    from modeling_emrfuse.brats_io import affine_shear_degrees, affine_voxel_volume

    case = write_small_case(tmp_path, shape=(24, 24, 12))
    shear = np.diag([-1.0, -1.0, 1.0, 1.0])
    shear[0, 1] = 0.3  # the second voxel axis leans 16.7 degrees: column norms overstate the voxel volume 4.4 %
    assert affine_voxel_volume(shear) == pytest.approx(1.0)
    assert np.prod(np.linalg.norm(shear[:3, :3], axis=0)) == pytest.approx(1.044, abs=1e-3)
    assert affine_shear_degrees(shear) == pytest.approx(16.7, abs=0.1)
    assert affine_shear_degrees(np.diag([-1.0, -1.0, 1.0, 1.0])) == 0.0

    _rewrite_case(case, lambda data, img: nib.Nifti1Image(data, shear))
    rc, _, err = _predict([case, "--model", model_dir, "-o", tmp_path / "out", "--no-grading", "--resample"], capsys)
    assert rc == 0, err
    record = json.loads((tmp_path / "out" / "Case_001.json").read_text())
    labels = np.asarray(nib.load(str(tmp_path / "out" / "Case_001.nii.gz")).dataobj)
    wt_voxels = int((labels > 0).sum())
    assert wt_voxels > 0
    assert record["region_volumes_cm3"]["WT"] == pytest.approx(wt_voxels / 1000.0, rel=1e-6)  # |det| = 1 mm^3
    assert any("sheared" in w and "16.7" in w for w in record["warnings"])
    assert "sheared" in err


# ---------------------------------------------------------------------------------------------------------
# 7. the JSON record carries every field the README names
# ---------------------------------------------------------------------------------------------------------
def _readme_record_fields() -> list:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("The record's fields (never the report text):", 1)[1].split("####", 1)[0]
    fields = []
    for line in section.splitlines():
        match = re.match(r"- ((?:`\w+`(?:, )?)+):", line)
        if match:
            fields += re.findall(r"`(\w+)`", match.group(1))
    return fields


def test_item7_record_has_every_field_the_readme_names(tmp_path, model_dir, case_dir, capsys):
    fields = _readme_record_fields()
    assert {"reoriented_from", "report_capped", "warnings", "region_volumes_cm3"} <= set(fields)
    rc, _, err = _predict([case_dir, "--model", model_dir, "-o", tmp_path / "out", "-q"], capsys)
    assert rc == 0, err
    record = json.loads((tmp_path / "out" / "Case_001.json").read_text())
    assert [f for f in fields if f not in record] == []
    assert record["reoriented_from"] is None  # an LPS case


def test_item7_reoriented_from_reaches_the_record(tmp_path, model_dir, capsys):
    case = write_small_case(tmp_path, shape=(24, 24, 12))
    _rewrite_case(case, lambda data, img: nib.Nifti1Image(data[::-1].copy(), np.diag([1.0, -1.0, 1.0, 1.0])))
    rc, _, err = _predict([case, "--model", model_dir, "-o", tmp_path / "out", "-q", "--no-grading"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "out" / "Case_001.json").read_text())["reoriented_from"] == "RPS"


# ---------------------------------------------------------------------------------------------------------
# 10. demo-data and prepare: bad arguments are one line, exit 2
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_cases", ["0", "-3"])
def test_item10_demo_data_needs_at_least_one_case(tmp_path, capsys, n_cases):
    rc = main(["demo-data", str(tmp_path / "demo"), "--n-cases", n_cases])
    line = _one_line_error(capsys.readouterr().err, "emrfuse demo-data: error:")
    assert rc == 2 and "--n-cases" in line and not (tmp_path / "demo").exists()


def test_item10_demo_data_output_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    rc = main(["demo-data", str(target), "--n-cases", "1"])
    line = _one_line_error(capsys.readouterr().err, "emrfuse demo-data: error:")
    assert rc == 2 and "a-file" in line and "is a file" in line and target.read_text() == "keep me"
    rc = main(["demo-data", str(target / "below"), "--n-cases", "1"])
    assert rc == 2 and "which is a file" in capsys.readouterr().err


def test_item10_prepare_output_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "existing.txt"
    target.write_text("keep me")
    rc = main(["prepare", str(tmp_path), "-o", str(target)])
    line = _one_line_error(capsys.readouterr().err, "emrfuse prepare:")
    assert rc == 2 and "existing.txt" in line and "is a file" in line and target.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------------
# also: constant images, a corrupt tokenizer.json, writes that are atomic
# ---------------------------------------------------------------------------------------------------------
def test_constant_image_is_not_called_all_zero(tmp_path, model_dir, capsys):
    case = write_small_case(tmp_path, shape=(24, 24, 12))
    flair = next(case.glob("*_flair.nii.gz"))
    img = nib.load(str(flair))
    nib.save(nib.Nifti1Image(np.full(img.shape, 7, dtype=np.int16), img.affine), str(flair))
    rc, _, err = _predict([case, "--model", model_dir, "-o", tmp_path / "out", "-q"], capsys)
    line = _one_line_error(err)
    assert rc == 2 and "'flair'" in line and "one intensity (7)" in line and "all zero" not in line


def test_corrupt_tokenizer_json_is_named(tmp_path, model_dir, case_dir, capsys):
    broken = tmp_path / "broken-tokenizer"
    shutil.copytree(model_dir, broken)
    path = broken / "tokenizer.json"
    path.write_text(path.read_text()[:200], encoding="utf-8")
    rc, _, err = _predict([case_dir, "--model", broken, "-o", tmp_path / "out", "-q"], capsys)
    line = _one_line_error(err)
    assert rc == 2 and "tokenizer.json" in line and "not valid JSON" in line


def test_writes_go_through_a_temporary_name(tmp_path, monkeypatch):
    from modeling_emrfuse.brats_io import write_label_map
    from modeling_emrfuse.runtime.strict_json import write_json

    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    target = write_label_map(tmp_path / "case.nii.gz", labels, np.eye(4))
    assert np.array_equal(np.asarray(nib.load(str(target)).dataobj), labels)
    write_json(tmp_path / "case.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.json", "case.nii.gz"]  # no temporary file left

    def killed(img, filename):  # a run killed halfway through the write
        Path(filename).write_bytes(b"\x1f\x8b half")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        write_label_map(tmp_path / "other.nii.gz", labels, np.eye(4))
    with pytest.raises(KeyboardInterrupt):
        write_label_map(tmp_path / "case.nii.gz", labels + 1, np.eye(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.json", "case.nii.gz"]
    monkeypatch.undo()
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "case.nii.gz")).dataobj), labels)  # the old one, whole
    with pytest.raises(TypeError):
        write_json(tmp_path / "case.json", {"a": object()})
    assert json.loads((tmp_path / "case.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.json", "case.nii.gz"]
