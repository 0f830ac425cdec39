"""bench/real_compare.py: paired comparison of two bench_real cross-validations on the folds finished in both,
on fake run folders (no training)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import real_compare

from modeling_emrfuse.brats_labels import REGIONS


def _run(out, fold, cases, dice, done=True, recipe="image", has_report=None):
    run = out / "runs" / f"cv-fold{fold}-{recipe}"
    (run / "eval").mkdir(parents=True)
    (out / "runs" / f"cv-fold{fold}-split.json").write_text(json.dumps({"train": [], "test": cases}))
    with (run / "eval" / "per_case.csv").open("w", newline="") as fh:
        keys = ["case_id", "has_report"] + [f"{r}_{m}" for r in REGIONS for m in ("dice", "hd95")]
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for i, (case, value) in enumerate(zip(cases, dice)):
            reported = bool(has_report and has_report[i])
            writer.writerow({"case_id": case, "has_report": reported, **{k: value for k in keys[2:]}})
    if done:
        (run / ".bench_real_done.json").write_text("{}")


def test_paired_difference_on_folds_finished_in_both(tmp_path):
    base, other = tmp_path / "base", tmp_path / "other"
    _run(base, 0, ["a", "b"], [0.5, 0.6])
    _run(base, 1, ["c", "d"], [0.7, 0.8])
    _run(other, 0, ["a", "b"], [0.6, 0.8])
    _run(other, 1, ["c", "d"], [0.9, 0.9], done=False)  # still running: left out
    result = real_compare.compare(base, other)
    assert result["folds"] == [1] and result["n_cases"] == 2
    dice = result["metrics"]["WT_dice"]
    assert dice["base"] == pytest.approx(0.55) and dice["other"] == pytest.approx(0.7)
    assert dice["difference"].mean == pytest.approx(np.mean([0.1, 0.2]))
    only_a = real_compare.compare(base, other, keep=["a"])
    assert only_a["n_cases"] == 1 and only_a["metrics"]["ET_dice"]["difference"].mean == pytest.approx(0.1)
    assert "other - base" in real_compare.to_markdown(result, base, other, "image")


def test_different_folds_are_refused(tmp_path):
    base, other = tmp_path / "base", tmp_path / "other"
    _run(base, 0, ["a", "b"], [0.5, 0.6])
    _run(other, 0, ["a", "c"], [0.5, 0.6])
    with pytest.raises(SystemExit, match="different cases"):
        real_compare.compare(base, other)


def test_two_recipes_of_one_run_on_the_cases_with_a_report(tmp_path):
    out = tmp_path / "run"
    _run(out, 0, ["a", "b", "c"], [0.5, 0.6, 0.7])
    _run(out, 0, ["a", "b", "c"], [0.9, 0.6, 0.4], recipe="image+report", has_report=[True, False, True])
    result = real_compare.compare(out, out, "image", other_recipe="image+report", report_cases_only=True)
    assert result["n_cases"] == 2  # b has no report: left out
    assert result["metrics"]["TC_dice"]["difference"].mean == pytest.approx(np.mean([0.4, -0.3]))
    every = real_compare.compare(out, out, "image", other_recipe="image+report")
    assert every["n_cases"] == 3
    without = real_compare.compare(out, out, "image", other_recipe="image+report", no_report_cases_only=True)
    assert without["n_cases"] == 1 and without["metrics"]["WT_dice"]["difference"].mean == pytest.approx(0.0)
    text = real_compare.to_markdown(result, out, out, "image", "image+report")
    assert "recipe `image+report`" in text and "against `image`" in text
    real_compare.main(["--base", str(out), "--other_recipe", "image+report", "--report_cases_only"])
    assert (out / "compare-image+report-vs-image.md").is_file()
    with pytest.raises(SystemExit, match="against itself"):
        real_compare.main(["--base", str(out)])
