"""``emrfuse predict`` on demo cases, the real cases in ../shared/realdata, folders of cases and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REALDATA, build_tiny_model_folder, write_small_case

from modeling_emrfuse.brats_labels import get_label_convention
from modeling_emrfuse.commands.cli import main

REPORT = "Ring enhancing mass in the right temporal lobe with necrosis and surrounding oedema."
JSON_FIELDS = {
    "case_id",
    "label_map",
    "label_convention",
    "grade",
    "grade_probabilities",
    "region_volumes_cm3",
    "alpha_text",
    "alpha_image",
    "has_report",
    "report_missing",
    "report_truncated",
    "model",
    "timings_s",
    "shape",
    "spacing_mm",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_folder(tmp_path_factory.mktemp("cli") / "model")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from datasets_scripts.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("cli-demo") / "demo", n_cases=3, size="small", seed=0)


def _check_output(nifti: Path, record_path: Path, reference: Path, convention: str):
    ref = nib.load(str(reference))
    out = nib.load(str(nifti))
    data = np.asanyarray(out.dataobj)
    assert out.shape == ref.shape and data.dtype == np.uint8
    assert np.allclose(out.affine, ref.affine)
    assert np.allclose(out.header.get_zooms()[:3], ref.header.get_zooms()[:3])
    assert int(out.header["sform_code"]) == int(ref.header["sform_code"])
    assert set(np.unique(data).tolist()) <= set(get_label_convention(convention).valid_labels)
    record = json.loads(record_path.read_text())
    assert JSON_FIELDS <= set(record)
    assert record["label_convention"] == convention and record["label_map"] == nifti.name
    assert set(record["region_volumes_cm3"]) == {"WT", "TC", "ET"}
    assert record["model"]["id"] and record["model"]["revision"]
    return record


def test_predict_demo_case(model_dir, demo_dir, tmp_path, capsys):
    case = demo_dir / "BraTS20_Training_001"
    rc = main(["predict", str(case), "--model", str(model_dir), "-o", str(tmp_path), "--report", REPORT])
    assert rc == 0
    record = _check_output(
        tmp_path / "BraTS20_Training_001.nii.gz",
        tmp_path / "BraTS20_Training_001.json",
        case / "BraTS20_Training_001_flair.nii.gz",
        "brats2017",
    )
    assert record["has_report"] and record["report_source"] == "argument"
    assert abs(sum(record["grade_probabilities"].values()) - 1) < 1e-5
    assert REPORT not in (tmp_path / "BraTS20_Training_001.json").read_text()  # the report is never written
    assert REPORT not in capsys.readouterr().out


def test_predict_label_convention_report_file_and_file_output(model_dir, demo_dir, tmp_path):
    case = demo_dir / "BraTS20_Training_002"
    report_file = tmp_path / "report.txt"
    report_file.write_text(REPORT, encoding="utf-8")
    out = tmp_path / "out" / "pred.nii.gz"
    rc = main(
        [
            "predict",
            str(case),
            "--model",
            str(model_dir),
            "-o",
            str(out),
            "--report-file",
            str(report_file),
            "--label-convention",
            "brats2023",
            "--save-attention",
            "-q",
        ]
    )
    assert rc == 0
    record = _check_output(out, out.with_name("pred.json"), case / "BraTS20_Training_002_t1.nii.gz", "brats2023")
    assert record["report_source"] == "file" and record["words"][0]["word"] == "Ring"


def test_predict_explicit_files_and_case_report(model_dir, demo_dir, tmp_path):
    case = demo_dir / "BraTS20_Training_003"
    args = ["predict", "--model", str(model_dir), "-o", str(tmp_path), "-q"]
    for seq in ("t1", "t1ce", "t2", "flair"):
        args += [f"--{seq}", str(case / f"BraTS20_Training_003_{seq}.nii.gz")]
    assert main(args) == 0
    record = _check_output(
        tmp_path / "BraTS20_Training_003.nii.gz",
        tmp_path / "BraTS20_Training_003.json",
        case / "BraTS20_Training_003_t1.nii.gz",
        "brats2017",
    )
    assert record["report_missing"]  # files named explicitly: no report unless given
    # the case folder's own TextBraTS report is used when the folder is given
    assert main(["predict", str(case), "--model", str(model_dir), "-o", str(tmp_path / "f"), "-q"]) == 0
    record = json.loads((tmp_path / "f" / "BraTS20_Training_003.json").read_text())
    assert record["has_report"] and record["report_source"] == "case folder"


def test_predict_folder_of_cases_with_a_bad_case(model_dir, demo_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    (data / "BraTS20_Training_002" / "BraTS20_Training_002_t2.nii.gz").unlink()  # missing sequence
    (data / "BraTS20_Training_003" / "BraTS20_Training_003_t1.nii.gz").write_bytes(b"")  # empty file
    out = tmp_path / "pred"
    rc = main(["predict", str(data), "--model", str(model_dir), "-o", str(out)])
    assert rc == 1  # some cases failed; the others finished
    assert (out / "BraTS20_Training_001.nii.gz").is_file() and (out / "BraTS20_Training_001.json").is_file()
    summary = json.loads((out / "predict_summary.json").read_text())
    failed = {f["case_id"]: f["reason"] for f in summary["failed"]}
    assert summary["predicted"] == ["BraTS20_Training_001"]
    assert "missing sequence" in failed["BraTS20_Training_002"] and "empty" in failed["BraTS20_Training_003"]
    err = capsys.readouterr().err
    assert "2 failed" in err and "BraTS20_Training_003" in err and "Traceback" not in err


def _real_case(name):
    folder = REALDATA / name
    if not folder.is_dir():
        pytest.skip(f"real data not available: {folder} is absent (it is not part of a fresh clone)")
    return folder


def test_predict_real_case_tcga(model_dir, tmp_path):
    case = _real_case("TCGA-DU-7294")
    assert (
        main(["predict", str(case), "--model", str(model_dir), "-o", str(tmp_path), "-q", "--grading-slices", "16"])
        == 0
    )
    record = _check_output(
        tmp_path / "TCGA-DU-7294.nii.gz",
        tmp_path / "TCGA-DU-7294.json",
        case / "TCGA-DU-7294_flair.nii.gz",
        "brats2017",
    )
    assert record["shape"] == [240, 240, 155] and record["spacing_mm"] == [1.0, 1.0, 1.0]


def test_predict_real_case_brats2023_files(model_dir, tmp_path):
    case = _real_case("BraTS-GLI-00001-000")
    args = ["predict", "--model", str(model_dir), "-o", str(tmp_path), "-q", "--grading-slices", "16"]
    for seq, name in (("t1", "t1n"), ("t1ce", "t1c"), ("t2", "t2w"), ("flair", "t2f")):
        args += [f"--{seq}", str(case / f"BraTS-GLI-00001-000-{name}.nii.gz")]
    assert main(args) == 0
    _check_output(
        tmp_path / "BraTS-GLI-00001-000.nii.gz",
        tmp_path / "BraTS-GLI-00001-000.json",
        case / "BraTS-GLI-00001-000-t2f.nii.gz",
        "brats2023",
    )


def _files(case: Path):
    return {s: case / f"{case.name}_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair")}


@pytest.mark.parametrize("problem", ["missing", "shape", "affine", "not_nifti", "empty", "no_input", "absent", "model"])
def test_bad_input_gives_a_message_and_exit_2(model_dir, tmp_path, capsys, problem):
    case = write_small_case(tmp_path, shape=(16, 16, 8))
    files = _files(case)
    model = str(model_dir)
    expected = {
        "missing": "missing sequence",
        "shape": "different shapes",
        "affine": "different affines",
        "not_nifti": "not a NIfTI",
        "empty": "empty",
        "no_input": "give a case folder",
        "absent": "does not exist",
        "model": "No model folder",
    }[problem]
    if problem == "missing":
        files.pop("t2")
    elif problem == "shape":
        ref = nib.load(str(files["t2"]))
        nib.save(nib.Nifti1Image(np.ones((16, 16, 7), np.int16), ref.affine), str(files["t2"]))
    elif problem == "affine":
        ref = nib.load(str(files["flair"]))
        nib.save(
            nib.Nifti1Image(np.asanyarray(ref.dataobj), ref.affine @ np.diag([1, 1, 1.0, 1]) + 0.5), str(files["flair"])
        )
    elif problem == "not_nifti":
        files["t1"] = tmp_path / "t1.txt"
        files["t1"].write_text("not an image")
    elif problem == "empty":
        files["t1ce"].write_bytes(b"")
    elif problem == "model":
        model = str(tmp_path / "no-such-model")
    args = ["predict", "--model", model, "-o", str(tmp_path / "out")]
    if problem == "no_input":
        pass
    elif problem == "absent":
        args.insert(1, str(tmp_path / "no-such-case"))
    else:
        for seq, path in files.items():
            args += [f"--{seq}", str(path)]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "emrfuse predict: error:" in err and expected in err and "Traceback" not in err


def test_bad_input_in_a_fresh_process_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "modeling_emrfuse.commands.cli", "predict", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_predict_two_sequences_needs_allow_missing_sequences(model_dir, tmp_path, capsys):
    case = write_small_case(tmp_path / "data", shape=(32, 32, 16))
    files = _files(case)
    args = [
        "predict",
        "--model",
        str(model_dir),
        "-o",
        str(tmp_path / "out"),
        "--t1ce",
        str(files["t1ce"]),
        "--flair",
        str(files["flair"]),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (
        "emrfuse predict: error:" in err
        and "missing sequence(s) ['t1', 't2']" in err
        and "--allow-missing-sequences" in err
    )
    assert not (tmp_path / "out").exists()

    assert main(args + ["--allow-missing-sequences", "--report", REPORT]) == 0
    captured = capsys.readouterr()
    assert "missing sequence(s) t1, t2 (zero-filled)" in captured.out and REPORT not in captured.out + captured.err
    record = _check_output(
        tmp_path / "out" / "Case_001.nii.gz", tmp_path / "out" / "Case_001.json", files["flair"], "brats2017"
    )
    assert record["missing_sequences"] == ["t1", "t2"]
    assert set(record["inputs"]) == {"t1ce", "flair"}
    # the tiny model has no sequence-presence channels: the JSON (and stderr) say so
    assert len(record["warnings"]) == 1 and "not trained to know which sequences are missing" in record["warnings"][0]
    assert "warning:" in captured.err


def test_predict_case_folder_with_missing_sequences(model_dir, tmp_path, capsys):
    case = write_small_case(tmp_path / "data", shape=(32, 32, 16))
    for seq in ("t1", "t2"):
        _files(case)[seq].unlink()
    args = ["predict", str(case), "--model", str(model_dir), "-o", str(tmp_path / "out"), "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "missing sequence(s) ['t1', 't2']" in err and "--allow-missing-sequences" in err
    assert main(args + ["--allow-missing-sequences"]) == 0
    record = json.loads((tmp_path / "out" / "Case_001.json").read_text())
    assert record["missing_sequences"] == ["t1", "t2"] and record["warnings"]
    # a complete case records an empty list
    full = write_small_case(tmp_path / "full", shape=(32, 32, 16), case_id="Case_002")
    assert (
        main(
            [
                "predict",
                str(full),
                "--model",
                str(model_dir),
                "-o",
                str(tmp_path / "out2"),
                "-q",
                "--allow-missing-sequences",
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "out2" / "Case_002.json").read_text())
    assert record["missing_sequences"] == [] and record["warnings"] == []


def test_a_case_is_discovered_once_and_carried_to_the_written_files(model_dir, tmp_path, monkeypatch):
    """find_cases discovers the folder once; the pipeline reads each discovered case as it is (no second
    discovery of its folder), and the record names the files that discovery found."""
    from modeling_emrfuse import brats_io
    from modeling_emrfuse.commands import predict as predict_cli

    data = tmp_path / "data"
    for i in (1, 2):
        write_small_case(data, shape=(24, 24, 12), seed=i, case_id=f"Case_00{i}")
    calls = []
    discover = brats_io.discover_cases

    def counting(root, *args, **kwargs):
        calls.append(Path(root))
        return discover(root, *args, **kwargs)

    monkeypatch.setattr(brats_io, "discover_cases", counting)
    monkeypatch.setattr(predict_cli, "discover_cases", counting)
    assert main(["predict", str(data), "--model", str(model_dir), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert calls == [data]
    record = json.loads((tmp_path / "out" / "Case_002.json").read_text())
    assert record["case_id"] == "Case_002" and JSON_FIELDS <= set(record)
    assert record["inputs"]["flair"] == str(data / "Case_002" / "Case_002_flair.nii.gz")


# ------------------------------------------------------------------------------------------ several processes
ROOT = Path(__file__).resolve().parents[1]
SPY = """
import os, sys
from modeling_emrfuse.commands import predict as predict_cli

log = os.environ["EMRFUSE_TEST_SPY_DIR"]
rank = os.environ.get("RANK", "single")
predict_one, write_summary = predict_cli._predict_one, predict_cli._write_summary

def spy_one(pipe, case, *args, **kwargs):
    with open(os.path.join(log, f"cases-{rank}.txt"), "a") as f:
        f.write(case.case_id + "\\n")
    return predict_one(pipe, case, *args, **kwargs)

def spy_summary(*args, **kwargs):
    with open(os.path.join(log, "summaries.txt"), "a") as f:
        f.write(rank + "\\n")
    return write_summary(*args, **kwargs)

predict_cli._predict_one, predict_cli._write_summary = spy_one, spy_summary
from modeling_emrfuse.commands.cli import main
sys.exit(main())
"""


def _outputs(folder: Path):
    """Label maps (array, affine) and JSON records without timings, per case file."""
    maps = {p.name: (np.asanyarray(nib.load(str(p)).dataobj), nib.load(str(p)).affine) for p in folder.glob("*.nii.gz")}
    records = {}
    for p in folder.glob("*.json"):
        record = json.loads(p.read_text())
        record.pop("timings_s", None)
        records[p.name] = record
    return maps, records


def test_predict_folder_of_cases_with_two_processes(model_dir, tmp_path):
    """torchrun --nproc_per_node 2 on CPU: each case predicted once by one process, one summary (written by the
    main process) that reports the broken case, outputs identical to a single-process run."""
    data = tmp_path / "data"
    ids = [f"Case_{i:03d}" for i in range(1, 6)]
    for i, case_id in enumerate(ids):
        write_small_case(data, shape=(24, 24, 12), seed=i, case_id=case_id)
    (data / "Case_004" / "Case_004_t2.nii.gz").write_bytes(b"not a nifti file")  # fails while it is read
    spy = tmp_path / "spy.py"
    spy.write_text(SPY)
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    args = ["predict", str(data), "--model", str(model_dir), "-q", "--threads", "1", "--precision", "fp32"]
    runs = {}
    for name, launcher in (
        ("single", [sys.executable]),
        ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]),
    ):
        logs = tmp_path / f"spy-{name}"
        logs.mkdir()
        proc = subprocess.run(
            launcher + [str(spy), *args, "-o", str(tmp_path / name)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**env, "EMRFUSE_TEST_SPY_DIR": str(logs)},
        )
        runs[name] = (proc, logs)
    single, two = runs["single"][0], runs["two"][0]
    assert single.returncode == 1, single.stderr[-3000:]  # one case failed, the others were written
    assert two.returncode == 1, two.stderr[-3000:]  # (torchrun exits with 1 when a process does)
    assert "4 case(s) predicted" in two.stderr and "Case_004" in two.stderr
    logs = runs["two"][1]
    per_rank = {r: (logs / f"cases-{r}.txt").read_text().split() for r in ("0", "1")}
    assert per_rank["0"] and per_rank["1"]  # both processes took a share
    assert sorted(per_rank["0"] + per_rank["1"]) == ids  # every case exactly once
    assert (logs / "summaries.txt").read_text().split() == ["0"]  # one summary, by the main process
    summary = json.loads((tmp_path / "two" / "predict_summary.json").read_text())
    assert summary["predicted"] == [i for i in ids if i != "Case_004"]
    assert [f["case_id"] for f in summary["failed"]] == ["Case_004"] and "t2" in summary["failed"][0]["reason"]
    expected = json.loads((tmp_path / "single" / "predict_summary.json").read_text())
    assert {k: v for k, v in summary.items() if k != "output_dir"} == {
        k: v for k, v in expected.items() if k != "output_dir"
    }
    (maps_1, records_1), (maps_2, records_2) = _outputs(tmp_path / "single"), _outputs(tmp_path / "two")
    assert sorted(maps_2) == sorted(maps_1) == [f"{i}.nii.gz" for i in ids if i != "Case_004"]
    for name, (array, affine) in maps_1.items():
        assert np.array_equal(maps_2[name][0], array) and np.array_equal(maps_2[name][1], affine)
    records_1.pop("predict_summary.json"), records_2.pop("predict_summary.json")
    assert records_2 == records_1


def test_help_and_argument_errors_import_no_torch():
    """``emrfuse predict --help`` and a bad argument answer without importing torch (the CLI's defaults repeat the
    pipeline's, checked here to be equal)."""
    import subprocess
    import sys

    from modeling_emrfuse import pipeline_emrfuse
    from modeling_emrfuse.commands import predict

    assert predict.DEFAULT_MODEL == pipeline_emrfuse.DEFAULT_MODEL
    assert predict.DEFAULT_MAX_REPORT_CHARS == pipeline_emrfuse.DEFAULT_MAX_REPORT_CHARS
    probe = (
        "import sys\n"
        "from modeling_emrfuse.commands.cli import main\n"
        "try:\n"
        "    rc = main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    rc = exc.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)\n"
    )
    for argv in (["predict", "--help"], ["predict", "/no/such/case", "-o", "/tmp/emrfuse-none"]):
        out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().splitlines()[-1].startswith("NO-TORCH"), (argv, out.stdout[-300:], out.stderr[-300:])


def test_predict_probe_stride_reaches_the_pipeline_and_the_record(model_dir, demo_dir, tmp_path, capsys):
    case = demo_dir / "BraTS20_Training_001"
    rc = main(["predict", str(case), "--model", str(model_dir), "-o", str(tmp_path / "exact"), "--no-grading"])
    assert rc == 0
    argv = ["predict", str(case), "--model", str(model_dir), "-o", str(tmp_path / "slab"), "--no-grading"]
    assert main(argv + ["--probe-stride", "3", "--probe-margin", "1", "--probe-box-margin", "16"]) == 0
    exact = json.loads((tmp_path / "exact" / "BraTS20_Training_001.json").read_text())
    slab = json.loads((tmp_path / "slab" / "BraTS20_Training_001.json").read_text())
    assert exact["probe_stride"] == 1 and slab["probe_stride"] == 3
    assert exact["probe_box_margin"] is None and slab["probe_box_margin"] == 16
    for bad in (["--probe-stride", "0"], ["--probe-margin", "-1"], ["--probe-stride", "two"]):
        with pytest.raises(SystemExit) as exc:
            main(argv + bad)
        assert exc.value.code == 2
        assert "must be >=" in capsys.readouterr().err or bad[1] == "two"
