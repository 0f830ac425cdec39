"""``train.py --with_grading``: a real-data run (not --demo) trains the grading stage after segmentation on the
training cases that have a grade, so the model folder carries ``grading/`` and the pipeline returns a grade.

The data are tiny generated cases (32 x 32 x 24) given as a plain ``--data_dir`` (no --demo, so the real-data
code path runs) with one case's grade removed from the folder's id table; a run takes seconds.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from train_script import load_train_script

from modeling_emrfuse.brats_labels import GRADES, SEQUENCES
from modeling_emrfuse.training.data import RunDataError
from modeling_emrfuse.training.plan import grading_case_counts

ROOT = Path(__file__).resolve().parents[1]
train = load_train_script()

UNGRADED = "BraTS20_Training_001"  # an HGG case of the generator whose grade the id table then drops

TINY_REAL = [
    "--no_text",
    "--eval_fraction",
    "0",
    "--val_fraction",
    "0",
    "--vision_model",
    "resnet18",
    "--fusion_dim",
    "32",
    "--decoder_channels",
    *["16"] * 5,
    "--cross_attention_heads",
    "2",
    "--batch_size",
    "8",
    "--slices_per_case",
    "4",
    "--learning_rate",
    "1e-3",
    "--warmup_steps",
    "1",
    "--max_steps",
    "2",
    "--grading_learning_rate",
    "1e-3",
    "--report_to",
    "none",
    "--logging_steps",
    "1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("ACCELERATE_USE_CPU", None)


def _drop_grade(folder: Path, case_id: str) -> None:
    """Remove ``case_id``'s row from the folder's name_mapping.csv: the case keeps its images and label, not its grade."""
    table = folder / "name_mapping.csv"
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with table.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["BraTS_2020_subject_ID"] != case_id)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from datasets_scripts.demo_data import write_demo_dataset

    base = tmp_path_factory.mktemp("with-grading")
    folder = base / "cases"
    write_demo_dataset(folder, n_cases=6, size=(32, 32, 24), seed=0)
    grades = {r["BraTS_2020_subject_ID"]: r["Grade"] for r in csv.DictReader((folder / "name_mapping.csv").open())}
    assert grades[UNGRADED] == "HGG" and sorted(grades.values()).count("LGG") == 3
    _drop_grade(folder, UNGRADED)
    split = base / "split.json"  # every case trains, as bench_real's final model does
    split.write_text(json.dumps({"train": sorted(grades)}))
    return {"folder": folder, "split": split, "base": base, "grades": grades}


def test_with_grading_trains_on_the_graded_cases_and_the_pipeline_grades(data):
    out = data["base"] / "model"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--data_dir",
        str(data["folder"]),
        "--split_file",
        str(data["split"]),
    ]
    cmd += TINY_REAL + ["--with_grading", "--grading_max_steps", "3", "--cache_dir", str(data["base"] / "cache")]
    cmd += ["--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    log = proc.stdout + proc.stderr
    # 6 training cases, 5 with a grade (2 HGG, 3 LGG): the ungraded one trains the segmentation only
    assert "trained on the 5 training cases with a grade (2 HGG, 3 LGG); 1 without a grade" in log
    assert "frozen towers' features of 5 training cases" in log
    summary = json.loads((out / "eval" / "run_summary.json").read_text())
    assert summary["grading_training_cases"] == {"HGG": 2, "LGG": 3, "without_grade": 1}
    assert summary["grading_run"]["steps"] == 3
    grading = json.loads((out / "grading" / "config.json").read_text())
    assert grading["architectures"] == ["EmrFuseForImageClassification"]
    assert json.loads((out / "config.json").read_text())["grading_model"] == "grading"

    from modeling_emrfuse.pipeline_emrfuse import load_pipeline

    case = data["folder"] / UNGRADED
    files = {s: str(next(case.glob(f"*_{s}.nii.gz"))) for s in SEQUENCES}
    result = load_pipeline(str(out), device="cpu", precision="fp32")(files)
    probs = result["grade_probabilities"]
    assert set(probs) == set(GRADES) and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert result["grade"] == max(probs, key=probs.get)
    assert result["label_map"].shape == (32, 32, 24)


def test_grading_case_counts_leave_ungraded_cases_out_and_need_both_grades():
    cases = [SimpleNamespace(grade=g) for g in ("HGG", "HGG", None, "LGG", "HGG")]
    assert grading_case_counts(cases) == {"HGG": 3, "LGG": 1, "without_grade": 1}
    with pytest.raises(RunDataError, match=r"none of the 3 training cases is LGG"):
        grading_case_counts([SimpleNamespace(grade=g) for g in ("HGG", None, "HGG")])
    with pytest.raises(RunDataError, match=r"is HGG or LGG"):
        grading_case_counts([SimpleNamespace(grade=None)])


def test_with_grading_refuses_one_grade_before_training(data, tmp_path):
    """Every training case HGG or ungraded: the run stops at the data, naming what is missing, before any training."""
    split = tmp_path / "hgg.json"
    hgg = sorted(c for c, g in data["grades"].items() if g == "HGG")
    split.write_text(json.dumps({"train": hgg}))
    args = ["--data_dir", str(data["folder"]), "--split_file", str(split), *TINY_REAL, "--with_grading"]
    args += ["--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(RunDataError, match="none of the 3 training cases is LGG"):
        train.main(args)
    assert not (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "cache").exists()


def test_with_grading_options():
    real = train.parse_args(["--data_dir", "x"])
    assert not real.grading_after_segmentation and real.grading_max_steps == 120
    assert train.parse_args(["--data_dir", "x", "--with_grading"]).grading_after_segmentation
    assert train.parse_args(["--data_dir", "x", "--with_grading", "--task", "segmentation"]).grading_after_segmentation
    for extra in (["--task", "classification"], ["--grading_max_steps", "0"]):
        with pytest.raises(SystemExit, match="--with_grading"):
            train.parse_args(["--data_dir", "x", "--with_grading", *extra])
    assert train.parse_args(["--demo"]).grading_after_segmentation  # the demo's default is unchanged
    assert not train.parse_args(["--demo", "--task", "segmentation"]).grading_after_segmentation
