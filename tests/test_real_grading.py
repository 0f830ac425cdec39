"""bench/real_grading.py: out-of-fold P(HGG) of the real-data cross-validation next to the enhancing-fraction
baseline, and the grading stage of its runs, on fake run folders: no training, no real data."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from modeling_emrfuse.evaluation.grading_control import fit_threshold

ROOT = Path(__file__).resolve().parents[1]
real_grading = importlib.import_module("real_grading")


def _write_grading_run(run_dir: Path, probs, train_features, train_grades):
    (run_dir / "grading" / "eval").mkdir(parents=True)
    with (run_dir / "grading" / "eval" / "per_case.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case_id", "grade", "prob_HGG", "prob_LGG"])
        writer.writeheader()
        for cid, p in probs.items():
            writer.writerow({"case_id": cid, "grade": "", "prob_HGG": p, "prob_LGG": 1 - p})
    rule = fit_threshold(train_features, train_grades)
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    control = {"grading_control": {"rule": dataclasses.asdict(rule)}}
    (run_dir / "eval" / "run_summary.json").write_text(json.dumps(control))


def test_grading_columns_and_table_from_a_fake_fold_run(tmp_path):
    run = tmp_path / "cv-fold0-image"
    # training cases: HGG enhance (fraction >= 0.2), LGG do not (<= 0.05): the rule calls LGG below ~0.125
    _write_grading_run(run, {"a": 0.9, "b": 0.3, "c": 0.6}, [0.3, 0.25, 0.2, 0.05, 0.0], ["HGG"] * 3 + ["LGG"] * 2)
    rows = [
        {"case_id": "a", "enhancing_fraction": "0.4"},
        {"case_id": "b", "enhancing_fraction": "0.01"},
        {"case_id": "c", "enhancing_fraction": "nan"},  # no tumour predicted: the rule's fallback (HGG)
    ]
    real_grading.add_grading_columns(run, rows)
    assert [r["p_hgg"] for r in rows] == [0.9, 0.3, 0.6]
    assert [r["control_grade"] for r in rows] == ["HGG", "LGG", "HGG"]
    # a run without a grading stage is left as it was
    plain = [{"case_id": "a", "enhancing_fraction": "0.4"}]
    assert real_grading.add_grading_columns(tmp_path / "no-grading", plain) == [
        {"case_id": "a", "enhancing_fraction": "0.4"}
    ]

    per_case = {r["case_id"]: {"image": {**r, "fold": 1}} for r in rows}
    grades = {"a": "HGG", "b": "LGG", "c": None}
    cases = [SimpleNamespace(case_id=c, grade=g) for c, g in grades.items()]
    cohort = SimpleNamespace(attached=SimpleNamespace(cases=cases))
    result, lines = {}, []
    real_grading.report_grading(per_case, cohort, tmp_path, result, lines)
    text = "\n".join(lines)
    assert "sanity check, not a figure of merit" in text and "With 1 LGG case(s)" in text
    assert (
        "| b | image | 1 | LGG | 0.30 | 0.010 | LGG |" in text
        and "| c | image | 1 | unknown | 0.60 | n/a | HGG |" in text
    )
    entry = result["cv_grading"]["image"]
    assert entry["n"] == 2 and entry["model"]["balanced_accuracy"] == 1.0 and entry["model"]["roc_auc"] == 1.0
    assert entry["baseline"]["balanced_accuracy"] == 1.0
    table = list(csv.DictReader((tmp_path / "cv_grading.csv").open()))
    assert [r["case_id"] for r in table] == ["a", "b", "c"] and table[1]["control_grade"] == "LGG"


def test_grading_args_need_both_grades():
    cases = [SimpleNamespace(case_id=c, grade=g) for c, g in (("a", "HGG"), ("b", "LGG"), ("c", None))]
    cohort = SimpleNamespace(attached=SimpleNamespace(cases=cases))
    args = SimpleNamespace(grading_steps=50, learning_rate=1e-3)
    assert real_grading.grading_args(args, cohort, ["a", "b", "c"], "x") == [
        "--with_grading",
        "--grading_max_steps",
        "50",
        "--grading_learning_rate",
        "0.001",
    ]
    assert real_grading.grading_args(args, cohort, ["a", "c"], "x") == []
    assert real_grading.grading_args(args, cohort, ["a", "b"], "x", enabled=False) == []


def test_cv_grading_needs_cross_validation(tmp_path):
    bench_real = importlib.import_module("bench_real")
    args = bench_real.parse_args(["--output_dir", str(tmp_path), "--cv", "3", "--cv_grading"])
    assert args.cv_grading and args.grading_steps == 120
    for bad in (["--cv_grading"], ["--grading_steps", "0"]):
        with pytest.raises(SystemExit):
            bench_real.parse_args(["--output_dir", str(tmp_path), *bad])
